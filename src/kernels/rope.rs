//! The gradient through rotary position embedding — launcher of `shaders/rope.wgsl` (the
//! rotation itself is applied as queries and keys are stored: [`super::kv_store`]).

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
        factors: u32,
        scale: f32,
    }
}

/// A rotation as the kernels apply it: its hyperparameters and, where they have frequency
/// factors, those factors on the GPU (`rot_dim / 2` f32).
#[derive(Clone, Copy)]
pub struct RopeOp<'a> {
    /// The hyperparameters.
    pub rope: &'a Rope,
    /// `rope.factors` uploaded (see [`Rope::factors`]).
    pub factors: Option<&'a wgpu::Buffer>,
}

impl RopeOp<'_> {
    /// Refuse factors not uploaded as the hyperparameters give them, and rotations that do not
    /// fit heads of `head_dim` in rows of `cols`.
    pub(super) fn check(&self, op: &'static str, cols: usize, head_dim: usize) -> Result<()> {
        let rope = self.rope;
        if self.factors.is_some() != rope.factors.is_some() || self.factors.is_some_and(|b| b.size() < (rope.rot_dim / 2 * 4) as u64) {
            return Err(Error::Shape { op, msg: format!("frequency factors for {} pairs not uploaded as given", rope.rot_dim / 2) });
        }
        if head_dim == 0 || cols % head_dim != 0 || rope.rot_dim > head_dim || rope.rot_dim % 2 != 0 {
            return Err(Error::Shape { op, msg: format!("rows of {cols} in heads of {head_dim}, rotating {} dims", rope.rot_dim) });
        }
        Ok(())
    }

    /// The pair layout as the shaders number it (`rotary_pair`).
    pub(super) fn mode(&self) -> u32 {
        (self.rope.layout == RopeLayout::Neox) as u32
    }
}

/// Record the gradient through the rotation of `dv`'s rows (one token each, `cols` = heads ×
/// `head_dim`, consecutive positions from `pos0`), in place: every pair rotated back and
/// multiplied by the rotation's scale, as the forward pass multiplies it.
pub fn rope_backward(rec: &mut Recorder, ctx: &GpuContext, op: RopeOp, dv: View, head_dim: usize, pos0: usize) -> Result<()> {
    op.check("rope_backward", dv.cols, head_dim)?;
    dv.check("rope_backward", "dv", 1)?;
    let rope = op.rope;
    if rope.rot_dim == 0 {
        return Ok(());
    }
    let n_heads = dv.cols / head_dim;
    let kernel = ctx.kernel(&super::rotary::<Params>("rope", WGSL))?;
    let p = Params {
        n_tokens: dv.rows as u32,
        n_heads: n_heads as u32,
        head_dim: head_dim as u32,
        rot_dim: rope.rot_dim as u32,
        pos0: pos0 as u32,
        offset: dv.offset as u32,
        stride: dv.stride as u32,
        mode: op.mode(),
        log2_base: rope.base.log2(),
        factors: op.factors.is_some() as u32,
        scale: rope.scale,
    };
    rec.dispatch(
        &kernel,
        &p,
        vec![Binding::whole(dv.buf), Binding::whole(op.factors.unwrap_or(ctx.placeholder()))],
        [super::groups(n_heads * rope.rot_dim / 2, 64), dv.rows as u32, 1],
    )
}
