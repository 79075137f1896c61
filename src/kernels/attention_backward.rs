//! Gradients of causal attention for a training step — launcher of
//! `shaders/attention_backward.wgsl`.

use super::attention::{AttentionShape, CachedLayer};
use crate::error::{Error, Result};
use crate::gpu::{uniform_block, Binding, GpuContext, Recorder, View};

const WGSL: &str = include_str!("../../shaders/attention_backward.wgsl");

uniform_block! {
    /// The uniform block of the shader (its WGSL declaration is generated from this one).
    pub(super) struct Params {
        n_tokens: u32,
        row0: u32,
        n_heads: u32,
        n_kv_heads: u32,
        head_dim: u32,
        pos0: u32,
        base_words: u32,
        window: u32,
        scale: f32,
    }
}

/// Where the gradients go: `dq` (`n_tokens` rows of `n_heads·head_dim`), `dk`, `dv` (`n_tokens`
/// rows of `n_kv_heads·head_dim`: the step's own keys), and scratch for the softmax statistics
/// (3 floats per row and head).
pub struct AttentionGrads<'a> {
    /// Query gradient.
    pub dq: &'a wgpu::Buffer,
    /// Key gradient (the step's own keys).
    pub dk: &'a wgpu::Buffer,
    /// Value gradient (the step's own values).
    pub dv: &'a wgpu::Buffer,
    /// Softmax statistics scratch.
    pub stats: &'a wgpu::Buffer,
}

/// Record the gradients of attention for `q`'s rows (dense rows of every head, at positions
/// `cache.len..`) with output gradient `dout` (laid out like `q`) over the layer's cache, whose
/// positions `0..cache.len + q.rows` hold the prefix and the step's own keys and values. `q` may
/// start at a later row of its buffer (one sequence of a pass holding several): the gradients
/// and statistics go to the same rows of theirs.
pub fn attention_backward(
    rec: &mut Recorder,
    ctx: &GpuContext,
    s: &AttentionShape,
    q: View,
    cache: CachedLayer,
    dout: View,
    g: AttentionGrads,
) -> Result<()> {
    s.check("attention_backward")?;
    q.same_shape("attention_backward", &dout)?;
    for (v, name) in [(&q, "q"), (&dout, "dout")] {
        v.check("attention_backward", name, 4)?;
        if v.offset % v.stride.max(1) != 0 || v.stride != s.n_heads * s.head_dim || v.cols != v.stride {
            return Err(Error::Shape {
                op: "attention_backward",
                msg: format!("{name}: {v} must be dense rows of every head from a row's start"),
            });
        }
    }
    if q.offset != dout.offset {
        return Err(Error::Shape { op: "attention_backward", msg: format!("q {q} and dout {dout} start at different rows") });
    }
    let (n_tokens, row0) = (q.rows, q.offset / q.stride.max(1));
    let kv_dim = s.n_kv_heads * s.head_dim;
    for (buf, floats, name) in [(g.dq, q.cols, "dq"), (g.dk, kv_dim, "dk"), (g.dv, kv_dim, "dv"), (g.stats, 3 * s.n_heads, "stats")] {
        if (((row0 + n_tokens) * floats) * 4) as u64 > buf.size() {
            return Err(Error::Shape { op: "attention_backward", msg: format!("{name}: fewer than {} rows", row0 + n_tokens) });
        }
    }
    let p = Params {
        n_tokens: n_tokens as u32,
        row0: row0 as u32,
        n_heads: s.n_heads as u32,
        n_kv_heads: s.n_kv_heads as u32,
        head_dim: s.head_dim as u32,
        pos0: cache.len as u32,
        base_words: (cache.base * s.n_kv_heads * s.head_dim / 2) as u32,
        window: s.window as u32,
        scale: s.scale,
    };
    // Both keep their rows and sums in registers: specialised on head_dim / 4.
    let consts = [("D4", (s.head_dim / 4) as u32)];
    let grad_q = ctx.kernel(&super::with_lanes(ctx, super::specialized::<Params>("attention_grad_q", WGSL, "grad_q", &consts)))?;
    let qkv = || vec![Binding::whole(q.buf), Binding::whole(cache.k), Binding::whole(cache.v), Binding::whole(dout.buf)];
    let mut b = qkv();
    b.extend([Binding::whole(g.dq), Binding::whole(g.stats)]);
    rec.dispatch(&grad_q, &p, b, [super::groups(n_tokens, 8), s.n_heads as u32, 1])?;
    let grad_kv = ctx.kernel(&super::with_lanes(ctx, super::specialized::<Params>("attention_grad_kv", WGSL, "grad_kv", &consts)))?;
    let mut b = qkv();
    b.extend([Binding::whole(g.stats).at(6), Binding::whole(g.dk).at(7), Binding::whole(g.dv).at(8)]);
    rec.dispatch(&grad_kv, &p, b, [super::groups(n_tokens, 8), s.n_kv_heads as u32, 1])
}
