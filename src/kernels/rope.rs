//! Rotary position embedding — launcher of `shaders/rope.wgsl`.

use crate::error::{Error, Result};
use crate::gpu::{uniform_block, Binding, GpuContext, Recorder, View};
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
        inverse: u32,
    }
}

/// Record the rotation of `v`'s rows (one token each, `cols` = heads × `head_dim`) at positions
/// `pos0..`, or, with a token tree (per row: parent, depth — see
/// [`crate::model::Sequence::tree`]), at `pos0 + depth`.
pub fn rope(
    rec: &mut Recorder,
    ctx: &GpuContext,
    rope: &Rope,
    v: View,
    head_dim: usize,
    pos0: usize,
    tree: Option<&wgpu::Buffer>,
) -> Result<()> {
    dispatch(rec, ctx, rope, v, head_dim, pos0, tree, false)
}

/// Record the gradient through [`rope`] (no tree), in place: every pair rotated back.
pub fn rope_backward(rec: &mut Recorder, ctx: &GpuContext, rope: &Rope, dv: View, head_dim: usize, pos0: usize) -> Result<()> {
    dispatch(rec, ctx, rope, dv, head_dim, pos0, None, true)
}

#[allow(clippy::too_many_arguments)] // private: the two entry points above fix `inverse`
fn dispatch(
    rec: &mut Recorder,
    ctx: &GpuContext,
    rope: &Rope,
    v: View,
    head_dim: usize,
    pos0: usize,
    tree: Option<&wgpu::Buffer>,
    inverse: bool,
) -> Result<()> {
    if head_dim == 0 || v.cols % head_dim != 0 || rope.rot_dim > head_dim || rope.rot_dim % 2 != 0 {
        return Err(Error::Shape { op: "rope", msg: format!("rows of {} in heads of {head_dim}, rotating {} dims", v.cols, rope.rot_dim) });
    }
    v.check("rope", "v", 1)?;
    let n_heads = v.cols / head_dim;
    let kernel = ctx.kernel(&super::plain::<Params>("rope", WGSL, "main"))?;
    let p = Params {
        n_tokens: v.rows as u32,
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
        [super::groups(n_heads * rope.rot_dim / 2, 64), v.rows as u32, 1],
    )
}
