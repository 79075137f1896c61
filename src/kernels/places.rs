//! Where the rows of a forward pass sit in their sequences: the per-row table that RoPE, the KV
//! store and attention read, so that one dispatch of each serves every sequence of a pass (each
//! row with its own cache slot and position) instead of one dispatch per sequence.

use crate::error::{Error, Result};

/// One row of a pass, as the kernels read it (four u32, `vec4<u32>` in WGSL).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RowPlace {
    /// The layer buffers' row holding position 0 of the row's sequence (its cache slot).
    pub base: u32,
    /// The row's position: its RoPE angle and the last key it attends to (`pos0` + its index
    /// among its sequence's new rows, or `pos0` + its depth in a token tree).
    pub pos: u32,
    /// Positions the sequence's cache held before the pass.
    pub pos0: u32,
    /// The row's index among its sequence's new rows: its key and value are stored at cache row
    /// `base + pos0 + index` (a token tree's rows too, whatever their depth).
    pub index: u32,
}

/// The places of one sequence's `len` new rows after `pos0` cached positions in the cache slot
/// starting at row `base`; with a token tree, its rows' depths.
pub fn place_sequence(base: usize, pos0: usize, len: usize, depths: Option<&[i32]>) -> Result<Vec<RowPlace>> {
    let fits = |x: usize| u32::try_from(x).map_err(|_| Error::InvalidOption(format!("cache row {x} beyond the kernels' 32-bit indices")));
    let (b, p0) = (fits(base)?, fits(pos0)?);
    fits(base + pos0 + len)?;
    (0..len)
        .map(|i| {
            let offset = depths.map_or(i, |d| d.get(i).map_or(i, |&d| (d.max(0) as usize).min(i)));
            Ok(RowPlace { base: b, pos: p0 + fits(offset)?, pos0: p0, index: fits(i)? })
        })
        .collect()
}

/// The rows of one dispatch: `rows[i]` is entry `at + i` of the table in `buf` (uploaded from
/// the same slice), the row `i` of the dispatch's activations. A dispatch covers every new row of
/// its sequences.
#[derive(Clone, Copy)]
pub struct Places<'a> {
    /// The pass's table on the GPU.
    pub buf: &'a wgpu::Buffer,
    /// The table's entry of the dispatch's first row.
    pub at: usize,
    /// The dispatch's rows (the host copy the launchers check).
    pub rows: &'a [RowPlace],
}

impl<'a> Places<'a> {
    /// Rows `from..from + n` of these.
    pub fn range(self, from: usize, n: usize) -> Result<Self> {
        let rows = self
            .rows
            .get(from..from + n)
            .ok_or_else(|| Error::Shape { op: "places", msg: format!("rows {from}..{} of a table of {}", from + n, self.rows.len()) })?;
        Ok(Self { at: self.at + from, rows, ..self })
    }

    /// Whether every sequence has one row (decode rows).
    pub fn one_row_each(&self) -> bool {
        self.rows.iter().all(|p| p.index == 0)
    }

    /// Whether every row belongs to one sequence (one cache slot).
    pub fn one_sequence(&self) -> bool {
        self.rows.windows(2).all(|w| w[0].base == w[1].base)
    }

    /// Check that there is a place per row of an operand of `n` rows, that every row's cache
    /// row lies within `cache_rows` and its position between its sequence's first new position
    /// and its own cache row's.
    pub(super) fn check(&self, op: &'static str, n: usize, cache_rows: usize) -> Result<()> {
        if self.rows.len() != n {
            return Err(Error::Shape { op, msg: format!("{} row places for {n} rows", self.rows.len()) });
        }
        if (self.at + n) as u64 * 16 > self.buf.size() {
            return Err(Error::Shape { op, msg: format!("row places {}..{} beyond their buffer", self.at, self.at + n) });
        }
        let outside = |p: &&RowPlace| {
            let (base, pos, pos0, index) = (p.base as u64, p.pos as u64, p.pos0 as u64, p.index as u64);
            base + pos0 + index >= cache_rows as u64 || pos < pos0 || pos > pos0 + index
        };
        match self.rows.iter().find(outside) {
            Some(p) => Err(Error::Shape { op, msg: format!("{p:?} outside a cache of {cache_rows} rows") }),
            None => Ok(()),
        }
    }
}
