//! `y = W·x (+ LoRA)` for quantized weights — launcher of `shaders/quant_matmul.wgsl` with
//! `quant_matmul_f32.wgsl` (f32 activations; the CPU family's entry in `product_x_subgroup.wgsl`
//! or `product_x_own.wgsl`) or `quant_matmul_q8.wgsl` (8-bit activations from
//! [`super::quantize`]). The LoRA shrink that precedes the fused expand is [`super::lora`].

use super::norm::RmsNorm;
use super::quantize::Q8Rows;
use crate::error::{Error, Result};
use crate::gguf::BlockFormat;
use crate::gpu::{uniform_block, Binding, DeviceClass, GpuContext, Kernel, Recorder, View, WeightMatrix};
use crate::hparams::Activation;
use std::sync::Arc;

const WGSL: &str = include_str!("../../shaders/quant_matmul.wgsl");
const F32_WGSL: &str = include_str!("../../shaders/quant_matmul_f32.wgsl");
const Q8_WGSL: &str = include_str!("../../shaders/quant_matmul_q8.wgsl");
const X_SUBGROUP_WGSL: &str = include_str!("../../shaders/product_x_subgroup.wgsl");
const X_OWN_WGSL: &str = include_str!("../../shaders/product_x_own.wgsl");
/// Invocations per workgroup in the CPU-backed family: small, so even a 192-row projection
/// spreads over both threads of a CPU-backed device.
const WG: usize = 16;

/// Output rows × batch rows one invocation computes (the shader's ROWS × COLS) in the CPU-backed
/// family. Measured side by side on lavapipe (docs/performance.md): decode 8 rows, 16 for a
/// matrix as tall as an LM head (rows to spare; each x load serves more of them); prefill 4
/// batch rows by [`prompt_tile_rows`]; a few rows (a jump-forward chunk) 8 × 4, so even a narrow
/// projection spreads over the threads. `lanes`: how many invocations the device runs at once.
fn tile(rows: usize, m: usize, lanes: usize) -> (usize, usize) {
    match (m, rows) {
        (1, r) if r >= 16384 => (16, 1),
        (1, _) => (8, 1),
        (2..=4, r) if r < 16384 => (8, 4),
        _ => (prompt_tile_rows(rows, lanes), 4),
    }
}

/// A prompt tile's output rows: of 32, 24 and 16 (the larger on a tie), the one that leaves the
/// fewest lanes without rows. A CPU-backed device runs `lanes` invocations of a workgroup as one
/// vector, which costs as much with one tile in it as with `lanes`: SmolLM2's 576-row matrices
/// make 18 tiles of 32, three runs of 8 lanes of which the last holds 2, where 24 tiles of 24
/// fill three.
fn prompt_tile_rows(rows: usize, lanes: usize) -> usize {
    [32, 24, 16].into_iter().min_by_key(|&r| rows.div_ceil(r).div_ceil(lanes) * lanes * r).unwrap_or(32)
}

/// The GPU family: invocations sharing one output row (a power of two no larger than any common
/// GPU's subgroup), the workgroup size, and the batch rows each invocation serves in prefill.
const LANES: usize = 8;
const GPU_WG: usize = 64;
const GPU_COLS: usize = 4;

/// The product kernel for `format` in `ctx`'s kernel family, over f32 or (`q8`) 8-bit
/// activations, and its grid for a part of `rows` rows and `m` batch rows.
fn product_kernel(ctx: &GpuContext, format: BlockFormat, rows: usize, m: usize, gated: bool, q8: bool) -> Result<(Arc<Kernel>, [u32; 3])> {
    let (name, entry, consts, grid) = match ctx.class {
        DeviceClass::Cpu => {
            let (tile_n, tile_m) = tile(rows, m, ctx.simd_lanes().min(WG));
            let grid = [super::groups(rows.div_ceil(tile_n), WG), super::groups(m, tile_m), 1];
            ("quant_matmul", "main", [("WG", WG), ("ROWS", tile_n), ("COLS", tile_m), ("LANES", 1), ("GLU", gated as usize)], grid)
        }
        DeviceClass::Gpu => {
            let cols = if m == 1 { 1 } else { GPU_COLS };
            let grid = [super::groups(rows, GPU_WG / LANES), super::groups(m, cols), 1];
            (
                "quant_matmul_coop",
                "cooperative",
                [("WG", GPU_WG), ("ROWS", 1), ("COLS", cols), ("LANES", LANES), ("GLU", gated as usize)],
                grid,
            )
        }
    };
    let consts = consts.map(|(k, v)| (k, v as u32));
    // Both families share across lanes by subgroup shuffles where subgroups hold 8 lanes (the
    // GPU family its sums, the CPU family its f32 activations), else the GPU family through
    // workgroup memory and the CPU family not at all.
    let subgroups = ctx.subgroups_hold(LANES as u32);
    let mut src = super::with_lane_reduce(super::weight_reader::<Params>(name, WGSL, entry, format, &consts), subgroups);
    src.files.push(super::ACTIVATION_WGSL);
    if q8 {
        src.files.push(Q8_WGSL);
        src.prelude.push_str(&format!("fn load32q(row_byte: u32, k: u32) -> Q32 {{ return load32q_{}(row_byte, k); }}\n", format.name()));
        src.name.push_str("_q8");
    } else {
        src.files.push(F32_WGSL);
        src.files.push(if subgroups { X_SUBGROUP_WGSL } else { X_OWN_WGSL });
    }
    if gated {
        src.name.push_str("_glu");
    }
    Ok((ctx.kernel(&src)?, grid))
}

uniform_block! {
    /// The uniform block of the shader (its WGSL declaration is generated from this one).
    pub(super) struct Params {
        n: u32,
        k: u32,
        m: u32,
        row_bytes: u32,
        x_offset: u32,
        x_stride: u32,
        y_offset: u32,
        y_stride: u32,
        n_offset: u32,
        accumulate: u32,
        lora: u32,
        max_rank: u32,
        n_slots: u32,
        pair_offset: u32,
        act: u32,
        up_lora: u32,
        up_max_rank: u32,
        up_n_slots: u32,
        lora_split1: u32,
        lora_split2: u32,
        norm: u32,
        eps: f32,
        slots: [[u32; 4]; MAX_SLOTS],
        up_slots: [[u32; 4]; MAX_SLOTS],
    }
}

/// Most adapters one dispatch can mix.
pub const MAX_SLOTS: usize = 8;

/// One adapter of a multi-LoRA dispatch: where its A and B matrices sit in the packed buffers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraSlot {
    /// First float of A (`rank × in`, row-major) in the A buffer; a multiple of 4.
    pub a_offset: usize,
    /// First float of B (`out × rank`, row-major) in the B buffer.
    pub b_offset: usize,
    /// Rank.
    pub rank: usize,
    /// Multiplier of B·A.
    pub scale: f32,
}

/// The adapters of a dispatch and, per batch row, which one applies (−1: none).
#[derive(Clone, Copy)]
pub struct LoraIo<'a> {
    /// Packed A matrices (f32).
    pub a_pack: &'a wgpu::Buffer,
    /// Packed B matrices (f32).
    pub b_pack: &'a wgpu::Buffer,
    /// Per batch row: slot index or −1 (i32).
    pub row_slot: &'a wgpu::Buffer,
    /// Scratch for the shrink: `m × max_rank` f32.
    pub u: &'a wgpu::Buffer,
    /// Largest rank among the slots.
    pub max_rank: usize,
    /// The adapters.
    pub slots: &'a [LoraSlot],
    /// For projections stacked into one product (query, key, value), whose shrink ran over their
    /// A matrices stacked too: the output rows from which an adapter's `u` is read one of its
    /// ranks further, and two (each projection's rows use its own part of `u`). `None`: one
    /// projection.
    pub u_splits: Option<[usize; 2]>,
}

impl LoraIo<'_> {
    pub(super) fn packed_slots(&self) -> Result<[[u32; 4]; MAX_SLOTS]> {
        if self.slots.len() > MAX_SLOTS {
            return Err(Error::Shape { op: "lora", msg: format!("{} adapters in one dispatch, at most {MAX_SLOTS}", self.slots.len()) });
        }
        let mut out = [[0u32; 4]; MAX_SLOTS];
        for (o, s) in out.iter_mut().zip(self.slots) {
            if s.a_offset % 4 != 0 || s.rank > self.max_rank {
                return Err(Error::Shape {
                    op: "lora",
                    msg: format!("slot {s:?}: A offset must be a multiple of 4 and rank ≤ max_rank {}", self.max_rank),
                });
            }
            *o = [s.a_offset as u32, s.b_offset as u32, s.rank as u32, s.scale.to_bits()];
        }
        Ok(out)
    }
}

/// Where a matrix product reads its activations and writes its outputs.
#[derive(Clone, Copy)]
pub struct MatmulIo<'a> {
    /// Activations: rows of `W.cols` (offset and stride multiples of 4: vec4 loads).
    pub x: View<'a>,
    /// Outputs: as many rows, of `W.rows`.
    pub y: View<'a>,
    /// Add into `y` instead of overwriting it.
    pub accumulate: bool,
    /// Adapters whose expand is fused into this product (their shrink must already be recorded).
    pub lora: Option<LoraIo<'a>>,
    /// Normalize each row of `x` first (the RMSNorm before the projections, fused into them).
    pub norm: Option<RmsNorm<'a>>,
    /// `x` already quantized to 8 bits by [`quantize_q8`](super::quantize::quantize_q8) (with
    /// `norm`'s weights applied there): a matrix with an integer form reads these instead of `x`
    /// (which the other formats, and the LoRA shrink, still read).
    pub q8: Option<Q8Rows<'a>>,
}

impl<'a> MatmulIo<'a> {
    /// `x` into `y`, overwriting, with no adapter and no norm.
    pub fn new(x: View<'a>, y: View<'a>) -> Self {
        Self { x, y, accumulate: false, lora: None, norm: None, q8: None }
    }

    /// Dense rows: `x` is `m × w.cols`, `y` is `m × w.rows`, both from offset 0.
    pub fn dense(x: &'a wgpu::Buffer, y: &'a wgpu::Buffer, w: &WeightMatrix, m: usize) -> Self {
        Self::new(View::new(x, m, w.cols), View::new(y, m, w.rows))
    }

    /// Check the operands against a `rows × cols` matrix.
    pub(super) fn check(&self, op: &'static str, rows: usize, cols: usize) -> Result<()> {
        if self.x.cols != cols || self.y.cols != rows || self.x.rows != self.y.rows {
            return Err(Error::Shape { op, msg: format!("x {} and y {} through a {rows}×{cols} matrix", self.x, self.y) });
        }
        self.x.check(op, "x", 4)?;
        self.y.check(op, "y", 1)?;
        if let Some(n) = &self.norm {
            n.check(op, cols)?;
        }
        if let Some(q) = &self.q8 {
            q.check(op, self.x.rows, cols)?;
        }
        Ok(())
    }
}

/// Record `y (+)= W·x` for every part of `w`.
pub fn matmul(rec: &mut Recorder, ctx: &GpuContext, w: &WeightMatrix, io: MatmulIo) -> Result<()> {
    product(rec, ctx, w, io, None)
}

/// The up half of a gated product (see [`matmul_gated`]).
#[derive(Clone, Copy)]
pub struct GatedUp<'a> {
    /// The up projection, in the gate's buffer ([`WeightMatrix::upload_group`]).
    pub up: &'a WeightMatrix,
    /// The gate's activation.
    pub act: Activation,
    /// The up projection's adapters (their shrink already recorded into `lora.u`); the gate's
    /// are `io.lora`. Both must use the same `row_slot`.
    pub lora: Option<LoraIo<'a>>,
}

/// Record `y = act(W_gate·x) · (W_up·x)` (each with its adapters' deltas) in one dispatch: the
/// two projections of a gated feed-forward block and its GLU. `up.up` must share the gate's
/// buffer ([`WeightMatrix::pair_offset`]) and `io.accumulate` must be off.
pub fn matmul_gated(rec: &mut Recorder, ctx: &GpuContext, gate: &WeightMatrix, up: GatedUp, io: MatmulIo) -> Result<()> {
    product(rec, ctx, gate, io, Some(up))
}

fn product(rec: &mut Recorder, ctx: &GpuContext, w: &WeightMatrix, io: MatmulIo, gated: Option<GatedUp>) -> Result<()> {
    io.check("matmul", w.rows, w.cols)?;
    let m = io.x.rows;
    let pair_offset = match &gated {
        None => 0,
        Some(g) => {
            let off = w.pair_offset(g.up).filter(|_| g.up.rows == w.rows && !io.accumulate);
            let off = off.ok_or_else(|| Error::Shape {
                op: "matmul_gated",
                msg: format!(
                    "the up projection ({}×{} {:?}) must share the gate's buffer and shape, without accumulation",
                    g.up.rows, g.up.cols, g.up.format
                ),
            })?;
            u32::try_from(off)
                .map_err(|_| Error::Shape { op: "matmul_gated", msg: format!("up projection at byte {off}: beyond 4 GiB") })?
        }
    };
    let up_lora = gated.as_ref().and_then(|g| g.lora);
    if let (Some(a), Some(b)) = (&io.lora, &up_lora) {
        if a.row_slot != b.row_slot {
            return Err(Error::Shape {
                op: "matmul_gated",
                msg: "the gate's and the up projection's adapters must share one row_slot buffer".into(),
            });
        }
    }
    let slots = io.lora.as_ref().map(|l| l.packed_slots()).transpose()?.unwrap_or_default();
    let up_slots = up_lora.as_ref().map(|l| l.packed_slots()).transpose()?.unwrap_or_default();
    let none = ctx.placeholder();
    let any_lora = io.lora.as_ref().or(up_lora.as_ref());
    let (row_slot, b_pack) = any_lora.map_or((none, none), |l| (l.row_slot, l.b_pack));
    let u = io.lora.as_ref().map_or(none, |l| l.u);
    let u_up = up_lora.as_ref().map_or(none, |l| l.u);
    let split = io.lora.as_ref().and_then(|l| l.u_splits).map_or([u32::MAX; 2], |s| s.map(|r| r as u32));
    let q8 = io.q8.filter(|_| w.format.has_integer_form());
    for part in &w.parts {
        let (kernel, grid) = product_kernel(ctx, w.format, part.rows, m, gated.is_some(), q8.is_some())?;
        let p = Params {
            n: part.rows as u32,
            k: w.cols as u32,
            m: m as u32,
            row_bytes: w.row_bytes() as u32,
            x_offset: (io.x.offset / 4) as u32,
            x_stride: (io.x.stride / 4) as u32,
            y_offset: io.y.offset as u32,
            y_stride: io.y.stride as u32,
            n_offset: part.row0 as u32,
            accumulate: io.accumulate as u32,
            lora: io.lora.is_some() as u32,
            max_rank: io.lora.as_ref().map_or(0, |l| l.max_rank as u32),
            n_slots: io.lora.as_ref().map_or(0, |l| l.slots.len() as u32),
            pair_offset,
            act: gated.as_ref().map_or(0, |g| g.act.code()),
            up_lora: up_lora.is_some() as u32,
            up_max_rank: up_lora.as_ref().map_or(0, |l| l.max_rank as u32),
            up_n_slots: up_lora.as_ref().map_or(0, |l| l.slots.len() as u32),
            lora_split1: split[0],
            lora_split2: split[1],
            norm: io.norm.is_some() as u32,
            eps: io.norm.map_or(0.0, |n| n.eps),
            slots,
            up_slots,
        };
        // Gated, the binding spans the gate's rows and the up projection's after them.
        let weights = match &gated {
            None => part.binding(),
            Some(g) => Binding::range(&part.buf, part.offset, pair_offset as u64 + g.up.parts[0].bytes),
        };
        // 8-bit activations take the places of x and of the norm's weights (applied when quantized).
        let (x, nw) = match q8 {
            Some(q) => (q.qs, q.meta),
            None => (io.x.buf, io.norm.map_or(none, |n| n.w)),
        };
        let bindings = vec![
            weights,
            Binding::whole(x),
            Binding::whole(io.y.buf),
            Binding::whole(row_slot),
            Binding::whole(u),
            Binding::whole(b_pack),
            Binding::whole(u_up),
            Binding::whole(nw),
        ];
        rec.dispatch(&kernel, &p, bindings, grid)?;
        let matrices = 1 + gated.is_some() as usize;
        let x_bytes = if q8.is_some() { m * w.cols * 3 / 2 } else { 4 * m * w.cols };
        let activations = x_bytes + 4 * m * part.rows * (1 + io.accumulate as usize);
        rec.declare_bytes((matrices * w.row_bytes() * part.rows + activations) as u64);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::prompt_tile_rows;

    /// Rows of idle lanes: the runs of `lanes` invocations a matrix of `rows` rows takes in tiles
    /// of `tile` rows, less its rows.
    fn idle(rows: usize, tile: usize, lanes: usize) -> usize {
        rows.div_ceil(tile).div_ceil(lanes) * lanes * tile - rows
    }

    #[test]
    fn prompt_tiles_fill_the_lanes() {
        // SmolLM2-135M's projections (k/v 192, q/o/down 576, q+k+v stacked 960, gate/up 1536)
        // leave no lane idle at 8 lanes; 1536 keeps the largest tile.
        for rows in [192, 576, 960, 1536] {
            assert_eq!(idle(rows, prompt_tile_rows(rows, 8), 8), 0, "{rows} rows");
        }
        assert_eq!(prompt_tile_rows(1536, 8), 32);
        for lanes in [1, 4, 8, 16] {
            for rows in (32..5000).step_by(32).chain([100, 896, 4864, 8960]) {
                let t = prompt_tile_rows(rows, lanes);
                assert!([32, 24, 16].contains(&t));
                assert!(idle(rows, t, lanes) <= idle(rows, 32, lanes), "{rows} rows, {lanes} lanes: {t}");
            }
        }
    }
}
