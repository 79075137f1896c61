//! Rotary position embedding — launcher of `shaders/rope.wgsl`.

use super::norm::Rows;
use crate::error::Result;
use crate::gpu::{uniform_block, Binding, GpuContext, Recorder};
use crate::hparams::{Rope, RopeLayout};

const WGSL: &str = include_str!("../../shaders/rope.wgsl");

uniform_block! {
    /// The uniform block of the shader (its WGSL declaration is generated from this one).
    pub(super) struct Params {
        n_tokens: u32,
        n_heads: u32,
        head_dim: u32,
        rot_dim: u32,
        pos0: u32,
        offset: u32,
        stride: u32,
        mode: u32,
        log2_base: f32,
        tree: u32,
        inverse: u32,}
}

/// Record the rotation of `n_tokens` rows of `n_heads × head_dim` at positions `pos0..`, or, with
/// a token tree (per row: parent, depth — see [`crate::model::Sequence::tree`]), at `pos0 + depth`.
#[allow(clippy::too_many_arguments)]
pub fn rope(
    rec: &mut Recorder,
    ctx: &GpuContext,
    rope: &Rope,
    v: Rows,
    n_tokens: usize,
    n_heads: usize,
    head_dim: usize,
    pos0: usize,
    tree: Option<&wgpu::Buffer>,
) -> Result<()> {
    dispatch(rec, ctx, rope, v, [n_tokens, n_heads, head_dim, pos0], tree, false)
}

/// Record the gradient through [`rope`] (no tree), in place: every pair rotated back.
#[allow(clippy::too_many_arguments)]
pub fn rope_backward(
    rec: &mut Recorder,
    ctx: &GpuContext,
    rope: &Rope,
    dv: Rows,
    n_tokens: usize,
    n_heads: usize,
    head_dim: usize,
    pos0: usize,
) -> Result<()> {
    dispatch(rec, ctx, rope, dv, [n_tokens, n_heads, head_dim, pos0], None, true)
}

fn dispatch(
    rec: &mut Recorder,
    ctx: &GpuContext,
    rope: &Rope,
    v: Rows,
    [n_tokens, n_heads, head_dim, pos0]: [usize; 4],
    tree: Option<&wgpu::Buffer>,
    inverse: bool,
) -> Result<()> {
    let kernel = ctx.kernel(&super::plain::<Params>("rope", WGSL, "main"))?;
    let p = Params {
        n_tokens: n_tokens as u32,
        n_heads: n_heads as u32,
        head_dim: head_dim as u32,
        rot_dim: rope.rot_dim as u32,
        pos0: pos0 as u32,
        offset: v.offset as u32,
        stride: v.stride as u32,
        mode: (rope.layout == RopeLayout::Neox) as u32,
        log2_base: rope.base.log2(),
        tree: tree.is_some() as u32,
        inverse: inverse as u32,
    };
    let tree = tree.unwrap_or(ctx.placeholder());
    rec.dispatch(
        &kernel,
        &p,
        vec![Binding::whole(v.buf), Binding::whole(tree)],
        [super::groups(n_heads * rope.rot_dim / 2, 64), n_tokens as u32, 1],
    )
}
