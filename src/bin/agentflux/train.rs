//! `agentflux train`: the decoupled adapter set — one selector, one argument adapter per tool —
//! trained on the GPU from trajectories, saved in PEFT format with the set's manifest.

use agentflux::gpu::GpuOptions;
use agentflux::lora::SavedDtype;
use agentflux::lora::{LoraAdapter, LoraLimits};
use agentflux::model::PrefixCache;
use agentflux::toolcall::{ArgumentCue, Manifest, ToolCaller, MAX_RESULT_CHARS, SELECT_CUE};
use agentflux::train::{
    cap_finish_share, has_checkpoint, read_trajectories, split_examples, train_adapter_with, train_together, AdapterRole, AdapterRun,
    Example, Progress, TrainOptions,
};
use agentflux::{resolve_model, Engine};
use anyhow::{Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A GGUF path, or `default` from the model cache.
    #[arg(long, default_value = "default")]
    model: String,
    /// Trajectories: OpenAI chat JSONL with tool calls (see `agentflux data check`). Default:
    /// TOOLSET/data/synth.jsonl, made first from TOOLSET/data/seed.json by `agentflux data synth`
    /// (its defaults) when it does not exist.
    #[arg(long)]
    data: Option<PathBuf>,
    /// The tool set's directory, where its adapter set is written (manifest.json, selector/,
    /// args/<tool>/).
    #[arg(long, visible_alias = "out")]
    toolset: PathBuf,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha (scale = alpha / rank).
    #[arg(long, default_value_t = 16.0)]
    alpha: f32,
    /// Optimizer steps per adapter.
    #[arg(long, default_value_t = 200, value_parser = at_least_one::<u64>)]
    steps: u64,
    /// Passes over each adapter's training examples instead of a number of steps: an adapter of
    /// n examples takes ⌈epochs · n / batch⌉ steps (a set's adapters hold very different counts).
    #[arg(long, conflicts_with = "steps", value_parser = at_least_one::<u64>)]
    epochs: Option<u64>,
    /// Examples per step (gradient accumulation).
    #[arg(long, default_value_t = 4, value_parser = at_least_one::<usize>)]
    batch: usize,
    /// Peak learning rate (warmup then cosine decay to a tenth).
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    /// Warmup steps.
    #[arg(long, default_value_t = 10)]
    warmup: u64,
    /// Validation loss every N steps.
    #[arg(long, default_value_t = 50)]
    eval_every: u64,
    /// Seed of the split, the initial weights and the example order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Longest training sequence in tokens.
    #[arg(long, default_value_t = 2048)]
    max_tokens: usize,
    /// Train only these adapters (`selector`, `answer` or tool names; repeatable); the other adapters of a
    /// set already in --toolset stay in its manifest.
    #[arg(long)]
    only: Vec<String>,
    /// Checkpoint each adapter's run under DIR/<adapter> at every validation step; a rerun with
    /// the same options resumes from there.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Stop each adapter after this step (resume later with --checkpoint).
    #[arg(long)]
    stop_after: Option<u64>,
    /// Validation examples per adapter at most (the first ones, whole conversations; 0: all).
    #[arg(long, default_value_t = 0)]
    val_examples: usize,
    /// Continue training: start each adapter from the one --toolset already holds (its rank,
    /// alpha and weights; fresh optimizer moments and schedule). --seed also sets the split, so
    /// keep it; to go on through the same pass over the examples, rerun with the --checkpoint.
    #[arg(long = "continue")]
    continue_set: bool,
    /// Leave out a seeded subset of the selector's `finish` examples so they make at most this
    /// share of its training examples (synthesized conversations end in an answer after one to
    /// three calls, so about half are `finish`). 1 keeps them all.
    #[arg(long, default_value_t = 1.0)]
    finish_share: f32,
    /// How the exported weights are stored: f16 (half the size) or f32.
    #[arg(long, value_enum, default_value_t = Dtype::F16)]
    dtype: Dtype,
    /// Where each argument adapter is switched on: at `schema:` (the tool's schema is read under
    /// the adapter, its rows trained) or at `args:` right before the arguments (the schema joins
    /// the frozen prefix, computed once with the base weights: about a third of the rows to
    /// train). Saved as the adapter's invocation tokens, which inference follows.
    #[arg(long, value_enum, default_value_t = ArgsActivation::Schema)]
    args_activation: ArgsActivation,
    /// Time each adapter's last optimizer step that does not validate on the GPU (its examples'
    /// forward and backward passes and the AdamW update; the first step also compiles kernels, a
    /// late one shows the steady state of a run of several epochs) and print where it goes:
    /// by kernel, and by phase — forward, backward, optimizer, and host (what the GPU did not
    /// account for). Training goes on as usual.
    #[arg(long)]
    profile: bool,
    /// Train the adapters together: in rounds, every adapter that has steps left takes its next
    /// step, the round's examples side by side in the same passes, each row under its own
    /// adapter (the multi-LoRA path, backward included). Each adapter sees the same examples,
    /// order and updates as trained alone, so the set comes out the same; the adapters share
    /// each pass over the base weights (on a GPU, where a pass of few rows is bound by reading
    /// them, fewer passes), and all of them are resident at once. Not with --profile
    /// (AGENTFLUX_PROFILE=1 times the whole run by kernel).
    #[arg(long, conflicts_with = "profile")]
    together: bool,
    /// MiB of KV cache kept of the examples' frozen prefixes (system text, tools, conversation):
    /// each computed once for every epoch and validation while they fit.
    #[arg(long, default_value_t = 1024)]
    prefix_cache_mib: u64,
    /// Append every step's loss to FILE as JSON lines (`{"adapter", "step", "loss", "val_loss"}`,
    /// the validation loss on the steps that measured one), for `tools/loss-chart`.
    #[arg(long)]
    loss_log: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Dtype {
    F16,
    F32,
}

/// `--args-activation`: the cue that switches argument adapters on.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ArgsActivation {
    /// At `schema:`.
    Schema,
    /// At `args:`.
    Args,
}

impl From<ArgsActivation> for ArgumentCue {
    fn from(a: ArgsActivation) -> Self {
        match a {
            ArgsActivation::Schema => ArgumentCue::Schema,
            ArgsActivation::Args => ArgumentCue::Args,
        }
    }
}

pub fn run(a: Args, gpu: &GpuOptions) -> Result<()> {
    let data = match &a.data {
        Some(d) => d.clone(),
        None => synthesized(&a.toolset)?,
    };
    let text = std::fs::read_to_string(&data).with_context(|| format!("reading {}", data.display()))?;
    let path = resolve_model(&a.model)?;
    let eng = Engine::load(&path, gpu).with_context(|| format!("loading {}", path.display()))?;
    let caller = ToolCaller::new(eng.tokenizer.clone(), eng.template.clone())?;
    let (trajectories, mut report) = read_trajectories(&text, MAX_RESULT_CHARS);
    let tools: BTreeSet<String> = trajectories.iter().flat_map(|t| t.catalog.names().into_iter().map(str::to_string)).collect();
    let parts = split_examples(&caller, trajectories, a.seed, a.max_tokens, a.args_activation.into(), &mut report)?;
    let (train, val) = (parts.train.examples, parts.val.examples);
    eprint!("{}", report.summary(3));
    eprintln!("{} training and {} validation examples on {}", train.len(), val.len(), eng.ctx.describe());
    let by_role = |examples: Vec<Example>| {
        let mut m: BTreeMap<AdapterRole, Vec<Example>> = BTreeMap::new();
        for e in examples {
            m.entry(e.role.clone()).or_default().push(e);
        }
        m
    };
    let (mut train, mut val) = (by_role(train), by_role(val));
    if !(0.0..=1.0).contains(&a.finish_share) {
        anyhow::bail!("--finish-share {}: a share between 0 and 1", a.finish_share);
    }
    if a.finish_share < 1.0 {
        if let Some(sel) = train.remove(&AdapterRole::Selector) {
            let before = sel.len();
            let kept = cap_finish_share(sel, a.finish_share, a.seed);
            eprintln!(
                "selector: {} of {before} training examples kept, `finish` at most {:.0}% (--finish-share)",
                kept.len(),
                a.finish_share * 100.0
            );
            train.insert(AdapterRole::Selector, kept);
        }
    }
    // Refused before anything is written: a run that trains nothing would rewrite the set's
    // manifest without its adapters.
    if train.is_empty() {
        anyhow::bail!(
            "{}: no training examples (the report above says why lines were dropped); {} is left as it is",
            data.display(),
            a.toolset.display()
        );
    }
    let unknown: Vec<&str> = a.only.iter().map(String::as_str).filter(|n| !train.keys().any(|r| r.name() == *n)).collect();
    if !unknown.is_empty() {
        let known: Vec<&str> = train.keys().map(AdapterRole::name).collect();
        anyhow::bail!(
            "--only {}: no training examples for it in {} (its adapters: {}); {} is left as it is",
            unknown.join(", "),
            data.display(),
            known.join(", "),
            a.toolset.display()
        );
    }
    let opts = TrainOptions {
        rank: a.rank,
        alpha: a.alpha,
        steps: a.steps,
        batch: a.batch,
        lr: a.lr,
        min_lr: a.lr / 10.0,
        warmup: a.warmup,
        eval_every: a.eval_every,
        seed: a.seed,
        prefix_cache_bytes: a.prefix_cache_mib << 20,
        ..Default::default()
    };
    let base_model = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // With --only, the set's other adapters stay as they are: start from its manifest.
    let existing = a.toolset.join(agentflux::toolcall::MANIFEST_FILE);
    let mut manifest = if !a.only.is_empty() && existing.exists() {
        let m = Manifest::read(&a.toolset)?;
        if m.base_model != base_model {
            anyhow::bail!(
                "{}: the set was trained for {}, not {base_model}; train it whole (no --only) or into another --toolset",
                existing.display(),
                m.base_model
            );
        }
        m
    } else {
        Manifest { base_model, ..Default::default() }
    };
    manifest.tools = tools.into_iter().collect();
    std::fs::create_dir_all(&a.toolset).with_context(|| format!("creating {}", a.toolset.display()))?;
    // One set of kept prefixes for every adapter: they are computed with the base weights, so an
    // argument adapter continues the conversations the selector's examples computed.
    let mut prefixes = PrefixCache::with_budget(opts.prefix_cache_bytes);
    let mut loss_log = match &a.loss_log {
        Some(p) => Some(LossLog::open(p)?),
        None => None,
    };
    // Each adapter's run, prepared before any trains.
    let mut prepared: Vec<Prepared> = Vec::new();
    for (role, examples) in &train {
        let (name, dir) = (role.name().to_string(), role.dir());
        if !a.only.is_empty() && !a.only.contains(&name) {
            continue;
        }
        // Examples a pass cannot take (a long answer quoting a long result) are left out, named.
        let fits = |e: &Example| eng.model.check_example(&e.rows()).is_ok();
        let (examples, left_out): (Vec<Example>, Vec<Example>) = examples.iter().cloned().partition(fits);
        if !left_out.is_empty() {
            let lines: Vec<String> = left_out.iter().map(|e| e.line.to_string()).collect();
            eprintln!("[{name}] {} examples too long for one training pass left out (data lines {})", left_out.len(), lines.join(", "));
        }
        let mut held_out: Vec<Example> = val.remove(role).unwrap_or_default().into_iter().filter(fits).collect();
        if a.val_examples > 0 {
            held_out.truncate(a.val_examples);
        }
        let checkpoint = a.checkpoint.as_ref().map(|c| c.join(&dir));
        let from = a.toolset.join(&dir);
        let init = match &checkpoint {
            // A saved run wins over --continue: its adapter, moments and order are resumed.
            Some(c) if has_checkpoint(c) => {
                eprintln!("[{name}] resuming the run saved in {}", c.display());
                None
            }
            _ if a.continue_set && from.join("adapter_config.json").exists() => {
                let prev = LoraAdapter::load_peft(&from, &eng.model.config, &LoraLimits::default())
                    .with_context(|| format!("--continue: loading {}", from.display()))?;
                eprintln!("[{name}] continuing from {} (rank {}, alpha {})", from.display(), prev.rank, prev.alpha);
                Some(prev)
            }
            _ if a.continue_set => {
                eprintln!("[{name}] --continue: no adapter in {} yet, starting fresh", from.display());
                None
            }
            _ => None,
        };
        let steps = a.epochs.map_or(a.steps, |e| e.saturating_mul(examples.len() as u64).div_ceil(a.batch as u64));
        let opts = TrainOptions { steps, checkpoint, stop_after: a.stop_after, init, ..opts.clone() };
        prepared.push(Prepared { role: role.clone(), examples, held_out, opts });
    }
    let runs: Vec<AdapterRun> = prepared
        .iter()
        .map(|p| AdapterRun { name: p.role.name().to_string(), train: &p.examples, val: &p.held_out, opts: p.opts.clone() })
        .collect();
    // Over the whole set: examples trained and the seconds they took (validation not counted).
    let (mut set_examples, mut set_secs) = (0u64, 0.0f64);
    let mut save = |(p, run): (&Prepared, &AdapterRun), t: Trained| -> Result<()> {
        set_examples += t.seen;
        set_secs += t.seen as f64 / t.examples_per_s.max(1e-9);
        save_adapter(&a, &eng, &mut manifest, &p.role, run, t.adapter)
    };
    if a.together {
        for (run, t) in prepared.iter().zip(&runs).zip(train_set_together(&eng, &runs, &mut prefixes, loss_log.as_mut())?) {
            save(run, t)?;
        }
    } else {
        // Each adapter saved as soon as it is trained: an error in a later one loses nothing.
        for run in prepared.iter().zip(&runs) {
            let t = train_one(&eng, run.1, a.profile, &mut prefixes, loss_log.as_mut())?;
            save(run, t)?;
        }
    }
    if runs.len() > 1 {
        eprintln!(
            "the set: {} adapters, {set_examples} examples in {set_secs:.0} s of training, {}",
            runs.len(),
            speed(set_examples as f64 / set_secs.max(1e-9))
        );
    }
    manifest.write(&a.toolset)?;
    println!("wrote the adapter set to {}", a.toolset.display());
    Ok(())
}

/// Save a trained adapter into the set's directory and name it in the manifest. It is exported
/// as activated LoRA: it applies from the cue where inference activates it (`call:` for the
/// selector and the answer, `schema:` or `args:` for an argument adapter), for PEFT and vLLM too.
fn save_adapter(a: &Args, eng: &Engine, manifest: &mut Manifest, role: &AdapterRole, run: &AdapterRun, adapter: LoraAdapter) -> Result<()> {
    let cue = match role {
        AdapterRole::Arguments(_) => ArgumentCue::from(a.args_activation).text(),
        _ => SELECT_CUE,
    };
    let cue = eng.tokenizer.encode(cue, false)?;
    let invocation = run.train.iter().all(|e| e.tokens[e.active_from..].starts_with(&cue)).then_some(cue);
    if invocation.is_none() {
        eprintln!("[{}] the examples do not all start at the cue: saved as a standard LoRA", run.name);
    }
    let adapter = LoraAdapter { invocation_tokens: invocation, ..adapter };
    let dtype = match a.dtype {
        Dtype::F16 => SavedDtype::F16,
        Dtype::F32 => SavedDtype::F32,
    };
    let dir = role.dir();
    adapter.save_peft_as(a.toolset.join(&dir), &eng.model.config, dtype)?;
    match role {
        AdapterRole::Selector => manifest.selector = Some(dir),
        AdapterRole::Arguments(tool) => {
            manifest.arguments.insert(tool.clone(), dir);
        }
        AdapterRole::Answer => manifest.answer = Some(dir),
    }
    Ok(())
}

/// One adapter's run as the command prepares it.
struct Prepared {
    role: AdapterRole,
    examples: Vec<Example>,
    held_out: Vec<Example>,
    opts: TrainOptions,
}

/// An adapter as training left it, with the training examples it took and their rate.
struct Trained {
    adapter: LoraAdapter,
    seen: u64,
    examples_per_s: f64,
}

/// The line that ends an adapter's training.
fn report(name: &str, examples: usize, secs: f64, examples_per_s: f64, prefixes: Option<(usize, usize)>, eval: Option<f32>) {
    let prefixes =
        prefixes.map_or(String::new(), |(computed, reused)| format!(", prefix positions {computed} computed and {reused} reused"));
    let eval = eval.map_or(String::new(), |l| format!(", kept its best validation loss {l:.3}"));
    eprintln!("[{name}] {examples} examples, {secs:.0} s, training {}{prefixes}{eval}", speed(examples_per_s));
}

/// One adapter trained on its own, continuing `prefixes`.
fn train_one(
    eng: &Engine,
    run: &AdapterRun,
    profile: bool,
    prefixes: &mut PrefixCache,
    mut loss_log: Option<&mut LossLog>,
) -> Result<Trained> {
    let (name, opts) = (&run.name, &run.opts);
    let t0 = std::time::Instant::now();
    let mut progress = crate::progress::ProgressLine::new(opts.steps);
    let (mut examples_per_s, mut steps_run) = (0.0, 0u64);
    let last = opts.stop_after.map_or(opts.steps, |s| s.min(opts.steps));
    let mut profiled = StepProfile::new(profile && last >= 2, last, opts.eval_every);
    let (computed, reused) = (prefixes.computed(), prefixes.reused());
    let (adapter, eval) = train_adapter_with(&eng.model, name, run.train, run.val, opts, prefixes, |p| {
        profiled.after_step(eng, name, p, opts.batch);
        if let Some(log) = loss_log.as_deref_mut() {
            log.write(name, p.step, p.loss, p.eval_loss.filter(|_| p.validated));
        }
        (examples_per_s, steps_run) = (p.examples_per_s, steps_run + 1);
        progress.update(p.step, p.validated, || step_line(name, p));
    })?;
    progress.finish();
    if let Some(log) = loss_log {
        log.check()?;
    }
    let computed_reused = (prefixes.computed() - computed, prefixes.reused() - reused);
    report(name, run.train.len(), t0.elapsed().as_secs_f64(), examples_per_s, Some(computed_reused), eval);
    Ok(Trained { adapter, seen: steps_run * opts.batch as u64, examples_per_s })
}

/// `--together`: the adapters trained in rounds, each round's examples of every adapter in the
/// same passes ([`train_together`]).
fn train_set_together(
    eng: &Engine,
    runs: &[AdapterRun],
    prefixes: &mut PrefixCache,
    mut loss_log: Option<&mut LossLog>,
) -> Result<Vec<Trained>> {
    let t0 = std::time::Instant::now();
    let rounds = runs.iter().map(|r| r.opts.stop_after.map_or(r.opts.steps, |s| s.min(r.opts.steps))).max().unwrap_or(0);
    eprintln!("{} adapters together, {rounds} rounds: each round's steps side by side in the same passes", runs.len());
    let mut progress = crate::progress::ProgressLine::new(rounds);
    // Each adapter's steps taken and its latest rate.
    let mut taken: Vec<(u64, f64)> = vec![(0, 0.0); runs.len()];
    let (computed, reused) = (prefixes.computed(), prefixes.reused());
    let trained = train_together(&eng.model, runs, prefixes, |i, p| {
        let name = &runs[i].name;
        if let Some(log) = loss_log.as_deref_mut() {
            log.write(name, p.step, p.loss, p.eval_loss.filter(|_| p.validated));
        }
        taken[i] = (taken[i].0 + 1, p.examples_per_s);
        progress.update(p.step, p.validated, || step_line(name, p));
    })?;
    progress.finish();
    if let Some(log) = loss_log {
        log.check()?;
    }
    eprintln!(
        "{} adapters in {:.0} s, prefix positions {} computed and {} reused",
        runs.len(),
        t0.elapsed().as_secs_f64(),
        prefixes.computed() - computed,
        prefixes.reused() - reused
    );
    Ok(runs
        .iter()
        .zip(trained)
        .zip(taken)
        .map(|((run, (adapter, eval)), (steps, examples_per_s))| {
            let seen = steps * run.opts.batch as u64;
            report(&run.name, run.train.len(), seen as f64 / examples_per_s.max(1e-9), examples_per_s, None, eval);
            Trained { adapter, seen, examples_per_s }
        })
        .collect())
}

/// A progress line's words for one step.
fn step_line(name: &str, p: &Progress) -> String {
    let eval = p.eval_loss.map_or(String::new(), |l| format!(" · val {l:.3}"));
    format!("[{name}] step {}/{} · loss {:.3}{eval} · {}", p.step, p.steps, p.loss, speed(p.examples_per_s))
}

/// `--loss-log`: steps appended as JSON lines; the first write error is kept and reported after
/// the adapter's run (training is not stopped for its log).
struct LossLog {
    path: PathBuf,
    file: std::fs::File,
    failed: Option<std::io::Error>,
}

impl LossLog {
    fn open(path: &std::path::Path) -> Result<Self> {
        let file =
            std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("--loss-log {}", path.display()))?;
        Ok(Self { path: path.to_path_buf(), file, failed: None })
    }

    fn write(&mut self, adapter: &str, step: u64, loss: f32, val_loss: Option<f32>) {
        use std::io::Write;
        if self.failed.is_none() {
            let line = serde_json::json!({"adapter": adapter, "step": step, "loss": loss, "val_loss": val_loss});
            self.failed = writeln!(self.file, "{line}").err();
        }
    }

    fn check(&mut self) -> Result<()> {
        match self.failed.take() {
            Some(e) => Err(e).with_context(|| format!("writing --loss-log {}", self.path.display())),
            None => Ok(()),
        }
    }
}

/// The tool set's synthesized trajectories, made from its seed file the first time.
fn synthesized(toolset: &std::path::Path) -> Result<PathBuf> {
    let (seed, out) = (toolset.join("data/seed.json"), toolset.join("data/synth.jsonl"));
    if !out.exists() {
        if !seed.exists() {
            anyhow::bail!(
                "no --data given and {} does not exist to make it from: pass --data FILE.jsonl, or a --toolset with data/seed.json",
                seed.display()
            );
        }
        eprintln!("no --data given: making {} from {} (agentflux data synth)", out.display(), seed.display());
        // synth writes aside and renames when complete: an interrupted run leaves no partial data.
        let made = crate::data::SynthArgs::with_defaults(&seed, &out).and_then(crate::data::synth);
        made.with_context(|| {
            format!(
                "making {} (or make it yourself with `agentflux data synth --seed-file {} --out FILE`, then pass --data FILE)",
                out.display(),
                seed.display()
            )
        })?;
    }
    Ok(out)
}

/// A count of at least 1 (`--steps`, `--batch`): with none the run would train nothing.
fn at_least_one<T: std::str::FromStr + From<u8> + PartialOrd>(s: &str) -> std::result::Result<T, String> {
    match s.parse::<T>() {
        Ok(n) if n >= T::from(1) => Ok(n),
        Ok(_) => Err("at least 1".into()),
        Err(_) => Err("a whole number".into()),
    }
}

/// A rate as people read it: examples per second, or seconds per example when slower.
fn speed(examples_per_s: f64) -> String {
    if examples_per_s >= 1.0 {
        format!("{examples_per_s:.2} examples/s")
    } else {
        format!("{:.2} s/example", 1.0 / examples_per_s.max(1e-9))
    }
}

/// `--profile`: the GPU's kernels during one optimizer step, between two progress reports: the
/// last that does not validate (the first also compiles kernels, a later one shows the steady
/// state, prefixes kept where epochs repeat; a validating one would count the validation's passes
/// as the step's). Only where every step from the second on validates is the last one timed,
/// validation included, and the report says so.
struct StepProfile {
    /// Whether the step is still to be timed.
    wanted: bool,
    /// The step timed.
    step: u64,
    started: Option<std::time::Instant>,
}

impl StepProfile {
    /// Profile one of steps 2..=`last` of a run validating every `eval_every` steps and at `last`.
    fn new(wanted: bool, last: u64, eval_every: u64) -> Self {
        let quiet = |s: &u64| eval_every == 0 || s % eval_every != 0;
        let step = (2..last).rev().find(quiet).unwrap_or(last);
        Self { wanted, step, started: None }
    }

    /// Called after each step: starts timing after the one before the timed step, prints after it.
    fn after_step(&mut self, eng: &Engine, name: &str, p: &Progress, batch: usize) {
        if !self.wanted {
            return;
        }
        match self.started.take() {
            None if p.step + 1 == self.step => match eng.ctx.start_profiling() {
                Ok(()) => self.started = Some(std::time::Instant::now()),
                Err(e) => {
                    eprintln!("[{name}] --profile: {e}");
                    self.wanted = false;
                }
            },
            None => {}
            Some(t0) => {
                let wall = t0.elapsed().as_secs_f64();
                let kernels = eng.ctx.stop_profiling();
                self.wanted = false;
                let validation = if p.validated { " and the validation after it" } else { "" };
                println!("\n[{name}] step {}: {batch} examples{validation}, {:.2} s\n", p.step, wall);
                println!("{}", step_phases(&kernels, wall));
                println!("{}", agentflux::gpu::profile_table(&kernels, 1, "step"));
            }
        }
    }
}

/// Kernels of the backward pass, by name prefix: the loss, the transposed products, the
/// attention gradients and every `*_backward`.
const BACKWARD_KERNELS: [&str; 6] =
    ["cross_entropy", "quant_matmul_t_", "attention_grad_", "lora_backward_", "rms_norm_backward", "glu_backward"];

/// The step's time by phase: forward kernels (the prefix's and the active rows'), backward
/// kernels ([`BACKWARD_KERNELS`]), the optimizer (AdamW), and host time (the wall time the GPU
/// did not account for: recording, uploads, waiting). Told apart by kernel name, so the
/// backward's inverse rotations (`rope`) and recomputed shrinks (`lora:shrink`) count as forward.
fn step_phases(kernels: &[agentflux::gpu::KernelTime], wall: f64) -> String {
    let phase = |name: &str| {
        if name.starts_with("adamw") {
            "optimizer"
        } else if BACKWARD_KERNELS.iter().any(|k| name.starts_with(k)) {
            "backward"
        } else {
            "forward"
        }
    };
    let mut s = "| phase | s | share |\n|---|---:|---:|\n".to_string();
    let mut gpu = 0.0;
    for p in ["forward", "backward", "optimizer"] {
        let t: f64 = kernels.iter().filter(|k| phase(&k.name) == p).map(|k| k.seconds).sum();
        gpu += t;
        s.push_str(&format!("| {p} | {t:.3} | {:.1}% |\n", 100.0 * t / wall.max(1e-9)));
    }
    let host = (wall - gpu).max(0.0);
    s.push_str(&format!("| host | {host:.3} | {:.1}% |\n", 100.0 * host / wall.max(1e-9)));
    s
}
