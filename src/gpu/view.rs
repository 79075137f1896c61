//! [`View`]: rows of f32 in a GPU buffer, the operand every launcher takes. Offsets and strides
//! are counted in floats here and nowhere else; launchers check shapes against each other and
//! against the buffer before recording anything.

use crate::error::{Error, Result};

/// `rows` rows of `cols` f32 in `buf`, row `r` starting at float `offset + r·stride`.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    /// The buffer.
    pub buf: &'a wgpu::Buffer,
    /// First float of row 0.
    pub offset: usize,
    /// Number of rows.
    pub rows: usize,
    /// Floats per row.
    pub cols: usize,
    /// Floats from one row to the next (≥ `cols` unless rows overlap on purpose).
    pub stride: usize,
}

impl<'a> View<'a> {
    /// Dense rows from the buffer's start.
    pub fn new(buf: &'a wgpu::Buffer, rows: usize, cols: usize) -> Self {
        Self { buf, offset: 0, rows, cols, stride: cols }
    }

    /// Rows `first..first + n`.
    pub fn rows(self, first: usize, n: usize) -> Self {
        Self { offset: self.offset + first * self.stride, rows: n, ..self }
    }

    /// Columns `first..first + n` of every row (a projection's part of interleaved rows).
    pub fn cols(self, first: usize, n: usize) -> Self {
        Self { offset: self.offset + first, cols: n, ..self }
    }

    /// Each row cut into rows of `n` floats (attention heads); the rows must be dense.
    pub fn split_rows(self, n: usize) -> Result<Self> {
        if n == 0 || self.cols % n != 0 || (self.rows > 1 && self.stride != self.cols) {
            return Err(Error::Shape { op: "view", msg: format!("{self} cannot be cut into rows of {n}") });
        }
        Ok(Self { rows: self.rows * self.cols / n, cols: n, stride: n, ..self })
    }

    /// One float past the last one the view covers.
    pub fn end(&self) -> usize {
        if self.rows == 0 {
            self.offset
        } else {
            self.offset + (self.rows - 1) * self.stride + self.cols
        }
    }

    /// Check that the view lies inside its buffer, and that its offset and stride are multiples
    /// of `align` floats (the vec4 or f16-pair loads of the kernel `op`).
    pub fn check(&self, op: &'static str, name: &str, align: usize) -> Result<()> {
        if (self.end() * 4) as u64 > self.buf.size() {
            return Err(Error::Shape { op, msg: format!("{name}: {self} reaches past its buffer of {} floats", self.buf.size() / 4) });
        }
        if self.offset % align != 0 || self.stride % align != 0 {
            return Err(Error::Shape { op, msg: format!("{name}: {self} needs offset and stride in multiples of {align} floats") });
        }
        Ok(())
    }

    /// Check that this view and `other` have the same shape.
    pub fn same_shape(&self, op: &'static str, other: &View) -> Result<()> {
        if (self.rows, self.cols) != (other.rows, other.cols) {
            return Err(Error::Shape { op, msg: format!("operands of different shapes: {self} and {other}") });
        }
        Ok(())
    }
}

impl std::fmt::Display for View<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}×{} rows at float {} (stride {})", self.rows, self.cols, self.offset, self.stride)
    }
}
