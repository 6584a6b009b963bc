//! The models, each behind a small trait, each on dedicated OS threads.
//!
//! HTTP handlers never run a model: they send a job into a bounded queue and await the
//! reply on a oneshot channel. A full queue is refused at once ([`EngineError::QueueFull`]),
//! which the API answers with 429 and `Retry-After`.

mod bert;
mod worker;

use std::path::Path;

pub use bert::MiniLm;
pub use worker::{EmbeddingsHandle, WorkerConfig};

/// One embedding and the number of tokens it was computed from.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    /// L2-normalised vector.
    pub vector: Vec<f32>,
    /// Tokens fed to the model (after truncation, special tokens included).
    pub tokens: usize,
}

/// Engine failures. Messages are for logs; clients get a generic message.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum EngineError {
    /// The queue is full: try again later.
    #[error("the engine queue is full")]
    QueueFull,
    /// The engine thread is gone.
    #[error("the engine is not running")]
    Stopped,
    /// The model failed on this input.
    #[error("model error: {0}")]
    Model(String),
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::Model(e.to_string())
    }
}

/// A text embedding model.
pub trait Embedder: Send + 'static {
    /// Embed a batch of texts. The result has one entry per text, in order.
    fn embed(&mut self, texts: &[&str]) -> Result<Vec<Embedding>, EngineError>;
    /// Number of tokens each text turns into (after truncation), in order.
    fn token_counts(&self, texts: &[&str]) -> Result<Vec<usize>, EngineError>;
    /// Vector dimensions.
    fn dimensions(&self) -> usize;
}

/// Why a model could not be loaded. Names files by file name only.
#[derive(Debug, thiserror::Error)]
pub enum ModelLoadError {
    /// A required file is missing.
    #[error("model `{model}`: file not found: {file}")]
    NotFound {
        /// Model id.
        model: String,
        /// File name.
        file: String,
    },
    /// A file exists but is unusable.
    #[error("model `{model}`: cannot load {file}: {reason}")]
    Invalid {
        /// Model id.
        model: String,
        /// File name.
        file: String,
        /// Why.
        reason: String,
    },
}

pub(crate) fn read_model_file(
    model: &str,
    dir: &Path,
    file: &str,
) -> Result<Vec<u8>, ModelLoadError> {
    std::fs::read(dir.join(file)).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ModelLoadError::NotFound {
            model: model.into(),
            file: file.into(),
        },
        _ => ModelLoadError::Invalid {
            model: model.into(),
            file: file.into(),
            reason: e.kind().to_string(),
        },
    })
}
