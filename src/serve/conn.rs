//! HTTP/1.1 on one connection: a request's head and body taken from the bytes received (every
//! size bounded, every malformed or ambiguous head refused with its status), and answers written
//! back — a whole body, or server-sent events in chunks.

use std::io::{self, Write};
use std::net::TcpStream;
use std::time::Duration;

/// The most bytes a request's line and headers may take.
pub(super) const MAX_HEAD_BYTES: usize = 64 << 10;
/// The most header lines a request may have.
const MAX_HEADERS: usize = 100;

/// A whole request.
#[derive(Debug)]
pub(super) struct HttpRequest {
    pub method: String,
    /// The request target as sent (path and query).
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Whether the connection stays open after the answer (HTTP/1.1 unless `Connection: close`;
    /// HTTP/1.0 only with `Connection: keep-alive`).
    pub keep_alive: bool,
}

impl HttpRequest {
    /// Every value of header `name` (names compare without case).
    pub fn header(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }

    /// The target's path, without its query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

/// A request's line and headers, parsed; its body follows them.
#[derive(Debug)]
pub(super) struct Head {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub keep_alive: bool,
    /// Bytes of the line and headers, the blank line included.
    pub len: usize,
    /// Bytes of the body.
    pub body_len: usize,
    /// The client waits for `100 Continue` before sending the body.
    pub expects_continue: bool,
}

/// Why a request is refused before its route is looked at: the status and the message.
pub(super) type Refusal = (u16, String);

/// The head at the start of `buf`: `Ok(None)` while it is incomplete. Refused: a head over
/// [`MAX_HEAD_BYTES`], bytes that are not text, a malformed line, more than [`MAX_HEADERS`]
/// headers, folded lines, a chunked or otherwise encoded body (411: send `Content-Length`),
/// `Content-Length` headers that disagree or do not parse (400), a body over `max_body` (413).
pub(super) fn parse_head(buf: &[u8], max_body: usize) -> Result<Option<Head>, Refusal> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD_BYTES {
            return Err((431, format!("the request's headers are longer than {MAX_HEAD_BYTES} bytes")));
        }
        return Ok(None);
    };
    if end > MAX_HEAD_BYTES {
        return Err((431, format!("the request's headers are longer than {MAX_HEAD_BYTES} bytes")));
    }
    let bad = |what: &str| (400, format!("malformed request: {what}"));
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| bad("the head is not UTF-8 text"))?;
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(bad("the request line is not `METHOD TARGET HTTP/1.x`"));
    };
    if method.is_empty() || !method.bytes().all(is_token) || !target.starts_with('/') || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(bad("the request line"));
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err((505, format!("{} is not supported: HTTP/1.1 is", version.escape_debug()))),
    };
    let mut headers = Vec::new();
    for l in lines {
        if headers.len() == MAX_HEADERS {
            return Err((431, format!("more than {MAX_HEADERS} headers")));
        }
        let (name, value) = l.split_once(':').ok_or_else(|| bad("a header line without ':'"))?;
        if name.is_empty() || !name.bytes().all(is_token) {
            return Err(bad("a header name (folded lines are not accepted)"));
        }
        if value.bytes().any(|b| (b < b' ' && b != b'\t') || b == 0x7f) {
            return Err(bad("a control character in a header value"));
        }
        headers.push((name.to_string(), value.trim().to_string()));
    }
    let values = |name: &str| headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect::<Vec<_>>();
    if !values("Transfer-Encoding").is_empty() {
        return Err((411, "bodies sent with Transfer-Encoding are not accepted: send Content-Length".into()));
    }
    let lengths = values("Content-Length");
    if lengths.iter().any(|l| *l != lengths[0]) {
        return Err((400, "the request has Content-Length headers that disagree".into()));
    }
    let body_len = match lengths.first() {
        None => 0,
        Some(l) if l.bytes().all(|b| b.is_ascii_digit()) && l.len() <= 19 => l.parse::<u64>().map_err(|_| bad("Content-Length"))?,
        Some(_) => return Err(bad("Content-Length is not a number")),
    };
    if body_len > max_body as u64 {
        return Err((413, format!("the body is larger than {max_body} bytes")));
    }
    let connection: Vec<String> = values("Connection").iter().flat_map(|v| v.split(',')).map(|t| t.trim().to_ascii_lowercase()).collect();
    let keep_alive = if http10 { connection.iter().any(|t| t == "keep-alive") } else { !connection.iter().any(|t| t == "close") };
    let expects_continue = values("Expect").iter().any(|v| v.eq_ignore_ascii_case("100-continue"));
    Ok(Some(Head {
        method: method.to_string(),
        target: target.to_string(),
        headers,
        keep_alive,
        len: end + 4,
        body_len: body_len as usize,
        expects_continue,
    }))
}

/// A character of an HTTP token (method, header name).
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The reason phrase of the statuses this server sends.
fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        499 => "Client Closed Request",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// Write a whole answer: status, headers, `Content-Length` and body.
pub(super) fn write_response(
    w: &mut dyn Write,
    status: u16,
    content_type: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    keep_alive: bool,
) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n", reason(status), body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(if keep_alive { "Connection: keep-alive\r\n\r\n" } else { "Connection: close\r\n\r\n" });
    w.write_all(head.as_bytes())?;
    w.write_all(body)?;
    w.flush()
}

/// Write the head of a stream of server-sent events in HTTP/1.1 chunks (the connection closes
/// after it).
pub(super) fn write_event_stream_head(w: &mut dyn Write) -> io::Result<()> {
    w.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    )
}

/// One HTTP/1.1 chunk, flushed.
pub(super) fn write_chunk(w: &mut dyn Write, data: &[u8]) -> io::Result<()> {
    write!(w, "{:x}\r\n", data.len())?;
    w.write_all(data)?;
    w.write_all(b"\r\n")?;
    w.flush()
}

/// The end of a chunked body.
pub(super) fn write_last_chunk(w: &mut dyn Write) -> io::Result<()> {
    w.write_all(b"0\r\n\r\n")?;
    w.flush()
}

/// Whether the client of `stream` has closed its side or reset the connection (checked without
/// waiting: bytes already sent, such as a next request, mean it is still there).
pub(super) fn client_gone(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let peeked = stream.peek(&mut [0u8; 1]);
    let restored = stream.set_nonblocking(false);
    match peeked {
        Ok(0) => true,
        Ok(_) => restored.is_err(),
        Err(e) => !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) || restored.is_err(),
    }
}

/// How long a write to a client may block before the connection is given up.
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<Head>, Refusal> {
        parse_head(text.as_bytes(), 1000)
    }

    #[test]
    fn heads_parse_and_wait_for_their_end() {
        assert!(head("GET /v1/models HTTP/1.1\r\nHost: x").unwrap().is_none());
        let h = head("POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: localhost\r\ncontent-length: 12\r\n\r\n{\"a\":").unwrap().unwrap();
        assert_eq!((h.method.as_str(), h.target.as_str(), h.body_len, h.keep_alive), ("POST", "/v1/chat/completions?x=1", 12, true));
        assert_eq!(h.len, "POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: localhost\r\ncontent-length: 12\r\n\r\n".len());
        assert!(!head("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n").unwrap().unwrap().keep_alive);
        assert!(!head("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap().keep_alive);
        assert!(head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap().unwrap().keep_alive);
        assert!(head("POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n").unwrap().unwrap().expects_continue);
    }

    #[test]
    fn malformed_and_ambiguous_heads_are_refused() {
        let status = |t: &str| head(t).map(|_| 0).unwrap_or_else(|(s, _)| s);
        assert_eq!(status("GET / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"), 400);
        assert_eq!(status("POST / HTTP/1.1\r\nContent-Length: 1001\r\n\r\n"), 413);
        assert_eq!(status("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), 411);
        assert_eq!(status("GET / HTTP/2.0\r\n\r\n"), 505);
        assert_eq!(status("GET /  HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status("GET http://x/ HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nBad Name: a\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nX: a\u{1b}b\r\n\r\n"), 400);
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(MAX_HEADERS + 1));
        assert_eq!(status(&many), 431);
        assert_eq!(status(&"x".repeat(MAX_HEAD_BYTES + 1)), 431);
        assert_eq!(parse_head(b"GET /\xff HTTP/1.1\r\n\r\n", 10).unwrap_err().0, 400);
    }

    /// Random bytes and mutated heads never panic the parser, and a head it takes lies within
    /// the bytes given. `AGENTFLUX_FUZZ_ITERS` inputs (CI: 20,000).
    #[test]
    fn mutated_heads_are_taken_or_refused() {
        let iters: usize = std::env::var("AGENTFLUX_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
        let valid = b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost:8080\r\nContent-Type: application/json\r\nContent-Length: 17\r\nConnection: keep-alive\r\n\r\n{\"messages\": []}";
        let mut rng = crate::decode::SplitMix64(0x9e37_79b9_7f4a_7c15u64);
        let mut next = move || rng.next_u64();
        let (mut taken, mut refused) = (0, 0);
        for i in 0..iters {
            let mut b = valid.to_vec();
            match i % 4 {
                0 => {
                    for _ in 0..1 + next() % 6 {
                        let at = (next() % b.len() as u64) as usize;
                        b[at] ^= 1 << (next() % 8);
                    }
                }
                1 => {
                    let at = (next() % b.len() as u64) as usize;
                    let insert: &[u8] = [&b"\r\n"[..], b":", b" ", b"\0", b"Content-Length: 5\r\n", b"\xff"][(next() % 6) as usize];
                    b.splice(at..at, insert.iter().copied());
                }
                2 => b.truncate((next() % b.len() as u64) as usize),
                _ => b = (0..next() % 300).map(|_| next() as u8).collect(),
            }
            match parse_head(&b, 1 << 20) {
                Ok(Some(h)) => {
                    assert!(h.len <= b.len(), "a head of {} bytes in {}", h.len, b.len());
                    taken += 1;
                }
                Ok(None) => {}
                Err((status, _)) => {
                    assert!((400..=505).contains(&status));
                    refused += 1;
                }
            }
        }
        assert!(taken > 0 && refused > 0, "{taken} taken, {refused} refused");
    }

    #[test]
    fn answers_carry_their_length_and_connection() {
        let mut out = Vec::new();
        write_response(&mut out, 503, "application/json", &[("Retry-After", "1")], b"{}", false).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{text}");
        assert!(
            text.contains("Content-Length: 2\r\n") && text.contains("Retry-After: 1\r\n") && text.ends_with("Connection: close\r\n\r\n{}")
        );
        let mut out = Vec::new();
        write_chunk(&mut out, b"data: x\n\n").unwrap();
        write_last_chunk(&mut out).unwrap();
        assert_eq!(out, b"9\r\ndata: x\n\n\r\n0\r\n\r\n");
    }
}
