//! An MCP client: negotiate with a server, list and call its tools, over a [`Transport`] — the
//! server as a child process on stdio ([`super::stdio`]) or an endpoint of Streamable HTTP
//! ([`super::http`]). Every request has a deadline. Dropping the client ends the session (a
//! child is killed with what it started, and reaped).

use super::http::{HttpEndpoint, HttpTransport};
use super::stdio::StdioTransport;
use super::{McpError, Tool, ToolResult};
use serde_json::{json, Value};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Protocol revisions this client speaks, newest first.
pub const PROTOCOL_VERSIONS: [&str; 3] = ["2025-06-18", "2025-03-26", "2024-11-05"];

/// What came from the server.
pub(super) enum Incoming {
    Message(Value),
    Garbage(String),
    Closed,
}

impl Incoming {
    /// A JSON-RPC message, or garbage.
    pub(super) fn parse(text: &str) -> Self {
        match serde_json::from_str::<Value>(text) {
            Ok(v) => Self::Message(v),
            Err(_) => Self::Garbage(text.to_string()),
        }
    }
}

/// Why a message did not go.
pub(super) enum SendError {
    /// The connection is gone (stdio: the pipe closed).
    Closed(String),
    /// The server refused it or could not be reached (HTTP: a status that is not 2xx, a session
    /// that expired, a connection refused).
    Refused(String),
}

/// How messages reach a server; what it sends back arrives on the receiver the transport was
/// made with.
pub(super) trait Transport: Send {
    /// Send one message.
    fn send(&mut self, msg: &Value) -> Result<(), SendError>;
    /// What the server printed last (stdio: the tail of its stderr), for error messages.
    fn diagnostics(&self) -> String {
        String::new()
    }
    /// How the server ended, if it has.
    fn ended(&mut self) -> Option<String> {
        None
    }
    /// End the session (stop the server), saying how it ended.
    fn end(&mut self) -> String;
    /// The server's process id, where it is a child process.
    fn pid(&self) -> Option<u32> {
        None
    }
    /// The protocol revision `initialize` agreed on (HTTP sends it with every later request).
    fn negotiated(&mut self, _version: &str) {}
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
    /// The name a configuration file gives it, before the one it gives itself.
    label: Option<String>,
    transport: Box<dyn Transport>,
    /// Whether the session was ended (it is, once).
    ended: bool,
    incoming: Receiver<Incoming>,
    next_id: u64,
    opts: ServerOptions,
    /// The server's name and version from `initialize`.
    pub server_info: Value,
    /// The protocol revision agreed on.
    pub protocol_version: String,
    /// The server's usage instructions, if it gave any.
    pub instructions: Option<String>,
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
        let (transport, incoming) = StdioTransport::start(server)?;
        Self::initialize(server.to_string(), Box::new(transport), incoming, opts)
    }

    /// Connect to a server over Streamable HTTP and complete the `initialize` handshake.
    pub fn connect(endpoint: &HttpEndpoint, opts: ServerOptions) -> Result<Self, McpError> {
        let (transport, incoming) = HttpTransport::new(endpoint, opts.request_timeout.max(opts.init_timeout))?;
        Self::initialize(endpoint.url.clone(), Box::new(transport), incoming, opts)
    }

    /// Start a server given as a command line, or connect to one given as an `http://` or
    /// `https://` URL (with these headers), as `--mcp` takes either.
    pub fn open(server: &str, headers: &[(String, String)], opts: ServerOptions) -> Result<Self, McpError> {
        if server.starts_with("http://") || server.starts_with("https://") {
            Self::connect(&HttpEndpoint { url: server.to_string(), headers: headers.to_vec() }, opts)
        } else {
            Self::spawn(server, opts)
        }
    }

    /// Start or reach a server a configuration file lists.
    pub fn open_entry(entry: &super::ServerEntry, opts: ServerOptions) -> Result<Self, McpError> {
        match entry {
            super::ServerEntry::Command(c) => Self::start(c, opts),
            super::ServerEntry::Http(h) => Self::connect(h, opts),
        }
    }

    fn initialize(
        command: String,
        transport: Box<dyn Transport>,
        incoming: Receiver<Incoming>,
        opts: ServerOptions,
    ) -> Result<Self, McpError> {
        let mut client = Self {
            command,
            label: None,
            transport,
            ended: false,
            incoming,
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
        client.transport.negotiated(&version);
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

    /// The server's name: the one a configuration file gave it ([`McpClient::named`]), else
    /// the one it gave itself at `initialize`, else its command.
    pub fn name(&self) -> String {
        self.label.clone().or_else(|| self.server_info["name"].as_str().map(str::to_string)).unwrap_or_else(|| self.command.clone())
    }

    /// Name the server as a configuration file does (hierarchical selection shows it).
    pub fn named(mut self, name: &str) -> Self {
        self.label = Some(name.to_string());
        self
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
        let method = msg["method"].as_str().unwrap_or("reply").to_string();
        self.transport.send(msg).map_err(|e| match e {
            SendError::Closed(e) => McpError::Closed {
                server: self.command.clone(),
                method,
                status: self.transport.ended().unwrap_or_else(|| format!("still running ({e})")),
                stderr: self.transport.diagnostics(),
            },
            SendError::Refused(msg) => McpError::Http { server: self.command.clone(), method, msg },
        })
    }

    fn stderr_tail(&self) -> String {
        self.transport.diagnostics()
    }

    fn protocol(&mut self, msg: String) -> McpError {
        self.fail(McpError::Protocol { server: self.command.clone(), msg })
    }

    /// A server that broke the protocol or missed a deadline is stopped: its state is unknown.
    fn fail(&mut self, e: McpError) -> McpError {
        self.stop();
        e
    }

    /// End the session, once; says how the server ended.
    fn stop(&mut self) -> String {
        if std::mem::replace(&mut self.ended, true) {
            return self.transport.ended().unwrap_or_else(|| "stopped".into());
        }
        self.transport.end()
    }

    /// The server's process id, where it runs as a child process (stdio).
    pub fn pid(&self) -> Option<u32> {
        self.transport.pid()
    }
}

impl Drop for McpClient {
    fn drop(&mut self) {
        self.stop();
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
    use super::shell_words;

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
