//! Queries and keys rotated by RoPE, keys and values appended to the f16 KV cache, in one
//! dispatch — launcher of `shaders/kv_store.wgsl`.

use super::attention::KvBuffers;
use super::places::Places;
use super::rope::RopeOp;
use crate::error::{Error, Result};
use crate::gpu::{uniform_block, Binding, GpuContext, Recorder, View};

const WGSL: &str = include_str!("../../shaders/kv_store.wgsl");

uniform_block! {
    /// The uniform block of the shader (its WGSL declaration is generated from this one).
    pub(super) struct Params {
        n_tokens: u32,
        q_pairs: u32,
        kv_words: u32,
        head_dim: u32,
        rot_dim: u32,
        mode: u32,
        log2_base: f32,
        factors: u32,
        scale: f32,
        q_offset: u32,
        q_stride: u32,
        k_offset: u32,
        k_stride: u32,
        v_offset: u32,
        v_stride: u32,
        at: u32,
    }
}

/// A step's rows of queries, keys and values: views of one buffer (interleaved or in regions),
/// one token per row, heads of `head_dim` side by side.
#[derive(Clone, Copy)]
pub struct Qkv<'a> {
    /// Queries (rotated in place).
    pub q: View<'a>,
    /// Keys (left as they are; stored rotated).
    pub k: View<'a>,
    /// Values.
    pub v: View<'a>,
    /// Floats per head.
    pub head_dim: usize,
}

/// Record the rotation of `qkv`'s queries in place by `rope` and the store of its keys (rotated)
/// and values as f16 rows of a layer's caches, each at its place: the `i`-th new row of a
/// sequence at cache row `base + pos0 + i`, rotated at its place's position (rows of several
/// sequences, or a token tree's at their depths, in one dispatch).
pub fn rope_kv_store(rec: &mut Recorder, ctx: &GpuContext, rope: RopeOp, qkv: Qkv, cache: KvBuffers, places: Places) -> Result<()> {
    let Qkv { q, k, v, head_dim } = qkv;
    const OP: &str = "rope_kv_store";
    if q.buf != k.buf || k.buf != v.buf {
        return Err(Error::Shape { op: OP, msg: "queries, keys and values must be rows of one buffer".into() });
    }
    k.same_shape(OP, &v)?;
    rope.check(OP, q.cols, head_dim)?;
    rope.check(OP, k.cols, head_dim)?;
    if q.rows != k.rows || head_dim % 2 != 0 || q.rows > 65535 {
        return Err(Error::Shape {
            op: OP,
            msg: format!("{} query and {} key rows (≤ 65535) in heads of {head_dim} (even)", q.rows, k.rows),
        });
    }
    q.check(OP, "q", 1)?;
    k.check(OP, "k", 2)?;
    v.check(OP, "v", 2)?;
    let kv_words = k.cols / 2;
    places.check(OP, k.rows, (cache.k.size().min(cache.v.size()) / (kv_words * 4) as u64) as usize)?;
    let r = rope.rope;
    let q_pairs = q.cols / head_dim * r.rot_dim / 2;
    let kernel = ctx.kernel(&super::rotary::<Params>("kv_store", WGSL))?;
    let p = Params {
        n_tokens: k.rows as u32,
        q_pairs: q_pairs as u32,
        kv_words: kv_words as u32,
        head_dim: head_dim as u32,
        rot_dim: r.rot_dim as u32,
        mode: rope.mode(),
        log2_base: r.base.log2(),
        factors: rope.factors.is_some() as u32,
        scale: r.scale,
        q_offset: q.offset as u32,
        q_stride: q.stride as u32,
        k_offset: k.offset as u32,
        k_stride: k.stride as u32,
        v_offset: v.offset as u32,
        v_stride: v.stride as u32,
        at: places.at as u32,
    };
    rec.dispatch(
        &kernel,
        &p,
        vec![
            Binding::whole(q.buf),
            Binding::whole(cache.k),
            Binding::whole(cache.v),
            Binding::whole(places.buf),
            Binding::whole(rope.factors.unwrap_or(ctx.placeholder())),
        ],
        [super::groups(q_pairs + 2 * kv_words, 64), k.rows as u32, 1],
    )
}
