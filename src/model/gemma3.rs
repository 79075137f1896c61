//! gemma3: GeGLU, per-head q/k norms, norms after attention and feed-forward, embeddings scaled
//! by √d_model, and five sliding-window layers (rotary base 10 000) per global layer.
//!
//! GGUF converters already add Gemma's `1 +` to the norm weights, so the norms are plain RMSNorm.

use crate::error::Result;
use crate::gguf::GgufFile;
use crate::hparams::{Activation, Arch, ModelConfig, RopeLayout};

/// Gemma 3 alternates 5 local layers with 1 global one (llama.cpp's default when the file is silent).
const DEFAULT_SLIDING_PATTERN: usize = 6;
/// Rotary base of the local layers (fixed by the architecture).
const LOCAL_ROPE_BASE: f32 = 10_000.0;

/// Hyperparameters of a gemma3 GGUF.
pub fn config(f: &GgufFile) -> Result<ModelConfig> {
    let mut c = ModelConfig::base(f, Arch::Gemma3, "gemma3", RopeLayout::Neox)?;
    c.act = Activation::GeluTanh;
    c.embed_scale = (c.d_model as f32).sqrt();
    c.qk_norm = true;
    c.post_norms = true;
    c.sliding_window = f.meta("gemma3.attention.sliding_window").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    c.sliding_pattern = DEFAULT_SLIDING_PATTERN;
    c.rope_base_local = Some(LOCAL_ROPE_BASE);
    Ok(c)
}
