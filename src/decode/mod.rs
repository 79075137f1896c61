//! Turning logits into tokens: samplers and the generation loop.

mod generate;
mod sampler;

pub(crate) use generate::step;
pub use generate::{generate, generate_adapted, generate_with, GenerateOptions, Generation};
pub use sampler::{draw, Sampler, SamplerConfig, SplitMix64};
