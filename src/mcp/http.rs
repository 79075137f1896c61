//! The Streamable HTTP transport (MCP revisions 2025-03-26 on): every message is POSTed to one
//! endpoint, and the server answers 202 (nothing to say), one JSON message, or a stream of
//! server-sent events carrying messages, the answer among them. The session id the server gives
//! at `initialize` (`Mcp-Session-Id`) and the agreed revision (`MCP-Protocol-Version`) go with
//! every later request; ending the session is a DELETE. A stream that ends before its answer is
//! resumed with a GET carrying `Last-Event-ID`, after the `retry` delay the server asked for.

use super::client::{Incoming, SendError, Transport};
use super::McpError;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Largest answer or event read (a tool result included).
const MAX_BODY_BYTES: u64 = 16 << 20;
/// Times one stream is resumed before its request is given up.
const MAX_RESUMES: usize = 5;

/// A server at a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpEndpoint {
    /// The `http://` or `https://` URL of its MCP endpoint.
    pub url: String,
    /// Headers sent with every request (`Authorization: Bearer …`, say).
    pub headers: Vec<(String, String)>,
}

/// What every request carries; shared with the threads that read streams.
#[derive(Clone)]
struct Session {
    agent: ureq::Agent,
    url: String,
    headers: Vec<(String, String)>,
    id: Arc<Mutex<Option<String>>>,
    protocol: Arc<Mutex<Option<String>>>,
}

impl Session {
    fn id(&self) -> Option<String> {
        self.id.lock().ok().and_then(|g| g.clone())
    }

    /// `r` with the user's headers, the session id and the protocol revision.
    fn headed<B>(&self, mut r: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        for (k, v) in &self.headers {
            r = r.header(k, v);
        }
        if let Some(id) = self.id() {
            r = r.header("Mcp-Session-Id", id);
        }
        if let Some(p) = self.protocol.lock().ok().and_then(|g| g.clone()) {
            r = r.header("MCP-Protocol-Version", p);
        }
        r.header("Accept", "application/json, text/event-stream")
    }

    /// Keep the session id a response gives (the answer to `initialize` does).
    fn remember(&self, response: &ureq::http::Response<ureq::Body>) {
        if let Some(id) = response.headers().get("mcp-session-id").and_then(|v| v.to_str().ok()) {
            if let Ok(mut g) = self.id.lock() {
                *g = Some(id.to_string());
            }
        }
    }
}

/// A server reached over Streamable HTTP.
pub(super) struct HttpTransport {
    session: Session,
    tx: Sender<Incoming>,
}

impl HttpTransport {
    /// A transport to `endpoint` (nothing is sent yet) whose answers arrive on the receiver;
    /// `wait` bounds how long a response's head may take.
    pub fn new(endpoint: &HttpEndpoint, wait: Duration) -> Result<(Self, Receiver<Incoming>), McpError> {
        let url = endpoint.url.as_str();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(McpError::Spawn { command: url.into(), msg: "an MCP server URL starts with http:// or https://".into() });
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(wait))
            .build()
            .into();
        let session = Session {
            agent,
            url: endpoint.url.clone(),
            headers: endpoint.headers.clone(),
            id: Arc::new(Mutex::new(None)),
            protocol: Arc::new(Mutex::new(None)),
        };
        let (tx, rx) = channel();
        Ok((Self { session, tx }, rx))
    }
}

impl Transport for HttpTransport {
    fn send(&mut self, msg: &Value) -> Result<(), SendError> {
        let s = &self.session;
        let request = s.headed(s.agent.post(&s.url)).header("Content-Type", "application/json");
        let mut response = request.send(msg.to_string()).map_err(|e| SendError::Refused(format!("cannot reach it: {e}")))?;
        s.remember(&response);
        let status = response.status().as_u16();
        let kind = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
        if !(200..300).contains(&status) {
            let body = response.body_mut().with_config().limit(4096).read_to_string().unwrap_or_default();
            let expired = if status == 404 && s.id().is_some() { " (the session expired)" } else { "" };
            return Err(SendError::Refused(format!("HTTP {status}{expired}: {}", body.trim())));
        }
        // The answer this message waits for: a request's (one with a method and an id).
        let answer_to = msg.get("method").and(msg.get("id")).cloned();
        if kind.starts_with("text/event-stream") {
            let (session, tx) = (s.clone(), self.tx.clone());
            let body = response.into_body().into_with_config().limit(u64::MAX).reader();
            std::thread::spawn(move || follow_stream(&session, Box::new(body), &tx, answer_to));
            return Ok(());
        }
        let text =
            response.body_mut().with_config().limit(MAX_BODY_BYTES).read_to_string().map_err(|e| SendError::Closed(e.to_string()))?;
        if status == 202 || text.trim().is_empty() {
            return Ok(());
        }
        for m in messages(&text) {
            let _ = self.tx.send(m);
        }
        Ok(())
    }

    fn negotiated(&mut self, version: &str) {
        if let Ok(mut g) = self.session.protocol.lock() {
            *g = Some(version.to_string());
        }
    }

    /// A session the server gave is ended with a DELETE (a server may refuse it: 405).
    fn end(&mut self) -> String {
        let s = &self.session;
        if s.id().is_some() {
            let _ = s.headed(s.agent.delete(&s.url)).call();
        }
        "session ended".into()
    }
}

/// The messages of an answer's JSON: one, or a batch of them; otherwise garbage.
fn messages(text: &str) -> Vec<Incoming> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Array(batch)) => batch.into_iter().map(Incoming::Message).collect(),
        Ok(v) => vec![Incoming::Message(v)],
        Err(_) => vec![Incoming::Garbage(text.chars().take(200).collect())],
    }
}

/// Where a stream stopped being read.
enum StreamEnd {
    /// The awaited answer came (or the client is gone): nothing more to read.
    Done,
    /// The server closed it first.
    Cut,
}

/// Read server-sent events from `body` onto `tx` until `answer_to`'s answer comes; a stream cut
/// before it is resumed from its last event id.
fn follow_stream(session: &Session, body: Box<dyn Read + Send>, tx: &Sender<Incoming>, answer_to: Option<Value>) {
    let mut events = EventReader::new(body);
    for resumes in 0.. {
        if let StreamEnd::Done = events.pump(tx, answer_to.as_ref()) {
            return;
        }
        let Some(last) = events.last_id.clone().filter(|_| answer_to.is_some() && resumes < MAX_RESUMES) else {
            let _ = tx.send(Incoming::Closed);
            return;
        };
        std::thread::sleep(events.retry);
        let resumed = session.headed(session.agent.get(&session.url)).header("Last-Event-ID", last).call();
        match resumed {
            Ok(r) if r.status().is_success() => {
                events.body = BufReader::new(Box::new(r.into_body().into_with_config().limit(u64::MAX).reader()));
            }
            _ => {
                let _ = tx.send(Incoming::Closed);
                return;
            }
        }
    }
}

/// A server-sent-event stream being read: its body, the last event id and the reconnection
/// delay the server asked for.
struct EventReader {
    body: BufReader<Box<dyn Read + Send>>,
    last_id: Option<String>,
    retry: Duration,
}

impl EventReader {
    fn new(body: Box<dyn Read + Send>) -> Self {
        Self { body: BufReader::new(body), last_id: None, retry: Duration::from_secs(1) }
    }

    /// Dispatch events until the stream ends or `answer_to`'s answer has been sent on.
    fn pump(&mut self, tx: &Sender<Incoming>, answer_to: Option<&Value>) -> StreamEnd {
        let mut data = String::new();
        let mut line = Vec::new();
        loop {
            line.clear();
            match (&mut self.body).take(MAX_BODY_BYTES).read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return StreamEnd::Cut,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\n', '\r']);
            if text.is_empty() {
                // An event ends: its data, if any, is one JSON-RPC message or a batch.
                if data.trim().is_empty() {
                    data.clear();
                    continue;
                }
                for m in messages(&std::mem::take(&mut data)) {
                    let answers =
                        matches!((&m, answer_to), (Incoming::Message(v), Some(id)) if v.get("method").is_none() && v.get("id") == Some(id));
                    if tx.send(m).is_err() || answers {
                        return StreamEnd::Done;
                    }
                }
                continue;
            }
            let (field, value) = text.split_once(':').map_or((text, ""), |(f, v)| (f, v.strip_prefix(' ').unwrap_or(v)));
            match field {
                "data" => {
                    data.push_str(value);
                    data.push('\n');
                }
                "id" if !value.contains('\0') => self.last_id = Some(value.to_string()),
                "retry" => {
                    if let Ok(ms) = value.parse::<u64>() {
                        self.retry = Duration::from_millis(ms.min(60_000));
                    }
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pumped(stream: &str, answer_to: Option<Value>) -> (Vec<String>, bool, EventReader) {
        let mut r = EventReader::new(Box::new(std::io::Cursor::new(stream.as_bytes().to_vec())));
        let (tx, rx) = channel();
        let done = matches!(r.pump(&tx, answer_to.as_ref()), StreamEnd::Done);
        let got = rx
            .try_iter()
            .map(|m| match m {
                Incoming::Message(v) => v.to_string(),
                Incoming::Garbage(g) => format!("garbage {g}"),
                Incoming::Closed => "closed".into(),
            })
            .collect();
        (got, done, r)
    }

    /// Events as the spec writes them: comments, multi-line data, CRLF, a priming event with no
    /// data, a notification before the answer, a batch; reading stops at the answer.
    #[test]
    fn server_sent_events_become_messages() {
        let stream = ": comment\r\nid: e1\r\nretry: 250\r\ndata:\r\n\r\nevent: message\ndata: {\"jsonrpc\":\"2.0\",\n\
                      data: \"method\":\"notifications/progress\"}\n\nid: e2\ndata: [{\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{}}]\n\n\
                      data: {\"after\":true}\n\n";
        let (got, done, r) = pumped(stream, Some(Value::from(7)));
        assert_eq!(got, [r#"{"jsonrpc":"2.0","method":"notifications/progress"}"#, r#"{"jsonrpc":"2.0","id":7,"result":{}}"#]);
        assert!(done);
        assert_eq!((r.last_id.as_deref(), r.retry), (Some("e2"), Duration::from_millis(250)));
        // Cut before the answer: what came is passed on, and the stream is resumable from e1.
        let (got, done, r) = pumped("id: e1\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"x\"}\n\ndata: {\"id\":", Some(Value::from(1)));
        assert_eq!((got.len(), done, r.last_id.as_deref()), (1, false, Some("e1")));
        assert_eq!(pumped("data: not json\n\n", None).0, ["garbage not json\n"]);
    }
}
