//! RMSNorm — launcher of `shaders/rms_norm.wgsl`.

use crate::error::Result;
use crate::gpu::{uniform_block, Binding, GpuContext, Recorder};

const WGSL: &str = include_str!("../../shaders/rms_norm.wgsl");

uniform_block! {
    /// The uniform block of the shader (its WGSL declaration is generated from this one).
    pub(super) struct Params {
        rows: u32,
        n: u32,
        x_offset: u32,
        x_stride: u32,
        y_offset: u32,
        y_stride: u32,
        accumulate: u32,
        eps: f32,}
}

impl Params {
    fn new(rows: usize, n: usize, x: &Rows, y: &Rows, accumulate: bool, eps: f32) -> Self {
        Self {
            rows: rows as u32,
            n: n as u32,
            x_offset: x.offset as u32,
            x_stride: x.stride as u32,
            y_offset: y.offset as u32,
            y_stride: y.stride as u32,
            accumulate: accumulate as u32,
            eps,
        }
    }
}

/// Rows of a buffer: `rows` rows of `n` floats, row r at `offset + r·stride`.
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    /// The buffer.
    pub buf: &'a wgpu::Buffer,
    /// First float of row 0.
    pub offset: usize,
    /// Floats from one row to the next.
    pub stride: usize,
}

/// Record `y (+)= rmsnorm(x) · w` over `rows` rows of `n`.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm(
    rec: &mut Recorder,
    ctx: &GpuContext,
    w: &wgpu::Buffer,
    x: Rows,
    y: Rows,
    rows: usize,
    n: usize,
    eps: f32,
    accumulate: bool,
) -> Result<()> {
    let kernel = ctx.kernel(&super::plain::<Params>("rms_norm", WGSL, "norm"))?;
    let p = Params::new(rows, n, &x, &y, accumulate, eps);
    rec.dispatch(&kernel, &p, vec![Binding::whole(w), Binding::whole(x.buf), Binding::whole(y.buf)], [super::groups(rows, 64), 1, 1])
}

/// Record `y = rmsnorm(y) · w` in place over `rows` rows of `n` (per-head q/k norms).
pub fn rms_norm_inplace(rec: &mut Recorder, ctx: &GpuContext, w: &wgpu::Buffer, y: Rows, rows: usize, n: usize, eps: f32) -> Result<()> {
    let kernel = ctx.kernel(&super::plain::<Params>("rms_norm_inplace", WGSL, "norm_inplace"))?;
    // The row is read and written in place: only y's offset and stride matter.
    let p = Params::new(rows, n, &y, &y, false, eps);
    rec.dispatch(&kernel, &p, vec![Binding::whole(w), Binding::whole(y.buf)], [super::groups(rows, 64), 1, 1])
}

/// Record the gradient through [`rms_norm`]: `dx (+)= ∂/∂x Σ dy·(rmsnorm(x)·w)` over `rows` rows
/// of `n` (`x` and `dy` laid out alike; the weight is frozen).
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_backward(
    rec: &mut Recorder,
    ctx: &GpuContext,
    w: &wgpu::Buffer,
    x: Rows,
    dy: &wgpu::Buffer,
    dx: Rows,
    rows: usize,
    n: usize,
    eps: f32,
    accumulate: bool,
) -> Result<()> {
    let kernel = ctx.kernel(&super::plain::<Params>("rms_norm_backward", WGSL, "norm_backward"))?;
    let p = Params::new(rows, n, &x, &dx, accumulate, eps);
    let bindings = vec![Binding::whole(w), Binding::whole(x.buf), Binding::whole(dy), Binding::whole(dx.buf)];
    rec.dispatch(&kernel, &p, bindings, [super::groups(rows, 64), 1, 1])
}
