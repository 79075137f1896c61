//! `agentflux serve`: an OpenAI-compatible chat-completions server with tool calling.

use agentflux::gpu::GpuOptions;
use agentflux::serve::{Backend, ServeOptions, Server};
use agentflux::toolcall::{Strategy, ToolServers};
use anyhow::Result;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A GGUF path, or `default` / `gemma3` from the model cache.
    #[arg(long, default_value = "default")]
    model: String,
    /// An adapter-set directory: each tool's argument adapter applies when a request lists that
    /// tool; the selector when the request's tools are among those it was trained on.
    #[arg(long)]
    adapters: Option<PathBuf>,
    /// MCP servers the server calls itself: a request that brings no `tools` gets theirs, and is
    /// answered after the calls the model makes on them (each step under `agentflux`).
    #[command(flatten)]
    servers: super::call::McpArgs,
    /// Most calls of those servers' tools per request.
    #[arg(long, default_value_t = 6)]
    max_steps: usize,
    /// Address to listen on. Beyond loopback, give --api-key too (or put something in front
    /// that checks who connects).
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// A host name requests may name besides localhost, 127.0.0.1 and [::1] (repeatable): the
    /// server refuses other `Host` headers, so a web page cannot reach it through DNS rebinding.
    #[arg(long)]
    allow_host: Vec<String>,
    /// Port (0 picks a free one).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Context size per request.
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
    /// Requests answered at once, their rows batched into shared forward passes (each holds a
    /// KV cache of --ctx positions while it runs; allocated at start with the prefix cache's).
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Requests waiting for the GPU before new ones are refused with 503.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Text tokens when a request gives no max_tokens.
    #[arg(long, default_value_t = 1024)]
    max_tokens: usize,
    /// MiB of KV cache kept across requests (the prefix cache: a request continues the cached
    /// conversation that shares the longest beginning with it), allocated at start; at least
    /// one conversation, 0 turns it off.
    #[arg(long, default_value_t = 512)]
    cache_mib: usize,
    /// Require `Authorization: Bearer KEY` on every request but GET /health (for a server bound
    /// beyond loopback); also read from AGENTFLUX_API_KEY.
    #[arg(long)]
    api_key: Option<String>,
    /// Connections open at once; beyond them a new one gets 503.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Seconds a connection has to send a whole request before it gets 408 and is closed.
    #[arg(long, default_value_t = 30)]
    request_timeout: u64,
}

pub fn run(a: Args, gpu: &GpuOptions) -> Result<()> {
    let servers = if a.servers.any() { Some(ToolServers::new(a.servers.start()?)?) } else { None };
    let super::call::Loaded { eng, adapters, .. } =
        super::call::load(&a.model, a.adapters.as_deref(), &Default::default(), Strategy::Shared, gpu)?;
    let device = eng.ctx.describe();
    let opts = ServeOptions {
        addr: SocketAddr::new(a.host, a.port),
        allowed_hosts: a.allow_host,
        n_ctx: a.ctx,
        parallel: a.parallel,
        max_queue: a.max_queue,
        default_max_tokens: a.max_tokens,
        cache_bytes: (a.cache_mib as u64) << 20,
        api_key: a.api_key.or_else(|| std::env::var("AGENTFLUX_API_KEY").ok()).filter(|k| !k.is_empty()),
        max_connections: a.max_connections,
        request_timeout: std::time::Duration::from_secs(a.request_timeout.max(1)),
        max_steps: a.max_steps,
        ..Default::default()
    };
    let tools =
        servers.as_ref().map(|s| format!(", {} tools of {} MCP server(s) for requests without tools", s.catalog.names().len(), s.len()));
    let server = Server::start(Backend { engine: eng, adapters, servers }, opts)?;
    // The address line is the one thing scripts wait for (port 0 makes it the only way to know).
    println!("listening on http://{}", server.addr());
    eprintln!("POST /v1/chat/completions, GET /v1/models — model on {device}{}", tools.unwrap_or_default());
    server.wait();
    Ok(())
}
