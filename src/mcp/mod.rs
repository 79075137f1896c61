//! Model Context Protocol: tool servers the agent calls.
//!
//! [`McpClient`] speaks MCP (JSON-RPC 2.0) to a server it spawns, over stdio (one message per
//! line), or to one at a URL, over Streamable HTTP (a POST per message; JSON or server-sent-event
//! answers; the session id and protocol revision sent back): `initialize` with protocol-revision
//! negotiation, `notifications/initialized`, `tools/list` with pagination, `tools/call`;
//! per-request deadlines; a server that crashes, hangs, writes garbage or closes its stdout is
//! reported with the tail of its stderr and reaped.

mod client;
mod config;
mod http;
mod process;
mod stdio;

pub use client::{shell_words, McpClient, ServerCommand, ServerOptions, PROTOCOL_VERSIONS};
pub use config::{read_mcp_config, ServerEntry};
pub use http::HttpEndpoint;

use serde_json::Value;

/// A tool as a server describes it.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct Tool {
    /// Unique name within its server.
    pub name: String,
    /// What it does, for the model.
    #[serde(default)]
    pub description: String,
    /// JSON Schema of its arguments.
    #[serde(rename = "inputSchema", default = "empty_object_schema")]
    pub input_schema: Value,
}

fn empty_object_schema() -> Value {
    serde_json::json!({"type": "object", "properties": {}})
}

/// One piece of a tool's output.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Content {
    /// Text.
    Text {
        /// The text.
        text: String,
    },
    /// An image (base64), kept only as its MIME type for the model.
    Image {
        /// Its MIME type (`image/png`).
        #[serde(rename = "mimeType", default)]
        mime_type: String,
    },
    /// Anything else (audio, resources, links), kept raw.
    #[serde(other)]
    Other,
}

/// What a tool call returned.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct ToolResult {
    /// Its output.
    #[serde(default)]
    pub content: Vec<Content>,
    /// The tool itself reports failure (the message is in `content`).
    #[serde(rename = "isError", default)]
    pub is_error: bool,
}

impl ToolResult {
    /// The text a model reads: text parts joined by newlines, other parts as placeholders.
    pub fn text(&self) -> String {
        self.content
            .iter()
            .map(|c| match c {
                Content::Text { text } => text.clone(),
                Content::Image { mime_type } => format!("[image {mime_type}]"),
                Content::Other => "[non-text content]".to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Why talking to a tool server failed.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's message names its fields
pub enum McpError {
    /// A configuration file (`mcpServers`) that cannot be used.
    #[error("MCP configuration {file}: {msg}")]
    Config { file: String, msg: String },
    /// The command could not be started.
    #[error("MCP server `{command}` could not be started: {msg}")]
    Spawn { command: String, msg: String },
    /// No answer before the deadline; the server was stopped.
    #[error("MCP server `{server}` did not answer {method} within {secs:.0} s (stopped it){}", stderr_note(stderr))]
    Timeout { server: String, method: String, secs: f64, stderr: String },
    /// The server exited or closed its stdout.
    #[error("MCP server `{server}` closed the connection during {method} (exit: {status}){}", stderr_note(stderr))]
    Closed { server: String, method: String, status: String, stderr: String },
    /// A line on stdout that is not JSON; the server was stopped.
    #[error("MCP server `{server}` wrote a line that is not JSON-RPC: {line:?} (stopped it){}", stderr_note(stderr))]
    Garbage { server: String, line: String, stderr: String },
    /// JSON, but not what the protocol says.
    #[error("MCP server `{server}`: {msg}")]
    Protocol { server: String, msg: String },
    /// An HTTP server refused a message or could not be reached.
    #[error("MCP server `{server}` over HTTP, {method}: {msg}")]
    Http { server: String, method: String, msg: String },
    /// The server answered with a JSON-RPC error.
    #[error("MCP server `{server}` refused {method}: {message} (code {code})")]
    Rpc { server: String, method: String, code: i64, message: String },
}

fn stderr_note(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!("; its stderr ends with:\n{stderr}")
    }
}
