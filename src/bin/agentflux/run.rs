//! `agentflux run`: the agent loop over MCP servers, printing each step as it happens.

use agentflux::batch;
use agentflux::gpu::GpuOptions;
use agentflux::session::Session;
use agentflux::toolcall::{AgentEvent, AgentOptions, Strategy, ToolServers};
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A GGUF path, or `default` / `gemma3` from the model cache.
    #[arg(long, default_value = "default")]
    model: String,
    #[command(flatten)]
    servers: super::call::McpArgs,
    /// An adapter-set directory (manifest.json: selector and per-tool argument adapters).
    #[arg(long)]
    adapters: Option<PathBuf>,
    /// Most tool calls before answering.
    #[arg(long, default_value_t = 6)]
    max_steps: usize,
    /// Most tokens of the final answer.
    #[arg(long, default_value_t = 160)]
    answer_tokens: usize,
    /// Context size.
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
    /// Most tokens a call's arguments may take; a call that needs more fails naming the field.
    #[arg(long, default_value_t = agentflux::toolcall::DEFAULT_ARG_BUDGET)]
    arg_budget: usize,
    #[command(flatten)]
    choosing: super::call::ChoiceArgs,
    /// Print one JSON event per line instead of text.
    #[arg(long)]
    json: bool,
    /// The task.
    task: String,
}

pub fn run(a: Args, gpu: &GpuOptions) -> Result<()> {
    if !a.servers.any() {
        anyhow::bail!("give the tool servers: --mcp 'COMMAND ARGS' or --mcp URL (repeatable), or --mcp-config FILE.json");
    }
    let servers = a.servers.start()?;
    let agent = ToolServers::new(servers)?;
    let super::call::Loaded { eng, adapters, mut caller } =
        super::call::load(&a.model, a.adapters.as_deref(), &a.choosing, Strategy::Shared, gpu)?;
    caller.set_arg_budget(a.arg_budget);
    let n_ctx = a.ctx.min(eng.model.config.n_ctx_train);
    let opts = AgentOptions::new(a.max_steps, a.answer_tokens, &eng.tokenizer);
    if !a.json {
        eprintln!("{} tools from {} server(s) on {}", agent.catalog.names().len(), agent.len(), eng.ctx.describe());
    }
    // Through the batcher, as the server and eval compute: one path for every command.
    batch::scope(&eng.model, |b| -> Result<()> {
        let mut session = Session::batched(b, n_ctx)?;
        agent.run(&caller, &mut session, &adapters, &a.task, &opts, |e| {
            if a.json {
                println!("{}", serde_json::to_string(e).unwrap_or_default());
                return;
            }
            match e {
                AgentEvent::Call { step, call } => println!(
                    "[{step}] {} {}  (p={:.2}; select {:.0} ms, arguments {:.0} ms; {} prefix tokens, {} reused)",
                    call.name,
                    call.arguments,
                    call.confidence.unwrap_or(f64::NAN),
                    call.stats.select_ms,
                    call.stats.args_ms,
                    call.stats.prefix_tokens,
                    call.stats.session.reused
                ),
                AgentEvent::Result { text, is_error, .. } => {
                    let shown: String = text.chars().take(300).collect();
                    println!("    {} {}", if *is_error { "✗" } else { "→" }, shown.replace('\n', "\n      "));
                }
                AgentEvent::Stopped { reason } => println!("    stopped: {reason}"),
                AgentEvent::SetAside { steps } => {
                    let steps: Vec<String> = steps.iter().map(|s| s.to_string()).collect();
                    println!("    the answer leaves out the failed step(s) {}", steps.join(", "))
                }
                AgentEvent::Answer { text } => println!("answer: {text}"),
            }
        })?;
        if !a.json {
            let s = session.stats();
            eprintln!(
                "[session: {} prefilled, {} reused, {} decoded, {} scored, {} recomputed]",
                s.prefilled, s.reused, s.decoded, s.scored, s.recomputed
            );
        }
        Ok(())
    })
}
