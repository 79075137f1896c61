//! qwen2: llama with biases on the q/k/v projections and rotary embedding on split halves.

use crate::error::Result;
use crate::gguf::GgufFile;
use crate::hparams::{Arch, ModelConfig, RopeLayout};

/// Hyperparameters of a qwen2 GGUF.
pub fn config(f: &GgufFile) -> Result<ModelConfig> {
    let mut c = ModelConfig::base(f, Arch::Qwen2, "qwen2", RopeLayout::Neox)?;
    c.qkv_bias = true;
    Ok(c)
}
