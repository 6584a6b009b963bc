//! Entry points for the fuzz targets (`make fuzz`, `tests/fuzz/`) and the property tests:
//! each takes untrusted input the way the server does, runs every check the server runs
//! before a plugin or model sees it, and must answer `Ok` or a 4xx error, never panic.

use std::sync::Arc;

use warp::http::{HeaderMap, HeaderName, HeaderValue};

use super::params::{ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest};
use super::types::EmbeddingsRequest;
use crate::error::ApiError;
use crate::plugins::RequestMeta;

/// The routes whose bodies are parsed.
pub const ROUTES: [&str; 5] = [
    "/v1/embeddings",
    "/v1/chat/completions",
    "/v1/completions",
    "/tokenize",
    "/detokenize",
];

/// Parse and validate `body` as a request to `route` (one of [`ROUTES`]) with this
/// content type, as the handler does up to the plugins.
pub fn parse_request(route: &str, content_type: Option<&str>, body: &[u8]) -> Result<(), ApiError> {
    let meta = RequestMeta {
        request_id: Arc::from("fuzz"),
        method: "POST".into(),
        path: route.into(),
        headers: content_type
            .map(|ct| vec![("content-type".to_string(), ct.to_string())])
            .unwrap_or_default(),
        client_addr: None,
    };
    crate::app::single_credentials(&meta)?;
    match route {
        "/v1/embeddings" => {
            let mut r: EmbeddingsRequest = super::handlers::parse_json(&meta, body)?;
            r.encoding()?;
            r.take_inputs().map(drop)
        }
        "/v1/chat/completions" => {
            ChatRequest::parse(super::handlers::parse_json(&meta, body)?).map(drop)
        }
        "/v1/completions" => {
            CompletionRequest::parse(super::handlers::parse_json(&meta, body)?).map(drop)
        }
        "/tokenize" => TokenizeRequest::parse(super::handlers::parse_json(&meta, body)?).map(drop),
        "/detokenize" => {
            DetokenizeRequest::parse(super::handlers::parse_json(&meta, body)?).map(drop)
        }
        _ => Err(ApiError::RouteNotFound),
    }
}

/// The request id the server would use for this `x-request-id` value.
pub fn request_id(value: &[u8]) -> String {
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(value) {
        headers.insert(HeaderName::from_static(super::REQUEST_ID), v);
    }
    super::request_id(&headers).to_string()
}

/// Parse an admin `PUT /admin/plugins/{slot}` as the admin API does: headers as
/// `(name, value)` pairs (invalid ones are dropped, as hyper would refuse them) and a body.
pub fn admin_change(headers: &[(&[u8], &[u8])], body: &[u8]) -> Result<(), ApiError> {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            map.append(n, v);
        }
    }
    super::admin::parse_change(&map, body).map(drop)
}

/// The text model's tokenizer and chat template, read from a GGUF file's metadata (the
/// weights are not loaded).
pub fn text_tools(
    gguf: &std::path::Path,
) -> Result<(crate::engine::GgufTokenizer, crate::engine::ChatTemplate), String> {
    let mut file = std::io::BufReader::new(std::fs::File::open(gguf).map_err(|e| e.to_string())?);
    let content =
        candle_core::quantized::gguf_file::Content::read(&mut file).map_err(|e| e.to_string())?;
    let tokenizer = crate::engine::GgufTokenizer::from_gguf(&content).map_err(|e| e.to_string())?;
    let source = content
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
        .ok_or("no chat template")?;
    let template =
        crate::engine::ChatTemplate::new(source, &tokenizer.bos_text, &tokenizer.eos_text)?;
    Ok((tokenizer, template))
}

/// The text a stream releases for `ids`, one token at a time, as the engine does with
/// `stop` strings; and whether a stop string ended it.
pub fn stream_text(
    tokenizer: &crate::engine::GgufTokenizer,
    ids: &[u32],
    stop: Vec<String>,
) -> Result<(String, bool), crate::engine::TokenizerError> {
    let mut state = crate::engine::TextState::new(stop);
    let mut out = String::new();
    for end in 1..=ids.len() {
        let piece = state.push(tokenizer, &ids[..end])?;
        out.push_str(piece.delta.as_deref().unwrap_or(""));
        if piece.stopped {
            return Ok((out, true));
        }
    }
    out.push_str(state.finish(tokenizer, ids)?.as_deref().unwrap_or(""));
    Ok((out, false))
}
