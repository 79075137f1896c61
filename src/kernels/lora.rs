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
        slots: [[u32; 4]; MAX_SLOTS],}
}

fn lora_params(l: &LoraIo, io: &MatmulIo, k: usize, n: usize) -> Result<Params> {
    if k % 4 != 0 || io.x_offset % 4 != 0 || io.x_stride % 4 != 0 {
        return Err(Error::Shape {
            op: "lora",
            msg: format!("k {k}, x offset {}, stride {} must be multiples of 4", io.x_offset, io.x_stride),
        });
    }
    Ok(Params {
        m: io.m as u32,
        k: k as u32,
        n: n as u32,
        x_offset: (io.x_offset / 4) as u32,
        x_stride: (io.x_stride / 4) as u32,
        y_offset: io.y_offset as u32,
        y_stride: io.y_stride as u32,
        max_rank: l.max_rank as u32,
        n_slots: l.slots.len() as u32,
        norm: io.norm.is_some() as u32,
        eps: io.norm.map_or(0.0, |n| n.eps),
        slots: l.packed_slots()?,
    })
}

/// Record `u[t] = A_{slot(t)} · x[t]` for the rows of `io` (the shrink half of multi-LoRA) for a
/// projection with `k` inputs. Run it before [`matmul`] with the same `io.lora`, which fuses the
/// expand.
pub fn lora_shrink(rec: &mut Recorder, ctx: &GpuContext, k: usize, io: &MatmulIo) -> Result<()> {
    let Some(l) = &io.lora else { return Ok(()) };
    let kernel = ctx.kernel(&super::plain::<Params>("lora", WGSL, "shrink"))?;
    let p = lora_params(l, io, k, 0)?;
    let nw = io.norm.map_or(ctx.placeholder(), |n| n.w);
    let bindings =
        vec![Binding::whole(io.x), Binding::whole(l.a_pack), Binding::whole(l.row_slot), Binding::whole(l.u), Binding::whole(nw).at(7)];
    rec.dispatch(&kernel, &p, bindings, [super::groups(l.max_rank, 8), super::groups(io.m, 8), 1])
}

/// Record `y[t] += s · B_{slot(t)} · u[t]` for the `n` outputs of the rows of `io` as a dispatch
/// of its own — the unfused expand, kept to measure the fusion in [`matmul`] against.
pub fn lora_expand(rec: &mut Recorder, ctx: &GpuContext, k: usize, n: usize, io: &MatmulIo) -> Result<()> {
    let Some(l) = &io.lora else { return Ok(()) };
    if l.u_splits.is_some() {
        return Err(Error::Shape { op: "lora_expand", msg: "stacked projections (u_splits) are expanded inside the product only".into() });
    }
    let kernel = ctx.kernel(&super::plain::<Params>("lora", WGSL, "expand"))?;
    let p = lora_params(l, io, k, n)?;
    let bindings =
        vec![Binding::whole(l.row_slot).at(3), Binding::whole(l.u).at(4), Binding::whole(l.b_pack).at(5), Binding::whole(io.y).at(6)];
    rec.dispatch(&kernel, &p, bindings, [super::groups(n, 64), io.m as u32, 1])
}
