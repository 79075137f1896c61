//! `agentflux eval`: tool calls scored on a dataset, deterministically (no judge).

use crate::call::{load, Mode};
use agentflux::eval::{read_dataset, Outcome, Summary, ToolSource};
use agentflux::gpu::GpuOptions;
use agentflux::mcp::{McpClient, ServerOptions, Tool};
use agentflux::session::Session;
use agentflux::toolcall::{Catalog, MAX_RESULT_CHARS};
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// A GGUF path, or `default` / `gemma3` from the model cache.
    #[arg(long, default_value = "default")]
    model: String,
    /// The dataset: JSONL of {"messages", "tools" | "mcp", "expected": {"name", "arguments"}}.
    #[arg(long)]
    dataset: PathBuf,
    /// An adapter-set directory (decoupled mode).
    #[arg(long)]
    adapters: Option<PathBuf>,
    /// decoupled, monolithic or monolithic-constrained (see `agentflux call`).
    #[arg(long, value_enum, default_value = "decoupled")]
    mode: Mode,
    /// With several servers, choose among every tool at once instead of the server first.
    #[arg(long)]
    no_hierarchy: bool,
    /// The directory `{ws}` stands for (created if missing; calls are scored, not run).
    #[arg(long, default_value = "/tmp/agentflux-eval-ws")]
    workspace: PathBuf,
    /// Context size.
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
    /// Write the summary and every example's result here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(a: Args, gpu: &GpuOptions) -> Result<()> {
    let text = std::fs::read_to_string(&a.dataset).with_context(|| format!("reading {}", a.dataset.display()))?;
    let ws = a.workspace.to_string_lossy().into_owned();
    let examples = read_dataset(&text, &ws, MAX_RESULT_CHARS).map_err(|e| anyhow::anyhow!("{}: {e}", a.dataset.display()))?;
    if examples.iter().any(|e| matches!(e.tools, ToolSource::Mcp(_))) {
        std::fs::create_dir_all(&a.workspace).with_context(|| format!("creating {}", a.workspace.display()))?;
    }
    let mut l = load(&a.model, a.adapters.as_deref(), !a.no_hierarchy, gpu)?;
    l.caller.set_strategy(a.mode.strategy());
    // One session for every example: the prompt they share (system text, tool list) is
    // computed once and reused.
    let mut session = Session::new(&l.eng.model, a.ctx.min(l.eng.model.config.n_ctx_train))?;
    // Each server is started once, for its name and tools (calls are scored, not run).
    let mut servers: HashMap<String, (String, Vec<Tool>)> = HashMap::new();
    let started = Instant::now();
    let mut progress = crate::progress::ProgressLine::new(examples.len() as u64);
    let mut outcomes = Vec::new();
    for (i, ex) in examples.iter().enumerate() {
        let catalog = match &ex.tools {
            ToolSource::Inline(c) => c.clone(),
            ToolSource::Mcp(cmds) => {
                let mut c = Catalog::default();
                for cmd in cmds {
                    if !servers.contains_key(cmd) {
                        let mut s = McpClient::spawn(cmd, ServerOptions::default()).with_context(|| format!("line {}: starting `{cmd}`", ex.line))?;
                        let tools = s.list_tools().with_context(|| format!("line {}: listing the tools of `{cmd}`", ex.line))?;
                        servers.insert(cmd.clone(), (s.name(), tools));
                    }
                    let (name, tools) = &servers[cmd];
                    c.add(name, tools.clone()).with_context(|| format!("line {}", ex.line))?;
                }
                c
            }
        };
        let call = a.mode.call(&l, &mut session, &catalog, &ex.messages);
        outcomes.push(Outcome::score(ex, &catalog, call.as_ref().map_err(|e| e.to_string())));
        let done = i + 1;
        progress.update(done as u64, false, || {
            let right = outcomes.iter().filter(|o| o.full_ok).count();
            format!("[eval] {done}/{} · {right} full calls right · {:.0} s", examples.len(), started.elapsed().as_secs_f64())
        });
    }
    progress.finish();
    let summary = Summary::of(&outcomes);
    println!("{}\n{}", Summary::HEADER, summary.row(a.mode.name()));
    let per_tool: Vec<String> = summary.per_tool.iter().map(|(t, (ok, n))| format!("{t} {ok}/{n}")).collect();
    println!("\nselection by expected tool: {}", per_tool.join(", "));
    if summary.errors > 0 {
        println!("{} calls failed (see --json for the errors)", summary.errors);
    }
    if let Some(path) = &a.json {
        let v = serde_json::json!({"mode": a.mode.name(), "model": a.model, "dataset": a.dataset, "adapters": a.adapters, "device": l.eng.ctx.describe(), "summary": summary, "examples": outcomes});
        std::fs::write(path, serde_json::to_string_pretty(&v)?).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
