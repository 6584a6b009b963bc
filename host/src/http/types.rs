//! Request and response bodies of the OpenAI-compatible API.

use serde::{Deserialize, Serialize};

use crate::engine::EmbedInput;
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
    /// A string, an array of strings, an array of token ids or an array of token-id arrays.
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

/// An array of token ids named `name`, each a non-negative integer that fits 32 bits.
fn token_ids(items: &[serde_json::Value], name: &str) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .enumerate()
        .map(|(j, v)| {
            v.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| {
                    ApiError::bad(
                        "input",
                        format!("{name}[{j}] must be a token id (a non-negative integer)"),
                    )
                })
        })
        .collect()
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
    /// The inputs, validated, moved out of the request (a 2 MiB input is not copied): a
    /// string, an array of strings, an array of token ids, or an array of token-id arrays
    /// (ids of the model's own vocabulary, checked against it by the handler).
    pub fn take_inputs(&mut self) -> Result<Vec<EmbedInput>, ApiError> {
        use serde_json::Value;
        // One input: a string, or one array of token ids.
        let single = match &self.input {
            Value::String(_) => true,
            Value::Array(items) => items.iter().all(Value::is_number),
            _ => false,
        };
        let inputs = match std::mem::take(&mut self.input) {
            Value::String(s) => vec![EmbedInput::Text(s)],
            Value::Array(items) if items.is_empty() => {
                return Err(ApiError::bad("input", "input must not be an empty array"));
            }
            Value::Array(items) if items.iter().all(Value::is_number) => {
                vec![EmbedInput::Tokens(token_ids(&items, "input")?)]
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
            Value::Array(items) if items.iter().all(Value::is_array) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::Array(ids) => {
                        token_ids(&ids, &format!("input[{i}]")).map(EmbedInput::Tokens)
                    }
                    _ => unreachable!("every item is an array"),
                })
                .collect::<Result<_, _>>()?,
            Value::Array(items) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(EmbedInput::Text(s)),
                    _ => Err(ApiError::bad(
                        "input",
                        format!(
                            "input[{i}] must be a string: an array holds strings, token ids \
                             or token-id arrays, not a mix"
                        ),
                    )),
                })
                .collect::<Result<_, _>>()?,
            _ => {
                return Err(ApiError::bad(
                    "input",
                    "input must be a string, an array of strings, an array of token ids \
                     or an array of token-id arrays",
                ));
            }
        };
        let empty = inputs.iter().position(|i| match i {
            EmbedInput::Text(t) => t.is_empty(),
            EmbedInput::Tokens(ids) => ids.is_empty(),
        });
        if let Some(i) = empty {
            let name = if single {
                "input".to_string()
            } else {
                format!("input[{i}]")
            };
            return Err(ApiError::bad("input", format!("{name} must not be empty")));
        }
        Ok(inputs)
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
        let text = |t: &str| EmbedInput::Text(t.into());
        let take = |j: &str| req(j).take_inputs().unwrap();
        assert_eq!(take(r#"{"model":"m","input":"hi"}"#), [text("hi")]);
        assert_eq!(
            take(r#"{"model":"m","input":["a","b"]}"#),
            [text("a"), text("b")]
        );
        assert_eq!(
            take(r#"{"model":"m","input":[1,2]}"#),
            [EmbedInput::Tokens(vec![1, 2])]
        );
        assert_eq!(
            take(r#"{"model":"m","input":[[1],[2,3]]}"#),
            [EmbedInput::Tokens(vec![1]), EmbedInput::Tokens(vec![2, 3])]
        );
        let msg = |j: &str| req(j).take_inputs().unwrap_err().to_string();
        assert!(msg(r#"{"model":"m","input":["a",3]}"#).starts_with("input[1] must be a string"));
        assert!(msg(r#"{"model":"m","input":[[1],"a"]}"#).starts_with("input[0] must be a string"));
        assert_eq!(
            msg(r#"{"model":"m","input":[1,-2]}"#),
            "input[1] must be a token id (a non-negative integer)"
        );
        assert_eq!(
            msg(r#"{"model":"m","input":[[1],[2.5]]}"#),
            "input[1][0] must be a token id (a non-negative integer)"
        );
        assert_eq!(
            msg(r#"{"model":"m","input":[4294967296]}"#),
            "input[0] must be a token id (a non-negative integer)"
        );
        assert_eq!(
            msg(r#"{"model":"m","input":[]}"#),
            "input must not be an empty array"
        );
        assert_eq!(
            msg(r#"{"model":"m","input":["a",""]}"#),
            "input[1] must not be empty"
        );
        assert_eq!(
            msg(r#"{"model":"m","input":[[1],[]]}"#),
            "input[1] must not be empty"
        );
        assert!(msg(r#"{"model":"m","input":{"a":1}}"#).contains("a string, an array"));
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
