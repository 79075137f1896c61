//! phi3 (Phi-3, Phi-3.5, Phi-4-mini): llama-style blocks, rotary embedding on split halves, the
//! q/k/v projections stored as one tensor (`attn_qkv`) and gate and up as one (`ffn_up`, gate's
//! rows first), which the loaders split (`model/weights.rs`, the f32 reference).
//!
//! The sliding window the metadata may give is not applied, as llama.cpp does not apply it
//! (its conversion of Phi-3 windows is known to be wrong); files with LongRoPE factors
//! (`rope_factors_long/short`, the 128k-context ones) are refused until those are implemented.

use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::hparams::{Arch, ModelConfig, RopeLayout};

/// Hyperparameters of a phi3 GGUF.
pub fn config(f: &GgufFile) -> Result<ModelConfig> {
    if let Some(t) = ["rope_factors_long.weight", "rope_factors_short.weight"].into_iter().find(|t| f.find_tensor(t).is_some()) {
        return Err(Error::Model {
            path: f.path().to_path_buf(),
            msg: format!("{t}: Phi-3 LongRoPE factors (128k-context files) are not supported yet; the 4k-context files run"),
        });
    }
    ModelConfig::base(f, Arch::Phi3, "phi3", RopeLayout::Neox)
}
