//! all-MiniLM-L6-v2 (any sentence-transformers BERT): candle-transformers BERT, mean pooling
//! over the attention mask, L2 normalisation — what sentence-transformers computes.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::{Embedder, Embedding, EngineError, ModelLoadError, read_model_file};

/// sentence-transformers' default when `sentence_bert_config.json` says nothing.
const DEFAULT_MAX_SEQ_LENGTH: usize = 256;

/// A sentence-transformers BERT model with mean pooling.
pub struct MiniLm {
    model: BertModel,
    tokenizer: Tokenizer,
    dimensions: usize,
}

impl MiniLm {
    /// Load from a sentence-transformers model directory (`config.json`,
    /// `model.safetensors`, `tokenizer.json`, optional `sentence_bert_config.json`).
    pub fn load(id: &str, dir: &Path) -> Result<Self, ModelLoadError> {
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
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| invalid("tokenizer.json", e.to_string()))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        let weights = read_model_file(id, dir, "model.safetensors")?;
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &Device::Cpu)
            .map_err(|e| invalid("model.safetensors", e.to_string()))?;
        let model = BertModel::load(vb, &config)
            .map_err(|e| invalid("model.safetensors", e.to_string()))?;
        Ok(Self {
            model,
            tokenizer,
            dimensions: config.hidden_size,
        })
    }

    fn forward(&self, texts: &[&str]) -> Result<Vec<Embedding>, EngineError> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| EngineError::Model(format!("tokenizer: {e}")))?;
        let n = encodings.len();
        let len = encodings.first().map_or(0, |e| e.get_ids().len());
        let mut ids = Vec::with_capacity(n * len);
        let mut mask = Vec::with_capacity(n * len);
        let mut types = Vec::with_capacity(n * len);
        let mut tokens = Vec::with_capacity(n);
        for e in &encodings {
            ids.extend_from_slice(e.get_ids());
            mask.extend_from_slice(e.get_attention_mask());
            types.extend_from_slice(e.get_type_ids());
            tokens.push(e.get_attention_mask().iter().filter(|&&m| m == 1).count());
        }
        let dev = &self.model.device;
        let ids = Tensor::from_vec(ids, (n, len), dev)?;
        let types = Tensor::from_vec(types, (n, len), dev)?;
        let mask = Tensor::from_vec(mask, (n, len), dev)?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?;
        // Mean over the real tokens only.
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?.clamp(1e-9, f64::INFINITY)?;
        let mean = summed.broadcast_div(&counts)?;
        let norms = mean
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(1e-12, f64::INFINITY)?;
        let normalised = mean.broadcast_div(&norms)?;
        let vectors: Vec<Vec<f32>> = normalised.to_vec2()?;
        Ok(vectors
            .into_iter()
            .zip(tokens)
            .map(|(vector, tokens)| Embedding { vector, tokens })
            .collect())
    }
}

impl Embedder for MiniLm {
    fn embed(&mut self, texts: &[&str]) -> Result<Vec<Embedding>, EngineError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        self.forward(texts)
    }

    fn token_counts(&self, texts: &[&str]) -> Result<Vec<usize>, EngineError> {
        texts
            .iter()
            .map(|t| {
                self.tokenizer
                    .encode_fast(*t, true)
                    .map(|e| e.get_ids().len())
                    .map_err(|e| EngineError::Model(format!("tokenizer: {e}")))
            })
            .collect()
    }

    fn dimensions(&self) -> usize {
        self.dimensions
    }
}
