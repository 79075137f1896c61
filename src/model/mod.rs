//! Architectures from GGUF metadata and the forward pass on the GPU.
//!
//! A [`Model`] is immutable once loaded: the KV cache is an explicit argument of every forward
//! call, so several conversations can share one model.

mod backward;
mod config;
mod forward;
mod gemma3;
mod linear;
mod llama;
mod phi3;
mod qwen2;
mod qwen3;
mod weights;

pub use backward::{example_loss, example_losses, AdapterBuffers, AdapterTraining, ExampleRows, PrefixCache, DEFAULT_PREFIX_CACHE_BYTES};
pub use weights::{LayerWeights, Weights};

use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::gpu::{read_f32, read_u32, upload, GpuContext, Recorder, View};
use crate::hparams::ModelConfig;
use crate::kernels::matmul::MAX_SLOTS;
use crate::kernels::sample::{argmax, sample, SamplerConfig, OUT_WORDS};
use crate::kv::{KvCache, KvPool};
use crate::lora::{ActiveAdapter, AdapterId, AdapterInfo, AdapterRegistry, LoraAdapter, LoraLimits};
use forward::{Chunk, NoTap, Scratch, Segment};
use linear::ChunkLora;
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
    /// Every token's from the one at this index on, in order.
    From(usize),
}

impl Logits {
    /// Rows of logits this choice yields for `n` tokens.
    pub fn rows(self, n: usize) -> usize {
        match self {
            Logits::None => 0,
            Logits::Last => n.min(1),
            Logits::All => n,
            Logits::From(k) => n.saturating_sub(k),
        }
    }
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
    /// A training pass's buffers besides the forward's (made on the first one).
    train_scratch: Mutex<Option<backward::TrainScratch>>,
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
            train_scratch: Mutex::new(None),
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

    /// `slots` KV caches of `n_ctx` positions sharing buffers, so that a pass over several of
    /// them runs RoPE, the KV store and attention once for all (see [`KvPool`]).
    pub fn new_pool(&self, n_ctx: usize, slots: usize) -> Result<KvPool> {
        KvPool::new(&self.ctx, &self.config, n_ctx, slots)
    }

    /// The most tokens a token tree may have: one pass, with every row's logits.
    pub fn max_tree_tokens(&self) -> usize {
        self.logit_cap()
    }

    /// Most tokens one pass over several sequences holds (whatever logits they want): the
    /// per-step budget of continuous batching ([`crate::batch`]).
    pub fn step_tokens(&self) -> usize {
        self.logit_cap()
    }

    /// Rows whose logits fit one pass (the logits buffer within one binding).
    fn logit_cap(&self) -> usize {
        ((self.ctx.max_binding() as usize / (self.config.n_vocab * 4)).max(1)).min(self.max_batch)
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

    /// The limits adapters are held to (rank, count, bytes).
    pub fn lora_limits(&self) -> Result<LoraLimits> {
        Ok(*self.registry()?.limits())
    }

    /// Load a PEFT adapter directory (see [`crate::lora`]) and make it resident.
    pub fn load_adapter(&self, dir: impl AsRef<Path>) -> Result<AdapterId> {
        let adapter = LoraAdapter::load_peft(dir.as_ref(), &self.config, &self.lora_limits()?)?;
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
        self.run(seqs, &vec![want; seqs.len()], None, &mut out)?;
        Ok(out)
    }

    /// [`forward_seqs`](Self::forward_seqs) with each sequence's own choice of logits (one
    /// sequence's prompt chunk wants none, another's decode row its last): the logits of each
    /// sequence apart, in the order of `seqs`.
    pub fn forward_each(&self, seqs: &mut [Sequence], wants: &[Logits]) -> Result<Vec<Vec<f32>>> {
        if wants.len() != seqs.len() {
            return Err(Error::InvalidOption(format!("{} logit choices for {} sequences", wants.len(), seqs.len())));
        }
        let rows: Vec<usize> = seqs.iter().zip(wants).map(|(s, w)| w.rows(s.tokens.len())).collect();
        let mut out = Vec::new();
        self.run(seqs, wants, None, &mut out)?;
        let n_vocab = self.config.n_vocab;
        let mut rest = out.as_slice();
        Ok(rows
            .iter()
            .map(|&r| {
                let (mine, after) = rest.split_at((r * n_vocab).min(rest.len()));
                rest = after;
                mine.to_vec()
            })
            .collect())
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
        let ids = self.run(std::slice::from_mut(seq), &[Logits::Last], Some(pick), &mut Vec::new())?;
        ids.first().copied().ok_or_else(|| Error::Gpu("token choice produced no token".into()))
    }

    /// Process several sequences in one pass and choose each one's next token greedily on the GPU.
    pub fn next_tokens_greedy(&self, seqs: &mut [Sequence]) -> Result<Vec<u32>> {
        self.run(seqs, &vec![Logits::Last; seqs.len()], Some(Pick::Greedy), &mut Vec::new())
    }

    fn check_seqs(&self, seqs: &[Sequence]) -> Result<()> {
        if seqs.is_empty() {
            return Err(Error::InvalidOption("forward called with no sequence".into()));
        }
        seqs.iter().try_for_each(|s| self.check_sequence(s))
    }

    /// Whether a pass can take `s`: tokens within the vocabulary, a cache of this model's layers
    /// with room for them.
    pub(crate) fn check_sequence(&self, s: &Sequence) -> Result<()> {
        let n_vocab = self.config.n_vocab;
        if s.tokens.is_empty() {
            return Err(Error::InvalidOption("forward called with no tokens".into()));
        }
        if let Some(&id) = s.tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(Error::BadToken { id, n_vocab });
        }
        if let Some(a) = s.adapter.filter(|a| !a.scale.is_finite()) {
            return Err(Error::InvalidOption(format!("adapter {} applied with the scale {}; it must be finite", a.id, a.scale)));
        }
        if s.kv.n_layers() != self.config.n_layers {
            return Err(Error::InvalidOption(format!(
                "a KV cache of {} layers used with a model of {}",
                s.kv.n_layers(),
                self.config.n_layers
            )));
        }
        s.kv.reserve(s.tokens.len())
    }

    fn run(&self, seqs: &mut [Sequence], wants: &[Logits], pick: Option<Pick>, out: &mut Vec<f32>) -> Result<Vec<u32>> {
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
        let logit_cap = self.logit_cap();
        let chunk = if wants.iter().any(|w| matches!(w, Logits::All | Logits::From(_))) { logit_cap } else { self.max_batch };
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
            *guard = Some(Scratch::new(self, need, logit_cap, registry.limits().max_rank));
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
                match wants[i] {
                    Logits::All => logit_rows.push((row0, len)),
                    Logits::From(k) if at + len > k => {
                        let first = k.max(at);
                        logit_rows.push((row0 + first - at, at + len - first));
                    }
                    Logits::Last if at + len == seq.tokens.len() => logit_rows.push((row0 + len - 1, 1)),
                    _ => {}
                }
            }
            upload(&self.ctx, &s.ids, 0, &ids);
            let lora = slots.iter().any(|&v| v >= 0).then(|| {
                upload(&self.ctx, &s.row_slot, 0, &slots);
                ChunkLora { registry: &registry, active: &active, row_slot: &s.row_slot, u: &s.lora_u, u_up: &s.lora_u_up }
            });
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
            let chunk = Chunk { s, segs: &segs, logit_rows: &logit_rows, lora: lora.as_ref(), tree: tree.as_deref() };
            self.record_chunk(&mut rec, &chunk, &mut NoTap)?;
            let n_rows: usize = logit_rows.iter().map(|r| r.1).sum();
            let logits = View::new(&s.logits, n_rows, n_vocab);
            match pick {
                Some(Pick::Greedy) if n_rows > 0 => argmax(&mut rec, &self.ctx, logits, &s.picked)?,
                Some(Pick::Sample(cfg, u)) if n_rows > 0 => sample(&mut rec, &self.ctx, logits, &cfg, u, &s.picked)?,
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
}

/// Open a GGUF file and load its model.
pub fn load(ctx: Arc<GpuContext>, path: impl AsRef<Path>) -> Result<(GgufFile, Model)> {
    let file = GgufFile::open(path)?;
    let model = Model::load(ctx, &file)?;
    Ok((file, model))
}
