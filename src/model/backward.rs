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
use crate::kernels::matmul::{LoraIo, MatmulIo, MAX_SLOTS};
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

/// What a backward pass of `rows` rows writes besides the adapter's gradients: the traced
/// activations and the activation gradients. Every buffer is written before it is read in a
/// pass, except `dh` (zero on rows without a target), which each pass clears.
struct BackwardBuffers {
    trace: ForwardTrace,
    dh: wgpu::Buffer,
    dfin: wgpu::Buffer,
    u: wgpu::Buffer,
    du: wgpu::Buffer,
    dtmp: wgpu::Buffer,
    dg: wgpu::Buffer,
    dx2: wgpu::Buffer,
    datt: wgpu::Buffer,
    dx1: wgpu::Buffer,
    dq: wgpu::Buffer,
    dqn: wgpu::Buffer,
    dk: wgpu::Buffer,
    dkn: wgpu::Buffer,
    dv: wgpu::Buffer,
    stats: wgpu::Buffer,
    /// Slot 0 for every row: the backward's shrinks run one adapter's rows at a time.
    slot0: wgpu::Buffer,
}

impl BackwardBuffers {
    fn new(model: &Model, t: usize, max_rank: usize) -> Self {
        let c = &model.config;
        let f = |name: &str, floats: usize| storage_buffer_zeroed(&model.ctx, name, (t * floats).max(1) as u64 * 4);
        let (d, q_dim, kv_dim) = (c.d_model, c.q_dim(), c.kv_dim());
        Self {
            trace: ForwardTrace::new(model, t),
            dh: f("dh", d),
            dfin: f("dfinal", d),
            u: f("u", max_rank),
            du: f("du", max_rank),
            dtmp: f("dtmp", d),
            dg: f("dg", c.ffn_dim),
            dx2: f("dx2", d),
            datt: f("datt", q_dim),
            dx1: f("dx1", d),
            dq: f("dq", q_dim),
            dqn: f("dqn", q_dim),
            dk: f("dk", kv_dim),
            dkn: f("dkn", kv_dim),
            dv: f("dv", kv_dim),
            stats: f("stats", c.n_heads * 3),
            slot0: f("slot0", 1),
        }
    }
}

/// The buffers of a training pass, kept from one pass to the next (grown when a pass holds more
/// rows or target tokens): allocating them per example cost host time and, with new buffers,
/// new bind groups for every dispatch.
pub(super) struct TrainScratch {
    /// Rows the backward buffers hold (0: none yet; a forward-only pass needs none).
    rows: usize,
    backward: Option<BackwardBuffers>,
    max_rank: usize,
    /// Target tokens the loss buffers hold.
    logit_rows: usize,
    targets: wgpu::Buffer,
    loss: wgpu::Buffer,
}

impl TrainScratch {
    /// Room for `n_t` target tokens, and with `backward` for `t` rows of the backward pass.
    fn ensure<'s>(slot: &'s mut Option<Self>, model: &Model, t: usize, n_t: usize, backward: bool, max_rank: usize) -> &'s mut Self {
        let fits = |s: &Self| s.logit_rows >= n_t && s.max_rank >= max_rank;
        if slot.as_ref().is_none_or(|s| !fits(s)) {
            let f = |name: &str| storage_buffer_zeroed(&model.ctx, name, (n_t.max(1) * 4) as u64);
            *slot = Some(Self { rows: 0, backward: None, max_rank, logit_rows: n_t, targets: f("targets"), loss: f("loss") });
        }
        let s = slot.as_mut().expect("set above");
        if backward && s.rows < t {
            // The smaller buffers go before the larger ones are made.
            s.backward = None;
            s.backward = Some(BackwardBuffers::new(model, t, s.max_rank));
            s.rows = t;
        }
        s
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
/// An example continues in place the kept prefix its own continues whole, or gets a copy of the
/// one that shares the longest beginning with it (cut where they part, in a cache with room for
/// the example) when another shares more or the kept cache is too small; only the positions after
/// it are computed. A kept prefix that another kept one continues is dropped (the longer one gives
/// it back by a copy), so a conversation holds one cache, not one per example; beyond the budget
/// the least recently used prefixes go.
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

    /// Caches holding exactly the prefixes of `wants` (base weights, no adapter), each with room
    /// for its total positions: one cache per example of a pass, never one cache for two. (The
    /// prefixes are computed one after the other, so that one continuing another's conversation
    /// copies its positions instead of computing them again: on a device where a pass costs what
    /// its rows cost, that is what saves time.)
    fn prepare(&mut self, model: &Model, wants: &[(&[u32], usize)]) -> Result<Vec<&KvCache>> {
        self.drop_continued();
        let mut taken: Vec<KeptPrefix> = Vec::with_capacity(wants.len());
        for &(prefix, total) in wants {
            let entry = self.take(model, prefix, total, &taken)?;
            taken.push(entry);
        }
        let first = self.entries.len();
        self.entries.extend(taken);
        Ok(self.entries[first..].iter().map(|e| &e.kv).collect())
    }

    /// Drop every kept prefix that another kept one continues: a copy of the longer one gives it
    /// back without computing (a conversation's examples are nested prefixes; keeping one per
    /// example would crowd other conversations out of the budget).
    fn drop_continued(&mut self) {
        let continued = |e: &KeptPrefix, by: &KeptPrefix| by.tokens.len() > e.tokens.len() && by.tokens.starts_with(&e.tokens);
        let drop: Vec<bool> = self.entries.iter().map(|e| self.entries.iter().any(|by| continued(e, by))).collect();
        let mut drop = drop.into_iter();
        self.entries.retain(|_| !drop.next().unwrap_or(false));
    }

    /// A cache for `prefix` with room for `total` positions, taken out of the kept ones: the kept
    /// prefix it continues whole, unless a longer beginning is shared with another kept prefix or
    /// one of the pass (`taken`), or the kept one has no room for `total`; then a copy of the one
    /// sharing the longest beginning, cut where they part, in a cache with room; else an empty
    /// cache. Then the positions after the shared part computed.
    fn take(&mut self, model: &Model, prefix: &[u32], total: usize, taken: &[KeptPrefix]) -> Result<KeptPrefix> {
        let shared = |e: &KeptPrefix| e.tokens.iter().zip(prefix).take_while(|(a, b)| a == b).count();
        // The longest kept prefix this one continues whole (the most recent on a tie), and the
        // longest beginning shared with any.
        let whole = self.entries.iter().enumerate().filter(|(_, e)| shared(e) == e.tokens.len()).map(|(i, e)| (e.tokens.len(), i)).max();
        let longest = self.entries.iter().chain(taken).map(shared).max().unwrap_or(0);
        let mut entry = match whole {
            // The same conversation further on, continued in place.
            Some((common, i)) if common >= longest && self.entries[i].kv.n_ctx() >= total => self.entries.remove(i),
            _ => {
                // Room in steps of 512 positions, so a slightly longer example does not reallocate.
                let room = total.div_ceil(512) * 512;
                let source = self.entries.iter().chain(taken).rfind(|e| longest > 0 && shared(e) == longest);
                let (common, kv) = match source {
                    // Part of another (or all of one too small to continue in place): a copy of
                    // its positions up to where they part, computed once either way.
                    Some(e) => (longest, e.kv.fork_prefix(&model.ctx, longest, room)?),
                    None => (0, model.new_cache(room)?),
                };
                let per_position = KvCache::bytes_per_position(&model.config);
                let bytes = |entries: &[KeptPrefix]| entries.iter().map(|e| e.kv.n_ctx() as u64 * per_position).sum::<u64>();
                while !self.entries.is_empty() && bytes(&self.entries) + bytes(taken) + kv.n_ctx() as u64 * per_position > self.budget {
                    self.entries.remove(0);
                }
                KeptPrefix { kv, tokens: prefix[..common].to_vec() }
            }
        };
        // Positions past the kept prefix hold an example's adapter rows: never reused.
        let common = shared(&entry);
        entry.kv.truncate(common);
        entry.tokens.truncate(common);
        if common < prefix.len() {
            model.forward(&prefix[common..], &mut entry.kv, Logits::None)?;
            entry.tokens.extend_from_slice(&prefix[common..]);
        }
        self.reused += common;
        self.computed += prefix.len() - common;
        Ok(entry)
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
        Ok(self.add_gradients(model, prefix, &[ExampleRows { tokens, from, targets }], adapter)?[0])
    }

    /// [`add_gradient`](Self::add_gradient) of several examples, their gradients summed: their
    /// active rows side by side in as few passes as fit (256 rows, each example against its own
    /// prefix's cache), so each read of the base weights serves them all. Returns each
    /// example's loss.
    pub fn add_gradients(
        &self,
        model: &Model,
        prefix: &mut PrefixCache,
        examples: &[ExampleRows],
        adapter: ActiveAdapter,
    ) -> Result<Vec<f32>> {
        self.add_gradients_each(model, prefix, examples, &vec![adapter; examples.len()])
    }

    /// [`add_gradients`](Self::add_gradients) with each example under its own adapter
    /// (`adapters[i]` for `examples[i]`), each adapter's gradients added into its own part of
    /// these buffers: several adapters trained in the same passes, each row under its adapter's
    /// slot as inference batches them (at most [`MAX_SLOTS`] adapters a pass), so a set's
    /// adapters share each read of the base weights. Returns each example's loss.
    pub fn add_gradients_each(
        &self,
        model: &Model,
        prefix: &mut PrefixCache,
        examples: &[ExampleRows],
        adapters: &[ActiveAdapter],
    ) -> Result<Vec<f32>> {
        run_examples(&Job { model, grads: Some(self) }, prefix, examples, adapters)
    }
}

/// One training example as a pass takes it: its tokens, the row from which the adapter is active
/// (the frozen prefix before it runs forward only, cached), and the positions whose tokens are
/// its targets (after `from`).
#[derive(Debug, Clone, Copy)]
pub struct ExampleRows<'a> {
    /// The whole sequence.
    pub tokens: &'a [u32],
    /// The first row where the adapter is active.
    pub from: usize,
    /// Positions predicted and scored.
    pub targets: &'a [Range<usize>],
}

impl ExampleRows<'_> {
    /// One past the last row a pass needs: the one before the last target predicts it, so the
    /// rows from the last target on (its own and any after it) feed no loss, and nothing before
    /// them depends on them (causal attention).
    fn end(&self) -> usize {
        self.targets
            .iter()
            .filter(|r| !r.is_empty())
            .map(|r| r.end)
            .max()
            .unwrap_or(0)
            .saturating_sub(1)
            .max(self.from)
            .min(self.tokens.len())
    }

    /// The rows a pass computes for it: those after the prefix, up to its last predicting row.
    fn rows(&self) -> usize {
        self.end().saturating_sub(self.from)
    }

    /// Its rows whose logits are targets, from its first active row: position p is predicted by
    /// row p − 1 − from.
    fn logit_rows(&self) -> Vec<(usize, usize)> {
        self.targets.iter().filter(|r| !r.is_empty()).map(|r| (r.start - 1 - self.from, r.len())).collect()
    }

    /// Target tokens.
    fn n_targets(&self) -> usize {
        self.targets.iter().map(|r| r.len()).sum()
    }

    fn check(&self, max_rows: usize, logit_cap: usize) -> Result<()> {
        let n = self.tokens.len();
        if self.n_targets() == 0 || self.targets.iter().any(|r| r.start <= self.from || r.end > n) {
            return Err(Error::InvalidOption(format!(
                "targets {:?} must lie in {}..{n}, after the activation point",
                self.targets,
                self.from + 1
            )));
        }
        // Each target row once: a pass packs the target rows' gradients into its rows.
        let mut ranges: Vec<&Range<usize>> = self.targets.iter().filter(|r| !r.is_empty()).collect();
        ranges.sort_by_key(|r| r.start);
        if ranges.windows(2).any(|w| w[1].start < w[0].end) {
            return Err(Error::InvalidOption(format!("targets {:?} overlap: each position is a target once", self.targets)));
        }
        let t = self.rows();
        if t > max_rows {
            return Err(Error::InvalidOption(format!(
                "{t} rows from the activation point to the last target; a training example needs 1 to {max_rows}"
            )));
        }
        if self.n_targets() > logit_cap {
            return Err(Error::InvalidOption(format!(
                "{} target tokens in one example; at most {logit_cap} fit one pass",
                self.n_targets()
            )));
        }
        Ok(())
    }
}

impl Model {
    /// Whether a training pass can take `example`: its active rows and target tokens fit one
    /// pass, its targets lie after its activation point.
    pub fn check_example(&self, example: &ExampleRows) -> Result<()> {
        example.check(self.max_batch, self.logit_cap())
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
    Ok(example_losses(model, prefix, &[ExampleRows { tokens, from, targets }], adapter)?[0])
}

/// [`example_loss`] of several examples, in as few passes as fit.
pub fn example_losses(model: &Model, prefix: &mut PrefixCache, examples: &[ExampleRows], adapter: ActiveAdapter) -> Result<Vec<f32>> {
    run_examples(&Job { model, grads: None }, prefix, examples, &vec![adapter; examples.len()])
}

/// What passes over examples compute: losses, and with `grads` the adapters' gradients.
struct Job<'a> {
    model: &'a Model,
    grads: Option<&'a AdapterBuffers>,
}

/// Each example's loss under its adapter, and with `grads` the gradients added into them: the
/// examples grouped by adapter (so each adapter's rows of a pass lie together), then packed in
/// that order into passes of at most a chunk's rows, a logit buffer's target tokens and
/// [`MAX_SLOTS`] adapters.
fn run_examples(job: &Job, prefix: &mut PrefixCache, examples: &[ExampleRows], adapters: &[ActiveAdapter]) -> Result<Vec<f32>> {
    let model = job.model;
    if adapters.len() != examples.len() {
        return Err(Error::InvalidOption(format!("{} examples with {} adapters: one adapter each", examples.len(), adapters.len())));
    }
    let logit_cap = model.logit_cap();
    examples.iter().try_for_each(|e| e.check(model.max_batch, logit_cap))?;
    let mut distinct: Vec<ActiveAdapter> = Vec::new();
    for a in adapters {
        if !distinct.contains(a) {
            distinct.push(*a);
        }
    }
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| distinct.iter().position(|a| *a == adapters[i]));
    let mut losses = vec![0.0; examples.len()];
    let mut first = 0;
    while first < order.len() {
        let (mut rows, mut n_t, mut end, mut slots) = (0, 0, first, 0);
        while end < order.len() {
            let (e, new_slot) = (&examples[order[end]], end == first || adapters[order[end]] != adapters[order[end - 1]]);
            if rows + e.rows() > model.max_batch || n_t + e.n_targets() > logit_cap || (new_slot && slots == MAX_SLOTS) {
                break;
            }
            (rows, n_t, slots) = (rows + e.rows(), n_t + e.n_targets(), slots + new_slot as usize);
            end += 1;
        }
        let pass: Vec<ExampleRows> = order[first..end].iter().map(|&i| examples[i]).collect();
        let pass_adapters: Vec<ActiveAdapter> = order[first..end].iter().map(|&i| adapters[i]).collect();
        for (&i, loss) in order[first..end].iter().zip(run_pass(job, prefix, &pass, &pass_adapters)?) {
            losses[i] = loss;
        }
        first = end;
    }
    Ok(losses)
}

/// One pass over examples that fit it together, each under its adapter (`adapters`, each
/// adapter's examples together): forward (traced with `grads`), the loss, and with `grads` the
/// backward into them.
fn run_pass(job: &Job, prefix: &mut PrefixCache, examples: &[ExampleRows], adapters: &[ActiveAdapter]) -> Result<Vec<f32>> {
    let &Job { model, grads } = job;
    let (c, ctx) = (&model.config, &*model.ctx);
    let t: usize = examples.iter().map(|e| e.rows()).sum();
    // Each example's first row in the pass, and the pass's rows whose logits are targets.
    let row0: Vec<usize> = examples.iter().scan(0, |at, e| Some(std::mem::replace(at, *at + e.rows()))).collect();
    let logit_rows: Vec<(usize, usize)> =
        examples.iter().zip(&row0).flat_map(|(e, &r0)| e.logit_rows().into_iter().map(move |(r, n)| (r0 + r, n))).collect();
    let n_t: usize = examples.iter().map(|e| e.n_targets()).sum();
    let wants: Vec<(&[u32], usize)> = examples.iter().map(|e| (&e.tokens[..e.from], e.tokens.len())).collect();
    // The pass's adapters (its slots), and the rows each one runs under.
    let mut active: Vec<ActiveAdapter> = Vec::new();
    let mut groups: Vec<(ActiveAdapter, Range<usize>)> = Vec::new();
    for ((e, &r0), a) in examples.iter().zip(&row0).zip(adapters) {
        if !active.contains(a) {
            active.push(*a);
        }
        match groups.last_mut() {
            Some((last, rows)) if last == a => rows.end = r0 + e.rows(),
            _ => groups.push((*a, r0..r0 + e.rows())),
        }
    }
    let registry = model.registry()?;
    registry.check_resident(&active)?;
    let kvs = prefix.prepare(model, &wants)?;
    let (d, q_dim, kv_dim, ffn, hd) = (c.d_model, c.q_dim(), c.kv_dim(), c.ffn_dim, c.head_dim);
    let max_rank = registry.limits().max_rank;
    let mut guard = model.scratch.lock().map_err(|_| Error::poisoned("scratch"))?;
    if guard.as_ref().is_none_or(|s| s.tokens < t) {
        *guard = Some(Scratch::new(model, model.max_batch, model.logit_cap(), max_rank));
    }
    let s = guard.as_ref().expect("scratch allocated above");
    let mut train_guard = model.train_scratch.lock().map_err(|_| Error::poisoned("training scratch"))?;
    let ts = TrainScratch::ensure(&mut train_guard, model, t, n_t, grads.is_some(), max_rank);
    let ids: Vec<u32> = examples.iter().flat_map(|e| e.tokens[e.from..e.end()].iter().copied()).collect();
    upload(ctx, &s.ids, 0, &ids);
    let row_slot: Vec<i32> = groups
        .iter()
        .flat_map(|(a, rows)| std::iter::repeat_n(active.iter().position(|x| x == a).unwrap_or(0) as i32, rows.len()))
        .collect();
    upload(ctx, &s.row_slot, 0, &row_slot);
    let lora = ChunkLora { registry: &registry, active: &active, row_slot: &s.row_slot, u: &s.lora_u, u_up: &s.lora_u_up };
    let mut rec = Recorder::new(ctx);
    let segs: Vec<Segment> =
        kvs.iter().zip(examples.iter().zip(&row0)).map(|(kv, (e, &row0))| Segment { kv, row0, len: e.rows() }).collect();
    let chunk = Chunk { s, segs: &segs, logit_rows: &logit_rows, lora: Some(&lora), tree: None };
    let backward = ts.backward.as_mut().filter(|_| grads.is_some());
    let mut no_tap = NoTap;
    let tap: &mut dyn Tap = match backward {
        Some(b) => &mut b.trace,
        None => &mut no_tap,
    };
    model.record_chunk(&mut rec, &chunk, tap)?;

    // Loss: the target rows' logits become their gradients (of each example's mean) in place.
    let target_tokens: Vec<u32> = examples.iter().flat_map(|e| e.targets.iter().flat_map(|r| r.clone()).map(|p| e.tokens[p])).collect();
    upload(ctx, &ts.targets, 0, &target_tokens);
    let logits = View::new(&s.logits, n_t, c.n_vocab);
    let mut packed = 0;
    for e in examples {
        let n = e.n_targets();
        cross_entropy(&mut rec, ctx, logits.rows(packed, n), &ts.targets, &ts.loss, 1.0 / n as f32)?;
        packed += n;
    }
    let per_example_loss = |rec: Recorder| -> Result<Vec<f32>> {
        rec.submit();
        let losses = read_f32(ctx, &ts.loss, 0, n_t)?;
        let mut at = 0;
        Ok(examples
            .iter()
            .map(|e| {
                let n = e.n_targets();
                at += n;
                losses[at - n..at].iter().sum::<f32>() / n as f32
            })
            .collect())
    };
    let (Some(grads), Some(b)) = (grads, ts.backward.as_ref()) else {
        return per_example_loss(rec);
    };
    let trace = &b.trace;
    // The forward runs while the backward is recorded (the losses are read after both).
    rec.submit();
    let mut rec = Recorder::new(ctx);

    // Back through the output projection and final norm into dh (zero on non-target rows). One
    // product for every target row (each pass over the LM head serves them all), packed as the
    // logits are (in `dtmp`), then copied to the rows they belong to.
    upload(ctx, &b.dh, 0, &vec![0f32; t * d]);
    let out_norm = RmsNorm { w: &model.weights.out_norm, eps: c.norm_eps };
    matmul_t(&mut rec, ctx, model.weights.output(), logits.rows(0, n_t), View::new(&b.dtmp, t, d).rows(0, n_t), false)?;
    let mut packed = 0;
    for &(r, n) in &logit_rows {
        rec.copy(&b.dtmp, (packed * d * 4) as u64, &b.dfin, (r * d * 4) as u64, (n * d * 4) as u64);
        let rows = |buf| View::new(buf, t, d).rows(r, n);
        rms_norm_backward(&mut rec, ctx, out_norm, rows(&trace.h_final), rows(&b.dfin), rows(&b.dh), false)?;
        packed += n;
    }

    let (a_pack, b_pack) = registry.packs();
    // Through one frozen projection `y = W·x` (+ each row's adapter where it targets (l, p)): dx,
    // and each adapter's dA and dB from its own rows.
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
        for (adapter, rows) in &groups {
            let Some((slots, rank)) = registry.slots(l, p, std::slice::from_ref(adapter)) else { continue };
            let slot = slots[0];
            let (x, dy, dx) = (x.rows(rows.start, rows.len()), dy.rows(rows.start, rows.len()), dx.rows(rows.start, rows.len()));
            // u = A·x again (cheaper to recompute at rank r than to keep).
            let lora = LoraIo { a_pack, b_pack, row_slot: &b.slot0, u: &b.u, max_rank: rank, slots: &slots, u_splits: None };
            lora_shrink(rec, ctx, &MatmulIo { lora: Some(lora), ..MatmulIo::new(x, dx) })?;
            let matrix = |buf, offset, rows, cols| View { offset, ..View::new(buf, rows, cols) };
            let io = LoraBackward {
                x,
                dy,
                dx,
                a: matrix(a_pack, slot.a_offset, rank, k),
                b: matrix(b_pack, slot.b_offset, n, rank),
                u: &b.u,
                du: &b.du,
                da: matrix(&grads.a, slot.a_offset, rank, k),
                db: matrix(&grads.b, slot.b_offset, n, rank),
                scale: slot.scale,
                accumulate: true,
            };
            lora_backward(rec, ctx, &io)?;
        }
        Ok(())
    };
    let norm_back = |rec: &mut Recorder, w: &wgpu::Buffer, xs: [&wgpu::Buffer; 3], rows: usize, n: usize, accumulate: bool| {
        norm_backward(rec, model, RmsNorm { w, eps: c.norm_eps }, xs, (rows, n), accumulate)
    };
    // A block's output gradient: dh itself, or through the block's post-norm (gemma3) of
    // its pre-norm output `x`.
    let post_norm_back = |rec: &mut Recorder, norm: Option<&wgpu::Buffer>, x: &wgpu::Buffer| -> Result<&wgpu::Buffer> {
        match norm {
            Some(pn) => norm_back(rec, pn, [x, &b.dh, &b.dtmp], t, d, false).map(|_| &b.dtmp),
            None => Ok(&b.dh),
        }
    };
    for (l, lw) in model.weights.layers.iter().enumerate().rev() {
        let tr = |act| trace.get(l, act);
        // Feed-forward block.
        let dy = post_norm_back(&mut rec, lw.post_ffn_norm.as_ref(), tr(Act::YPre))?;
        back(&mut rec, (l, Proj::Down), &lw.w_down, tr(Act::G), dy, &b.dg, false)?;
        glu_backward(&mut rec, ctx, c.act, tr(Act::Gate), tr(Act::Up), &b.dg, t * ffn)?;
        back(&mut rec, (l, Proj::Gate), &lw.w_gate, tr(Act::X2), tr(Act::Gate), &b.dx2, false)?;
        back(&mut rec, (l, Proj::Up), &lw.w_up, tr(Act::X2), tr(Act::Up), &b.dx2, true)?;
        norm_back(&mut rec, &lw.ffn_norm, [tr(Act::HMid), &b.dx2, &b.dh], t, d, true)?;
        // Attention block: each example against its own cache, its rows rotated from its place.
        let dy = post_norm_back(&mut rec, lw.post_attn_norm.as_ref(), tr(Act::OPre))?;
        back(&mut rec, (l, Proj::O), &lw.wo, tr(Act::Att), dy, &b.datt, false)?;
        let shape =
            AttentionShape { n_heads: c.n_heads, n_kv_heads: c.n_kv_heads, head_dim: hd, window: c.layer_window(l), scale: c.attn_scale };
        for ((e, &r0), kv) in examples.iter().zip(&row0).zip(&kvs) {
            let rows = |buf, cols| View::new(buf, t, cols).rows(r0, e.rows());
            let grads = AttentionGrads { dq: &b.dq, dk: &b.dk, dv: &b.dv, stats: &b.stats };
            attention_backward(&mut rec, ctx, &shape, rows(tr(Act::Q), q_dim), kv.layer(l)?, rows(&b.datt, q_dim), grads)?;
            let rp = c.layer_rope(l, kv.n_ctx());
            let op = RopeOp { rope: &rp, factors: model.weights.rope_factors_in(c, kv.n_ctx()) };
            rope_backward(&mut rec, ctx, op, rows(&b.dq, q_dim), hd, e.from)?;
            rope_backward(&mut rec, ctx, op, rows(&b.dk, kv_dim), hd, e.from)?;
        }
        let (dq, dk) = match &lw.qk_norm {
            Some([qn, kn]) => {
                norm_back(&mut rec, qn, [tr(Act::QPre), &b.dq, &b.dqn], t * c.n_heads, hd, false)?;
                norm_back(&mut rec, kn, [tr(Act::KPre), &b.dk, &b.dkn], t * c.n_kv_heads, hd, false)?;
                (&b.dqn, &b.dkn)
            }
            None => (&b.dq, &b.dk),
        };
        back(&mut rec, (l, Proj::Q), &lw.wq, tr(Act::X1), dq, &b.dx1, false)?;
        back(&mut rec, (l, Proj::K), &lw.wk, tr(Act::X1), dk, &b.dx1, true)?;
        back(&mut rec, (l, Proj::V), &lw.wv, tr(Act::X1), &b.dv, &b.dx1, true)?;
        norm_back(&mut rec, &lw.attn_norm, [tr(Act::HIn), &b.dx1, &b.dh], t, d, true)?;
    }
    per_example_loss(rec)
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

#[cfg(test)]
mod tests {
    use super::ExampleRows;

    /// A pass takes the rows up to the one before the last target; an example whose activation
    /// point or targets lie outside its tokens is refused, not a panic.
    #[test]
    #[allow(clippy::single_range_in_vec_init)] // lists of target ranges, some of one range
    fn rows_end_before_the_last_target_and_bad_examples_are_refused() {
        let tokens = [7u32; 12];
        let ok = ExampleRows { tokens: &tokens, from: 4, targets: &[6..8, 9..10, 11..11] };
        assert_eq!((ok.end(), ok.rows(), ok.logit_rows()), (9, 5, vec![(1, 2), (4, 1)]));
        assert!(ok.check(256, 64).is_ok());
        assert!(ok.check(4, 64).unwrap_err().to_string().contains("5 rows from the activation point"));
        let bad: [(usize, &[std::ops::Range<usize>]); 6] =
            [(20, &[21..22]), (4, &[2..6]), (4, &[6..13]), (4, &[]), (4, &[8..8]), (4, &[6..9, 8..10])];
        for (from, targets) in bad {
            let bad = ExampleRows { tokens: &tokens, from, targets };
            assert!(bad.check(256, 64).is_err(), "from {from}, targets {targets:?}");
            assert!(bad.rows() <= tokens.len());
        }
    }
}
