//! Calling a model from a request: the circuit breaker's leave, the model lookup that
//! records the model for metrics, tokenizer and template work off the reactor, and what an
//! engine failure becomes for the client (logged and counted once, here).

use std::sync::Arc;

use tracing::Instrument;

use super::Admitted;
use crate::AppState;
use crate::breaker::Permit;
use crate::engine::{EmbeddingsHandle, EngineError, PromptError, TextModel};
use crate::error::ApiError;
use crate::metrics::Metrics;

/// The API error for an engine failure. A real failure (not a full queue) is logged here,
/// once, with the request id, and counted; the client gets a generic 500.
pub(crate) fn engine_error(
    e: EngineError,
    request_id: &str,
    model: &str,
    metrics: &Metrics,
) -> ApiError {
    match e {
        EngineError::QueueFull => ApiError::Busy,
        EngineError::QueueTimeout => {
            tracing::warn!(request_id, model, "request timed out in the engine queue");
            metrics.record_queue_timeout(model);
            ApiError::QueueTimeout
        }
        e => {
            tracing::error!(request_id, model, error = %e, "engine error");
            metrics.record_engine_error(model);
            ApiError::Engine
        }
    }
}

/// Leave from `model`'s circuit breaker to call its engine, or 503 at once.
pub(crate) fn engine_permit(state: &AppState, model: &str) -> Result<Option<Permit>, ApiError> {
    let Some(breaker) = state.services().and_then(|s| s.breaker(model)) else {
        return Ok(None);
    };
    breaker
        .admit()
        .map(Some)
        .map_err(|retry_after| ApiError::EngineUnavailable { retry_after })
}

/// Tell the breaker how the engine did: only the model's own failures count against it.
pub(crate) fn settle(permit: Option<Permit>, result: Result<(), &EngineError>) {
    let Some(permit) = permit else { return };
    match result {
        Ok(_) => permit.succeeded(),
        Err(EngineError::Model(_) | EngineError::Stopped) => permit.failed(),
        Err(EngineError::QueueFull | EngineError::QueueTimeout) => drop(permit),
    }
}

impl Admitted {
    /// The text model `name` names (id or alias), or the default one when it names none;
    /// recorded as the request's model for metrics.
    pub fn text_model(&self, name: Option<&str>) -> Result<&TextModel, ApiError> {
        let services = self.state.services().ok_or(ApiError::NotReady)?;
        let model = match name {
            Some(n) => services
                .text_model(n)
                .ok_or_else(|| ApiError::ModelNotFound(n.to_string()))?,
            None => services
                .default_text_model()
                .ok_or(ApiError::RouteNotFound)?,
        };
        let _ = self.model.set(model.id.clone());
        Ok(model)
    }

    /// The served models' ids, and when they were loaded (Unix seconds).
    pub fn models(&self) -> Result<(Vec<String>, u64), ApiError> {
        let services = self.state.services().ok_or(ApiError::NotReady)?;
        Ok((
            services.model_ids().map(str::to_string).collect(),
            services.loaded_at,
        ))
    }

    /// The metrics exposition (OpenMetrics text), limited to the series the metrics policy
    /// lets this principal see.
    pub async fn visible_metrics(&self) -> String {
        let visibility = self
            .plugins
            .visible_series(&self.principal, &self.meta.request_id)
            .instrument(tracing::debug_span!(
                "plugin.metrics_policy",
                call = "visible-series"
            ))
            .await;
        self.state.metrics.encode_visible(&visibility)
    }

    /// The embedding model `name` names (id or alias), recorded for metrics.
    pub fn embedding_model(&self, name: &str) -> Result<&EmbeddingsHandle, ApiError> {
        let services = self.state.services().ok_or(ApiError::NotReady)?;
        let model = services
            .embedding_model(name)
            .ok_or_else(|| ApiError::ModelNotFound(name.to_string()))?;
        let _ = self.model.set(model.id().to_string());
        Ok(model)
    }

    /// An engine failure on `model`, logged and counted.
    pub(crate) fn engine_failed(&self, model: &str, e: EngineError) -> ApiError {
        engine_error(e, &self.meta.request_id, model, &self.state.metrics)
    }

    /// Run tokenizer or template work of `model` on a blocking thread. A prompt error that
    /// is the client's becomes a 400 naming `param`; the model's own is logged and counted.
    pub(crate) async fn on_text_model<T, F>(
        &self,
        model: &TextModel,
        param: &'static str,
        f: F,
    ) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&TextModel) -> Result<T, PromptError> + Send + 'static,
    {
        let state: Arc<AppState> = self.state.clone();
        let id = model.id.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let model = state
                .services()
                .and_then(|s| s.text_model(&id))
                .ok_or(EngineError::Stopped)?;
            f(model)
        })
        .await
        .unwrap_or_else(|_| Err(EngineError::Model("the tokenizer panicked".into()).into()));
        outcome.map_err(|e| match e {
            PromptError::Engine(e) => self.engine_failed(&model.id, e),
            PromptError::TooLong => ApiError::PromptTooLong {
                context: model.context_length(),
                param,
            },
            e => ApiError::bad(param, e.to_string()),
        })
    }

    /// `text` as the named (or default) text model's token ids.
    pub async fn tokenize(
        &self,
        model: Option<&str>,
        text: String,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, ApiError> {
        let model = self.text_model(model)?;
        self.on_text_model(model, "content", move |m| {
            Ok(m.tokenize(&text, add_special, parse_special)?)
        })
        .await
    }

    /// The text of token ids of the named (or default) text model.
    pub async fn detokenize(&self, model: Option<&str>, ids: Vec<u32>) -> Result<String, ApiError> {
        let model = self.text_model(model)?;
        self.on_text_model(model, "tokens", move |m| m.detokenize(&ids))
            .await
    }
}
