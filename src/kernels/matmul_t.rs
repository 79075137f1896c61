//! The transposed quantized product (the gradient through a frozen projection) — launcher of
//! `shaders/quant_matmul_t.wgsl`.

use crate::error::{Error, Result};
use crate::gpu::{uniform_block, Binding, GpuContext, Recorder, View, WeightMatrix};

const WGSL: &str = include_str!("../../shaders/quant_matmul_t.wgsl");
/// Invocations per workgroup and batch rows per invocation (each decoded block serves COLS rows).
const WG: usize = 16;
const COLS: usize = 4;

uniform_block! {
    /// The uniform block of the shader (its WGSL declaration is generated from this one).
    pub(super) struct Params {
        n: u32,
        k: u32,
        m: u32,
        row_bytes: u32,
        dy_offset: u32,
        dy_stride: u32,
        dx_offset: u32,
        dx_stride: u32,
        n_offset: u32,
        accumulate: u32,
    }
}

/// Record `dx (+)= dy·W` (`dy` rows of `w.rows`, `dx` rows of `w.cols`): the gradient with
/// respect to `x` of `y = W·x`. Every part of a split matrix adds its rows' share.
pub fn matmul_t(rec: &mut Recorder, ctx: &GpuContext, w: &WeightMatrix, dy: View, dx: View, accumulate: bool) -> Result<()> {
    if dy.cols != w.rows || dx.cols != w.cols || dy.rows != dx.rows {
        return Err(Error::Shape { op: "matmul_t", msg: format!("dy {dy} and dx {dx} through a {}×{} matrix", w.rows, w.cols) });
    }
    dy.check("matmul_t", "dy", 1)?;
    dx.check("matmul_t", "dx", 1)?;
    let m = dy.rows;
    let invocations = w.cols / 32 * m.div_ceil(COLS);
    if invocations.div_ceil(WG) > 65535 {
        return Err(Error::Shape {
            op: "matmul_t",
            msg: format!("dy {dy} through a {}×{} matrix: more rows than one dispatch takes", w.rows, w.cols),
        });
    }
    let kernel =
        ctx.kernel(&super::weight_reader::<Params>("quant_matmul_t", WGSL, "main", w.format, &[("WG", WG as u32), ("COLS", COLS as u32)]))?;
    for (i, part) in w.parts.iter().enumerate() {
        let p = Params {
            n: part.rows as u32,
            k: w.cols as u32,
            m: m as u32,
            row_bytes: w.row_bytes() as u32,
            dy_offset: dy.offset as u32,
            dy_stride: dy.stride as u32,
            dx_offset: dx.offset as u32,
            dx_stride: dx.stride as u32,
            n_offset: part.row0 as u32,
            accumulate: (accumulate || i > 0) as u32,
        };
        rec.dispatch(
            &kernel,
            &p,
            vec![part.binding(), Binding::whole(dy.buf), Binding::whole(dx.buf)],
            [super::groups(invocations, WG), 1, 1],
        )?;
    }
    Ok(())
}
