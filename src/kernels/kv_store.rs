//! Appending keys and values to the f16 KV cache — launcher of `shaders/kv_store.wgsl`.

use super::attention::KvBuffers;
use super::places::Places;
use crate::error::{Error, Result};
use crate::gpu::{uniform_block, Binding, GpuContext, Recorder, View};

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
        at: u32,
    }
}

/// Record the conversion of `k`'s and `v`'s rows (one token each; their own buffers or regions
/// of one) to f16 rows of a layer's caches, each at its place: the `i`-th new row of a sequence
/// at cache row `base + pos0 + i` (rows of several sequences in one dispatch).
pub fn kv_store(rec: &mut Recorder, ctx: &GpuContext, k: View, v: View, cache: KvBuffers, places: Places) -> Result<()> {
    k.same_shape("kv_store", &v)?;
    k.check("kv_store", "k", 2)?;
    v.check("kv_store", "v", 2)?;
    if k.cols % 2 != 0 {
        return Err(Error::Shape { op: "kv_store", msg: format!("rows of {} values: f16 pairs need even lengths", k.cols) });
    }
    let row_words = k.cols / 2;
    places.check("kv_store", k.rows, (cache.k.size().min(cache.v.size()) / (row_words * 4) as u64) as usize)?;
    let kernel = ctx.kernel(&super::plain::<Params>("kv_store", WGSL, "main"))?;
    let n_words = k.rows * row_words;
    let p = Params {
        n_words: n_words as u32,
        row_words: row_words as u32,
        k_offset: k.offset as u32,
        k_stride: k.stride as u32,
        v_offset: v.offset as u32,
        v_stride: v.stride as u32,
        at: places.at as u32,
    };
    rec.dispatch(
        &kernel,
        &p,
        vec![Binding::whole(k.buf), Binding::whole(v.buf), Binding::whole(cache.k), Binding::whole(cache.v), Binding::whole(places.buf)],
        super::flat_grid(n_words),
    )
}
