//! AgentFlux as a generation backend: load a GGUF model on the GPU and answer a chat message.
//!
//! ```text
//! tools/fetch-model    # once: the default model into the cache
//! cargo run --release --no-default-features --example generate -- "Name three planets."
//! ```
use agentflux::decode::GenerateOptions;
use agentflux::gpu::GpuOptions;
use agentflux::text::ChatMessage;
use agentflux::{resolve_model, Engine};

fn main() -> agentflux::Result<()> {
    let prompt = std::env::args().nth(1).unwrap_or_else(|| "Name three planets.".into());
    let engine = Engine::load(resolve_model("default")?, &GpuOptions::default())?;
    let opts = GenerateOptions::greedy(64, &engine.tokenizer);
    let out = engine.chat(&[ChatMessage::new("user", &prompt)], &opts)?;
    println!("{}", out.text.trim());
    let g = &out.generation;
    eprintln!(
        "[{} prompt tokens at {:.1} tok/s, {} new at {:.1} tok/s on {}]",
        g.prompt_len,
        g.prefill_tok_s(),
        g.tokens.len(),
        g.decode_tok_s(),
        engine.ctx.describe()
    );
    Ok(())
}
