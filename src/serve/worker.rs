//! The engine side of the server: request threads, each answering one request at a time on its own
//! session, and one batching thread that runs the model for all of them ([`crate::batch`]): every
//! pass holds the rows of every request in flight, each under its own adapter, and a long prompt
//! is computed a piece per pass while the others keep decoding. Each piece of an answer is
//! reported as an [`Event`].
//!
//! A request starts from a copy of the cached session that holds the longest prefix of its
//! prompt, so only its new tokens are computed (the prefix cache, `serve/cache.rs`). Neither the
//! cache nor the company of other requests changes an answer's tokens, and its probabilities
//! agree within rounding rather than bit for bit: a row computed alone in a one-token pass goes
//! through the decode kernels (the attention splits the keys, the product takes the single-row
//! path), which sum in another order than a pass of several rows, and a cached position may have
//! been computed either way. Tested: concurrent requests against sequential ones, cached
//! conversations against a server with nothing cached (tool probabilities within 1e-5).

use super::cache::{PrefixCache, SharedCache};
use super::openai::{ApiError, ChatRequest, Usage, Work};
use crate::decode::GenerateOptions;
use crate::session::{Activation, Session};
use crate::text::TextStream;
use crate::toolcall::{AdapterSet, AgentEvent, AgentOptions, CallEvent, Catalog, ToolCall, ToolCaller, ToolChoice, ToolServers, FINISH};
use crate::Engine;
use std::ops::ControlFlow;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Mutex;

/// A piece of an answer, in the order it is produced.
#[derive(Debug)]
pub enum Event {
    /// The request passed the checks that need its tokens and is being answered (a stream sends
    /// its role chunk now).
    Started,
    /// More text.
    Text(String),
    /// A tool call begins: its id and tool name.
    ToolCall {
        /// The call's id (`call_…`).
        id: String,
        /// The tool.
        name: String,
    },
    /// More of the tool call's arguments (JSON text).
    Arguments(String),
    /// A step of the server's own agent loop ([`Work::Agent`]): a call of one of its tools, the
    /// tool's result, or why the loop stopped.
    Step(AgentEvent),
    /// The answer is complete.
    Done {
        /// OpenAI's `finish_reason` (`stop`, `length`, `tool_calls`).
        finish_reason: &'static str,
        /// Token counts.
        usage: Usage,
        /// The call made, if any.
        call: Option<Box<ToolCall>>,
    },
    /// The request failed; nothing more follows.
    Failed(ApiError),
}

/// One queued request and where its events go.
pub struct Job {
    /// The validated request.
    pub request: ChatRequest,
    /// Its events (a dropped receiver means the client left).
    pub events: Sender<Event>,
    /// Its number, for the ids of the answer and its tool call.
    pub seq: u64,
}

/// The model the server runs and its adapter set.
pub struct Backend {
    /// The model, tokenizer and chat template.
    pub engine: Engine,
    /// Selector and argument adapters (empty: the base model under constraints).
    pub adapters: AdapterSet,
    /// MCP servers whose tools the server calls itself for requests that bring no `tools`.
    pub servers: Option<ToolServers>,
}

impl Backend {
    /// The tools of the server's own MCP servers (empty without any).
    pub fn server_tools(&self) -> Catalog {
        self.servers.as_ref().map(|s| s.catalog.clone()).unwrap_or_default()
    }
}

/// What the worker has done, for `GET /metrics`: the batching thread's passes (as of the last
/// finished request) and the requests answered.
#[derive(Debug, Clone, Copy, Default)]
pub struct Metrics {
    /// Passes and the rows they held.
    pub batch: crate::batch::BatchStats,
    /// Requests finished, answered or not.
    pub requests: u64,
    /// Of those, requests whose client left before the answer was complete.
    pub cancelled: u64,
}

/// Limits the worker applies.
#[derive(Debug, Clone, Copy)]
pub struct WorkerLimits {
    /// KV cache positions.
    pub n_ctx: usize,
    /// Text tokens when a request gives no `max_tokens`.
    pub default_max_tokens: usize,
    /// Sessions the prefix cache keeps (each `n_ctx` positions); 0: none, every request starts
    /// from an empty cache.
    pub cached_sessions: usize,
    /// Requests answered at once (each holds a session of `n_ctx` positions while it runs).
    pub parallel: usize,
    /// Most calls of the server's own tools per request.
    pub max_steps: usize,
    /// Characters of a tool result the model sees.
    pub max_result_chars: usize,
}

/// Run jobs until every sender is gone, `limits.parallel` at a time, counting in `metrics`.
/// `ready` hears once whether a session could be made.
pub fn run(backend: Backend, limits: WorkerLimits, jobs: Receiver<Job>, metrics: &Mutex<Metrics>, ready: Sender<crate::Result<()>>) {
    let engine = &backend.engine;
    let caller = match ToolCaller::new(engine.tokenizer.clone(), engine.template.clone()) {
        Ok(c) => c,
        Err(e) => return drop(ready.send(Err(e))),
    };
    // The caches of the running requests and the kept ones, now: a context that does not fit
    // fails at start, not at a request.
    let pool = match engine.model.new_pool(limits.n_ctx, limits.parallel.max(1) + limits.cached_sessions) {
        Ok(p) => p,
        Err(e) => return drop(ready.send(Err(e))),
    };
    tracing::info!(slots = pool.slots(), mib = pool.bytes() >> 20, "KV caches allocated");
    if ready.send(Ok(())).is_err() {
        return;
    }
    let worker = Worker { backend: &backend, caller, limits };
    let jobs = Mutex::new(jobs);
    crate::batch::scope(&engine.model, |batcher| {
        let cache = SharedCache::new(PrefixCache::new(batcher, pool, limits.cached_sessions));
        std::thread::scope(|s| {
            for _ in 0..limits.parallel.max(1) {
                s.spawn(|| {
                    // The queue is locked only while waiting for the next job.
                    let next = || jobs.lock().ok()?.recv().ok();
                    while let Some(job) = next() {
                        let answered = worker.serve(&cache, batcher, &job);
                        if let Ok(mut m) = metrics.lock() {
                            m.batch = batcher.stats();
                            m.requests += 1;
                            m.cancelled += matches!(&answered, Err(e) if e.code == Some("client_closed")) as u64;
                        }
                        let _ = job.events.send(answered.unwrap_or_else(Event::Failed));
                    }
                });
            }
        });
    });
}

struct Worker<'a> {
    backend: &'a Backend,
    caller: ToolCaller,
    limits: WorkerLimits,
}

impl Worker<'_> {
    /// Answer `job` on a session from the cache and give the session back to it; returns the
    /// answer's last event, to be sent once the session is back (so that the client's next
    /// request finds it).
    fn serve(&self, cache: &SharedCache, batcher: &crate::batch::Batcher, job: &Job) -> Result<Event, ApiError> {
        let prefix = self.prefix(&job.request)?;
        let n_ctx = self.limits.n_ctx;
        if prefix.len() >= n_ctx {
            return Err(crate::Error::ContextOverflow { needed: prefix.len() + 1, n_ctx }.into());
        }
        if matches!(job.request.work, Work::Chat | Work::Answer) {
            self.text_room(&prefix, job.request.max_tokens)?;
        }
        let _ = job.events.send(Event::Started);
        // Joined to the batcher only once ready to compute: a request waiting for another's prefix
        // must not hold the others' passes back.
        let (mut session, cached, ticket) = cache.checkout(&prefix)?;
        let _turn = batcher.join();
        let answered = match &ticket {
            // Compute the shared prefix first, so that requests waiting for it can start.
            Some(t) => match session.prefill(&prefix[..prefix.len() - 1], None).and_then(|_| cache.publish(t, &session)) {
                Ok(()) => self.answer(&mut session, job, cached),
                Err(e) => Err(e.into()),
            },
            None => self.answer(&mut session, job, cached),
        };
        cache.checkin(ticket, session);
        answered
    }

    /// The beginning of the request's prompt that is computed with the base weights (what the
    /// prefix cache matches): the whole prompt of text work, the conversation before the tool
    /// choice of a call.
    fn prefix(&self, r: &ChatRequest) -> crate::Result<Vec<u32>> {
        match &r.work {
            Work::Chat => self.caller.chat_prompt(&r.messages),
            Work::Answer => self.caller.answer_prompt(&r.catalog, &r.messages),
            Work::Call(_) => self.caller.prefix_tokens(&r.catalog, &r.messages),
            Work::Agent(_) => self.caller.prefix_tokens(&self.servers()?.catalog, &r.messages),
        }
    }

    /// The server's own tool servers (a request is [`Work::Agent`] only when there are some).
    fn servers(&self) -> crate::Result<&ToolServers> {
        self.backend.servers.as_ref().ok_or_else(|| crate::Error::Engine("this server has no MCP servers".into()))
    }

    /// Answer `job` on `session`, which holds `cached` tokens of its prompt already: every event
    /// is sent but the last ([`Event::Done`]), which is returned.
    fn answer(&self, session: &mut Session, job: &Job, cached: usize) -> Result<Event, ApiError> {
        let r = &job.request;
        let send = |e: Event| {
            let _ = job.events.send(e);
        };
        let adapters = self.backend.adapters.for_tools(&r.catalog.names());
        let call = match &r.work {
            Work::Chat => return self.text(session, job, self.caller.chat_prompt(&r.messages)?, None, cached, None),
            Work::Answer => return self.answer_text(session, job, &adapters, cached, None),
            Work::Agent(first) => return self.act(session, job, first, cached),
            Work::Call(choice) => {
                let mut stream = TextStream::new(self.backend.engine.tokenizer.clone());
                // A client that left stops the call at its next token.
                let call = self.caller.call_with(session, &r.catalog, &r.messages, &adapters, choice, |e| {
                    let sent = match e {
                        CallEvent::Chosen(name) if name != FINISH => {
                            job.events.send(Event::ToolCall { id: format!("call_{}", job.seq), name: name.to_string() })
                        }
                        CallEvent::Chosen(_) => Ok(()),
                        CallEvent::ArgumentToken(t) => match stream.push(t) {
                            Ok(piece) if !piece.is_empty() => job.events.send(Event::Arguments(piece)),
                            _ => Ok(()),
                        },
                    };
                    if sent.is_ok() {
                        ControlFlow::Continue(())
                    } else {
                        ControlFlow::Break(())
                    }
                })?;
                let rest = stream.finish()?;
                if !rest.is_empty() {
                    send(Event::Arguments(rest));
                }
                call
            }
        };
        if call.name == FINISH {
            // The model chose to answer: text continuing `call: finish` on the cached prefix.
            return self.answer_text(session, job, &adapters, cached, Some(call));
        }
        let completion = call.stats.name_tokens + call.stats.arg_tokens;
        let usage = Usage { prompt: call.stats.prefix_tokens, completion, cached: cached.min(call.stats.prefix_tokens.saturating_sub(1)) };
        Ok(Event::Done { finish_reason: "tool_calls", usage, call: Some(Box::new(call)) })
    }

    /// Call the server's own tools for the conversation until the model chooses `finish` (each
    /// step sent as it happens), then answer in text from their results. The answer's
    /// `max_tokens` is cut to the room the results left in the context.
    fn act(&self, session: &mut Session, job: &Job, first: &ToolChoice, cached: usize) -> Result<Event, ApiError> {
        let servers = self.servers()?;
        let r = &job.request;
        let adapters = self.backend.adapters.for_tools(&servers.catalog.names());
        let opts = AgentOptions {
            max_steps: self.limits.max_steps,
            max_result_chars: self.limits.max_result_chars,
            ..AgentOptions::new(0, 0, &self.backend.engine.tokenizer)
        };
        let mut messages = r.messages.clone();
        let mut call_tokens = 0;
        // A client that left stops the loop at its next step.
        servers.act(&self.caller, session, &adapters, &mut messages, first, &opts, |e| {
            if let AgentEvent::Call { call, .. } = &e {
                call_tokens += call.stats.name_tokens + call.stats.arg_tokens;
            }
            match job.events.send(Event::Step(e)) {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()),
            }
        })?;
        let prompt = self.caller.answer_prompt(&servers.catalog, &messages)?;
        if prompt.len() >= self.limits.n_ctx {
            // The tools ran and their steps went out: the results filled the context, which ends
            // the answer before its first token (as max_tokens would) instead of failing the
            // request and losing what was done.
            let usage = Usage { prompt: prompt.len(), completion: call_tokens, cached: cached.min(prompt.len()) };
            return Ok(Event::Done { finish_reason: "length", usage, call: None });
        }
        let room = self.limits.n_ctx.saturating_sub(prompt.len());
        let max_tokens = Some(r.max_tokens.unwrap_or(self.limits.default_max_tokens).min(room).max(1));
        let plan = self.caller.answer_activation(&servers.catalog, &messages, adapters.answer)?;
        match self.text_with(session, job, prompt, plan, max_tokens, cached, None)? {
            Event::Done { finish_reason, mut usage, call } => {
                usage.completion += call_tokens;
                Ok(Event::Done { finish_reason, usage, call })
            }
            other => Ok(other),
        }
    }

    /// How many text tokens may follow `prompt`: `max_tokens`, or the default, within the context.
    fn text_room(&self, prompt: &[u32], max_tokens: Option<usize>) -> Result<usize, ApiError> {
        let n_ctx = self.limits.n_ctx;
        if prompt.len() >= n_ctx {
            return Err(crate::Error::ContextOverflow { needed: prompt.len() + 1, n_ctx }.into());
        }
        let room = n_ctx - prompt.len();
        match max_tokens {
            Some(n) if n > room => Err(ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::invalid(
                    "max_tokens",
                    format!("the prompt has {} tokens, so at most {room} more fit in the context of {n_ctx}, not {n}", prompt.len()),
                )
            }),
            Some(n) => Ok(n),
            None => Ok(self.limits.default_max_tokens.min(room)),
        }
    }

    /// The text answer to the request's conversation with its tools listed (after `call:
    /// finish`), written by the set's answer adapter where it applies to these tools.
    fn answer_text(
        &self,
        session: &mut Session,
        job: &Job,
        adapters: &AdapterSet,
        cached: usize,
        call: Option<ToolCall>,
    ) -> Result<Event, ApiError> {
        let r = &job.request;
        let prompt = self.caller.answer_prompt(&r.catalog, &r.messages)?;
        let plan = self.caller.answer_activation(&r.catalog, &r.messages, adapters.answer)?;
        self.text(session, job, prompt, plan, cached, call)
    }

    /// Free text after `prompt` (under `plan`'s adapter from its position), streamed as it is
    /// decoded; returns the last event.
    fn text(
        &self,
        session: &mut Session,
        job: &Job,
        prompt: Vec<u32>,
        plan: Option<Activation>,
        cached: usize,
        call: Option<ToolCall>,
    ) -> Result<Event, ApiError> {
        self.text_with(session, job, prompt, plan, job.request.max_tokens, cached, call)
    }

    /// [`text`](Self::text) of at most `max_tokens` (`None`: the server's default).
    #[allow(clippy::too_many_arguments)] // the text's prompt, adapter and bound, and what the request holds already
    fn text_with(
        &self,
        session: &mut Session,
        job: &Job,
        prompt: Vec<u32>,
        plan: Option<Activation>,
        max_tokens: Option<usize>,
        cached: usize,
        call: Option<ToolCall>,
    ) -> Result<Event, ApiError> {
        let max_tokens = self.text_room(&prompt, max_tokens)?;
        let tokenizer = &self.backend.engine.tokenizer;
        let opts = GenerateOptions { max_tokens, sampler: job.request.sampler, stop: tokenizer.stop.clone(), stop_on_repeat: false };
        let mut stream = TextStream::new(tokenizer.clone());
        // A client that left stops the text at its next token.
        let g = session.generate_until(&prompt, plan, &opts, |t| match stream.push(t) {
            Ok(piece) if !piece.is_empty() => match job.events.send(Event::Text(piece)) {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()),
            },
            _ => ControlFlow::Continue(()),
        })?;
        let rest = stream.finish()?;
        if !rest.is_empty() {
            let _ = job.events.send(Event::Text(rest));
        }
        let stopped = g.tokens.last().is_some_and(|&t| tokenizer.is_stop(t));
        let usage = Usage { prompt: prompt.len(), completion: g.tokens.len(), cached: cached.min(prompt.len().saturating_sub(1)) };
        Ok(Event::Done { finish_reason: if stopped { "stop" } else { "length" }, usage, call: call.map(Box::new) })
    }
}
