//! The server's routes: checks every request must pass, JSON answers and server-sent events
//! (connections and HTTP/1.1 itself: `listen.rs` and `conn.rs`).

use super::conn::HttpRequest;
use super::listen::{self, EventStream, Listener, Responder};
use super::openai::{self, tool_call_json, ApiError, Envelope};
use super::worker::{self, Backend, Event, Job, Metrics, WorkerLimits};
use super::ServeOptions;
use crate::error::{Error, Result};
use crate::kv::KvCache;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A running server. Dropping it stops accepting connections; [`shutdown`](Self::shutdown)
/// also waits for the requests in flight.
pub struct Server {
    listener: Listener,
    worker: Option<JoinHandle<()>>,
}

/// What every connection thread needs.
struct Shared {
    jobs: SyncSender<Job>,
    metrics: Arc<Mutex<Metrics>>,
    model: String,
    /// The tools of the server's own MCP servers, which requests without `tools` get.
    server_tools: crate::toolcall::Catalog,
    opts: ServeOptions,
    next: AtomicU64,
}

impl Server {
    /// Start the worker on `backend` (it makes its KV cache first), then listen on
    /// `opts.addr` (port 0 picks a free port; see [`addr`](Self::addr)).
    pub fn start(backend: Backend, opts: ServeOptions) -> Result<Self> {
        if opts.max_queue == 0 {
            return Err(Error::InvalidOption("max_queue must be at least 1".into()));
        }
        if opts.parallel == 0 {
            return Err(Error::InvalidOption("parallel must be at least 1".into()));
        }
        if opts.max_connections == 0 || opts.request_timeout.is_zero() {
            return Err(Error::InvalidOption("max_connections and request_timeout must be above 0".into()));
        }
        let model = backend.engine.model.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "agentflux".into());
        let config = &backend.engine.model.config;
        let n_ctx = opts.n_ctx.min(config.n_ctx_train);
        let session_bytes = n_ctx as u64 * KvCache::bytes_per_position(config);
        let cached_sessions = match opts.cache_bytes {
            0 => 0,
            bytes => bytes.checked_div(session_bytes).unwrap_or(0).max(1) as usize,
        };
        tracing::info!(cached_sessions, n_ctx, "prefix cache");
        let limits = WorkerLimits {
            n_ctx,
            default_max_tokens: opts.default_max_tokens,
            cached_sessions,
            parallel: opts.parallel,
            max_steps: opts.max_steps,
            max_result_chars: opts.max_result_chars,
        };
        let server_tools = backend.server_tools();
        let (jobs, queue) = mpsc::sync_channel(opts.max_queue);
        let (ready_tx, ready) = mpsc::channel();
        let metrics = Arc::new(Mutex::new(Metrics::default()));
        let counted = metrics.clone();
        let worker = std::thread::Builder::new()
            .name("agentflux-worker".into())
            .spawn(move || worker::run(backend, limits, queue, &counted, ready_tx))
            .map_err(|e| Error::Serve(format!("cannot start the worker thread: {e}")))?;
        match ready.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Error::Engine("the engine stopped while starting".into())),
        }
        let limits =
            listen::Limits { max_connections: opts.max_connections, request_timeout: opts.request_timeout, max_body: opts.max_body_bytes };
        let addr = opts.addr;
        let shared = Arc::new(Shared { jobs, metrics, model, server_tools, opts, next: AtomicU64::new(1) });
        let listener = Listener::bind(addr, limits, Arc::new(move |request, responder| handle(&shared, request, responder)))
            .map_err(|e| Error::Serve(format!("cannot listen on {addr}: {e}")))?;
        tracing::info!("listening on http://{}", listener.addr());
        Ok(Self { listener, worker: Some(worker) })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.listener.addr()
    }

    /// Serve until the process ends.
    pub fn wait(mut self) {
        self.listener.join();
    }

    /// Stop accepting connections and wait until the requests in flight are answered.
    pub fn shutdown(mut self) {
        self.listener.stop();
        // The worker ends when the last request thread lets go of the queue.
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// Why `request` is refused before its route is looked at: a `Host` this server does not answer
/// to (a web page's script reaching a local server through DNS rebinding names its own host), or
/// a missing or wrong API key (`/health` excepted).
fn refusal(shared: &Shared, request: &HttpRequest) -> Option<ApiError> {
    if let Some(key) = shared.opts.api_key.as_deref().filter(|_| request.path() != "/health") {
        let given = request.header("Authorization");
        let ok = matches!(given[..], [auth] if auth.strip_prefix("Bearer ").is_some_and(|k| same_key(k.trim(), key)));
        if !ok {
            return Some(ApiError {
                code: Some("invalid_api_key"),
                ..ApiError::status(401, "this server needs its API key: send `Authorization: Bearer KEY`")
            });
        }
    }
    let hosts = request.header("Host");
    let allowed = &shared.opts.allowed_hosts;
    let loopback = shared.opts.addr.ip().is_loopback();
    if !loopback && allowed.is_empty() {
        return None;
    }
    let [host] = hosts[..] else {
        return Some(ApiError::invalid("Host", "the request needs exactly one Host header"));
    };
    let name = host_name(host);
    let ok =
        (loopback && ["localhost", "127.0.0.1", "[::1]"].contains(&name.as_str())) || allowed.iter().any(|a| a.eq_ignore_ascii_case(&name));
    (!ok).then(|| {
        ApiError::status(403, format!("this server does not answer to the host '{}' (allow it with --allow-host)", name.escape_debug()))
    })
}

/// The host of a `Host` header, without its port, lowercased.
fn host_name(host: &str) -> String {
    let host = host.trim();
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split_once(']').map_or(host.to_string(), |(ip, _)| format!("[{ip}]")),
        None => host
            .rsplit_once(':')
            .map_or(host, |(name, port)| if port.chars().all(|c| c.is_ascii_digit()) { name } else { host })
            .to_string(),
    };
    name.to_ascii_lowercase()
}

/// An API key compared in time independent of where it differs.
fn same_key(given: &str, key: &str) -> bool {
    given.len() == key.len() && given.bytes().zip(key.bytes()).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
}

fn handle(shared: &Shared, request: HttpRequest, responder: Responder) {
    let path = request.path().to_string();
    let method = request.method.clone();
    let t0 = Instant::now();
    if let Some(e) = refusal(shared, &request) {
        let headers: &[(&str, &str)] = if e.status == 401 { &[("WWW-Authenticate", "Bearer")] } else { &[] };
        let status = error(responder, e, headers);
        tracing::info!("{} {} {status} (refused)", method.escape_debug(), path.escape_debug());
        return;
    }
    let status = match (method.as_str(), path.as_str()) {
        ("POST", "/v1/chat/completions") => chat(shared, &request, responder),
        ("GET", p) if p.strip_prefix("/v1/models/").is_some_and(|id| id == shared.model) => {
            respond(responder, 200, &json!({"id": shared.model, "object": "model", "created": now(), "owned_by": "agentflux"}), &[])
        }
        ("GET", p) if p.starts_with("/v1/models/") => error(
            responder,
            ApiError {
                code: Some("model_not_found"),
                ..ApiError::status(
                    404,
                    format!("no model '{}' here; this server runs '{}'", p["/v1/models/".len()..].escape_debug(), shared.model),
                )
            },
            &[],
        ),
        ("GET", "/v1/models") => {
            let created = now();
            respond(
                responder,
                200,
                &json!({"object": "list", "data": [{"id": shared.model, "object": "model", "created": created, "owned_by": "agentflux"}]}),
                &[],
            )
        }
        ("GET", "/health") => respond(responder, 200, &json!({"status": "ok"}), &[]),
        ("GET", "/metrics") => {
            let m = shared.metrics.lock().map(|m| *m).unwrap_or_default();
            if let Err(e) = responder.respond(200, "text/plain; version=0.0.4", &[], prometheus(&m).as_bytes()) {
                tracing::debug!("the client left before the answer: {e}");
            }
            200
        }
        (_, "/v1/chat/completions") => error(
            responder,
            ApiError::status(405, format!("{} is not allowed here: use POST", method.escape_debug())),
            &[("Allow", "POST")],
        ),
        (_, "/v1/models" | "/health" | "/metrics") => {
            error(responder, ApiError::status(405, format!("{} is not allowed here: use GET", method.escape_debug())), &[("Allow", "GET")])
        }
        _ => error(
            responder,
            ApiError::status(
                404,
                format!("no route {}: this server answers POST /v1/chat/completions, GET /v1/models and GET /metrics", path.escape_debug()),
            ),
            &[],
        ),
    };
    tracing::info!("{} {} {status} in {:.0} ms", method.escape_debug(), path.escape_debug(), t0.elapsed().as_secs_f64() * 1e3);
}

/// The worker's counters in Prometheus' text format (what `GET /metrics` answers).
fn prometheus(m: &Metrics) -> String {
    let b = &m.batch;
    let counters: [(&str, &str, u64); 8] = [
        ("requests_total", "Requests finished, answered or not.", m.requests),
        ("requests_cancelled_total", "Requests whose client left before the answer was complete.", m.cancelled),
        ("passes_total", "Forward passes run.", b.passes as u64),
        ("pass_sequences_total", "Sequences over every pass (a pass of 8 requests' rows counts 8).", b.sequences as u64),
        ("pass_tokens_total", "Tokens over every pass.", b.tokens as u64),
        ("shared_passes_total", "Passes holding more than one request's rows.", b.shared_passes as u64),
        (
            "mixed_adapter_passes_total",
            "Passes whose rows used different adapters (the fused multi-LoRA kernel).",
            b.mixed_adapter_passes as u64,
        ),
        ("widest_pass_sequences", "Most sequences in one pass.", b.widest as u64),
    ];
    let mut out = String::new();
    for (name, help, value) in counters {
        let kind = if name.ends_with("_total") { "counter" } else { "gauge" };
        out.push_str(&format!("# HELP agentflux_{name} {help}\n# TYPE agentflux_{name} {kind}\nagentflux_{name} {value}\n"));
    }
    out
}

/// `POST /v1/chat/completions`; returns the status sent.
fn chat(shared: &Shared, request: &HttpRequest, responder: Responder) -> u16 {
    let json = request.header("Content-Type").first().is_some_and(|t| t.to_ascii_lowercase().starts_with("application/json"));
    if !json {
        // A browser's form or text/plain POST (no CORS preflight) never reaches the model.
        return error(responder, ApiError::status(415, "Content-Type must be application/json"), &[]);
    }
    let parsed = match openai::parse_request(&request.body, shared.opts.max_result_chars, &shared.server_tools) {
        Ok(r) => r,
        Err(e) => return error(responder, e, &[]),
    };
    let (stream, include_usage) = (parsed.stream, parsed.include_usage);
    let seq = shared.next.fetch_add(1, Ordering::Relaxed);
    let (events, answer) = mpsc::channel();
    match shared.jobs.try_send(Job { request: parsed, events, seq }) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            return error(
                responder,
                ApiError::status(503, format!("{} requests are already waiting for the GPU; retry later", shared.opts.max_queue)),
                &[("Retry-After", "1")],
            )
        }
        Err(TrySendError::Disconnected(_)) => return error(responder, ApiError::status(503, "the engine has stopped"), &[]),
    }
    let envelope = Envelope { id: format!("chatcmpl-{seq}"), created: now(), model: shared.model.clone() };
    // Nothing is sent before the first event (`Started`, once the request's tokens are checked
    // and it is being answered), so a request refused by the engine (a prompt beyond the
    // context) still gets its 4xx status; a stream sends its role chunk then.
    let mut answer = Answer::new(answer);
    let first = match answer.next(&responder) {
        Next::Event(Event::Failed(e)) => return error(responder, e, &[]),
        Next::Event(e) => e,
        Next::Left => return CLIENT_LEFT,
        Next::Stopped => return error(responder, stopped(), &[]),
    };
    if stream {
        stream_events(responder, &envelope, first, answer.events, include_usage);
        200
    } else {
        whole_answer(responder, &envelope, first, answer)
    }
}

/// The status logged for a request whose client left before its answer (nginx's 499).
const CLIENT_LEFT: u16 = 499;

/// What waiting for the worker's next event gave.
enum Next {
    Event(Event),
    /// The client closed its connection: dropping the receiver stops the work at its next token.
    Left,
    /// The worker went away.
    Stopped,
}

/// The events of an answer being made, and when its client was last looked at.
struct Answer {
    events: Receiver<Event>,
    looked: Instant,
}

impl Answer {
    /// How often a whole answer's connection is looked at while it is made.
    const LOOK_EVERY: Duration = Duration::from_millis(250);

    fn new(events: Receiver<Event>) -> Self {
        Self { events, looked: Instant::now() }
    }

    /// The next event, or whether the client has left (looked at every quarter second, while
    /// events arrive too).
    fn next(&mut self, responder: &Responder) -> Next {
        loop {
            let event = self.events.recv_timeout(Self::LOOK_EVERY);
            if self.looked.elapsed() >= Self::LOOK_EVERY {
                self.looked = Instant::now();
                if responder.client_gone() {
                    return Next::Left;
                }
            }
            match event {
                Ok(e) => return Next::Event(e),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Next::Stopped,
            }
        }
    }
}

fn stopped() -> ApiError {
    ApiError::status(500, "the engine stopped while answering")
}

/// AgentFlux's details of a call: the chosen tool's probability, every candidate's, timings.
fn details(call: &crate::toolcall::ToolCall) -> Value {
    json!({"confidence": call.confidence, "candidates": call.candidates, "stats": call.stats})
}

fn whole_answer(responder: Responder, envelope: &Envelope, first: Event, mut rest: Answer) -> u16 {
    let (mut text, mut args) = (String::new(), String::new());
    let mut call = None;
    let mut steps = Vec::new();
    let mut event = first;
    loop {
        match event {
            Event::Started => {}
            Event::Text(t) => text.push_str(&t),
            Event::ToolCall { id, name } => call = Some((id, name)),
            Event::Arguments(a) => args.push_str(&a),
            Event::Step(s) => steps.push(json!(s)),
            Event::Failed(e) => return error(responder, e, &[]),
            Event::Done { finish_reason, usage, call: made } => {
                let tool_call = call.map(|(id, name)| tool_call_json(&id, &name, &args));
                let content = if tool_call.is_some() { None } else { Some(text.as_str()) };
                let extra = if steps.is_empty() { made.as_deref().map(details) } else { Some(json!({ "steps": steps })) };
                let body = envelope.completion(content, tool_call, finish_reason, usage, extra);
                return respond(responder, 200, &body, &[]);
            }
        }
        event = match rest.next(&responder) {
            Next::Event(e) => e,
            Next::Left => return CLIENT_LEFT,
            Next::Stopped => return error(responder, stopped(), &[]),
        };
    }
}

/// The answer as server-sent events in HTTP/1.1 chunks, each flushed as it is made.
fn stream_events(responder: Responder, envelope: &Envelope, first: Event, rest: Receiver<Event>, include_usage: bool) {
    let Ok(mut w) = responder.events() else { return };
    let mut sent = event(&mut w, &envelope.chunk(json!({"role": "assistant"}), None));
    for e in std::iter::once(first).chain(rest.iter()) {
        if sent.is_err() {
            // The client left; dropping the receiver lets the worker's sends fail quietly.
            return;
        }
        let last = matches!(e, Event::Done { .. } | Event::Failed(_));
        sent = match e {
            Event::Started => Ok(()),
            Event::Text(t) => event(&mut w, &envelope.chunk(json!({"content": t}), None)),
            Event::ToolCall { id, name } => event(
                &mut w,
                &envelope.chunk(
                    json!({"tool_calls": [{"index": 0, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]}),
                    None,
                ),
            ),
            Event::Arguments(a) => {
                event(&mut w, &envelope.chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": a}}]}), None))
            }
            Event::Step(s) => {
                let mut chunk = envelope.chunk(json!({}), None);
                chunk["agentflux"] = json!({ "step": s });
                event(&mut w, &chunk)
            }
            Event::Failed(e) => event(&mut w, &e.body()),
            Event::Done { finish_reason, usage, call } => {
                let mut end = envelope.chunk(json!({}), Some(finish_reason));
                if let Some(c) = call.as_deref() {
                    end["agentflux"] = details(c);
                }
                event(&mut w, &end).and_then(|_| if include_usage { event(&mut w, &envelope.usage_chunk(usage)) } else { Ok(()) })
            }
        };
        if last {
            break;
        }
    }
    let _ = w.chunk(b"data: [DONE]\n\n").and_then(|_| w.finish());
}

fn event(w: &mut EventStream, v: &Value) -> std::io::Result<()> {
    w.chunk(format!("data: {v}\n\n").as_bytes())
}

fn error(responder: Responder, e: ApiError, headers: &[(&str, &str)]) -> u16 {
    respond(responder, e.status, &e.body(), headers)
}

fn respond(responder: Responder, status: u16, body: &Value, headers: &[(&str, &str)]) -> u16 {
    if let Err(e) = responder.respond(status, "application/json", headers, body.to_string().as_bytes()) {
        tracing::debug!("the client left before the answer: {e}");
    }
    status
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
