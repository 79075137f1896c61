//! Reading a model's hyperparameters ([`ModelConfig`]) from GGUF metadata; each architecture
//! file adjusts the common llama-style fields.

use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::hparams::{Activation, Arch, ModelConfig, Rope, RopeLayout};

impl ModelConfig {
    /// Read the configuration of any supported architecture.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let arch = f.str("general.architecture")?;
        match arch {
            "llama" => super::llama::config(f),
            "qwen2" => super::qwen2::config(f),
            "qwen3" => super::qwen3::config(f),
            "gemma3" => super::gemma3::config(f),
            "phi3" => super::phi3::config(f),
            other => Err(Error::Model {
                path: f.path().to_path_buf(),
                msg: format!("architecture '{}' is not supported (supported: llama, qwen2, qwen3, gemma3, phi3)", other.escape_debug()),
            }),
        }
    }

    /// The common llama-style fields under the `{arch}.` prefix; architectures adjust the rest.
    pub(crate) fn base(f: &GgufFile, arch: Arch, prefix: &str, layout: RopeLayout) -> Result<Self> {
        let k = |s: &str| format!("{prefix}.{s}");
        // Linear and YaRN position scaling change every rotation angle; run without them, such a
        // file would answer wrongly without a sign.
        if f.meta(&k("rope.scaling.type")).is_some() {
            let scaling = f.str(&k("rope.scaling.type"))?;
            if scaling != "none" {
                return Err(Error::Model {
                    path: f.path().to_path_buf(),
                    msg: format!("{}: '{}' position scaling is not supported yet", k("rope.scaling.type"), scaling.escape_debug()),
                });
            }
        }
        let d_model = f.u64(&k("embedding_length"))? as usize;
        let n_heads = f.u64(&k("attention.head_count"))? as usize;
        let n_kv_heads = f.meta(&k("attention.head_count_kv")).and_then(|v| v.as_u64()).unwrap_or(n_heads as u64) as usize;
        let head_dim = match f.meta(&k("attention.key_length")).and_then(|v| v.as_u64()) {
            Some(h) => h as usize,
            None => d_model / n_heads.max(1),
        };
        let rot_dim = f.meta(&k("rope.dimension_count")).and_then(|v| v.as_u64()).unwrap_or(head_dim as u64) as usize;
        let n_vocab = match f.meta(&k("vocab_size")).and_then(|v| v.as_u64()) {
            Some(v) => v as usize,
            None => f.array("tokenizer.ggml.tokens")?.len(),
        };
        let cfg = Self {
            arch,
            n_layers: f.u64(&k("block_count"))? as usize,
            d_model,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_dim: f.u64(&k("feed_forward_length"))? as usize,
            n_vocab,
            n_ctx_train: f.u64(&k("context_length"))? as usize,
            norm_eps: f.f64(&k("attention.layer_norm_rms_epsilon"))? as f32,
            rope: Rope {
                factors: rope_factors(f, ROPE_FACTORS, rot_dim)?,
                scale: f.meta(&k("rope.scaling.attn_factor")).and_then(|v| v.as_f64()).unwrap_or(1.0) as f32,
                ..Rope::new(layout, rot_dim, f.meta(&k("rope.freq_base")).and_then(|v| v.as_f64()).unwrap_or(10000.0) as f32)
            },
            rope_base_local: None,
            long_rope: None,
            sliding_window: 0,
            sliding_pattern: 0,
            act: Activation::Silu,
            embed_scale: 1.0,
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            qkv_bias: false,
            qk_norm: false,
            post_norms: false,
        };
        cfg.validate(f)?;
        Ok(cfg)
    }

    fn validate(&self, f: &GgufFile) -> Result<()> {
        let bad = |msg: String| Err(Error::Model { path: f.path().to_path_buf(), msg });
        if self.n_layers == 0 || self.d_model == 0 || self.n_heads == 0 || self.n_kv_heads == 0 {
            return bad(format!(
                "empty dimensions: {} layers, d_model {}, {} heads, {} kv heads",
                self.n_layers, self.d_model, self.n_heads, self.n_kv_heads
            ));
        }
        // Sane limits before anything is sized by them (a file claiming 2^31 layers would have
        // the loader allocate for them).
        let limits = [
            ("block_count", self.n_layers, 4096),
            ("embedding_length", self.d_model, 1 << 16),
            ("attention.head_count", self.n_heads, 1024),
            ("feed_forward_length", self.ffn_dim, 1 << 20),
            ("vocab_size", self.n_vocab, 1 << 22),
            ("context_length", self.n_ctx_train, 1 << 24),
        ];
        for (key, value, max) in limits {
            if value == 0 || value > max {
                return bad(format!("{key} is {value}; 1..={max} is supported"));
            }
        }
        let last = format!("blk.{}.attn_norm.weight", self.n_layers - 1);
        if f.find_tensor(&last).is_none() {
            return bad(format!("block_count is {} but the file has no {last}", self.n_layers));
        }
        let positive = [
            ("attention.layer_norm_rms_epsilon", self.norm_eps),
            ("rope.freq_base", self.rope.base),
            ("rope.scaling.attn_factor", self.rope.scale),
        ];
        for (key, value) in positive.into_iter().chain(self.rope_base_local.map(|b| ("local rope base", b))) {
            if !(value.is_finite() && value > 0.0) {
                return bad(format!("{key} is {value}; a finite positive number is needed"));
            }
        }
        if self.n_heads % self.n_kv_heads != 0 {
            return bad(format!("{} heads is not a multiple of {} kv heads", self.n_heads, self.n_kv_heads));
        }
        if self.head_dim % 4 != 0 || self.head_dim > 256 || self.rope.rot_dim % 2 != 0 || self.rope.rot_dim > self.head_dim {
            return bad(format!(
                "head_dim {} / rope dims {} unsupported (head_dim must be a multiple of 4, at most 256)",
                self.head_dim, self.rope.rot_dim
            ));
        }
        Ok(())
    }
}

/// The tensor holding per-pair frequency divisors (Llama 3.1 and later).
pub(crate) const ROPE_FACTORS: &str = "rope_freqs.weight";

/// Per-pair frequency divisors from tensor `name`, if the file has it, checked: `rot_dim / 2`
/// finite positive values.
pub(crate) fn rope_factors(f: &GgufFile, name: &str, rot_dim: usize) -> Result<Option<Vec<f32>>> {
    if f.find_tensor(name).is_none() {
        return Ok(None);
    }
    let bad = |msg: String| Error::Model { path: f.path().to_path_buf(), msg: format!("{name}: {msg}") };
    let factors = f.tensor_f32(name).map_err(|e| bad(e.to_string()))?;
    if factors.len() != rot_dim / 2 {
        return Err(bad(format!("{} values for {} rotated pairs", factors.len(), rot_dim / 2)));
    }
    if let Some(v) = factors.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
        return Err(bad(format!("a factor of {v}; finite positive values are needed")));
    }
    Ok(Some(factors))
}
