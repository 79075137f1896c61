//! One tool call over a real MCP server, as a downstream crate makes it: the filesystem server
//! started from its npm package, the committed adapter set choosing among the server's real tool
//! names (with a probability) and writing arguments valid for the tool's schema.
//!
//! ```text
//! tools/setup    # once: the default model, the MCP servers, a Vulkan driver
//! cargo run --release --no-default-features --example tool_call -- /tmp "What files are in /tmp?"
//! ```
use agentflux::Agent;

fn main() -> agentflux::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| "/tmp".into());
    let request = args.next().unwrap_or_else(|| format!("What files are in {dir}?"));
    let agent = Agent::builder()
        .model("default")
        .adapters("adapters/filesystem")
        .mcp(format!("tools/mcp/node_modules/.bin/mcp-server-filesystem {dir}"))
        .build()?;
    let call = agent.call(&request)?;
    println!("{} {}", call.name, call.arguments);
    eprintln!("(p = {:.2}, {} tools to choose from)", call.confidence.unwrap_or(f64::NAN), agent.catalog().names().len());
    Ok(())
}
