//! Architectures from GGUF metadata and the forward pass on the GPU.
//!
//! A [`Model`] is immutable once loaded: the KV cache is an explicit argument of every forward
//! call, so several conversations can share one model.

mod backward;
mod config;
mod gemma3;
mod llama;
mod qwen2;
mod qwen3;
mod weights;

pub use backward::{AdapterBuffers, AdapterTraining, PrefixCache};
pub use weights::{LayerWeights, Weights};

use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::gpu::{read_f32, read_u32, storage_buffer_zeroed, upload, GpuContext, Recorder, WeightMatrix};
use crate::hparams::ModelConfig;
use crate::kernels::attention::{attention, AttentionShape};
use crate::kernels::elementwise::{add_rows, glu};
use crate::kernels::lora::{lora_expand, lora_shrink};
use crate::kernels::matmul::{matmul, matmul_gated, GatedUp, LoraIo, LoraSlot, MatmulIo, RowNorm, MAX_SLOTS};
use crate::kernels::norm::{rms_norm, rms_norm_inplace, Rows};
use crate::kernels::sample::SamplerConfig;
use crate::kernels::sample::{argmax, sample, OUT_WORDS};
use crate::kernels::{embed::embed, kv_store::kv_store, rope::rope};
use crate::kv::KvCache;
use crate::lora::{ActiveAdapter, AdapterId, AdapterInfo, AdapterRegistry, LoraAdapter, LoraLimits, Proj};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Which logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None: only fill the KV cache.
    None,
    /// The last token's.
    Last,
    /// Every token's, in order.
    All,
}

/// How the next token is chosen on the GPU.
#[derive(Debug, Clone, Copy)]
pub enum Pick {
    /// The largest logit.
    Greedy,
    /// A draw with this configuration (top-k in 1..=64) and uniform number in [0, 1).
    Sample(SamplerConfig, f32),
}

/// How adapter deltas are added to a projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum LoraMode {
    /// The expand inside the base matrix kernel: base weights read once, one dispatch.
    Fused,
    /// The expand as a dispatch of its own after the base product (for comparison).
    Separate,
}

impl LoraMode {
    /// `AGENTFLUX_LORA=separate` selects [`LoraMode::Separate`]; anything else is fused.
    fn from_env() -> Self {
        match std::env::var("AGENTFLUX_LORA").as_deref() {
            Ok("separate") => LoraMode::Separate,
            _ => LoraMode::Fused,
        }
    }
}

/// Tokens processed per submission during prefill.
const DEFAULT_MAX_BATCH: usize = 256;

/// One sequence of a forward call: its cache, its new tokens, and the adapter applied to them.
pub struct Sequence<'a> {
    /// Its KV cache; the tokens are appended at its end.
    pub kv: &'a mut KvCache,
    /// The new tokens.
    pub tokens: &'a [u32],
    /// The adapter applied to `tokens[adapter_from..]`; earlier rows use the base weights (an
    /// activated LoRA before its invocation). `None`: the base weights throughout.
    pub adapter: Option<ActiveAdapter>,
    /// First row of `tokens` the adapter applies to.
    pub adapter_from: usize,
    /// A token tree instead of a sequence: per token, the index of its parent among `tokens`
    /// (−1: a root, continuing the cached prefix). Each token then sits at position
    /// `cache length + depth` and attends to the cached prefix and its own ancestors only, so
    /// many candidate continuations sharing prefixes are scored in one pass. The tokens still
    /// take cache rows, one each; truncate the cache back afterwards. One sequence per call.
    pub tree: Option<&'a [i32]>,
}

impl<'a> Sequence<'a> {
    /// `tokens` through the base weights.
    pub fn base(kv: &'a mut KvCache, tokens: &'a [u32]) -> Self {
        Self { kv, tokens, adapter: None, adapter_from: 0, tree: None }
    }

    /// `tokens` with `adapter` applied from row `from` on.
    pub fn adapted(kv: &'a mut KvCache, tokens: &'a [u32], adapter: Option<ActiveAdapter>, from: usize) -> Self {
        Self { kv, tokens, adapter, adapter_from: from, tree: None }
    }

    /// The tokens as a token tree with these parents (see [`Sequence::tree`]).
    pub fn with_tree(self, parents: &'a [i32]) -> Self {
        Self { tree: Some(parents), ..self }
    }
}

/// Per token of a tree: (parent, depth), checking that parents come first.
fn tree_rows(parents: &[i32], n_tokens: usize) -> Result<Vec<[i32; 2]>> {
    if parents.len() != n_tokens {
        return Err(Error::InvalidOption(format!("a token tree of {} parents for {n_tokens} tokens", parents.len())));
    }
    let mut rows: Vec<[i32; 2]> = Vec::with_capacity(n_tokens);
    for (t, &p) in parents.iter().enumerate() {
        let depth = match p {
            -1 => 0,
            p if p >= 0 && (p as usize) < t => rows[p as usize][1] + 1,
            _ => return Err(Error::InvalidOption(format!("token tree: token {t} has parent {p}; parents must be −1 or an earlier token"))),
        };
        rows.push([p, depth]);
    }
    Ok(rows)
}

/// Activation buffers of one forward chunk, reused across calls.
struct Scratch {
    tokens: usize,
    ids: wgpu::Buffer,
    h: wgpu::Buffer,
    xn: wgpu::Buffer,
    /// Queries, keys and values ([`QkvRows`] says where).
    qkv: wgpu::Buffer,
    attn: wgpu::Buffer,
    tmp: wgpu::Buffer,
    gate: wgpu::Buffer,
    up: wgpu::Buffer,
    logits: wgpu::Buffer,
    picked: wgpu::Buffer,
    row_slot: wgpu::Buffer,
    tree: wgpu::Buffer,
    lora_u: wgpu::Buffer,
    lora_u_up: wgpu::Buffer,
}

/// Where a chunk's queries, keys and values lie in the scratch buffer: interleaved (each token's
/// q, k and v rows side by side, as the stacked product writes them) or in three dense regions
/// (what the training trace copies, and what per-head norms need: a chunk's heads as one run of
/// rows).
struct QkvRows<'a> {
    q: Rows<'a>,
    k: Rows<'a>,
    v: Rows<'a>,
    interleaved: bool,
}

impl<'a> QkvRows<'a> {
    fn new(c: &ModelConfig, buf: &'a wgpu::Buffer, t: usize, interleaved: bool) -> Self {
        let (q, kv) = (c.q_dim(), c.kv_dim());
        let rows = |offset, stride| Rows { buf, offset, stride };
        if interleaved {
            let stride = q + 2 * kv;
            Self { q: rows(0, stride), k: rows(q, stride), v: rows(q + kv, stride), interleaved }
        } else {
            Self { q: rows(0, q), k: rows(t * q, kv), v: rows(t * (q + kv), kv), interleaved }
        }
    }
}

/// One sequence's rows in a chunk: batch rows `row0..row0 + len`, appended to `kv`.
struct Segment<'k> {
    kv: &'k KvCache,
    row0: usize,
    len: usize,
}

/// The adapters of one chunk: which are active, and the per-row slot buffer.
struct ChunkLora<'r> {
    registry: &'r AdapterRegistry,
    active: &'r [ActiveAdapter],
    row_slot: &'r wgpu::Buffer,
    u: &'r wgpu::Buffer,
    /// The up projection's shrink when it runs fused with the gate's (see `Model::gated_ffn`).
    u_up: &'r wgpu::Buffer,
}

/// A loaded model: configuration, GPU weights, and the adapters resident beside them.
pub struct Model {
    /// Hyperparameters.
    pub config: ModelConfig,
    /// GPU weights.
    pub weights: Weights,
    ctx: Arc<GpuContext>,
    path: PathBuf,
    max_batch: usize,
    scratch: Mutex<Option<Scratch>>,
    adapters: RwLock<AdapterRegistry>,
    lora_mode: LoraMode,
}

impl Model {
    /// Load the weights of a GGUF file onto `ctx`'s device.
    pub fn load(ctx: Arc<GpuContext>, file: &GgufFile) -> Result<Self> {
        Self::load_with_limits(ctx, file, LoraLimits::default())
    }

    /// Load with explicit adapter limits.
    pub fn load_with_limits(ctx: Arc<GpuContext>, file: &GgufFile, limits: LoraLimits) -> Result<Self> {
        let config = ModelConfig::from_gguf(file)?;
        let weights = Weights::load(&ctx, file, &config)?;
        tracing::info!(arch = ?config.arch, layers = config.n_layers, bytes = weights.n_bytes(), "model loaded");
        let adapters = RwLock::new(AdapterRegistry::new(&ctx, config.n_layers, limits));
        Ok(Self {
            config,
            weights,
            ctx,
            path: file.path().to_path_buf(),
            max_batch: DEFAULT_MAX_BATCH,
            scratch: Mutex::new(None),
            adapters,
            lora_mode: LoraMode::from_env(),
        })
    }

    /// The GGUF file this model came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GPU context the model lives on.
    pub fn ctx(&self) -> &Arc<GpuContext> {
        &self.ctx
    }

    /// A KV cache for `n_ctx` positions of this model.
    pub fn new_cache(&self, n_ctx: usize) -> Result<KvCache> {
        KvCache::new(&self.ctx, &self.config, n_ctx)
    }

    /// Choose how adapter deltas are computed (default: fused, or `AGENTFLUX_LORA`).
    pub fn set_lora_mode(&mut self, mode: LoraMode) {
        self.lora_mode = mode;
    }

    fn registry(&self) -> Result<RwLockReadGuard<'_, AdapterRegistry>> {
        self.adapters.read().map_err(|_| Error::poisoned("adapter registry"))
    }

    fn registry_mut(&self) -> Result<RwLockWriteGuard<'_, AdapterRegistry>> {
        self.adapters.write().map_err(|_| Error::poisoned("adapter registry"))
    }

    /// Check `adapter` against this model and make it resident under `name`. A refused adapter
    /// leaves the others serving.
    pub fn add_adapter(&self, name: &str, adapter: &LoraAdapter) -> Result<AdapterId> {
        Ok(self.registry_mut()?.add(&self.ctx, name, adapter, &self.config)?)
    }

    /// Load a PEFT adapter directory (see [`crate::lora`]) and make it resident.
    pub fn load_adapter(&self, dir: impl AsRef<Path>) -> Result<AdapterId> {
        let limits = *self.registry()?.limits();
        let adapter = LoraAdapter::load_peft(dir.as_ref(), &self.config, &limits)?;
        self.add_adapter(&dir.as_ref().display().to_string(), &adapter)
    }

    /// Free a resident adapter's GPU memory.
    pub fn remove_adapter(&self, id: AdapterId) -> Result<()> {
        self.registry_mut()?.remove(&self.ctx, id)
    }

    /// Name, rank, scale and invocation sequence of a resident adapter.
    pub fn adapter_info(&self, id: AdapterId) -> Result<AdapterInfo> {
        self.registry()?.info(id).cloned().ok_or(Error::UnknownAdapter(id))
    }

    /// Every resident adapter, and the GPU bytes their packs hold.
    pub fn adapters(&self) -> Result<(Vec<AdapterId>, u64)> {
        let r = self.registry()?;
        Ok((r.ids().collect(), r.n_bytes()))
    }

    /// Process `tokens` at the cache's current end with the base weights and return the logits
    /// `want` asks for (`n_vocab` floats per row).
    pub fn forward(&self, tokens: &[u32], kv: &mut KvCache, want: Logits) -> Result<Vec<f32>> {
        self.forward_seqs(&mut [Sequence::base(kv, tokens)], want)
    }

    /// Process several sequences in one pass — each with its own cache and adapter, all sharing
    /// each read of the base weights — and return the logits `want` asks for, sequence after
    /// sequence. Several sequences must fit one pass together (256 rows).
    pub fn forward_seqs(&self, seqs: &mut [Sequence], want: Logits) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        self.run(seqs, want, None, &mut out)?;
        Ok(out)
    }

    /// Process `tokens` and return the id of the largest last-token logit, computed on the GPU
    /// (only the id is read back).
    pub fn forward_greedy(&self, tokens: &[u32], kv: &mut KvCache) -> Result<u32> {
        self.next_token(&mut Sequence::base(kv, tokens), Pick::Greedy)
    }

    /// Process `tokens` and draw the next token on the GPU with `cfg` (top-k in 1..=64) and the
    /// uniform number `u` (see [`crate::decode::draw`], the same rule on the host).
    pub fn forward_sample(&self, tokens: &[u32], kv: &mut KvCache, cfg: &SamplerConfig, u: f32) -> Result<u32> {
        self.next_token(&mut Sequence::base(kv, tokens), Pick::Sample(*cfg, u))
    }

    /// Process one sequence and choose its next token on the GPU.
    pub fn next_token(&self, seq: &mut Sequence, pick: Pick) -> Result<u32> {
        let ids = self.run(std::slice::from_mut(seq), Logits::Last, Some(pick), &mut Vec::new())?;
        ids.first().copied().ok_or_else(|| Error::Gpu("token choice produced no token".into()))
    }

    /// Process several sequences in one pass and choose each one's next token greedily on the GPU.
    pub fn next_tokens_greedy(&self, seqs: &mut [Sequence]) -> Result<Vec<u32>> {
        self.run(seqs, Logits::Last, Some(Pick::Greedy), &mut Vec::new())
    }

    fn check_seqs(&self, seqs: &[Sequence]) -> Result<()> {
        let n_vocab = self.config.n_vocab;
        if seqs.is_empty() {
            return Err(Error::InvalidOption("forward called with no sequence".into()));
        }
        for s in seqs {
            if s.tokens.is_empty() {
                return Err(Error::InvalidOption("forward called with no tokens".into()));
            }
            if let Some(&id) = s.tokens.iter().find(|&&t| t as usize >= n_vocab) {
                return Err(Error::BadToken { id, n_vocab });
            }
            if s.kv.layers.len() != self.config.n_layers {
                return Err(Error::InvalidOption(format!(
                    "a KV cache of {} layers used with a model of {}",
                    s.kv.layers.len(),
                    self.config.n_layers
                )));
            }
            s.kv.reserve(s.tokens.len())?;
        }
        Ok(())
    }

    fn run(&self, seqs: &mut [Sequence], want: Logits, pick: Option<Pick>, out: &mut Vec<f32>) -> Result<Vec<u32>> {
        self.check_seqs(seqs)?;
        let n_vocab = self.config.n_vocab;
        let registry = self.registry()?;
        let mut active: Vec<ActiveAdapter> = Vec::new();
        for a in seqs.iter().filter_map(|s| s.adapter) {
            if !active.contains(&a) {
                active.push(a);
            }
        }
        if active.len() > MAX_SLOTS {
            return Err(Error::InvalidOption(format!("{} different adapters in one batch, at most {MAX_SLOTS}", active.len())));
        }
        registry.check_resident(&active)?;
        let tree = match seqs.iter().position(|s| s.tree.is_some()) {
            None => None,
            Some(_) if seqs.len() > 1 => return Err(Error::InvalidOption("a token tree takes a call of its own".into())),
            Some(_) if seqs[0].tokens.len() > self.max_batch => {
                return Err(Error::InvalidOption(format!(
                    "a token tree of {} tokens; at most {} fit one pass",
                    seqs[0].tokens.len(),
                    self.max_batch
                )));
            }
            Some(_) => Some(tree_rows(seqs[0].tree.unwrap_or_default(), seqs[0].tokens.len())?),
        };
        if matches!(pick, Some(Pick::Sample(..))) && seqs.len() > 1 {
            return Err(Error::InvalidOption("GPU sampling takes one sequence at a time".into()));
        }
        let logit_cap = ((self.ctx.max_binding() as usize / (n_vocab * 4)).max(1)).min(self.max_batch);
        let chunk = if want == Logits::All { logit_cap } else { self.max_batch };
        let total: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        if seqs.len() > 1 && (total > chunk || seqs.len() > logit_cap) {
            return Err(Error::InvalidOption(format!(
                "a batch of {} sequences holds {total} tokens; at most {chunk} fit one pass",
                seqs.len()
            )));
        }
        // Chunks of (sequence, first token, tokens): one sequence may span several passes,
        // several sequences share one.
        let chunks: Vec<Vec<(usize, usize, usize)>> = if seqs.len() == 1 {
            (0..total).step_by(chunk).map(|at| vec![(0, at, chunk.min(total - at))]).collect()
        } else {
            vec![seqs.iter().enumerate().map(|(i, s)| (i, 0, s.tokens.len())).collect()]
        };
        let mut guard = self.scratch.lock().map_err(|_| Error::poisoned("scratch"))?;
        let need = total.min(chunk);
        if guard.as_ref().is_none_or(|s| s.tokens < need) {
            *guard = Some(self.alloc_scratch(need, logit_cap, registry.limits().max_rank));
        }
        let s = guard.as_ref().expect("scratch allocated above");
        let mut picked = Vec::new();
        for parts in &chunks {
            let mut ids = Vec::new();
            let mut slots = Vec::new();
            // (batch row, rows) of the logits wanted from this chunk.
            let mut logit_rows = Vec::new();
            for &(i, at, len) in parts {
                let seq = &seqs[i];
                let row0 = ids.len();
                ids.extend_from_slice(&seq.tokens[at..at + len]);
                let slot = seq.adapter.and_then(|a| active.iter().position(|x| *x == a)).map_or(-1, |p| p as i32);
                slots.extend((at..at + len).map(|j| if j >= seq.adapter_from { slot } else { -1 }));
                match want {
                    Logits::All => logit_rows.push((row0, len)),
                    Logits::Last if at + len == seq.tokens.len() => logit_rows.push((row0 + len - 1, 1)),
                    _ => {}
                }
            }
            upload(&self.ctx, &s.ids, 0, &ids);
            let lora = slots.iter().any(|&v| v >= 0).then(|| {
                upload(&self.ctx, &s.row_slot, 0, &slots);
                ChunkLora { registry: &registry, active: &active, row_slot: &s.row_slot, u: &s.lora_u, u_up: &s.lora_u_up }
            });
            if let Some(rows) = &tree {
                upload(&self.ctx, &s.tree, 0, rows);
            }
            let mut rec = Recorder::new(&self.ctx);
            let segs: Vec<Segment> = {
                let mut row0 = 0;
                parts
                    .iter()
                    .map(|&(i, _, len)| {
                        let g = Segment { kv: &*seqs[i].kv, row0, len };
                        row0 += len;
                        g
                    })
                    .collect()
            };
            self.record_chunk(&mut rec, s, &segs, &logit_rows, lora.as_ref(), tree.as_ref().map(|_| &s.tree), None)?;
            let n_rows: usize = logit_rows.iter().map(|r| r.1).sum();
            match pick {
                Some(Pick::Greedy) if n_rows > 0 => argmax(&mut rec, &self.ctx, &s.logits, 0, n_vocab, n_rows, &s.picked)?,
                Some(Pick::Sample(cfg, u)) if n_rows > 0 => {
                    sample(&mut rec, &self.ctx, &s.logits, 0, n_vocab, cfg.top_k, cfg.temperature, cfg.top_p, u, &s.picked)?
                }
                _ => {}
            }
            rec.submit();
            for &(i, _, len) in parts {
                seqs[i].kv.advance(len);
            }
            if n_rows == 0 {
                continue;
            }
            if pick.is_some() {
                let words = read_u32(&self.ctx, &s.picked, 0, n_rows * OUT_WORDS)?;
                for r in 0..n_rows {
                    let id = words[r * OUT_WORDS];
                    if id as usize >= n_vocab {
                        return Err(Error::Gpu("every logit is NaN or -inf".into()));
                    }
                    picked.push(id);
                }
            } else {
                out.extend(read_f32(&self.ctx, &s.logits, 0, n_rows * n_vocab)?);
            }
        }
        Ok(picked)
    }

    fn alloc_scratch(&self, tokens: usize, logit_rows: usize, max_rank: usize) -> Scratch {
        let c = &self.config;
        let f = |name: &str, floats: usize| storage_buffer_zeroed(&self.ctx, name, (floats * 4) as u64);
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
            // Three ranks per row: the stacked query/key/value shrink.
            lora_u: f("lora_u", tokens * 3 * max_rank),
            lora_u_up: f("lora_u_up", tokens * max_rank),
        }
    }

    /// `y = W·x` for projection `proj` of `layer`, with the chunk's adapters that target it
    /// (shrink, then the expand fused into the base product).
    fn project(
        &self,
        rec: &mut Recorder,
        lora: Option<&ChunkLora>,
        layer: usize,
        proj: Proj,
        w: &WeightMatrix,
        io: MatmulIo,
    ) -> Result<()> {
        let ctx = &*self.ctx;
        let slots = lora.and_then(|l| l.registry.slots(layer, proj, l.active));
        let (Some(l), Some(slots)) = (lora, &slots) else { return matmul(rec, ctx, w, io) };
        let io = MatmulIo { lora: Some(lora_io(l, slots, l.u)), ..io };
        lora_shrink(rec, ctx, w.cols, &io)?;
        match self.lora_mode {
            LoraMode::Fused => matmul(rec, ctx, w, io),
            LoraMode::Separate => {
                matmul(rec, ctx, w, MatmulIo { lora: None, ..io })?;
                lora_expand(rec, ctx, w.cols, w.rows, &io)
            }
        }
    }

    /// The query, key and value projections of `x` (normalized by `norm` on the way in, if
    /// given) into `qkv`'s rows: one product where the three are stacked
    /// ([`LayerWeights::wqkv`]) and the rows interleaved — with the chunk's adapters, one shrink
    /// over their stacked A matrices first — else one each.
    #[allow(clippy::too_many_arguments)]
    fn qkv_projections(
        &self,
        rec: &mut Recorder,
        lora: Option<&ChunkLora>,
        layer: usize,
        lw: &LayerWeights,
        x: &wgpu::Buffer,
        norm: Option<RowNorm>,
        qkv: &QkvRows,
        t: usize,
    ) -> Result<()> {
        let ctx = &*self.ctx;
        const QKV: [Proj; 3] = [Proj::Q, Proj::K, Proj::V];
        if let Some(w) = lw.wqkv.as_ref().filter(|_| qkv.interleaved) {
            let io = MatmulIo { norm, ..MatmulIo::dense(x, qkv.q.buf, w, t) };
            let adapted = |l: &ChunkLora| QKV.into_iter().any(|p| l.registry.slots(layer, p, l.active).is_some());
            match lora.filter(|l| adapted(l)) {
                None => return matmul(rec, ctx, w, io),
                Some(l) if self.lora_mode == LoraMode::Fused => {
                    let (a_pack, b_pack) = l.registry.packs();
                    let (q, kv) = (self.config.q_dim(), self.config.kv_dim());
                    if let Some(st) = l.registry.stacked_slots(layer, &QKV, &[q, kv, kv], w.cols, l.active) {
                        let lora = |slots, u_splits| LoraIo {
                            a_pack,
                            b_pack,
                            row_slot: l.row_slot,
                            u: l.u,
                            max_rank: st.max_rank,
                            slots,
                            u_splits,
                        };
                        lora_shrink(rec, ctx, w.cols, &MatmulIo { lora: Some(lora(&st.shrink, None)), ..io })?;
                        return matmul(rec, ctx, w, MatmulIo { lora: Some(lora(&st.expand, Some([q, q + kv]))), ..io });
                    }
                }
                Some(_) => {}
            }
        }
        for (proj, w, r) in [(Proj::Q, &lw.wq, qkv.q), (Proj::K, &lw.wk, qkv.k), (Proj::V, &lw.wv, qkv.v)] {
            self.project(
                rec,
                lora,
                layer,
                proj,
                w,
                MatmulIo { y_offset: r.offset, y_stride: r.stride, norm, ..MatmulIo::dense(x, r.buf, w, t) },
            )?;
        }
        Ok(())
    }

    /// The gate and up projections of `x` (normalized by `norm` on the way in, if given) into
    /// `s.gate` and `s.up`, each its own product.
    #[allow(clippy::too_many_arguments)]
    fn gate_up(
        &self,
        rec: &mut Recorder,
        lora: Option<&ChunkLora>,
        layer: usize,
        lw: &LayerWeights,
        s: &Scratch,
        x: &wgpu::Buffer,
        norm: Option<RowNorm>,
        t: usize,
    ) -> Result<()> {
        self.project(rec, lora, layer, Proj::Gate, &lw.w_gate, MatmulIo { norm, ..MatmulIo::dense(x, &s.gate, &lw.w_gate, t) })?;
        self.project(rec, lora, layer, Proj::Up, &lw.w_up, MatmulIo { norm, ..MatmulIo::dense(x, &s.up, &lw.w_up, t) })
    }

    /// `gate = act(W_gate·x) · (W_up·x)` for `t` rows, `x` the feed-forward norm of `s.h` (fused
    /// into the products): one dispatch for the norm, both projections and the GLU where the two
    /// share a buffer (adapters on either shrink first and expand inside it; with
    /// `LoraMode::Separate` and adapters, or without a shared buffer, three steps).
    fn gated_ffn(
        &self,
        rec: &mut Recorder,
        lora: Option<&ChunkLora>,
        layer: usize,
        lw: &LayerWeights,
        s: &Scratch,
        t: usize,
    ) -> Result<()> {
        let (ctx, c) = (&*self.ctx, &self.config);
        let (gate, up) = (&lw.w_gate, &lw.w_up);
        let norm = Some(RowNorm { w: &lw.ffn_norm, eps: c.norm_eps });
        if gate.pair_offset(up).is_none() || (lora.is_some() && self.lora_mode == LoraMode::Separate) {
            self.gate_up(rec, lora, layer, lw, s, &s.h, norm, t)?;
            return glu(rec, ctx, c.act, &s.gate, &s.up, t * c.ffn_dim);
        }
        let io = MatmulIo { norm, ..MatmulIo::dense(&s.h, &s.gate, gate, t) };
        let slots = |proj| lora.and_then(|l| l.registry.slots(layer, proj, l.active));
        let (gate_slots, up_slots) = (slots(Proj::Gate), slots(Proj::Up));
        let gate_lora = lora.zip(gate_slots.as_ref()).map(|(l, sl)| lora_io(l, sl, l.u));
        let up_lora = lora.zip(up_slots.as_ref()).map(|(l, sl)| lora_io(l, sl, l.u_up));
        let io = MatmulIo { lora: gate_lora, ..io };
        lora_shrink(rec, ctx, gate.cols, &io)?;
        lora_shrink(rec, ctx, up.cols, &MatmulIo { lora: up_lora, ..io })?;
        matmul_gated(rec, ctx, gate, GatedUp { up, act: c.act, lora: up_lora }, io)
    }

    /// Record the whole network for the segments' rows (each appended to its own cache), with
    /// logits for the `(first row, rows)` ranges of `logit_rows`, packed in order. With `trace`
    /// (one segment) every activation the backward pass reads is copied there as it is made.
    #[allow(clippy::too_many_arguments)]
    fn record_chunk(
        &self,
        rec: &mut Recorder,
        s: &Scratch,
        segs: &[Segment],
        logit_rows: &[(usize, usize)],
        lora: Option<&ChunkLora>,
        tree: Option<&wgpu::Buffer>,
        trace: Option<&backward::ForwardTrace>,
    ) -> Result<()> {
        let (c, w, ctx) = (&self.config, &self.weights, &*self.ctx);
        let t: usize = segs.iter().map(|g| g.len).sum();
        // Copy `floats` floats per row of the chunk from `src` (at float `from`) to a trace buffer.
        let keep = |rec: &mut Recorder, src: &wgpu::Buffer, from: usize, dst: Option<&wgpu::Buffer>, floats: usize| {
            if let Some(dst) = dst {
                rec.copy(src, (from * 4) as u64, dst, 0, (t * floats * 4) as u64);
            }
        };
        let layer_trace = |l: usize| trace.map(|tr| &tr.layers[l]);
        let (d, q_dim, kv_dim, hd) = (c.d_model, c.q_dim(), c.kv_dim(), c.head_dim);
        let dense = |buf, stride| Rows { buf, offset: 0, stride };
        embed(rec, ctx, &w.embed, &s.ids, t, c.embed_scale, &s.h)?;
        for (l, lw) in w.layers.iter().enumerate() {
            let tr = layer_trace(l);
            keep(rec, &s.h, 0, tr.map(|x| &x.h_in), d);
            // The norms before the projections are fused into them, except where the backward
            // pass needs their output.
            let (x, norm) = match tr {
                Some(tr) => {
                    rms_norm(rec, ctx, &lw.attn_norm, dense(&s.h, d), dense(&s.xn, d), t, d, c.norm_eps, false)?;
                    keep(rec, &s.xn, 0, Some(&tr.x1), d);
                    (&s.xn, None)
                }
                None => (&s.h, Some(RowNorm { w: &lw.attn_norm, eps: c.norm_eps })),
            };
            // Keys and values in f32 scratch rows (bias, norm and RoPE apply there), then stored
            // into each sequence's f16 cache.
            let qkv = QkvRows::new(c, &s.qkv, t, tr.is_none() && lw.qk_norm.is_none());
            self.qkv_projections(rec, lora, l, lw, x, norm, &qkv, t)?;
            let rp = c.layer_rope(l);
            let shape = AttentionShape {
                n_heads: c.n_heads,
                n_kv_heads: c.n_kv_heads,
                head_dim: hd,
                window: c.layer_window(l),
                scale: c.attn_scale,
            };
            for g in segs {
                let (kc, vc) = &g.kv.layers[l];
                let pos0 = g.kv.len();
                let [qr, kr, vr] = [qkv.q, qkv.k, qkv.v].map(|r| Rows { offset: r.offset + g.row0 * r.stride, ..r });
                if let Some([bq, bk, bv]) = &lw.qkv_bias {
                    add_rows(rec, ctx, qr, bq, g.len, q_dim)?;
                    add_rows(rec, ctx, kr, bk, g.len, kv_dim)?;
                    add_rows(rec, ctx, vr, bv, g.len, kv_dim)?;
                }
                keep(rec, &s.qkv, qr.offset, tr.map(|x| &x.q_pre), q_dim);
                keep(rec, kr.buf, kr.offset, tr.map(|x| &x.k_pre), kv_dim);
                if let Some([qn, kn]) = &lw.qk_norm {
                    rms_norm_inplace(rec, ctx, qn, Rows { stride: hd, ..qr }, g.len * c.n_heads, hd, c.norm_eps)?;
                    rms_norm_inplace(rec, ctx, kn, Rows { stride: hd, ..kr }, g.len * c.n_kv_heads, hd, c.norm_eps)?;
                }
                rope(rec, ctx, &rp, qr, g.len, c.n_heads, hd, pos0, tree)?;
                rope(rec, ctx, &rp, kr, g.len, c.n_kv_heads, hd, pos0, tree)?;
                kv_store(rec, ctx, kr, vr, kc, vc, pos0, g.len, kv_dim)?;
                attention(rec, ctx, &shape, qr, kc, vc, Rows { buf: &s.attn, offset: g.row0 * q_dim, stride: q_dim }, g.len, pos0, tree)?;
            }
            keep(rec, &s.qkv, qkv.q.offset, tr.map(|x| &x.q), q_dim);
            keep(rec, &s.attn, 0, tr.map(|x| &x.att), q_dim);
            self.residual(rec, lora, l, Proj::O, &lw.wo, &s.attn, lw.post_attn_norm.as_ref(), s, t)?;
            keep(rec, &s.tmp, 0, tr.map(|x| &x.o_pre), d);
            keep(rec, &s.h, 0, tr.map(|x| &x.h_mid), d);
            match tr {
                // The backward pass needs the norm, and the gate and up projections before the GLU.
                Some(tr) => {
                    rms_norm(rec, ctx, &lw.ffn_norm, dense(&s.h, d), dense(&s.xn, d), t, d, c.norm_eps, false)?;
                    keep(rec, &s.xn, 0, Some(&tr.x2), d);
                    self.gate_up(rec, lora, l, lw, s, &s.xn, None, t)?;
                    keep(rec, &s.gate, 0, Some(&tr.gate), c.ffn_dim);
                    keep(rec, &s.up, 0, Some(&tr.up), c.ffn_dim);
                    glu(rec, ctx, c.act, &s.gate, &s.up, t * c.ffn_dim)?;
                    keep(rec, &s.gate, 0, Some(&tr.g), c.ffn_dim);
                }
                None => self.gated_ffn(rec, lora, l, lw, s, t)?,
            }
            self.residual(rec, lora, l, Proj::Down, &lw.w_down, &s.gate, lw.post_ffn_norm.as_ref(), s, t)?;
            keep(rec, &s.tmp, 0, tr.map(|x| &x.y_pre), d);
        }
        keep(rec, &s.h, 0, trace.map(|x| &x.h_final), d);
        let mut n_rows = 0;
        for &(first, rows) in logit_rows {
            let h_rows = Rows { buf: &s.h, offset: first * d, stride: d };
            rms_norm(rec, ctx, &w.out_norm, h_rows, Rows { buf: &s.xn, offset: n_rows * d, stride: d }, rows, d, c.norm_eps, false)?;
            n_rows += rows;
        }
        if n_rows > 0 {
            let out = w.output();
            matmul(rec, ctx, out, MatmulIo::dense(&s.xn, &s.logits, out, n_rows))?;
        }
        Ok(())
    }

    /// `h += W·x`, or with a post-norm (gemma3) `h += rmsnorm(W·x)`.
    #[allow(clippy::too_many_arguments)]
    fn residual(
        &self,
        rec: &mut Recorder,
        lora: Option<&ChunkLora>,
        layer: usize,
        proj: Proj,
        wm: &WeightMatrix,
        x: &wgpu::Buffer,
        post_norm: Option<&wgpu::Buffer>,
        s: &Scratch,
        t: usize,
    ) -> Result<()> {
        let (ctx, d) = (&*self.ctx, self.config.d_model);
        match post_norm {
            None => self.project(rec, lora, layer, proj, wm, MatmulIo { accumulate: true, ..MatmulIo::dense(x, &s.h, wm, t) }),
            Some(nw) => {
                self.project(rec, lora, layer, proj, wm, MatmulIo::dense(x, &s.tmp, wm, t))?;
                let rows = |buf| Rows { buf, offset: 0, stride: d };
                rms_norm(rec, ctx, nw, rows(&s.tmp), rows(&s.h), t, d, self.config.norm_eps, true)
            }
        }
    }
}

/// The adapters `slots` (with their largest rank) of a chunk as a product's LoRA input, shrinking into `u`.
fn lora_io<'a>(l: &ChunkLora<'a>, (slots, max_rank): &'a (Vec<LoraSlot>, usize), u: &'a wgpu::Buffer) -> LoraIo<'a> {
    let (a_pack, b_pack) = l.registry.packs();
    LoraIo { a_pack, b_pack, row_slot: l.row_slot, u, max_rank: *max_rank, slots, u_splits: None }
}

/// Open a GGUF file and load its model.
pub fn load(ctx: Arc<GpuContext>, path: impl AsRef<Path>) -> Result<(GgufFile, Model)> {
    let file = GgufFile::open(path)?;
    let model = Model::load(ctx, &file)?;
    Ok((file, model))
}
