//! The engine side of the server: one thread owns the model and the prefix cache and runs queued
//! requests one at a time, reporting each piece of the answer as an [`Event`].
//!
//! A request continues the cached session that holds the longest prefix of its prompt, so only its
//! new tokens are computed (the prefix cache, `serve/cache.rs`). That does not change its answer: a
//! row of a forward pass is computed the same way whatever other rows share the pass (the products
//! and attention sum each row's terms in one fixed order), with one exception — a suffix of a
//! single token is attended by the decode kernel, which splits the keys and sums in another order,
//! so its probabilities agree within rounding (1e-6 in the tests) rather than bit for bit. The
//! tokens are the same (tested: concurrent requests against sequential ones, cached conversations
//! against a server with nothing cached).

use super::cache::PrefixCache;
use super::openai::{ApiError, ChatRequest, Usage, Work};
use crate::decode::GenerateOptions;
use crate::session::Session;
use crate::text::TextStream;
use crate::toolcall::{AdapterSet, CallEvent, ToolCall, ToolCaller, FINISH};
use crate::Engine;
use std::ops::ControlFlow;
use std::sync::mpsc::{Receiver, Sender};

/// A piece of an answer, in the order it is produced.
#[derive(Debug)]
pub enum Event {
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
}

/// Run jobs until every sender is gone. `ready` hears once whether the cache could be made.
pub fn run(backend: Backend, limits: WorkerLimits, jobs: Receiver<Job>, ready: Sender<crate::Result<()>>) {
    let engine = &backend.engine;
    let caller = match ToolCaller::new(engine.tokenizer.clone(), engine.template.clone()) {
        Ok(c) => c,
        Err(e) => return drop(ready.send(Err(e))),
    };
    // The first session now: a context that does not fit fails at start, not at a request.
    let mut cache = PrefixCache::new(&engine.model, limits.n_ctx, limits.cached_sessions);
    if let Err(e) = cache.checkout(&[]) {
        return drop(ready.send(Err(e)));
    }
    if ready.send(Ok(())).is_err() {
        return;
    }
    let worker = Worker { backend: &backend, caller, limits };
    for job in jobs {
        let answered = worker.prefix(&job.request).map_err(ApiError::from).and_then(|prefix| {
            let (session, cached) = cache.checkout(&prefix)?;
            worker.answer(session, &job, cached)
        });
        if let Err(e) = answered {
            let _ = job.events.send(Event::Failed(e));
        }
    }
}

struct Worker<'a> {
    backend: &'a Backend,
    caller: ToolCaller,
    limits: WorkerLimits,
}

impl Worker<'_> {
    /// The beginning of the request's prompt that is computed with the base weights (what the
    /// prefix cache matches): the whole prompt of text work, the conversation before the tool
    /// choice of a call.
    fn prefix(&self, r: &ChatRequest) -> crate::Result<Vec<u32>> {
        match &r.work {
            Work::Chat => self.caller.chat_prompt(&r.messages),
            Work::Answer => self.caller.answer_prompt(&r.catalog, &r.messages),
            Work::Call(_) => self.caller.prefix_tokens(&r.catalog, &r.messages),
        }
    }

    /// Answer `job` on `session`, which holds `cached` tokens of its prompt already.
    fn answer(&self, session: &mut Session, job: &Job, cached: usize) -> Result<(), ApiError> {
        let r = &job.request;
        let send = |e: Event| {
            let _ = job.events.send(e);
        };
        let call = match &r.work {
            Work::Chat => return self.text(session, job, self.caller.chat_prompt(&r.messages)?, cached, None),
            Work::Answer => return self.text(session, job, self.caller.answer_prompt(&r.catalog, &r.messages)?, cached, None),
            Work::Call(choice) => {
                let adapters = self.backend.adapters.for_tools(&r.catalog.names());
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
            let prompt = self.caller.answer_prompt(&r.catalog, &r.messages)?;
            return self.text(session, job, prompt, cached, Some(call));
        }
        let completion = call.stats.name_tokens + call.stats.arg_tokens;
        let usage = Usage { prompt: call.stats.prefix_tokens, completion, cached: cached.min(call.stats.prefix_tokens.saturating_sub(1)) };
        send(Event::Done { finish_reason: "tool_calls", usage, call: Some(Box::new(call)) });
        Ok(())
    }

    /// Free text after `prompt`, streamed as it is decoded.
    fn text(&self, session: &mut Session, job: &Job, prompt: Vec<u32>, cached: usize, call: Option<ToolCall>) -> Result<(), ApiError> {
        let n_ctx = self.limits.n_ctx;
        if prompt.len() >= n_ctx {
            return Err(crate::Error::ContextOverflow { needed: prompt.len() + 1, n_ctx }.into());
        }
        let room = n_ctx - prompt.len();
        let max_tokens = match job.request.max_tokens {
            Some(n) if n > room => {
                return Err(ApiError {
                    code: Some("context_length_exceeded"),
                    ..ApiError::invalid(
                        "max_tokens",
                        format!("the prompt has {} tokens, so at most {room} more fit in the context of {n_ctx}, not {n}", prompt.len()),
                    )
                })
            }
            Some(n) => n,
            None => self.limits.default_max_tokens.min(room),
        };
        let tokenizer = &self.backend.engine.tokenizer;
        let opts = GenerateOptions { max_tokens, sampler: job.request.sampler, stop: tokenizer.stop.clone(), stop_on_repeat: false };
        let mut stream = TextStream::new(tokenizer.clone());
        let g = session.generate(&prompt, None, &opts, |t| match stream.push(t) {
            Ok(piece) if !piece.is_empty() => {
                let _ = job.events.send(Event::Text(piece));
            }
            _ => {}
        })?;
        let rest = stream.finish()?;
        if !rest.is_empty() {
            let _ = job.events.send(Event::Text(rest));
        }
        let stopped = g.tokens.last().is_some_and(|&t| tokenizer.is_stop(t));
        let usage = Usage { prompt: prompt.len(), completion: g.tokens.len(), cached: cached.min(prompt.len().saturating_sub(1)) };
        let _ = job.events.send(Event::Done { finish_reason: if stopped { "stop" } else { "length" }, usage, call: call.map(Box::new) });
        Ok(())
    }
}
