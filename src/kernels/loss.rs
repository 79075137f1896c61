//! Masked cross-entropy — launcher of `shaders/cross_entropy.wgsl`.

use crate::error::{Error, Result};
use crate::gpu::{uniform_block, Binding, GpuContext, Recorder, View};

const WGSL: &str = include_str!("../../shaders/cross_entropy.wgsl");

uniform_block! {
    /// The uniform block of the shader (its WGSL declaration is generated from this one).
    pub(super) struct Params {
        rows: u32,
        row0: u32,
        n_vocab: u32,
        scale: f32,
    }
}

/// Record the cross-entropy of each row of `logits` (dense rows of the vocabulary, from a whole
/// row; buffer row r should predict `tokens[r]`): `loss[r]` gets each row's loss and the row is
/// overwritten with its gradient times `scale` (1 / the example's targets, for its mean).
pub fn cross_entropy(
    rec: &mut Recorder,
    ctx: &GpuContext,
    logits: View,
    tokens: &wgpu::Buffer,
    loss: &wgpu::Buffer,
    scale: f32,
) -> Result<()> {
    if logits.offset % logits.cols.max(1) != 0 || logits.stride != logits.cols {
        return Err(Error::Shape { op: "cross_entropy", msg: format!("logits {logits}: dense rows from a row's start needed") });
    }
    logits.check("cross_entropy", "logits", 1)?;
    let row0 = logits.offset / logits.cols.max(1);
    if ((row0 + logits.rows) * 4) as u64 > tokens.size().min(loss.size()) {
        return Err(Error::Shape { op: "cross_entropy", msg: format!("{} rows but fewer targets or loss slots", logits.rows) });
    }
    let kernel = ctx.kernel(&super::plain::<Params>("cross_entropy", WGSL, "main"))?;
    let p = Params { rows: logits.rows as u32, row0: row0 as u32, n_vocab: logits.cols as u32, scale };
    let bindings = vec![Binding::whole(logits.buf), Binding::whole(tokens), Binding::whole(loss)];
    rec.dispatch(&kernel, &p, bindings, [logits.rows as u32, 1, 1])
}
