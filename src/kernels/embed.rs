//! Token embedding gather — launcher of `shaders/embed.wgsl`.

use crate::error::Result;
use crate::gpu::{uniform_block, Binding, GpuContext, Recorder, WeightMatrix};

const WGSL: &str = include_str!("../../shaders/embed.wgsl");

uniform_block! {
    /// The uniform block of the shader (its WGSL declaration is generated from this one).
    pub(super) struct Params {
        n_tokens: u32,
        cols: u32,
        row_bytes: u32,
        row_start: u32,
        row_end: u32,
        scale: f32,}
}

/// Record `out[t] = scale · table[ids[t]]` for `n_tokens` ids (already range-checked).
pub fn embed(
    rec: &mut Recorder,
    ctx: &GpuContext,
    table: &WeightMatrix,
    ids: &wgpu::Buffer,
    n_tokens: usize,
    scale: f32,
    out: &wgpu::Buffer,
) -> Result<()> {
    let kernel = ctx.kernel(&super::weight_reader::<Params>("embed", WGSL, "main", table.format, &[]))?;
    for part in &table.parts {
        let p = Params {
            n_tokens: n_tokens as u32,
            cols: table.cols as u32,
            row_bytes: table.format.row_bytes(table.cols) as u32,
            row_start: part.row0 as u32,
            row_end: (part.row0 + part.rows) as u32,
            scale,
        };
        let bindings = vec![Binding::whole(ids), part.binding(), Binding::whole(out)];
        rec.dispatch(&kernel, &p, bindings, [super::groups(table.cols / 32, 64), n_tokens as u32, 1])?;
    }
    Ok(())
}
