//! A generation from admission to its last token, as domain events: the host's bounds on
//! the prompt, the sanitizer's input check, the chat template and tokenizer, the engine's
//! queue under the circuit breaker, and the sanitizer's output filter over every piece of
//! text. A transport renders the [`Step`]s (HTTP as one JSON body or as server-sent events;
//! a WebSocket as events), so all transports serve the same text under the same policies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::watch;
use tracing::Instrument;

use super::Admitted;
use super::engines::{engine_error, engine_permit, settle};
use crate::breaker::Permit;
use crate::engine::{
    EngineError, FinishReason, GenerateEvent, GenerateRequest, PromptInput, SamplingParams,
    TemplateMessage,
};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::plugins::{
    ChatMessage, Checked, InferenceInput, InputKind, OutputFilter, Payload, SanitizerSession,
};

/// What the client asked to continue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GenerationInput {
    /// A conversation, for the chat template.
    Messages(Vec<ChatMessage>),
    /// Text.
    Text(String),
    /// The model's own token ids.
    Tokens(Vec<u32>),
}

/// One generation a client asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    /// Chat or completion: what the sanitizer is told, and which parameter errors name.
    pub kind: InputKind,
    /// The model, by id or alias.
    pub model: String,
    /// The prompt.
    pub input: GenerationInput,
    /// Most tokens to generate; `None` means up to the context window.
    pub max_tokens: Option<usize>,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
}

impl GenerationRequest {
    /// The request parameter the prompt came in, as errors name it.
    fn param(&self) -> &'static str {
        match self.kind {
            InputKind::Chat => "messages",
            _ => "prompt",
        }
    }
}

/// One step of a generation, after the output filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Filtered text (possibly empty: the filter is holding it back).
    Text(String),
    /// The end, with the filter's held-back rest.
    Done {
        /// Text the filter held back until the end.
        rest: String,
        /// Why the generation ended.
        reason: FinishReason,
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// Of those, the tokens taken from a kept cache (a shared prefix).
        cached_tokens: usize,
        /// Tokens generated.
        completion_tokens: usize,
    },
}

/// A whole answer, as [`Generation::collect`] gathers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    /// The filtered text.
    pub text: String,
    /// Why the generation ended.
    pub reason: FinishReason,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Of those, the tokens taken from a kept cache (a shared prefix).
    pub cached_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
}

/// A generation in progress: the engine's events through the output filter. Dropping it
/// drops the engine's event channel, which stops the generation at its next token.
pub struct Generation {
    events: UnboundedReceiver<GenerateEvent>,
    session: SanitizerSession,
    filter: OutputFilter,
    request_id: Arc<str>,
    model: String,
    metrics: Arc<Metrics>,
    phase: watch::Receiver<super::Phase>,
    /// When the engine accepted the generation.
    started: Instant,
    /// When its first token arrived.
    first_token: Option<Instant>,
    /// The circuit breaker's leave, settled when the generation ends.
    permit: Option<Permit>,
    /// Whether the engine took the request from its queue.
    admitted: bool,
    /// How long the request may wait in the queue.
    queue_timeout: Duration,
}

impl Admitted {
    /// A sanitizer session for this request, and its verdict on `input`.
    async fn sanitize(
        &self,
        input: InferenceInput,
    ) -> Result<(SanitizerSession, Checked), ApiError> {
        let session = self
            .plugins
            .sanitizer_session(&self.meta.request_id)
            .instrument(tracing::debug_span!("plugin.sanitizer"))
            .await?;
        let checked = session
            .check_input(input)
            .instrument(tracing::debug_span!("plugin.sanitizer"))
            .await?
            .map_err(ApiError::Refused)?;
        Ok((session, checked))
    }

    /// The sanitizer's verdict on one chat message before it joins a conversation (a
    /// Realtime item): the message to keep, rewritten if the plugin rewrote it, or why not.
    pub async fn check_message(&self, message: ChatMessage) -> Result<ChatMessage, ApiError> {
        let model = self.text_model(None)?;
        let (_, checked) = self
            .sanitize(InferenceInput {
                kind: InputKind::Chat,
                model: model.id.clone(),
                principal: self.principal.clone(),
                payload: Payload::Messages(vec![message]),
                max_tokens: None,
            })
            .await?;
        match checked.into_payload() {
            Payload::Messages(mut m) if m.len() == 1 => Ok(m.remove(0)),
            // The host holds a rewrite to the original's shape; this cannot happen.
            _ => Err(ApiError::bad(
                "item",
                "the sanitizer changed the item's shape",
            )),
        }
    }

    /// Check, prepare and queue a generation: the host's bounds (more ids than the window,
    /// or more text than the window's tokens can stand for, refused before any plugin or
    /// tokenizer runs), the sanitizer's input check, the template and tokenizer, the window
    /// again with `max_tokens`, the breaker, the engine's queue.
    pub async fn generate(&self, request: GenerationRequest) -> Result<Generation, ApiError> {
        let model = self.text_model(Some(&request.model))?;
        let param = request.param();
        let context = model.context_length();
        let text_bytes = match &request.input {
            GenerationInput::Messages(m) => m.iter().map(|m| m.content.len()).sum(),
            GenerationInput::Text(t) => t.len(),
            GenerationInput::Tokens(_) => 0,
        };
        if let GenerationInput::Tokens(ids) = &request.input
            && ids.len() > context
        {
            return Err(ApiError::ContextLength {
                context,
                prompt: ids.len(),
                max_tokens: request.max_tokens.unwrap_or(0),
                param,
            });
        }
        if text_bytes > context.saturating_mul(model.max_token_bytes()) {
            return Err(ApiError::PromptTooLong { context, param });
        }
        // Token ids are shown to the sanitizer as their text, and kept to be served as they
        // are if it passes them. Text is moved, never copied, on its way to the plugin.
        let (payload, ids) = match request.input {
            GenerationInput::Messages(m) => (Payload::Messages(m), None),
            GenerationInput::Text(t) => (Payload::Texts(vec![t]), None),
            GenerationInput::Tokens(ids) => {
                // Detokenizing grows with the body (up to `body_limit_bytes`): off the reactor.
                let (text, ids) = self
                    .on_text_model(model, param, move |m| Ok((m.detokenize(&ids)?, ids)))
                    .await?;
                (Payload::Texts(vec![text]), Some(ids))
            }
        };
        let (session, checked) = self
            .sanitize(InferenceInput {
                kind: request.kind,
                model: model.id.clone(),
                principal: self.principal.clone(),
                payload,
                max_tokens: request
                    .max_tokens
                    .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
            })
            .await?;
        let input = match (checked, ids) {
            (Checked::Unchanged(_), Some(ids)) => PromptInput::Tokens(ids),
            (checked, _) => match checked.into_payload() {
                Payload::Messages(messages) => PromptInput::Messages(
                    messages
                        .into_iter()
                        .map(|m| TemplateMessage {
                            role: m.role,
                            content: m.content,
                        })
                        .collect(),
                ),
                Payload::Texts(texts) => PromptInput::Text(texts.concat()),
            },
        };
        let prompt = self
            .on_text_model(model, param, move |m| m.prompt(input))
            .await?;
        if prompt.is_empty() {
            return Err(ApiError::bad(
                param,
                "the prompt is empty after sanitization",
            ));
        }
        let max_tokens = match request.max_tokens {
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

        let mut permit = engine_permit(&self.state, &model.id)?;
        let events = model.submit(GenerateRequest {
            prompt,
            max_tokens,
            sampling: request.sampling,
            stop: request.stop,
            span: tracing::Span::current(),
            cache_scope: match &self.principal.tenant {
                Some(tenant) => format!("tenant:{tenant}"),
                None => format!("principal:{}", self.principal.id),
            },
        });
        if let Err(e) = &events {
            settle(permit.take(), Err(e));
        }
        let events = events.map_err(|e| self.engine_failed(&model.id, e))?;
        let filter = session.output_filter(request.kind).await?;
        Ok(Generation {
            events,
            session,
            filter,
            request_id: self.meta.request_id.clone(),
            model: model.id.clone(),
            metrics: self.state.metrics.clone(),
            phase: self.state.phase_watch(),
            started: Instant::now(),
            first_token: None,
            permit,
            admitted: false,
            queue_timeout: Duration::from_millis(self.state.config.engine.queue_timeout_ms),
        })
    }
}

impl Generation {
    /// The id of the model generating.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The next step. Once a shutdown's grace period is over, the generation ends with
    /// [`ApiError::ShuttingDown`].
    pub async fn next(&mut self) -> Result<Step, ApiError> {
        let mut phase = self.phase.clone();
        tokio::select! {
            step = self.advance() => step,
            () = super::aborted(&mut phase) => Err(ApiError::ShuttingDown),
        }
    }

    /// Every step to the end, as one answer.
    pub async fn collect(mut self) -> Result<Completed, ApiError> {
        let mut text = String::new();
        loop {
            match self.next().await? {
                Step::Text(t) => text.push_str(&t),
                Step::Done {
                    rest,
                    reason,
                    prompt_tokens,
                    cached_tokens,
                    completion_tokens,
                } => {
                    text.push_str(&rest);
                    return Ok(Completed {
                        text,
                        reason,
                        prompt_tokens,
                        cached_tokens,
                        completion_tokens,
                    });
                }
            }
        }
    }

    fn failed(&self, e: EngineError) -> ApiError {
        engine_error(e, &self.request_id, &self.model, &self.metrics)
    }

    async fn advance(&mut self) -> Result<Step, ApiError> {
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
                cached_tokens,
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
                    cached_tokens,
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
