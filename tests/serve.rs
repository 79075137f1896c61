//! `agentflux serve` over loopback: the OpenAI chat-completions shape with every tool_choice,
//! streaming that adds up to the whole answer, malformed requests refused with the field named,
//! 20 concurrent requests answered as when sent one by one, and the prefix cache. The model is a tiny
//! random transformer carrying SmolLM2's real tokenizer, so the suite stays fast on lavapipe.
//! What is measured on the whole process (threads, resident memory) is in `serve_load.rs`.

mod common;

use agentflux::serve::ServeOptions;
use common::serve::*;
use common::{default_model, rng, tiny_with_tokenizer};
use serde_json::{json, Value};
use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};

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
    // include_usage: the last chunk carries the usage; the request repeats the one before it, so
    // all of its prompt but the last token comes from the prefix cache.
    let last = chunks.last().unwrap();
    assert_eq!(counts(last), counts(&whole), "include_usage: the last chunk carries the usage");
    assert_eq!(cached_tokens(last), prompt_tokens(last) - 1, "{}", last["usage"]);
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
    // Text, tool_choice auto, required and named; every kind also streamed.
    let requests: Vec<Value> = (0..24)
        .map(|i| {
            let text = format!("Request {i}: what about {}?", cities[i % cities.len()]);
            let mut r = match i % 4 {
                0 => json!({"messages": user(&text), "tools": weather_tools(), "max_tokens": 8}),
                1 => json!({"messages": user(&text), "tools": weather_tools(), "tool_choice": "required"}),
                2 => json!({"messages": user(&text), "tools": weather_tools(), "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
                _ => json!({"messages": user(&text), "max_tokens": 8}),
            };
            if (i / 4) % 2 == 1 {
                r["stream"] = json!(true);
            }
            r
        })
        .collect();
    let sequential: Vec<Value> = requests
        .iter()
        .map(|r| {
            let mut whole = r.clone();
            whole.as_object_mut().unwrap().remove("stream");
            post(addr, &whole).json()
        })
        .collect();
    let handles: Vec<_> = requests.iter().cloned().map(|r| std::thread::spawn(move || post(addr, &r))).collect();
    for (i, h) in handles.into_iter().enumerate() {
        let reply = h.join().unwrap();
        assert_eq!(reply.status, 200, "request {i}: {}", reply.body);
        let what = format!("request {i} sent concurrently");
        if requests[i]["stream"] == json!(true) {
            assert_eq!(assembled(&reply), message_of(&sequential[i]), "{what}, streamed");
        } else {
            assert_same_answer(&reply.json(), &sequential[i], &what);
        }
    }
    server.shutdown();
}

/// The prefix cache: a repeated conversation computes only its last prompt token and a continued
/// one only what is new, both answering what a server with nothing cached answers; with room for
/// one conversation, another evicts it and the answers stay the same.
#[test]
fn prefix_cache_reuses_conversations_without_changing_answers() {
    let Some(f) = default_model() else { return };
    let path = tiny_with_tokenizer(&f, rng("serve-prefix").next_u64(), "serve-prefix");
    let opts = ServeOptions { n_ctx: 1024, ..Default::default() };
    let server = start_on(&path, opts.clone());
    let addr = server.addr();
    let first = json!({"messages": user("What is the weather in Oslo?"), "tools": weather_tools(), "tool_choice": "required"});
    let a = post(addr, &first).json();
    assert_eq!(cached_tokens(&a), 0, "nothing is cached at first");
    let again = post(addr, &first).json();
    assert_eq!(cached_tokens(&again), prompt_tokens(&again) - 1, "a repeated conversation computes only its last prompt token");
    assert_same_answer(&again, &a, "the repeated conversation");
    // The conversation goes on: the call, its result and a new question.
    let call = a["choices"][0]["message"].clone();
    let id = call["tool_calls"][0]["id"].clone();
    let mut messages = user("What is the weather in Oslo?").as_array().unwrap().clone();
    messages.extend([
        call,
        json!({"role": "tool", "tool_call_id": id, "content": "Sunny, 21 C"}),
        json!({"role": "user", "content": "And in Lima?"}),
    ]);
    let second = json!({"messages": messages, "tools": weather_tools(), "tool_choice": "required"});
    let b = post(addr, &second).json();
    assert!(cached_tokens(&b) > 0 && cached_tokens(&b) < prompt_tokens(&b), "{}", b["usage"]);
    // A server with room for one conversation and nothing cached answers the same; another
    // conversation in between evicts the first, which is then computed again.
    let config = agentflux::hparams::ModelConfig::from_gguf(&agentflux::gguf::GgufFile::open(&path).unwrap()).unwrap();
    let one_session = opts.n_ctx.min(config.n_ctx_train) as u64 * agentflux::kv::KvCache::bytes_per_position(&config);
    let small = start_on(&path, ServeOptions { cache_bytes: one_session, ..opts.clone() });
    // With the cache off, nothing is ever reused.
    let off = start_on(&path, ServeOptions { cache_bytes: 0, ..opts });
    std::fs::remove_file(&path).ok();
    for _ in 0..2 {
        let reply = post(off.addr(), &first).json();
        assert_eq!(cached_tokens(&reply), 0);
        assert_same_answer(&reply, &a, "the first conversation, cache off");
    }
    off.shutdown();
    let fresh = post(small.addr(), &second).json();
    assert_eq!(cached_tokens(&fresh), 0);
    assert_same_answer(&fresh, &b, "the continued conversation, nothing cached");
    let other = json!({"messages": user("Tell me the time in Paris."), "max_tokens": 6});
    assert_eq!(post(small.addr(), &other).status, 200);
    let evicted = post(small.addr(), &second).json();
    assert!(cached_tokens(&evicted) < cached_tokens(&b), "{}", evicted["usage"]);
    assert_same_answer(&evicted, &b, "the continued conversation after an eviction");
    server.shutdown();
    small.shutdown();
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

/// `agentflux serve ARGS --port 0` started, and the address it prints first.
fn serve_command(args: &[&str]) -> (std::process::Child, SocketAddr) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_agentflux"))
        .arg("serve")
        .args(args)
        .args(["--port", "0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on http://").unwrap_or_else(|| panic!("first line: {line}")).parse().unwrap();
    (child, addr)
}

/// The command as a user types it: loopback by default, the address printed first.
#[test]
fn serve_command_listens_on_loopback() {
    let Some(f) = default_model() else { return };
    let path = tiny_with_tokenizer(&f, rng("serve-cli").next_u64(), "serve-cli");
    let (mut child, addr) = serve_command(&["--model", path.to_str().unwrap()]);
    assert!(addr.ip().is_loopback(), "{addr}");
    let r = http(addr, "GET", "/v1/models", "");
    child.kill().ok();
    child.wait().ok();
    std::fs::remove_file(&path).ok();
    assert_eq!(r.status, 200, "{}", r.body);
}

/// A counter of `GET /metrics` (Prometheus' text format).
fn metric(addr: SocketAddr, name: &str) -> u64 {
    let r = http(addr, "GET", "/metrics", "");
    assert_eq!(r.status, 200, "{}", r.body);
    let line = r.body.lines().find(|l| l.split(' ').next() == Some(name)).unwrap_or_else(|| panic!("no {name} in {}", r.body));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// A client that leaves mid-answer stops it: its rows are freed for the others instead of
/// decoding to `max_tokens` for nobody. Streamed, it leaves once the answer's head arrived (the
/// server notices at the next token it sends); whole, after a moment (the server looks at the
/// connection while it waits for the answer).
fn a_leaving_client_stops_its_answer(tag: &str, streamed: bool) {
    let Some(server) = start(tag, ServeOptions { n_ctx: 1024, parallel: 1, ..Default::default() }) else { return };
    let addr = server.addr();
    let whole = json!({"messages": user("Write a very long story."), "max_tokens": 900});
    let full = post(addr, &whole).json()["usage"]["completion_tokens"].as_u64().unwrap();
    let before = metric(addr, "agentflux_pass_tokens_total");
    let mut request = whole.clone();
    if streamed {
        request["stream"] = json!(true);
    }
    let body = request.to_string();
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    if streamed {
        let mut head = [0u8; 16];
        s.read_exact(&mut head).unwrap();
        assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
    } else {
        std::thread::sleep(std::time::Duration::from_millis(400));
    }
    drop(s);
    // The next request waits for the one before it (one at a time here), then is answered.
    let hi = post(addr, &json!({"messages": user("Hi"), "max_tokens": 4})).json();
    let hi_tokens = prompt_tokens(&hi) - cached_tokens(&hi) + hi["usage"]["completion_tokens"].as_u64().unwrap() - 1;
    assert_eq!(metric(addr, "agentflux_requests_total"), 3);
    // The same request ran to `full` tokens with its reader there. A text that ends by itself
    // within a few tokens may finish before the server notices the reader is gone.
    if full > 200 {
        assert_eq!(metric(addr, "agentflux_requests_cancelled_total"), 1);
        let abandoned = metric(addr, "agentflux_pass_tokens_total") - before - hi_tokens;
        eprintln!("the abandoned answer computed {abandoned} of {full} tokens");
        assert!(abandoned < full / 2, "the abandoned answer computed {abandoned} of {full} tokens");
    }
    server.shutdown();
}

#[test]
fn a_client_that_leaves_stops_its_answer() {
    a_leaving_client_stops_its_answer("serve-leave", true);
}

#[test]
fn a_client_that_leaves_before_a_whole_answer_stops_it() {
    a_leaving_client_stops_its_answer("serve-leave-whole", false);
}

/// What a web page or a confused client may send: refused before the model, with the reason.
#[test]
fn hostile_requests_are_refused() {
    let opts = ServeOptions { n_ctx: 1024, parallel: 1, allowed_hosts: vec!["agent.local".into()], ..Default::default() };
    let Some(server) = start("serve-hostile", opts) else { return };
    let addr = server.addr();
    let port = addr.port();
    let models = |host: &str| exchange(addr, &format!("GET /v1/models HTTP/1.1\r\nHost: {host}"), "").status;
    // DNS rebinding: a page at evil.example that resolves to 127.0.0.1 sends its own host name.
    assert_eq!(models(&format!("evil.example:{port}")), 403);
    for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}"), "LOCALHOST".into(), format!("agent.local:{port}")] {
        assert_eq!(models(&host), 200, "{host}");
    }
    assert_eq!(exchange(addr, "GET /v1/models HTTP/1.0", "").status, 400, "no Host");
    // A form or text/plain POST, which a page may send without a preflight.
    let body = json!({"messages": user("Hi"), "max_tokens": 2}).to_string();
    let post_as = |ty: &str| {
        exchange(
            addr,
            &format!("POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {ty}\r\nContent-Length: {}", body.len()),
            &body,
        )
    };
    assert_eq!(post_as("text/plain").status, 415);
    assert_eq!(post_as("application/x-www-form-urlencoded").status, 415);
    assert_eq!(post_as("application/json; charset=utf-8").status, 200);
    // Two lengths that disagree.
    let smuggled = exchange(
        addr,
        &format!("POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nContent-Length: 5", body.len()),
        &body,
    );
    assert_eq!(smuggled.status, 400, "{}", smuggled.body);
    // Fields of the wrong type, and sampling fields that are not implemented.
    for (field, value) in [
        ("parallel_tool_calls", json!("no")),
        ("presence_penalty", json!("x")),
        ("presence_penalty", json!(0.5)),
        ("frequency_penalty", json!(-1)),
        ("logprobs", json!("x")),
        ("top_logprobs", json!(2)),
        ("logit_bias", json!({"42": 5})),
        ("user", json!(7)),
    ] {
        let mut r = json!({"messages": user("Hi"), "max_tokens": 2});
        r[field] = value.clone();
        let reply = post(addr, &r);
        assert_eq!(reply.status, 400, "{field}: {value}: {}", reply.body);
        assert_eq!(reply.json()["error"]["param"], field, "{}", reply.body);
    }
    let fine = json!({"messages": user("Hi"), "max_tokens": 2, "parallel_tool_calls": false, "presence_penalty": 0, "logit_bias": {}, "user": "u1"});
    assert_eq!(post(addr, &fine).status, 200);
    // One model, by its id.
    let id = http(addr, "GET", "/v1/models", "").json()["data"][0]["id"].as_str().unwrap().to_string();
    let one = http(addr, "GET", &format!("/v1/models/{id}"), "");
    assert_eq!((one.status, one.json()["id"].as_str()), (200, Some(id.as_str())));
    let none = http(addr, "GET", "/v1/models/gpt-4", "");
    assert_eq!((none.status, none.json()["error"]["code"].as_str()), (404, Some("model_not_found")));
    server.shutdown();
}

/// A stream's role chunk is sent as soon as the request is being answered, not after its first
/// piece of text or its tool's name.
#[test]
fn a_stream_starts_at_once() {
    let Some(server) = start("serve-start", ServeOptions { n_ctx: 1024, parallel: 1, ..Default::default() }) else { return };
    let addr = server.addr();
    let body = json!({"messages": user("Write a very long story."), "max_tokens": 900, "stream": true}).to_string();
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = std::io::BufReader::new(s);
    let first = loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream ended before any event");
        if let Some(data) = line.trim().strip_prefix("data: ") {
            break serde_json::from_str::<Value>(data).unwrap();
        }
    };
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    // The answer is still being written: no request has finished yet.
    assert_eq!(metric(addr, "agentflux_requests_total"), 0);
    drop(reader);
    server.shutdown();
}

/// Bytes that are not HTTP, or not quite: random blobs, request heads cut short, absurd header
/// values and bodies that are not JSON — the server answers each with an error or closes the
/// connection, and then answers as before.
#[test]
fn the_server_survives_noise() {
    let Some(server) = start("serve-noise", ServeOptions { n_ctx: 1024, parallel: 1, ..Default::default() }) else { return };
    let addr = server.addr();
    let mut r = rng("serve-noise");
    let heads = [
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 99999999999999999999\r\n\r\n"),
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: -5\r\n\r\n{{}}"),
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
        format!("GET /v1/models HTTP/1.1\r\nHost: {addr}\r\nX: {}\r\n\r\n", "y".repeat(100_000)),
        "GET /\u{0}\u{1} HTTP/9.9\r\n\r\n".to_string(),
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 8\r\n\r\n\u{ff}\u{fe}{{\"a\":"),
    ];
    let mut blobs: Vec<Vec<u8>> = heads.iter().map(|h| h.as_bytes().to_vec()).collect();
    for i in 0..200 {
        let n = (r.next_u64() % 2000) as usize;
        let mut b: Vec<u8> = (0..n).map(|_| r.next_u64() as u8).collect();
        if i % 2 == 0 {
            // A plausible start, then noise.
            b.splice(0..0, format!("POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {n}\r\n").bytes());
        }
        blobs.push(b);
    }
    for b in &blobs {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let _ = s.write_all(b);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        if let Some(status) = String::from_utf8_lossy(&reply).split(' ').nth(1).and_then(|c| c.parse::<u16>().ok()) {
            assert!(
                (400..500).contains(&status) || status == 200 && b.starts_with(b"GET /v1/models"),
                "{status} for {:?}",
                String::from_utf8_lossy(&b[..b.len().min(120)])
            );
        }
    }
    assert_eq!(http(addr, "GET", "/health", "").status, 200);
    assert_eq!(post(addr, &json!({"messages": user("Hi"), "max_tokens": 2})).status, 200);
    server.shutdown();
}

/// Beyond `max_connections` open connections a new one gets 503 at once; when some close, new
/// ones are served again. A refused client that sent a body (413 from the head, or 503 at
/// accept) reads its refusal, not a reset. Requests on a kept-alive connection, one after the other or pipelined,
/// are answered in order.
#[test]
fn connections_are_bounded_and_kept_alive() {
    let opts = ServeOptions { n_ctx: 1024, parallel: 1, max_connections: 8, ..Default::default() };
    let Some(server) = start("serve-bound", opts) else { return };
    let addr = server.addr();
    let get = format!("GET /v1/models HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    // One connection, three requests: two pipelined, then one more.
    let mut kept = TcpStream::connect(addr).unwrap();
    kept.write_all(format!("{get}{get}").as_bytes()).unwrap();
    let mut reader = std::io::BufReader::new(kept.try_clone().unwrap());
    let mut read_answer = || {
        use std::io::BufRead;
        let (mut status, mut length) = (String::new(), 0usize);
        reader.read_line(&mut status).unwrap();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body).unwrap();
        (status, String::from_utf8(body).unwrap())
    };
    for _ in 0..2 {
        let (status, body) = read_answer();
        assert!(status.starts_with("HTTP/1.1 200"), "{status} {body}");
        assert!(body.contains("\"list\""), "{body}");
    }
    kept.write_all(get.as_bytes()).unwrap();
    assert!(read_answer().0.starts_with("HTTP/1.1 200"));
    // A body refused from its head (413) is drained, not reset: the client that sends all of it
    // still reads the refusal.
    let big = "x".repeat(5 << 20);
    let head =
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}", big.len());
    assert_eq!(exchange(addr, &head, &big).status, 413);
    // Seven more connections fill the bound (each sends a byte, so it has been accepted).
    let idle: Vec<TcpStream> = (0..7)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"G").unwrap();
            s
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // Refused as it is accepted, before it sends anything.
    let mut refused = String::new();
    TcpStream::connect(addr).unwrap().read_to_string(&mut refused).unwrap();
    assert!(refused.starts_with("HTTP/1.1 503") && refused.contains("Retry-After: 1"), "{refused}");
    // One that sends a whole request with a body reads its refusal too: drained, not reset.
    let body = "x".repeat(64 << 10);
    let post_head =
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}", body.len());
    assert_eq!(exchange(addr, &post_head, &body).status, 503);
    drop(idle);
    drop(kept);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = exchange(addr, &format!("GET /v1/models HTTP/1.1\r\nHost: {addr}"), "");
        if r.status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still refused after the connections closed: {}", r.status);
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    server.shutdown();
}

/// With an API key every route but `/health` needs `Authorization: Bearer KEY`.
#[test]
fn an_api_key_guards_every_route_but_health() {
    let opts = ServeOptions { n_ctx: 1024, parallel: 1, api_key: Some("sk-local-test".into()), ..Default::default() };
    let Some(server) = start("serve-key", opts) else { return };
    let addr = server.addr();
    let get = |auth: &str| exchange(addr, &format!("GET /v1/models HTTP/1.1\r\nHost: {addr}{auth}"), "");
    let none = get("");
    assert_eq!(none.status, 401, "{}", none.body);
    assert!(none.head.contains("WWW-Authenticate: Bearer") && none.json()["error"]["code"] == "invalid_api_key", "{}", none.body);
    assert_eq!(get("\r\nAuthorization: Bearer sk-local-tesT").status, 401);
    assert_eq!(get("\r\nAuthorization: Bearer sk-local-test\r\nAuthorization: Bearer x").status, 401);
    assert_eq!(get("\r\nAuthorization: Bearer sk-local-test").status, 200);
    assert_eq!(http(addr, "GET", "/health", "").status, 200);
    let chat = exchange(
        addr,
        &format!("POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 2"),
        "{}",
    );
    assert_eq!(chat.status, 401);
    server.shutdown();
}

/// The OpenAI Python SDK (tools/clients, installed by tools/setup), or `None` (skipped) outside CI.
fn openai_sdk() -> Option<std::path::PathBuf> {
    let python = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/clients/.venv/bin/python");
    if python.exists() {
        return Some(python);
    }
    assert!(std::env::var("CI").is_err(), "{} is missing under CI: tools/setup installs it", python.display());
    eprintln!("SKIPPED: the OpenAI SDK is not installed (run tools/setup)");
    None
}

/// What users' agents send, through the client they use: the OpenAI Python SDK parses a tool
/// call, a streamed named call, streamed text with its usage, the model list and the errors
/// (a refused field, a wrong API key) — each the same as the raw HTTP exchange gives.
#[test]
fn the_openai_python_sdk_gets_what_raw_http_gets() {
    let Some(python) = openai_sdk() else { return };
    let key = "sk-agentflux-test";
    let Some(server) = start("serve-sdk", ServeOptions { n_ctx: 1024, api_key: Some(key.into()), ..Default::default() }) else { return };
    let addr = server.addr();
    let mut child = std::process::Command::new(python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/openai_client.py"))
        .args([addr.port().to_string(), key.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(weather_tools().to_string().as_bytes()).unwrap();
    let done = child.wait_with_output().unwrap();
    assert!(done.status.success(), "the SDK client failed: {}", String::from_utf8_lossy(&done.stderr));
    let sdk: Value = serde_json::from_slice(&done.stdout).unwrap();

    // The same requests over raw HTTP, with the key.
    let raw = |body: &Value| {
        let text = body.to_string();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}",
            text.len()
        );
        exchange(addr, &head, &text)
    };
    let messages = user("What is the weather in Oslo?");
    let required = raw(&json!({"model": "any", "messages": messages, "tools": weather_tools(), "tool_choice": "required"})).json();
    let call = &required["choices"][0]["message"]["tool_calls"][0];
    let u = &required["usage"];
    assert_eq!(
        sdk["required"],
        json!({
            "finish_reason": "tool_calls",
            "name": call["function"]["name"],
            "arguments": serde_json::from_str::<Value>(call["function"]["arguments"].as_str().unwrap()).unwrap(),
            "id_prefix": "call_",
            "usage": [u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]],
        })
    );
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let (_, name, args) = message_of(&raw(&json!({"messages": messages, "tools": weather_tools(), "tool_choice": named})).json());
    assert_eq!(
        sdk["named_streamed"],
        json!({"name": name, "arguments": serde_json::from_str::<Value>(&args).unwrap(), "finish_reason": "tool_calls"})
    );
    let text = raw(&json!({"messages": user("Say hello."), "max_tokens": 8})).json();
    assert_eq!(
        sdk["text_streamed"],
        json!({"text": text["choices"][0]["message"]["content"], "usage": [text["usage"]["prompt_tokens"], text["usage"]["completion_tokens"]]})
    );
    for choice in ["auto", "none"] {
        let r = raw(&json!({"messages": messages, "tools": weather_tools(), "tool_choice": choice, "max_tokens": 8})).json();
        let m = &r["choices"][0]["message"];
        let calls: Vec<Value> = m["tool_calls"]
            .as_array()
            .map(|c| {
                let parsed = |c: &Value| serde_json::from_str::<Value>(c["function"]["arguments"].as_str().unwrap()).unwrap();
                c.iter().map(|c| json!([c["function"]["name"], parsed(c)])).collect()
            })
            .unwrap_or_default();
        let want = json!({"finish_reason": r["choices"][0]["finish_reason"], "content": m["content"], "tool_calls": calls});
        assert_eq!(sdk[choice], want, "tool_choice {choice}");
    }
    // The conversation the SDK sent back (its own message object serialized) answered over raw
    // HTTP gives the same call; the first turn came from the cache.
    let second = &sdk["second_turn"];
    let r = raw(&json!({"messages": second["messages"], "tools": weather_tools(), "tool_choice": "required"})).json();
    let call = &r["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(second["name"], call["function"]["name"]);
    assert_eq!(second["arguments"], serde_json::from_str::<Value>(call["function"]["arguments"].as_str().unwrap()).unwrap());
    assert!(second["cached"].as_u64().unwrap() > 0, "{second}");
    let models = exchange(addr, &format!("GET /v1/models HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}"), "").json();
    assert_eq!(sdk["models"], json!([models["data"][0]["id"]]));
    assert_eq!(sdk["retrieved"], models["data"][0]["id"]);
    assert_eq!(sdk["bad_request"], json!({"status": 400, "param": "n"}));
    assert_eq!(sdk["wrong_key"], json!(401));
    server.shutdown();
}

/// Requests that arrive together and share a long beginning (an agent framework's first steps:
/// one system text, different questions) compute it once: the first computes it while the
/// others wait, then they start from a copy. Their answers are the ones a server that shares
/// nothing gives.
#[test]
fn concurrent_requests_compute_their_shared_prefix_once() {
    let request = |i: usize| {
        let system = "You are a careful assistant for a small team. ".repeat(30);
        let question = format!("Question {i}: which city is {}?", ["north", "south", "east", "west"][i]);
        json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}], "max_tokens": 2})
    };
    let Some(f) = default_model() else { return };
    let path = tiny_with_tokenizer(&f, rng("serve-shared").next_u64(), "serve-shared");
    let alone = start_on(&path, ServeOptions { n_ctx: 1024, parallel: 1, cache_bytes: 0, ..Default::default() });
    let want: Vec<Value> = (0..4).map(|i| post(alone.addr(), &request(i)).json()).collect();
    alone.shutdown();
    let server = start_on(&path, ServeOptions { n_ctx: 1024, parallel: 4, ..Default::default() });
    std::fs::remove_file(&path).ok();
    let addr = server.addr();
    let threads: Vec<_> = (0..4).map(|i| std::thread::spawn(move || post(addr, &request(i)).json())).collect();
    let got: Vec<Value> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let prompt: u64 = got.iter().map(prompt_tokens).sum();
    let cached: u64 = got.iter().map(cached_tokens).sum();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_same_answer(g, w, &format!("request {i}"));
    }
    // Three of the four started from the first one's copy of the system text.
    let shared = prompt_tokens(&got[0]) as usize - 20;
    assert!(cached as usize >= 3 * shared, "{cached} of {prompt} prompt tokens came from the cache; ~{shared} are shared");
    let computed = metric(addr, "agentflux_pass_tokens_total");
    eprintln!("4 requests of {prompt} prompt tokens: {cached} from the cache, {computed} computed");
    assert!(computed < prompt - 2 * shared as u64, "{computed} tokens computed for {prompt} prompt tokens");
    server.shutdown();
}

/// What a step reports that must not depend on timing: the call (tool and arguments), the tool's
/// output, why the loop stopped.
fn step_of(e: &Value) -> Value {
    match e["event"].as_str() {
        Some("call") => json!(["call", e["step"], e["call"]["name"], e["call"]["arguments"]]),
        Some("result") => json!(["result", e["step"], e["name"], e["text"], e["is_error"]]),
        _ => json!([e["event"], e["reason"]]),
    }
}

/// `serve --mcp-config`: a request without `tools` gets the configured servers' tools, the server
/// calls them itself, and answers from their results — the same calls, tool outputs and answer
/// as the library's agent loop computes in-process on the same model and a fresh server over
/// the same files. The first call is named (`list_allowed_directories`, whose output names the
/// workspace: proof that the server ran it; a random model's own choices are arbitrary).
/// Streamed, the steps arrive as chunks before the answer; `tool_choice: "none"` is a plain chat
/// turn, `"required"` a call first.
#[test]
fn serve_calls_the_mcp_servers_of_its_config() {
    use agentflux::decode::GenerateOptions;
    use agentflux::mcp::{McpClient, ServerOptions};
    use agentflux::session::Session;
    use agentflux::text::ChatMessage;
    use agentflux::toolcall::{AdapterSet, AgentOptions, ToolCaller, ToolChoice, ToolServers};
    let Some(f) = default_model() else { return };
    let Some(bin) = common::filesystem_server() else { return };
    let model = tiny_with_tokenizer(&f, rng("serve-mcp").next_u64(), "serve-mcp");
    let root = std::env::temp_dir().join(format!("agentflux-serve-mcp-{}", std::process::id()));
    let fresh_workspace = || {
        std::fs::remove_dir_all(&root).ok();
        std::fs::create_dir_all(root.join("notes")).unwrap();
        std::fs::write(root.join("notes/todo.txt"), "buy milk\n").unwrap();
    };
    let task = "Read notes/todo.txt and tell me what to buy.";
    // One step: the named first call, so the reference computes no free choice (a random model's
    // free choice may write arguments that fill any context); `required` below makes a free one
    // on the server, with room for the longest arguments the budget allows.
    let (steps, answer_tokens) = (1, 6);
    let first = "list_allowed_directories";

    // The reference: the library's loop in this process, then a greedy answer after the results.
    fresh_workspace();
    let reference = {
        let engine = agentflux::Engine::load_on(common::ctx(), &model).unwrap();
        let server = McpClient::spawn(&format!("{} {}", bin.display(), root.display()), ServerOptions::default()).unwrap();
        let servers = ToolServers::new(vec![server]).unwrap();
        let caller = ToolCaller::new(engine.tokenizer.clone(), engine.template.clone()).unwrap();
        let mut session = Session::new(&engine.model, 4096).unwrap();
        let mut messages = vec![ChatMessage::new("user", task)];
        let mut events = Vec::new();
        let opts = AgentOptions::new(steps, 0, &engine.tokenizer);
        servers
            .act(&caller, &mut session, &AdapterSet::default(), &mut messages, &ToolChoice::Function(first.into()), &opts, |e| {
                events.push(step_of(&json!(e)));
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
        let prompt = caller.answer_prompt(&servers.catalog, &messages).unwrap();
        let g = session.generate(&prompt, None, &GenerateOptions::greedy(answer_tokens, &engine.tokenizer), |_| {}).unwrap();
        (events, engine.tokenizer.decode(&g.tokens, true).unwrap())
    };
    eprintln!("steps {:?}, answer {:?}", reference.0, reference.1);
    let listed = reference.0.iter().find(|s| s[0] == "result").unwrap_or_else(|| panic!("no result: {:?}", reference.0));
    assert!(listed[3].as_str().unwrap().contains(root.file_name().unwrap().to_str().unwrap()), "{listed}");

    fresh_workspace();
    let config = std::env::temp_dir().join(format!("agentflux-serve-mcp-{}.json", std::process::id()));
    std::fs::write(&config, json!({"mcpServers": {"files": {"command": bin, "args": [root]}}}).to_string()).unwrap();
    let steps_arg = steps.to_string();
    let args = ["--model", model.to_str().unwrap(), "--ctx", "4096", "--max-steps", &steps_arg, "--mcp-config", config.to_str().unwrap()];
    let (mut child, addr) = serve_command(&args);
    let named = json!({"type": "function", "function": {"name": first}});
    let request = json!({"messages": user(task), "max_tokens": answer_tokens, "tool_choice": named});
    let whole = post(addr, &request);
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let stream = post(addr, &streamed);
    // The OpenAI Python SDK passes the steps through (its objects' extra fields).
    let sdk = openai_sdk().map(|python| {
        let done = std::process::Command::new(python)
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/openai_agent_client.py"))
            .args([addr.port().to_string(), request.to_string()])
            .output()
            .unwrap();
        assert!(done.status.success(), "the SDK client failed: {}", String::from_utf8_lossy(&done.stderr));
        serde_json::from_slice::<Value>(&done.stdout).unwrap()
    });
    let none = post(addr, &json!({"messages": user(task), "max_tokens": 3, "tool_choice": "none"}));
    let required = post(addr, &json!({"messages": user(task), "max_tokens": 3, "tool_choice": "required"}));
    child.kill().ok();
    child.wait().ok();
    std::fs::remove_file(&model).ok();
    std::fs::remove_file(&config).ok();
    std::fs::remove_dir_all(&root).ok();

    assert_eq!(whole.status, 200, "{}", whole.body);
    let v = whole.json();
    let got: Vec<Value> = v["agentflux"]["steps"].as_array().unwrap_or_else(|| panic!("no steps: {v}")).iter().map(step_of).collect();
    assert_eq!(got, reference.0);
    assert_eq!(v["choices"][0]["message"]["content"], json!(reference.1), "{v}");
    assert!(v["choices"][0]["message"].get("tool_calls").is_none(), "{v}");
    assert!(matches!(v["choices"][0]["finish_reason"].as_str(), Some("stop" | "length")), "{v}");

    // Streamed: the same steps, each in a chunk of its own before the text, then the same text.
    assert_eq!(stream.status, 200, "{}", stream.body);
    let chunks: Vec<Value> = stream.events().iter().filter(|e| *e != "[DONE]").map(|e| serde_json::from_str(e).unwrap()).collect();
    let streamed_steps: Vec<Value> = chunks.iter().filter_map(|c| c["agentflux"].get("step")).map(step_of).collect();
    assert_eq!(streamed_steps, reference.0);
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, reference.1);
    let last_step = chunks.iter().rposition(|c| c["agentflux"].get("step").is_some()).unwrap();
    assert!(chunks[..last_step].iter().all(|c| c["choices"][0]["delta"].get("content").is_none()), "text before the last step");

    if let Some(sdk) = sdk {
        for way in ["whole", "streamed"] {
            let steps: Vec<Value> = sdk[way]["steps"].as_array().unwrap().iter().map(step_of).collect();
            assert_eq!((steps, sdk[way]["content"].clone()), (reference.0.clone(), json!(reference.1)), "the SDK, {way}");
        }
    }

    // "none": no tools, no steps; "required": a tool is called first.
    assert_eq!(none.status, 200, "{}", none.body);
    assert!(none.json().get("agentflux").is_none(), "{}", none.body);
    assert_eq!(required.status, 200, "{}", required.body);
    let first = &required.json()["agentflux"]["steps"][0];
    assert!(first["event"] == "call" && first["call"]["name"] != "finish", "{first}");
}

/// A set's answer adapter writes the text after `call: finish` for the tools it was trained on,
/// from the choice cue on, as `ToolCaller::answer_activation` places it; for other tools the
/// answer is the base weights'. Reference: greedy decoding in this process on the same model.
#[test]
fn the_answer_adapter_writes_answers_for_its_own_tools() {
    use agentflux::decode::GenerateOptions;
    use agentflux::lora::{ActiveAdapter, Proj};
    use agentflux::serve::{Backend, Server};
    use agentflux::session::Session;
    use agentflux::text::ChatMessage;
    use agentflux::toolcall::{AdapterSet, Catalog, ToolCaller};
    let Some(f) = default_model() else { return };
    let model = tiny_with_tokenizer(&f, rng("serve-answer").next_u64(), "serve-answer");
    let (question, max_tokens) = ("Weather in Oslo?", 6);
    let other_tools = json!([{"type": "function", "function": {"name": "get_stock", "description": "A stock's price.",
        "parameters": {"type": "object", "properties": {"symbol": {"type": "string"}}, "required": ["symbol"]}}}]);
    let load = || agentflux::Engine::load_on(common::ctx(), &model).unwrap();
    let reference_engine = load();
    // The same random adapter in the reference's engine and the server's.
    let lora = agentflux::reference::random_adapter(&mut rng("serve-answer-lora"), &reference_engine.model.config, 8, &Proj::ALL, 0.3);
    let with_adapter = |engine: &agentflux::Engine| ActiveAdapter::new(engine.model.add_adapter("answer", &lora).unwrap());
    let reference = {
        let engine = &reference_engine;
        let answer = with_adapter(engine);
        let caller = ToolCaller::new(engine.tokenizer.clone(), engine.template.clone()).unwrap();
        let messages = [ChatMessage::new("user", question)];
        let greedy = |tools: &Value, adapter: Option<ActiveAdapter>| {
            let catalog = Catalog::from_openai_tools("request", tools).unwrap();
            let prompt = caller.answer_prompt(&catalog, &messages).unwrap();
            let plan = caller.answer_activation(&catalog, &messages, adapter).unwrap();
            let mut session = Session::new(&engine.model, 1024).unwrap();
            let g = session.generate(&prompt, plan, &GenerateOptions::greedy(max_tokens, &engine.tokenizer), |_| {}).unwrap();
            engine.tokenizer.decode(&g.tokens, true).unwrap()
        };
        let adapted = greedy(&weather_tools(), Some(answer));
        assert_ne!(adapted, greedy(&weather_tools(), None), "the adapter must change the answer for the test to tell");
        (adapted, greedy(&other_tools, None))
    };
    drop(reference_engine);
    let engine = load();
    let answer = with_adapter(&engine);
    let adapters = AdapterSet { answer: Some(answer), selector_tools: vec!["get_weather".into(), "get_time".into()], ..Default::default() };
    let server = Server::start(
        Backend { engine, adapters, servers: None },
        ServeOptions { addr: "127.0.0.1:0".parse().unwrap(), n_ctx: 1024, ..Default::default() },
    )
    .unwrap();
    let ask = |tools: &Value| {
        post(server.addr(), &json!({"messages": user(question), "tools": tools, "tool_choice": "none", "max_tokens": max_tokens}))
    };
    let (own, other) = (ask(&weather_tools()).json(), ask(&other_tools).json());
    server.shutdown();
    std::fs::remove_file(&model).ok();
    assert_eq!(own["choices"][0]["message"]["content"], json!(reference.0), "{own}");
    assert_eq!(other["choices"][0]["message"]["content"], json!(reference.1), "{other}");
}
