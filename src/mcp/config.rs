//! `mcpServers` configuration files, as Claude Desktop, Cursor and VS Code write them:
//! `{"mcpServers": {"name": {"command": "npx", "args": [...], "env": {...}}}}` for a server started
//! as a command, `{"name": {"url": "https://…/mcp", "headers": {...}}}` for one over Streamable
//! HTTP (VS Code: `servers`, with `"type"`).

use super::{HttpEndpoint, McpError, ServerCommand};
use serde_json::Value;

/// A server a configuration file lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEntry {
    /// Started as a command, spoken to over stdio.
    Command(ServerCommand),
    /// Reached at a URL over Streamable HTTP.
    Http(HttpEndpoint),
}

/// The servers a configuration file lists, by name, in the file's order. Entries marked
/// `"disabled": true` are left out; a malformed entry, or one for the older HTTP+SSE transport,
/// is an error naming it.
pub fn read_mcp_config(file: &str, text: &str) -> Result<Vec<(String, ServerEntry)>, McpError> {
    let bad = |msg: String| McpError::Config { file: file.to_string(), msg };
    let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let servers = ["mcpServers", "servers"]
        .iter()
        .find_map(|k| v.get(*k))
        .and_then(Value::as_object)
        .ok_or_else(|| bad("no \"mcpServers\" object".into()))?;
    let mut out = Vec::new();
    for (name, entry) in servers {
        let at = |msg: &str| bad(format!("mcpServers.{name}: {msg}"));
        let e = entry.as_object().ok_or_else(|| at("must be an object"))?;
        if e.get("disabled").and_then(Value::as_bool) == Some(true) {
            continue;
        }
        let strings_of = |key: &str| -> Result<Vec<(String, String)>, McpError> {
            match e.get(key) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Object(m)) => m
                    .iter()
                    .map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())).ok_or_else(|| at(&format!("{key}.{k} must be a string"))))
                    .collect(),
                Some(_) => Err(at(&format!("\"{key}\" must be an object of strings"))),
            }
        };
        match e.get("type").and_then(Value::as_str) {
            Some("sse") => return Err(at("the older HTTP+SSE transport is not supported; give the server's Streamable HTTP endpoint")),
            Some("http" | "streamable-http" | "streamableHttp") | None if e.contains_key("url") => {
                let url = e.get("url").and_then(Value::as_str).filter(|u| u.starts_with("http://") || u.starts_with("https://"));
                let url = url.ok_or_else(|| at("\"url\" must be an http:// or https:// URL"))?;
                out.push((name.clone(), ServerEntry::Http(HttpEndpoint { url: url.to_string(), headers: strings_of("headers")? })));
                continue;
            }
            _ => {}
        }
        let program = e
            .get("command")
            .and_then(Value::as_str)
            .filter(|c| !c.is_empty())
            .ok_or_else(|| at("\"command\" must be a non-empty string"))?;
        let strings = |key: &str| -> Result<Vec<String>, McpError> {
            match e.get(key) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(a)) => {
                    a.iter().map(|w| w.as_str().map(str::to_string).ok_or_else(|| at(&format!("\"{key}\" must hold strings")))).collect()
                }
                Some(_) => Err(at(&format!("\"{key}\" must be an array of strings"))),
            }
        };
        let args = strings("args")?;
        let env = strings_of("env")?;
        out.push((name.clone(), ServerEntry::Command(ServerCommand { program: program.to_string(), args, env })));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claude_desktop_and_vs_code_files() {
        let text = r#"{"mcpServers": {
            "filesystem": {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-filesystem", "/tmp/a b"]},
            "memory": {"command": "mcp-server-memory", "env": {"MEMORY_FILE_PATH": "/tmp/m.json"}},
            "off": {"command": "x", "disabled": true}}}"#;
        let servers = read_mcp_config("claude.json", text).unwrap();
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[0].0, "filesystem");
        let command = |e: &ServerEntry| match e {
            ServerEntry::Command(c) => c.clone(),
            ServerEntry::Http(h) => panic!("{h:?} is not a command"),
        };
        assert_eq!(command(&servers[0].1).to_string(), r#"npx -y @modelcontextprotocol/server-filesystem "/tmp/a b""#);
        assert_eq!(command(&servers[1].1).env, [("MEMORY_FILE_PATH".to_string(), "/tmp/m.json".to_string())]);
        let vs_code = read_mcp_config(
            "mcp.json",
            r#"{"servers": {"fs": {"type": "stdio", "command": "fs-server"},
                "remote": {"type": "http", "url": "https://example.org/mcp", "headers": {"Authorization": "Bearer k"}}}}"#,
        )
        .unwrap();
        assert_eq!(command(&vs_code[0].1).program, "fs-server");
        let remote = HttpEndpoint { url: "https://example.org/mcp".into(), headers: vec![("Authorization".into(), "Bearer k".into())] };
        assert_eq!(vs_code[1].1, ServerEntry::Http(remote));
    }

    #[test]
    fn malformed_entries_name_the_file_and_server() {
        for (text, needle) in [
            ("{", "not JSON"),
            ("{}", "no \"mcpServers\""),
            (r#"{"mcpServers": {"r": {"url": "https://x", "type": "sse"}}}"#, "mcpServers.r: the older HTTP+SSE transport"),
            (r#"{"mcpServers": {"u": {"url": "ftp://x"}}}"#, "mcpServers.u: \"url\" must be an http"),
            (r#"{"mcpServers": {"h": {"url": "http://x", "headers": {"A": 1}}}}"#, "mcpServers.h: headers.A"),
            (r#"{"mcpServers": {"c": {"args": []}}}"#, "mcpServers.c: \"command\""),
            (r#"{"mcpServers": {"a": {"command": "x", "args": [1]}}}"#, "mcpServers.a: \"args\" must hold strings"),
            (r#"{"mcpServers": {"e": {"command": "x", "env": {"K": 1}}}}"#, "mcpServers.e: env.K"),
        ] {
            let e = read_mcp_config("cfg.json", text).unwrap_err().to_string();
            assert!(e.contains("cfg.json") && e.contains(needle), "{e} should mention {needle}");
        }
    }
}
