//! The stdio transport: the server is a child process; one JSON-RPC message per line on its
//! stdin and stdout. A reader thread turns stdout lines into messages; another keeps the tail of
//! stderr for error messages.

use super::client::{Incoming, SendError, Transport};
use super::process::ServerProcess;
use super::{McpError, ServerCommand};
use serde_json::Value;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Bytes of the server's stderr kept for error messages.
const STDERR_TAIL: usize = 4096;

/// Longest line a server may write (a tool result included); a longer one is garbage.
const MAX_LINE_BYTES: usize = 16 << 20;

/// A server started as a command.
pub(super) struct StdioTransport {
    process: ServerProcess,
    stdin: ChildStdin,
    stderr: Arc<Mutex<VecDeque<u8>>>,
}

impl StdioTransport {
    /// Start `server`; its messages arrive on the receiver.
    pub fn start(server: &ServerCommand) -> Result<(Self, Receiver<Incoming>), McpError> {
        let command = server.to_string();
        let mut cmd = Command::new(&server.program);
        cmd.args(&server.args)
            .envs(server.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut process = ServerProcess::spawn(&mut cmd)
            .map_err(|e| McpError::Spawn { command: command.clone(), msg: spawn_failure(&server.program, &e) })?;
        let child = process.child();
        let (Some(stdin), Some(stdout), Some(mut stderr_pipe)) = (child.stdin.take(), child.stdout.take(), child.stderr.take()) else {
            return Err(McpError::Spawn { command, msg: "no stdio pipes".into() });
        };
        let (tx, incoming) = channel();
        std::thread::spawn(move || {
            let mut stdout = BufReader::new(stdout);
            while let Some(msg) = next_message(&mut stdout, MAX_LINE_BYTES) {
                let garbage = matches!(msg, Incoming::Garbage(_));
                if tx.send(msg).is_err() || garbage {
                    return;
                }
            }
            let _ = tx.send(Incoming::Closed);
        });
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let tail = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n) = stderr_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut t) = tail.lock() {
                    t.extend(&buf[..n]);
                    let excess = t.len().saturating_sub(STDERR_TAIL);
                    t.drain(..excess);
                }
            }
        });
        Ok((Self { process, stdin, stderr }, incoming))
    }
}

impl Transport for StdioTransport {
    fn send(&mut self, msg: &Value) -> Result<(), SendError> {
        let mut line = msg.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).and_then(|_| self.stdin.flush()).map_err(|e| SendError::Closed(e.to_string()))
    }

    fn diagnostics(&self) -> String {
        // Give the stderr thread a moment to collect what a dying server printed.
        std::thread::sleep(Duration::from_millis(50));
        let t = self.stderr.lock().map(|t| t.iter().copied().collect::<Vec<u8>>()).unwrap_or_default();
        String::from_utf8_lossy(&t).trim().to_string()
    }

    fn ended(&mut self) -> Option<String> {
        self.process.try_wait().map(|s| s.to_string())
    }

    /// Reap the server — after a short grace period for one that is exiting on its own, killing
    /// it otherwise.
    fn end(&mut self) -> String {
        let mut ended = None;
        for _ in 0..10 {
            if let Some(status) = self.process.try_wait() {
                ended = Some(status.to_string());
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // What it started goes with it, whether it ended on its own or not.
        self.process.stop();
        ended.unwrap_or_else(|| "still running; killed".into())
    }

    fn pid(&self) -> Option<u32> {
        Some(self.process.id())
    }
}

/// Why `program` did not start; a relative path that was not found names the directory it was
/// looked up from (commands in tool-set files are usually relative to the repository root).
fn spawn_failure(program: &str, e: &std::io::Error) -> String {
    let path = std::path::Path::new(program);
    match std::env::current_dir() {
        Ok(cwd) if e.kind() == std::io::ErrorKind::NotFound && path.is_relative() && path.components().count() > 1 => {
            format!("{e} (a relative path, looked up from the working directory {})", cwd.display())
        }
        _ => e.to_string(),
    }
}

/// The next message on a server's stdout: one JSON value per line, blank lines skipped. A line
/// is read up to `max` bytes, so a server that never ends one cannot fill memory; a longer line,
/// or one that is not UTF-8 or not JSON, is garbage. `None` at the end of the stream.
fn next_message(reader: &mut impl BufRead, max: usize) -> Option<Incoming> {
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.by_ref().take(max as u64 + 1).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        if line.len() > max {
            let start = String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned();
            return Some(Incoming::Garbage(format!("[a line of more than {max} bytes] {start}")));
        }
        let Ok(text) = std::str::from_utf8(&line) else {
            return Some(Incoming::Garbage(format!("[bytes that are not UTF-8] {}", String::from_utf8_lossy(&line))));
        };
        if text.trim().is_empty() {
            continue;
        }
        return Some(Incoming::parse(text));
    }
}

#[cfg(test)]
mod tests {
    use super::{next_message, Incoming};

    fn messages(bytes: &[u8], max: usize) -> Vec<Incoming> {
        let mut reader = std::io::Cursor::new(bytes);
        let mut out = Vec::new();
        while let Some(m) = next_message(&mut reader, max) {
            out.push(m);
        }
        out
    }

    #[test]
    fn lines_become_messages_or_garbage() {
        let kinds = |bytes: &[u8], max| {
            messages(bytes, max)
                .into_iter()
                .map(|m| match m {
                    Incoming::Message(v) => format!("message {v}"),
                    Incoming::Garbage(g) => format!("garbage {}", g.chars().take(40).collect::<String>()),
                    Incoming::Closed => "closed".into(),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(kinds(b"{\"id\":1}\n\n  \r\n{\"id\":2}", 100), ["message {\"id\":1}", "message {\"id\":2}"]);
        assert_eq!(kinds(b"not json\n", 100), ["garbage not json\n"]);
        assert_eq!(kinds(b"\"\xff\"\n", 100), ["garbage [bytes that are not UTF-8] \"\u{fffd}\"\n"]);
        assert!(kinds(&[b'x'; 50], 10)[0].starts_with("garbage [a line of more than 10 bytes] xxx"));
    }

    /// Mutated JSON-RPC lines and random bytes: every stream ends in messages, garbage or its
    /// end, never a panic, under a line bound the size of the inputs. `AGENTFLUX_FUZZ_ITERS`
    /// streams (CI: 20,000).
    #[test]
    fn mutated_server_output_is_read_or_refused() {
        let iters: usize = std::env::var("AGENTFLUX_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
        let valid = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":[{\"name\":\"echo\",\"inputSchema\":{\"type\":\"object\"}}]}}\n";
        let mut rng = crate::decode::SplitMix64(0x2545_f491_4f6c_dd1du64);
        let mut next = move || rng.next_u64();
        let (mut read, mut refused) = (0, 0);
        for i in 0..iters {
            let mut b = [&valid[..], &valid[..]].concat();
            match i % 3 {
                0 => {
                    for _ in 0..1 + next() % 6 {
                        let at = (next() % b.len() as u64) as usize;
                        b[at] ^= 1 << (next() % 8);
                    }
                }
                1 => b.truncate((next() % b.len() as u64) as usize),
                _ => b = (0..next() % 300).map(|_| next() as u8).collect(),
            }
            for m in messages(&b, 64 + (next() % 128) as usize) {
                match m {
                    Incoming::Message(_) => read += 1,
                    Incoming::Garbage(_) => refused += 1,
                    Incoming::Closed => {}
                }
            }
        }
        assert!(read > 0 && refused > 0, "{read} messages, {refused} garbage");
    }
}
