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
    let run = AdapterRun { name: name.to_string(), train, val, opts: opts.clone() };
    let mut trained = train_together(model, std::slice::from_ref(&run), prefixes, |_, p| on_progress(p))?;
    Ok(trained.remove(0))
}

/// One adapter of a run: its name, its training and validation examples, and how to train it.
#[derive(Debug, Clone)]
pub struct AdapterRun<'a> {
    /// The adapter's name (in errors and in the model's registry while it trains).
    pub name: String,
    /// Its training examples.
    pub train: &'a [Example],
    /// Its validation examples.
    pub val: &'a [Example],
    /// Its options: each adapter keeps its own steps, schedule, validation and checkpoint.
    pub opts: TrainOptions,
}

/// Train several adapters in rounds: in each, every adapter with steps left takes its next step's
/// examples, and all of them run side by side in the same passes, each row under its own
/// adapter ([`crate::model::AdapterBuffers::add_gradients_each`]); then each adapter takes its
/// optimizer step, and validates and checkpoints on its own schedule. Each adapter sees the
/// examples, order and updates it would see trained alone, so it ends as it would alone (up to
/// the order of floating-point sums); a set's adapters share each pass over the base weights
/// instead of one pass each. `on_progress(i, p)` reports adapter `runs[i]`'s step; its
/// examples/s counts a round's time in proportion to its share of the round's examples. Returns
/// each adapter as [`train_adapter`] does, in the order of `runs`.
pub fn train_together(
    model: &Model,
    runs: &[AdapterRun],
    prefixes: &mut PrefixCache,
    mut on_progress: impl FnMut(usize, &Progress),
) -> Result<Vec<(LoraAdapter, Option<f32>)>> {
    let max_rank = model.lora_limits()?.max_rank;
    for run in runs {
        check_run(model, run, max_rank)?;
    }
    // Every adapter is resident before the gradient and moment buffers are made: they are laid
    // out like the packs, which move when they grow.
    let mut learners: Vec<Learner> = Vec::with_capacity(runs.len());
    let result = (|| {
        for run in runs {
            let learner = Learner::new(model, run).map_err(|err| match err {
                // Together, every adapter is resident at once: say so where they do not fit.
                Error::Adapter(e) if runs.len() > 1 => Error::InvalidOption(format!(
                    "{e}: {} adapters trained together are all resident at once; train fewer together or one after the other",
                    runs.len()
                )),
                err => err,
            })?;
            learners.push(learner);
        }
        let buffers = AdapterTraining::new(model)?;
        rounds(model, &mut learners, &buffers, prefixes, &mut on_progress)
    })();
    let weights: Result<Vec<_>> = result.and_then(|()| {
        learners
            .iter_mut()
            .map(|l| match l.best.take() {
                Some(Best { loss, targets }) => Ok((targets, Some(loss))),
                None => Ok((model.read_adapter_weights(l.id)?, None)),
            })
            .collect()
    });
    for l in &learners {
        model.remove_adapter(l.id)?;
    }
    Ok(weights?.into_iter().zip(learners).map(|((targets, eval), l)| (LoraAdapter { targets, ..l.init }, eval)).collect())
}

/// Refuse a run no training can take, before anything is allocated: its options, no examples,
/// or an example a pass cannot take (found at step 40, it would lose the run).
fn check_run(model: &Model, run: &AdapterRun, max_rank: usize) -> Result<()> {
    let name = &run.name;
    run.opts.check(max_rank).map_err(|err| match err {
        Error::InvalidOption(msg) => Error::InvalidOption(format!("{name}: {msg}")),
        err => err,
    })?;
    if run.train.is_empty() {
        return Err(Error::InvalidOption(format!("{name}: no training examples")));
    }
    for e in run.train.iter().chain(run.val) {
        model
            .check_example(&e.rows())
            .map_err(|err| Error::InvalidOption(format!("{name}: the example of data line {}: {err}", e.line)))?;
    }
    Ok(())
}

/// Where one adapter's training stands.
struct Learner<'a> {
    run: &'a AdapterRun<'a>,
    /// Its starting point (config and weights), whose config the result keeps.
    init: LoraAdapter,
    id: AdapterId,
    /// Moments to restore once the buffers exist (a resumed run).
    moments: Option<[Vec<f32>; 4]>,
    schedule: Schedule,
    rng: SplitMix64,
    /// What is left of the current pass over the examples, taken from the back.
    order: Vec<usize>,
    /// The next step, and the last this run takes.
    step: u64,
    last: u64,
    /// Training examples taken and the seconds they are counted (validation not counted).
    seen: usize,
    secs: f64,
    eval_loss: Option<f32>,
    best: Option<Best>,
}

impl<'a> Learner<'a> {
    /// The adapter made resident: resumed from its checkpoint, continued from `opts.init`, or new.
    fn new(model: &Model, run: &'a AdapterRun<'a>) -> Result<Self> {
        let opts = &run.opts;
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
        let id = model.add_adapter(&run.name, &init)?;
        let (mut step, mut rng, mut order, mut moments) = (1, SplitMix64(opts.seed ^ 0x5eed), Vec::new(), None);
        if let Some(c) = resume {
            (step, rng, order, moments) = (c.state.step + 1, SplitMix64(c.state.rng), c.state.order, Some(c.moments));
        }
        Ok(Self {
            run,
            init,
            id,
            moments,
            schedule: Schedule { peak: opts.lr, min: opts.min_lr, warmup: opts.warmup, total: opts.steps },
            rng,
            order,
            step,
            last: opts.stop_after.map_or(opts.steps, |s| s.min(opts.steps)),
            seen: 0,
            secs: 0.0,
            eval_loss: None,
            best: None,
        })
    }

    /// The examples of its next step, in its seeded order.
    fn next_batch(&mut self) -> Vec<usize> {
        let train = self.run.train;
        (0..self.run.opts.batch)
            .map(|_| {
                if self.order.is_empty() {
                    self.order = epoch_order(train, &mut self.rng);
                }
                self.order.pop().expect("refilled above")
            })
            .collect()
    }

    /// The validation loss, forward only; the best weights kept; the run checkpointed.
    fn validate(&mut self, model: &Model, buffers: &AdapterTraining, prefix: &mut PrefixCache) -> Result<()> {
        let (run, adapter) = (self.run, ActiveAdapter::new(self.id));
        if !run.val.is_empty() {
            let losses = example_losses(model, prefix, &run.val.iter().map(Example::rows).collect::<Vec<_>>(), adapter)?;
            self.eval_loss = Some(losses.iter().sum::<f32>() / run.val.len() as f32);
        }
        if let Some(loss) = self.eval_loss.filter(|l| self.best.as_ref().is_none_or(|b| *l < b.loss)) {
            self.best = Some(Best { loss, targets: model.read_adapter_weights(self.id)? });
        }
        if let Some(dir) = &run.opts.checkpoint {
            let adapter = LoraAdapter { targets: model.read_adapter_weights(self.id)?, ..self.init.clone() };
            let state = State { step: self.step, rng: self.rng.0, order: self.order.clone() };
            Checkpoint { adapter, moments: buffers.read_moments(model, self.id)?, state }.save(dir, model)?;
        }
        Ok(())
    }
}

/// Rounds until every learner has taken its last step.
fn rounds(
    model: &Model,
    learners: &mut [Learner],
    buffers: &AdapterTraining,
    prefix: &mut PrefixCache,
    on_progress: &mut impl FnMut(usize, &Progress),
) -> Result<()> {
    for l in learners.iter_mut() {
        if let Some(moments) = l.moments.take() {
            buffers.write_moments(model, l.id, &moments)?;
        }
    }
    loop {
        let taking: Vec<usize> = (0..learners.len()).filter(|&i| learners[i].step <= learners[i].last).collect();
        if taking.is_empty() {
            return Ok(());
        }
        let t0 = Instant::now();
        let batches: Vec<Vec<usize>> = taking.iter().map(|&i| learners[i].next_batch()).collect();
        let mut examples = Vec::new();
        let mut adapters = Vec::new();
        for (&i, batch) in taking.iter().zip(&batches) {
            examples.extend(batch.iter().map(|&e| learners[i].run.train[e].rows()));
            adapters.extend(std::iter::repeat_n(ActiveAdapter::new(learners[i].id), batch.len()));
        }
        // The round's examples side by side in as few passes as fit.
        let losses = buffers.grads.add_gradients_each(model, prefix, &examples, &adapters)?;
        for &i in &taking {
            let l = &learners[i];
            buffers.step(model, l.id, &l.run.opts.optimizer, l.step, l.schedule.lr(l.step))?;
        }
        let round_secs = t0.elapsed().as_secs_f64();
        let mut losses = losses.into_iter();
        for (&i, batch) in taking.iter().zip(&batches) {
            let l = &mut learners[i];
            let loss: f32 = losses.by_ref().take(batch.len()).sum();
            l.seen += batch.len();
            l.secs += round_secs * batch.len() as f64 / examples.len() as f64;
            let opts = &l.run.opts;
            let validated = (opts.eval_every > 0 && l.step % opts.eval_every == 0) || l.step == l.last;
            if validated {
                l.validate(model, buffers, prefix)?;
            }
            let examples_per_s = l.seen as f64 / l.secs.max(1e-9);
            let p = Progress {
                step: l.step,
                steps: opts.steps,
                loss: loss / batch.len() as f32,
                eval_loss: l.eval_loss,
                validated,
                examples_per_s,
            };
            on_progress(i, &p);
            l.step += 1;
        }
    }
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
