//! The generation loop: prefill the prompt, then decode one token at a time.

use super::{Sampler, SamplerConfig};
use crate::error::Result;
use crate::kv::KvCache;
use crate::lora::ActiveAdapter;
use crate::model::{Logits, Model, Pick, Sequence};
use crate::text::Tokenizer;
use std::time::Instant;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most new tokens.
    pub max_tokens: usize,
    /// Sampling (temperature 0 = greedy, computed on the GPU).
    pub sampler: SamplerConfig,
    /// Tokens that end the generation (they are kept in the output).
    pub stop: Vec<u32>,
}

impl GenerateOptions {
    /// Greedy text of at most `max_tokens`, ending at the tokenizer's stop tokens.
    pub fn greedy(max_tokens: usize, tokenizer: &Tokenizer) -> Self {
        Self { max_tokens, sampler: SamplerConfig::default(), stop: tokenizer.stop.clone() }
    }
}

/// A finished generation and its timings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    /// New tokens.
    pub tokens: Vec<u32>,
    /// Seconds spent on the prompt (until the first new token was known).
    pub prefill_secs: f64,
    /// Seconds spent on the remaining tokens.
    pub decode_secs: f64,
    /// Prompt tokens processed.
    pub prompt_len: usize,
}

impl Generation {
    /// Prompt tokens per second.
    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_len as f64 / self.prefill_secs.max(1e-9)
    }
    /// New tokens per second after the first.
    pub fn decode_tok_s(&self) -> f64 {
        (self.tokens.len().saturating_sub(1)) as f64 / self.decode_secs.max(1e-9)
    }
}

fn step(model: &Model, seq: &mut Sequence, sampler: &mut Sampler) -> Result<u32> {
    let cfg = sampler.config();
    if sampler.is_greedy() {
        model.next_token(seq, Pick::Greedy)
    } else if (1..=crate::kernels::sample::K_MAX).contains(&cfg.top_k) {
        let u = sampler.next_uniform();
        model.next_token(seq, Pick::Sample(cfg, u))
    } else {
        let logits = model.forward_seqs(std::slice::from_mut(seq), Logits::Last)?;
        Ok(sampler.sample(&logits))
    }
}

/// Generate after `prompt` (appended to `kv`) with the base weights, calling `on_token` as each
/// token is chosen.
pub fn generate(model: &Model, kv: &mut KvCache, prompt: &[u32], opts: &GenerateOptions, on_token: impl FnMut(u32)) -> Result<Generation> {
    generate_adapted(model, kv, prompt, None, opts, on_token)
}

/// [`generate`] with `adapter` applied from absolute cache position `from` on (activated LoRA:
/// its invocation; standard LoRA: 0).
pub fn generate_adapted(model: &Model, kv: &mut KvCache, prompt: &[u32], adapter: Option<(ActiveAdapter, usize)>, opts: &GenerateOptions, mut on_token: impl FnMut(u32)) -> Result<Generation> {
    let mut sampler = Sampler::new(opts.sampler);
    let feed = |kv: &mut KvCache, tokens: &[u32], sampler: &mut Sampler| {
        let from = adapter.map_or(0, |(_, from)| from.saturating_sub(kv.len()));
        step(model, &mut Sequence::adapted(kv, tokens, adapter.map(|a| a.0), from), sampler)
    };
    let mut out = Vec::new();
    let t0 = Instant::now();
    let mut next = feed(kv, prompt, &mut sampler)?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    while out.len() < opts.max_tokens {
        out.push(next);
        on_token(next);
        if opts.stop.contains(&next) || out.len() == opts.max_tokens {
            break;
        }
        next = feed(kv, &[next], &mut sampler)?;
    }
    Ok(Generation { tokens: out, prefill_secs, decode_secs: t1.elapsed().as_secs_f64(), prompt_len: prompt.len() })
}
