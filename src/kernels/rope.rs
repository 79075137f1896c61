//! Rotary position embedding — launcher of `shaders/rope.wgsl`.

use super::places::Places;
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
        table: u32,
        at: u32,
        inverse: u32,
        factors: u32,
        scale: f32,
    }
}

/// The positions of the rows being rotated.
#[derive(Clone, Copy)]
pub enum Positions<'a> {
    /// One sequence's consecutive rows from this position on.
    From(usize),
    /// Each row at its [`RowPlace::pos`](super::places::RowPlace::pos): the rows of several
    /// sequences, or a token tree's (at their depths).
    Table(Places<'a>),
}

/// A rotation as the kernel applies it: its hyperparameters and, where they have frequency
/// factors, those factors on the GPU (`rot_dim / 2` f32).
#[derive(Clone, Copy)]
pub struct RopeOp<'a> {
    /// The hyperparameters.
    pub rope: &'a Rope,
    /// `rope.factors` uploaded (see [`Rope::factors`]).
    pub factors: Option<&'a wgpu::Buffer>,
}

/// Record the rotation of `v`'s rows (one token each, `cols` = heads × `head_dim`) at their
/// positions.
pub fn rope(rec: &mut Recorder, ctx: &GpuContext, op: RopeOp, v: View, head_dim: usize, at: Positions) -> Result<()> {
    dispatch(rec, ctx, op, v, head_dim, at, false)
}

/// Record the gradient through [`rope`], in place: every pair rotated back (and multiplied by
/// the rotation's scale, as the forward pass multiplies it).
pub fn rope_backward(rec: &mut Recorder, ctx: &GpuContext, op: RopeOp, dv: View, head_dim: usize, pos0: usize) -> Result<()> {
    dispatch(rec, ctx, op, dv, head_dim, Positions::From(pos0), true)
}

fn dispatch(rec: &mut Recorder, ctx: &GpuContext, op: RopeOp, v: View, head_dim: usize, at: Positions, inverse: bool) -> Result<()> {
    let rope = op.rope;
    if op.factors.is_some() != rope.factors.is_some() || op.factors.is_some_and(|b| b.size() < (rope.rot_dim / 2 * 4) as u64) {
        return Err(Error::Shape { op: "rope", msg: format!("frequency factors for {} pairs not uploaded as given", rope.rot_dim / 2) });
    }
    if head_dim == 0 || v.cols % head_dim != 0 || rope.rot_dim > head_dim || rope.rot_dim % 2 != 0 {
        return Err(Error::Shape { op: "rope", msg: format!("rows of {} in heads of {head_dim}, rotating {} dims", v.cols, rope.rot_dim) });
    }
    v.check("rope", "v", 1)?;
    let (pos0, table) = match at {
        Positions::From(pos0) => (pos0, None),
        Positions::Table(places) => {
            places.check("rope", v.rows, usize::MAX)?;
            (0, Some(places))
        }
    };
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
        table: table.is_some() as u32,
        at: table.map_or(0, |t| t.at) as u32,
        inverse: inverse as u32,
        factors: op.factors.is_some() as u32,
        scale: rope.scale,
    };
    rec.dispatch(
        &kernel,
        &p,
        vec![
            Binding::whole(v.buf),
            Binding::whole(table.map_or(ctx.placeholder(), |t| t.buf)),
            Binding::whole(op.factors.unwrap_or(ctx.placeholder())),
        ],
        [super::groups(n_heads * rope.rot_dim / 2, 64), v.rows as u32, 1],
    )
}
