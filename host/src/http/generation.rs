//! `POST /v1/chat/completions`, `POST /v1/completions`, `POST /tokenize`, `POST /detokenize`.
//!
//! A generation request goes auth → sanitizer input check → chat template and tokenizer →
//! engine queue → the sanitizer's output filter → client. The output filter sees every piece
//! of generated text before the client does, streamed or not, and holds back only what it
//! needs to (an address split across tokens). Streaming and non-streaming responses come
//! from the same loop, so their texts are equal.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Buf;
use futures_util::{Stream, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::Instrument;
use warp::Reply;
use warp::reply::Response;

use super::handlers::{
    BodyLimits, Ctx, engine_error, engine_permit, guarded, parse_json, read_body, settle,
};
use super::params::{
    ChatRequest, CompletionRequest, DetokenizeRequest, GenParams, Prompt, TokenizeRequest,
};
use crate::AppState;
use crate::breaker::Permit;
use crate::engine::{
    EngineError, FinishReason, GenerateEvent, GenerateRequest, TemplateMessage, TextModel,
};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::plugins::{
    ChatMessage, Checked, InferenceInput, InputKind, OutputFilter, Payload, RequestMeta,
    SanitizerSession,
};

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

    fn prompt_param(self) -> &'static str {
        match self {
            Api::Chat => "messages",
            Api::Completion => "prompt",
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

    fn usage(prompt: usize, completion: usize) -> Value {
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        })
    }

    /// The whole, non-streamed response.
    fn complete(
        &self,
        text: String,
        reason: FinishReason,
        prompt: usize,
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
            "usage": Self::usage(prompt, completion),
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
    fn usage_chunk(&self, prompt: usize, completion: usize) -> Value {
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
            "usage": Self::usage(prompt, completion),
        })
    }
}

/// A generation in progress: the engine's events through the output filter.
struct Generation {
    events: UnboundedReceiver<GenerateEvent>,
    session: SanitizerSession,
    filter: OutputFilter,
    request_id: Arc<str>,
    model: String,
    metrics: Arc<Metrics>,
    /// When the engine accepted the generation.
    started: Instant,
    /// When its first token arrived.
    first_token: Option<Instant>,
    /// The circuit breaker's leave, settled when the generation ends.
    permit: Option<Permit>,
    /// Whether the engine took the request from its queue.
    admitted: bool,
    /// How long the request may wait in the queue.
    queue_timeout: std::time::Duration,
}

/// One step of a generation, after the output filter.
enum Step {
    /// Filtered text (possibly empty: the filter is holding it back).
    Text(String),
    /// The end, with the filter's held-back rest.
    Done {
        rest: String,
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
}

impl Generation {
    fn failed(&self, e: EngineError) -> ApiError {
        engine_error(e, &self.request_id, &self.model, &self.metrics)
    }

    async fn next(&mut self) -> Result<Step, ApiError> {
        loop {
            let event = if self.admitted {
                self.events.recv().await
            } else {
                // Until the engine takes the request, the wait is bounded by the queue timeout.
                let left = self.queue_timeout.saturating_sub(self.started.elapsed());
                match tokio::time::timeout(left, self.events.recv()).await {
                    Ok(event) => event,
                    Err(_) => {
                        // Neither a success nor a failure of the model.
                        drop(self.permit.take());
                        return Err(self.failed(EngineError::QueueTimeout));
                    }
                }
            };
            if let Some(GenerateEvent::Started) = event {
                self.admitted = true;
                continue;
            }
            return self.step(event).await;
        }
    }

    async fn step(&mut self, event: Option<GenerateEvent>) -> Result<Step, ApiError> {
        match event {
            Some(GenerateEvent::Started) => Ok(Step::Text(String::new())),
            Some(GenerateEvent::Delta(text)) => {
                if self.first_token.is_none() {
                    let now = Instant::now();
                    self.first_token = Some(now);
                    self.metrics
                        .observe_first_token(&self.model, now - self.started);
                }
                let out = self
                    .session
                    .push(self.filter, text)
                    .instrument(tracing::trace_span!("plugin.sanitizer", call = "push"))
                    .await?;
                Ok(Step::Text(out.map_err(ApiError::Refused)?))
            }
            Some(GenerateEvent::Done {
                reason,
                prompt_tokens,
                completion_tokens,
            }) => {
                if let Some(p) = self.permit.take() {
                    p.succeeded();
                }
                self.metrics.record_generation(
                    &self.model,
                    prompt_tokens,
                    completion_tokens,
                    self.first_token.map(|t| t.elapsed()),
                );
                let rest = self
                    .session
                    .finish(self.filter)
                    .instrument(tracing::trace_span!("plugin.sanitizer", call = "finish"))
                    .await?;
                Ok(Step::Done {
                    rest: rest.map_err(ApiError::Refused)?,
                    reason,
                    prompt_tokens,
                    completion_tokens,
                })
            }
            Some(GenerateEvent::Failed(e)) => {
                settle(self.permit.take(), Err(&e));
                Err(self.failed(e))
            }
            None => {
                let e = EngineError::Stopped;
                settle(self.permit.take(), Err(&e));
                Err(self.failed(e))
            }
        }
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

/// The client's input, as parsed.
enum Input {
    Messages(Vec<ChatMessage>),
    Text(String),
    Tokens(Vec<u32>),
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
                (r.params, Input::Messages(r.messages))
            }
            Api::Completion => {
                let r = CompletionRequest::parse(value)?;
                let input = match r.prompt {
                    Prompt::Text(t) => Input::Text(t),
                    Prompt::Tokens(ids) => Input::Tokens(ids),
                };
                (r.params, input)
            }
        };
        let services = ctx.state.services().ok_or(ApiError::NotReady)?;
        let model = services
            .text_model(&params.model)
            .ok_or_else(|| ApiError::ModelNotFound(params.model.clone()))?;
        let _ = ctx.model.set(model.id.clone());
        run(api, &ctx, model, params, input).await
    })
    .await
}

fn failed(ctx: &Ctx, model: &TextModel, e: EngineError) -> ApiError {
    engine_error(e, &ctx.meta.request_id, &model.id, &ctx.state.metrics)
}

/// Run tokenizer or template work on a blocking thread. `f` answers either the result or a
/// client error (`Ok`), or an engine failure (`Err`, logged and counted as such).
async fn blocking<T, F>(ctx: &Ctx, model: &TextModel, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&TextModel) -> Result<Result<T, ApiError>, EngineError> + Send + 'static,
{
    let state = ctx.state.clone();
    let id = model.id.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let model = state
            .services()
            .and_then(|s| s.text_model(&id))
            .ok_or(EngineError::Stopped)?;
        f(model)
    })
    .await
    .unwrap_or_else(|_| Err(EngineError::Model("the tokenizer panicked".into())));
    match outcome {
        Ok(result) => result,
        Err(e) => Err(failed(ctx, model, e)),
    }
}

/// Sanitize, tokenize, check the window, queue; then answer whole or as a stream.
async fn run(
    api: Api,
    ctx: &Ctx,
    model: &TextModel,
    params: GenParams,
    input: Input,
) -> Result<Response, ApiError> {
    let param = api.prompt_param();
    let context = model.handle.context_length();
    // What the host can tell without tokenizing: more ids than the window, or more text
    // than the window's tokens can stand for. Refused before any plugin or tokenizer runs.
    let text_bytes = match &input {
        Input::Messages(m) => m.iter().map(|m| m.content.len()).sum(),
        Input::Text(t) => t.len(),
        Input::Tokens(_) => 0,
    };
    if let Input::Tokens(ids) = &input
        && ids.len() > context
    {
        return Err(ApiError::ContextLength {
            context,
            prompt: ids.len(),
            max_tokens: params.max_tokens.unwrap_or(0),
            param,
        });
    }
    let max_token_bytes = model.handle.tokenizer().max_token_bytes();
    if text_bytes > context.saturating_mul(max_token_bytes) {
        return Err(ApiError::PromptTooLong { context, param });
    }
    // Token ids are shown to the sanitizer as their text, and kept to be served as they
    // are if it passes them. Text is moved, never copied, on its way to the plugin.
    let (payload, ids) = match input {
        Input::Messages(m) => (Payload::Messages(m), None),
        Input::Text(t) => (Payload::Texts(vec![t]), None),
        Input::Tokens(ids) => {
            // Detokenizing grows with the body (up to `body_limit_bytes`): off the reactor.
            let (text, ids) = blocking(ctx, model, move |model| {
                Ok(match model.handle.tokenizer().decode(&ids) {
                    Ok(text) => Ok((text, ids)),
                    Err(e) => Err(ApiError::bad(param, e.to_string())),
                })
            })
            .await?;
            (Payload::Texts(vec![text]), Some(ids))
        }
    };
    let session = ctx
        .plugins
        .sanitizer_session(&ctx.meta.request_id)
        .instrument(tracing::debug_span!("plugin.sanitizer"))
        .await?;
    let checked = session
        .check_input(InferenceInput {
            kind: api.kind(),
            model: model.id.clone(),
            principal: ctx.principal.clone(),
            payload,
            max_tokens: params
                .max_tokens
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
        })
        .instrument(tracing::debug_span!("plugin.sanitizer"))
        .await?
        .map_err(ApiError::Refused)?;

    let prompt = blocking(ctx, model, move |model| {
        let tokenizer = model.handle.tokenizer();
        let text = match (checked, ids) {
            (Checked::Unchanged(_), Some(ids)) => return Ok(Ok(ids)),
            (checked, _) => match checked.into_payload() {
                Payload::Messages(messages) => {
                    let Some(template) = model.template.as_ref() else {
                        return Ok(Err(ApiError::bad(
                            "messages",
                            "this model has no chat template; use /v1/completions",
                        )));
                    };
                    let messages: Vec<TemplateMessage> = messages
                        .into_iter()
                        .map(|m| TemplateMessage {
                            role: m.role,
                            content: m.content,
                        })
                        .collect();
                    match template.render(&messages) {
                        Ok(text) => text,
                        Err(e) => return Ok(Err(ApiError::bad("messages", e))),
                    }
                }
                Payload::Texts(texts) => texts.concat(),
            },
        };
        let encoded = tokenizer
            .encode_at_most(&text, true, true, context)
            .map_err(|e| EngineError::Model(e.to_string()))?;
        if !encoded.complete {
            return Ok(Err(ApiError::PromptTooLong { context, param }));
        }
        Ok(Ok(encoded.ids))
    })
    .await?;
    if prompt.is_empty() {
        return Err(ApiError::bad(
            param,
            "the prompt is empty after sanitization",
        ));
    }

    let max_tokens = match params.max_tokens {
        Some(n) => n,
        None => context.saturating_sub(prompt.len()).max(1),
    };
    if prompt.len().saturating_add(max_tokens) > context {
        return Err(ApiError::ContextLength {
            context,
            prompt: prompt.len(),
            max_tokens,
            param,
        });
    }

    let mut permit = engine_permit(&ctx.state, &model.id)?;
    let events = model.handle.submit(GenerateRequest {
        prompt,
        max_tokens,
        sampling: params.sampling,
        stop: params.stop,
        span: tracing::Span::current(),
    });
    if let Err(e) = &events {
        settle(permit.take(), Err(e));
    }
    let events = events.map_err(|e| failed(ctx, model, e))?;
    let filter = session.output_filter(api.kind()).await?;
    let mut generation = Generation {
        events,
        session,
        filter,
        request_id: ctx.meta.request_id.clone(),
        model: model.id.clone(),
        metrics: ctx.state.metrics.clone(),
        started: Instant::now(),
        first_token: None,
        permit,
        admitted: false,
        queue_timeout: std::time::Duration::from_millis(ctx.state.config.engine.queue_timeout_ms),
    };
    let shape = Shape::new(api, &model.id);
    let phase = ctx.state.phase_watch();
    if params.stream {
        return Ok(stream(generation, shape, params.include_usage, phase));
    }
    let mut text = String::new();
    let mut phase = phase;
    loop {
        let step = tokio::select! {
            step = generation.next() => step,
            () = crate::aborted(&mut phase) => Err(ApiError::ShuttingDown),
        };
        match step? {
            Step::Text(t) => text.push_str(&t),
            Step::Done {
                rest,
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                text.push_str(&rest);
                let body = shape.complete(text, reason, prompt_tokens, completion_tokens);
                return Ok(warp::reply::json(&body).into_response());
            }
        }
    }
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
    phase: tokio::sync::watch::Receiver<crate::Phase>,
) -> Response {
    let span = tracing::Span::current();
    let opening = match shape.api {
        Api::Chat => vec![shape.chunk(Some(""), true, None, include_usage)],
        Api::Completion => Vec::new(),
    };
    let open = generation.metrics.stream_opened(&generation.model);
    let state = Some((generation, shape, phase, open));
    let body = futures_util::stream::unfold(state, move |state| {
        let span = span.clone();
        async move {
            let (mut generation, shape, mut phase, open) = state?;
            let mut out = Vec::new();
            loop {
                let step = tokio::select! {
                    step = generation.next() => step,
                    () = crate::aborted(&mut phase) => Err(ApiError::ShuttingDown),
                };
                match step {
                    Ok(Step::Text(t)) if t.is_empty() => continue,
                    Ok(Step::Text(t)) => {
                        out.push(
                            shape
                                .chunk(Some(&t), false, None, include_usage)
                                .to_string(),
                        );
                        return Some((out, Some((generation, shape, phase, open))));
                    }
                    Ok(Step::Done {
                        rest,
                        reason,
                        prompt_tokens,
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
                                    .usage_chunk(prompt_tokens, completion_tokens)
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

fn text_model<'a>(
    services: &'a crate::Services,
    name: Option<&str>,
) -> Result<&'a TextModel, ApiError> {
    match name {
        Some(n) => services
            .text_model(n)
            .ok_or_else(|| ApiError::ModelNotFound(n.to_string())),
        None => services.default_text_model().ok_or(ApiError::RouteNotFound),
    }
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
        let services = ctx.state.services().ok_or(ApiError::NotReady)?;
        let model = text_model(services, r.model.as_deref())?;
        let _ = ctx.model.set(model.id.clone());
        let tokens = blocking(&ctx, model, move |model| {
            let tokenizer = model.handle.tokenizer();
            let ids = tokenizer
                .encode(&r.content, r.add_special, r.parse_special)
                .map_err(|e| EngineError::Model(e.to_string()))?;
            Ok(Ok(ids))
        })
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
        let services = ctx.state.services().ok_or(ApiError::NotReady)?;
        let model = text_model(services, r.model.as_deref())?;
        let _ = ctx.model.set(model.id.clone());
        let content = blocking(&ctx, model, move |model| {
            Ok(model
                .handle
                .tokenizer()
                .decode(&r.tokens)
                .map_err(|e| ApiError::bad("tokens", e.to_string())))
        })
        .await?;
        Ok(warp::reply::json(&json!({ "content": content })).into_response())
    })
    .await
}
