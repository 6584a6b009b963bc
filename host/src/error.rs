//! The API's errors and the one table that maps them to HTTP statuses and OpenAI error JSON.

use std::time::Duration;

use serde::Serialize;
use warp::Reply;
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;

use crate::plugins::{Fault, Refusal};

/// Every way an API request can fail. Messages are for clients: no paths, no internals.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// Malformed or invalid request.
    #[error("{message}")]
    BadRequest {
        /// What is wrong.
        message: String,
        /// The offending parameter.
        param: Option<&'static str>,
    },
    /// A request the host refuses before any plugin sees it, with a machine-readable code:
    /// a limit the host can check itself (counts, sizes), or ambiguous credentials.
    #[error("{message}")]
    Invalid {
        /// Machine-readable code, e.g. `too_many_inputs`.
        code: &'static str,
        /// The offending parameter.
        param: Option<&'static str>,
        /// What is wrong.
        message: String,
    },
    /// Prompt plus requested tokens exceed the model's context window.
    #[error(
        "this model's context window is {context} tokens, but the request needs {}: {prompt} in the prompt and {max_tokens} to generate",
        prompt + max_tokens
    )]
    ContextLength {
        /// The window.
        context: usize,
        /// Prompt tokens.
        prompt: usize,
        /// Requested completion tokens.
        max_tokens: usize,
        /// `messages` or `prompt`.
        param: &'static str,
    },
    /// The prompt alone is longer than the context window (found without tokenizing all
    /// of it).
    #[error("the prompt is longer than this model's context window of {context} tokens")]
    PromptTooLong {
        /// The window.
        context: usize,
        /// `messages` or `prompt`.
        param: &'static str,
    },
    /// No usable credential.
    #[error("{message}")]
    Unauthorized {
        /// Why.
        message: String,
        /// `missing_api_key` or `invalid_api_key`.
        code: String,
    },
    /// Authenticated, but without the route's scope.
    #[error("this API key lacks the `{scope}` scope required here")]
    Forbidden {
        /// The missing scope.
        scope: &'static str,
    },
    /// Unknown route.
    #[error("no such route")]
    RouteNotFound,
    /// Unknown model.
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    /// Method not allowed on this route.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// Body over the limit.
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge {
        /// The limit.
        limit: u64,
    },
    /// The body did not arrive in time.
    #[error("the request body did not arrive within {secs} s")]
    BodyTimeout {
        /// The limit, seconds.
        secs: u64,
    },
    /// Not JSON.
    #[error("the request body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    /// A policy plugin refused the request.
    #[error("{}", .0.message)]
    Refused(Refusal),
    /// The engine queue is full.
    #[error("the server is busy; retry shortly")]
    Busy,
    /// Models or plugins are still loading.
    #[error("the server is starting; retry shortly")]
    NotReady,
    /// A Realtime connection over the registry's limits.
    #[error("{}", if *.per_principal { "this key holds its most Realtime connections; close one first" } else { "the server holds its most Realtime connections; retry shortly" })]
    TooManyConnections {
        /// Whether the caller's own limit was met (else the server's).
        per_principal: bool,
    },
    /// A WebSocket route asked without an upgrade.
    #[error("this route speaks WebSocket: send an Upgrade: websocket request")]
    UpgradeRequired,
    /// A policy plugin faulted; the request was not processed (fail closed).
    #[error("a policy check could not be completed; the request was not processed")]
    PolicyFailure(Fault),
    /// The model failed.
    #[error("the model failed to process this request")]
    Engine,
    /// The server is shutting down and the grace period for requests in flight is over.
    #[error("the server is shutting down; retry on another instance")]
    ShuttingDown,
    /// The model's circuit breaker is open: it failed repeatedly and is left alone for a
    /// while.
    #[error("the model is unavailable after repeated failures; retry in {} s", retry_after.as_secs().max(1))]
    EngineUnavailable {
        /// When to retry.
        retry_after: Duration,
    },
    /// The request could not start within the queue timeout.
    #[error("the server is overloaded: the request could not start in time; retry shortly")]
    QueueTimeout,
    /// A bug in the host (a task that panicked); logged where it happened.
    #[error("an internal error occurred; the request was not completed")]
    Internal,
    /// An operator's plugin change was refused, or an admin request was malformed.
    #[error("{message}")]
    Admin {
        /// HTTP status, a 4xx.
        status: StatusCode,
        /// Machine-readable code.
        code: &'static str,
        /// The reason (file names only, never paths).
        message: String,
    },
}

/// The body of every error response.
#[derive(Debug, Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize)]
struct ErrorDetail<'a> {
    message: String,
    r#type: &'static str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

/// How long clients should wait before retrying a 429 or 503.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

impl ApiError {
    /// Shorthand for a 400 about one parameter.
    pub fn bad(param: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: Some(param),
        }
    }

    /// The table: status, OpenAI error type, code, and whether to add `Retry-After`.
    fn parts(&self) -> (StatusCode, &'static str, Option<&str>, bool) {
        use ApiError::*;
        match self {
            BadRequest { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                false,
            ),
            Invalid { code, .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some(code),
                false,
            ),
            ContextLength { .. } | PromptTooLong { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("context_length_exceeded"),
                false,
            ),
            Unauthorized { code, .. } => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                Some(code),
                false,
            ),
            Forbidden { .. } => (
                StatusCode::FORBIDDEN,
                "permission_error",
                Some("insufficient_scope"),
                false,
            ),
            RouteNotFound => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("not_found"),
                false,
            ),
            ModelNotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
                false,
            ),
            MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                Some("method_not_allowed"),
                false,
            ),
            PayloadTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("payload_too_large"),
                false,
            ),
            BodyTimeout { .. } => (
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                Some("request_timeout"),
                false,
            ),
            UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                Some("unsupported_media_type"),
                false,
            ),
            Refused(r) => {
                let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST);
                let kind = if status == StatusCode::UNAUTHORIZED {
                    "authentication_error"
                } else {
                    "invalid_request_error"
                };
                (status, kind, Some(&r.code), false)
            }
            TooManyConnections { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("too_many_connections"),
                true,
            ),
            UpgradeRequired => (
                StatusCode::UPGRADE_REQUIRED,
                "invalid_request_error",
                Some("upgrade_required"),
                false,
            ),
            Busy => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("queue_full"),
                true,
            ),
            NotReady => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("not_ready"),
                true,
            ),
            PolicyFailure(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("policy_unavailable"),
                true,
            ),
            Engine => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                Some("engine_error"),
                false,
            ),
            EngineUnavailable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("engine_unavailable"),
                true,
            ),
            QueueTimeout => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("queue_timeout"),
                true,
            ),
            ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("server_shutting_down"),
                true,
            ),
            Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                Some("internal_error"),
                false,
            ),
            Admin { status, code, .. } => (*status, "invalid_request_error", Some(code), false),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    fn param(&self) -> Option<&str> {
        match self {
            ApiError::BadRequest { param, .. } | ApiError::Invalid { param, .. } => *param,
            ApiError::ContextLength { param, .. } | ApiError::PromptTooLong { param, .. } => {
                Some(param)
            }
            ApiError::ModelNotFound(_) => Some("model"),
            _ => None,
        }
    }
}

impl ApiError {
    /// The OpenAI error body, also sent as the last event of a stream that fails.
    pub fn body(&self) -> serde_json::Value {
        let (_, kind, code, _) = self.parts();
        serde_json::to_value(ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                r#type: kind,
                param: self.param(),
                code,
            },
        })
        .unwrap_or_default()
    }
}

impl Reply for ApiError {
    fn into_response(self) -> Response {
        let (status, _, _, retry) = self.parts();
        let body = self.body();
        let mut response =
            warp::reply::with_status(warp::reply::json(&body), status).into_response();
        let headers = response.headers_mut();
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if retry {
            let after = match &self {
                ApiError::EngineUnavailable { retry_after } => retry_after.as_secs().max(1),
                _ => RETRY_AFTER.as_secs(),
            };
            headers.insert(header::RETRY_AFTER, HeaderValue::from(after));
        }
        response
    }
}

impl From<Fault> for ApiError {
    fn from(f: Fault) -> Self {
        ApiError::PolicyFailure(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(e: ApiError) -> (StatusCode, serde_json::Value, Response) {
        let response = e.into_response();
        let status = response.status();
        let (parts, body) = response.into_parts();
        let bytes = http_body_util::BodyExt::collect(body)
            .await
            .unwrap()
            .to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap(),
            Response::from_parts(parts, Default::default()),
        )
    }

    #[tokio::test]
    async fn errors_have_openai_shape() {
        let (status, json, _) = body(ApiError::bad("input", "input must not be empty")).await;
        assert_eq!(status, 400);
        assert_eq!(
            json,
            serde_json::json!({"error": {"message": "input must not be empty",
                "type": "invalid_request_error", "param": "input", "code": null}})
        );
    }

    #[tokio::test]
    async fn unauthorized_carries_www_authenticate_and_busy_retry_after() {
        let (_, json, r) = body(ApiError::Unauthorized {
            message: "no".into(),
            code: "missing_api_key".into(),
        })
        .await;
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
        assert_eq!(json["error"]["code"], "missing_api_key");
        let (status, _, r) = body(ApiError::Busy).await;
        assert_eq!(status, 429);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }

    #[tokio::test]
    async fn policy_failures_say_nothing_of_internals() {
        let fault = Fault {
            slot: crate::plugins::Slot::Auth,
            plugin: "secret-name".into(),
            kind: crate::plugins::FaultKind::Trap,
        };
        let (status, json, _) = body(ApiError::PolicyFailure(fault)).await;
        assert_eq!(status, 503);
        let text = json.to_string();
        assert!(
            !text.contains("secret-name") && !text.contains("trap"),
            "{text}"
        );
    }
}
