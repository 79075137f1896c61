//! The gradient of an adapter on the GPU, for training: the frozen prefix runs forward only (its
//! keys and values cached), the rows where the adapter is active run forward with their
//! activations kept, then backward through every layer to the adapter's A and B matrices.
//!
//! Base weights are frozen, so only activation gradients flow through them (the transposed
//! quantized product); the adapter's own gradients are accumulated into buffers laid out like the
//! registry's packs. The f32 reference (`ReferenceModel::lora_loss_and_grads`) is what it is
//! checked against.

use super::forward::{copy_rows, Act, Chunk, NoTap, Scratch, Segment, Tap};
use super::linear::ChunkLora;
use super::{Logits, Model};
use crate::error::{Error, Result};
use crate::gpu::{read_f32, storage_buffer_zeroed, upload, Recorder, View, WeightMatrix};
use crate::kernels::attention::AttentionShape;
use crate::kernels::attention_backward::{attention_backward, AttentionGrads};
use crate::kernels::elementwise::glu_backward;
use crate::kernels::lora::lora_shrink;
use crate::kernels::lora_backward::{lora_backward, LoraBackward};
use crate::kernels::loss::cross_entropy;
use crate::kernels::matmul::{LoraIo, MatmulIo};
use crate::kernels::matmul_t::matmul_t;
use crate::kernels::norm::{rms_norm_backward, RmsNorm};
use crate::kernels::optim::{adamw, AdamTensors, AdamW};
use crate::kernels::rope::{rope_backward, RopeOp};
use crate::kv::KvCache;
use crate::lora::{ActiveAdapter, AdapterId, AdapterRegistry, LoraWeights, Proj};
use std::collections::BTreeMap;
use std::ops::Range;

/// Every activation a traced forward keeps: per layer one buffer per [`Act`], and the final
/// residual stream.
struct ForwardTrace {
    layers: Vec<Vec<wgpu::Buffer>>,
    h_final: wgpu::Buffer,
}

/// The activations of a layer, in [`Act`]'s order.
const ACTS: [Act; 13] =
    [Act::HIn, Act::X1, Act::QPre, Act::KPre, Act::Q, Act::Att, Act::OPre, Act::HMid, Act::X2, Act::Gate, Act::Up, Act::G, Act::YPre];

impl ForwardTrace {
    /// Room for `t` rows of every activation.
    fn new(model: &Model, t: usize) -> Self {
        let c = &model.config;
        let f = |name: &str, floats: usize| storage_buffer_zeroed(&model.ctx, name, (t * floats).max(1) as u64 * 4);
        let width = |a: Act| match a {
            Act::QPre | Act::Q | Act::Att => c.q_dim(),
            Act::KPre => c.kv_dim(),
            Act::Gate | Act::Up | Act::G => c.ffn_dim,
            Act::HIn | Act::X1 | Act::OPre | Act::HMid | Act::X2 | Act::YPre => c.d_model,
        };
        let layers = (0..c.n_layers).map(|_| ACTS.iter().map(|&a| f(&format!("{a:?}"), width(a))).collect()).collect();
        Self { layers, h_final: f("h_final", c.d_model) }
    }

    /// Activation `act` of layer `l`.
    fn get(&self, l: usize, act: Act) -> &wgpu::Buffer {
        &self.layers[l][act as usize]
    }
}

impl Tap for ForwardTrace {
    fn active(&self) -> bool {
        true
    }
    fn keep(&mut self, rec: &mut Recorder, layer: usize, act: Act, src: View) -> Result<()> {
        copy_rows(rec, src, &self.layers[layer][act as usize])
    }
    fn keep_final(&mut self, rec: &mut Recorder, src: View) -> Result<()> {
        copy_rows(rec, src, &self.h_final)
    }
}

/// Buffers laid out like the registry's A and B packs (an adapter's matrices sit at the same
/// offsets as its weights): its gradients (accumulated over examples until a step) and its
/// optimizer moments. Make them after the adapters are loaded (a pack that grows moves).
pub struct AdapterBuffers {
    /// Like the A pack.
    pub a: wgpu::Buffer,
    /// Like the B pack.
    pub b: wgpu::Buffer,
}

/// What training an adapter keeps on the GPU besides its weights.
pub struct AdapterTraining {
    /// Accumulated gradients.
    pub grads: AdapterBuffers,
    /// AdamW's first and second moments.
    pub m: AdapterBuffers,
    /// Second moments, laid out like the adapter.
    pub v: AdapterBuffers,
}

/// The frozen prefixes' KV caches kept from one training example to the next, under a memory
/// budget: examples of a tool set share their prompt's beginning (system prompt, tool list,
/// often the conversation), and a conversation comes back every epoch and at every validation.
/// An example continues the kept prefix that shares the longest beginning with its own; only
/// the positions after it are computed. One that shares only part of another's (another
/// conversation after the same tool list) gets a copy of it, not its place, while the budget
/// allows; beyond the budget the least recently used prefixes go.
pub struct PrefixCache {
    /// Least recently used first.
    entries: Vec<KeptPrefix>,
    budget: u64,
    reused: usize,
    computed: usize,
}

struct KeptPrefix {
    kv: KvCache,
    /// The base-weight positions `kv` holds (an example's adapter rows after them are not kept).
    tokens: Vec<u32>,
}

/// Bytes of KV cache a [`PrefixCache`] keeps unless told otherwise.
pub const DEFAULT_PREFIX_CACHE_BYTES: u64 = 1 << 30;

impl Default for PrefixCache {
    fn default() -> Self {
        Self::with_budget(DEFAULT_PREFIX_CACHE_BYTES)
    }
}

impl PrefixCache {
    /// An empty cache of the default budget ([`DEFAULT_PREFIX_CACHE_BYTES`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty cache keeping at most `bytes` of KV cache (always at least one prefix).
    pub fn with_budget(bytes: u64) -> Self {
        Self { entries: Vec::new(), budget: bytes, reused: 0, computed: 0 }
    }

    /// Prefix positions taken from the cache so far.
    pub fn reused(&self) -> usize {
        self.reused
    }

    /// Prefix positions computed so far.
    pub fn computed(&self) -> usize {
        self.computed
    }

    /// Prefixes kept now.
    pub fn kept(&self) -> usize {
        self.entries.len()
    }

    /// A cache holding exactly `prefix` (base weights, no adapter), with room for `total`
    /// positions.
    fn prepare(&mut self, model: &Model, prefix: &[u32], total: usize) -> Result<&KvCache> {
        let shared = |e: &KeptPrefix| e.tokens.iter().zip(prefix).take_while(|(a, b)| a == b).count();
        // The longest shared beginning among the kept prefixes with room; the most recent on a tie.
        let best = self.entries.iter().enumerate().filter(|(_, e)| e.kv.n_ctx() >= total).map(|(i, e)| (shared(e), i)).max();
        let (common, i) = match best {
            // All of it: the same conversation further on, continued in place.
            Some((common, i)) if common == self.entries[i].tokens.len() => (common, i),
            best => {
                // Room in steps of 512 positions, so a slightly longer example does not reallocate.
                let n_ctx = total.div_ceil(512) * 512;
                let (common, kv) = match best {
                    // Part of another: a copy of its positions, cut where they part.
                    Some((common, i)) if common > 0 => {
                        let mut kv = self.entries[i].kv.fork(&model.ctx)?;
                        kv.truncate(common);
                        (common, kv)
                    }
                    _ => (0, model.new_cache(n_ctx)?),
                };
                let per_position = KvCache::bytes_per_position(&model.config);
                let bytes = |entries: &[KeptPrefix]| entries.iter().map(|e| e.kv.n_ctx() as u64 * per_position).sum::<u64>();
                while !self.entries.is_empty() && bytes(&self.entries) + n_ctx as u64 * per_position > self.budget {
                    self.entries.remove(0);
                }
                self.entries.push(KeptPrefix { kv, tokens: prefix[..common].to_vec() });
                (common, self.entries.len() - 1)
            }
        };
        let mut entry = self.entries.remove(i);
        // Positions past the kept prefix hold an example's adapter rows: never reused.
        entry.kv.truncate(common);
        entry.tokens.truncate(common);
        if common < prefix.len() {
            model.forward(&prefix[common..], &mut entry.kv, Logits::None)?;
            entry.tokens.extend_from_slice(&prefix[common..]);
        }
        self.reused += common;
        self.computed += prefix.len() - common;
        self.entries.push(entry);
        Ok(&self.entries.last().expect("pushed above").kv)
    }
}

impl AdapterBuffers {
    /// Zeroed buffers shaped like `model`'s adapter packs as they are now.
    pub fn new(model: &Model) -> Result<Self> {
        let reg = model.registry()?;
        let (a, b) = reg.packs();
        Ok(Self { a: storage_buffer_zeroed(&model.ctx, "pack_a", a.size()), b: storage_buffer_zeroed(&model.ctx, "pack_b", b.size()) })
    }

    /// Adapter `id`'s part of these buffers (its gradients), per targeted (layer, projection),
    /// shaped like its weights (engine row order).
    pub fn read(&self, model: &Model, id: AdapterId) -> Result<BTreeMap<(usize, Proj), LoraWeights>> {
        let registry = model.registry()?;
        model.read_packed(&registry, id, &self.a, &self.b)
    }

    /// The training loss of one example — mean cross-entropy of every target position `p`
    /// predicting `tokens[p]` — with `adapter` active from row `from`, and its gradient with
    /// respect to the adapter's A and B added into these buffers. Targets must come after `from`
    /// (the rows before it do not depend on the adapter). At most one pass of rows (256) may be
    /// active.
    pub fn add_gradient(
        &self,
        model: &Model,
        prefix: &mut PrefixCache,
        tokens: &[u32],
        from: usize,
        targets: &[Range<usize>],
        adapter: ActiveAdapter,
    ) -> Result<f32> {
        run_example(model, Some(self), prefix, tokens, from, targets, adapter)
    }
}

/// The loss of one example as [`AdapterBuffers::add_gradient`] computes it, from the forward
/// pass alone (validation): no trace is kept and nothing runs backward.
pub fn example_loss(
    model: &Model,
    prefix: &mut PrefixCache,
    tokens: &[u32],
    from: usize,
    targets: &[Range<usize>],
    adapter: ActiveAdapter,
) -> Result<f32> {
    run_example(model, None, prefix, tokens, from, targets, adapter)
}

/// An example's loss, and with `grads` its gradient added into them.
fn run_example(
    model: &Model,
    grads: Option<&AdapterBuffers>,
    prefix: &mut PrefixCache,
    tokens: &[u32],
    from: usize,
    targets: &[Range<usize>],
    adapter: ActiveAdapter,
) -> Result<f32> {
    let (c, ctx) = (&model.config, &*model.ctx);
    let t = tokens.len().saturating_sub(from);
    if t == 0 || t > model.max_batch {
        return Err(Error::InvalidOption(format!(
            "{t} rows after the activation point; a training example needs 1 to {}",
            model.max_batch
        )));
    }
    let rows: Vec<usize> = targets.iter().flat_map(|r| r.clone()).collect();
    if rows.is_empty() || rows.iter().any(|&p| p <= from || p >= tokens.len()) {
        return Err(Error::InvalidOption(format!(
            "targets {targets:?} must lie in {}..{}, after the activation point",
            from + 1,
            tokens.len()
        )));
    }
    // Chunk rows whose logits are targets: position p is predicted by row p − 1 − from.
    let logit_rows: Vec<(usize, usize)> = targets.iter().filter(|r| !r.is_empty()).map(|r| (r.start - 1 - from, r.len())).collect();
    let n_t: usize = logit_rows.iter().map(|r| r.1).sum();
    let kv = prefix.prepare(model, &tokens[..from], tokens.len())?;
    let registry = model.registry()?;
    registry.check_resident(&[adapter])?;
    let f = |name: &str, floats: usize| storage_buffer_zeroed(ctx, name, (floats.max(1) * 4) as u64);
    let (d, q_dim, kv_dim, ffn, hd) = (c.d_model, c.q_dim(), c.kv_dim(), c.ffn_dim, c.head_dim);
    let mut trace = grads.map(|_| ForwardTrace::new(model, t));
    let mut guard = model.scratch.lock().map_err(|_| Error::poisoned("scratch"))?;
    let logit_cap = ((ctx.max_binding() as usize / (c.n_vocab * 4)).max(1)).min(model.max_batch);
    if n_t > logit_cap {
        return Err(Error::InvalidOption(format!("{n_t} target tokens in one example; at most {logit_cap} fit one pass")));
    }
    if guard.as_ref().is_none_or(|s| s.tokens < t) {
        *guard = Some(Scratch::new(model, t.max(model.max_batch), logit_cap, registry.limits().max_rank));
    }
    let s = guard.as_ref().expect("scratch allocated above");
    upload(ctx, &s.ids, 0, &tokens[from..]);
    upload(ctx, &s.row_slot, 0, &vec![0i32; t]);
    let active = [adapter];
    let lora = ChunkLora { registry: &registry, active: &active, row_slot: &s.row_slot, u: &s.lora_u, u_up: &s.lora_u_up };
    let mut rec = Recorder::new(ctx);
    let segs = [Segment { kv, row0: 0, len: t }];
    let chunk = Chunk { s, segs: &segs, logit_rows: &logit_rows, lora: Some(&lora), tree: None };
    let mut no_tap = NoTap;
    let tap: &mut dyn Tap = match trace.as_mut() {
        Some(trace) => trace,
        None => &mut no_tap,
    };
    model.record_chunk(&mut rec, &chunk, tap)?;

    // Loss: the target rows' logits become their gradients (of the mean) in place.
    let target_tokens: Vec<u32> = logit_rows.iter().flat_map(|&(r, n)| (r..r + n).map(|row| tokens[from + row + 1])).collect();
    let (tok_b, loss_b) = (f("targets", n_t), f("loss", n_t));
    upload(ctx, &tok_b, 0, &target_tokens);
    let logits = View::new(&s.logits, n_t, c.n_vocab);
    cross_entropy(&mut rec, ctx, logits, &tok_b, &loss_b, 1.0 / n_t as f32)?;
    let (Some(grads), Some(trace)) = (grads, trace) else {
        rec.submit();
        return Ok(read_f32(ctx, &loss_b, 0, n_t)?.iter().sum::<f32>() / n_t as f32);
    };

    // Back through the output projection and final norm into dh (zero on non-target rows).
    let (dh, dfin) = (f("dh", t * d), f("dfinal", t * d));
    let out_norm = RmsNorm { w: &model.weights.out_norm, eps: c.norm_eps };
    let mut packed = 0;
    for &(r, n) in &logit_rows {
        let dfin_rows = View::new(&dfin, t, d).rows(r, n);
        matmul_t(&mut rec, ctx, model.weights.output(), logits.rows(packed, n), dfin_rows, false)?;
        rms_norm_backward(
            &mut rec,
            ctx,
            out_norm,
            View::new(&trace.h_final, t, d).rows(r, n),
            dfin_rows,
            View::new(&dh, t, d).rows(r, n),
            false,
        )?;
        packed += n;
    }

    let (a_pack, b_pack) = registry.packs();
    let max_rank = registry.limits().max_rank;
    let (u, du) = (f("u", t * max_rank), f("du", t * max_rank));
    // Through one frozen projection `y = W·x` (+ the adapter where it targets (l, p)): dx, and
    // the adapter's dA and dB.
    let back = |rec: &mut Recorder,
                (l, p): (usize, Proj),
                w: &WeightMatrix,
                x: &wgpu::Buffer,
                dy: &wgpu::Buffer,
                dx: &wgpu::Buffer,
                accumulate: bool|
     -> Result<()> {
        let (n, k) = (w.rows, w.cols);
        let (x, dy, dx) = (View::new(x, t, k), View::new(dy, t, n), View::new(dx, t, k));
        matmul_t(rec, ctx, w, dy, dx, accumulate)?;
        let Some((slots, rank)) = registry.slots(l, p, &active) else { return Ok(()) };
        let slot = slots[0];
        // u = A·x again (cheaper to recompute at rank r than to keep).
        let lora = LoraIo { a_pack, b_pack, row_slot: &s.row_slot, u: &u, max_rank: rank, slots: &slots, u_splits: None };
        lora_shrink(rec, ctx, &MatmulIo { lora: Some(lora), ..MatmulIo::new(x, dx) })?;
        let matrix = |buf, offset, rows, cols| View { offset, ..View::new(buf, rows, cols) };
        let io = LoraBackward {
            x,
            dy,
            dx,
            a: matrix(a_pack, slot.a_offset, rank, k),
            b: matrix(b_pack, slot.b_offset, n, rank),
            u: &u,
            du: &du,
            da: matrix(&grads.a, slot.a_offset, rank, k),
            db: matrix(&grads.b, slot.b_offset, n, rank),
            scale: slot.scale,
            accumulate: true,
        };
        lora_backward(rec, ctx, &io)
    };
    let (dtmp, dg, dx2, datt, dx1) = (f("dtmp", t * d), f("dg", t * ffn), f("dx2", t * d), f("datt", t * q_dim), f("dx1", t * d));
    let (dq, dqn, dk, dkn, dv, stats) = (
        f("dq", t * q_dim),
        f("dqn", t * q_dim),
        f("dk", t * kv_dim),
        f("dkn", t * kv_dim),
        f("dv", t * kv_dim),
        f("stats", t * c.n_heads * 3),
    );
    let norm_back = |rec: &mut Recorder, w: &wgpu::Buffer, xs: [&wgpu::Buffer; 3], rows: usize, n: usize, accumulate: bool| {
        norm_backward(rec, model, RmsNorm { w, eps: c.norm_eps }, xs, (rows, n), accumulate)
    };
    // A block's output gradient: dh itself, or through the block's post-norm (gemma3) of
    // its pre-norm output `x`.
    let post_norm_back = |rec: &mut Recorder, norm: Option<&wgpu::Buffer>, x: &wgpu::Buffer| -> Result<&wgpu::Buffer> {
        match norm {
            Some(pn) => norm_back(rec, pn, [x, &dh, &dtmp], t, d, false).map(|_| &dtmp),
            None => Ok(&dh),
        }
    };
    for (l, lw) in model.weights.layers.iter().enumerate().rev() {
        let tr = |act| trace.get(l, act);
        // Feed-forward block.
        let dy = post_norm_back(&mut rec, lw.post_ffn_norm.as_ref(), tr(Act::YPre))?;
        back(&mut rec, (l, Proj::Down), &lw.w_down, tr(Act::G), dy, &dg, false)?;
        glu_backward(&mut rec, ctx, c.act, tr(Act::Gate), tr(Act::Up), &dg, t * ffn)?;
        back(&mut rec, (l, Proj::Gate), &lw.w_gate, tr(Act::X2), tr(Act::Gate), &dx2, false)?;
        back(&mut rec, (l, Proj::Up), &lw.w_up, tr(Act::X2), tr(Act::Up), &dx2, true)?;
        norm_back(&mut rec, &lw.ffn_norm, [tr(Act::HMid), &dx2, &dh], t, d, true)?;
        // Attention block.
        let dy = post_norm_back(&mut rec, lw.post_attn_norm.as_ref(), tr(Act::OPre))?;
        back(&mut rec, (l, Proj::O), &lw.wo, tr(Act::Att), dy, &datt, false)?;
        let shape =
            AttentionShape { n_heads: c.n_heads, n_kv_heads: c.n_kv_heads, head_dim: hd, window: c.layer_window(l), scale: c.attn_scale };
        let grads = AttentionGrads { dq: &dq, dk: &dk, dv: &dv, stats: &stats };
        attention_backward(&mut rec, ctx, &shape, View::new(tr(Act::Q), t, q_dim), kv.layer(l)?, View::new(&datt, t, q_dim), grads)?;
        let rp = c.layer_rope(l, kv.n_ctx());
        let op = RopeOp { rope: &rp, factors: model.weights.rope_factors_in(c, kv.n_ctx()) };
        rope_backward(&mut rec, ctx, op, View::new(&dq, t, q_dim), hd, from)?;
        rope_backward(&mut rec, ctx, op, View::new(&dk, t, kv_dim), hd, from)?;
        let (dq, dk) = match &lw.qk_norm {
            Some([qn, kn]) => {
                norm_back(&mut rec, qn, [tr(Act::QPre), &dq, &dqn], t * c.n_heads, hd, false)?;
                norm_back(&mut rec, kn, [tr(Act::KPre), &dk, &dkn], t * c.n_kv_heads, hd, false)?;
                (&dqn, &dkn)
            }
            None => (&dq, &dk),
        };
        back(&mut rec, (l, Proj::Q), &lw.wq, tr(Act::X1), dq, &dx1, false)?;
        back(&mut rec, (l, Proj::K), &lw.wk, tr(Act::X1), dk, &dx1, true)?;
        back(&mut rec, (l, Proj::V), &lw.wv, tr(Act::X1), &dv, &dx1, true)?;
        norm_back(&mut rec, &lw.attn_norm, [tr(Act::HIn), &dx1, &dh], t, d, true)?;
    }
    rec.submit();
    let losses = read_f32(ctx, &loss_b, 0, n_t)?;
    Ok(losses.iter().sum::<f32>() / n_t as f32)
}

/// Through an RMSNorm of `rows` rows of `n` from float 0: `[x, dy, dx]` are its input, its
/// output's gradient and where the input's gradient goes.
fn norm_backward(
    rec: &mut Recorder,
    model: &Model,
    norm: RmsNorm,
    [x, dy, dx]: [&wgpu::Buffer; 3],
    (rows, n): (usize, usize),
    accumulate: bool,
) -> Result<()> {
    let v = |buf| View::new(buf, rows, n);
    rms_norm_backward(rec, &model.ctx, norm, v(x), v(dy), v(dx), accumulate)
}

impl AdapterTraining {
    /// Zeroed gradients and moments for training `model`'s resident adapters.
    pub fn new(model: &Model) -> Result<Self> {
        Ok(Self { grads: AdapterBuffers::new(model)?, m: AdapterBuffers::new(model)?, v: AdapterBuffers::new(model)? })
    }

    /// One AdamW step of adapter `id` (in place in the model's packs, so the next forward uses
    /// it) with the gradients accumulated here, which are then cleared. `t` counts steps from 1.
    pub fn step(&self, model: &Model, id: AdapterId, opt: &AdamW, t: u64, lr: f32) -> Result<()> {
        let registry = model.registry()?;
        let ranges = registry.ranges(id).ok_or(Error::UnknownAdapter(id))?;
        let (a_pack, b_pack) = registry.packs();
        let mut rec = Recorder::new(&model.ctx);
        let a = AdamTensors { w: a_pack, g: &self.grads.a, m: &self.m.a, v: &self.v.a };
        let b = AdamTensors { w: b_pack, g: &self.grads.b, m: &self.m.b, v: &self.v.b };
        for (x, range) in [a, b].into_iter().zip(ranges) {
            adamw(&mut rec, &model.ctx, opt, x, range, t, lr)?;
        }
        rec.submit();
        for (g, (start, len)) in [&self.grads.a, &self.grads.b].into_iter().zip(ranges) {
            upload(&model.ctx, g, (start * 4) as u64, &vec![0f32; len]);
        }
        Ok(())
    }

    /// Adapter `id`'s optimizer moments: m and v of its A range, then of its B.
    pub fn read_moments(&self, model: &Model, id: AdapterId) -> Result<[Vec<f32>; 4]> {
        let [(a0, an), (b0, bn)] = model.registry()?.ranges(id).ok_or(Error::UnknownAdapter(id))?;
        Ok([
            read_f32(&model.ctx, &self.m.a, a0, an)?,
            read_f32(&model.ctx, &self.v.a, a0, an)?,
            read_f32(&model.ctx, &self.m.b, b0, bn)?,
            read_f32(&model.ctx, &self.v.b, b0, bn)?,
        ])
    }

    /// Put moments read by [`read_moments`](Self::read_moments) back (resuming).
    pub fn write_moments(&self, model: &Model, id: AdapterId, moments: &[Vec<f32>; 4]) -> Result<()> {
        let [(a0, an), (b0, bn)] = model.registry()?.ranges(id).ok_or(Error::UnknownAdapter(id))?;
        let targets = [(&self.m.a, a0, an), (&self.v.a, a0, an), (&self.m.b, b0, bn), (&self.v.b, b0, bn)];
        for ((buf, start, len), data) in targets.into_iter().zip(moments) {
            if data.len() != len {
                return Err(Error::InvalidOption(format!("optimizer moments of {} floats for a range of {len}", data.len())));
            }
            upload(&model.ctx, buf, (start * 4) as u64, data);
        }
        Ok(())
    }
}

impl Model {
    /// The current weights of adapter `id` (engine row order), per targeted (layer, projection).
    pub fn read_adapter_weights(&self, id: AdapterId) -> Result<BTreeMap<(usize, Proj), LoraWeights>> {
        let registry = self.registry()?;
        let (a, b) = registry.packs();
        self.read_packed(&registry, id, a, b)
    }

    fn read_packed(
        &self,
        registry: &AdapterRegistry,
        id: AdapterId,
        a_buf: &wgpu::Buffer,
        b_buf: &wgpu::Buffer,
    ) -> Result<BTreeMap<(usize, Proj), LoraWeights>> {
        registry.check_resident(&[ActiveAdapter::new(id)])?;
        let active = [ActiveAdapter::new(id)];
        let mut out = BTreeMap::new();
        for l in 0..self.config.n_layers {
            for p in Proj::ALL {
                let Some((slots, rank)) = registry.slots(l, p, &active) else { continue };
                let (n, k) = p.shape(&self.config);
                let a = read_f32(&self.ctx, a_buf, slots[0].a_offset, rank * k)?;
                let b = read_f32(&self.ctx, b_buf, slots[0].b_offset, n * rank)?;
                out.insert((l, p), LoraWeights { a, b });
            }
        }
        Ok(out)
    }
}
