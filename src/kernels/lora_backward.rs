//! Gradients of a trained LoRA adapter — launcher of `shaders/lora_backward.wgsl`.

use crate::error::{Error, Result};
use crate::gpu::{uniform_block, Binding, GpuContext, Recorder, View};

const WGSL: &str = include_str!("../../shaders/lora_backward.wgsl");

uniform_block! {
    /// The uniform block of the shader (its WGSL declaration is generated from this one).
    pub(super) struct Params {
        m: u32,
        k: u32,
        n: u32,
        r: u32,
        scale: f32,
        x_offset: u32,
        x_stride: u32,
        dy_offset: u32,
        dy_stride: u32,
        w_offset: u32,
        g_offset: u32,
        accumulate: u32,
    }
}

/// Everything one projection's adapter backward reads and writes (`y = W·x + s·B·A·x` over
/// `x.rows` rows, `W` `n × k`, rank `r`: the shapes come from the views).
pub struct LoraBackward<'a> {
    /// The projection's input rows (`m × k`).
    pub x: View<'a>,
    /// The output's gradient rows (`m × n`).
    pub dy: View<'a>,
    /// The input's gradient rows (laid out like `x`); the adapter's share is added.
    pub dx: View<'a>,
    /// `A` (`r × k`, dense) in its pack.
    pub a: View<'a>,
    /// `B` (`n × r`, dense) in its pack.
    pub b: View<'a>,
    /// `u = A·x` from the forward (`m × r`, dense from float 0).
    pub u: &'a wgpu::Buffer,
    /// Scratch for `s·Bᵀ·dy` (`m × r`).
    pub du: &'a wgpu::Buffer,
    /// Where `dA` goes (shaped like `a`).
    pub da: View<'a>,
    /// Where `dB` goes (shaped like `b`).
    pub db: View<'a>,
    /// The adapter's scale `s`.
    pub scale: f32,
    /// Add into `dA`/`dB` (gradient accumulation) instead of overwriting them.
    pub accumulate: bool,
}

impl LoraBackward<'_> {
    fn check(&self) -> Result<(usize, usize, usize, usize)> {
        let (m, k, n, r) = (self.x.rows, self.x.cols, self.dy.cols, self.a.rows);
        let shapes_agree = self.dy.rows == m
            && (self.dx.rows, self.dx.cols) == (m, k)
            && (self.dx.offset, self.dx.stride) == (self.x.offset, self.x.stride)
            && (self.a.cols, self.b.rows, self.b.cols) == (k, n, r)
            && (self.da.rows, self.da.cols, self.db.rows, self.db.cols) == (r, k, n, r);
        let dense = [&self.a, &self.b, &self.da, &self.db].iter().all(|v| v.stride == v.cols);
        if !shapes_agree || !dense {
            return Err(Error::Shape {
                op: "lora_backward",
                msg: format!(
                    "x {}, dy {}, dx {}, A {}, B {}, dA {}, dB {}: shapes disagree (dx must be laid out like x; A, B dense)",
                    self.x, self.dy, self.dx, self.a, self.b, self.da, self.db
                ),
            });
        }
        // The kernels read the model's dimensions four floats at a time.
        let by_4 = [k, n, self.x.offset, self.x.stride, self.dy.offset, self.dy.stride, self.a.offset];
        if by_4.iter().any(|v| v % 4 != 0) {
            return Err(Error::Shape {
                op: "lora_backward",
                msg: format!(
                    "x {}, dy {}, A {}: the widths, offsets and strides of x, dy and A must be multiples of 4",
                    self.x, self.dy, self.a
                ),
            });
        }
        for (v, name) in
            [(&self.x, "x"), (&self.dy, "dy"), (&self.dx, "dx"), (&self.a, "A"), (&self.b, "B"), (&self.da, "dA"), (&self.db, "dB")]
        {
            v.check("lora_backward", name, 1)?;
        }
        Ok((m, k, n, r))
    }
}

/// Record the adapter's backward on one projection: `dB`, `du`, `dA`, then `dx += Aᵀ·du`.
pub fn lora_backward(rec: &mut Recorder, ctx: &GpuContext, io: &LoraBackward) -> Result<()> {
    let (m, k, n, r) = io.check()?;
    let params = |w_offset: usize, g_offset: usize| Params {
        m: m as u32,
        k: k as u32,
        n: n as u32,
        r: r as u32,
        scale: io.scale,
        x_offset: io.x.offset as u32,
        x_stride: io.x.stride as u32,
        dy_offset: io.dy.offset as u32,
        dy_stride: io.dy.stride as u32,
        w_offset: w_offset as u32,
        g_offset: g_offset as u32,
        accumulate: io.accumulate as u32,
    };
    let mut run =
        |entry: &'static str, p: Params, lhs: &wgpu::Buffer, rhs: &wgpu::Buffer, out: &wgpu::Buffer, total: usize| -> Result<()> {
            let kernel = ctx.kernel(&super::plain::<Params>(&format!("lora_backward_{entry}"), WGSL, entry))?;
            rec.dispatch(&kernel, &p, vec![Binding::whole(lhs), Binding::whole(rhs), Binding::whole(out)], [super::groups(total, 64), 1, 1])
        };
    run("grad_b", params(0, io.db.offset), io.dy.buf, io.u, io.db.buf, n / 4 * r)?;
    run("down", params(io.b.offset, 0), io.dy.buf, io.b.buf, io.du, m * r)?;
    run("grad_a", params(0, io.da.offset), io.du, io.x.buf, io.da.buf, r * k / 4)?;
    // dx is laid out like x: the x offset/stride address it.
    run("back_x", params(io.a.offset, 0), io.du, io.a.buf, io.dx.buf, m * k / 4)
}
