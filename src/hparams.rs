//! Hyperparameters: what the layers above (kernels, KV cache, adapters, the forward pass) need to
//! know of a model's shape, as plain values. The bottom layer: it imports nothing of the crate.
//! [`ModelConfig`] is read from GGUF metadata in [`crate::model`].

/// The gate activation of a gated feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Activation {
    /// SiLU (SwiGLU): llama, qwen.
    Silu,
    /// tanh-approximated GELU (GeGLU): gemma.
    GeluTanh,
}

impl Activation {
    /// The shaders' number for it (activation.wgsl's `act`).
    pub(crate) fn code(self) -> u32 {
        (self == Activation::GeluTanh) as u32
    }
}

/// Which dimensions form a rotated pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum RopeLayout {
    /// (2i, 2i+1): llama-family GGUF files (their converter permutes q/k for it).
    Normal,
    /// (i, i + rot_dim/2): qwen2, qwen3, gemma3.
    Neox,
}

/// Rotary embedding hyperparameters.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Rope {
    /// Which dimensions pair up.
    pub layout: RopeLayout,
    /// Rotated dimensions per head (≤ head_dim, even).
    pub rot_dim: usize,
    /// Frequency base.
    pub base: f32,
    /// Per rotated pair `i`, a divisor of its frequency: `θ_i = pos · base^(−2i/rot_dim) /
    /// factors[i]` (Llama 3.1's long-context scaling, `rope_freqs.weight`; `rot_dim / 2` finite
    /// positive values). `None`: 1 for every pair.
    pub factors: Option<Vec<f32>>,
    /// What every rotated pair is multiplied by (`rope.scaling.attn_factor`: LongRoPE's
    /// √(1 + ln s / ln n_orig) for a context stretched s times); 1 for most models.
    pub scale: f32,
}

/// LongRoPE's second set of frequency factors (Phi-3 128k files: `rope_factors_long.weight`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct LongRope {
    /// Per-pair divisors for long contexts, as [`Rope::factors`].
    pub factors: Vec<f32>,
    /// The context the model was first trained for (`rope.scaling.original_context_length`):
    /// beyond it the long factors apply.
    pub original_ctx: usize,
}

impl Rope {
    /// A rotation without frequency factors.
    pub fn new(layout: RopeLayout, rot_dim: usize, base: f32) -> Self {
        Self { layout, rot_dim, base, factors: None, scale: 1.0 }
    }

    /// The angle per position of pair `i`.
    pub fn frequency(&self, i: usize) -> f64 {
        let f = (self.base as f64).powf(-2.0 * i as f64 / self.rot_dim as f64);
        f / self.factors.as_ref().and_then(|v| v.get(i)).map_or(1.0, |&d| d as f64)
    }
}

/// A supported architecture (`general.architecture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Arch {
    /// llama: SmolLM2, Llama 3.x.
    Llama,
    /// qwen2: q/k/v biases.
    Qwen2,
    /// qwen3: per-head q/k RMSNorm.
    Qwen3,
    /// gemma3: GeGLU, post-norms, sliding-window layers, scaled embeddings.
    Gemma3,
    /// phi3: llama-style blocks whose q/k/v and gate/up projections are stored fused.
    Phi3,
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelConfig {
    /// The architecture.
    pub arch: Arch,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Hidden size.
    pub d_model: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than the query heads).
    pub n_kv_heads: usize,
    /// Dimensions per head.
    pub head_dim: usize,
    /// Feed-forward hidden size.
    pub ffn_dim: usize,
    /// Vocabulary size (rows of the embedding and of the LM head).
    pub n_vocab: usize,
    /// Context length the model was trained for.
    pub n_ctx_train: usize,
    /// RMSNorm epsilon.
    pub norm_eps: f32,
    /// Rotary embedding of full-attention layers.
    pub rope: Rope,
    /// Rotary base of sliding-window layers, where it differs (gemma3).
    pub rope_base_local: Option<f32>,
    /// LongRoPE (Phi-3 128k files): the factors for contexts beyond the original one; within
    /// it, `rope.factors` holds the short ones.
    pub long_rope: Option<LongRope>,
    /// Sliding window of local layers (0 = none).
    pub sliding_window: usize,
    /// Every `sliding_pattern`-th layer (the last of each group) attends globally; 0 = all global.
    pub sliding_pattern: usize,
    /// The feed-forward gate's activation.
    pub act: Activation,
    /// Multiplier of the token embeddings (√d_model for gemma).
    pub embed_scale: f32,
    /// Attention score scale.
    pub attn_scale: f32,
    /// Biases on the query, key and value projections (qwen2).
    pub qkv_bias: bool,
    /// RMSNorm per head on queries and keys (qwen3, gemma3).
    pub qk_norm: bool,
    /// Norms after attention and feed-forward outputs (gemma).
    pub post_norms: bool,
}

impl ModelConfig {
    /// Sliding window of layer `l` (0 = full attention).
    pub fn layer_window(&self, l: usize) -> usize {
        if self.sliding_window == 0 || self.is_global(l) {
            0
        } else {
            self.sliding_window
        }
    }

    /// Rotary embedding of layer `l` in a context of `n_ctx` positions: a LongRoPE model takes
    /// its long factors when `n_ctx` exceeds its original context, as llama.cpp chooses by its
    /// context size.
    pub fn layer_rope(&self, l: usize, n_ctx: usize) -> Rope {
        let mut rope = self.rope.clone();
        if let Some(base) = self.rope_base_local.filter(|_| !self.is_global(l)) {
            rope.base = base;
        }
        if let Some(long) = self.long_rope.as_ref().filter(|lr| n_ctx > lr.original_ctx) {
            rope.factors = Some(long.factors.clone());
        }
        rope
    }

    /// Whether a context of `n_ctx` positions takes the LongRoPE long factors.
    pub fn long_rope_in(&self, n_ctx: usize) -> bool {
        self.long_rope.as_ref().is_some_and(|lr| n_ctx > lr.original_ctx)
    }

    fn is_global(&self, l: usize) -> bool {
        self.sliding_pattern == 0 || l % self.sliding_pattern == self.sliding_pattern - 1
    }

    /// Floats per cached key (or value) row: n_kv_heads × head_dim.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Floats per query row: n_heads × head_dim.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
}
