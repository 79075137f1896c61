//! A conversation on one KV cache: turns appended to it, adapters switched on from chosen
//! positions, forks for alternative continuations, and counters of what was computed and what
//! was reused.
//!
//! Every cached position remembers which adapter produced its keys and values. A new prompt
//! reuses the longest cached prefix that holds the same tokens made by the adapter the new plan
//! puts there: an activated adapter leaves the positions before its activation to the base
//! weights, so a base-processed prefix serves every activated adapter; a standard adapter (active
//! from position 0) never reuses positions computed under another adapter set, and the counters
//! say how many were computed again.
//!
//! A session computes on the model itself ([`Session::new`]) or through a [`Batcher`]
//! ([`Session::batched`]), whose thread puts the work of many sessions into one forward pass; the
//! calls and their results are the same either way.

use crate::batch::Batcher;
use crate::decode::{generate_with, step, GenerateOptions, Generation, Sampler};
use crate::error::{Error, Result};
use crate::kv::{KvCache, KvPool};
use crate::lora::ActiveAdapter;
use crate::model::{Logits, Model, Sequence};
use std::ops::ControlFlow;

/// An adapter applied from absolute position `from` on (0: standard LoRA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Activation {
    /// The adapter and its multiplier.
    pub adapter: ActiveAdapter,
    /// First position it applies to.
    pub from: usize,
}

impl Activation {
    /// The adapter that applies at position `p` under `plan`.
    fn at(plan: Option<Activation>, p: usize) -> Option<ActiveAdapter> {
        plan.filter(|a| p >= a.from).map(|a| a.adapter)
    }
}

/// What a session computed and what it reused, in token positions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SessionStats {
    /// Prompt positions run through the model.
    pub prefilled: usize,
    /// Prompt positions whose cached keys and values were valid and reused.
    pub reused: usize,
    /// Tokens generated.
    pub decoded: usize,
    /// Of `prefilled`: positions that were cached with the same token but under another adapter,
    /// so had to be computed again.
    pub recomputed: usize,
    /// Candidate tokens scored as token trees (not kept in the cache).
    pub scored: usize,
}

impl std::ops::Sub for SessionStats {
    type Output = SessionStats;

    /// The counts between two readings of the same session.
    fn sub(self, o: Self) -> Self {
        Self {
            prefilled: self.prefilled - o.prefilled,
            reused: self.reused - o.reused,
            decoded: self.decoded - o.decoded,
            recomputed: self.recomputed - o.recomputed,
            scored: self.scored - o.scored,
        }
    }
}

impl std::ops::Add for SessionStats {
    type Output = SessionStats;

    /// The counts of two sessions together.
    fn add(self, o: Self) -> Self {
        Self {
            prefilled: self.prefilled + o.prefilled,
            reused: self.reused + o.reused,
            decoded: self.decoded + o.decoded,
            recomputed: self.recomputed + o.recomputed,
            scored: self.scored + o.scored,
        }
    }
}

/// One conversation's KV cache and its history.
pub struct Session<'m> {
    model: &'m Model,
    /// Where the passes run: `None` on the model from this thread.
    batcher: Option<&'m Batcher<'m>>,
    kv: KvCache,
    /// The token at each cached position.
    tokens: Vec<u32>,
    /// The adapter whose weights produced each cached position.
    made_by: Vec<Option<ActiveAdapter>>,
    stats: SessionStats,
}

impl<'m> Session<'m> {
    /// An empty session of `n_ctx` positions.
    pub fn new(model: &'m Model, n_ctx: usize) -> Result<Self> {
        Ok(Self::on(model, None, model.new_cache(n_ctx)?))
    }

    fn on(model: &'m Model, batcher: Option<&'m Batcher<'m>>, kv: KvCache) -> Self {
        Self { model, batcher, kv, tokens: Vec::new(), made_by: Vec::new(), stats: SessionStats::default() }
    }

    /// An empty session of `n_ctx` positions whose passes `batcher` shares with other sessions'.
    pub fn batched(batcher: &'m Batcher<'m>, n_ctx: usize) -> Result<Self> {
        Ok(Self::on(batcher.model(), Some(batcher), batcher.model().new_cache(n_ctx)?))
    }

    /// [`batched`](Self::batched) with a cache from `pool`: sessions of one pool share each
    /// dispatch of RoPE, the KV store and attention in a pass, not only the weights' reads.
    pub fn pooled(batcher: &'m Batcher<'m>, pool: &KvPool) -> Result<Self> {
        Ok(Self::on(batcher.model(), Some(batcher), pool.cache()?))
    }

    /// The cached tokens.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Cached positions.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Positions the cache holds at most.
    pub fn n_ctx(&self) -> usize {
        self.kv.n_ctx()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Counters since the session (or fork) began.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// The model.
    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// Forget every position from `len` on (a snapshot is just a length to come back to).
    pub fn truncate(&mut self, len: usize) {
        self.kv.truncate(len);
        self.tokens.truncate(len);
        self.made_by.truncate(len);
    }

    /// A second session continuing from the same cached positions (copied on the GPU), with its
    /// own counters.
    pub fn fork(&self) -> Result<Self> {
        Ok(Self {
            model: self.model,
            batcher: self.batcher,
            kv: self.kv.fork(self.model.ctx())?,
            tokens: self.tokens.clone(),
            made_by: self.made_by.clone(),
            stats: SessionStats::default(),
        })
    }

    /// The activation of `adapter` for `prompt`: from the start of the last occurrence of its
    /// invocation sequence (activated LoRA), or from 0 (standard LoRA).
    pub fn activation(&self, adapter: ActiveAdapter, prompt: &[u32]) -> Result<Activation> {
        let info = self.model.adapter_info(adapter.id)?;
        let from = match &info.invocation_tokens {
            Some(inv) if !inv.is_empty() => prompt.windows(inv.len()).rposition(|w| w == inv.as_slice()).ok_or_else(|| {
                Error::InvalidOption(format!("adapter {} ({}) needs its invocation tokens {inv:?} in the prompt", adapter.id, info.name))
            })?,
            _ => 0,
        };
        Ok(Activation { adapter, from })
    }

    /// How many leading tokens of `prompt` the cache holds as `plan` would compute them: the
    /// positions a prefill of `prompt` under `plan` reuses (before keeping one to process).
    pub fn cached_prefix(&self, prompt: &[u32], plan: Option<Activation>) -> usize {
        self.tokens.iter().zip(prompt).enumerate().take_while(|&(p, (a, b))| a == b && self.made_by[p] == Activation::at(plan, p)).count()
    }

    /// Whether this session holds every position `other` holds — the same tokens, made by the
    /// same adapters — so that `other` serves no prompt this one does not.
    pub fn covers(&self, other: &Session) -> bool {
        let n = other.len();
        n <= self.len() && self.tokens[..n] == other.tokens[..] && self.made_by[..n] == other.made_by[..]
    }

    /// Drop the cached positions `prompt` under `plan` cannot reuse, keeping at least one prompt
    /// token to process; returns how many are kept.
    fn reuse(&mut self, prompt: &[u32], plan: Option<Activation>) -> Result<usize> {
        if prompt.is_empty() {
            return Err(Error::InvalidOption("empty prompt".into()));
        }
        let same_token = self.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        let valid = self.cached_prefix(prompt, plan);
        let keep = valid.min(prompt.len() - 1);
        self.stats.recomputed += same_token.min(prompt.len()) - valid;
        self.stats.reused += keep;
        self.stats.prefilled += prompt.len() - keep;
        self.truncate(keep);
        Ok(keep)
    }

    /// Account for the positions the cache gained after feeding (a prefix of) `fed` under
    /// `plan` — all of them, or as many as were processed before an error.
    fn settle(&mut self, fed: &[u32], plan: Option<Activation>) {
        let start = self.tokens.len();
        let gained = self.kv.len().saturating_sub(start).min(fed.len());
        self.tokens.extend_from_slice(&fed[..gained]);
        self.made_by.extend((start..start + gained).map(|p| Activation::at(plan, p)));
        self.kv.truncate(self.tokens.len());
    }

    /// Append `tokens` to the cache under `plan` (as a token tree with `tree`'s parents) in one
    /// forward call, here or through the batcher, and return the logits `want` asks for.
    fn forward(&mut self, tokens: &[u32], plan: Option<Activation>, tree: Option<&[i32]>, want: Logits) -> Result<Vec<f32>> {
        let from = plan.map_or(0, |a| a.from.saturating_sub(self.kv.len()));
        let adapter = plan.map(|a| a.adapter);
        match self.batcher {
            None => {
                let seq = Sequence::adapted(&mut self.kv, tokens, adapter, from);
                let seq = match tree {
                    Some(parents) => seq.with_tree(parents),
                    None => seq,
                };
                self.model.forward_seqs(&mut [seq], want)
            }
            Some(b) => {
                let (kv, logits) = b.forward(self.kv.lend(), tokens, adapter, from, tree, want);
                if let Some(kv) = kv {
                    self.kv = kv;
                }
                logits
            }
        }
    }

    /// Process `tokens` under `plan` and choose the next token with `sampler` (on the GPU when
    /// computing here, from the logits when batched: the same rule).
    fn next_token(&mut self, tokens: &[u32], plan: Option<Activation>, sampler: &mut Sampler) -> Result<u32> {
        if self.batcher.is_some() {
            let logits = self.forward(tokens, plan, None, Logits::Last)?;
            return Ok(sampler.sample(&logits));
        }
        let from = plan.map_or(0, |a| a.from.saturating_sub(self.kv.len()));
        step(self.model, &mut Sequence::adapted(&mut self.kv, tokens, plan.map(|a| a.adapter), from), sampler)
    }

    /// Make the session hold `prompt` (the whole conversation so far) processed under `plan`,
    /// computing only what the cache lacks; returns the last position's logits.
    pub fn prefill(&mut self, prompt: &[u32], plan: Option<Activation>) -> Result<Vec<f32>> {
        let keep = self.reuse(prompt, plan)?;
        let new = &prompt[keep..];
        let logits = self.forward(new, plan, None, Logits::Last);
        self.settle(new, plan);
        logits
    }

    /// Feed one generated token under `plan` and return the logits after it (for decoding
    /// loops that choose tokens on the host, such as constrained decoding).
    pub fn step(&mut self, token: u32, plan: Option<Activation>) -> Result<Vec<f32>> {
        self.extend(&[token], plan)
    }

    /// Feed generated `tokens` under `plan` in one forward pass and return the logits after each
    /// of them, row after row (jump-forward: a run the constraint forces, checked against the
    /// logits before it is kept; see [`Session::truncate`] for what is not).
    pub fn extend(&mut self, tokens: &[u32], plan: Option<Activation>) -> Result<Vec<f32>> {
        let start = self.len();
        let want = if tokens.len() == 1 { Logits::Last } else { Logits::All };
        let logits = self.forward(tokens, plan, None, want);
        self.settle(tokens, plan);
        self.stats.decoded += self.len() - start;
        logits
    }

    /// [`prefill`](Self::prefill) of `prompt` and [`tree_logits`](Self::tree_logits) of a token
    /// tree rooted after it, under `plan`, in one forward pass where both fit one: the prompt's
    /// uncached tokens as a chain, the tree's nodes after the last of them. The prompt stays
    /// cached, the tree does not. Returns the prompt's last logits and every node's.
    pub fn prefill_tree(
        &mut self,
        prompt: &[u32],
        plan: Option<Activation>,
        tokens: &[u32],
        parents: &[i32],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let keep = self.reuse(prompt, plan)?;
        let new = &prompt[keep..];
        if new.len() + tokens.len() > self.model.max_tree_tokens() {
            let root = self.forward(new, plan, None, Logits::Last);
            self.settle(new, plan);
            return Ok((root?, self.tree_logits(tokens, parents, plan)?));
        }
        let n = new.len() as i32;
        let all: Vec<u32> = new.iter().chain(tokens).copied().collect();
        let tree: Vec<i32> = (0..n).map(|i| i - 1).chain(parents.iter().map(|&p| if p < 0 { n - 1 } else { p + n })).collect();
        // Logits of the prompt's last row and the tree's: the rest would only be thrown away.
        let mut logits = self.forward(&all, plan, Some(&tree), Logits::From(new.len() - 1))?;
        self.kv.truncate(keep + new.len());
        self.settle(new, plan);
        self.stats.scored += tokens.len();
        let nodes = logits.split_off(self.model.config.n_vocab);
        Ok((logits, nodes))
    }

    /// Logits of every node of a token tree (`parents`: see [`Sequence::tree`]) rooted after the
    /// cached positions, under `plan`; the cache is left as it was.
    pub fn tree_logits(&mut self, tokens: &[u32], parents: &[i32], plan: Option<Activation>) -> Result<Vec<f32>> {
        let start = self.len();
        let logits = self.forward(tokens, plan, Some(parents), Logits::All);
        self.kv.truncate(start);
        self.stats.scored += tokens.len();
        logits
    }

    /// Generate after `prompt` (the whole conversation so far) under `plan`, reusing what the
    /// cache holds. Afterwards the session holds the prompt and every generated token but the
    /// last (which was never fed back).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        plan: Option<Activation>,
        opts: &GenerateOptions,
        mut on_token: impl FnMut(u32),
    ) -> Result<Generation> {
        self.generate_until(prompt, plan, opts, |t| {
            on_token(t);
            ControlFlow::Continue(())
        })
    }

    /// [`generate`](Self::generate), ended early with [`Error::Cancelled`] when `on_token`
    /// breaks (the reader of the text is gone); the session keeps what was fed until then.
    pub fn generate_until(
        &mut self,
        prompt: &[u32],
        plan: Option<Activation>,
        opts: &GenerateOptions,
        mut on_token: impl FnMut(u32) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let keep = self.reuse(prompt, plan)?;
        let mut generated = Vec::new();
        let feed = |tokens: &[u32], sampler: &mut Sampler| self.next_token(tokens, plan, sampler);
        let g = generate_with(&prompt[keep..], opts, feed, |t| {
            generated.push(t);
            on_token(t)
        });
        self.stats.decoded += generated.len();
        let fed: Vec<u32> = prompt[keep..].iter().chain(&generated).copied().collect();
        self.settle(&fed, plan);
        g
    }
}
