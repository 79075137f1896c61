//! The crate's error type.

use crate::gguf::GgufError;
use std::path::PathBuf;

/// Everything the engine can refuse or fail at.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's message names its fields
pub enum Error {
    /// The GGUF file is malformed or lacks what the model needs.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// No usable GPU, or the GPU refused an operation.
    #[error("GPU: {0}")]
    Gpu(String),
    /// The model file is a valid GGUF but not a model this engine can run.
    #[error("model {}: {msg}", path.display())]
    Model { path: PathBuf, msg: String },
    /// A kernel was asked for a shape it does not support.
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },
    /// Building or running the tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Rendering the chat template failed.
    #[error("chat template: {0}")]
    Template(String),
    /// The tokens do not fit in the KV cache.
    #[error("context overflow: {needed} tokens needed but the context holds {n_ctx} (raise --ctx or shorten the prompt)")]
    ContextOverflow { needed: usize, n_ctx: usize },
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {n_vocab}")]
    BadToken { id: u32, n_vocab: usize },
    /// An adapter was refused (bad file, wrong shape, over a limit).
    #[error(transparent)]
    Adapter(#[from] crate::lora::LoraError),
    /// An adapter id that is not (or no longer) resident.
    #[error("{0} is not loaded (removed, or from another model)")]
    UnknownAdapter(crate::lora::AdapterId),
    /// The caller stopped the work (a client that left).
    #[error("cancelled")]
    Cancelled,
    /// An invalid option or request: the caller's input, refused before any work.
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// The engine failed at its own work (a lock poisoned by a panic elsewhere, a worker thread
    /// that could not start or stopped, the constraint engine refusing its own state): never the
    /// caller's input.
    #[error("engine: {0}")]
    Engine(String),
    /// The model's output could not be used (tool arguments that are not JSON within the token
    /// budget, a constraint that leaves no token).
    #[error("model output: {0}")]
    ModelOutput(String),
    /// A file was read but what it holds is wrong (a tool-set manifest, a data seed, a
    /// checkpoint).
    #[error("{}: {msg}", path.display())]
    BadFile { path: PathBuf, msg: String },
    /// The HTTP server could not start (address in use, no threads).
    #[error("server: {0}")]
    Serve(String),
    /// A file or directory could not be read or written. The I/O error is part of the message,
    /// not a `source`, so a report that walks the chain (anyhow's `{:#}`) says it once.
    #[error("{}: {error}", path.display())]
    Io { path: PathBuf, error: std::io::Error },
    /// A tool server failed (crashed, hung, answered out of protocol).
    #[error(transparent)]
    Mcp(#[from] crate::mcp::McpError),
}

impl Error {
    /// An I/O failure on `path`.
    pub fn io(path: &std::path::Path, error: std::io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), error }
    }

    /// A file at `path` whose contents are wrong.
    pub fn bad_file(path: &std::path::Path, msg: impl std::fmt::Display) -> Self {
        Error::BadFile { path: path.to_path_buf(), msg: msg.to_string() }
    }

    /// A lock poisoned by a panic in another thread.
    pub fn poisoned(what: &str) -> Self {
        Error::Engine(format!("{what} lock poisoned by a panic in another thread"))
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every message of an error and its sources, as a report walking the chain prints them.
    fn chain(e: &dyn std::error::Error) -> Vec<String> {
        std::iter::successors(Some(e), |e| e.source()).map(|e| e.to_string()).collect()
    }

    #[test]
    fn an_io_failure_names_its_path_and_its_cause_once() {
        let cause = std::io::Error::from(std::io::ErrorKind::NotFound);
        let err = Error::io(std::path::Path::new("/data/seed.json"), std::io::Error::from(std::io::ErrorKind::NotFound));
        let report = chain(&err).join(": ");
        assert_eq!(report, format!("/data/seed.json: {cause}"));
    }
}
