//! Activation rows to 8 bits with a scale per 32 values, for the integer-dot products —
//! launcher of `shaders/quantize_q8.wgsl`.

use crate::error::{Error, Result};
use crate::gpu::{uniform_block, Binding, GpuContext, Recorder, View};

const WGSL: &str = include_str!("../../shaders/quantize_q8.wgsl");

uniform_block! {
    /// The uniform block of the shader (its WGSL declaration is generated from this one).
    pub(super) struct Params {
        k: u32,
        m: u32,
        x_offset: u32,
        x_stride: u32,
        norm: u32,
    }
}

/// Activation rows quantized to 8 bits: per 32 values eight words of packed i8 in `qs` and
/// `(scale, scale·Σ first 16, scale·Σ last 16, Σ x²)` in `meta` (see the shader's header), row by
/// row from the start of both buffers.
#[derive(Clone, Copy)]
pub struct Q8Rows<'a> {
    /// Packed 8-bit values: `rows × cols / 4` u32.
    pub qs: &'a wgpu::Buffer,
    /// Per 32 values four f32: `rows × cols / 32` vec4.
    pub meta: &'a wgpu::Buffer,
}

impl Q8Rows<'_> {
    /// Bytes of `qs` and of `meta` for `rows` rows of `cols` values.
    pub fn bytes(rows: usize, cols: usize) -> (u64, u64) {
        ((rows * cols) as u64, (rows * cols / 32 * 16) as u64)
    }

    /// Refuse buffers too small for `rows` rows of `cols` values.
    pub(super) fn check(&self, op: &'static str, rows: usize, cols: usize) -> Result<()> {
        let (qs, meta) = Self::bytes(rows, cols);
        if cols % 32 != 0 || self.qs.size() < qs || self.meta.size() < meta {
            return Err(Error::Shape { op, msg: format!("8-bit rows of {cols} values (a multiple of 32) × {rows}: buffers too small") });
        }
        Ok(())
    }
}

/// Record the quantization of `x`'s rows into `out`, multiplied by the RMSNorm weights `nw`
/// (K f32) first when given (the norm's 1/rms is left to the product, from the sums of squares).
pub fn quantize_q8(rec: &mut Recorder, ctx: &GpuContext, x: View, nw: Option<&wgpu::Buffer>, out: Q8Rows) -> Result<()> {
    x.check("quantize_q8", "x", 4)?;
    out.check("quantize_q8", x.rows, x.cols)?;
    if x.rows > 65535 || nw.is_some_and(|w| w.size() < (x.cols * 4) as u64) {
        return Err(Error::Shape {
            op: "quantize_q8",
            msg: format!("{} rows (≤ 65535) of {} values, norm weights to match", x.rows, x.cols),
        });
    }
    let kernel = ctx.kernel(&super::plain::<Params>("quantize_q8", WGSL, "main"))?;
    let p = Params {
        k: x.cols as u32,
        m: x.rows as u32,
        x_offset: (x.offset / 4) as u32,
        x_stride: (x.stride / 4) as u32,
        norm: nw.is_some() as u32,
    };
    rec.dispatch(
        &kernel,
        &p,
        vec![Binding::whole(x.buf), Binding::whole(nw.unwrap_or(ctx.placeholder())), Binding::whole(out.qs), Binding::whole(out.meta)],
        [super::groups(x.cols / 32, 64), x.rows as u32, 1],
    )
}
