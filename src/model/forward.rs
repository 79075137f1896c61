//! The forward pass as layer code: embed, then per layer an attention block and a feed-forward
//! block, then the final norm and the LM head — every projection through [`Model::linear`], every
//! operand a [`View`] of the chunk's scratch rows.
//!
//! A traced forward (training) hands a [`Tap`] that keeps the activations the backward pass
//! reads; with a tap the norms before the projections and the GLU run as steps of their own, so
//! their inputs and outputs exist to be kept.

use super::linear::{ChunkLora, Linear, Out};
use super::Model;
use crate::error::{Error, Result};
use crate::gpu::{storage_buffer_zeroed, upload, Products, Recorder, View};
use crate::hparams::ModelConfig;
use crate::kernels::attention::{attention, AttentionShape};
use crate::kernels::elementwise::{add_rows, glu};
use crate::kernels::embed::embed;
use crate::kernels::kv_store::{rope_kv_store, Qkv};
use crate::kernels::norm::{rms_norm, rms_norm_inplace, RmsNorm};
use crate::kernels::places::{place_sequence, Places, RowPlace};
use crate::kernels::quantize::Q8Rows;
use crate::kernels::rope::RopeOp;
use crate::kernels::sample::OUT_WORDS;
use crate::kv::KvCache;
use crate::lora::Proj;
use crate::model::LayerWeights;

/// Activation buffers of one forward chunk, reused across calls.
pub(super) struct Scratch {
    /// Rows the buffers hold.
    pub tokens: usize,
    pub ids: wgpu::Buffer,
    /// The residual stream.
    pub h: wgpu::Buffer,
    /// A norm's output, where it is not fused (a traced forward, the LM head's rows).
    pub xn: wgpu::Buffer,
    /// Queries, keys and values ([`QkvRows`] says where).
    pub qkv: wgpu::Buffer,
    pub attn: wgpu::Buffer,
    /// A block's output before its post-norm (gemma3).
    pub tmp: wgpu::Buffer,
    pub gate: wgpu::Buffer,
    pub up: wgpu::Buffer,
    pub logits: wgpu::Buffer,
    pub picked: wgpu::Buffer,
    pub row_slot: wgpu::Buffer,
    pub tree: wgpu::Buffer,
    /// Per row its [`RowPlace`].
    pub places: wgpu::Buffer,
    pub lora_u: wgpu::Buffer,
    pub lora_u_up: wgpu::Buffer,
    /// A product's input rows quantized to 8 bits ([`Q8Rows`]), where the products take them
    /// so ([`Products::Int8`]); else empty.
    pub x8: Option<(wgpu::Buffer, wgpu::Buffer)>,
}

impl Scratch {
    /// Room for `tokens` rows, logits of `logit_rows` and adapters up to `max_rank`.
    pub fn new(model: &Model, tokens: usize, logit_rows: usize, max_rank: usize) -> Self {
        let c = &model.config;
        let f = |name: &str, floats: usize| storage_buffer_zeroed(&model.ctx, name, (floats * 4) as u64);
        Scratch {
            tokens,
            ids: f("ids", tokens),
            h: f("h", tokens * c.d_model),
            xn: f("xn", tokens * c.d_model.max(c.q_dim())),
            qkv: f("qkv", tokens * (c.q_dim() + 2 * c.kv_dim())),
            attn: f("attn", tokens * c.q_dim()),
            tmp: f("tmp", tokens * c.d_model),
            gate: f("gate", tokens * c.ffn_dim),
            up: f("up", tokens * c.ffn_dim),
            logits: f("logits", logit_rows * c.n_vocab),
            picked: f("picked", logit_rows.min(tokens) * OUT_WORDS),
            row_slot: f("row_slot", tokens),
            tree: f("tree", 2 * tokens),
            places: f("places", 4 * tokens),
            // Three ranks per row: the stacked query/key/value shrink.
            lora_u: f("lora_u", tokens * 3 * max_rank),
            lora_u_up: f("lora_u_up", tokens * max_rank),
            x8: (model.ctx.products == Products::Int8).then(|| {
                let (qs, meta) = Q8Rows::bytes(tokens, c.d_model.max(c.q_dim()).max(c.ffn_dim));
                (storage_buffer_zeroed(&model.ctx, "x8", qs), storage_buffer_zeroed(&model.ctx, "x8_meta", meta))
            }),
        }
    }

    /// Room for a product's input quantized to 8 bits, unless the products take f32 or `tap`
    /// traces the pass (training keeps f32 activations: its gradients are judged against them).
    fn q8(&self, tap: &dyn Tap) -> Option<Q8Rows<'_>> {
        self.x8.as_ref().filter(|_| !tap.active()).map(|(qs, meta)| Q8Rows { qs, meta })
    }
}

/// A chunk's queries, keys and values: interleaved (each token's q, k and v rows side by side,
/// as the stacked product writes them) or in three dense regions (what a traced forward keeps,
/// and what per-head norms need: a chunk's heads as one run of rows).
pub(super) struct QkvRows<'a> {
    pub q: View<'a>,
    pub k: View<'a>,
    pub v: View<'a>,
}

impl<'a> QkvRows<'a> {
    fn new(c: &ModelConfig, buf: &'a wgpu::Buffer, t: usize, interleaved: bool) -> Self {
        let (q, kv) = (c.q_dim(), c.kv_dim());
        if interleaved {
            let row = View::new(buf, t, q + 2 * kv);
            Self { q: row.cols(0, q), k: row.cols(q, kv), v: row.cols(q + kv, kv) }
        } else {
            let region = |offset, cols| View { offset, ..View::new(buf, t, cols) };
            Self { q: region(0, q), k: region(t * q, kv), v: region(t * (q + kv), kv) }
        }
    }
}

/// One sequence's rows in a chunk: batch rows `row0..row0 + len`, appended to `kv`.
pub(super) struct Segment<'k> {
    pub kv: &'k KvCache,
    pub row0: usize,
    pub len: usize,
}

/// The activations a traced forward keeps, by name (see `model/backward.rs` for their use).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Act {
    /// A layer's input (the residual stream).
    HIn,
    /// The attention norm's output.
    X1,
    /// Queries and keys before their per-head norms and RoPE.
    QPre,
    KPre,
    /// Queries after RoPE.
    Q,
    /// Attention's output.
    Att,
    /// The attention output projection before its post-norm.
    OPre,
    /// The residual stream between the blocks.
    HMid,
    /// The feed-forward norm's output.
    X2,
    /// Gate and up projections, before the GLU.
    Gate,
    Up,
    /// The GLU's output.
    G,
    /// The down projection before its post-norm.
    YPre,
}

/// Where a forward pass hands the activations the backward pass needs.
pub(super) trait Tap {
    /// Whether anything is kept (the forward then leaves the norms and the GLU unfused).
    fn active(&self) -> bool;
    /// Keep `src` (dense rows of the chunk) as activation `act` of `layer`.
    fn keep(&mut self, rec: &mut Recorder, layer: usize, act: Act, src: View) -> Result<()>;
    /// Keep the final residual stream (the LM head's input before its norm).
    fn keep_final(&mut self, rec: &mut Recorder, src: View) -> Result<()>;
}

/// The tap of inference: keeps nothing.
pub(super) struct NoTap;

impl Tap for NoTap {
    fn active(&self) -> bool {
        false
    }
    fn keep(&mut self, _: &mut Recorder, _: usize, _: Act, _: View) -> Result<()> {
        Ok(())
    }
    fn keep_final(&mut self, _: &mut Recorder, _: View) -> Result<()> {
        Ok(())
    }
}

/// Copy dense rows `src` to the start of `dst` (a tap's buffer).
pub(super) fn copy_rows(rec: &mut Recorder, src: View, dst: &wgpu::Buffer) -> Result<()> {
    let bytes = (src.rows * src.cols * 4) as u64;
    if src.stride != src.cols || bytes > dst.size() {
        return Err(Error::Shape { op: "trace", msg: format!("{src} into a buffer of {} floats", dst.size() / 4) });
    }
    rec.copy(src.buf, (src.offset * 4) as u64, dst, 0, bytes);
    Ok(())
}

/// What one chunk of a forward pass covers.
pub(super) struct Chunk<'a> {
    /// Its scratch buffers, `ids` and `row_slot` already uploaded.
    pub s: &'a Scratch,
    /// The sequences whose rows it holds, in order.
    pub segs: &'a [Segment<'a>],
    /// `(first row, rows)` ranges whose logits are wanted, packed in order into `s.logits`.
    pub logit_rows: &'a [(usize, usize)],
    /// The adapters of its rows.
    pub lora: Option<&'a ChunkLora<'a>>,
    /// Per row (parent, depth) for a token tree (one segment).
    pub tree: Option<&'a [[i32; 2]]>,
}

impl Chunk<'_> {
    fn rows(&self) -> usize {
        self.segs.iter().map(|g| g.len).sum()
    }

    /// Whether the pass only appends to the caches: no logits wanted, no token tree, nothing
    /// traced for a backward pass.
    fn fills_caches_only(&self, tap: &dyn Tap) -> bool {
        self.logit_rows.iter().all(|&(_, rows)| rows == 0) && self.tree.is_none() && !tap.active()
    }

    /// Every row's place, uploaded to `s.places` (and the tree's rows to `s.tree`).
    fn place_rows(&self, ctx: &crate::gpu::GpuContext) -> Result<Vec<RowPlace>> {
        let depths: Option<Vec<i32>> = self.tree.map(|t| t.iter().map(|r| r[1]).collect());
        let mut places = Vec::with_capacity(self.rows());
        for g in self.segs {
            places.extend(place_sequence(g.kv.base(), g.kv.len(), g.len, depths.as_deref())?);
        }
        upload(ctx, &self.s.places, 0, &places);
        if let Some(rows) = self.tree {
            upload(ctx, &self.s.tree, 0, rows);
        }
        Ok(places)
    }

    /// Runs of consecutive segments whose caches share buffers — one dispatch of RoPE, the KV
    /// store and attention each serves a run — as (first segment, segments).
    fn runs(&self) -> Vec<(usize, usize)> {
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for (i, g) in self.segs.iter().enumerate() {
            match runs.last_mut() {
                Some((first, n)) if self.segs[*first].kv.shares_buffers(g.kv) => *n += 1,
                _ => runs.push((i, 1)),
            }
        }
        runs
    }
}

/// A chunk's row places and the runs of segments a dispatch serves, worked out once per pass.
struct Layout {
    places: Vec<RowPlace>,
    runs: Vec<(usize, usize)>,
}

impl Model {
    /// Record the whole network for a chunk's rows (each appended to its own cache).
    pub(super) fn record_chunk(&self, rec: &mut Recorder, chunk: &Chunk, tap: &mut dyn Tap) -> Result<()> {
        let (c, w, s) = (&self.config, &self.weights, chunk.s);
        let h = View::new(&s.h, chunk.rows(), c.d_model);
        let layout = Layout { places: chunk.place_rows(&self.ctx)?, runs: chunk.runs() };
        embed(rec, &self.ctx, &w.embed, &s.ids, c.embed_scale, h)?;
        for (l, lw) in w.layers.iter().enumerate() {
            // A chunk that only fills caches reads nothing of the last layer past its keys and
            // values: its attention, output projection and feed-forward block would feed no logit.
            let kv_only = l + 1 == w.layers.len() && chunk.fills_caches_only(tap);
            self.attention_block(rec, chunk, &layout, l, lw, tap, kv_only)?;
            if kv_only {
                return Ok(());
            }
            self.feed_forward_block(rec, chunk, l, lw, tap)?;
        }
        tap.keep_final(rec, h)?;
        self.lm_head(rec, chunk, tap)
    }

    /// `h += Wo · attention(rope(q), rope(k), v)` with q, k, v from `rmsnorm(h)`; with
    /// `kv_only`, only the keys and values stored into the caches.
    #[allow(clippy::too_many_arguments)] // a block of a layer of a chunk, with its tap
    fn attention_block(
        &self,
        rec: &mut Recorder,
        chunk: &Chunk,
        layout: &Layout,
        l: usize,
        lw: &LayerWeights,
        tap: &mut dyn Tap,
        kv_only: bool,
    ) -> Result<()> {
        let (c, ctx, s) = (&self.config, &*self.ctx, chunk.s);
        let (t, hd) = (chunk.rows(), c.head_dim);
        let h = View::new(&s.h, t, c.d_model);
        tap.keep(rec, l, Act::HIn, h)?;
        let (x, norm) = self.norm_in(rec, RmsNorm { w: &lw.attn_norm, eps: c.norm_eps }, h, &s.xn, l, Act::X1, tap)?;
        // Queries, keys and values in f32 scratch rows (bias and norm apply there), then rotated
        // and stored into each sequence's f16 cache in one dispatch.
        let QkvRows { q, k, v } = QkvRows::new(c, &s.qkv, t, !tap.active() && lw.qk_norm.is_none());
        self.linear(rec, chunk.lora, Linear { x, norm, q8: s.q8(tap), out: Out::Qkv { layer: l, lw, q, k, v } })?;
        if let Some([bq, bk, bv]) = &lw.qkv_bias {
            add_rows(rec, ctx, q, bq)?;
            add_rows(rec, ctx, k, bk)?;
            add_rows(rec, ctx, v, bv)?;
        }
        tap.keep(rec, l, Act::QPre, q)?;
        tap.keep(rec, l, Act::KPre, k)?;
        if let Some([qn, kn]) = &lw.qk_norm {
            rms_norm_inplace(rec, ctx, RmsNorm { w: qn, eps: c.norm_eps }, q.split_rows(hd)?)?;
            rms_norm_inplace(rec, ctx, RmsNorm { w: kn, eps: c.norm_eps }, k.split_rows(hd)?)?;
        }
        let shape =
            AttentionShape { n_heads: c.n_heads, n_kv_heads: c.n_kv_heads, head_dim: hd, window: c.layer_window(l), scale: c.attn_scale };
        let att = View::new(&s.attn, t, c.q_dim());
        let all = Places { buf: &s.places, at: 0, rows: &layout.places };
        let tree = chunk.tree.map(|_| &s.tree);
        for &(first, n) in &layout.runs {
            let segs = &chunk.segs[first..first + n];
            let (row0, rows) = (segs[0].row0, segs.iter().map(|g| g.len).sum());
            let [q, k, v, o] = [q, k, v, att].map(|r| r.rows(row0, rows));
            let (places, cache) = (all.range(row0, rows)?, segs[0].kv.buffers(l)?);
            let n_ctx = segs[0].kv.n_ctx();
            let rp = c.layer_rope(l, n_ctx);
            let op = RopeOp { rope: &rp, factors: self.weights.rope_factors_in(c, n_ctx) };
            rope_kv_store(rec, ctx, op, Qkv { q, k, v, head_dim: hd }, cache, places)?;
            if kv_only {
                continue;
            }
            // Decode rows (the batcher puts them first) through the split-key entry, the rest
            // through the row-per-invocation one.
            let decode: usize = segs.iter().take_while(|g| g.len == 1).count();
            for (from, n) in [(0, decode), (decode, rows - decode)] {
                if n > 0 {
                    let [q, o] = [q, o].map(|r| r.rows(from, n));
                    attention(rec, ctx, &shape, q, cache, places.range(from, n)?, o, tree)?;
                }
            }
        }
        if kv_only {
            return Ok(());
        }
        tap.keep(rec, l, Act::Q, q)?;
        tap.keep(rec, l, Act::Att, att)?;
        self.residual(rec, chunk, (l, Proj::O), &lw.wo, att, lw.post_attn_norm.as_ref(), Act::OPre, tap)?;
        tap.keep(rec, l, Act::HMid, h)
    }

    /// `h += W_down · (act(W_gate · x) · (W_up · x))` with `x = rmsnorm(h)`.
    fn feed_forward_block(&self, rec: &mut Recorder, chunk: &Chunk, l: usize, lw: &LayerWeights, tap: &mut dyn Tap) -> Result<()> {
        let (c, s) = (&self.config, chunk.s);
        let t = chunk.rows();
        let h = View::new(&s.h, t, c.d_model);
        let (gate, up) = (View::new(&s.gate, t, c.ffn_dim), View::new(&s.up, t, c.ffn_dim));
        let (x, norm) = self.norm_in(rec, RmsNorm { w: &lw.ffn_norm, eps: c.norm_eps }, h, &s.xn, l, Act::X2, tap)?;
        if tap.active() {
            // The backward pass needs gate and up before the GLU.
            let one = |proj, w, y| Linear { x, norm, q8: None, out: Out::One { site: Some((l, proj)), w, y, accumulate: false } };
            self.linear(rec, chunk.lora, one(Proj::Gate, &lw.w_gate, gate))?;
            self.linear(rec, chunk.lora, one(Proj::Up, &lw.w_up, up))?;
            tap.keep(rec, l, Act::Gate, gate)?;
            tap.keep(rec, l, Act::Up, up)?;
            glu(rec, &self.ctx, c.act, &s.gate, &s.up, t * c.ffn_dim)?;
            tap.keep(rec, l, Act::G, gate)?;
        } else {
            self.linear(rec, chunk.lora, Linear { x, norm, q8: s.q8(tap), out: Out::Gated { layer: l, lw, gate, up } })?;
        }
        self.residual(rec, chunk, (l, Proj::Down), &lw.w_down, gate, lw.post_ffn_norm.as_ref(), Act::YPre, tap)
    }

    /// The input of a block's projections: `rmsnorm(h)` fused into them (returned as the norm to
    /// apply), or — with an active tap — computed into `out`, kept as `act`, and returned as rows.
    #[allow(clippy::too_many_arguments)] // the tap's name and buffer for the unfused case
    fn norm_in<'a>(
        &self,
        rec: &mut Recorder,
        norm: RmsNorm<'a>,
        h: View<'a>,
        out: &'a wgpu::Buffer,
        l: usize,
        act: Act,
        tap: &mut dyn Tap,
    ) -> Result<(View<'a>, Option<RmsNorm<'a>>)> {
        if !tap.active() {
            return Ok((h, Some(norm)));
        }
        let xn = View { buf: out, ..h };
        rms_norm(rec, &self.ctx, norm, h, xn, false)?;
        tap.keep(rec, l, act, xn)?;
        Ok((xn, None))
    }

    /// `h += W·x`, or with a post-norm (gemma3) `h += rmsnorm(W·x)` (its input kept as `act`).
    #[allow(clippy::too_many_arguments)] // one block's output step: its projection, norm and tap
    fn residual(
        &self,
        rec: &mut Recorder,
        chunk: &Chunk,
        site: (usize, Proj),
        w: &crate::gpu::WeightMatrix,
        x: View,
        post_norm: Option<&wgpu::Buffer>,
        act: Act,
        tap: &mut dyn Tap,
    ) -> Result<()> {
        let s = chunk.s;
        let h = View::new(&s.h, x.rows, self.config.d_model);
        let Some(nw) = post_norm else {
            return self.linear(
                rec,
                chunk.lora,
                Linear { x, norm: None, q8: s.q8(tap), out: Out::One { site: Some(site), w, y: h, accumulate: true } },
            );
        };
        let tmp = View { buf: &s.tmp, ..h };
        self.linear(
            rec,
            chunk.lora,
            Linear { x, norm: None, q8: s.q8(tap), out: Out::One { site: Some(site), w, y: tmp, accumulate: false } },
        )?;
        tap.keep(rec, site.0, act, tmp)?;
        rms_norm(rec, &self.ctx, RmsNorm { w: nw, eps: self.config.norm_eps }, tmp, h, true)
    }

    /// The logits of the wanted rows: the LM head with the final norm fused in where the rows are
    /// contiguous (a decode step, a prefill's last row); else their norms packed into `xn` first.
    fn lm_head(&self, rec: &mut Recorder, chunk: &Chunk, tap: &dyn Tap) -> Result<()> {
        let (c, s) = (&self.config, chunk.s);
        let q8 = s.q8(tap);
        let (h, xn) = (View::new(&s.h, chunk.rows(), c.d_model), View::new(&s.xn, chunk.rows(), c.d_model));
        let norm = RmsNorm { w: &self.weights.out_norm, eps: c.norm_eps };
        let out = self.weights.output();
        if let [(first, rows)] = *chunk.logit_rows {
            if rows == 0 {
                return Ok(());
            }
            let (x, y) = (h.rows(first, rows), View::new(&s.logits, rows, c.n_vocab));
            return self.linear(rec, None, Linear { x, norm: Some(norm), q8, out: Out::One { site: None, w: out, y, accumulate: false } });
        }
        let mut n = 0;
        for &(first, rows) in chunk.logit_rows {
            rms_norm(rec, &self.ctx, norm, h.rows(first, rows), xn.rows(n, rows), false)?;
            n += rows;
        }
        if n == 0 {
            return Ok(());
        }
        let y = View::new(&s.logits, n, c.n_vocab);
        self.linear(rec, None, Linear { x: xn.rows(0, n), norm: None, q8, out: Out::One { site: None, w: out, y, accumulate: false } })
    }
}
