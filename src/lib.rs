//! # AgentFlux
//!
//! Small local language models calling tools accurately on the user's own GPU.
//!
//! AgentFlux is a GPU-kernel-first inference engine over [wgpu] with hand-written WGSL kernels
//! (`shaders/`). Tool calling is *decoupled*: one LoRA adapter selects the tool (among real names,
//! with a probability for each) and a per-tool adapter writes its arguments under the tool's JSON
//! schema. Adapters are *activated* LoRA: they apply only after their invocation point, so the
//! conversation's KV cache, computed once with the base weights, is shared by the selector and
//! every argument adapter, and rows of different adapters share one pass over the base weights
//! (the fused multi-LoRA product).
//!
//! ## Where to start
//! - [`Agent`]: a model, an adapter set and tool servers (MCP or OpenAI `tools`) →
//!   [`Agent::call`], [`Agent::run`], [`Agent::answer`].
//! - [`Engine`]: the model, tokenizer and chat template, for crates that use AgentFlux as a
//!   generation backend ([`Engine::generate`], [`Engine::chat`]).
//!
//! ## Layers, bottom up (each imports only from those below it; `tests/layers.rs` checks it)
//! - [`hparams`], [`gguf`], [`mcp`]: a model's hyperparameters, the GGUF reader and writer, the
//!   MCP client — leaves;
//! - [`error`]: the crate's error, by kind;
//! - [`gpu`]: device, buffers (tensors split across binding limits), pipelines, uniform blocks
//!   declared once, and a recorder that batches a whole forward pass into one submission;
//!   [`text`]: tokenizer, chat template, streaming;
//! - [`kernels`]: one launcher per WGSL kernel file;
//! - [`kv`], [`lora`]: the KV cache; LoRA adapters in PEFT format and the GPU registry that
//!   packs every resident adapter for the fused multi-LoRA kernels;
//! - [`model`]: architectures from GGUF metadata and the forward (and training) pass;
//! - [`decode`]: sampling and the generation loop; [`session`]: one conversation's KV cache,
//!   reused across adapters, forked and truncated;
//! - [`toolcall`]: the tool catalog, scored (hierarchical) selection, schema-constrained
//!   arguments, the agent loop;
//! - [`train`], [`eval`] (feature `train`): training data, the adapter trainer, evaluation;
//! - [`Agent`], [`serve`] (feature `serve`): the facade and the OpenAI-compatible HTTP server.
//!
//! ## Features
//! `cli` (default: the `agentflux` binary; implies `serve` and `train`), `serve`, `train`, and
//! `reference` (the plain-Rust f32 reference of every kernel and of the forward pass that the
//! tests compare the GPU against). `default-features = false` builds the engine and tool
//! calling alone.

#![warn(missing_docs)]

mod agent;
pub mod batch;
pub mod decode;
mod engine;
pub mod error;
#[cfg(feature = "train")]
pub mod eval;
pub mod gguf;
pub mod gpu;
pub mod hparams;
pub mod kernels;
pub mod kv;
pub mod lora;
pub mod mcp;
pub mod model;
#[cfg(any(test, feature = "reference"))]
pub mod reference;
#[cfg(feature = "serve")]
pub mod serve;
pub mod session;
pub mod text;
pub mod toolcall;
#[cfg(feature = "train")]
pub mod train;

pub use agent::{Agent, AgentBuilder, DEFAULT_CONTEXT};
pub use engine::{model_cache_dir, resolve_model, Completion, Engine, DEFAULT_MODEL_FILE, GEMMA3_MODEL_FILE};
pub use error::{Error, Result};
