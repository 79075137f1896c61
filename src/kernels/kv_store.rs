//! Appending keys and values to the f16 KV cache — launcher of `shaders/kv_store.wgsl`.

use super::norm::Rows;
use crate::error::{Error, Result};
use crate::gpu::{uniform_block, Binding, GpuContext, Recorder};

const WGSL: &str = include_str!("../../shaders/kv_store.wgsl");

uniform_block! {
    /// The uniform block of the shader (its WGSL declaration is generated from this one).
    pub(super) struct Params {
        n_words: u32,
        row_words: u32,
        k_offset: u32,
        k_stride: u32,
        v_offset: u32,
        v_stride: u32,
        dst: u32,}
}

/// Record the conversion of `n_tokens` rows of `row_len` f32 keys and values (`k` and `v`: their
/// own buffers or regions of one) to f16 rows `pos0..` of a layer's caches.
#[allow(clippy::too_many_arguments)]
pub fn kv_store(
    rec: &mut Recorder,
    ctx: &GpuContext,
    k: Rows,
    v: Rows,
    k_cache: &wgpu::Buffer,
    v_cache: &wgpu::Buffer,
    pos0: usize,
    n_tokens: usize,
    row_len: usize,
) -> Result<()> {
    if row_len % 2 != 0 || [k.offset, k.stride, v.offset, v.stride].iter().any(|o| o % 2 != 0) {
        return Err(Error::Shape {
            op: "kv_store",
            msg: format!(
                "rows of {row_len} values from floats {}, {} (strides {}, {}): f16 pairs need even lengths and offsets",
                k.offset, v.offset, k.stride, v.stride
            ),
        });
    }
    let kernel = ctx.kernel(&super::plain::<Params>("kv_store", WGSL, "main"))?;
    let row_words = row_len / 2;
    let n_words = n_tokens * row_words;
    let p = Params {
        n_words: n_words as u32,
        row_words: row_words as u32,
        k_offset: k.offset as u32,
        k_stride: k.stride as u32,
        v_offset: v.offset as u32,
        v_stride: v.stride as u32,
        dst: (pos0 * row_words) as u32,
    };
    rec.dispatch(
        &kernel,
        &p,
        vec![Binding::whole(k.buf), Binding::whole(v.buf), Binding::whole(k_cache), Binding::whole(v_cache)],
        super::flat_grid(n_words),
    )
}
