//! A plain-Rust f32 reference of every kernel and of the whole forward (and LoRA backward) pass.
//!
//! Written for clarity, not speed, straight from the definitions (no GPU, no shared code with the
//! kernels beyond the GGUF block dequantizer); the tests compare the GPU against it. The random
//! generators here build fresh test inputs and tiny random models.

mod backward;
mod ops;
mod random;
mod transformer;

pub use backward::{attention_backward, cross_entropy, glu_backward, matmul_backward_w, matmul_backward_x, rms_norm_backward};
pub use ops::{argmax, attention, glu, matmul, quantize_q8, rms_norm, rope, rope_backward};
pub use random::{random_adapter, random_matrix_bytes, random_vec, tiny_model, TinyModelSpec};
pub use transformer::{ReferenceAdapter, ReferenceModel};
