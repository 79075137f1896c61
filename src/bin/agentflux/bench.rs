//! `agentflux bench`: prefill and decode throughput, measured the way llama-bench does
//! (pp: one batch of N prompt tokens into an empty cache; tg: N tokens decoded one at a time).

use agentflux::gpu::GpuOptions;
use agentflux::model::Logits;
use agentflux::{resolve_model, Engine};
use anyhow::Result;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// A GGUF path, or `default` / `gemma3` from the model cache.
    #[arg(long, default_value = "default")]
    model: String,
    /// Prompt tokens for the prefill test.
    #[arg(long, default_value_t = 512)]
    prefill: usize,
    /// Tokens for the decode test.
    #[arg(long, default_value_t = 128)]
    decode: usize,
    /// Repetitions (the best is reported).
    #[arg(long, default_value_t = 2)]
    reps: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args, gpu: &GpuOptions) -> Result<()> {
    let path = resolve_model(&a.model)?;
    let eng = Engine::load(&path, gpu)?;
    let m = &eng.model;
    let n_vocab = m.config.n_vocab as u64;
    // Deterministic, varied token ids (as llama-bench, the content does not change the cost).
    let tokens: Vec<u32> = (0..a.prefill.max(1) as u64).map(|i| ((i * 7919 + 13) % n_vocab) as u32).collect();
    let mut kv = m.new_cache((a.prefill + a.decode + 1).max(16))?;
    // Warm-up: pipelines compile on first use.
    m.forward_greedy(&tokens[..tokens.len().min(8)], &mut kv)?;
    let (mut pp, mut tg) = (0f64, 0f64);
    for _ in 0..a.reps.max(1) {
        kv.truncate(0);
        let t = Instant::now();
        // Reading the last logits back waits for the GPU to finish.
        m.forward(&tokens, &mut kv, Logits::Last)?;
        pp = pp.max(a.prefill as f64 / t.elapsed().as_secs_f64());
        kv.truncate(0);
        let mut next = tokens[0];
        let t = Instant::now();
        for _ in 0..a.decode {
            next = m.forward_greedy(&[next], &mut kv)?;
        }
        tg = tg.max(a.decode as f64 / t.elapsed().as_secs_f64());
    }
    if a.json {
        println!("{}", serde_json::json!({"model": path, "device": eng.ctx.describe(), "pp": a.prefill, "tg": a.decode, "prefill_tok_s": pp, "decode_tok_s": tg}));
    } else {
        println!("| engine | model | device | test | tok/s |");
        println!("|---|---|---|---|---:|");
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        println!("| agentflux | {name} | {} | pp{} | {pp:.1} |", eng.ctx.info.name, a.prefill);
        println!("| agentflux | {name} | {} | tg{} | {tg:.1} |", eng.ctx.info.name, a.decode);
    }
    Ok(())
}
