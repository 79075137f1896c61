//! The front door for the main job: a model, an adapter set and tool servers (MCP, or OpenAI
//! `tools` definitions), assembled once, then asked for tool calls, whole tasks or answers.
//!
//! ```no_run
//! # fn main() -> agentflux::Result<()> {
//! let agent = agentflux::Agent::builder()
//!     .model("default")
//!     .adapters("adapters/filesystem")
//!     .mcp("tools/mcp/node_modules/.bin/mcp-server-filesystem /tmp/ws")
//!     .build()?;
//! let call = agent.call("What files are in /tmp/ws?")?;
//! println!("{} {}", call.name, call.arguments);
//! # Ok(())
//! # }
//! ```

use crate::decode::GenerateOptions;
use crate::engine::{resolve_model, Engine};
use crate::error::{Error, Result};
use crate::gpu::GpuOptions;
use crate::mcp::{read_mcp_config, McpClient, ServerOptions};
use crate::session::Session;
use crate::text::ChatMessage;
use crate::toolcall::{AdapterSet, AgentEvent, AgentOptions, Catalog, ToolCall, ToolCaller, ToolServers, DEFAULT_ARG_BUDGET};
use std::path::PathBuf;

/// Context positions of a session unless [`AgentBuilder::context`] says otherwise.
pub const DEFAULT_CONTEXT: usize = 4096;

/// What an [`Agent`] is built from; [`Agent::builder`] starts one.
#[derive(Debug, Clone)]
pub struct AgentBuilder {
    model: String,
    gpu: GpuOptions,
    adapters: Option<PathBuf>,
    servers: Vec<String>,
    configs: Vec<PathBuf>,
    tools: Option<serde_json::Value>,
    context: usize,
    hierarchy: bool,
    calibration: bool,
    arg_budget: usize,
}

impl AgentBuilder {
    /// A GGUF path, or `default` / `gemma3` for the models of the cache (`tools/fetch-model`).
    /// Default: `default`.
    pub fn model(mut self, spec: impl Into<String>) -> Self {
        self.model = spec.into();
        self
    }

    /// The device (default: the first suitable one, as [`GpuOptions::default`] chooses).
    pub fn gpu(mut self, gpu: GpuOptions) -> Self {
        self.gpu = gpu;
        self
    }

    /// An adapter-set directory (its `manifest.json` names the selector and the per-tool
    /// argument adapters). Without one the base model selects and writes arguments.
    pub fn adapters(mut self, dir: impl Into<PathBuf>) -> Self {
        self.adapters = Some(dir.into());
        self
    }

    /// An MCP server: a command line started over stdio, or the `http://`/`https://` URL of a
    /// Streamable HTTP endpoint (repeatable; each one's tools form a group of the catalog).
    pub fn mcp(mut self, command: impl Into<String>) -> Self {
        self.servers.push(command.into());
        self
    }

    /// Every server an `mcpServers` configuration file lists (Claude Desktop, Cursor and VS Code
    /// write them: commands, and URLs of Streamable HTTP endpoints), started or reached after
    /// those of [`mcp`](Self::mcp), named as the file names them (repeatable).
    pub fn mcp_config(mut self, path: impl Into<PathBuf>) -> Self {
        self.configs.push(path.into());
        self
    }

    /// OpenAI-style `tools` (a JSON array of `{"type":"function","function":{..}}`) that
    /// [`Agent::call`] may choose among; [`Agent::run`] can call only MCP tools.
    pub fn openai_tools(mut self, tools: serde_json::Value) -> Self {
        self.tools = Some(tools);
        self
    }

    /// Context positions of a session (capped at the model's training context).
    pub fn context(mut self, positions: usize) -> Self {
        self.context = positions;
        self
    }

    /// With several servers, choose the server first, then the tool inside it (default: on).
    pub fn hierarchy(mut self, on: bool) -> Self {
        self.hierarchy = on;
        self
    }

    /// Without a selector adapter, calibrate the candidates' scores against a content-free
    /// request (default: on; see [`ToolCaller::set_calibration`]).
    pub fn calibration(mut self, on: bool) -> Self {
        self.calibration = on;
        self
    }

    /// Most tokens a call's arguments may take (default [`DEFAULT_ARG_BUDGET`]); a call that needs
    /// more fails naming the tool and field.
    pub fn arg_budget(mut self, tokens: usize) -> Self {
        self.arg_budget = tokens;
        self
    }

    /// Load the model and adapters and start the servers.
    pub fn build(self) -> Result<Agent> {
        if self.servers.is_empty() && self.configs.is_empty() && self.tools.is_none() {
            return Err(Error::InvalidOption(
                "an agent needs tools: add an MCP server (mcp, mcp_config) or OpenAI tools (openai_tools)".into(),
            ));
        }
        let mut servers =
            self.servers.iter().map(|server| McpClient::open(server, &[], ServerOptions::default())).collect::<Result<Vec<_>, _>>()?;
        for path in &self.configs {
            let text = std::fs::read_to_string(path).map_err(|e| Error::bad_file(path, format!("cannot read it: {e}")))?;
            for (name, entry) in read_mcp_config(&path.display().to_string(), &text)? {
                servers.push(McpClient::open_entry(&entry, ServerOptions::default())?.named(&name));
            }
        }
        let mut servers = ToolServers::new(servers)?;
        if let Some(tools) = &self.tools {
            for g in Catalog::from_openai_tools("tools", tools)?.groups {
                servers.catalog.add(&g.server, g.tools)?;
            }
        }
        let engine = Engine::load(resolve_model(&self.model)?, &self.gpu)?;
        let adapters = match &self.adapters {
            Some(dir) => AdapterSet::load(&engine.model, dir)?,
            None => AdapterSet::default(),
        };
        let mut caller = ToolCaller::new(engine.tokenizer.clone(), engine.template.clone())?;
        caller.set_hierarchy(self.hierarchy);
        caller.set_calibration(self.calibration);
        caller.set_arg_budget(self.arg_budget);
        let context = self.context.min(engine.model.config.n_ctx_train);
        Ok(Agent { engine, adapters, caller, servers, context })
    }
}

/// A model with its adapter set and tool servers: decoupled tool calling in one value.
pub struct Agent {
    engine: Engine,
    adapters: AdapterSet,
    caller: ToolCaller,
    servers: ToolServers,
    context: usize,
}

impl Agent {
    /// A builder with the default model, no adapters and no tools yet.
    pub fn builder() -> AgentBuilder {
        AgentBuilder {
            model: "default".into(),
            gpu: GpuOptions::default(),
            adapters: None,
            servers: Vec::new(),
            configs: Vec::new(),
            tools: None,
            context: DEFAULT_CONTEXT,
            hierarchy: true,
            calibration: true,
            arg_budget: DEFAULT_ARG_BUDGET,
        }
    }

    /// The tool call for a user's request: the tool chosen among the catalog's names (with a
    /// probability for each candidate) and arguments valid for its schema. Nothing is called.
    pub fn call(&self, request: &str) -> Result<ToolCall> {
        self.call_in(&[ChatMessage::new("user", request)])
    }

    /// The next tool call of a conversation (`user`, `assistant` and `tool` turns).
    pub fn call_in(&self, messages: &[ChatMessage]) -> Result<ToolCall> {
        let mut session = Session::new(&self.engine.model, self.context)?;
        self.caller.call(&mut session, &self.servers.catalog, messages, &self.adapters)
    }

    /// Carry out `task`: call tools on the MCP servers until the model chooses `finish` (or
    /// `max_steps` calls), then answer from their results. `on_event` sees each step as it
    /// happens; the last event is the answer.
    pub fn run(&self, task: &str, max_steps: usize, on_event: impl FnMut(&AgentEvent)) -> Result<Vec<AgentEvent>> {
        let mut session = Session::new(&self.engine.model, self.context)?;
        let opts = AgentOptions::new(max_steps, 160, &self.engine.tokenizer);
        self.servers.run(&self.caller, &mut session, &self.adapters, task, &opts, on_event)
    }

    /// A text answer to a conversation with no tool: the model's chat template, greedy, at most
    /// `max_tokens`.
    pub fn answer(&self, messages: &[ChatMessage], max_tokens: usize) -> Result<String> {
        let opts = GenerateOptions::greedy(max_tokens, &self.engine.tokenizer);
        Ok(self.engine.chat(messages, &opts)?.text.trim().to_string())
    }

    /// The tools the agent chooses among.
    pub fn catalog(&self) -> &Catalog {
        &self.servers.catalog
    }

    /// The engine underneath (model, tokenizer, chat template, device), for plain generation
    /// ([`Engine::generate`], [`Engine::chat`]).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}
