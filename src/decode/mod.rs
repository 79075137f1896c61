//! Turning logits into tokens: samplers and the generation loop.

mod generate;
mod sampler;

pub use generate::{generate, generate_adapted, GenerateOptions, Generation};
pub use sampler::{draw, Sampler, SamplerConfig, SplitMix64};
