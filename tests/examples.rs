//! The examples as a downstream crate's user runs them: `examples/tool_call.rs` makes a real tool
//! call over the filesystem MCP server with the committed adapter set.

mod common;

use agentflux::mcp::{McpClient, ServerOptions};
use serde_json::Value;
use std::path::PathBuf;

/// An example's binary, built beside the tests (`cargo test --all-targets` builds the examples).
fn example(name: &str) -> PathBuf {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    deps.parent().unwrap().join("examples").join(name)
}

#[test]
fn tool_call_example_calls_a_filesystem_tool() {
    let (Some(_), Some(server)) = (common::default_model(), common::filesystem_server()) else { return };
    let bin = example("tool_call");
    assert!(bin.is_file(), "{} is not built: run the tests with --all-targets", bin.display());
    let ws = tempfile_dir();
    std::fs::write(ws.join("notes.txt"), "buy milk\n").unwrap();
    let dir = ws.to_str().unwrap();
    let out = std::process::Command::new(&bin)
        .args([dir, &format!("What files are in {dir}?")])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("XDG_RUNTIME_DIR", std::env::var("XDG_RUNTIME_DIR").unwrap_or_else(|_| "/tmp".into()))
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    // One line: a tool of the filesystem server (or `finish`) and a JSON object of arguments.
    let (name, args) = stdout.trim().split_once(' ').unwrap_or_else(|| panic!("no call printed: {stdout}"));
    // The server's own list of its tools.
    let mut client = McpClient::spawn(&format!("{} {dir}", server.display()), ServerOptions::default()).unwrap();
    let tools: Vec<String> = client.list_tools().unwrap().into_iter().map(|t| t.name).collect();
    assert!(tools.iter().any(|t| t == name) || name == "finish", "{name} is not among {tools:?}");
    let args: Value = serde_json::from_str(args).unwrap_or_else(|e| panic!("arguments {args}: {e}"));
    assert!(args.is_object(), "{args}");
    assert!(stderr.contains("tools to choose from"), "{stderr}");
    std::fs::remove_dir_all(&ws).unwrap();
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("agentflux-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
