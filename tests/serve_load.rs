//! `agentflux serve` under load, measured on the whole process: stalled connections hold no
//! thread, and fifty clients (some leaving) leave resident memory where it was. A binary of its
//! own, its tests one at a time, so that no other test's server shares the measured process.

mod common;

use agentflux::serve::ServeOptions;
use common::rng;
use common::serve::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Mutex, MutexGuard};

/// Held by each test for its whole run: the measures are of the process, so nothing else runs.
fn alone() -> MutexGuard<'static, ()> {
    static ALONE: Mutex<()> = Mutex::new(());
    ALONE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Threads of this process (Linux), to see that waiting connections hold none.
fn threads() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|n| n.trim().parse().ok())
}

/// Connections that send part of a request and stall cost no thread and no answer time: normal
/// requests are answered meanwhile, and the stalled ones get 408 at their deadline and are
/// closed. `AGENTFLUX_STALLED=1000` runs it with a thousand.
#[test]
fn stalled_connections_hold_no_thread_and_time_out() {
    let _alone = alone();
    let n: usize = std::env::var("AGENTFLUX_STALLED").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let opts = ServeOptions {
        n_ctx: 1024,
        parallel: 1,
        max_connections: n + 16,
        request_timeout: std::time::Duration::from_secs(3),
        ..Default::default()
    };
    let Some(server) = start("serve-stalled", opts) else { return };
    let addr = server.addr();
    let hi = json!({"messages": user("Hi"), "max_tokens": 4});
    assert_eq!(post(addr, &hi).status, 200, "warm-up");
    let t0 = std::time::Instant::now();
    assert_eq!(post(addr, &hi).status, 200);
    let usual = t0.elapsed();
    let threads_before = threads();
    let stalled: Vec<TcpStream> = (0..n)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(format!("POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Le").as_bytes()).unwrap();
            s
        })
        .collect();
    let opened = std::time::Instant::now();
    let t1 = std::time::Instant::now();
    assert_eq!(post(addr, &hi).status, 200);
    let during = t1.elapsed();
    eprintln!("{n} stalled connections: a request took {during:?} (alone {usual:?})");
    assert!(during < usual * 3 + std::time::Duration::from_secs(1), "{during:?} with {n} stalled connections, {usual:?} alone");
    if let (Some(a), Some(b)) = (threads_before, threads()) {
        assert!(b < a + 8, "{n} stalled connections took threads: {a} before, {b} with them");
    }
    for mut s in stalled {
        s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        assert!(reply.starts_with("HTTP/1.1 408"), "{reply:?}");
    }
    assert!(opened.elapsed() >= std::time::Duration::from_secs(2), "closed before the deadline");
    assert_eq!(post(addr, &hi).status, 200);
    server.shutdown();
}

/// Resident memory of this process in MiB (Linux).
fn resident_mib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb >> 10)
}

/// Fifty clients at once, every fifth leaving at a random moment: the others get the answers
/// they get one by one, nothing panics, and memory comes back near where it was.
#[test]
fn fifty_clients_some_leaving() {
    let _alone = alone();
    let Some(server) = start("serve-fifty", ServeOptions { n_ctx: 1024, max_queue: 64, ..Default::default() }) else { return };
    let addr = server.addr();
    let mut r = rng("serve-fifty-leaving");
    let requests: Vec<Value> = (0..50)
        .map(|i| {
            let text = format!("Client {i} asks about {}.", ["Paris", "Oslo", "Lima"][i % 3]);
            let mut v = match i % 3 {
                0 => json!({"messages": user(&text), "tools": weather_tools(), "max_tokens": 8}),
                1 => json!({"messages": user(&text), "tools": weather_tools(), "tool_choice": "required"}),
                _ => json!({"messages": user(&text), "max_tokens": 8}),
            };
            if i % 2 == 1 {
                v["stream"] = json!(true);
            }
            v
        })
        .collect();
    let leaves = |i: usize| i % 5 == 4;
    let sequential: Vec<Option<Value>> = requests
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let mut whole = v.clone();
            whole.as_object_mut().unwrap().remove("stream");
            (!leaves(i)).then(|| post(addr, &whole).json())
        })
        .collect();
    let before = resident_mib();
    let handles: Vec<_> = requests
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, v)| {
            let wait = std::time::Duration::from_millis(r.next_u64() % 300);
            std::thread::spawn(move || {
                if !leaves(i) {
                    return Some(post(addr, &v));
                }
                let body = v.to_string();
                let mut s = TcpStream::connect(addr).unwrap();
                let head = format!(
                    "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(format!("{head}{body}").as_bytes());
                std::thread::sleep(wait);
                None
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let Some(reply) = h.join().unwrap() else { continue };
        assert_eq!(reply.status, 200, "client {i}: {}", reply.body);
        let want = sequential[i].as_ref().unwrap();
        if requests[i]["stream"] == json!(true) {
            assert_eq!(assembled(&reply), message_of(want), "client {i}, streamed");
        } else {
            assert_same_answer(&reply.json(), want, &format!("client {i}"));
        }
    }
    assert_eq!(post(addr, &json!({"messages": user("Hi"), "max_tokens": 2})).status, 200);
    if let (Some(a), Some(b)) = (before, resident_mib()) {
        eprintln!("resident memory: {a} MiB before the fifty clients, {b} MiB after");
        assert!(b < a + 256, "resident memory grew from {a} to {b} MiB");
    }
    server.shutdown();
}
