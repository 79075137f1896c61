//! # AgentFlux
//!
//! Small local language models calling tools accurately on the user's own GPU.
//!
//! AgentFlux is a GPU-kernel-first inference engine over [wgpu] with hand-written WGSL kernels
//! (`shaders/`). It reads GGUF models ([`gguf`]), builds their tokenizer and chat template from the
//! file's metadata ([`text`]), and runs the transformer on the GPU ([`model`]) with quantized
//! weights decoded in registers. Tool calling is *decoupled*: one LoRA adapter selects the tool and
//! a per-tool adapter writes its arguments, sharing one KV cache of the conversation.
//!
//! Layers, bottom up:
//! - [`gpu`]: device selection, limits, buffers (tensors split across binding limits), pipelines,
//!   and a recorder that batches a whole forward pass into one submission;
//! - [`kernels`]: one launcher per WGSL kernel file;
//! - [`model`]: architectures from GGUF metadata, the KV cache, and the forward pass;
//! - [`lora`]: LoRA adapters in PEFT format, validated against the base model, and the GPU
//!   registry that packs every resident adapter for the fused multi-LoRA kernels;
//! - [`mcp`]: Model Context Protocol client over stdio (tool servers);
//! - [`session`]: one conversation's KV cache, reused across adapters (activated LoRA), forked
//!   and truncated, with counters of prefilled, reused and decoded tokens;
//! - [`toolcall`]: the tool catalog, scored (hierarchical) tool selection, schema-constrained
//!   arguments, the agent loop and the monolithic baselines;
//! - [`serve`]: an OpenAI-compatible HTTP server over the tool-calling pipeline;
//! - [`train`]: training data for the decoupled adapters (validation, split, loss masks);
//! - [`reference`]: a plain-Rust f32 implementation of every kernel and of the forward pass,
//!   which the tests compare the GPU against.

pub mod decode;
pub mod engine;
pub mod error;
pub mod eval;
pub mod gguf;
pub mod gpu;
pub mod hparams;
pub mod kernels;
pub mod kv;
pub mod lora;
pub mod mcp;
pub mod model;
pub mod reference;
pub mod serve;
pub mod session;
pub mod text;
pub mod toolcall;
pub mod train;

pub use engine::{resolve_model, Engine};
pub use error::{Error, Result};
