//! Element-wise ops — launcher of `shaders/elementwise.wgsl`.

use crate::error::{Error, Result};
use crate::gpu::{uniform_block, Binding, GpuContext, Recorder, ShaderSource, View};
use crate::hparams::Activation;

const WGSL: &str = include_str!("../../shaders/elementwise.wgsl");

/// An entry point of elementwise.wgsl (with the activations it shares with the fused product).
fn kernel(ctx: &GpuContext, entry: &'static str) -> Result<std::sync::Arc<crate::gpu::Kernel>> {
    ctx.kernel(&ShaderSource { files: vec![super::ACTIVATION_WGSL, WGSL], ..super::plain::<Params>(entry, WGSL, entry) })
}

uniform_block! {
    /// The uniform block of the shader (its WGSL declaration is generated from this one).
    pub(super) struct Params {
        total: u32,
        n: u32,
        offset: u32,
        stride: u32,
        act: u32,
    }
}

/// Record `gate[i] = act(gate[i]) · up[i]` for the first `total` elements.
pub fn glu(rec: &mut Recorder, ctx: &GpuContext, act: Activation, gate: &wgpu::Buffer, up: &wgpu::Buffer, total: usize) -> Result<()> {
    let kernel = kernel(ctx, "glu")?;
    let p = Params { total: total as u32, n: 0, offset: 0, stride: 0, act: act.code() };
    rec.dispatch(&kernel, &p, vec![Binding::whole(gate), Binding::whole(up)], super::flat_grid(total))
}

/// Record the gradient through [`glu`] for the first `total` elements: given the gate's input in
/// `gate`, `up` and the output's gradient `dy`, `gate` becomes ∂/∂gate and `up` ∂/∂up.
pub fn glu_backward(
    rec: &mut Recorder,
    ctx: &GpuContext,
    act: Activation,
    gate: &wgpu::Buffer,
    up: &wgpu::Buffer,
    dy: &wgpu::Buffer,
    total: usize,
) -> Result<()> {
    let kernel = kernel(ctx, "glu_backward")?;
    let p = Params { total: total as u32, n: 0, offset: 0, stride: 0, act: act.code() };
    rec.dispatch(&kernel, &p, vec![Binding::whole(gate), Binding::whole(up), Binding::whole(dy)], super::flat_grid(total))
}

/// Record `a[row r][i] += bias[i]` for every row of `a`.
pub fn add_rows(rec: &mut Recorder, ctx: &GpuContext, a: View, bias: &wgpu::Buffer) -> Result<()> {
    a.check("add_rows", "a", 1)?;
    if (a.cols * 4) as u64 > bias.size() {
        return Err(Error::Shape { op: "add_rows", msg: format!("a bias of {} floats for rows of {}", bias.size() / 4, a.cols) });
    }
    let kernel = kernel(ctx, "add_rows")?;
    let total = a.rows * a.cols;
    let p = Params { total: total as u32, n: a.cols as u32, offset: a.offset as u32, stride: a.stride as u32, act: 0 };
    rec.dispatch(&kernel, &p, vec![Binding::whole(a.buf), Binding::whole(bias)], super::flat_grid(total))
}
