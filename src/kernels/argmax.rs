//! Greedy token choice on the GPU — launcher of `shaders/argmax.wgsl`.

use crate::error::Result;
use crate::gpu::{Binding, GpuContext, Recorder};

const WGSL: &str = include_str!("../../shaders/argmax.wgsl");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    offset: u32,
}

/// Record `out[r] = argmax(x[offset + r·n ..][..n])` for `rows` rows.
pub fn argmax(rec: &mut Recorder, ctx: &GpuContext, x: &wgpu::Buffer, offset: usize, n: usize, rows: usize, out: &wgpu::Buffer) -> Result<()> {
    let kernel = ctx.kernel(&super::plain("argmax", WGSL, "main"))?;
    let p = Params { n: n as u32, offset: offset as u32 };
    rec.dispatch(&kernel, &p, vec![Binding::whole(x), Binding::whole(out)], [rows as u32, 1, 1])
}
