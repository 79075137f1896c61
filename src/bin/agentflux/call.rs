//! `agentflux call`: one tool call for a query, as JSON — the tool chosen among real names with
//! a probability for every candidate, and arguments valid for its schema.

use agentflux::batch;
use agentflux::gpu::GpuOptions;
use agentflux::mcp::{read_mcp_config, McpClient, ServerOptions};
use agentflux::session::Session;
use agentflux::text::ChatMessage;
use agentflux::toolcall::{AdapterSet, Catalog, Strategy, ToolCall, ToolCaller, ToolServers};
use agentflux::{resolve_model, Engine};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// A GGUF path, or `default` / `gemma3` from the model cache.
    #[arg(long, default_value = "default")]
    model: String,
    #[command(flatten)]
    servers: McpArgs,
    /// An OpenAI `tools` JSON file instead of (or besides) MCP servers.
    #[arg(long)]
    tools: Option<PathBuf>,
    /// An adapter-set directory (manifest.json: selector and per-tool argument adapters).
    #[arg(long)]
    adapters: Option<PathBuf>,
    /// Context size.
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
    /// decoupled: scored selection then schema-constrained arguments (adapters apply);
    /// monolithic: the base model writes the whole call with every schema in its prompt;
    /// monolithic-constrained: the same under one grammar covering every tool's call;
    /// reference: decoupled the way the paper's public code does it (the selector sampled 10
    /// times at temperature 1 with a majority vote, every stage re-sending the conversation).
    #[arg(long, value_enum, default_value = "decoupled")]
    mode: Mode,
    /// Most tokens a call's arguments may take; a call that needs more fails naming the field.
    #[arg(long, default_value_t = agentflux::toolcall::DEFAULT_ARG_BUDGET)]
    arg_budget: usize,
    #[command(flatten)]
    choosing: ChoiceArgs,
    /// The request.
    query: String,
}

/// How the decoupled modes choose the tool (`call`, `run`, `eval`).
#[derive(clap::Args, Default)]
pub struct ChoiceArgs {
    /// With several servers, choose among every tool at once instead of the server first.
    #[arg(long)]
    no_hierarchy: bool,
    /// Without a selector adapter, rank the candidates by their plain probabilities instead of
    /// calibrating them against a content-free request (see docs/results.md).
    #[arg(long)]
    no_calibration: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Decoupled,
    Monolithic,
    MonolithicConstrained,
    Reference,
}

/// The tool servers of `call`, `run` and `serve`.
#[derive(clap::Args)]
pub struct McpArgs {
    /// An MCP server (repeatable): a command, e.g. `--mcp 'tools/mcp/node_modules/.bin/mcp-server-filesystem
    /// /tmp/ws'`, or the URL of a Streamable HTTP endpoint, e.g. `--mcp http://127.0.0.1:3001/mcp`.
    #[arg(long)]
    mcp: Vec<String>,
    /// A header sent to the --mcp URLs, e.g. `--mcp-header 'Authorization: Bearer KEY'` (repeatable).
    #[arg(long)]
    mcp_header: Vec<String>,
    /// An `mcpServers` configuration file (Claude Desktop, Cursor, VS Code): every server it lists
    /// is started or reached, named as the file names it, besides those of --mcp.
    #[arg(long)]
    mcp_config: Option<PathBuf>,
}

impl McpArgs {
    /// Whether any server is given.
    pub fn any(&self) -> bool {
        !self.mcp.is_empty() || self.mcp_config.is_some()
    }

    /// The servers of `--mcp` and of the `mcpServers` file, in that order.
    pub fn start(&self) -> Result<Vec<McpClient>> {
        let headers = self
            .mcp_header
            .iter()
            .map(|h| {
                let (k, v) = h.split_once(':').with_context(|| format!("--mcp-header {h:?}: write it as 'Name: value'"))?;
                Ok((k.trim().to_string(), v.trim().to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut servers = Vec::new();
        for server in &self.mcp {
            servers.push(McpClient::open(server, &headers, ServerOptions::default()).with_context(|| format!("--mcp {server}"))?);
        }
        if let Some(path) = &self.mcp_config {
            servers.extend(start_config(path)?);
        }
        Ok(servers)
    }
}

/// Every server an `mcpServers` file lists, started or reached, each named as the file names it.
pub fn start_config(path: &Path) -> Result<Vec<McpClient>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut servers = Vec::new();
    for (name, entry) in read_mcp_config(&path.display().to_string(), &text)? {
        let client = McpClient::open_entry(&entry, ServerOptions::default())
            .with_context(|| format!("starting `{name}` from {}", path.display()))?;
        servers.push(client.named(&name));
    }
    Ok(servers)
}

/// What `call` and `run` share: the model, its adapter set and a tool caller.
pub struct Loaded {
    pub eng: Engine,
    pub adapters: AdapterSet,
    pub caller: ToolCaller,
}

/// Load the model, the adapter set (if any) and a caller choosing as `choosing` says, by
/// `strategy`.
pub fn load(model: &str, adapters: Option<&Path>, choosing: &ChoiceArgs, strategy: Strategy, gpu: &GpuOptions) -> Result<Loaded> {
    let path = resolve_model(model)?;
    let eng = Engine::load(&path, gpu).with_context(|| format!("loading {}", path.display()))?;
    let adapters = match adapters {
        Some(dir) => AdapterSet::load(&eng.model, dir)?,
        None => AdapterSet::default(),
    };
    let mut caller = ToolCaller::new(eng.tokenizer.clone(), eng.template.clone())?;
    caller.set_hierarchy(!choosing.no_hierarchy);
    caller.set_calibration(!choosing.no_calibration);
    caller.set_strategy(strategy);
    Ok(Loaded { eng, adapters, caller })
}

pub fn run(a: Args, gpu: &GpuOptions) -> Result<()> {
    if !a.servers.any() && a.tools.is_none() {
        anyhow::bail!("give the tools: --mcp 'COMMAND ARGS' (repeatable), --mcp-config FILE.json or --tools FILE.json");
    }
    // Servers stay up until the call is made (their tools are listed, not called).
    let servers = a.servers.start()?;
    let mut catalog = ToolServers::new(servers)?.catalog;
    if let Some(f) = &a.tools {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(f).with_context(|| format!("reading {}", f.display()))?)
            .with_context(|| format!("{} is not JSON", f.display()))?;
        for g in Catalog::from_openai_tools(&f.display().to_string(), &v)?.groups {
            catalog.add(&g.server, g.tools)?;
        }
    }
    let mut l = load(&a.model, a.adapters.as_deref(), &a.choosing, a.mode.strategy(), gpu)?;
    l.caller.set_arg_budget(a.arg_budget);
    let n_ctx = a.ctx.min(l.eng.model.config.n_ctx_train);
    let messages = [ChatMessage::new("user", &a.query)];
    // Through the batcher, as the server and eval compute: one path for every command.
    let call = batch::scope(&l.eng.model, |b| -> Result<ToolCall> {
        let mut session = Session::batched(b, n_ctx)?;
        Ok(a.mode.call(&l, &mut session, &catalog, &messages)?)
    })?;
    println!("{}", serde_json::to_string(&call)?);
    Ok(())
}

impl Mode {
    /// One call in this mode.
    pub fn call(self, l: &Loaded, session: &mut Session, catalog: &Catalog, messages: &[ChatMessage]) -> agentflux::Result<ToolCall> {
        match self {
            Mode::Decoupled | Mode::Reference => l.caller.call(session, catalog, messages, &l.adapters),
            Mode::Monolithic => l.caller.call_monolithic(session, catalog, messages, false),
            Mode::MonolithicConstrained => l.caller.call_monolithic(session, catalog, messages, true),
        }
    }

    /// The mode as the command line spells it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Decoupled => "decoupled",
            Mode::Monolithic => "monolithic",
            Mode::MonolithicConstrained => "monolithic-constrained",
            Mode::Reference => "reference",
        }
    }

    /// How the caller chooses in this mode.
    pub fn strategy(self) -> Strategy {
        match self {
            Mode::Reference => Strategy::Reference { samples: 10, seed: 0 },
            _ => Strategy::Shared,
        }
    }
}
