//! `y = W·x` for quantized weights — launcher of `shaders/quant_matmul.wgsl`.

use crate::error::{Error, Result};
use crate::gpu::{Binding, GpuContext, Recorder, WeightMatrix};

const WGSL: &str = include_str!("../../shaders/quant_matmul.wgsl");
const WG: usize = 64;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
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
}

/// Where a matrix product reads its activations and writes its outputs.
#[derive(Clone, Copy)]
pub struct MatmulIo<'a> {
    /// Activations: `m` rows of `W.cols` f32.
    pub x: &'a wgpu::Buffer,
    /// First float of row 0 of `x` (multiple of 4).
    pub x_offset: usize,
    /// Floats between rows of `x` (multiple of 4).
    pub x_stride: usize,
    /// Number of rows (tokens).
    pub m: usize,
    /// Outputs: `m` rows of `W.rows` f32.
    pub y: &'a wgpu::Buffer,
    /// First float of row 0 of `y`.
    pub y_offset: usize,
    /// Floats between rows of `y`.
    pub y_stride: usize,
    /// Add into `y` instead of overwriting it.
    pub accumulate: bool,
}

impl<'a> MatmulIo<'a> {
    /// Dense rows: `x` is `m × w.cols`, `y` is `m × w.rows`, both from offset 0.
    pub fn dense(x: &'a wgpu::Buffer, y: &'a wgpu::Buffer, w: &WeightMatrix, m: usize) -> Self {
        Self { x, x_offset: 0, x_stride: w.cols, m, y, y_offset: 0, y_stride: w.rows, accumulate: false }
    }
}

/// Record `y (+)= W·x` for every part of `w`.
pub fn matmul(rec: &mut Recorder, ctx: &GpuContext, w: &WeightMatrix, io: MatmulIo) -> Result<()> {
    if io.x_offset % 4 != 0 || io.x_stride % 4 != 0 {
        return Err(Error::Shape { op: "matmul", msg: format!("x offset {} / stride {} not multiples of 4", io.x_offset, io.x_stride) });
    }
    let tile = if io.m == 1 { 1 } else { 4 };
    let entry = if io.m == 1 { "main_m1" } else { "main" };
    let kernel = ctx.kernel(&super::weight_reader("quant_matmul", WGSL, entry, w.format, &[("TILE_M", tile), ("WG", WG as u32)]))?;
    for (row0, buf, rows) in &w.parts {
        let p = Params {
            n: *rows as u32,
            k: w.cols as u32,
            m: io.m as u32,
            row_bytes: w.format.row_bytes(w.cols) as u32,
            x_offset: (io.x_offset / 4) as u32,
            x_stride: (io.x_stride / 4) as u32,
            y_offset: io.y_offset as u32,
            y_stride: io.y_stride as u32,
            n_offset: *row0 as u32,
            accumulate: io.accumulate as u32,
        };
        let bindings = vec![Binding::whole(buf), Binding::whole(io.x), Binding::whole(io.y)];
        rec.dispatch(&kernel, &p, bindings, [super::groups(*rows, WG), super::groups(io.m, tile as usize), 1])?;
    }
    Ok(())
}
