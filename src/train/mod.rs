//! Decoupled fine-tuning: the data, the optimizer, and (in the `reference` module, feature `reference`) the f32
//! gradient the GPU trainer is checked against.
//!
//! - [`data`]: trajectories in OpenAI chat JSONL, validated against the tools' schemas, with a
//!   report of what was dropped and why, and a seeded 80/10/10 split;
//! - [`examples`]: the decoupled examples — the selector trained only on the names it writes,
//!   each tool's argument adapter only on its arguments — laid out exactly as inference lays
//!   out its prompts, with the position where each adapter is activated;
//! - [`synth`]: conversations made offline from a tool set's seed file and the real results of
//!   its MCP server, in the format [`data`] reads;
//! - [`optim`]: AdamW with warmup and cosine decay;
//! - [`trainer`]: adapters trained on the GPU (`AdapterBuffers::add_gradients`: the frozen prefix
//!   forward only, forward and backward only where the adapter is active, a step's examples side
//!   by side in one pass); several at once in rounds, each round's steps of every adapter in the
//!   same passes (`add_gradients_each`).

pub mod data;
pub mod examples;
pub mod optim;
pub mod synth;
pub mod trainer;

pub use crate::kernels::optim::{AdamW, Moments};
pub use data::{read_trajectories, split, DataReport, DropKind, Dropped, Split, Trajectory};
pub use examples::{cap_finish_share, decoupled_examples, split_examples, AdapterRole, Example, SplitExamples, SplitPart};
pub use optim::Schedule;
pub use synth::{synthesize, Seed, SynthOptions, SynthReport};
pub use trainer::{has_checkpoint, init_adapter, train_adapter, train_adapter_with, train_together, AdapterRun, Progress, TrainOptions};
