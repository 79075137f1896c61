//! The engine a program embeds: one GPU context, a model, its tokenizer and chat template.

use crate::decode::{GenerateOptions, Generation};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::gpu::{GpuContext, GpuOptions};
use crate::model::Model;
use crate::session::Session;
use crate::text::{ChatMessage, ChatTemplate, Tokenizer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File name of the default model (SmolLM2-135M-Instruct, Q4_1) in the model cache.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// File name of the second architecture's model (Gemma-3-270M, Q4_K_M).
pub const GEMMA3_MODEL_FILE: &str = "gemma-3-270m-q4_k_m.gguf";

/// The model cache: `$AGENTFLUX_CACHE/models`, by default `~/.cache/agentflux/models`.
pub fn model_cache_dir() -> PathBuf {
    let base = std::env::var_os("AGENTFLUX_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        home.join(".cache").join("agentflux")
    });
    base.join("models")
}

/// A model argument as a path: `default` (or `smollm2`) and `gemma3` name cached models, anything
/// else is a file path. A cached model that is missing is an error that says how to fetch it.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let (file, fetch) = match spec {
        "default" | "smollm2" => (DEFAULT_MODEL_FILE, "tools/fetch-model"),
        "gemma3" => (GEMMA3_MODEL_FILE, "tools/fetch-model gemma3"),
        path => return Ok(PathBuf::from(path)),
    };
    let p = model_cache_dir().join(file);
    if p.is_file() {
        Ok(p)
    } else {
        Err(Error::InvalidOption(format!("model '{spec}' is not in the cache ({}); fetch it with `{fetch}`", p.display())))
    }
}

/// A loaded model with everything needed to turn text into tokens and back.
pub struct Engine {
    /// The GPU.
    pub ctx: Arc<GpuContext>,
    /// The GGUF file (memory-mapped).
    pub file: GgufFile,
    /// The model on the GPU.
    pub model: Model,
    /// Its tokenizer (shared with the constraint engine).
    pub tokenizer: Arc<Tokenizer>,
    /// Its chat template, if the file has one.
    pub template: Option<ChatTemplate>,
}

impl Engine {
    /// Open a GGUF file on a device chosen by `gpu`.
    pub fn load(path: impl AsRef<Path>, gpu: &GpuOptions) -> Result<Self> {
        let ctx = Arc::new(GpuContext::new(gpu)?);
        Self::load_on(ctx, path)
    }

    /// Open a GGUF file on an existing device.
    pub fn load_on(ctx: Arc<GpuContext>, path: impl AsRef<Path>) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let model = Model::load(ctx.clone(), &file)?;
        let tokenizer = Tokenizer::from_gguf(&file)?;
        let template = ChatTemplate::from_gguf(&file, &tokenizer)?;
        Ok(Self { ctx, file, model, tokenizer: Arc::new(tokenizer), template })
    }
}

/// A finished completion: its text and the generation behind it (tokens, timings).
#[derive(Debug, Clone)]
pub struct Completion {
    /// The new text (stop tokens left out).
    pub text: String,
    /// The new tokens and their timings.
    pub generation: Generation,
}

impl Engine {
    /// Continue `prompt` (raw text, special tokens parsed) with `opts`, from an empty cache of
    /// the prompt's length plus `opts.max_tokens`.
    pub fn generate(&self, prompt: &str, opts: &GenerateOptions) -> Result<Completion> {
        let tokens = self.tokenizer.encode(prompt, true)?;
        self.generate_tokens(&tokens, opts)
    }

    /// Answer a conversation: `messages` rendered with the model's chat template (their
    /// contents as plain text: see [`ChatTemplate::tokens`]), then generated.
    pub fn chat(&self, messages: &[ChatMessage], opts: &GenerateOptions) -> Result<Completion> {
        let template = self.template.as_ref().ok_or_else(|| Error::Template("this model has no chat template".into()))?;
        let tokens = template.tokens(&self.tokenizer, messages, true)?;
        self.generate_tokens(&tokens, opts)
    }

    fn generate_tokens(&self, prompt: &[u32], opts: &GenerateOptions) -> Result<Completion> {
        if prompt.is_empty() {
            return Err(Error::InvalidOption("the prompt encodes to no tokens".into()));
        }
        let n_ctx = (prompt.len() + opts.max_tokens).min(self.model.config.n_ctx_train);
        let mut session = Session::new(&self.model, n_ctx)?;
        let generation = session.generate(prompt, None, opts, |_| {})?;
        let kept: Vec<u32> = generation.tokens.iter().copied().filter(|t| !self.tokenizer.is_stop(*t)).collect();
        Ok(Completion { text: self.tokenizer.decode(&kept, true)?, generation })
    }
}
