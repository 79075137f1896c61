//! RMSNorm — launcher of `shaders/rms_norm.wgsl`.

use crate::error::{Error, Result};
use crate::gpu::{uniform_block, Binding, GpuContext, Recorder, View};

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
        eps: f32,
    }
}

/// An RMSNorm: `x / sqrt(mean(x²) + eps) · w`. Its own dispatch here, or fused into the products
/// that read its output ([`super::matmul::MatmulIo::norm`]).
#[derive(Clone, Copy)]
pub struct RmsNorm<'a> {
    /// The norm's weights: one f32 per column.
    pub w: &'a wgpu::Buffer,
    /// Added to the mean of squares.
    pub eps: f32,
}

impl RmsNorm<'_> {
    /// Check that the weights cover `cols` columns.
    pub(super) fn check(&self, op: &'static str, cols: usize) -> Result<()> {
        if (cols * 4) as u64 > self.w.size() {
            return Err(Error::Shape { op, msg: format!("a norm of {} weights over rows of {cols}", self.w.size() / 4) });
        }
        Ok(())
    }
}

fn params(x: &View, y: &View, accumulate: bool, eps: f32) -> Params {
    Params {
        rows: x.rows as u32,
        n: x.cols as u32,
        x_offset: x.offset as u32,
        x_stride: x.stride as u32,
        y_offset: y.offset as u32,
        y_stride: y.stride as u32,
        accumulate: accumulate as u32,
        eps,
    }
}

/// Record `y (+)= rmsnorm(x) · w`, row by row.
pub fn rms_norm(rec: &mut Recorder, ctx: &GpuContext, norm: RmsNorm, x: View, y: View, accumulate: bool) -> Result<()> {
    x.same_shape("rms_norm", &y)?;
    x.check("rms_norm", "x", 1)?;
    y.check("rms_norm", "y", 1)?;
    norm.check("rms_norm", x.cols)?;
    let kernel = ctx.kernel(&super::plain::<Params>("rms_norm", WGSL, "norm"))?;
    let p = params(&x, &y, accumulate, norm.eps);
    rec.dispatch(&kernel, &p, vec![Binding::whole(norm.w), Binding::whole(x.buf), Binding::whole(y.buf)], [super::groups(x.rows, 64), 1, 1])
}

/// Record `y = rmsnorm(y) · w` in place (the per-head query and key norms).
pub fn rms_norm_inplace(rec: &mut Recorder, ctx: &GpuContext, norm: RmsNorm, y: View) -> Result<()> {
    y.check("rms_norm_inplace", "y", 1)?;
    norm.check("rms_norm_inplace", y.cols)?;
    let kernel = ctx.kernel(&super::plain::<Params>("rms_norm_inplace", WGSL, "norm_inplace"))?;
    // The row is read and written in place: only y's offset and stride matter.
    let p = params(&y, &y, false, norm.eps);
    rec.dispatch(&kernel, &p, vec![Binding::whole(norm.w), Binding::whole(y.buf)], [super::groups(y.rows, 64), 1, 1])
}

/// Record the gradient through [`rms_norm`]: `dx (+)= ∂/∂x Σ dy·(rmsnorm(x)·w)` (the weight is
/// frozen). `dy` must lie at `x`'s offset and stride in its own buffer.
pub fn rms_norm_backward(rec: &mut Recorder, ctx: &GpuContext, norm: RmsNorm, x: View, dy: View, dx: View, accumulate: bool) -> Result<()> {
    x.same_shape("rms_norm_backward", &dx)?;
    x.same_shape("rms_norm_backward", &dy)?;
    if (dy.offset, dy.stride) != (x.offset, x.stride) {
        return Err(Error::Shape { op: "rms_norm_backward", msg: format!("dy ({dy}) must be laid out like x ({x})") });
    }
    for (v, name) in [(&x, "x"), (&dy, "dy"), (&dx, "dx")] {
        v.check("rms_norm_backward", name, 1)?;
    }
    norm.check("rms_norm_backward", x.cols)?;
    let kernel = ctx.kernel(&super::plain::<Params>("rms_norm_backward", WGSL, "norm_backward"))?;
    let p = params(&x, &dx, accumulate, norm.eps);
    let bindings = vec![Binding::whole(norm.w), Binding::whole(x.buf), Binding::whole(dy.buf), Binding::whole(dx.buf)];
    rec.dispatch(&kernel, &p, bindings, [super::groups(x.rows, 64), 1, 1])
}
