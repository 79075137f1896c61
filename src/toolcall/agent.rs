//! The agent loop: call tools on MCP servers, feed their results back, stop at `finish` or a
//! step limit (or a repeated call), then answer from the results.

use super::{AdapterSet, Catalog, ToolCall, ToolCaller, FINISH};
use crate::decode::GenerateOptions;
use crate::error::{Error, Result};
use crate::mcp::McpClient;
use crate::session::Session;
use crate::text::{ChatMessage, Tokenizer};

/// Characters of a tool's output the model sees by default (a small model's context is short).
pub const MAX_RESULT_CHARS: usize = 1500;

/// Limits of one run.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Most tool calls.
    pub max_steps: usize,
    /// Characters of a tool's output the model sees.
    pub max_result_chars: usize,
    /// The final answer's generation.
    pub answer: GenerateOptions,
}

impl AgentOptions {
    /// At most `max_steps` calls, results cut to [`MAX_RESULT_CHARS`], a greedy answer of at
    /// most `answer_tokens` that ends where it starts repeating itself
    /// ([`GenerateOptions::stop_on_repeat`]).
    pub fn new(max_steps: usize, answer_tokens: usize, tokenizer: &Tokenizer) -> Self {
        let answer = GenerateOptions { stop_on_repeat: true, ..GenerateOptions::greedy(answer_tokens, tokenizer) };
        Self { max_steps, max_result_chars: MAX_RESULT_CHARS, answer }
    }
}

/// What happened at one step, reported as it happens.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AgentEvent {
    /// The model chose a call.
    Call {
        /// Step number (1-based).
        step: usize,
        /// The call.
        call: Box<ToolCall>,
    },
    /// A tool answered (`is_error`: the tool itself reported failure).
    Result {
        /// Step number (1-based).
        step: usize,
        /// The tool called.
        name: String,
        /// Its output as text.
        text: String,
        /// Whether the tool reported a failure.
        is_error: bool,
    },
    /// The loop stopped without `finish`.
    Stopped {
        /// Why.
        reason: String,
    },
    /// The final answer.
    Answer {
        /// The answer.
        text: String,
    },
}

/// Tool servers and the catalog of their tools.
pub struct ToolServers {
    /// One client per server, in catalog group order.
    pub servers: Vec<McpClient>,
    /// Their tools.
    pub catalog: Catalog,
}

impl ToolServers {
    /// List every server's tools into one catalog. A tool that cannot be called (no name, a
    /// schema that is not an object's, a name taken) is left out with a warning naming it; the
    /// server's other tools stay.
    pub fn new(mut servers: Vec<McpClient>) -> Result<Self> {
        let mut catalog = Catalog::default();
        for s in &mut servers {
            let tools = s.list_tools()?;
            for why in catalog.add_callable(&s.name(), tools) {
                tracing::warn!("server '{}': {why}; left out", s.name().escape_debug());
            }
        }
        Ok(Self { servers, catalog })
    }

    /// Run `task` to its answer; `on_event` sees each step as it happens. Returns the events.
    pub fn run(
        &mut self,
        caller: &ToolCaller,
        session: &mut Session,
        adapters: &AdapterSet,
        task: &str,
        opts: &AgentOptions,
        mut on_event: impl FnMut(&AgentEvent),
    ) -> Result<Vec<AgentEvent>> {
        let mut events = Vec::new();
        let mut emit = |e: AgentEvent, events: &mut Vec<AgentEvent>| {
            on_event(&e);
            events.push(e);
        };
        let mut messages = vec![ChatMessage::new("user", task)];
        let mut done: Vec<(String, serde_json::Value)> = Vec::new();
        for step in 1..=opts.max_steps + 1 {
            if step > opts.max_steps {
                emit(AgentEvent::Stopped { reason: format!("step limit of {} reached", opts.max_steps) }, &mut events);
                break;
            }
            let call = caller.call(session, &self.catalog, &messages, adapters)?;
            emit(AgentEvent::Call { step, call: Box::new(call.clone()) }, &mut events);
            if call.name == FINISH {
                break;
            }
            if done.iter().any(|(n, a)| *n == call.name && *a == call.arguments) {
                emit(AgentEvent::Stopped { reason: format!("{} was already called with these arguments", call.name) }, &mut events);
                break;
            }
            let group = self.catalog.groups.iter().position(|g| g.tools.iter().any(|t| t.name == call.name));
            let server = group
                .and_then(|g| self.servers.get_mut(g))
                .ok_or_else(|| Error::Engine(format!("no server provides the selected tool {}", call.name)))?;
            let (text, is_error) = match server.call_tool(&call.name, &call.arguments) {
                Ok(r) => (r.text(), r.is_error),
                // A broken server is reported to the model like a failed tool, once.
                Err(e) => (e.to_string(), true),
            };
            emit(AgentEvent::Result { step, name: call.name.clone(), text: text.clone(), is_error }, &mut events);
            messages.push(ToolCaller::call_message(&call));
            messages.push(ToolCaller::result_message(&call.name, &text, opts.max_result_chars));
            done.push((call.name, call.arguments));
        }
        let text = caller.answer(session, &self.catalog, &messages, &opts.answer, |_| {})?;
        emit(AgentEvent::Answer { text }, &mut events);
        Ok(events)
    }
}
