//! `agentflux generate`: text from a prompt, greedy by default.

use agentflux::decode::{GenerateOptions, SamplerConfig};
use agentflux::gpu::GpuOptions;
use agentflux::lora::ActiveAdapter;
use agentflux::session::Session;
use agentflux::text::{ChatMessage, TextStream};
use agentflux::{resolve_model, Engine};
use anyhow::{Context, Result};
use std::io::Write;

#[derive(clap::Args)]
pub struct Args {
    /// A GGUF path, or `default` (SmolLM2-135M-Instruct Q4_1) / `gemma3` from the model cache.
    #[arg(long, default_value = "default")]
    model: String,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Most new tokens.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy (argmax on the GPU).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep the k most likely tokens when sampling (0 = all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Context size (positions in the KV cache).
    #[arg(long, default_value_t = 2048)]
    ctx: usize,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
    /// A LoRA adapter directory in PEFT format. An activated adapter (alora_invocation_tokens in
    /// its config) applies from the last occurrence of its invocation tokens in the prompt; a
    /// standard one applies to every token.
    #[arg(long)]
    lora: Option<std::path::PathBuf>,
    /// Multiplier of the adapter's trained scale (0 = the base model).
    #[arg(long, default_value_t = 1.0, requires = "lora")]
    lora_scale: f32,
}

pub fn run(a: Args, gpu: &GpuOptions) -> Result<()> {
    let path = resolve_model(&a.model)?;
    let eng = Engine::load(&path, gpu).with_context(|| format!("loading {}", path.display()))?;
    let prompt = if a.chat {
        let t = eng.template.as_ref().context("this model has no chat template (drop --chat)")?;
        t.tokens(&eng.tokenizer, &[ChatMessage::new("user", &a.prompt)], true)?
    } else {
        eng.tokenizer.encode(&a.prompt, true)?
    };
    if prompt.is_empty() {
        anyhow::bail!("the prompt encodes to no tokens");
    }
    let n_ctx = a.ctx.min(eng.model.config.n_ctx_train);
    if prompt.len() + a.max_tokens > n_ctx {
        anyhow::bail!("prompt ({} tokens) + --max-tokens {} exceed the context of {n_ctx} (raise --ctx)", prompt.len(), a.max_tokens);
    }
    let mut session = Session::new(&eng.model, n_ctx)?;
    let plan = match &a.lora {
        Some(dir) => {
            let id = eng.model.load_adapter(dir)?;
            Some(session.activation(ActiveAdapter { id, scale: a.lora_scale }, &prompt)?)
        }
        None => None,
    };
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampler: SamplerConfig { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed },
        stop: if a.ignore_eos { Vec::new() } else { eng.tokenizer.stop.clone() },
        stop_on_repeat: false,
    };
    let mut stdout = std::io::stdout();
    let mut stream = TextStream::new(eng.tokenizer.clone());
    let g = session.generate(&prompt, plan, &opts, |t| {
        if a.json {
            return;
        }
        if let Ok(piece) = stream.push(t) {
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        }
    })?;
    let text = eng.tokenizer.decode(&g.tokens, true)?;
    if a.json {
        let out = serde_json::json!({
            "prompt_tokens": prompt,
            "tokens": g.tokens,
            "text": text,
            "prefill_tok_s": g.prefill_tok_s(),
            "decode_tok_s": g.decode_tok_s(),
            "adapter_from": plan.map(|p| p.from),
            "device": eng.ctx.describe(),
        });
        println!("{out}");
    } else {
        println!("{}", stream.finish()?);
        eprintln!(
            "[{} prompt tokens at {:.1} tok/s, {} new tokens at {:.1} tok/s on {}]",
            prompt.len(),
            g.prefill_tok_s(),
            g.tokens.len(),
            g.decode_tok_s(),
            eng.ctx.describe()
        );
    }
    Ok(())
}
