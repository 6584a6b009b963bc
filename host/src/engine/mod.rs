//! The models, each behind a small trait, each on dedicated OS threads.
//!
//! HTTP handlers never run a model: they send a job into a bounded queue and await the
//! reply on a oneshot channel. A full queue is refused at once ([`EngineError::QueueFull`]),
//! which the API answers with 429 and `Retry-After`.

mod bert;
mod chunks;
pub mod decoder;
pub mod encoder;
mod generate;
mod gguf_tokenizer;
pub mod kernels;
pub mod llama;
pub mod q4_1;
mod template;
mod text;
mod text_state;
mod worker;

use std::path::Path;
use std::sync::Arc;

pub use bert::{DEFAULT_PRECISION, MiniLm};
pub use generate::{
    FinishReason, Forward, GenerateConfig, GenerateEvent, GenerateHandle, GenerateRequest,
    GenerateStats, PREFILL_CHUNK, SamplingParams,
};
pub use gguf_tokenizer::{Encoded, GgufTokenizer, TokenizerError};
pub use template::{ChatTemplate, TemplateMessage};
pub use text::{PromptError, PromptInput, TextModel};
pub use text_state::{Piece, TextState};
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
    /// The request waited longer than the queue timeout before the engine could take it.
    #[error("the request waited too long for the engine")]
    QueueTimeout,
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

/// One input of an embeddings request: a text, or the model's own token ids (without the
/// special tokens that frame a sequence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbedInput {
    /// Text, tokenized by the model.
    Text(String),
    /// Token ids of the model's vocabulary.
    Tokens(Vec<u32>),
}

/// A text embedding model.
pub trait Embedder: Send + 'static {
    /// Embed a batch of inputs. The result has one entry per input, in order.
    fn embed(&mut self, inputs: &[&EmbedInput]) -> Result<Vec<Embedding>, EngineError>;
    /// Vector dimensions.
    fn dimensions(&self) -> usize;
    /// The model's vocabulary, for token-id inputs; `None` if it takes text only.
    fn vocabulary(&self) -> Option<Arc<dyn Vocabulary>> {
        None
    }
}

/// A model's token ids, known outside its engine thread: how many there are, and the text
/// they stand for (what the sanitizer checks when a client sends ids).
pub trait Vocabulary: Send + Sync + 'static {
    /// Ids are `0..size()`.
    fn size(&self) -> usize;
    /// The text of `ids`, special tokens left out.
    fn decode(&self, ids: &[u32]) -> Result<String, EngineError>;
}

/// Hears about a model's queue: the metrics registry implements it. The engine facade
/// knows nothing of Prometheus.
pub trait QueueObserver: Send + Sync + std::fmt::Debug + 'static {
    /// A request entered (`+1`) or left (`-1`) the queue of `model`.
    fn depth(&self, model: &str, delta: i64);
    /// A request waited `wait` before the engine took it.
    fn waited(&self, model: &str, wait: std::time::Duration);
}

/// A queue observer that hears nothing.
#[derive(Debug, Default)]
pub struct Unobserved;

impl QueueObserver for Unobserved {
    fn depth(&self, _: &str, _: i64) {}
    fn waited(&self, _: &str, _: std::time::Duration) {}
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
