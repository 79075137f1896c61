//! phi3 (Phi-3, Phi-3.5, Phi-4-mini): llama-style blocks, rotary embedding on split halves, the
//! q/k/v projections stored as one tensor (`attn_qkv`) and gate and up as one (`ffn_up`, gate's
//! rows first), which the loaders split (`model/weights.rs`, the f32 reference).
//!
//! The sliding window the metadata may give is not applied, as llama.cpp does not apply it
//! (its conversion of Phi-3 windows is known to be wrong). Files for 128k contexts (Phi-3 128k,
//! Phi-3.5) carry LongRoPE: short and long frequency factors (`rope_factors_short/long`), the long
//! ones for contexts beyond `rope.scaling.original_context_length`, and an attention factor
//! (`rope.scaling.attn_factor`, read for every architecture) on every rotated pair.

use super::config::rope_factors;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::hparams::{Arch, LongRope, ModelConfig, RopeLayout};

/// Hyperparameters of a phi3 GGUF.
pub fn config(f: &GgufFile) -> Result<ModelConfig> {
    let mut c = ModelConfig::base(f, Arch::Phi3, "phi3", RopeLayout::Neox)?;
    let rot_dim = c.rope.rot_dim;
    let short = rope_factors(f, "rope_factors_short.weight", rot_dim)?;
    let long = rope_factors(f, "rope_factors_long.weight", rot_dim)?;
    let bad = |msg: &str| Err(Error::Model { path: f.path().to_path_buf(), msg: msg.into() });
    match (short, long) {
        (None, None) => {}
        (Some(short), Some(long)) => {
            if c.rope.factors.is_some() {
                return bad("rope_freqs.weight beside LongRoPE factors: which to use is unknown");
            }
            let Some(original_ctx) = f.meta("phi3.rope.scaling.original_context_length").and_then(|v| v.as_u64()) else {
                return bad("LongRoPE factors without phi3.rope.scaling.original_context_length");
            };
            if original_ctx == 0 || original_ctx as usize > c.n_ctx_train {
                return bad(&format!(
                    "phi3.rope.scaling.original_context_length is {original_ctx}; 1..={} (the context length) is needed",
                    c.n_ctx_train
                ));
            }
            c.rope.factors = Some(short);
            c.long_rope = Some(LongRope { factors: long, original_ctx: original_ctx as usize });
        }
        (Some(_), None) => return bad("rope_factors_short.weight without rope_factors_long.weight"),
        (None, Some(_)) => return bad("rope_factors_long.weight without rope_factors_short.weight"),
    }
    Ok(c)
}
