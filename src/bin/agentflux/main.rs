//! `agentflux`: the command-line front end of the engine.

mod bench;
mod call;
mod conformance;
mod data;
mod eval;
mod generate;
mod info;
mod progress;
mod run;
mod serve;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "agentflux", version, about = "Decoupled tool calling for small local models on your GPU")]
struct Cli {
    /// The device: a name substring or an index from `agentflux info --gpus` (default: $AGENTFLUX_GPU,
    /// else the first real GPU, else a CPU-backed one). `--adapter` is its former name.
    #[arg(long, global = true, value_name = "NAME|INDEX", alias = "adapter")]
    gpu: Option<String>,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt.
    Generate(generate::Args),
    /// Describe a model and the GPU.
    Info(info::Args),
    /// Measure prefill and decode speed.
    Bench(bench::Args),
    /// Choose a tool and write its arguments for one request; prints the call as JSON.
    Call(call::Args),
    /// Carry out a task with MCP tool servers: call tools, read their results, answer.
    Run(run::Args),
    /// Score tool calls on a dataset (expected call per conversation): selection, arguments,
    /// schema validity, confidence, latency; a markdown table and per-example JSON.
    Eval(eval::Args),
    /// Training data: make trajectories offline, validate them, count the decoupled examples, split.
    #[command(subcommand)]
    Data(data::Command),
    /// Train the decoupled adapter set (selector + one argument adapter per tool) on the GPU.
    Train(train::Args),
    /// Serve an OpenAI-compatible /v1/chat/completions (with tools) on the loopback interface.
    Serve(serve::Args),
    /// The client the MCP conformance suite drives (tools/mcp-conformance).
    #[command(hide = true)]
    McpConformance(conformance::Args),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("AGENTFLUX_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let gpu = agentflux::gpu::GpuOptions { gpu: cli.gpu, ..Default::default() };
    let r = match cli.cmd {
        Command::Generate(a) => generate::run(a, &gpu),
        Command::Info(a) => info::run(a, &gpu),
        Command::Bench(a) => bench::run(a, &gpu),
        Command::Call(a) => call::run(a, &gpu),
        Command::Run(a) => run::run(a, &gpu),
        Command::Serve(a) => serve::run(a, &gpu),
        Command::Eval(a) => eval::run(a, &gpu),
        Command::Data(c) => data::run(c),
        Command::Train(a) => train::run(a, &gpu),
        Command::McpConformance(a) => conformance::run(a),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
