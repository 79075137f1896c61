//! Appending keys and values to the f16 KV cache — launcher of `shaders/kv_store.wgsl`.

use crate::error::{Error, Result};
use crate::gpu::{Binding, GpuContext, Recorder};

const WGSL: &str = include_str!("../../shaders/kv_store.wgsl");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n_words: u32,
    src: u32,
    dst: u32,
}

/// Record the conversion of `n_tokens` rows of `row_len` f32 keys and values (rows `row0..` of
/// `k` and `v`) to f16 rows `pos0..` of a layer's caches.
#[allow(clippy::too_many_arguments)]
pub fn kv_store(rec: &mut Recorder, ctx: &GpuContext, k: &wgpu::Buffer, v: &wgpu::Buffer, row0: usize, k_cache: &wgpu::Buffer, v_cache: &wgpu::Buffer, pos0: usize, n_tokens: usize, row_len: usize) -> Result<()> {
    if row_len % 2 != 0 {
        return Err(Error::Shape { op: "kv_store", msg: format!("rows of {row_len} values: f16 pairs need an even length") });
    }
    let kernel = ctx.kernel(&super::plain("kv_store", WGSL, "main"))?;
    let row_words = row_len / 2;
    let n_words = n_tokens * row_words;
    let p = Params { n_words: n_words as u32, src: (row0 * row_len) as u32, dst: (pos0 * row_words) as u32 };
    rec.dispatch(&kernel, &p, vec![Binding::whole(k), Binding::whole(v), Binding::whole(k_cache), Binding::whole(v_cache)], super::flat_grid(n_words))
}
