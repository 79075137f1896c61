//! GGUF reader (versions 2 and 3): metadata, tensor index, alignment, and the block formats.
//!
//! The file is memory-mapped; tensor bytes are borrowed straight from the map, so loading a model
//! costs about its file size in memory and never makes f32 copies of whole tensors. Every
//! malformed input (bad magic, truncation, unknown type, a tensor past the end of the file) is a
//! [`GgufError`] naming the file and, where there is one, the tensor or key.

mod blocks;
mod reader;
mod writer;

pub use blocks::{dequantize, BlockFormat, GgmlType};
pub use reader::{GgufFile, MetaValue, TensorInfo};
pub use writer::GgufWriter;

use std::path::PathBuf;

/// A GGUF file could not be read, or does not hold what the caller asked for.
#[derive(Debug, thiserror::Error)]
#[error("GGUF file {}: {kind}", path.display())]
pub struct GgufError {
    /// The file being read.
    pub path: PathBuf,
    /// What went wrong.
    pub kind: GgufErrorKind,
}

/// The reasons a GGUF file is rejected.
#[allow(missing_docs)] // each variant's message names its fields
#[derive(Debug, thiserror::Error)]
pub enum GgufErrorKind {
    #[error("cannot open or map the file: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad magic {found:02x?}: not a GGUF file (expected \"GGUF\")")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    UnsupportedVersion(u32),
    #[error("truncated while reading {what} at byte {offset} (file is {file_len} bytes)")]
    Truncated { what: String, offset: u64, file_len: u64 },
    #[error("{what} is malformed: {detail}")]
    Malformed { what: String, detail: String },
    #[error("tensor '{tensor}' has unknown ggml type id {type_id}")]
    UnknownType { tensor: String, type_id: u32 },
    #[error("tensor '{tensor}' has type {}, which this engine does not support (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, IQ4_XS, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)", ty.name())]
    UnsupportedType { tensor: String, ty: GgmlType },
    #[error("tensor '{tensor}' spans bytes {start}..{end} of the data section, past the end of the file ({file_len} bytes); the file is truncated or corrupt")]
    TensorOutOfBounds { tensor: String, start: u64, end: u64, file_len: u64 },
    #[error("tensor '{tensor}' has {dim0} columns, not a multiple of its block size {block}")]
    BadRowLength { tensor: String, dim0: u64, block: u64 },
    #[error("missing metadata key '{0}'")]
    MissingKey(String),
    #[error("metadata key '{key}' has type {found}, expected {expected}")]
    WrongType { key: String, expected: &'static str, found: &'static str },
    #[error("missing tensor '{0}'")]
    MissingTensor(String),
    #[error("tensor '{tensor}' has shape {found:?}, expected {expected:?}")]
    WrongShape { tensor: String, expected: Vec<u64>, found: Vec<u64> },
}
