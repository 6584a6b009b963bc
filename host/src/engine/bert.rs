//! all-MiniLM-L6-v2 (any sentence-transformers BERT): tokenization, truncation and the
//! fused encoder ([`Encoder`]: mean pooling and L2 normalisation included) — what
//! sentence-transformers computes.

use std::path::Path;
use std::sync::Arc;

use candle_transformers::models::bert::Config;
use tokenizers::Tokenizer;

use super::encoder::Encoder;
use super::kernels::dense::{Precision, PrecisionSetting};
use super::kernels::pool::Pool;

use super::chunks::{BertWords, PIECE_BYTES, pieces};

use super::{
    EmbedInput, Embedder, Embedding, EngineError, ModelLoadError, Vocabulary, read_model_file,
};

/// sentence-transformers' default when `sentence_bert_config.json` says nothing.
const DEFAULT_MAX_SEQ_LENGTH: usize = 256;

/// The linear layers' arithmetic unless configured otherwise: bf16 (within cosine 0.99998
/// of sentence-transformers on the reference inputs, tested ≥ 0.9999) where this CPU runs
/// it measurably faster than f32, else f32 ([`fastest`](super::kernels::dense::fastest)).
pub const DEFAULT_PRECISION: PrecisionSetting = PrecisionSetting::Auto;

/// A sentence-transformers BERT model with mean pooling.
pub struct MiniLm {
    model: Encoder,
    /// Without truncation, padding or special tokens: it is given pieces of a text.
    tokenizer: Arc<Tokenizer>,
    /// What the post-processor puts around a text (`[CLS]`, `[SEP]`).
    first: u32,
    last: u32,
    /// Tokens per text, special tokens included (sentence-transformers' `max_seq_length`).
    max_len: usize,
    dimensions: usize,
}

impl MiniLm {
    /// Load from a sentence-transformers model directory (`config.json`,
    /// `model.safetensors`, `tokenizer.json`, optional `sentence_bert_config.json`).
    pub fn load(id: &str, dir: &Path) -> Result<Self, ModelLoadError> {
        Self::load_with(id, dir, DEFAULT_PRECISION)
    }

    /// [`Self::load`] with the linear layers in `precision` (a [`Precision`], or `auto`).
    pub fn load_with(
        id: &str,
        dir: &Path,
        precision: impl Into<PrecisionSetting>,
    ) -> Result<Self, ModelLoadError> {
        let precision = precision
            .into()
            .resolve(super::kernels::Isa::active(), Pool::global());
        let invalid = |file: &str, reason: String| ModelLoadError::Invalid {
            model: id.into(),
            file: file.into(),
            reason,
        };
        let config: Config = serde_json::from_slice(&read_model_file(id, dir, "config.json")?)
            .map_err(|e| invalid("config.json", e.to_string()))?;
        let max_len = match read_model_file(id, dir, "sentence_bert_config.json") {
            Ok(bytes) => serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("max_seq_length")?.as_u64())
                .map_or(DEFAULT_MAX_SEQ_LENGTH, |n| n as usize),
            Err(ModelLoadError::NotFound { .. }) => DEFAULT_MAX_SEQ_LENGTH,
            Err(e) => return Err(e),
        };
        let mut tokenizer = Tokenizer::from_bytes(read_model_file(id, dir, "tokenizer.json")?)
            .map_err(|e| invalid("tokenizer.json", e.to_string()))?;
        tokenizer
            .with_truncation(None)
            .map_err(|e| invalid("tokenizer.json", e.to_string()))?;
        tokenizer.with_padding(None);
        // The post-processor's frame, from an empty text: `[CLS] [SEP]`.
        let frame = tokenizer
            .encode("", true)
            .map_err(|e| invalid("tokenizer.json", e.to_string()))?;
        let [first, last] = frame.get_ids() else {
            return Err(invalid(
                "tokenizer.json",
                "the post-processor must frame a text with exactly two tokens".into(),
            ));
        };
        let (first, last) = (*first, *last);
        if max_len < 3 {
            return Err(invalid(
                "sentence_bert_config.json",
                "max_seq_length is too small".into(),
            ));
        }
        let weights = read_model_file(id, dir, "model.safetensors")?;
        let model = Encoder::load(&config, &weights, precision)
            .map_err(|e| invalid("model.safetensors", e))?;
        if max_len > model.max_positions() {
            return Err(invalid(
                "sentence_bert_config.json",
                format!(
                    "max_seq_length {max_len} is past the model's {} positions",
                    model.max_positions()
                ),
            ));
        }
        Ok(Self {
            model,
            tokenizer: Arc::new(tokenizer),
            first,
            last,
            max_len,
            dimensions: config.hidden_size,
        })
    }

    /// The ids the model sees for `text`: framed, and truncated to `max_len` as
    /// sentence-transformers does. The text is tokenized in pieces cut between words
    /// ([`chunks`](super::chunks)) and only until the window is full, so a 2 MiB input costs
    /// the memory of one piece and the time of the first 256 tokens, not of all of it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.encode_in_pieces_of(text, PIECE_BYTES)
    }

    /// [`Self::encode`] with pieces of `piece_bytes` (tests cut small pieces).
    #[doc(hidden)]
    pub fn encode_in_pieces_of(
        &self,
        text: &str,
        piece_bytes: usize,
    ) -> Result<Vec<u32>, EngineError> {
        let room = self.max_len - 2;
        let mut ids = Vec::with_capacity(self.max_len.min(text.len() + 2));
        ids.push(self.first);
        for piece in pieces(text, piece_bytes, &BertWords) {
            let encoding = self
                .tokenizer
                .encode_fast(piece, false)
                .map_err(|e| EngineError::Model(format!("tokenizer: {e}")))?;
            let take = (room + 1 - ids.len()).min(encoding.get_ids().len());
            ids.extend_from_slice(&encoding.get_ids()[..take]);
            if ids.len() == room + 1 {
                break;
            }
        }
        ids.push(self.last);
        Ok(ids)
    }

    /// [`Self::encode`] the way sentence-transformers does it: the whole text at once,
    /// truncated by the tokenizer. The reference the pieces are tested against.
    #[doc(hidden)]
    pub fn encode_in_one_pass(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        let mut tokenizer = (*self.tokenizer).clone();
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: self.max_len,
                ..Default::default()
            }))
            .map_err(|e| EngineError::Model(format!("tokenizer: {e}")))?;
        let encoding = tokenizer
            .encode(text, true)
            .map_err(|e| EngineError::Model(format!("tokenizer: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The linear layers' arithmetic.
    pub fn precision(&self) -> Precision {
        self.model.precision()
    }

    /// The encoder itself, for tests that run it on ids with a chosen instruction set.
    #[doc(hidden)]
    pub fn encoder_mut(&mut self) -> &mut Encoder {
        &mut self.model
    }

    /// The ids the model sees for token ids sent by a client: framed, and truncated as a
    /// text's would be.
    pub fn frame(&self, ids: &[u32]) -> Vec<u32> {
        let room = self.max_len - 2;
        let mut framed = Vec::with_capacity(ids.len().min(room) + 2);
        framed.push(self.first);
        framed.extend_from_slice(&ids[..ids.len().min(room)]);
        framed.push(self.last);
        framed
    }

    fn forward(&mut self, inputs: &[&EmbedInput]) -> Result<Vec<Embedding>, EngineError> {
        let encodings = inputs
            .iter()
            .map(|input| match input {
                EmbedInput::Text(t) => self.encode(t),
                EmbedInput::Tokens(ids) => Ok(self.frame(ids)),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let seqs: Vec<&[u32]> = encodings.iter().map(Vec::as_slice).collect();
        let vectors = self.model.forward(&seqs).map_err(EngineError::Model)?;
        Ok(vectors
            .into_iter()
            .zip(&encodings)
            .map(|(vector, ids)| Embedding {
                vector,
                tokens: ids.len(),
            })
            .collect())
    }
}

/// The tokenizer's vocabulary, shared with the HTTP layer.
struct WordPieces {
    tokenizer: Arc<Tokenizer>,
    size: usize,
}

impl Vocabulary for WordPieces {
    fn size(&self) -> usize {
        self.size
    }

    fn decode(&self, ids: &[u32]) -> Result<String, EngineError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| EngineError::Model(format!("tokenizer: {e}")))
    }
}

impl Embedder for MiniLm {
    fn embed(&mut self, inputs: &[&EmbedInput]) -> Result<Vec<Embedding>, EngineError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        self.forward(inputs)
    }

    fn dimensions(&self) -> usize {
        self.dimensions
    }

    fn vocabulary(&self) -> Option<Arc<dyn Vocabulary>> {
        Some(Arc::new(WordPieces {
            tokenizer: self.tokenizer.clone(),
            size: self.model.vocab(),
        }))
    }
}
