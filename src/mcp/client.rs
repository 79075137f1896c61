//! An MCP client over stdio: spawn a server, negotiate, list and call its tools.
//!
//! Framing is the stdio transport's: one JSON-RPC 2.0 message per line on the child's stdin and
//! stdout. A reader thread turns stdout lines into messages; another keeps the tail of stderr for
//! error messages. Every request has a deadline. Dropping the client kills the server and what it
//! started ([`ServerProcess`]) and reaps it.

use super::process::ServerProcess;
use super::{McpError, Tool, ToolResult};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Protocol revisions this client speaks, newest first.
pub const PROTOCOL_VERSIONS: [&str; 3] = ["2025-06-18", "2025-03-26", "2024-11-05"];

/// Bytes of the server's stderr kept for error messages.
const STDERR_TAIL: usize = 4096;

/// What the reader thread saw on stdout.
/// Longest line a server may write (a tool result included); a longer one is garbage.
const MAX_LINE_BYTES: usize = 16 << 20;

enum Incoming {
    Message(Value),
    Garbage(String),
    Closed,
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
        return Some(match serde_json::from_str::<Value>(text) {
            Ok(v) => Incoming::Message(v),
            Err(_) => Incoming::Garbage(text.to_string()),
        });
    }
}

/// A server's program, arguments and extra environment variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerCommand {
    /// The program (looked up on `PATH` when it has no slash).
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Variables added to the environment it inherits.
    pub env: Vec<(String, String)>,
}

impl std::fmt::Display for ServerCommand {
    /// The command line, each word quoted where it needs to be (what errors show).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let quote = |w: &str| {
            if w.is_empty() || w.contains(|c: char| c.is_whitespace() || "'\"\\".contains(c)) {
                format!("{w:?}")
            } else {
                w.to_string()
            }
        };
        let words: Vec<String> = std::iter::once(&self.program).chain(&self.args).map(|w| quote(w)).collect();
        write!(f, "{}", words.join(" "))
    }
}

/// How to start and talk to a server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Deadline of `initialize` (servers started through npx may install first).
    pub init_timeout: Duration,
    /// Deadline of every other request.
    pub request_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self { init_timeout: Duration::from_secs(60), request_timeout: Duration::from_secs(30) }
    }
}

/// A running MCP server and the session with it.
pub struct McpClient {
    command: String,
    process: ServerProcess,
    stdin: ChildStdin,
    incoming: Receiver<Incoming>,
    stderr: Arc<Mutex<VecDeque<u8>>>,
    next_id: u64,
    opts: ServerOptions,
    /// The server's name and version from `initialize`.
    pub server_info: Value,
    /// The protocol revision agreed on.
    pub protocol_version: String,
    /// The server's usage instructions, if it gave any.
    pub instructions: Option<String>,
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

impl McpClient {
    /// Start `command` (split like a shell would, without expansion: `npx -y server /tmp`) and
    /// complete the `initialize` handshake.
    pub fn spawn(command: &str, opts: ServerOptions) -> Result<Self, McpError> {
        let words = shell_words(command).ok_or_else(|| McpError::Spawn { command: command.into(), msg: "unbalanced quotes".into() })?;
        let (program, args) =
            words.split_first().ok_or_else(|| McpError::Spawn { command: command.into(), msg: "empty command".into() })?;
        Self::start(&ServerCommand { program: program.clone(), args: args.to_vec(), env: Vec::new() }, opts)
    }

    /// Start a server given as a program, its arguments and extra environment variables (an
    /// `mcpServers` entry: [`read_mcp_config`](super::read_mcp_config)) and complete the
    /// `initialize` handshake.
    pub fn start(server: &ServerCommand, opts: ServerOptions) -> Result<Self, McpError> {
        let command = server.to_string();
        let command = command.as_str();
        let program = &server.program;
        let mut cmd = Command::new(program);
        cmd.args(&server.args)
            .envs(server.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut process =
            ServerProcess::spawn(&mut cmd).map_err(|e| McpError::Spawn { command: command.into(), msg: spawn_failure(program, &e) })?;
        let child = process.child();
        let (Some(stdin), Some(stdout), Some(mut stderr_pipe)) = (child.stdin.take(), child.stdout.take(), child.stderr.take()) else {
            return Err(McpError::Spawn { command: command.into(), msg: "no stdio pipes".into() });
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
        let mut client = Self {
            command: command.into(),
            process,
            stdin,
            incoming,
            stderr,
            next_id: 1,
            opts,
            server_info: Value::Null,
            protocol_version: String::new(),
            instructions: None,
        };
        let params = json!({
            "protocolVersion": PROTOCOL_VERSIONS[0],
            "capabilities": {},
            "clientInfo": {"name": "agentflux", "version": env!("CARGO_PKG_VERSION")},
        });
        let init = client.request_within("initialize", params, client.opts.init_timeout)?;
        let version = init["protocolVersion"].as_str().unwrap_or_default().to_string();
        if !PROTOCOL_VERSIONS.contains(&version.as_str()) {
            return Err(
                client.protocol(format!("the server speaks protocol revision '{version}'; this client speaks {PROTOCOL_VERSIONS:?}"))
            );
        }
        client.protocol_version = version;
        client.server_info = init["serverInfo"].clone();
        client.instructions = init["instructions"].as_str().map(str::to_string);
        client.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))?;
        Ok(client)
    }

    /// The command that started the server.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// The server's name (from `initialize`), or its command.
    pub fn name(&self) -> String {
        self.server_info["name"].as_str().map_or_else(|| self.command.clone(), str::to_string)
    }

    /// Every tool, following `nextCursor` pages.
    pub fn list_tools(&mut self) -> Result<Vec<Tool>, McpError> {
        let mut tools = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let params = match &cursor {
                Some(c) => json!({"cursor": c}),
                None => json!({}),
            };
            let page = self.request("tools/list", params)?;
            let list = page["tools"].as_array().ok_or_else(|| self.protocol("tools/list result has no 'tools' array".into()))?;
            for t in list {
                tools.push(
                    serde_json::from_value::<Tool>(t.clone())
                        .map_err(|e| self.protocol(format!("tools/list: a tool entry is malformed ({e}): {t}")))?,
                );
            }
            match page["nextCursor"].as_str() {
                Some(c) if cursor.as_deref() != Some(c) => cursor = Some(c.to_string()),
                _ => return Ok(tools),
            }
        }
    }

    /// Call a tool. A tool that reports failure (`isError`) is a result, not an error: the model
    /// sees the message.
    pub fn call_tool(&mut self, name: &str, arguments: &Value) -> Result<ToolResult, McpError> {
        let r = self.request("tools/call", json!({"name": name, "arguments": arguments}))?;
        serde_json::from_value(r.clone()).map_err(|e| self.protocol(format!("tools/call result is malformed ({e}): {r}")))
    }

    /// Send a request and wait for its response within the request deadline.
    pub fn request(&mut self, method: &str, params: Value) -> Result<Value, McpError> {
        self.request_within(method, params, self.opts.request_timeout)
    }

    fn request_within(&mut self, method: &str, params: Value, timeout: Duration) -> Result<Value, McpError> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = match self.incoming.recv_timeout(left) {
                Ok(Incoming::Message(m)) => m,
                Ok(Incoming::Garbage(line)) => {
                    let line: String = line.chars().take(200).collect();
                    return Err(self.fail(McpError::Garbage { server: self.command.clone(), line, stderr: self.stderr_tail() }));
                }
                Ok(Incoming::Closed) | Err(RecvTimeoutError::Disconnected) => {
                    let status = self.stop();
                    return Err(McpError::Closed {
                        server: self.command.clone(),
                        method: method.into(),
                        status,
                        stderr: self.stderr_tail(),
                    });
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(self.fail(McpError::Timeout {
                        server: self.command.clone(),
                        method: method.into(),
                        secs: timeout.as_secs_f64(),
                        stderr: self.stderr_tail(),
                    }));
                }
            };
            if msg.get("method").is_some() {
                self.answer_server(&msg)?;
                continue;
            }
            if msg["id"].as_u64() != Some(id) {
                // A late answer to a request that already timed out.
                continue;
            }
            if let Some(e) = msg.get("error") {
                return Err(McpError::Rpc {
                    server: self.command.clone(),
                    method: method.into(),
                    code: e["code"].as_i64().unwrap_or(0),
                    message: e["message"].as_str().unwrap_or("").to_string(),
                });
            }
            return Ok(msg["result"].clone());
        }
    }

    /// Server-to-client traffic: notifications are dropped, `ping` is answered, anything else
    /// is refused as not implemented (this client declares no capabilities).
    fn answer_server(&mut self, msg: &Value) -> Result<(), McpError> {
        let Some(id) = msg.get("id") else { return Ok(()) };
        let reply = if msg["method"] == "ping" {
            json!({"jsonrpc": "2.0", "id": id, "result": {}})
        } else {
            json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": "method not supported by this client"}})
        };
        self.send(&reply)
    }

    fn send(&mut self, msg: &Value) -> Result<(), McpError> {
        let mut line = msg.to_string();
        line.push('\n');
        let written = self.stdin.write_all(line.as_bytes()).and_then(|_| self.stdin.flush());
        written.map_err(|e| {
            let status = self.process.try_wait().map_or_else(|| format!("still running ({e})"), |s| s.to_string());
            McpError::Closed {
                server: self.command.clone(),
                method: msg["method"].as_str().unwrap_or("reply").into(),
                status,
                stderr: self.stderr_tail(),
            }
        })
    }

    fn stderr_tail(&self) -> String {
        // Give the stderr thread a moment to collect what a dying server printed.
        std::thread::sleep(Duration::from_millis(50));
        let t = self.stderr.lock().map(|t| t.iter().copied().collect::<Vec<u8>>()).unwrap_or_default();
        String::from_utf8_lossy(&t).trim().to_string()
    }

    fn protocol(&mut self, msg: String) -> McpError {
        self.fail(McpError::Protocol { server: self.command.clone(), msg })
    }

    /// A server that broke the protocol or missed a deadline is stopped: its state is unknown.
    fn fail(&mut self, e: McpError) -> McpError {
        self.stop();
        e
    }

    /// Reap the server — after a short grace period for one that is exiting on its own, killing
    /// it otherwise; says how it ended.
    fn stop(&mut self) -> String {
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

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.process.id()
    }
}

/// Split a command line into words: whitespace separates, single and double quotes group,
/// backslash escapes outside single quotes. `None` on an unclosed quote.
pub fn shell_words(s: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('\''), c) => cur.push(c),
            (_, '\\') => {
                cur.push(chars.next()?);
                in_word = true;
            }
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return None;
    }
    if in_word {
        words.push(cur);
    }
    Some(words)
}

#[cfg(test)]
mod tests {
    use super::{next_message, shell_words, Incoming};

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

    #[test]
    fn shell_words_split_like_a_shell() {
        let w = |s: &str| shell_words(s).unwrap();
        assert_eq!(
            w("npx -y @modelcontextprotocol/server-filesystem /tmp/a"),
            ["npx", "-y", "@modelcontextprotocol/server-filesystem", "/tmp/a"]
        );
        assert_eq!(w(r#"python3 "my server.py" 'a b' c\ d"#), ["python3", "my server.py", "a b", "c d"]);
        assert_eq!(w(r#"x "" y"#), ["x", "", "y"]);
        assert!(w("   ").is_empty());
        assert_eq!(shell_words("a 'b"), None);
    }
}
