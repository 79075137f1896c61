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
    /// Steps whose calls failed and that the answer does not see: made good by a later call on
    /// the same arguments (a file listed, then read), or a detour a repeated call ended (a call
    /// that worked, then failures only, then that call again).
    SetAside {
        /// Step numbers (1-based).
        steps: Vec<usize>,
    },
    /// The final answer.
    Answer {
        /// The answer.
        text: String,
    },
}

/// A call made in a run, and whether its tool failed.
#[derive(Debug, Clone)]
struct Done {
    name: String,
    arguments: serde_json::Value,
    failed: bool,
}

/// The steps (1-based) a repeat of call `earlier` sets aside: every call after it, when it
/// worked and all of those failed. The repeat asks again for a result the conversation holds,
/// and nothing after it worked, so the answer is written where that result was the last one, as
/// if the model had finished there; a small model otherwise answers from the last error. `None`
/// where a later call worked (its result may be what the answer needs) or `earlier` failed.
fn detour(done: &[Done], earlier: usize) -> Option<std::ops::Range<usize>> {
    let after = done.get(earlier + 1..)?;
    (!done[earlier].failed && !after.is_empty() && after.iter().all(|d| d.failed)).then_some(earlier + 2..done.len() + 1)
}

/// Take out of `messages` (whose calls begin at `start`, two messages each: the call, its
/// result) the failed calls the answer should not see, and return their steps: those a later
/// call on the same arguments made good (a folder listed as a file, then read: the error is no
/// longer true of the request, and the synthesized answers the adapter learned never quote it),
/// and the detour a repeat of call `repeated` ended (see [`detour`]). Other failures stay: the
/// answer may have to report them.
fn set_aside(messages: &mut Vec<ChatMessage>, start: usize, done: &[Done], repeated: Option<usize>) -> Vec<usize> {
    let detoured = repeated.and_then(|earlier| detour(done, earlier)).unwrap_or(0..0);
    let made_good = |i: usize| done[i + 1..].iter().any(|d| !d.failed && d.arguments == done[i].arguments);
    let steps: Vec<usize> =
        (0..done.len()).filter(|&i| detoured.contains(&(i + 1)) || (done[i].failed && made_good(i))).map(|i| i + 1).collect();
    for step in steps.iter().rev() {
        let at = start + 2 * (step - 1);
        messages.drain(at..at + 2);
    }
    steps
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
    /// to `messages`, ready for the answer (the failed calls of
    /// [`AgentEvent::SetAside`] taken out again). The first call is restricted by `first` (later ones
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
        let mut done: Vec<Done> = Vec::new();
        let start = messages.len();
        let mut repeated = None;
        let mut stopped = None;
        for step in 1..=opts.max_steps + 1 {
            if step > opts.max_steps {
                stopped = Some(format!("step limit of {} reached", opts.max_steps));
                break;
            }
            let choice = if step == 1 { first } else { &ToolChoice::Auto };
            let call = caller.call_with(session, &self.catalog, messages, adapters, choice, |_| ControlFlow::Continue(()))?;
            emit(AgentEvent::Call { step, call: Box::new(call.clone()) })?;
            if call.name == FINISH {
                break;
            }
            if let Some(earlier) = done.iter().position(|d| d.name == call.name && d.arguments == call.arguments) {
                repeated = Some(earlier);
                stopped = Some(format!("{} was already called with these arguments", call.name));
                break;
            }
            let (text, is_error) = self.execute(&call);
            messages.push(ToolCaller::call_message(&call));
            messages.push(ToolCaller::result_message(&call.name, &text, opts.max_result_chars));
            emit(AgentEvent::Result { step, name: call.name.clone(), text, is_error })?;
            done.push(Done { name: call.name, arguments: call.arguments, failed: is_error });
        }
        if let Some(reason) = stopped {
            emit(AgentEvent::Stopped { reason })?;
        }
        let steps = set_aside(messages, start, &done, repeated);
        if !steps.is_empty() {
            emit(AgentEvent::SetAside { steps })?;
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

#[cfg(test)]
mod tests {
    use super::{detour, set_aside, ChatMessage, Done};

    fn done(calls: &[(&str, &str, bool)]) -> Vec<Done> {
        calls
            .iter()
            .map(|&(name, path, failed)| Done { name: name.into(), arguments: serde_json::json!({ "path": path }), failed })
            .collect()
    }

    /// A conversation of one request and a message pair per call, its texts `name path`.
    fn conversation(calls: &[Done]) -> Vec<ChatMessage> {
        let mut m = vec![ChatMessage::new("user", "request")];
        for d in calls {
            m.push(ChatMessage::new("assistant", &format!("{} {}", d.name, d.arguments["path"].as_str().unwrap_or(""))));
            m.push(ChatMessage::new("tool", if d.failed { "error" } else { "result" }));
        }
        m
    }

    fn texts(m: &[ChatMessage]) -> Vec<&str> {
        m.iter().map(|x| x.content.as_str()).collect()
    }

    #[test]
    fn a_repeat_after_failures_sets_them_aside() {
        // list (worked), read (failed), list again: the answer follows the listing.
        assert_eq!(detour(&done(&[("list", "/w", false), ("read", "/w", true)]), 0), Some(2..3));
        let calls = done(&[("info", "/w/a", false), ("list", "/w", false), ("read", "/w/b", true), ("tree", "/w/c", true)]);
        assert_eq!(detour(&calls, 1), Some(3..5));
        let mut m = conversation(&calls);
        assert_eq!(set_aside(&mut m, 1, &calls, Some(1)), [3, 4]);
        assert_eq!(texts(&m), ["request", "info /w/a", "result", "list /w", "result"]);
    }

    #[test]
    fn a_repeat_keeps_everything_when_a_later_call_worked_or_the_repeated_one_failed() {
        assert_eq!(detour(&done(&[("list", "/w", false), ("read", "/w/a", false)]), 0), None);
        assert_eq!(detour(&done(&[("list", "/w", false), ("read", "/w/a", true), ("info", "/w/a", false)]), 0), None);
        assert_eq!(detour(&done(&[("read", "/w", true), ("list", "/w", false)]), 0), None);
        // A repeat of the last call: nothing lies between.
        assert_eq!(detour(&done(&[("list", "/w", false)]), 0), None);
    }

    #[test]
    fn a_failure_made_good_on_the_same_arguments_is_set_aside_and_others_stay() {
        // The README's to-do request: the file listed (ENOTDIR), then read.
        let calls = done(&[("list", "/w/todo.txt", true), ("read", "/w/todo.txt", false)]);
        let mut m = conversation(&calls);
        assert_eq!(set_aside(&mut m, 1, &calls, None), [1]);
        assert_eq!(texts(&m), ["request", "read /w/todo.txt", "result"]);
        // A failure on other arguments is the answer's to report; so is one nothing made good.
        for calls in [done(&[("read", "/w/a", true), ("read", "/w/b", false)]), done(&[("read", "/w/a", false), ("read", "/w/b", true)])] {
            let mut m = conversation(&calls);
            assert!(set_aside(&mut m, 1, &calls, None).is_empty());
            assert_eq!(m.len(), 5);
        }
    }
}
