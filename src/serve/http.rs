//! HTTP over `tiny_http`: routing, request bodies, JSON answers and server-sent events.

use super::openai::{self, tool_call_json, ApiError, Envelope};
use super::worker::{self, Backend, Event, Job, Metrics, WorkerLimits};
use super::ServeOptions;
use crate::error::{Error, Result};
use crate::kv::KvCache;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};
use tiny_http::{Header, Method, Request, Response};

/// A running server. Dropping it stops accepting connections; [`shutdown`](Self::shutdown)
/// also waits for the requests in flight.
pub struct Server {
    addr: SocketAddr,
    http: Arc<tiny_http::Server>,
    acceptor: Option<JoinHandle<()>>,
    worker: Option<JoinHandle<()>>,
}

/// What every connection thread needs.
struct Shared {
    jobs: SyncSender<Job>,
    metrics: Arc<Mutex<Metrics>>,
    model: String,
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
        let model = backend.engine.model.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "agentflux".into());
        let config = &backend.engine.model.config;
        let n_ctx = opts.n_ctx.min(config.n_ctx_train);
        let session_bytes = n_ctx as u64 * KvCache::bytes_per_position(config);
        let cached_sessions = match opts.cache_bytes {
            0 => 0,
            bytes => bytes.checked_div(session_bytes).unwrap_or(0).max(1) as usize,
        };
        tracing::info!(cached_sessions, n_ctx, "prefix cache");
        let limits = WorkerLimits { n_ctx, default_max_tokens: opts.default_max_tokens, cached_sessions, parallel: opts.parallel };
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
        let http = tiny_http::Server::http(opts.addr).map_err(|e| Error::Serve(format!("cannot listen on {}: {e}", opts.addr)))?;
        let addr = http.server_addr().to_ip().ok_or_else(|| Error::Serve(format!("{} is not an IP address", opts.addr)))?;
        let http = Arc::new(http);
        let shared = Arc::new(Shared { jobs, metrics, model, opts, next: AtomicU64::new(1) });
        let listener = http.clone();
        let acceptor = std::thread::Builder::new()
            .name("agentflux-http".into())
            .spawn(move || {
                for request in listener.incoming_requests() {
                    let shared = shared.clone();
                    // A thread per connection: most of its life is waiting for the worker.
                    let spawned = std::thread::Builder::new().name("agentflux-request".into()).spawn(move || handle(&shared, request));
                    if let Err(e) = spawned {
                        tracing::error!("cannot start a request thread: {e}");
                    }
                }
            })
            .map_err(|e| Error::Serve(format!("cannot start the listener thread: {e}")))?;
        tracing::info!("listening on http://{addr}");
        Ok(Self { addr, http, acceptor: Some(acceptor), worker: Some(worker) })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serve until the process ends.
    pub fn wait(mut self) {
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }

    /// Stop accepting connections and wait until the requests in flight are answered.
    pub fn shutdown(mut self) {
        self.http.unblock();
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        // The worker ends when the last request thread lets go of the queue.
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.http.unblock();
    }
}

/// The values of header `name` in `request`.
fn header_values<'r>(request: &'r Request, name: &'static str) -> Vec<&'r str> {
    request.headers().iter().filter(|h| h.field.equiv(name)).map(|h| h.value.as_str()).collect()
}

/// Why `request` is refused before its route is looked at: a `Host` this server does not answer
/// to (a web page's script reaching a local server through DNS rebinding names its own host),
/// or `Content-Length` headers that disagree (a request smuggled past a proxy).
fn refusal(shared: &Shared, request: &Request) -> Option<ApiError> {
    let lengths = header_values(request, "Content-Length");
    if lengths.iter().any(|l| l.trim() != lengths[0].trim()) {
        return Some(ApiError::invalid("Content-Length", "the request has Content-Length headers that disagree"));
    }
    let hosts = header_values(request, "Host");
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

fn handle(shared: &Shared, request: Request) {
    let path = request.url().split('?').next().unwrap_or("").to_string();
    let method = request.method().clone();
    let t0 = std::time::Instant::now();
    if let Some(e) = refusal(shared, &request) {
        let status = error(request, e, &[]);
        tracing::info!("{method} {path} {status} (refused)");
        return;
    }
    let status = match (&method, path.as_str()) {
        (Method::Post, "/v1/chat/completions") => chat(shared, request),
        (Method::Get, p) if p.strip_prefix("/v1/models/").is_some_and(|id| id == shared.model) => {
            respond(request, 200, &json!({"id": shared.model, "object": "model", "created": now(), "owned_by": "agentflux"}), &[])
        }
        (Method::Get, p) if p.starts_with("/v1/models/") => error(
            request,
            ApiError {
                code: Some("model_not_found"),
                ..ApiError::status(
                    404,
                    format!("no model '{}' here; this server runs '{}'", p["/v1/models/".len()..].escape_debug(), shared.model),
                )
            },
            &[],
        ),
        (Method::Get, "/v1/models") => {
            let created = now();
            respond(
                request,
                200,
                &json!({"object": "list", "data": [{"id": shared.model, "object": "model", "created": created, "owned_by": "agentflux"}]}),
                &[],
            )
        }
        (Method::Get, "/health") => respond(request, 200, &json!({"status": "ok"}), &[]),
        (Method::Get, "/metrics") => {
            let m = shared.metrics.lock().map(|m| *m).unwrap_or_default();
            let r = Response::from_string(prometheus(&m)).with_status_code(200);
            let r = match Header::from_bytes("Content-Type", "text/plain; version=0.0.4") {
                Ok(h) => r.with_header(h),
                Err(_) => r,
            };
            if let Err(e) = request.respond(r) {
                tracing::debug!("the client left before the answer: {e}");
            }
            200
        }
        (_, "/v1/chat/completions") => {
            error(request, ApiError::status(405, format!("{method} is not allowed here: use POST")), &[("Allow", "POST")])
        }
        (_, "/v1/models" | "/health" | "/metrics") => {
            error(request, ApiError::status(405, format!("{method} is not allowed here: use GET")), &[("Allow", "GET")])
        }
        _ => error(
            request,
            ApiError::status(
                404,
                format!("no route {path}: this server answers POST /v1/chat/completions, GET /v1/models and GET /metrics"),
            ),
            &[],
        ),
    };
    tracing::info!("{method} {path} {status} in {:.0} ms", t0.elapsed().as_secs_f64() * 1e3);
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
fn chat(shared: &Shared, mut request: Request) -> u16 {
    let json =
        header_values(&request, "Content-Type").first().is_some_and(|t| t.trim().to_ascii_lowercase().starts_with("application/json"));
    if !json {
        // A browser's form or text/plain POST (no CORS preflight) never reaches the model.
        return error(request, ApiError::status(415, "Content-Type must be application/json"), &[]);
    }
    let limit = shared.opts.max_body_bytes;
    let too_large = || ApiError::status(413, format!("the body is larger than {limit} bytes"));
    if request.body_length().is_some_and(|n| n > limit) {
        return error(request, too_large(), &[]);
    }
    let mut body = Vec::new();
    if let Err(e) = request.as_reader().take(limit as u64 + 1).read_to_end(&mut body) {
        return error(request, ApiError::invalid("body", format!("could not read the body: {e}")), &[]);
    }
    if body.len() > limit {
        return error(request, too_large(), &[]);
    }
    let parsed = match openai::parse_request(&body, shared.opts.max_result_chars) {
        Ok(r) => r,
        Err(e) => return error(request, e, &[]),
    };
    let (stream, include_usage) = (parsed.stream, parsed.include_usage);
    let seq = shared.next.fetch_add(1, Ordering::Relaxed);
    let (events, answer) = mpsc::channel();
    match shared.jobs.try_send(Job { request: parsed, events, seq }) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            return error(
                request,
                ApiError::status(503, format!("{} requests are already waiting for the GPU; retry later", shared.opts.max_queue)),
                &[("Retry-After", "1")],
            )
        }
        Err(TrySendError::Disconnected(_)) => return error(request, ApiError::status(503, "the engine has stopped"), &[]),
    }
    let envelope = Envelope { id: format!("chatcmpl-{seq}"), created: now(), model: shared.model.clone() };
    // Nothing is sent before the first event (`Started`, once the request's tokens are checked
    // and it is being answered), so a request refused by the engine (a prompt beyond the
    // context) still gets its 4xx status; a stream sends its role chunk then.
    let first = match answer.recv() {
        Ok(Event::Failed(e)) => return error(request, e, &[]),
        Ok(e) => e,
        Err(_) => return error(request, stopped(), &[]),
    };
    if stream {
        stream_events(request, &envelope, first, answer, include_usage);
        200
    } else {
        whole_answer(request, &envelope, first, answer)
    }
}

fn stopped() -> ApiError {
    ApiError::status(500, "the engine stopped while answering")
}

/// AgentFlux's details of a call: the chosen tool's probability, every candidate's, timings.
fn details(call: &crate::toolcall::ToolCall) -> Value {
    json!({"confidence": call.confidence, "candidates": call.candidates, "stats": call.stats})
}

fn whole_answer(request: Request, envelope: &Envelope, first: Event, rest: Receiver<Event>) -> u16 {
    let (mut text, mut args) = (String::new(), String::new());
    let mut call = None;
    for event in std::iter::once(first).chain(rest.iter()) {
        match event {
            Event::Started => {}
            Event::Text(t) => text.push_str(&t),
            Event::ToolCall { id, name } => call = Some((id, name)),
            Event::Arguments(a) => args.push_str(&a),
            Event::Failed(e) => return error(request, e, &[]),
            Event::Done { finish_reason, usage, call: made } => {
                let tool_call = call.map(|(id, name)| tool_call_json(&id, &name, &args));
                let content = if tool_call.is_some() { None } else { Some(text.as_str()) };
                let body = envelope.completion(content, tool_call, finish_reason, usage, made.as_deref().map(details));
                return respond(request, 200, &body, &[]);
            }
        }
    }
    error(request, stopped(), &[])
}

/// The answer as server-sent events in HTTP/1.1 chunks, each flushed as it is made.
fn stream_events(request: Request, envelope: &Envelope, first: Event, rest: Receiver<Event>, include_usage: bool) {
    let mut w = request.into_writer();
    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";
    let mut sent = w.write_all(head.as_bytes()).and_then(|_| event(&mut w, &envelope.chunk(json!({"role": "assistant"}), None)));
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
    let _ = chunk(&mut w, b"data: [DONE]\n\n").and_then(|_| w.write_all(b"0\r\n\r\n")).and_then(|_| w.flush());
}

fn event(w: &mut dyn Write, v: &Value) -> std::io::Result<()> {
    chunk(w, format!("data: {v}\n\n").as_bytes())
}

/// One HTTP/1.1 chunk, flushed.
fn chunk(w: &mut dyn Write, data: &[u8]) -> std::io::Result<()> {
    write!(w, "{:x}\r\n", data.len())?;
    w.write_all(data)?;
    w.write_all(b"\r\n")?;
    w.flush()
}

fn error(request: Request, e: ApiError, headers: &[(&str, &str)]) -> u16 {
    respond(request, e.status, &e.body(), headers)
}

fn respond(request: Request, status: u16, body: &Value, headers: &[(&str, &str)]) -> u16 {
    let mut r = Response::from_string(body.to_string()).with_status_code(status);
    for (k, v) in [("Content-Type", "application/json")].iter().chain(headers) {
        if let Ok(h) = Header::from_bytes(k.as_bytes(), v.as_bytes()) {
            r.add_header(h);
        }
    }
    if let Err(e) = request.respond(r) {
        tracing::debug!("the client left before the answer: {e}");
    }
    status
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
