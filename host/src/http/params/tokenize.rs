//! `POST /tokenize` and `POST /detokenize`, as llama.cpp's server has them.

use serde_json::Value;

use super::{bad, object, refuse_rest, take, take_bool, take_string, token_ids};
use crate::error::ApiError;

/// `POST /tokenize`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizeRequest {
    /// Model; the text model when absent.
    pub model: Option<String>,
    /// Text.
    pub content: String,
    /// Add the model's BOS token when it wants one.
    pub add_special: bool,
    /// Read special-token text (`<|im_start|>`) as the special token.
    pub parse_special: bool,
}

impl TokenizeRequest {
    /// Validate.
    pub fn parse(body: Value) -> Result<Self, ApiError> {
        let mut obj = object(body)?;
        let model = take_string(&mut obj, "model")?;
        let content = take_string(&mut obj, "content")?
            .ok_or_else(|| bad("content", "content is required"))?;
        let add_special = take_bool(&mut obj, "add_special")?.unwrap_or(false);
        let parse_special = take_bool(&mut obj, "parse_special")?.unwrap_or(true);
        refuse_rest(obj)?;
        Ok(Self {
            model,
            content,
            add_special,
            parse_special,
        })
    }
}

/// `POST /detokenize`.
#[derive(Debug, Clone, PartialEq)]
pub struct DetokenizeRequest {
    /// Model; the text model when absent.
    pub model: Option<String>,
    /// Token ids.
    pub tokens: Vec<u32>,
}

impl DetokenizeRequest {
    /// Validate.
    pub fn parse(body: Value) -> Result<Self, ApiError> {
        let mut obj = object(body)?;
        let model = take_string(&mut obj, "model")?;
        let tokens = match take(&mut obj, "tokens") {
            Some(Value::Array(items)) => token_ids(&items, "tokens")
                .unwrap_or_else(|| Err(bad("tokens", "tokens must be an array of token ids")))?,
            Some(_) => return Err(bad("tokens", "tokens must be an array of token ids")),
            None => return Err(bad("tokens", "tokens is required")),
        };
        refuse_rest(obj)?;
        Ok(Self { model, tokens })
    }
}
