//! Architectures from GGUF metadata and the forward pass on the GPU.
//!
//! A [`Model`] is immutable once loaded: the KV cache is an explicit argument of every forward
//! call, so several conversations can share one model.

mod config;
mod gemma3;
mod llama;
mod qwen2;
mod qwen3;
mod weights;

pub use config::{Arch, ModelConfig};
pub use weights::{LayerWeights, Weights};

use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::gpu::{read_f32, read_u32, storage_buffer_zeroed, upload, GpuContext, Recorder};
use crate::kernels::attention::{attention, AttentionShape};
use crate::kernels::elementwise::{add_rows, glu};
use crate::kernels::matmul::{matmul, MatmulIo};
use crate::kernels::norm::{rms_norm, rms_norm_inplace, Rows};
use crate::decode::SamplerConfig;
use crate::kernels::sample::{argmax, sample};
use crate::kernels::{embed::embed, rope::rope};
use crate::kv::KvCache;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
enum Pick {
    Greedy,
    Sample(SamplerConfig, f32),
}

/// Tokens processed per submission during prefill.
const DEFAULT_MAX_BATCH: usize = 256;

/// Activation buffers of one forward chunk, reused across calls.
struct Scratch {
    tokens: usize,
    ids: wgpu::Buffer,
    h: wgpu::Buffer,
    xn: wgpu::Buffer,
    q: wgpu::Buffer,
    attn: wgpu::Buffer,
    tmp: wgpu::Buffer,
    gate: wgpu::Buffer,
    up: wgpu::Buffer,
    logits: wgpu::Buffer,
    picked: wgpu::Buffer,
}

/// A loaded model: configuration and GPU weights.
pub struct Model {
    /// Hyperparameters.
    pub config: ModelConfig,
    /// GPU weights.
    pub weights: Weights,
    ctx: Arc<GpuContext>,
    path: PathBuf,
    max_batch: usize,
    scratch: Mutex<Option<Scratch>>,
}

impl Model {
    /// Load the weights of a GGUF file onto `ctx`'s device.
    pub fn load(ctx: Arc<GpuContext>, file: &GgufFile) -> Result<Self> {
        let config = ModelConfig::from_gguf(file)?;
        let weights = Weights::load(&ctx, file, &config)?;
        tracing::info!(arch = ?config.arch, layers = config.n_layers, bytes = weights.n_bytes(), "model loaded");
        Ok(Self { config, weights, ctx, path: file.path().to_path_buf(), max_batch: DEFAULT_MAX_BATCH, scratch: Mutex::new(None) })
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

    /// Process `tokens` at the cache's current end and return the logits `want` asks for
    /// (`n_vocab` floats per row).
    pub fn forward(&self, tokens: &[u32], kv: &mut KvCache, want: Logits) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        self.run(tokens, kv, want, None, &mut out)?;
        Ok(out)
    }

    /// Process `tokens` and return the id of the largest last-token logit, computed on the GPU
    /// (only the id is read back).
    pub fn forward_greedy(&self, tokens: &[u32], kv: &mut KvCache) -> Result<u32> {
        self.forward_pick(tokens, kv, Pick::Greedy)
    }

    /// Process `tokens` and draw the next token on the GPU with `cfg` (top-k in 1..=64) and the
    /// uniform number `u` (see [`crate::decode::draw`], the same rule on the host).
    pub fn forward_sample(&self, tokens: &[u32], kv: &mut KvCache, cfg: &SamplerConfig, u: f32) -> Result<u32> {
        self.forward_pick(tokens, kv, Pick::Sample(*cfg, u))
    }

    fn forward_pick(&self, tokens: &[u32], kv: &mut KvCache, pick: Pick) -> Result<u32> {
        let mut out = Vec::new();
        let id = self.run(tokens, kv, Logits::Last, Some(pick), &mut out)?;
        id.ok_or_else(|| Error::Gpu("token choice produced no token".into()))
    }

    fn run(&self, tokens: &[u32], kv: &mut KvCache, want: Logits, pick: Option<Pick>, out: &mut Vec<f32>) -> Result<Option<u32>> {
        let n_vocab = self.config.n_vocab;
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(Error::BadToken { id, n_vocab });
        }
        if tokens.is_empty() {
            return Err(Error::InvalidOption("forward called with no tokens".into()));
        }
        kv.reserve(tokens.len())?;
        let mut guard = self.scratch.lock().map_err(|_| Error::Gpu("scratch lock poisoned".into()))?;
        let logit_rows = ((self.ctx.max_binding() as usize / (n_vocab * 4)).max(1)).min(self.max_batch);
        let chunk = if want == Logits::All { logit_rows } else { self.max_batch };
        let need = tokens.len().min(chunk);
        if guard.as_ref().is_none_or(|s| s.tokens < need) {
            *guard = Some(self.alloc_scratch(need, logit_rows));
        }
        let s = guard.as_ref().expect("scratch allocated above");
        let mut greedy_id = None;
        let n_chunks = tokens.len().div_ceil(chunk);
        for (i, part) in tokens.chunks(chunk).enumerate() {
            let last = i + 1 == n_chunks;
            let rows = match want {
                Logits::All => part.len(),
                Logits::Last if last => 1,
                _ => 0,
            };
            upload(&self.ctx, &s.ids, 0, part);
            let mut rec = Recorder::new(&self.ctx);
            self.record_chunk(&mut rec, s, kv, part.len(), rows)?;
            match pick {
                Some(Pick::Greedy) if last => argmax(&mut rec, &self.ctx, &s.logits, 0, n_vocab, 1, &s.picked)?,
                Some(Pick::Sample(cfg, u)) if last => sample(&mut rec, &self.ctx, &s.logits, 0, n_vocab, cfg.top_k, cfg.temperature, cfg.top_p, u, &s.picked)?,
                _ => {}
            }
            rec.submit();
            kv.advance(part.len());
            if pick.is_some() && last {
                let id = read_u32(&self.ctx, &s.picked, 0, 1)?[0];
                if id as usize >= n_vocab {
                    return Err(Error::Gpu("every logit is NaN or -inf".into()));
                }
                greedy_id = Some(id);
            } else if rows > 0 {
                out.extend(read_f32(&self.ctx, &s.logits, 0, rows * n_vocab)?);
            }
        }
        Ok(greedy_id)
    }

    fn alloc_scratch(&self, tokens: usize, logit_rows: usize) -> Scratch {
        let c = &self.config;
        let f = |name: &str, floats: usize| storage_buffer_zeroed(&self.ctx, name, (floats * 4) as u64);
        Scratch {
            tokens,
            ids: f("ids", tokens),
            h: f("h", tokens * c.d_model),
            xn: f("xn", tokens * c.d_model.max(c.q_dim())),
            q: f("q", tokens * c.q_dim()),
            attn: f("attn", tokens * c.q_dim()),
            tmp: f("tmp", tokens * c.d_model),
            gate: f("gate", tokens * c.ffn_dim),
            up: f("up", tokens * c.ffn_dim),
            logits: f("logits", logit_rows * c.n_vocab),
            picked: f("picked", crate::kernels::sample::OUT_WORDS),
        }
    }

    /// Record the whole network for `t` tokens at position `kv.len()`, with logits for the last
    /// `logit_rows` of them.
    fn record_chunk(&self, rec: &mut Recorder, s: &Scratch, kv: &KvCache, t: usize, logit_rows: usize) -> Result<()> {
        let (c, w, ctx) = (&self.config, &self.weights, &*self.ctx);
        let pos0 = kv.len();
        let (d, q_dim, kv_dim, hd) = (c.d_model, c.q_dim(), c.kv_dim(), c.head_dim);
        let dense = |buf, stride| Rows { buf, offset: 0, stride };
        embed(rec, ctx, &w.embed, &s.ids, t, c.embed_scale, &s.h)?;
        for (l, lw) in w.layers.iter().enumerate() {
            let (kc, vc) = &kv.layers[l];
            let cache = |buf| Rows { buf, offset: pos0 * kv_dim, stride: kv_dim };
            rms_norm(rec, ctx, &lw.attn_norm, dense(&s.h, d), dense(&s.xn, d), t, d, c.norm_eps, false)?;
            matmul(rec, ctx, &lw.wq, MatmulIo::dense(&s.xn, &s.q, &lw.wq, t))?;
            for (wm, buf) in [(&lw.wk, kc), (&lw.wv, vc)] {
                let io = MatmulIo { y_offset: pos0 * kv_dim, ..MatmulIo::dense(&s.xn, buf, wm, t) };
                matmul(rec, ctx, wm, io)?;
            }
            if let Some([bq, bk, bv]) = &lw.qkv_bias {
                add_rows(rec, ctx, dense(&s.q, q_dim), bq, t, q_dim)?;
                add_rows(rec, ctx, cache(kc), bk, t, kv_dim)?;
                add_rows(rec, ctx, cache(vc), bv, t, kv_dim)?;
            }
            if let Some([qn, kn]) = &lw.qk_norm {
                rms_norm_inplace(rec, ctx, qn, dense(&s.q, hd), t * c.n_heads, hd, c.norm_eps)?;
                rms_norm_inplace(rec, ctx, kn, Rows { buf: kc, offset: pos0 * kv_dim, stride: hd }, t * c.n_kv_heads, hd, c.norm_eps)?;
            }
            let rp = c.layer_rope(l);
            rope(rec, ctx, &rp, dense(&s.q, q_dim), t, c.n_heads, hd, pos0)?;
            rope(rec, ctx, &rp, cache(kc), t, c.n_kv_heads, hd, pos0)?;
            let shape = AttentionShape { n_heads: c.n_heads, n_kv_heads: c.n_kv_heads, head_dim: hd, window: c.layer_window(l), scale: c.attn_scale };
            attention(rec, ctx, &shape, &s.q, kc, vc, &s.attn, t, pos0)?;
            self.residual(rec, &lw.wo, &s.attn, lw.post_attn_norm.as_ref(), s, t)?;
            rms_norm(rec, ctx, &lw.ffn_norm, dense(&s.h, d), dense(&s.xn, d), t, d, c.norm_eps, false)?;
            matmul(rec, ctx, &lw.w_gate, MatmulIo::dense(&s.xn, &s.gate, &lw.w_gate, t))?;
            matmul(rec, ctx, &lw.w_up, MatmulIo::dense(&s.xn, &s.up, &lw.w_up, t))?;
            glu(rec, ctx, c.act, &s.gate, &s.up, t * c.ffn_dim)?;
            self.residual(rec, &lw.w_down, &s.gate, lw.post_ffn_norm.as_ref(), s, t)?;
        }
        if logit_rows > 0 {
            let first = t - logit_rows;
            let h_rows = Rows { buf: &s.h, offset: first * d, stride: d };
            rms_norm(rec, ctx, &w.out_norm, h_rows, dense(&s.xn, d), logit_rows, d, c.norm_eps, false)?;
            let out = w.output();
            matmul(rec, ctx, out, MatmulIo::dense(&s.xn, &s.logits, out, logit_rows))?;
        }
        Ok(())
    }

    /// `h += W·x`, or with a post-norm (gemma3) `h += rmsnorm(W·x)`.
    fn residual(&self, rec: &mut Recorder, wm: &crate::gpu::WeightMatrix, x: &wgpu::Buffer, post_norm: Option<&wgpu::Buffer>, s: &Scratch, t: usize) -> Result<()> {
        let (ctx, d) = (&*self.ctx, self.config.d_model);
        match post_norm {
            None => matmul(rec, ctx, wm, MatmulIo { accumulate: true, ..MatmulIo::dense(x, &s.h, wm, t) }),
            Some(nw) => {
                matmul(rec, ctx, wm, MatmulIo::dense(x, &s.tmp, wm, t))?;
                let rows = |buf| Rows { buf, offset: 0, stride: d };
                rms_norm(rec, ctx, nw, rows(&s.tmp), rows(&s.h), t, d, self.config.norm_eps, true)
            }
        }
    }
}

/// Open a GGUF file and load its model.
pub fn load(ctx: Arc<GpuContext>, path: impl AsRef<Path>) -> Result<(GgufFile, Model)> {
    let file = GgufFile::open(path)?;
    let model = Model::load(ctx, &file)?;
    Ok((file, model))
}
