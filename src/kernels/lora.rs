//! The two halves of multi-LoRA outside the product kernel — launchers of `shaders/lora.wgsl`:
//! the shrink `u = A·x` that precedes the expand fused into [`super::matmul::matmul`], and the
//! unfused expand it is measured against.

use super::matmul::{LoraIo, MatmulIo, MAX_SLOTS};
use crate::error::{Error, Result};
use crate::gpu::{uniform_block, Binding, GpuContext, Recorder};

const WGSL: &str = include_str!("../../shaders/lora.wgsl");

uniform_block! {
    /// The uniform block of the shader (its WGSL declaration is generated from this one).
    pub(super) struct Params {
        m: u32,
        k: u32,
        n: u32,
        x_offset: u32,
        x_stride: u32,
        y_offset: u32,
        y_stride: u32,
        max_rank: u32,
        n_slots: u32,
        norm: u32,
        eps: f32,
        slots: [[u32; 4]; MAX_SLOTS],
    }
}

fn lora_params(l: &LoraIo, io: &MatmulIo) -> Result<Params> {
    io.x.check("lora", "x", 4)?;
    io.y.check("lora", "y", 1)?;
    if io.x.cols % 4 != 0 || io.x.rows != io.y.rows {
        return Err(Error::Shape { op: "lora", msg: format!("x {} (columns a multiple of 4) and y {}", io.x, io.y) });
    }
    Ok(Params {
        m: io.x.rows as u32,
        k: io.x.cols as u32,
        n: io.y.cols as u32,
        x_offset: (io.x.offset / 4) as u32,
        x_stride: (io.x.stride / 4) as u32,
        y_offset: io.y.offset as u32,
        y_stride: io.y.stride as u32,
        max_rank: l.max_rank as u32,
        n_slots: l.slots.len() as u32,
        norm: io.norm.is_some() as u32,
        eps: io.norm.map_or(0.0, |n| n.eps),
        slots: l.packed_slots()?,
    })
}

/// Record `u[t] = A_{slot(t)} · x[t]` for the rows of `io.x` (the shrink half of multi-LoRA).
/// Run it before [`matmul`](super::matmul::matmul) with the same `io.lora`, which fuses the
/// expand.
pub fn lora_shrink(rec: &mut Recorder, ctx: &GpuContext, io: &MatmulIo) -> Result<()> {
    let Some(l) = &io.lora else { return Ok(()) };
    let kernel = ctx.kernel(&super::plain::<Params>("lora", WGSL, "shrink"))?;
    let p = lora_params(l, io)?;
    let nw = io.norm.map_or(ctx.placeholder(), |n| n.w);
    let bindings =
        vec![Binding::whole(io.x.buf), Binding::whole(l.a_pack), Binding::whole(l.row_slot), Binding::whole(l.u), Binding::whole(nw).at(7)];
    rec.dispatch(&kernel, &p, bindings, [super::groups(l.max_rank, 8), super::groups(io.x.rows, 8), 1])
}

/// Record `y[t] += s · B_{slot(t)} · u[t]` for the rows of `io.y` as a dispatch of its own — the
/// unfused expand, kept to measure the fusion in [`matmul`](super::matmul::matmul) against.
pub fn lora_expand(rec: &mut Recorder, ctx: &GpuContext, io: &MatmulIo) -> Result<()> {
    let Some(l) = &io.lora else { return Ok(()) };
    if l.u_splits.is_some() {
        return Err(Error::Shape { op: "lora_expand", msg: "stacked projections (u_splits) are expanded inside the product only".into() });
    }
    let kernel = ctx.kernel(&super::plain::<Params>("lora", WGSL, "expand"))?;
    let p = lora_params(l, io)?;
    let bindings =
        vec![Binding::whole(l.row_slot).at(3), Binding::whole(l.u).at(4), Binding::whole(l.b_pack).at(5), Binding::whole(io.y.buf).at(6)];
    rec.dispatch(&kernel, &p, bindings, [super::groups(io.y.cols, 64), io.y.rows as u32, 1])
}
