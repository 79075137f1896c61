//! Masked cross-entropy — launcher of `shaders/cross_entropy.wgsl`.

use crate::error::Result;
use crate::gpu::{uniform_block, Binding, GpuContext, Recorder};

const WGSL: &str = include_str!("../../shaders/cross_entropy.wgsl");

uniform_block! {
    /// The uniform block of the shader (its WGSL declaration is generated from this one).
    pub(super) struct Params {
        rows: u32,
        n_vocab: u32,
        scale: f32,}
}

/// Record the cross-entropy of `rows` target rows of `logits` (row r should predict
/// `tokens[r]`): `loss[r]` gets each row's loss and the row is overwritten with its gradient
/// times `scale` (1 / targets in the batch, for the mean).
pub fn cross_entropy(
    rec: &mut Recorder,
    ctx: &GpuContext,
    logits: &wgpu::Buffer,
    tokens: &wgpu::Buffer,
    loss: &wgpu::Buffer,
    rows: usize,
    n_vocab: usize,
    scale: f32,
) -> Result<()> {
    let kernel = ctx.kernel(&super::plain::<Params>("cross_entropy", WGSL, "main"))?;
    let p = Params { rows: rows as u32, n_vocab: n_vocab as u32, scale };
    rec.dispatch(&kernel, &p, vec![Binding::whole(logits), Binding::whole(tokens), Binding::whole(loss)], [rows as u32, 1, 1])
}
