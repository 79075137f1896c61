//! Token embedding gather — launcher of `shaders/embed.wgsl`.

use crate::error::{Error, Result};
use crate::gpu::{uniform_block, Binding, GpuContext, Recorder, View, WeightMatrix};

const WGSL: &str = include_str!("../../shaders/embed.wgsl");

uniform_block! {
    /// The uniform block of the shader (its WGSL declaration is generated from this one).
    pub(super) struct Params {
        n_tokens: u32,
        cols: u32,
        row_bytes: u32,
        row_start: u32,
        row_end: u32,
        scale: f32,
    }
}

/// Record `out[t] = scale · table[ids[t]]` for every row of `out` (one id each, already
/// range-checked).
pub fn embed(rec: &mut Recorder, ctx: &GpuContext, table: &WeightMatrix, ids: &wgpu::Buffer, scale: f32, out: View) -> Result<()> {
    if out.cols != table.cols || out.offset != 0 || out.stride != out.cols {
        return Err(Error::Shape { op: "embed", msg: format!("{out} for embeddings of {}: dense rows from float 0 needed", table.cols) });
    }
    out.check("embed", "out", 1)?;
    let kernel = ctx.kernel(&super::weight_reader::<Params>("embed", WGSL, "main", table.format, &[]))?;
    for part in &table.parts {
        let p = Params {
            n_tokens: out.rows as u32,
            cols: table.cols as u32,
            row_bytes: table.row_bytes() as u32,
            row_start: part.row0 as u32,
            row_end: (part.row0 + part.rows) as u32,
            scale,
        };
        let bindings = vec![Binding::whole(ids), part.binding(), Binding::whole(out.buf)];
        rec.dispatch(&kernel, &p, bindings, [super::groups(table.cols / 32, 64), out.rows as u32, 1])?;
    }
    Ok(())
}
