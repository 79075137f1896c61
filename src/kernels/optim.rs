//! AdamW — launcher of `shaders/adamw.wgsl`.

use crate::error::Result;
use crate::gpu::{Binding, GpuContext, Recorder};
use crate::train::AdamW;

const WGSL: &str = include_str!("../../shaders/adamw.wgsl");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    offset: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    c1: f32,
    c2: f32,
}

/// The moments of one parameter tensor on the GPU.
pub struct GpuMoments<'a> {
    /// First moment.
    pub m: &'a wgpu::Buffer,
    /// Second moment.
    pub v: &'a wgpu::Buffer,
}

/// Record one AdamW step (`opt`'s rule, step `t` ≥ 1, learning rate `lr`) of the parameters
/// `range` (start, length in floats) of `w` with gradients `g` (moments laid out alike).
#[allow(clippy::too_many_arguments)]
pub fn adamw(
    rec: &mut Recorder,
    ctx: &GpuContext,
    opt: &AdamW,
    w: &wgpu::Buffer,
    g: &wgpu::Buffer,
    state: GpuMoments,
    range: (usize, usize),
    t: u64,
    lr: f32,
) -> Result<()> {
    let (offset, n) = range;
    let kernel = ctx.kernel(&super::plain("adamw", WGSL, "main"))?;
    let p = Params {
        n: n as u32,
        offset: offset as u32,
        lr,
        beta1: opt.beta1,
        beta2: opt.beta2,
        eps: opt.eps,
        weight_decay: opt.weight_decay,
        c1: 1.0 - opt.beta1.powi(t as i32),
        c2: 1.0 - opt.beta2.powi(t as i32),
    };
    rec.dispatch(
        &kernel,
        &p,
        vec![Binding::whole(w), Binding::whole(g), Binding::whole(state.m), Binding::whole(state.v)],
        super::flat_grid(n),
    )
}
