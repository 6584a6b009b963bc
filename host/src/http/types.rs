//! Request and response bodies of the OpenAI-compatible API.

use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// Most inputs in one embeddings request (OpenAI's limit), checked by the host before any
/// plugin runs.
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// `POST /v1/embeddings`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingsRequest {
    /// Model id.
    pub model: String,
    /// A string or an array of strings.
    pub input: serde_json::Value,
    /// `float` (default) or `base64`.
    #[serde(default)]
    pub encoding_format: Option<String>,
    /// Not supported: the model has fixed dimensions.
    #[serde(default)]
    pub dimensions: Option<serde_json::Value>,
    /// Ignored.
    #[serde(default)]
    #[expect(dead_code, reason = "accepted for OpenAI compatibility and ignored")]
    pub user: Option<String>,
}

/// How vectors are encoded in the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodingFormat {
    /// JSON numbers.
    Float,
    /// Little-endian f32 bytes, base64.
    Base64,
}

impl EmbeddingsRequest {
    /// The texts, validated, moved out of the request (a 2 MiB input is not copied).
    pub fn take_texts(&mut self) -> Result<Vec<String>, ApiError> {
        use serde_json::Value;
        let single = matches!(self.input, Value::String(_));
        let texts = match std::mem::take(&mut self.input) {
            Value::String(s) => vec![s],
            Value::Array(items) if items.is_empty() => {
                return Err(ApiError::bad("input", "input must not be an empty array"));
            }
            Value::Array(items) if items.len() > MAX_EMBEDDING_INPUTS => {
                return Err(ApiError::Invalid {
                    code: "too_many_inputs",
                    param: Some("input"),
                    message: format!(
                        "{} inputs given; at most {MAX_EMBEDDING_INPUTS} are allowed",
                        items.len()
                    ),
                });
            }
            Value::Array(items) => {
                if items.iter().all(|v| v.is_number() || v.is_array()) {
                    return Err(ApiError::bad(
                        "input",
                        "token arrays are not supported as input; send text",
                    ));
                }
                items
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| match v {
                        Value::String(s) => Ok(s),
                        _ => Err(ApiError::bad(
                            "input",
                            format!("input[{i}] must be a string"),
                        )),
                    })
                    .collect::<Result<_, _>>()?
            }
            _ => {
                return Err(ApiError::bad(
                    "input",
                    "input must be a string or an array of strings",
                ));
            }
        };
        if let Some(i) = texts.iter().position(String::is_empty) {
            let name = if single {
                "input".to_string()
            } else {
                format!("input[{i}]")
            };
            return Err(ApiError::bad("input", format!("{name} must not be empty")));
        }
        Ok(texts)
    }

    /// The requested encoding.
    pub fn encoding(&self) -> Result<EncodingFormat, ApiError> {
        if self.dimensions.is_some() {
            return Err(ApiError::bad(
                "dimensions",
                "dimensions is not supported: this model's vectors have a fixed size",
            ));
        }
        match self.encoding_format.as_deref() {
            None | Some("float") => Ok(EncodingFormat::Float),
            Some("base64") => Ok(EncodingFormat::Base64),
            Some(other) => Err(ApiError::bad(
                "encoding_format",
                format!("encoding_format must be `float` or `base64`, not `{other}`"),
            )),
        }
    }
}

/// One vector in the response.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Vector {
    /// Numbers.
    Float(Vec<f32>),
    /// base64 of little-endian f32s.
    Base64(String),
}

/// One item of `data`.
#[derive(Debug, Serialize)]
pub struct EmbeddingItem {
    /// Always `embedding`.
    pub object: &'static str,
    /// Position in the input.
    pub index: usize,
    /// The vector.
    pub embedding: Vector,
}

/// Token accounting.
#[derive(Debug, Serialize)]
pub struct EmbeddingsUsage {
    /// Tokens read.
    pub prompt_tokens: usize,
    /// Same as `prompt_tokens`.
    pub total_tokens: usize,
}

/// The `/v1/embeddings` response.
#[derive(Debug, Serialize)]
pub struct EmbeddingsResponse {
    /// Always `list`.
    pub object: &'static str,
    /// One item per input.
    pub data: Vec<EmbeddingItem>,
    /// Model id.
    pub model: String,
    /// Tokens.
    pub usage: EmbeddingsUsage,
}

/// One model in `/v1/models`.
#[derive(Debug, Serialize)]
pub struct ModelCard {
    /// Id clients use.
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// Unix time the server loaded it.
    pub created: u64,
    /// Always `warden`.
    pub owned_by: &'static str,
}

/// `/v1/models`.
#[derive(Debug, Serialize)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    /// The models.
    pub data: Vec<ModelCard>,
}

/// Encode a vector as OpenAI's base64 format.
pub fn base64_vector(v: &[f32]) -> String {
    use base64::Engine;
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> EmbeddingsRequest {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn inputs_are_validated() {
        assert_eq!(
            req(r#"{"model":"m","input":"hi"}"#).take_texts().unwrap(),
            ["hi"]
        );
        assert_eq!(
            req(r#"{"model":"m","input":["a","b"]}"#)
                .take_texts()
                .unwrap(),
            ["a", "b"]
        );
        let msg = |j: &str| req(j).take_texts().unwrap_err().to_string();
        assert!(msg(r#"{"model":"m","input":[1,2]}"#).contains("token arrays"));
        assert!(msg(r#"{"model":"m","input":[[1],[2]]}"#).contains("token arrays"));
        assert_eq!(
            msg(r#"{"model":"m","input":["a",3]}"#),
            "input[1] must be a string"
        );
        assert_eq!(
            msg(r#"{"model":"m","input":[]}"#),
            "input must not be an empty array"
        );
        assert_eq!(
            msg(r#"{"model":"m","input":["a",""]}"#),
            "input[1] must not be empty"
        );
        assert!(msg(r#"{"model":"m","input":{"a":1}}"#).contains("string or an array"));
    }

    #[test]
    fn encodings_and_dimensions() {
        assert_eq!(
            req(r#"{"model":"m","input":"a"}"#).encoding().unwrap(),
            EncodingFormat::Float
        );
        let b = req(r#"{"model":"m","input":"a","encoding_format":"base64"}"#);
        assert_eq!(b.encoding().unwrap(), EncodingFormat::Base64);
        let d = req(r#"{"model":"m","input":"a","dimensions":128}"#)
            .encoding()
            .unwrap_err();
        assert_eq!(d.status(), 400);
        assert!(
            req(r#"{"model":"m","input":"a","encoding_format":"int8"}"#)
                .encoding()
                .is_err()
        );
        assert!(
            serde_json::from_str::<EmbeddingsRequest>(r#"{"model":"m","input":"a","x":1}"#)
                .is_err()
        );
    }

    #[test]
    fn base64_is_little_endian_f32() {
        assert_eq!(base64_vector(&[1.0]), "AACAPw==");
    }
}
