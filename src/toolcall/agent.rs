//! The agent loop: call tools on MCP servers, feed their results back, stop at `finish` or a
//! step limit (or a repeated call), then answer from the results.

use super::{AdapterSet, Catalog, ToolCall, ToolCaller, ToolChoice, FINISH};
use crate::decode::GenerateOptions;
use crate::error::{Error, Result};
use crate::mcp::McpClient;
use crate::session::Session;
use crate::text::{ChatMessage, Tokenizer};
use std::ops::ControlFlow;
use std::sync::Mutex;

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

/// Tool servers and the catalog of their tools. Each server answers one call at a time; several
/// conversations (the server's requests) may run on the same servers at once.
pub struct ToolServers {
    /// One client per server, in catalog group order.
    servers: Vec<Mutex<McpClient>>,
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
        Ok(Self { servers: servers.into_iter().map(Mutex::new).collect(), catalog })
    }

    /// How many servers there are.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Whether there is no server.
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// Call `call`'s tool on the server that provides it: its output as text and whether it
    /// failed. A broken server is reported like a failed tool.
    pub fn execute(&self, call: &ToolCall) -> (String, bool) {
        let group = self.catalog.groups.iter().position(|g| g.tools.iter().any(|t| t.name == call.name));
        let Some(server) = group.and_then(|g| self.servers.get(g)) else {
            return (format!("no server provides the tool {}", call.name), true);
        };
        // A poisoned lock only means another conversation's call panicked; the client is whole.
        let mut server = server.lock().unwrap_or_else(|p| p.into_inner());
        match server.call_tool(&call.name, &call.arguments) {
            Ok(r) => (r.text(), r.is_error),
            Err(e) => (e.to_string(), true),
        }
    }

    /// Call tools for the conversation in `messages` until the model chooses `finish`, the step
    /// limit is reached or a call repeats an earlier one; each call and its result are appended
    /// to `messages`, ready for the answer. The first call is restricted by `first` (later ones
    /// are [`ToolChoice::Auto`]). `on_event` sees each step as it happens; its `Break` stops the
    /// loop with [`Error::Cancelled`].
    #[allow(clippy::too_many_arguments)]
    pub fn act(
        &self,
        caller: &ToolCaller,
        session: &mut Session,
        adapters: &AdapterSet,
        messages: &mut Vec<ChatMessage>,
        first: &ToolChoice,
        opts: &AgentOptions,
        mut on_event: impl FnMut(AgentEvent) -> ControlFlow<()>,
    ) -> Result<()> {
        let mut emit = |e: AgentEvent| if on_event(e).is_break() { Err(Error::Cancelled) } else { Ok(()) };
        let mut done: Vec<(String, serde_json::Value)> = Vec::new();
        for step in 1..=opts.max_steps + 1 {
            if step > opts.max_steps {
                return emit(AgentEvent::Stopped { reason: format!("step limit of {} reached", opts.max_steps) });
            }
            let choice = if step == 1 { first } else { &ToolChoice::Auto };
            let call = caller.call_with(session, &self.catalog, messages, adapters, choice, |_| ControlFlow::Continue(()))?;
            emit(AgentEvent::Call { step, call: Box::new(call.clone()) })?;
            if call.name == FINISH {
                return Ok(());
            }
            if done.iter().any(|(n, a)| *n == call.name && *a == call.arguments) {
                return emit(AgentEvent::Stopped { reason: format!("{} was already called with these arguments", call.name) });
            }
            let (text, is_error) = self.execute(&call);
            messages.push(ToolCaller::call_message(&call));
            messages.push(ToolCaller::result_message(&call.name, &text, opts.max_result_chars));
            emit(AgentEvent::Result { step, name: call.name.clone(), text, is_error })?;
            done.push((call.name, call.arguments));
        }
        Ok(())
    }

    /// Run `task` to its answer: [`act`](Self::act), then the answer from the results.
    /// `on_event` sees each step as it happens. Returns the events.
    pub fn run(
        &self,
        caller: &ToolCaller,
        session: &mut Session,
        adapters: &AdapterSet,
        task: &str,
        opts: &AgentOptions,
        mut on_event: impl FnMut(&AgentEvent),
    ) -> Result<Vec<AgentEvent>> {
        let mut events = Vec::new();
        let mut messages = vec![ChatMessage::new("user", task)];
        self.act(caller, session, adapters, &mut messages, &ToolChoice::Auto, opts, |e| {
            on_event(&e);
            events.push(e);
            ControlFlow::Continue(())
        })?;
        let text = caller.answer(session, &self.catalog, &messages, adapters.answer, &opts.answer, |_| {})?;
        let answer = AgentEvent::Answer { text };
        on_event(&answer);
        events.push(answer);
        Ok(events)
    }
}
