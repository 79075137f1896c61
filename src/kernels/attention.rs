//! Causal attention over the KV cache — launcher of `shaders/attention.wgsl`.

use super::places::Places;
use crate::error::{Error, Result};
use crate::gpu::{uniform_block, Binding, GpuContext, Recorder, View};

const WGSL: &str = include_str!("../../shaders/attention.wgsl");

uniform_block! {
    /// The uniform block of the shader (its WGSL declaration is generated from this one).
    pub(super) struct Params {
        n_tokens: u32,
        n_heads: u32,
        n_kv_heads: u32,
        head_dim: u32,
        at: u32,
        window: u32,
        q_offset: u32,
        q_stride: u32,
        o_offset: u32,
        o_stride: u32,
        scale: f32,
        tree: u32,
    }
}

/// Head geometry of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Dimensions per head.
    pub head_dim: usize,
    /// Sliding window (0 = full causal attention).
    pub window: usize,
    /// Score scale (usually 1/√head_dim).
    pub scale: f32,
}

impl AttentionShape {
    /// Check what the kernels support: head_dim a multiple of 4 up to 256, query heads a
    /// multiple of the key/value heads.
    pub(super) fn check(&self, op: &'static str) -> Result<()> {
        if self.head_dim % 4 != 0 || self.head_dim > 256 || self.n_kv_heads == 0 || self.n_heads % self.n_kv_heads != 0 {
            return Err(Error::Shape {
                op,
                msg: format!(
                    "head_dim {} (needs a multiple of 4, at most 256), heads {} / kv heads {}",
                    self.head_dim, self.n_heads, self.n_kv_heads
                ),
            });
        }
        Ok(())
    }
}

/// One layer's f16 key and value caches, as [`rope_kv_store`](super::kv_store::rope_kv_store) writes
/// them: rows of `n_kv_heads × head_dim` f16, two per u32, for every cache slot they hold.
#[derive(Clone, Copy)]
pub struct KvBuffers<'a> {
    /// Keys.
    pub k: &'a wgpu::Buffer,
    /// Values, laid out like the keys.
    pub v: &'a wgpu::Buffer,
}

/// One sequence's cache in a layer's buffers: position `j` at row `base + j`, `len` positions
/// held before the rows being processed (what the training kernels read).
#[derive(Clone, Copy)]
pub struct CachedLayer<'a> {
    /// Keys: rows of `n_kv_heads × head_dim` f16, two per u32.
    pub k: &'a wgpu::Buffer,
    /// Values, laid out like the keys.
    pub v: &'a wgpu::Buffer,
    /// The row of position 0.
    pub base: usize,
    /// Positions cached before the new rows (the first new row's position).
    pub len: usize,
}

/// Keys folded in per rescale of the running softmaxes. Prefill attention on lavapipe
/// (`cargo bench --bench kernels -- attention`): 1 → 4 took 1.3–1.4× off, 8 gained no more.
const KEY_BLOCK: usize = 4;

/// Without subgroups, at most this many rows (one workgroup of the row-per-invocation entry) take
/// the split-key entry.
const SPLIT_KEY_ROWS: usize = 64;

/// Record attention of `q`'s rows (one token each, `n_heads × head_dim`) into `o` (rows like
/// `q`'s): each row, at its place (see [`RowPlace`](super::places::RowPlace)), against its own
/// sequence's cached rows up to its position — the rows of several sequences in one dispatch.
/// The queries may sit between the keys and values of a token, with a longer stride. With `tree`
/// (per row: parent or −1, depth; one sequence, see `shaders/attention.wgsl`) each row sees the
/// cache before its sequence's new rows and its own ancestors only.
#[allow(clippy::too_many_arguments)] // the operands of one attention: queries, caches, places, output, tree
pub fn attention(
    rec: &mut Recorder,
    ctx: &GpuContext,
    s: &AttentionShape,
    q: View,
    cache: KvBuffers,
    places: Places,
    o: View,
    tree: Option<&wgpu::Buffer>,
) -> Result<()> {
    s.check("attention")?;
    if q.cols != s.n_heads * s.head_dim {
        return Err(Error::Shape { op: "attention", msg: format!("query rows of {}, {} heads of {}", q.cols, s.n_heads, s.head_dim) });
    }
    q.same_shape("attention", &o)?;
    q.check("attention", "q", 4)?;
    o.check("attention", "o", 4)?;
    let row_bytes = (s.n_kv_heads * s.head_dim * 2) as u64;
    places.check("attention", q.rows, (cache.k.size().min(cache.v.size()) / row_bytes) as usize)?;
    let n_tokens = q.rows;
    // Where subgroups let the lanes of `main` walk a sequence's keys together (each key and value
    // row loaded once between them), `main` serves every sequence of several rows, and where the
    // dispatch is one sequence, one query head per lane (more only spill: its loads are shared
    // already). Elsewhere the split-key entry serves decode steps and few rows (a training step's
    // active rows, short chunks): one invocation per (head group, row) would leave most lanes and
    // workgroups idle while each walks the whole prefix alone.
    let together = ctx.subgroups_hold(8);
    let decode = tree.is_none() && (places.one_row_each() || (!together && n_tokens <= SPLIT_KEY_ROWS));
    // Otherwise (a batch mixing sequences, whose decode rows walk their keys alone) query heads
    // per invocation: the most that share a KV head and keep their queries and accumulators
    // within 64 vec4 (each key and value row loaded once for all of them; larger groups only
    // spill and compile slowly).
    let d4 = s.head_dim / 4;
    let g = if together && !decode && places.one_sequence() {
        1
    } else {
        (1..=s.n_heads / s.n_kv_heads).rev().find(|g| (s.n_heads / s.n_kv_heads) % g == 0 && g * d4 <= 64).unwrap_or(1)
    };
    // Invocations per head group in decode: as many as workgroup memory holds.
    let per_part = g * (s.head_dim + 2) * 4;
    let limit = ctx.limits.max_compute_workgroup_storage_size as usize;
    let split = [16, 8, 4, 2, 1].into_iter().find(|n| n * per_part <= limit).unwrap_or(1);
    let consts = [("D4", d4 as u32), ("G", g as u32), ("SPLIT", split as u32), ("B", KEY_BLOCK as u32)];
    let entry = if decode { "decode" } else { "main" };
    let kernel = ctx.kernel(&super::with_lanes(ctx, super::specialized::<Params>("attention", WGSL, entry, &consts)))?;
    let p = Params {
        n_tokens: n_tokens as u32,
        n_heads: s.n_heads as u32,
        n_kv_heads: s.n_kv_heads as u32,
        head_dim: s.head_dim as u32,
        at: places.at as u32,
        window: s.window as u32,
        q_offset: q.offset as u32,
        q_stride: q.stride as u32,
        o_offset: o.offset as u32,
        o_stride: o.stride as u32,
        scale: s.scale,
        tree: tree.is_some() as u32,
    };
    let tree = tree.unwrap_or(ctx.placeholder());
    let mut bindings =
        vec![Binding::whole(q.buf), Binding::whole(cache.k), Binding::whole(cache.v), Binding::whole(o.buf), Binding::whole(places.buf)];
    // The decode entry has no tree binding.
    if !decode {
        bindings.push(Binding::whole(tree));
    }
    let head_groups = s.n_heads / g;
    let groups = if decode { [head_groups as u32, n_tokens as u32, 1] } else { [super::groups(n_tokens, 64), head_groups as u32, 1] };
    rec.dispatch(&kernel, &p, bindings, groups)
}
