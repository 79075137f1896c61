//! `mcpServers` configuration files, as Claude Desktop, Cursor and VS Code write them:
//! `{"mcpServers": {"name": {"command": "npx", "args": [...], "env": {...}}}}` (VS Code: `servers`).

use super::{McpError, ServerCommand};
use serde_json::Value;

/// The stdio servers a configuration file lists, by name, in the file's order. Entries marked
/// `"disabled": true` are left out; a remote server (`url`) or a malformed entry is an error
/// naming it.
pub fn read_mcp_config(file: &str, text: &str) -> Result<Vec<(String, ServerCommand)>, McpError> {
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
        if e.contains_key("url") {
            return Err(at("remote servers (url) are not supported; only servers started as a command (stdio)"));
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
        let env = match e.get("env") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())).ok_or_else(|| at(&format!("env.{k} must be a string"))))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(at("\"env\" must be an object of strings")),
        };
        out.push((name.clone(), ServerCommand { program: program.to_string(), args, env }));
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
        assert_eq!(servers[0].1.to_string(), r#"npx -y @modelcontextprotocol/server-filesystem "/tmp/a b""#);
        assert_eq!(servers[1].1.env, [("MEMORY_FILE_PATH".to_string(), "/tmp/m.json".to_string())]);
        let vs_code = read_mcp_config("mcp.json", r#"{"servers": {"fs": {"type": "stdio", "command": "fs-server"}}}"#).unwrap();
        assert_eq!(vs_code[0].1.program, "fs-server");
    }

    #[test]
    fn malformed_entries_name_the_file_and_server() {
        for (text, needle) in [
            ("{", "not JSON"),
            ("{}", "no \"mcpServers\""),
            (r#"{"mcpServers": {"r": {"url": "https://x"}}}"#, "mcpServers.r: remote servers"),
            (r#"{"mcpServers": {"c": {"args": []}}}"#, "mcpServers.c: \"command\""),
            (r#"{"mcpServers": {"a": {"command": "x", "args": [1]}}}"#, "mcpServers.a: \"args\" must hold strings"),
            (r#"{"mcpServers": {"e": {"command": "x", "env": {"K": 1}}}}"#, "mcpServers.e: env.K"),
        ] {
            let e = read_mcp_config("cfg.json", text).unwrap_err().to_string();
            assert!(e.contains("cfg.json") && e.contains(needle), "{e} should mention {needle}");
        }
    }
}
