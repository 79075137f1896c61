//! The generation loop: prefill the prompt, then decode one token at a time.

use super::{Sampler, SamplerConfig};
use crate::error::{Error, Result};
use crate::kv::KvCache;
use crate::lora::ActiveAdapter;
use crate::model::{Logits, Model, Pick, Sequence};
use crate::text::Tokenizer;
use std::ops::ControlFlow;
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
    /// End when the newest tokens are three copies in a row of one span of 4..=64
    /// tokens, keeping the first copy: a small model's greedy answer that starts looping (the
    /// same listing line over and over) ends there instead of at `max_tokens`. `on_token` has
    /// seen the dropped copies.
    pub stop_on_repeat: bool,
}

impl GenerateOptions {
    /// Greedy text of at most `max_tokens`, ending at the tokenizer's stop tokens.
    pub fn greedy(max_tokens: usize, tokenizer: &Tokenizer) -> Self {
        Self { max_tokens, sampler: SamplerConfig::default(), stop: tokenizer.stop.clone(), stop_on_repeat: false }
    }
}

/// Copies in a row of one span that end a generation with [`GenerateOptions::stop_on_repeat`].
pub const REPEAT_COPIES: usize = 3;
const REPEAT_SPAN: std::ops::RangeInclusive<usize> = 4..=64;

/// The length of the shortest span (4..=64 tokens) whose [`REPEAT_COPIES`] copies in a row end
/// `tokens`.
fn repeated_span(tokens: &[u32]) -> Option<usize> {
    let n = tokens.len();
    REPEAT_SPAN.take_while(|l| l * REPEAT_COPIES <= n).find(|&l| {
        let last = &tokens[n - l..];
        (1..REPEAT_COPIES).all(|c| &tokens[n - (c + 1) * l..n - c * l] == last)
    })
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

/// Process `seq` and choose its next token with `sampler`: on the GPU where the kernels can
/// (greedy, top-k up to [`K_MAX`](crate::kernels::sample::K_MAX)), otherwise from the logits on the host by the same rule.
pub(crate) fn step(model: &Model, seq: &mut Sequence, sampler: &mut Sampler) -> Result<u32> {
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
pub fn generate_adapted(
    model: &Model,
    kv: &mut KvCache,
    prompt: &[u32],
    adapter: Option<(ActiveAdapter, usize)>,
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32),
) -> Result<Generation> {
    let feed = |tokens: &[u32], sampler: &mut Sampler| {
        let from = adapter.map_or(0, |(_, from)| from.saturating_sub(kv.len()));
        step(model, &mut Sequence::adapted(kv, tokens, adapter.map(|a| a.0), from), sampler)
    };
    generate_with(prompt, opts, feed, |t| {
        on_token(t);
        ControlFlow::Continue(())
    })
}

/// The generation loop over any way of computing: `feed(tokens, sampler)` processes `tokens`
/// after what came before and returns the next token `sampler` chooses. `on_token` sees each
/// token as it is chosen; [`ControlFlow::Break`] ends the generation with [`Error::Cancelled`]
/// (a client that left).
pub fn generate_with(
    prompt: &[u32],
    opts: &GenerateOptions,
    mut feed: impl FnMut(&[u32], &mut Sampler) -> Result<u32>,
    mut on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<Generation> {
    let mut sampler = Sampler::new(opts.sampler);
    let mut out = Vec::new();
    let t0 = Instant::now();
    let mut next = feed(prompt, &mut sampler)?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    while out.len() < opts.max_tokens {
        out.push(next);
        if on_token(next).is_break() {
            return Err(Error::Cancelled);
        }
        if opts.stop.contains(&next) || out.len() == opts.max_tokens {
            break;
        }
        if let Some(span) = repeated_span(&out).filter(|_| opts.stop_on_repeat) {
            out.truncate(out.len() - (REPEAT_COPIES - 1) * span);
            break;
        }
        next = feed(&[next], &mut sampler)?;
    }
    Ok(Generation { tokens: out, prefill_secs, decode_secs: t1.elapsed().as_secs_f64(), prompt_len: prompt.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_repeated_three_times_ends_the_text() {
        let line = [11u32, 12, 13, 14, 15];
        let mut text: Vec<u32> = vec![1, 2, 3];
        for copies in 1..=3 {
            text.extend(line);
            let want = (copies == REPEAT_COPIES).then_some(line.len());
            assert_eq!(repeated_span(&text), want, "after {copies} copies");
        }
        // Shorter than 4 tokens, or fewer copies than required: text goes on.
        assert_eq!(repeated_span(&[7, 8, 7, 8, 7, 8]), None);
        assert_eq!(repeated_span(&[5; 11]), None);
        assert_eq!(repeated_span(&[5; 12]), Some(4));
        // Lines that differ (a listing) are not a repetition.
        let listing: Vec<u32> = (0..10).flat_map(|i| [20, 21, 22, 100 + i, 23]).collect();
        assert_eq!(repeated_span(&listing), None);
    }
}
