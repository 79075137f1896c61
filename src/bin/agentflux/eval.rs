//! `agentflux eval`: tool calls scored on a dataset, or end-to-end tasks judged by their checks —
//! deterministically, no judge model.

use crate::call::{load, Mode};
use agentflux::batch;
use agentflux::eval::{judge, read_dataset, read_tasks, task_row, Outcome, Summary, TaskOutcome, ToolSource, TASK_HEADER};
use agentflux::gpu::GpuOptions;
use agentflux::mcp::{McpClient, ServerOptions, Tool};
use agentflux::session::Session;
use agentflux::toolcall::{AgentOptions, Catalog, ToolChoice, ToolServers, FINISH, MAX_RESULT_CHARS};
use agentflux::train::Seed;
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// A GGUF path, or `default` / `gemma3` from the model cache.
    #[arg(long, default_value = "default")]
    model: String,
    /// The dataset: JSONL of {"messages", "tools" | "mcp", "expected": {"name", "arguments"}}
    /// (lines with neither take the servers of --mcp-config).
    #[arg(long, required_unless_present = "tasks", conflicts_with = "tasks")]
    dataset: Option<PathBuf>,
    /// End-to-end tasks instead: JSONL of {"task", "mcp", "max_steps", "checks"}, each run by
    /// the agent loop on the real servers in the workspace, rebuilt from --seed-file first (tasks
    /// without "mcp" take the servers of --mcp-config).
    #[arg(long)]
    tasks: Option<PathBuf>,
    /// An `mcpServers` configuration file (Claude Desktop, Cursor, VS Code): the servers of the
    /// lines and tasks that name none.
    #[arg(long)]
    mcp_config: Option<PathBuf>,
    /// The tool set's seed file, whose workspace the tasks start from.
    #[arg(long, default_value = "adapters/filesystem/data/seed.json")]
    seed_file: PathBuf,
    /// An adapter-set directory (decoupled mode).
    #[arg(long)]
    adapters: Option<PathBuf>,
    /// decoupled, monolithic or monolithic-constrained (see `agentflux call`).
    #[arg(long, value_enum, default_value = "decoupled")]
    mode: Mode,
    #[command(flatten)]
    choosing: super::call::ChoiceArgs,
    /// Decode every argument token in a pass of its own, also those the schema forces (for
    /// measuring jump-forward; the calls are the same).
    #[arg(long)]
    no_jump_forward: bool,
    /// Give each call its expected tool (lines expecting `finish` are left out): only the
    /// arguments are generated and scored, so the argument adapters are measured apart from the
    /// selector (decoupled and reference modes).
    #[arg(long, conflicts_with = "tasks")]
    given_tool: bool,
    /// The directory `{ws}` stands for (created if missing; dataset calls are scored, not run;
    /// with --tasks its contents are replaced by the seed's workspace before every task).
    #[arg(long, default_value = "/tmp/agentflux-eval-ws")]
    workspace: PathBuf,
    /// Context size.
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
    /// Write the summary and every example's result here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Examples run side by side, their forward passes shared (continuous batching); each
    /// holds a KV cache of --ctx positions. The calls are the same as one at a time.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    concurrency: u16,
}

pub fn run(a: Args, gpu: &GpuOptions) -> Result<()> {
    let Some(dataset) = &a.dataset else { return run_tasks(&a, gpu) };
    let text = std::fs::read_to_string(dataset).with_context(|| format!("reading {}", dataset.display()))?;
    let ws = a.workspace.to_string_lossy().into_owned();
    let mut examples = read_dataset(&text, &ws, MAX_RESULT_CHARS).map_err(|e| anyhow::anyhow!("{}: {e}", dataset.display()))?;
    if a.given_tool {
        if !matches!(a.mode, Mode::Decoupled | Mode::Reference) {
            anyhow::bail!("--given-tool gives the argument stage its tool: --mode decoupled or reference");
        }
        let before = examples.len();
        examples.retain(|e| e.expected_name != FINISH);
        eprintln!("--given-tool: {} lines expecting finish left out, {} scored", before - examples.len(), examples.len());
    }
    if examples.is_empty() {
        anyhow::bail!("{}: no examples to score", dataset.display());
    }
    if let Some(e) = examples.iter().find(|e| e.tools == ToolSource::Configured && a.mcp_config.is_none()) {
        anyhow::bail!("{} line {}: no \"tools\" or \"mcp\", and no --mcp-config to take servers from", dataset.display(), e.line);
    }
    if examples.iter().any(|e| e.tools != ToolSource::Configured && !matches!(e.tools, ToolSource::Inline(_))) {
        std::fs::create_dir_all(&a.workspace).with_context(|| format!("creating {}", a.workspace.display()))?;
    }
    let mut l = load(&a.model, a.adapters.as_deref(), &a.choosing, a.mode.strategy(), gpu)?;
    l.caller.set_jump_forward(!a.no_jump_forward);
    // Each server is started once, for its name and tools (calls are scored, not run).
    let mut servers: HashMap<String, (String, Vec<Tool>)> = HashMap::new();
    let mut catalogs = Vec::with_capacity(examples.len());
    let mut configured_catalog = None;
    for ex in &examples {
        catalogs.push(match &ex.tools {
            ToolSource::Inline(c) => c.clone(),
            ToolSource::Mcp(cmds) => {
                let mut c = Catalog::default();
                for cmd in cmds {
                    if !servers.contains_key(cmd) {
                        let mut s = McpClient::open(cmd, &[], ServerOptions::default())
                            .with_context(|| format!("line {}: starting `{cmd}`", ex.line))?;
                        let tools = s.list_tools().with_context(|| format!("line {}: listing the tools of `{cmd}`", ex.line))?;
                        servers.insert(cmd.clone(), (s.name(), tools));
                    }
                    let (name, tools) = &servers[cmd];
                    c.add(name, tools.clone()).with_context(|| format!("line {}", ex.line))?;
                }
                c
            }
            ToolSource::Configured => match &configured_catalog {
                Some(c) => Catalog::clone(c),
                None => {
                    let path = a.mcp_config.as_deref().context("--mcp-config")?;
                    let c = ToolServers::new(crate::call::start_config(path)?)?.catalog;
                    configured_catalog = Some(c.clone());
                    c
                }
            },
        });
    }
    let started = Instant::now();
    let progress = Mutex::new(crate::progress::ProgressLine::new(examples.len() as u64));
    let outcomes: Mutex<Vec<Option<Outcome>>> = Mutex::new(vec![None; examples.len()]);
    let next = AtomicUsize::new(0);
    let n_ctx = a.ctx.min(l.eng.model.config.n_ctx_train);
    // `--concurrency` workers take the examples in turn, each on its own session (the prompt its
    // examples share, system text and tool list, is computed once per session and reused).
    let pool = l.eng.model.new_pool(n_ctx, a.concurrency.max(1) as usize)?;
    batch::scope(&l.eng.model, |batcher| {
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..a.concurrency)
                .map(|_| {
                    s.spawn(|| -> Result<()> {
                        let _turn = batcher.join();
                        let mut session = Session::pooled(batcher, &pool)?;
                        loop {
                            let i = next.fetch_add(1, Ordering::SeqCst);
                            let Some(ex) = examples.get(i) else { return Ok(()) };
                            let call = if a.given_tool {
                                let tool = ToolChoice::Function(ex.expected_name.clone());
                                l.caller
                                    .call_with(&mut session, &catalogs[i], &ex.messages, &l.adapters, &tool, |_| ControlFlow::Continue(()))
                            } else {
                                a.mode.call(&l, &mut session, &catalogs[i], &ex.messages)
                            };
                            let outcome = Outcome::score(ex, &catalogs[i], call.as_ref().map_err(|e| e.to_string()));
                            let mut all = outcomes.lock().map_err(|_| anyhow::anyhow!("an eval worker failed"))?;
                            all[i] = Some(outcome);
                            let (done, right) = (all.iter().flatten().count(), all.iter().flatten().filter(|o| o.full_ok).count());
                            drop(all);
                            if let Ok(mut p) = progress.lock() {
                                p.update(done as u64, false, || {
                                    format!(
                                        "[eval] {done}/{} · {right} full calls right · {:.0} s",
                                        examples.len(),
                                        started.elapsed().as_secs_f64()
                                    )
                                });
                            }
                        }
                    })
                })
                .collect();
            workers.into_iter().try_for_each(|w| w.join().map_err(|_| anyhow::anyhow!("an eval worker panicked"))?)
        })
    })?;
    let outcomes: Vec<Outcome> =
        outcomes.into_inner().map_err(|_| anyhow::anyhow!("an eval worker failed"))?.into_iter().flatten().collect();
    let mut progress = progress.into_inner().map_err(|_| anyhow::anyhow!("an eval worker failed"))?;
    progress.finish();
    let summary = Summary::of(&outcomes);
    let label = if a.given_tool { format!("{} (tool given)", a.mode.name()) } else { a.mode.name().to_string() };
    println!("{}\n{}", Summary::HEADER, summary.row(&label));
    let per_tool: Vec<String> = summary.per_tool.iter().map(|(t, (ok, n))| format!("{t} {ok}/{n}")).collect();
    println!("\nselection by expected tool: {}", per_tool.join(", "));
    let saved: Vec<String> = summary
        .jump_forward
        .iter()
        .map(|(t, j)| format!("{t} {} of {} tokens in {} calls", j.tokens - j.passes.min(j.tokens), j.tokens, j.calls))
        .collect();
    if !saved.is_empty() {
        println!("decode steps jump-forward saved, by tool: {}", saved.join(", "));
    }
    if let Some(first) = outcomes.iter().find(|o| o.error.is_some()) {
        let why = first.error.as_deref().unwrap_or_default();
        let calls = if summary.errors == 1 { "call" } else { "calls" };
        println!("{} {calls} failed, the first (line {}): {why} (--json has every one)", summary.errors, first.line);
    }
    if let Some(path) = &a.json {
        let v = serde_json::json!({"mode": a.mode.name(), "given_tool": a.given_tool, "model": a.model, "dataset": a.dataset, "adapters": a.adapters, "device": l.eng.ctx.describe(), "summary": summary, "examples": outcomes});
        std::fs::write(path, serde_json::to_string_pretty(&v)?).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `--tasks`: every task from the seed's workspace, by the agent loop on its real servers,
/// judged by its checks.
fn run_tasks(a: &Args, gpu: &GpuOptions) -> Result<()> {
    let path = a.tasks.as_ref().context("--dataset or --tasks is required")?;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let ws = a.workspace.to_string_lossy().into_owned();
    let tasks = read_tasks(&text, &ws).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if tasks.is_empty() {
        anyhow::bail!("{}: no tasks", path.display());
    }
    let seed = Seed::load(&a.seed_file)?;
    if !matches!(a.mode, Mode::Decoupled | Mode::Reference) {
        anyhow::bail!("--tasks runs the agent loop: --mode decoupled or reference");
    }
    let l = load(&a.model, a.adapters.as_deref(), &a.choosing, a.mode.strategy(), gpu)?;
    let mut session = Session::new(&l.eng.model, a.ctx.min(l.eng.model.config.n_ctx_train))?;
    let started = Instant::now();
    let mut progress = crate::progress::ProgressLine::new(tasks.len() as u64);
    let mut outcomes = Vec::new();
    for (i, task) in tasks.iter().enumerate() {
        seed.reset_workspace(&a.workspace)?;
        let t0 = Instant::now();
        let servers = match (&task.mcp[..], &a.mcp_config) {
            ([], Some(path)) => crate::call::start_config(path)?,
            ([], None) => anyhow::bail!("{} line {}: no \"mcp\", and no --mcp-config to take servers from", path.display(), task.line),
            (servers, _) => servers
                .iter()
                .map(|s| McpClient::open(s, &[], ServerOptions::default()).with_context(|| format!("line {}: starting `{s}`", task.line)))
                .collect::<Result<Vec<_>>>()?,
        };
        let agent = ToolServers::new(servers).with_context(|| format!("line {}", task.line))?;
        let run =
            agent.run(&l.caller, &mut session, &l.adapters, &task.task, &AgentOptions::new(task.max_steps, 160, &l.eng.tokenizer), |_| {});
        let mut outcome = match run {
            Ok(events) => judge(task, &events),
            Err(e) => TaskOutcome {
                line: task.line,
                failed: vec![format!("the run failed: {e}")],
                error: Some(e.to_string()),
                ..Default::default()
            },
        };
        outcome.ms = t0.elapsed().as_secs_f64() * 1e3;
        outcomes.push(outcome);
        let done = i + 1;
        progress.update(done as u64, false, || {
            let ok = outcomes.iter().filter(|o| o.success).count();
            format!("[eval] task {done}/{} · {ok} succeeded · {:.0} s", tasks.len(), started.elapsed().as_secs_f64())
        });
    }
    progress.finish();
    println!("{TASK_HEADER}\n{}", task_row(a.mode.name(), &outcomes));
    for o in outcomes.iter().filter(|o| !o.success) {
        let calls: Vec<String> = o.calls.iter().zip(&o.arguments).map(|(name, args)| format!("{name} {args}")).collect();
        println!("line {}: {} (calls: {})", o.line, o.failed.join("; "), calls.join(", "));
    }
    if let Some(out) = &a.json {
        let v = serde_json::json!({"mode": a.mode.name(), "model": a.model, "tasks": path, "adapters": a.adapters, "device": l.eng.ctx.describe(), "outcomes": outcomes});
        std::fs::write(out, serde_json::to_string_pretty(&v)?).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
