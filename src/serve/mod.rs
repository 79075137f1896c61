//! An OpenAI-compatible HTTP server: `POST /v1/chat/completions` (with `tools` and
//! `tool_choice`, streamed or not) and `GET /v1/models`.
//!
//! One thread watches every connection and reads each request whole, within a deadline and
//! under a bound on open connections; each request is then validated on a thread of its own (a malformed one gets a 4xx naming the
//! field and never reaches the GPU), then queued for the worker ([`worker`]), which answers up
//! to `parallel` of them at once with their rows batched into shared forward passes. The queue
//! is bounded: when it is full a request gets 503 at once instead of waiting without end. Tool calls go through the decoupled pipeline ([`crate::toolcall`]): the
//! tool is scored among the request's tools (its probability and every candidate's are returned
//! under `agentflux`), the arguments are decoded under the tool's JSON schema.
//!
//! A server given MCP servers of its own ([`Backend::servers`]) also acts: a request without
//! `tools` gets theirs, and the server calls them itself (the agent loop of `agentflux run`,
//! each step reported under `agentflux`) until the model chooses `finish`, then answers in text.

mod cache;
mod conn;
mod http;
mod listen;
pub mod openai;
pub mod worker;

pub use http::Server;
pub use worker::Backend;

use std::net::SocketAddr;
use std::time::Duration;

/// How the server listens and what it allows.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to bind (loopback by default; set `api_key` before binding beyond it).
    pub addr: SocketAddr,
    /// Host names requests may name besides the loopback ones (`localhost`, `127.0.0.1`,
    /// `[::1]`, answered when bound to loopback); bound elsewhere with none given, any host.
    pub allowed_hosts: Vec<String>,
    /// KV cache positions per request.
    pub n_ctx: usize,
    /// Requests answered at once: their rows share each forward pass (continuous batching). Each
    /// holds a KV cache of `n_ctx` positions while it runs.
    pub parallel: usize,
    /// Requests waiting for the GPU before new ones get 503.
    pub max_queue: usize,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Text tokens when a request gives no `max_tokens`.
    pub default_max_tokens: usize,
    /// Characters of a tool result the model sees.
    pub max_result_chars: usize,
    /// Most calls of the server's own MCP tools ([`Backend::servers`]) per request.
    pub max_steps: usize,
    /// Bytes of KV cache the prefix cache may keep across requests: as many conversations of
    /// `n_ctx` positions as fit, at least one; 0 turns it off (every request starts from an
    /// empty cache).
    pub cache_bytes: u64,
    /// A key every request but `GET /health` must send as `Authorization: Bearer KEY` (401
    /// without it): for a server bound beyond loopback.
    pub api_key: Option<String>,
    /// Connections open at once (waiting for a request or being answered); beyond them a new one
    /// gets 503 and is closed. A stalled connection costs a buffer, not a thread.
    pub max_connections: usize,
    /// Time a connection has to send a whole request from when it opens (or its previous answer
    /// ends): then it gets 408 and is closed.
    pub request_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            allowed_hosts: Vec::new(),
            n_ctx: 4096,
            parallel: 4,
            max_queue: 64,
            max_body_bytes: 4 << 20,
            default_max_tokens: 1024,
            max_result_chars: crate::toolcall::MAX_RESULT_CHARS,
            max_steps: 6,
            cache_bytes: 512 << 20,
            api_key: None,
            max_connections: 1024,
            request_timeout: Duration::from_secs(30),
        }
    }
}
