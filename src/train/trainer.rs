//! Training one adapter on the GPU: examples in seeded order, gradients accumulated over a
//! batch, AdamW with warmup + cosine decay, validation loss every N steps.

use super::{AdamW, Example, Schedule};
use crate::decode::SplitMix64;
use crate::error::{Error, Result};
use crate::lora::{ActiveAdapter, LoraAdapter, LoraWeights, Proj};
use crate::model::Model;
use std::collections::BTreeMap;
use std::time::Instant;

/// How to train.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha (the adapter's scale is alpha / rank).
    pub alpha: f32,
    /// Optimizer steps.
    pub steps: u64,
    /// Examples per step (their gradients are summed).
    pub batch: usize,
    /// Learning rate: peak, final, warmup steps.
    pub lr: f32,
    pub min_lr: f32,
    pub warmup: u64,
    /// AdamW's hyperparameters.
    pub optimizer: AdamW,
    /// Validation loss every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Seed of the initial A matrices and of the example order.
    pub seed: u64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self { rank: 8, alpha: 16.0, steps: 200, batch: 4, lr: 1e-3, min_lr: 1e-4, warmup: 10, optimizer: AdamW::default(), eval_every: 50, seed: 0 }
    }
}

/// Where training stands, reported after every step.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Step just taken, of `steps`.
    pub step: u64,
    pub steps: u64,
    /// Mean loss of the step's examples.
    pub loss: f32,
    /// The latest validation loss.
    pub eval_loss: Option<f32>,
    /// Examples per second so far.
    pub examples_per_s: f64,
}

/// A new adapter as PEFT initialises one: A uniform in ±1/√fan_in (Kaiming-uniform with
/// a = √5), B zero, so training starts from the base model.
pub fn init_adapter(model: &Model, rank: usize, alpha: f32, seed: u64) -> LoraAdapter {
    let c = &model.config;
    let mut rng = SplitMix64(seed);
    let mut targets = BTreeMap::new();
    for layer in 0..c.n_layers {
        for p in Proj::ALL {
            let (n, k) = p.shape(c);
            let bound = 1.0 / (k as f32).sqrt();
            let a = (0..rank * k).map(|_| (rng.next_f32() * 2.0 - 1.0) * bound).collect();
            targets.insert((layer, p), LoraWeights { a, b: vec![0.0; n * rank] });
        }
    }
    LoraAdapter { rank, alpha, use_rslora: false, invocation_tokens: None, targets }
}

/// Train an adapter named `name` on `train` (examples of one role), reporting validation loss
/// on `val`. Returns the trained adapter (its config and weights) and the last validation loss.
pub fn train_adapter(model: &Model, name: &str, train: &[Example], val: &[Example], opts: &TrainOptions, mut on_progress: impl FnMut(&Progress)) -> Result<(LoraAdapter, Option<f32>)> {
    if train.is_empty() {
        return Err(Error::InvalidOption(format!("{name}: no training examples")));
    }
    let init = init_adapter(model, opts.rank, opts.alpha, opts.seed);
    let id = model.add_adapter(name, &init)?;
    let result = run(model, id, train, val, opts, &mut on_progress);
    let weights = result.and_then(|eval| Ok((model.read_adapter_weights(id)?, eval)));
    model.remove_adapter(id)?;
    let (targets, eval) = weights?;
    Ok((LoraAdapter { targets, ..init }, eval))
}

fn run(model: &Model, id: crate::lora::AdapterId, train: &[Example], val: &[Example], opts: &TrainOptions, on_progress: &mut impl FnMut(&Progress)) -> Result<Option<f32>> {
    let adapter = ActiveAdapter::new(id);
    let state = model.adapter_training()?;
    let scratch = model.adapter_buffers()?;
    let schedule = Schedule { peak: opts.lr, min: opts.min_lr, warmup: opts.warmup, total: opts.steps };
    let mut rng = SplitMix64(opts.seed ^ 0x5eed);
    let mut order: Vec<usize> = Vec::new();
    let (t0, mut seen) = (Instant::now(), 0usize);
    let mut eval_loss = None;
    let eval = |scratch: &crate::model::AdapterBuffers| -> Result<Option<f32>> {
        if val.is_empty() {
            return Ok(None);
        }
        let mut sum = 0.0;
        for e in val {
            // The gradient lands in scratch buffers nobody reads: the loss is what is wanted.
            sum += model.adapter_gradient(&e.tokens, e.active_from, &e.targets, adapter, scratch)?;
        }
        Ok(Some(sum / val.len() as f32))
    };
    for step in 1..=opts.steps {
        let mut loss = 0.0;
        for _ in 0..opts.batch.max(1) {
            if order.is_empty() {
                order = (0..train.len()).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
                }
            }
            let e = &train[order.pop().expect("refilled above")];
            loss += model.adapter_gradient(&e.tokens, e.active_from, &e.targets, adapter, &state.grads)?;
            seen += 1;
        }
        model.adapter_step(id, &state, &opts.optimizer, step, schedule.lr(step))?;
        if (opts.eval_every > 0 && step % opts.eval_every == 0) || step == opts.steps {
            eval_loss = eval(&scratch)?;
        }
        let examples_per_s = seen as f64 / t0.elapsed().as_secs_f64().max(1e-9);
        on_progress(&Progress { step, steps: opts.steps, loss: loss / opts.batch.max(1) as f32, eval_loss, examples_per_s });
    }
    Ok(eval_loss)
}
