//! `POST /v1/chat/completions`, `POST /v1/completions`, `POST /tokenize`, `POST /detokenize`:
//! parse the request, hand it to the application ([`crate::app::Admitted::generate`]), and render its
//! steps as OpenAI's response, whole or as server-sent events. Streaming and non-streaming
//! responses come from the same steps, so their texts are equal.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Buf;
use futures_util::{Stream, StreamExt};
use serde_json::{Value, json};
use tracing::Instrument;
use warp::Reply;
use warp::reply::Response;

use super::handlers::{BodyLimits, guarded, parse_json, read_body};
use super::params::{ChatRequest, CompletionRequest, DetokenizeRequest, Prompt, TokenizeRequest};
use crate::AppState;
use crate::app::{Generation, GenerationInput, GenerationRequest, Step};
use crate::engine::FinishReason;
use crate::error::ApiError;
use crate::metrics::StreamGuard;
use crate::plugins::{InputKind, RequestMeta};

/// Which API a generation came through, and how its responses look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Chat,
    Completion,
}

impl Api {
    fn kind(self) -> InputKind {
        match self {
            Api::Chat => InputKind::Chat,
            Api::Completion => InputKind::Completion,
        }
    }

    fn route(self) -> &'static str {
        match self {
            Api::Chat => "/v1/chat/completions",
            Api::Completion => "/v1/completions",
        }
    }
}

/// What one response is made of, and how to render its pieces.
struct Shape {
    api: Api,
    id: String,
    created: u64,
    model: String,
}

impl Shape {
    fn new(api: Api, model: &str) -> Self {
        let prefix = match api {
            Api::Chat => "chatcmpl",
            Api::Completion => "cmpl",
        };
        Self {
            api,
            id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: model.to_string(),
        }
    }

    fn usage(prompt: usize, cached: usize, completion: usize) -> Value {
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        })
    }

    /// The whole, non-streamed response.
    fn complete(
        &self,
        text: String,
        reason: FinishReason,
        prompt: usize,
        cached: usize,
        completion: usize,
    ) -> Value {
        let choice = match self.api {
            Api::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": reason.as_str(),
            }),
            Api::Completion => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": reason.as_str(),
            }),
        };
        let object = match self.api {
            Api::Chat => "chat.completion",
            Api::Completion => "text_completion",
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": Self::usage(prompt, cached, completion),
        })
    }

    /// One streamed chunk: a text delta, the opening role (chat), or the finish reason.
    fn chunk(
        &self,
        text: Option<&str>,
        role: bool,
        reason: Option<FinishReason>,
        usage_key: bool,
    ) -> Value {
        let reason = reason.map(FinishReason::as_str);
        let (object, choice) = match self.api {
            Api::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                (
                    "chat.completion.chunk",
                    json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": reason}),
                )
            }
            Api::Completion => (
                "text_completion",
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": reason}),
            ),
        };
        let mut v = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        if usage_key {
            v["usage"] = Value::Null;
        }
        v
    }

    /// The last chunk when `stream_options.include_usage` is set: no choices, the usage.
    fn usage_chunk(&self, prompt: usize, cached: usize, completion: usize) -> Value {
        let object = match self.api {
            Api::Chat => "chat.completion.chunk",
            Api::Completion => "text_completion",
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": Self::usage(prompt, cached, completion),
        })
    }
}

/// `POST /v1/chat/completions`.
pub async fn chat<S, B>(state: Arc<AppState>, meta: RequestMeta, body: S) -> Response
where
    S: Stream<Item = Result<B, warp::Error>> + Send,
    B: Buf,
{
    generate(Api::Chat, state, meta, body).await
}

/// `POST /v1/completions`.
pub async fn completions<S, B>(state: Arc<AppState>, meta: RequestMeta, body: S) -> Response
where
    S: Stream<Item = Result<B, warp::Error>> + Send,
    B: Buf,
{
    generate(Api::Completion, state, meta, body).await
}

async fn generate<S, B>(api: Api, state: Arc<AppState>, meta: RequestMeta, body: S) -> Response
where
    S: Stream<Item = Result<B, warp::Error>> + Send,
    B: Buf,
{
    let limit = BodyLimits::of(&state.config);
    guarded(state, meta, api.route(), "inference", |ctx| async move {
        let body = read_body(&ctx.meta, body, limit).await?;
        let value: Value = parse_json(&ctx.meta, &body)?;
        drop(body);
        let (params, input) = match api {
            Api::Chat => {
                let r = ChatRequest::parse(value)?;
                (r.params, GenerationInput::Messages(r.messages))
            }
            Api::Completion => {
                let r = CompletionRequest::parse(value)?;
                let input = match r.prompt {
                    Prompt::Text(t) => GenerationInput::Text(t),
                    Prompt::Tokens(ids) => GenerationInput::Tokens(ids),
                };
                (r.params, input)
            }
        };
        let generation = ctx
            .generate(GenerationRequest {
                kind: api.kind(),
                model: params.model,
                input,
                max_tokens: params.max_tokens,
                sampling: params.sampling,
                stop: params.stop,
            })
            .await?;
        let shape = Shape::new(api, generation.model());
        if params.stream {
            let open = ctx.state.metrics.stream_opened(generation.model());
            return Ok(stream(generation, shape, params.include_usage, open));
        }
        let done = generation.collect().await?;
        let body = shape.complete(
            done.text,
            done.reason,
            done.prompt_tokens,
            done.cached_tokens,
            done.completion_tokens,
        );
        Ok(warp::reply::json(&body).into_response())
    })
    .await
}

/// Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. A failure
/// mid-stream ends it with an `{"error": ...}` event. Dropping the stream (the client went
/// away) drops the engine's event channel, which stops the generation at its next token.
/// When a shutdown's grace period ends, the stream ends with a final error event
/// (`server_shutting_down`) instead of a cut connection.
fn stream(
    generation: Generation,
    shape: Shape,
    include_usage: bool,
    open: StreamGuard,
) -> Response {
    let span = tracing::Span::current();
    let opening = match shape.api {
        Api::Chat => vec![shape.chunk(Some(""), true, None, include_usage)],
        Api::Completion => Vec::new(),
    };
    let state = Some((generation, shape, open));
    let body = futures_util::stream::unfold(state, move |state| {
        let span = span.clone();
        async move {
            let (mut generation, shape, open) = state?;
            let mut out = Vec::new();
            loop {
                match generation.next().await {
                    Ok(Step::Text(t)) if t.is_empty() => continue,
                    Ok(Step::Text(t)) => {
                        out.push(
                            shape
                                .chunk(Some(&t), false, None, include_usage)
                                .to_string(),
                        );
                        return Some((out, Some((generation, shape, open))));
                    }
                    Ok(Step::Done {
                        rest,
                        reason,
                        prompt_tokens,
                        cached_tokens,
                        completion_tokens,
                    }) => {
                        if !rest.is_empty() {
                            out.push(
                                shape
                                    .chunk(Some(&rest), false, None, include_usage)
                                    .to_string(),
                            );
                        }
                        let text = (shape.api == Api::Completion).then_some("");
                        out.push(
                            shape
                                .chunk(text, false, Some(reason), include_usage)
                                .to_string(),
                        );
                        if include_usage {
                            out.push(
                                shape
                                    .usage_chunk(prompt_tokens, cached_tokens, completion_tokens)
                                    .to_string(),
                            );
                        }
                        out.push("[DONE]".into());
                        return Some((out, None));
                    }
                    Err(e) => {
                        // Engine errors are logged where they are made; the rest here.
                        if !matches!(e, ApiError::Engine) {
                            tracing::warn!(error = %e, "stream ended by an error");
                        }
                        out.push(e.body().to_string());
                        return Some((out, None));
                    }
                }
            }
        }
        .instrument(span)
    });
    let events =
        futures_util::stream::iter(vec![opening.into_iter().map(|v| v.to_string()).collect()])
            .chain(body)
            .flat_map(futures_util::stream::iter)
            .map(|data: String| Ok::<_, Infallible>(warp::sse::Event::default().data(data)));
    warp::sse::reply(events).into_response()
}

/// `POST /tokenize`, as llama.cpp's server has it.
pub async fn tokenize<S, B>(state: Arc<AppState>, meta: RequestMeta, body: S) -> Response
where
    S: Stream<Item = Result<B, warp::Error>> + Send,
    B: Buf,
{
    let limit = BodyLimits::of(&state.config);
    guarded(state, meta, "/tokenize", "inference", |ctx| async move {
        let body = read_body(&ctx.meta, body, limit).await?;
        let r = TokenizeRequest::parse(parse_json(&ctx.meta, &body)?)?;
        let tokens = ctx
            .tokenize(
                r.model.as_deref(),
                r.content,
                r.add_special,
                r.parse_special,
            )
            .await?;
        Ok(warp::reply::json(&json!({ "tokens": tokens })).into_response())
    })
    .await
}

/// `POST /detokenize`, as llama.cpp's server has it.
pub async fn detokenize<S, B>(state: Arc<AppState>, meta: RequestMeta, body: S) -> Response
where
    S: Stream<Item = Result<B, warp::Error>> + Send,
    B: Buf,
{
    let limit = BodyLimits::of(&state.config);
    guarded(state, meta, "/detokenize", "inference", |ctx| async move {
        let body = read_body(&ctx.meta, body, limit).await?;
        let r = DetokenizeRequest::parse(parse_json(&ctx.meta, &body)?)?;
        let content = ctx.detokenize(r.model.as_deref(), r.tokens).await?;
        Ok(warp::reply::json(&json!({ "content": content })).into_response())
    })
    .await
}
