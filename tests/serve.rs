//! `agentflux serve` over loopback: the OpenAI chat-completions shape with every tool_choice,
//! streaming that adds up to the whole answer, malformed requests refused with the field named,
//! and 20 concurrent requests answered exactly as when sent one by one. The model is a tiny
//! random transformer carrying SmolLM2's real tokenizer, so the suite stays fast on lavapipe.

mod common;

use agentflux::serve::{Backend, ServeOptions, Server};
use agentflux::toolcall::AdapterSet;
use agentflux::Engine;
use common::{ctx, default_model, rng, tiny_with_tokenizer};
use serde_json::{json, Value};
use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};

/// A server on a free loopback port over a tiny model with the default model's tokenizer.
fn start(tag: &str, opts: ServeOptions) -> Option<Server> {
    let f = default_model()?;
    let path = tiny_with_tokenizer(&f, rng(tag).next_u64(), tag);
    let engine = Engine::load_on(ctx(), &path).unwrap();
    std::fs::remove_file(&path).ok();
    Some(
        Server::start(Backend { engine, adapters: AdapterSet::default() }, ServeOptions { addr: "127.0.0.1:0".parse().unwrap(), ..opts })
            .unwrap(),
    )
}

struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `data:` payloads of a server-sent-event stream.
    fn events(&self) -> Vec<String> {
        self.body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
    }
}

/// One HTTP/1.1 exchange on a fresh connection (`Connection: close`), chunked bodies decoded.
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end: {text}"));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_string() };
    Reply { status, head: head.to_string(), body }
}

fn dechunk(mut rest: &str) -> String {
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

fn post(addr: SocketAddr, body: &Value) -> Reply {
    http(addr, "POST", "/v1/chat/completions", &body.to_string())
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}, "unit": {"enum": ["C", "F"]}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "get_time", "description": "Local time in a zone.",
            "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}},
    ])
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// The parts of an answer that must not depend on timing: choices (without the per-request
/// tool-call id), usage and the candidates' probabilities.
fn answer_of(v: &Value) -> Value {
    let mut choices = v["choices"].clone();
    if let Some(call) = choices[0]["message"]["tool_calls"].get_mut(0) {
        assert!(call["id"].as_str().is_some_and(|id| id.starts_with("call_")), "{call}");
        call["id"] = Value::Null;
    }
    json!({"choices": choices, "usage": v["usage"], "candidates": v["agentflux"]["candidates"]})
}

#[test]
fn chat_completions_with_every_tool_choice() {
    let Some(server) = start("serve-choices", ServeOptions { n_ctx: 1024, max_body_bytes: 64 << 10, ..Default::default() }) else { return };
    let addr = server.addr();
    assert!(ServeOptions::default().addr.ip().is_loopback(), "the default address must be loopback");

    let models = http(addr, "GET", "/v1/models", "");
    assert_eq!(models.status, 200, "{}", models.body);
    assert!(models.json()["data"][0]["id"].as_str().unwrap().ends_with(".gguf"));

    // max_tokens bounds the text of an answer without a tool (a random model rambles).
    let ask = |tool_choice: Value| {
        post(
            addr,
            &json!({"model": "x", "messages": user("Weather in Oslo, in Celsius?"), "tools": weather_tools(), "tool_choice": tool_choice, "max_tokens": 8}),
        )
    };
    // required: a real tool with arguments valid for its schema; finish is no candidate.
    let r = ask(json!("required"));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert!(choice["message"]["content"].is_null());
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    let name = call["function"]["name"].as_str().unwrap();
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    match name {
        "get_weather" => assert!(["Paris", "Oslo", "Lima"].contains(&args["city"].as_str().unwrap()), "{args}"),
        "get_time" => assert!(["UTC", "CET"].contains(&args["zone"].as_str().unwrap()), "{args}"),
        other => panic!("invented tool {other}"),
    }
    let candidates = v["agentflux"]["candidates"].as_object().unwrap();
    assert_eq!(candidates.len(), 2, "{candidates:?}");
    assert!((candidates.values().map(|p| p.as_f64().unwrap()).sum::<f64>() - 1.0).abs() < 1e-6);
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0 && v["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    // A named function: that tool, no selection (no confidence).
    let v = ask(json!({"type": "function", "function": {"name": "get_time"}})).json();
    assert_eq!(v["choices"][0]["message"]["tool_calls"][0]["function"]["name"], "get_time");
    assert!(v["agentflux"]["confidence"].is_null());

    // auto: finish is a candidate; the answer is a tool call or text, as the model chooses.
    let v = ask(json!("auto")).json();
    assert!(v["agentflux"]["candidates"].as_object().unwrap().contains_key("finish"));
    let m = &v["choices"][0]["message"];
    assert!(m["tool_calls"].is_array() != m["content"].is_string(), "{m}");

    // none, and no tools at all: text only.
    for body in [
        json!({"messages": user("Say hi."), "tools": weather_tools(), "tool_choice": "none", "max_tokens": 6}),
        json!({"messages": user("Say hi."), "max_tokens": 6}),
    ] {
        let v = post(addr, &body).json();
        let c = &v["choices"][0];
        assert!(c["message"]["content"].is_string() && c["message"].get("tool_calls").is_none(), "{v}");
        assert!(["stop", "length"].contains(&c["finish_reason"].as_str().unwrap()));
        assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 6);
    }

    // Streaming adds up to the whole answer: a tool call...
    let body = json!({"messages": user("What time is it in Paris?"), "tools": weather_tools(), "tool_choice": "required", "stream": true, "stream_options": {"include_usage": true}});
    let whole = post(addr, &json!({"messages": body["messages"], "tools": body["tools"], "tool_choice": "required"})).json();
    let s = post(addr, &body);
    assert_eq!(s.status, 200);
    assert!(s.head.contains("text/event-stream"), "{}", s.head);
    let events = s.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let (mut name, mut args) = (String::new(), String::new());
    for c in &chunks {
        if let Some(tc) = c["choices"][0]["delta"]["tool_calls"].get(0) {
            name.push_str(tc["function"]["name"].as_str().unwrap_or(""));
            args.push_str(tc["function"]["arguments"].as_str().unwrap_or(""));
        }
    }
    let whole_call = &whole["choices"][0]["message"]["tool_calls"][0]["function"];
    assert_eq!((name.as_str(), args.as_str()), (whole_call["name"].as_str().unwrap(), whole_call["arguments"].as_str().unwrap()));
    let finish = chunks.iter().find(|c| c["choices"][0]["finish_reason"].is_string()).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(chunks.last().unwrap()["usage"], whole["usage"], "include_usage: the last chunk carries the usage");
    // ... and text.
    let text_body = json!({"messages": user("Tell me a story."), "max_tokens": 12});
    let whole = post(addr, &text_body).json();
    let mut streamed = text_body.clone();
    streamed["stream"] = json!(true);
    let text: String = post(addr, &streamed)
        .events()
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap());

    // Malformed requests: 4xx with OpenAI's error object naming the field.
    let refused = |r: Reply, status: u16, param: Option<&str>| {
        assert_eq!(r.status, status, "{}", r.body);
        let e = r.json();
        assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
        if let Some(p) = param {
            assert_eq!(e["error"]["param"], p, "{e}");
        }
    };
    refused(http(addr, "POST", "/v1/chat/completions", "{oops"), 400, Some("body"));
    refused(post(addr, &json!({"messages": [{"role": "user"}]})), 400, Some("messages[0].content"));
    refused(
        post(
            addr,
            &json!({"messages": user("hi"), "tools": weather_tools(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
        ),
        400,
        Some("tool_choice"),
    );
    refused(
        post(addr, &json!({"messages": user("hi"), "tools": [{"type": "function", "function": {"name": "bad name"}}]})),
        400,
        Some("tools"),
    );
    refused(http(addr, "GET", "/v1/chat/completions", ""), 405, None);
    refused(http(addr, "GET", "/v1/nothing", ""), 404, None);
    refused(post(addr, &json!({"messages": user(&"x".repeat(70 << 10))})), 413, None);
    // Beyond the context (1024 here): refused before anything is generated.
    let long = "tell me about the weather in every city you know ".repeat(150);
    let r = post(addr, &json!({"messages": user(&long), "tools": weather_tools(), "max_tokens": 8}));
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (400, Some("context_length_exceeded")), "{}", r.body);
    let r = post(addr, &json!({"messages": user("hi"), "max_tokens": 5000}));
    assert_eq!((r.status, r.json()["error"]["param"].as_str()), (400, Some("max_tokens")), "{}", r.body);
    // After all of that the server still answers.
    assert_eq!(ask(json!("required")).status, 200);
    server.shutdown();
}

#[test]
fn concurrent_requests_match_sequential_runs() {
    let Some(server) = start("serve-concurrent", ServeOptions { n_ctx: 1024, max_queue: 32, ..Default::default() }) else { return };
    let addr = server.addr();
    let cities = ["Paris", "Oslo", "Lima", "Rome", "Quito"];
    let requests: Vec<Value> = (0..20)
        .map(|i| {
            let text = format!("Request {i}: what about {}?", cities[i % cities.len()]);
            match i % 4 {
                0 => json!({"messages": user(&text), "tools": weather_tools(), "max_tokens": 8}),
                1 => json!({"messages": user(&text), "tools": weather_tools(), "tool_choice": "required"}),
                2 => json!({"messages": user(&text), "tools": weather_tools(), "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
                _ => json!({"messages": user(&text), "max_tokens": 8}),
            }
        })
        .collect();
    let sequential: Vec<Value> = requests.iter().map(|r| answer_of(&post(addr, r).json())).collect();
    let handles: Vec<_> = requests.iter().cloned().map(|r| std::thread::spawn(move || post(addr, &r))).collect();
    for (i, h) in handles.into_iter().enumerate() {
        let reply = h.join().unwrap();
        assert_eq!(reply.status, 200, "request {i}: {}", reply.body);
        assert_eq!(answer_of(&reply.json()), sequential[i], "request {i} differs when sent concurrently");
    }
    server.shutdown();
}

#[test]
fn a_full_queue_is_refused_at_once() {
    let Some(server) = start("serve-queue", ServeOptions { n_ctx: 1024, max_queue: 1, ..Default::default() }) else { return };
    let addr = server.addr();
    let body = json!({"messages": user("Write a long story."), "max_tokens": 96});
    let handles: Vec<_> = (0..6)
        .map(|_| {
            std::thread::spawn({
                let b = body.clone();
                move || post(addr, &b)
            })
        })
        .collect();
    let replies: Vec<Reply> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let busy: Vec<&Reply> = replies.iter().filter(|r| r.status == 503).collect();
    assert_eq!(ok + busy.len(), replies.len(), "only answers and 503s");
    assert!(ok >= 1 && !busy.is_empty(), "{ok} answered, {} refused", busy.len());
    assert!(busy[0].head.contains("Retry-After"), "{}", busy[0].head);
    server.shutdown();
}

/// The command as a user types it: loopback by default, the address printed first.
#[test]
fn serve_command_listens_on_loopback() {
    let Some(f) = default_model() else { return };
    let path = tiny_with_tokenizer(&f, rng("serve-cli").next_u64(), "serve-cli");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_agentflux"))
        .args(["serve", "--model", path.to_str().unwrap(), "--port", "0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr: SocketAddr =
        line.trim().strip_prefix("listening on http://").unwrap_or_else(|| panic!("first line: {line}")).parse().unwrap();
    assert!(addr.ip().is_loopback(), "{addr}");
    let r = http(addr, "GET", "/v1/models", "");
    child.kill().ok();
    child.wait().ok();
    std::fs::remove_file(&path).ok();
    assert_eq!(r.status, 200, "{}", r.body);
}
