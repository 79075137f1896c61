//! Training one adapter on the GPU: examples in seeded order, gradients accumulated over a
//! batch, AdamW with warmup + cosine decay, validation loss every N steps.

use super::{AdamW, Example, Schedule};
use crate::decode::SplitMix64;
use crate::error::{Error, Result};
use crate::lora::{ActiveAdapter, AdapterId, LoraAdapter, LoraWeights, Proj};
use crate::model::{example_losses, AdapterTraining, Model, PrefixCache};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
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
    /// Learning rate at the end of the cosine decay.
    pub min_lr: f32,
    /// Warmup steps.
    pub warmup: u64,
    /// AdamW's hyperparameters.
    pub optimizer: AdamW,
    /// Validation loss every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Seed of the initial A matrices and of the example order.
    pub seed: u64,
    /// Save the run here at every validation step (and when stopping), and resume from it when
    /// it holds one.
    pub checkpoint: Option<PathBuf>,
    /// Stop after this step, as if interrupted (the schedule still spans `steps`).
    pub stop_after: Option<u64>,
    /// Start from this adapter (its rank, alpha and weights) instead of a fresh one: training
    /// continued, with new optimizer moments and schedule. A checkpoint to resume wins over it.
    pub init: Option<LoraAdapter>,
    /// Bytes of KV cache kept of the examples' frozen prefixes ([`PrefixCache`]): each
    /// conversation's prefix computed once for every epoch and validation while they fit.
    pub prefix_cache_bytes: u64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            steps: 200,
            batch: 4,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup: 10,
            optimizer: AdamW::default(),
            eval_every: 50,
            seed: 0,
            checkpoint: None,
            stop_after: None,
            init: None,
            prefix_cache_bytes: crate::model::DEFAULT_PREFIX_CACHE_BYTES,
        }
    }
}

impl TrainOptions {
    /// Refuse options no run can train with, before anything is allocated: a fresh adapter's
    /// rank outside `1..=max_rank` (the engine's adapter limit), an alpha that is not a positive
    /// number, a learning rate (peak or final) below 0 or not a number, no steps or no examples
    /// per step.
    pub fn check(&self, max_rank: usize) -> Result<()> {
        let refuse = |what: String| Err(Error::InvalidOption(what));
        if self.init.is_none() && !(1..=max_rank).contains(&self.rank) {
            return refuse(format!("rank {}: outside 1..={max_rank}", self.rank));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return refuse(format!("alpha {}: not a positive number", self.alpha));
        }
        // A learning rate of 0 is allowed: the adapter comes back as it started.
        for (name, v) in [("learning rate", self.lr), ("final learning rate", self.min_lr)] {
            if !(v.is_finite() && v >= 0.0) {
                return refuse(format!("{name} {v}: not a number of at least 0"));
            }
        }
        if self.steps == 0 || self.batch == 0 {
            return refuse(format!("{} steps of {} examples: both must be at least 1", self.steps, self.batch));
        }
        Ok(())
    }
}

/// Where training stands, reported after every step.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Step just taken, of `steps`.
    pub step: u64,
    /// Optimizer steps.
    pub steps: u64,
    /// Mean loss of the step's examples.
    pub loss: f32,
    /// The latest validation loss.
    pub eval_loss: Option<f32>,
    /// Whether `eval_loss` was measured at this step.
    pub validated: bool,
    /// Training examples per second so far (time spent on validation not counted).
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
/// on `val`. Returns the adapter (its config and weights) as it was at the validation with the
/// lowest loss, and that loss; without validation examples, as the last step left it. (A resumed
/// run chooses among its own validations: the best before the interruption is not kept.)
pub fn train_adapter(
    model: &Model,
    name: &str,
    train: &[Example],
    val: &[Example],
    opts: &TrainOptions,
    on_progress: impl FnMut(&Progress),
) -> Result<(LoraAdapter, Option<f32>)> {
    train_adapter_with(model, name, train, val, opts, &mut PrefixCache::with_budget(opts.prefix_cache_bytes), on_progress)
}

/// [`train_adapter`] continuing the frozen prefixes kept in `prefixes` (base weights only, so
/// every adapter of a set trained on the same conversations can share them: the argument
/// adapters start from the selector's).
pub fn train_adapter_with(
    model: &Model,
    name: &str,
    train: &[Example],
    val: &[Example],
    opts: &TrainOptions,
    prefixes: &mut PrefixCache,
    mut on_progress: impl FnMut(&Progress),
) -> Result<(LoraAdapter, Option<f32>)> {
    opts.check(model.lora_limits()?.max_rank).map_err(|err| match err {
        Error::InvalidOption(msg) => Error::InvalidOption(format!("{name}: {msg}")),
        err => err,
    })?;
    if train.is_empty() {
        return Err(Error::InvalidOption(format!("{name}: no training examples")));
    }
    // Every example checked before any is trained on: a bad one found at step 40 loses the run.
    for e in train.iter().chain(val) {
        model
            .check_example(&e.rows())
            .map_err(|err| Error::InvalidOption(format!("{name}: the example of data line {}: {err}", e.line)))?;
    }
    let resume = match &opts.checkpoint {
        Some(dir) if has_checkpoint(dir) => Some(Checkpoint::load(dir, model)?),
        _ => None,
    };
    let init = match &resume {
        Some(c) => c.adapter.clone(),
        None => match &opts.init {
            Some(a) => LoraAdapter { invocation_tokens: None, ..a.clone() },
            None => init_adapter(model, opts.rank, opts.alpha, opts.seed),
        },
    };
    let id = model.add_adapter(name, &init)?;
    let result = run(model, id, &init, train, val, opts, resume, prefixes, &mut on_progress);
    let weights = result.and_then(|best| match best {
        Some(Best { loss, targets }) => Ok((targets, Some(loss))),
        None => Ok((model.read_adapter_weights(id)?, None)),
    });
    model.remove_adapter(id)?;
    let (targets, eval) = weights?;
    Ok((LoraAdapter { targets, ..init }, eval))
}

#[allow(clippy::too_many_arguments)] // train_adapter's parts, passed down once
fn run(
    model: &Model,
    id: AdapterId,
    init: &LoraAdapter,
    train: &[Example],
    val: &[Example],
    opts: &TrainOptions,
    resume: Option<Checkpoint>,
    prefix: &mut PrefixCache,
    on_progress: &mut impl FnMut(&Progress),
) -> Result<Option<Best>> {
    let adapter = ActiveAdapter::new(id);
    let buffers = AdapterTraining::new(model)?;
    let schedule = Schedule { peak: opts.lr, min: opts.min_lr, warmup: opts.warmup, total: opts.steps };
    let mut rng = SplitMix64(opts.seed ^ 0x5eed);
    let mut order: Vec<usize> = Vec::new();
    let mut first = 1;
    if let Some(c) = resume {
        buffers.write_moments(model, id, &c.moments)?;
        (first, rng, order) = (c.state.step + 1, SplitMix64(c.state.rng), c.state.order);
    }
    let (t0, mut seen, mut validating) = (Instant::now(), 0usize, 0.0f64);
    let (mut eval_loss, mut best) = (None, None::<Best>);
    // Forward only: the loss is what is wanted.
    let eval = |prefix: &mut PrefixCache| -> Result<Option<f32>> {
        if val.is_empty() {
            return Ok(None);
        }
        let losses = example_losses(model, prefix, &val.iter().map(Example::rows).collect::<Vec<_>>(), adapter)?;
        Ok(Some(losses.iter().sum::<f32>() / val.len() as f32))
    };
    let last = opts.stop_after.map_or(opts.steps, |s| s.min(opts.steps));
    for step in first..=last {
        let mut batch = Vec::with_capacity(opts.batch);
        for _ in 0..opts.batch {
            if order.is_empty() {
                order = epoch_order(train, &mut rng);
            }
            batch.push(train[order.pop().expect("refilled above")].rows());
        }
        // The step's examples side by side in as few passes as fit.
        let loss: f32 = buffers.grads.add_gradients(model, prefix, &batch, adapter)?.iter().sum();
        seen += batch.len();
        buffers.step(model, id, &opts.optimizer, step, schedule.lr(step))?;
        let validated = (opts.eval_every > 0 && step % opts.eval_every == 0) || step == last;
        if validated {
            let v0 = Instant::now();
            eval_loss = eval(prefix)?;
            if let Some(loss) = eval_loss.filter(|l| best.as_ref().is_none_or(|b| *l < b.loss)) {
                best = Some(Best { loss, targets: model.read_adapter_weights(id)? });
            }
            validating += v0.elapsed().as_secs_f64();
            if let Some(dir) = &opts.checkpoint {
                let adapter = LoraAdapter { targets: model.read_adapter_weights(id)?, ..init.clone() };
                let state = State { step, rng: rng.0, order: order.clone() };
                Checkpoint { adapter, moments: buffers.read_moments(model, id)?, state }.save(dir, model)?;
            }
        }
        let examples_per_s = seen as f64 / (t0.elapsed().as_secs_f64() - validating).max(1e-9);
        on_progress(&Progress { step, steps: opts.steps, loss: loss / opts.batch as f32, eval_loss, validated, examples_per_s });
    }
    Ok(best)
}

/// The weights at the lowest validation loss so far.
struct Best {
    loss: f32,
    targets: BTreeMap<(usize, Proj), LoraWeights>,
}

/// One pass over `train`, to be taken from the back: the data lines (conversations) in a
/// seeded random order, each line's examples together and in their order. A conversation's
/// examples are nested prefixes of one another, so in this order the [`PrefixCache`] computes
/// each conversation once instead of once per example.
fn epoch_order(train: &[Example], rng: &mut SplitMix64) -> Vec<usize> {
    let mut lines: Vec<Vec<usize>> = Vec::new();
    for (i, e) in train.iter().enumerate() {
        match lines.last_mut() {
            Some(group) if train[group[0]].line == e.line => group.push(i),
            _ => lines.push(vec![i]),
        }
    }
    for i in (1..lines.len()).rev() {
        lines.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    lines.into_iter().rev().flat_map(|g| g.into_iter().rev()).collect()
}

/// Whether `dir` holds a run to resume.
pub fn has_checkpoint(dir: &Path) -> bool {
    dir.join(STATE_FILE).exists()
}

/// The checkpoint's bookkeeping file.
const STATE_FILE: &str = "state.json";
/// The optimizer moments' file.
const MOMENTS_FILE: &str = "moments.safetensors";
/// The order of the moments in that file.
const MOMENT_NAMES: [&str; 4] = ["m_a", "v_a", "m_b", "v_b"];

/// Where a run stands: the step done, the example order's generator and what is left of the
/// current pass over the examples.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct State {
    step: u64,
    rng: u64,
    order: Vec<usize>,
}

/// A run saved mid-way: the adapter (PEFT, in `adapter/`), AdamW's moments, and [`State`].
struct Checkpoint {
    adapter: LoraAdapter,
    moments: [Vec<f32>; 4],
    state: State,
}

impl Checkpoint {
    fn save(&self, dir: &Path, model: &Model) -> Result<()> {
        let io = |e: std::io::Error| Error::io(dir, e);
        std::fs::create_dir_all(dir).map_err(io)?;
        // Until the new state file is written the directory holds no checkpoint to resume.
        if dir.join(STATE_FILE).exists() {
            std::fs::remove_file(dir.join(STATE_FILE)).map_err(io)?;
        }
        self.adapter.save_peft(dir.join("adapter"), &model.config)?;
        let bytes: Vec<Vec<u8>> = self.moments.iter().map(|m| bytemuck::cast_slice(m).to_vec()).collect();
        let views = MOMENT_NAMES
            .iter()
            .zip(&bytes)
            .zip(&self.moments)
            .map(|((n, b), m)| safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![m.len()], b).map(|v| (n.to_string(), v)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::bad_file(dir, format!("checkpoint: {e}")))?;
        let data = safetensors::serialize(views, None).map_err(|e| Error::bad_file(dir, format!("checkpoint: {e}")))?;
        std::fs::write(dir.join(MOMENTS_FILE), data).map_err(io)?;
        let state = serde_json::to_string(&self.state).map_err(|e| Error::Engine(format!("checkpoint state: {e}")))?;
        // The state file last: a checkpoint without it is incomplete and is not resumed from.
        std::fs::write(dir.join(STATE_FILE), state).map_err(io)
    }

    fn load(dir: &Path, model: &Model) -> Result<Self> {
        let bad = |what: String| Error::bad_file(dir, format!("checkpoint: {what}"));
        let state: State = serde_json::from_slice(&std::fs::read(dir.join(STATE_FILE)).map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(format!("{STATE_FILE}: {e}")))?;
        let adapter = LoraAdapter::load_peft(dir.join("adapter"), &model.config, &Default::default())?;
        let bytes = std::fs::read(dir.join(MOMENTS_FILE)).map_err(|e| bad(format!("{MOMENTS_FILE}: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("{MOMENTS_FILE}: {e}")))?;
        let read = |name: &str| -> Result<Vec<f32>> {
            let t = st.tensor(name).map_err(|e| bad(format!("{MOMENTS_FILE}: {name}: {e}")))?;
            Ok(t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        };
        Ok(Self {
            adapter,
            moments: [read(MOMENT_NAMES[0])?, read(MOMENT_NAMES[1])?, read(MOMENT_NAMES[2])?, read(MOMENT_NAMES[3])?],
            state,
        })
    }
}

#[cfg(test)]
// An example lists its target ranges; these tests' lists hold one range, which is what they mean.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::train::AdapterRole;

    fn example(line: usize) -> Example {
        Example { role: AdapterRole::Selector, tokens: vec![1, 2, 3], active_from: 1, targets: vec![2..3], line, name: "t".into() }
    }

    #[test]
    fn options_no_run_can_train_with_are_refused() {
        assert!(TrainOptions::default().check(64).is_ok());
        let refused = |o: TrainOptions, says: &str| {
            let err = o.check(64).unwrap_err().to_string();
            assert!(err.contains(says), "{err}");
        };
        refused(TrainOptions { rank: 0, ..Default::default() }, "rank 0: outside 1..=64");
        refused(TrainOptions { rank: 100_000, ..Default::default() }, "rank 100000");
        refused(TrainOptions { alpha: 0.0, ..Default::default() }, "alpha 0");
        refused(TrainOptions { lr: f32::NAN, ..Default::default() }, "learning rate NaN");
        refused(TrainOptions { lr: -1e-3, ..Default::default() }, "learning rate -0.001");
        refused(TrainOptions { min_lr: f32::INFINITY, ..Default::default() }, "final learning rate inf");
        refused(TrainOptions { steps: 0, ..Default::default() }, "0 steps");
        refused(TrainOptions { batch: 0, ..Default::default() }, "of 0 examples");
        // A continued adapter brings its own rank.
        let init = LoraAdapter { rank: 4, alpha: 8.0, use_rslora: false, invocation_tokens: None, targets: BTreeMap::new() };
        assert!(TrainOptions { rank: 0, init: Some(init), ..Default::default() }.check(64).is_ok());
    }

    #[test]
    fn an_epoch_takes_every_example_once_conversation_by_conversation() {
        let train: Vec<Example> = [3, 3, 3, 5, 8, 8, 9, 9, 9, 9].into_iter().map(example).collect();
        let mut rng = SplitMix64(7);
        let mut taken: Vec<usize> = epoch_order(&train, &mut rng);
        taken.reverse();
        let mut sorted = taken.clone();
        sorted.sort();
        assert_eq!(sorted, (0..train.len()).collect::<Vec<_>>());
        // Each line's examples are consecutive and in their original order.
        for w in taken.windows(2) {
            if train[w[0]].line == train[w[1]].line {
                assert_eq!(w[1], w[0] + 1, "order {taken:?}");
            }
        }
        let changes = taken.windows(2).filter(|w| train[w[0]].line != train[w[1]].line).count();
        assert_eq!(changes, 3, "four lines, so three changes of line: {taken:?}");
        // Another seed gives another order of the lines.
        let orders: std::collections::BTreeSet<Vec<usize>> = (0..8).map(|s| epoch_order(&train, &mut SplitMix64(s))).collect();
        assert!(orders.len() > 1);
    }
}
