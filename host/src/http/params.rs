//! Validation of chat and completion requests.
//!
//! Requests are read as JSON objects and taken apart field by field, so that every error
//! names the parameter at fault. Parameters that would change the output but are not
//! implemented (`logprobs`, `tools`, …) are refused, never silently ignored; unknown
//! parameters are refused too, as OpenAI's API does.

use serde_json::{Map, Value};

use crate::engine::SamplingParams;
use crate::error::ApiError;
use crate::plugins::ChatMessage;

mod tokenize;
pub use tokenize::{DetokenizeRequest, TokenizeRequest};

/// Most stop strings per request.
pub const MAX_STOP: usize = 4;

/// Most messages in one chat request, checked by the host before any plugin runs.
pub const MAX_MESSAGES: usize = 1024;

/// Accepted and ignored: they do not change the output.
const IGNORED: [&str; 5] = [
    "user",
    "store",
    "metadata",
    "service_tier",
    "parallel_tool_calls",
];

/// Generation settings shared by chat and completions.
#[derive(Debug, Clone, PartialEq)]
pub struct GenParams {
    /// Requested model.
    pub model: String,
    /// Most tokens to generate; `None` means up to the context window.
    pub max_tokens: Option<usize>,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Server-sent events.
    pub stream: bool,
    /// A final chunk with `usage` when streaming.
    pub include_usage: bool,
}

/// What the prompt of a completion request is.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
}

/// A parsed `POST /v1/chat/completions`.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// Settings.
    pub params: GenParams,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
}

/// A parsed `POST /v1/completions`.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    /// Settings.
    pub params: GenParams,
    /// The prompt.
    pub prompt: Prompt,
}

pub(super) fn bad(param: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::bad(param, message)
}

/// A JSON object, or a 400.
pub fn object(body: Value) -> Result<Map<String, Value>, ApiError> {
    match body {
        Value::Object(map) => Ok(map),
        _ => Err(ApiError::BadRequest {
            message: "the request body must be a JSON object".into(),
            param: None,
        }),
    }
}

/// Take `key` out of `obj`; JSON `null` counts as absent.
pub(super) fn take(obj: &mut Map<String, Value>, key: &str) -> Option<Value> {
    obj.remove(key).filter(|v| !v.is_null())
}

fn take_number(obj: &mut Map<String, Value>, key: &'static str) -> Result<Option<f64>, ApiError> {
    match take(obj, key) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| bad(key, format!("{key} must be a number"))),
    }
}

fn take_range(
    obj: &mut Map<String, Value>,
    key: &'static str,
    low: f64,
    high: f64,
) -> Result<Option<f64>, ApiError> {
    let v = take_number(obj, key)?;
    if let Some(x) = v
        && !(low..=high).contains(&x)
    {
        return Err(bad(
            key,
            format!("{key} must be between {low} and {high}, not {x}"),
        ));
    }
    Ok(v)
}

pub(super) fn take_bool(
    obj: &mut Map<String, Value>,
    key: &'static str,
) -> Result<Option<bool>, ApiError> {
    match take(obj, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(b)),
        Some(_) => Err(bad(key, format!("{key} must be true or false"))),
    }
}

fn take_count(obj: &mut Map<String, Value>, key: &'static str) -> Result<Option<u64>, ApiError> {
    match take(obj, key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad(key, format!("{key} must be a non-negative integer"))),
    }
}

pub(super) fn take_string(
    obj: &mut Map<String, Value>,
    key: &'static str,
) -> Result<Option<String>, ApiError> {
    match take(obj, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(bad(key, format!("{key} must be a string"))),
    }
}

/// A value that only has a harmless form: `false`, `0`, empty, or `{"type": "text"}`.
fn harmless(key: &str, v: &Value) -> bool {
    match v {
        Value::Bool(b) => !b,
        Value::Array(a) => a.is_empty() || (key == "modalities" && a == &[Value::from("text")]),
        Value::Object(o) if key == "response_format" => {
            o.len() == 1 && o.get("type") == Some(&Value::from("text"))
        }
        Value::Object(o) => o.is_empty(),
        Value::Number(n) => key == "best_of" && n.as_u64() == Some(1),
        _ => false,
    }
}

/// Parameters OpenAI defines that would change the output and that Warden does not do.
const REFUSED: [&str; 13] = [
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "logit_bias",
    "echo",
    "suffix",
    "best_of",
    "modalities",
    "prediction",
];

/// Refuse what is left in `obj`: unsupported OpenAI parameters and unknown ones.
pub(super) fn refuse_rest(obj: Map<String, Value>) -> Result<(), ApiError> {
    for (key, value) in obj {
        if IGNORED.contains(&key.as_str()) || value.is_null() {
            continue;
        }
        if let Some(&name) = REFUSED.iter().find(|&&r| r == key) {
            if harmless(name, &value) {
                continue;
            }
            return Err(bad(name, format!("{name} is not supported by this server")));
        }
        let shown: String = key.chars().take(64).collect();
        return Err(ApiError::BadRequest {
            message: format!("unknown parameter `{shown}`"),
            param: None,
        });
    }
    Ok(())
}

fn take_stop(obj: &mut Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let stop = match take(obj, "stop") {
        None => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(bad("stop", "stop must be a string or an array of strings")),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(bad("stop", "stop must be a string or an array of strings")),
    };
    if stop.len() > MAX_STOP {
        return Err(bad(
            "stop",
            format!(
                "at most {MAX_STOP} stop strings are allowed, not {}",
                stop.len()
            ),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(bad("stop", "stop strings must not be empty"));
    }
    Ok(stop)
}

fn gen_params(obj: &mut Map<String, Value>) -> Result<GenParams, ApiError> {
    let model = take_string(obj, "model")?.ok_or_else(|| bad("model", "model is required"))?;
    let max_tokens = take_count(obj, "max_tokens")?;
    let max_completion = take_count(obj, "max_completion_tokens")?;
    let max_tokens = match (max_completion, max_tokens) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "max_tokens",
                "give max_tokens or max_completion_tokens, not both",
            ));
        }
        (a, b) => a.or(b),
    };
    if max_tokens == Some(0) {
        return Err(bad("max_tokens", "max_tokens must be at least 1"));
    }
    let temperature = take_range(obj, "temperature", 0.0, 2.0)?.unwrap_or(1.0);
    let top_p = take_number(obj, "top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad(
            "top_p",
            format!("top_p must be in (0, 1], not {top_p}"),
        ));
    }
    let presence_penalty = take_range(obj, "presence_penalty", -2.0, 2.0)?.unwrap_or(0.0);
    let frequency_penalty = take_range(obj, "frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0);
    let seed = match take(obj, "seed") {
        None => rand_seed(),
        Some(v) => v
            .as_i64()
            .map(|s| s as u64)
            .ok_or_else(|| bad("seed", "seed must be an integer"))?,
    };
    match take(obj, "n") {
        None => {}
        Some(v) if v.as_u64() == Some(1) => {}
        Some(_) => return Err(bad("n", "only n = 1 is supported")),
    }
    let stop = take_stop(obj)?;
    let stream = take_bool(obj, "stream")?.unwrap_or(false);
    let include_usage = match take(obj, "stream_options") {
        None => false,
        Some(_) if !stream => {
            return Err(bad(
                "stream_options",
                "stream_options is only allowed with stream = true",
            ));
        }
        Some(Value::Object(mut o)) => {
            let include = take_bool(&mut o, "include_usage")?.unwrap_or(false);
            if let Some(k) = o.keys().next() {
                return Err(bad(
                    "stream_options",
                    format!(
                        "unknown stream option `{}`",
                        k.chars().take(64).collect::<String>()
                    ),
                ));
            }
            include
        }
        Some(_) => return Err(bad("stream_options", "stream_options must be an object")),
    };
    Ok(GenParams {
        model,
        max_tokens: max_tokens.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        sampling: SamplingParams {
            temperature,
            top_p,
            seed,
            presence_penalty: presence_penalty as f32,
            frequency_penalty: frequency_penalty as f32,
        },
        stop,
        stream,
        include_usage,
    })
}

/// A seed for requests that give none.
fn rand_seed() -> u64 {
    let id = uuid::Uuid::new_v4();
    let (a, _) = id.as_u64_pair();
    a
}

fn messages(value: Option<Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let items = match value {
        None => return Err(bad("messages", "messages is required")),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(bad("messages", "messages must be an array")),
    };
    if items.is_empty() {
        return Err(bad("messages", "messages must not be empty"));
    }
    if items.len() > MAX_MESSAGES {
        return Err(ApiError::Invalid {
            code: "too_many_messages",
            param: Some("messages"),
            message: format!(
                "{} messages given; at most {MAX_MESSAGES} are allowed",
                items.len()
            ),
        });
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let Value::Object(mut m) = item else {
                return Err(bad("messages", format!("messages[{i}] must be an object")));
            };
            let role = match take(&mut m, "role") {
                Some(Value::String(r)) => r,
                Some(_) => return Err(bad("messages", format!("messages[{i}].role must be a string"))),
                None => return Err(bad("messages", format!("messages[{i}].role is required"))),
            };
            let role = match role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    let shown: String = other.chars().take(32).collect();
                    return Err(bad(
                        "messages",
                        format!(
                            "messages[{i}].role `{shown}` is not supported; use system, user or assistant"
                        ),
                    ));
                }
            };
            let content = match take(&mut m, "content") {
                Some(Value::String(c)) => c,
                Some(_) => {
                    return Err(bad(
                        "messages",
                        format!("messages[{i}].content must be a string"),
                    ));
                }
                None => return Err(bad("messages", format!("messages[{i}].content is required"))),
            };
            // `name` does not reach the template; anything else (tool calls, audio) is refused.
            m.remove("name");
            if let Some(k) = m.keys().next() {
                let shown: String = k.chars().take(64).collect();
                return Err(bad(
                    "messages",
                    format!("messages[{i}].{shown} is not supported"),
                ));
            }
            Ok(ChatMessage {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

impl ChatRequest {
    /// Validate a chat request body.
    pub fn parse(body: Value) -> Result<Self, ApiError> {
        let mut obj = object(body)?;
        let messages = messages(obj.remove("messages"))?;
        let params = gen_params(&mut obj)?;
        refuse_rest(obj)?;
        Ok(Self { params, messages })
    }
}

impl CompletionRequest {
    /// Validate a completion request body.
    pub fn parse(body: Value) -> Result<Self, ApiError> {
        let mut obj = object(body)?;
        let prompt = prompt(take(&mut obj, "prompt"))?;
        let params = gen_params(&mut obj)?;
        refuse_rest(obj)?;
        Ok(Self { params, prompt })
    }
}

pub(super) fn token_ids(
    items: &[Value],
    param: &'static str,
) -> Option<Result<Vec<u32>, ApiError>> {
    if !items.iter().all(Value::is_number) {
        return None;
    }
    Some(
        items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| {
                        bad(
                            param,
                            format!("{param} token ids must be non-negative integers"),
                        )
                    })
            })
            .collect(),
    )
}

fn prompt(value: Option<Value>) -> Result<Prompt, ApiError> {
    let prompt = match value {
        None => return Err(bad("prompt", "prompt is required")),
        Some(Value::String(s)) => Prompt::Text(s),
        Some(Value::Array(items)) => {
            if let Some(ids) = token_ids(&items, "prompt") {
                Prompt::Tokens(ids?)
            } else {
                match <[Value; 1]>::try_from(items) {
                    Ok([Value::String(s)]) => Prompt::Text(s),
                    Ok([Value::Array(inner)]) => match token_ids(&inner, "prompt") {
                        Some(ids) => Prompt::Tokens(ids?),
                        None => return Err(bad("prompt", "prompt must be a string or token ids")),
                    },
                    _ => {
                        return Err(bad(
                            "prompt",
                            "prompt must be one string or one array of token ids; batches are not supported",
                        ));
                    }
                }
            }
        }
        Some(_) => return Err(bad("prompt", "prompt must be a string or token ids")),
    };
    match &prompt {
        Prompt::Text(s) if s.is_empty() => Err(bad("prompt", "prompt must not be empty")),
        Prompt::Tokens(t) if t.is_empty() => Err(bad("prompt", "prompt must not be empty")),
        _ => Ok(prompt),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(extra: Value) -> Result<ChatRequest, ApiError> {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
            b.extend(e);
        }
        ChatRequest::parse(body)
    }

    fn param_of(r: Result<ChatRequest, ApiError>) -> String {
        match r {
            Err(ApiError::BadRequest { param, message }) => {
                format!("{}: {message}", param.unwrap_or("-"))
            }
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let r = chat(json!({})).unwrap();
        assert_eq!(r.params.max_tokens, None);
        assert_eq!(r.params.sampling.temperature, 1.0);
        assert!(!r.params.stream);
        assert_eq!(r.messages[0].role, "user");
    }

    #[test]
    fn every_bad_value_names_its_parameter() {
        for (extra, param) in [
            (json!({"temperature": -0.1}), "temperature"),
            (json!({"temperature": "hot"}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"top_p": 1.5}), "top_p"),
            (json!({"n": 2}), "n"),
            (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
            (json!({"stop": 3}), "stop"),
            (json!({"logprobs": true}), "logprobs"),
            (json!({"tools": [{"type": "function"}]}), "tools"),
            (
                json!({"response_format": {"type": "json_object"}}),
                "response_format",
            ),
            (json!({"max_tokens": -1}), "max_tokens"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"presence_penalty": 3}), "presence_penalty"),
            (
                json!({"stream_options": {"include_usage": true}}),
                "stream_options",
            ),
            (json!({"messages": []}), "messages"),
            (
                json!({"messages": [{"role": "wizard", "content": "x"}]}),
                "messages",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "text"}]}]}),
                "messages",
            ),
            (json!({"messages": [{"role": "user"}]}), "messages"),
            (json!({"model": 3}), "model"),
        ] {
            let got = param_of(chat(extra.clone()));
            assert!(got.starts_with(&format!("{param}:")), "{extra}: {got}");
        }
    }

    #[test]
    fn harmless_forms_of_refused_parameters_pass() {
        let r = chat(
            json!({"logprobs": false, "tools": [], "response_format": {"type": "text"},
            "logit_bias": {}, "user": "u", "n": 1, "stop": "x", "seed": -5}),
        );
        let r = r.unwrap();
        assert_eq!(r.params.stop, vec!["x".to_string()]);
        assert_eq!(r.params.sampling.seed, (-5i64) as u64);
    }

    #[test]
    fn unknown_parameters_are_refused() {
        let got = param_of(chat(json!({"temprature": 0})));
        assert!(got.contains("unknown parameter `temprature`"), "{got}");
    }

    #[test]
    fn prompts() {
        let p = |v: Value| prompt(Some(v));
        assert_eq!(p(json!("x")).unwrap(), Prompt::Text("x".into()));
        assert_eq!(p(json!(["x"])).unwrap(), Prompt::Text("x".into()));
        assert_eq!(p(json!([1, 2])).unwrap(), Prompt::Tokens(vec![1, 2]));
        assert_eq!(p(json!([[1, 2]])).unwrap(), Prompt::Tokens(vec![1, 2]));
        assert!(p(json!(["a", "b"])).is_err());
        assert!(p(json!("")).is_err());
        assert!(p(json!([-1])).is_err());
        assert!(p(json!({})).is_err());
    }
}
