//! A client of `agentflux serve` for the tests: servers on free loopback ports over a tiny model,
//! one raw HTTP/1.1 exchange per connection, and the parts of an answer that must not depend on
//! timing or on what the prefix cache held.

use super::{ctx, default_model, rng, tiny_with_tokenizer};
use agentflux::serve::{Backend, ServeOptions, Server};
use agentflux::toolcall::AdapterSet;
use agentflux::Engine;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

/// A server on a free loopback port over a tiny model with the default model's tokenizer.
pub fn start(tag: &str, opts: ServeOptions) -> Option<Server> {
    let f = default_model()?;
    let path = tiny_with_tokenizer(&f, rng(tag).next_u64(), tag);
    let server = start_on(&path, opts);
    std::fs::remove_file(&path).ok();
    Some(server)
}

/// A server on a free loopback port over the model file `path`.
pub fn start_on(path: &std::path::Path, opts: ServeOptions) -> Server {
    let engine = Engine::load_on(ctx(), path).unwrap();
    Server::start(
        Backend { engine, adapters: AdapterSet::default(), servers: None },
        ServeOptions { addr: "127.0.0.1:0".parse().unwrap(), ..opts },
    )
    .unwrap()
}

pub struct Reply {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `data:` payloads of a server-sent-event stream.
    pub fn events(&self) -> Vec<String> {
        self.body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
    }
}

/// One HTTP/1.1 exchange on a fresh connection (`Connection: close`), chunked bodies decoded.
pub fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> Reply {
    let head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}", body.len());
    exchange(addr, &head, body)
}

/// An exchange with these request line and headers (`Connection: close` is added).
pub fn exchange(addr: SocketAddr, head: &str, body: &str) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "{head}\r\nConnection: close\r\n\r\n{body}").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end: {text}"));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_string() };
    Reply { status, head: head.to_string(), body }
}

pub fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").expect("chunk size line");
        let n = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        if n == 0 {
            return out;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
}

pub fn post(addr: SocketAddr, body: &Value) -> Reply {
    http(addr, "POST", "/v1/chat/completions", &body.to_string())
}

pub fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}, "unit": {"enum": ["C", "F"]}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "get_time", "description": "Local time in a zone.",
            "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}},
    ])
}

pub fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// The parts of an answer that must not depend on timing or on what the cache held: choices
/// (without the per-request tool-call id), the token counts and the candidates' probabilities.
pub fn answer_of(v: &Value) -> Value {
    let mut choices = v["choices"].clone();
    if let Some(call) = choices[0]["message"]["tool_calls"].get_mut(0) {
        assert!(call["id"].as_str().is_some_and(|id| id.starts_with("call_")), "{call}");
        call["id"] = Value::Null;
    }
    json!({"choices": choices, "usage": counts(v), "candidates": v["agentflux"]["candidates"]})
}

/// Two answers the same: choices and token counts exactly, the candidates' probabilities within
/// 1e-5. Not bit for bit: positions computed one token at a time (a cached earlier answer's
/// tokens, or a prompt whose last token alone is not cached) went through the decode kernels,
/// which sum in another order than a prefill's (the attention splits the keys; the single-row
/// product), and that rounding carries through the later layers — 2e-6 at most in the
/// probabilities seen, so 1e-5 leaves a margin while a wrong row or position would show as 1e-2.
pub fn assert_same_answer(got: &Value, want: &Value, what: &str) {
    let (got, want) = (answer_of(got), answer_of(want));
    assert_eq!((&got["choices"], &got["usage"]), (&want["choices"], &want["usage"]), "{what}");
    let (pg, pw) = (got["candidates"].as_object(), want["candidates"].as_object());
    assert_eq!(pg.map(|m| m.keys().collect::<Vec<_>>()), pw.map(|m| m.keys().collect::<Vec<_>>()), "{what}: candidates");
    for (name, p) in pg.into_iter().flatten() {
        let (p, q) = (p.as_f64().unwrap(), want["candidates"][name].as_f64().unwrap());
        assert!((p - q).abs() <= 1e-5, "{what}: P({name}) {p} against {q}");
    }
}

/// The token counts of an answer's usage, without what the prefix cache held.
pub fn counts(v: &Value) -> Value {
    let mut usage = v["usage"].clone();
    usage.as_object_mut().map(|u| u.remove("prompt_tokens_details"));
    usage
}

pub fn cached_tokens(v: &Value) -> u64 {
    v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or_else(|| panic!("no cached_tokens: {v}"))
}

pub fn prompt_tokens(v: &Value) -> u64 {
    v["usage"]["prompt_tokens"].as_u64().unwrap()
}

/// A streamed answer put together: its text, or its tool call's name and arguments.
pub fn assembled(stream: &Reply) -> (String, String, String) {
    let (mut text, mut name, mut args) = (String::new(), String::new(), String::new());
    for e in stream.events().iter().filter(|e| *e != "[DONE]") {
        let delta = serde_json::from_str::<Value>(e).unwrap()["choices"][0]["delta"].clone();
        text.push_str(delta["content"].as_str().unwrap_or(""));
        if let Some(tc) = delta["tool_calls"].get(0) {
            name.push_str(tc["function"]["name"].as_str().unwrap_or(""));
            args.push_str(tc["function"]["arguments"].as_str().unwrap_or(""));
        }
    }
    (text, name, args)
}

/// The same parts of a whole answer.
pub fn message_of(v: &Value) -> (String, String, String) {
    let m = &v["choices"][0]["message"];
    let call = &m["tool_calls"][0]["function"];
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    (s(&m["content"]), s(&call["name"]), s(&call["arguments"]))
}
