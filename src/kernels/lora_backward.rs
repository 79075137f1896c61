//! Gradients of a trained LoRA adapter — launcher of `shaders/lora_backward.wgsl`.

use super::norm::Rows;
use crate::error::Result;
use crate::gpu::{uniform_block, Binding, GpuContext, Recorder};

const WGSL: &str = include_str!("../../shaders/lora_backward.wgsl");

uniform_block! {
    /// The uniform block of the shader (its WGSL declaration is generated from this one).
    pub(super) struct Params {
        m: u32,
        k: u32,
        n: u32,
        r: u32,
        scale: f32,
        x_offset: u32,
        x_stride: u32,
        dy_offset: u32,
        dy_stride: u32,
        w_offset: u32,
        g_offset: u32,
        accumulate: u32,}
}

/// A matrix of floats inside a buffer.
#[derive(Clone, Copy)]
pub struct At<'a> {
    /// The buffer.
    pub buf: &'a wgpu::Buffer,
    /// First float.
    pub offset: usize,
}

/// Everything one projection's adapter backward reads and writes (`y = W·x + s·B·A·x` over
/// `m` rows, `W` `n × k`, rank `r`).
pub struct LoraBackward<'a> {
    /// The projection's input rows.
    pub x: Rows<'a>,
    /// The output's gradient rows.
    pub dy: Rows<'a>,
    /// The input's gradient rows (laid out like `x`); the adapter's share is added.
    pub dx: Rows<'a>,
    /// `A` (`r × k`) and `B` (`n × r`).
    pub a: At<'a>,
    /// `B` (`n × r`).
    pub b: At<'a>,
    /// `u = A·x` from the forward (`m × r`), and scratch for `s·Bᵀ·dy` (`m × r`).
    pub u: &'a wgpu::Buffer,
    /// Scratch for `s·Bᵀ·dy` (`m × r`).
    pub du: &'a wgpu::Buffer,
    /// Where `dA` and `dB` go (same shapes as `A` and `B`).
    pub da: At<'a>,
    /// Where `dB` goes.
    pub db: At<'a>,
    /// Rows.
    pub m: usize,
    /// Inputs of the projection.
    pub k: usize,
    /// Outputs of the projection.
    pub n: usize,
    /// Rank.
    pub r: usize,
    /// The adapter's scale `s`.
    pub scale: f32,
    /// Add into `dA`/`dB` (gradient accumulation) instead of overwriting them.
    pub accumulate: bool,
}

/// Record the adapter's backward on one projection: `dB`, `du`, `dA`, then `dx += Aᵀ·du`.
pub fn lora_backward(rec: &mut Recorder, ctx: &GpuContext, io: &LoraBackward) -> Result<()> {
    let params = |w_offset: usize, g_offset: usize| Params {
        m: io.m as u32,
        k: io.k as u32,
        n: io.n as u32,
        r: io.r as u32,
        scale: io.scale,
        x_offset: io.x.offset as u32,
        x_stride: io.x.stride as u32,
        dy_offset: io.dy.offset as u32,
        dy_stride: io.dy.stride as u32,
        w_offset: w_offset as u32,
        g_offset: g_offset as u32,
        accumulate: io.accumulate as u32,
    };
    let mut run =
        |entry: &'static str, p: Params, lhs: &wgpu::Buffer, rhs: &wgpu::Buffer, out: &wgpu::Buffer, total: usize| -> Result<()> {
            let kernel = ctx.kernel(&super::plain::<Params>(&format!("lora_backward_{entry}"), WGSL, entry))?;
            rec.dispatch(&kernel, &p, vec![Binding::whole(lhs), Binding::whole(rhs), Binding::whole(out)], [super::groups(total, 64), 1, 1])
        };
    run("grad_b", params(0, io.db.offset), io.dy.buf, io.u, io.db.buf, io.n * io.r)?;
    run("down", params(io.b.offset, 0), io.dy.buf, io.b.buf, io.du, io.m * io.r)?;
    run("grad_a", params(0, io.da.offset), io.du, io.x.buf, io.da.buf, io.r * io.k)?;
    // dx is laid out like x: the x offset/stride address it.
    let p = Params { x_offset: io.dx.offset as u32, x_stride: io.dx.stride as u32, ..params(io.a.offset, 0) };
    run("back_x", p, io.du, io.a.buf, io.dx.buf, io.m * io.k)
}
