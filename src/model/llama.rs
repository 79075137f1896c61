//! llama (SmolLM2, Llama 3.x): RMSNorm, SwiGLU, rotary embedding on adjacent pairs.

use crate::error::Result;
use crate::gguf::GgufFile;
use crate::hparams::{Arch, ModelConfig, RopeLayout};

/// Hyperparameters of a llama GGUF.
pub fn config(f: &GgufFile) -> Result<ModelConfig> {
    ModelConfig::base(f, Arch::Llama, "llama", RopeLayout::Normal)
}
