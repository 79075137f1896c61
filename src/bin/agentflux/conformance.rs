//! `agentflux mcp-conformance URL` (hidden): the client the MCP conformance suite drives
//! (`@modelcontextprotocol/conformance client --command "agentflux mcp-conformance"`, see
//! `tools/mcp-conformance`). The suite appends its server's URL and names the scenario in
//! `MCP_CONFORMANCE_SCENARIO`; this connects over Streamable HTTP, lists the tools and calls
//! the one the scenario checks.

use agentflux::mcp::{HttpEndpoint, McpClient, ServerOptions};
use anyhow::Result;
use serde_json::json;

#[derive(clap::Args)]
pub struct Args {
    /// The suite's server URL.
    url: String,
}

pub fn run(a: Args) -> Result<()> {
    let scenario = std::env::var("MCP_CONFORMANCE_SCENARIO").unwrap_or_default();
    let mut client = McpClient::connect(&HttpEndpoint { url: a.url, headers: Vec::new() }, ServerOptions::default())?;
    let tools = client.list_tools()?;
    println!("{scenario}: {} tools from {}", tools.len(), client.name());
    // The tool each scenario's server offers for it, with arguments its schema takes.
    let call = match scenario.as_str() {
        "tools_call" => Some(("add_numbers", json!({"a": 5, "b": 3}))),
        "sse-retry" => Some(("test_reconnection", json!({}))),
        _ => None,
    };
    if let Some((name, args)) = call.filter(|(name, _)| tools.iter().any(|t| t.name == *name)) {
        println!("{name}: {}", client.call_tool(name, &args)?.text());
    }
    Ok(())
}
