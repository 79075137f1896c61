//! A plain-Rust f32 reference of every kernel and of the whole forward pass.
//!
//! Written for clarity, not speed, straight from the definitions (no GPU, no shared code with the
//! kernels beyond the GGUF block dequantizer); the tests compare the GPU against it. The random
//! generators here build fresh test inputs and tiny random models.

mod ops;
mod random;
mod transformer;

pub use ops::{argmax, attention, glu, matmul, rms_norm, rope};
pub use random::{random_adapter, random_matrix_bytes, random_vec, tiny_model, TinyModelSpec};
pub use transformer::{ReferenceAdapter, ReferenceModel};
