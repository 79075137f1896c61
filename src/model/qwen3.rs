//! qwen3: llama with per-head RMSNorm of queries and keys, rotary embedding on split halves.

use crate::error::Result;
use crate::gguf::GgufFile;
use crate::hparams::{Arch, ModelConfig, RopeLayout};

/// Hyperparameters of a qwen3 GGUF.
pub fn config(f: &GgufFile) -> Result<ModelConfig> {
    let mut c = ModelConfig::base(f, Arch::Qwen3, "qwen3", RopeLayout::Neox)?;
    c.qk_norm = true;
    Ok(c)
}
