//! Route handlers. Authenticated routes go through [`guarded`]: the span and request id
//! around [`app::Flow`] (auth and scope, then the route's own work, then metrics through the
//! metrics policy), and the rendering of its errors.

use std::future::Future;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use tracing::Instrument;
use warp::Reply;
use warp::http::{HeaderValue, StatusCode};
use warp::reply::Response;

use super::REQUEST_ID;
use super::types::{
    EmbeddingItem, EmbeddingsRequest, EmbeddingsResponse, EmbeddingsUsage, EncodingFormat,
    ModelCard, ModelList, Vector, base64_vector,
};
use crate::AppState;
use crate::app;
use crate::error::ApiError;
use crate::plugins::RequestMeta;

/// What a guarded handler gets: the admitted request ([`app::Admitted`]).
pub type Ctx = app::Admitted;

/// Run `work` for an authenticated principal with `scope`, recording the outcome: the
/// request flow is [`app::Flow`]'s; this adds the span, the rendering of errors and the
/// request id header.
pub(super) async fn guarded<F, Fut>(
    state: Arc<AppState>,
    meta: RequestMeta,
    route: &'static str,
    scope: &'static str,
    work: F,
) -> Response
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = Result<Response, ApiError>>,
{
    let span = tracing::info_span!("http", request_id = %meta.request_id, route);
    async move {
        let request_id = meta.request_id.clone();
        let flow = match app::Flow::begin(&state, request_id.clone(), route) {
            Ok(flow) => flow,
            Err(e) => return with_request_id(e.into_response(), &request_id),
        };
        let (result, model, tenant) = match flow.admit(meta, scope).await {
            Err(e) => (Err(e), None, None),
            Ok(ctx) => {
                let tenant = ctx.principal.tenant.clone();
                let model = ctx.model.clone();
                let result = work(ctx).await;
                (result, model.get().cloned(), tenant)
            }
        };
        let response = result.unwrap_or_else(|e| {
            match &e {
                // Engine errors were logged where they happened, with their cause.
                ApiError::PolicyFailure(_) => tracing::warn!(error = %e, "request failed"),
                ApiError::Engine => {}
                _ => tracing::debug!(status = e.status().as_u16(), "request refused"),
            }
            e.into_response()
        });
        flow.finish(response.status().as_u16(), model, tenant).await;
        with_request_id(response, &request_id)
    }
    .instrument(span)
    .await
}

pub(super) fn with_request_id(mut response: Response, id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(id) {
        response.headers_mut().insert(REQUEST_ID, v);
    }
    response
}

/// How much body a request may send, and how fast.
#[derive(Debug, Clone, Copy)]
pub(super) struct BodyLimits {
    bytes: u64,
    secs: u64,
}

impl BodyLimits {
    /// The configured limits of API request bodies.
    pub(super) fn of(config: &crate::Config) -> Self {
        Self::with_bytes(config, config.body_limit_bytes)
    }

    /// The configured timeout, with another size limit.
    pub(super) fn with_bytes(config: &crate::Config, bytes: u64) -> Self {
        Self {
            bytes,
            secs: config.body_timeout_secs,
        }
    }
}

/// Read a body within `limits`, streaming or not: at most `body_limit_bytes`, arriving
/// whole within `body_timeout_secs` (a client that trickles its body is answered 408
/// rather than holding a connection and a task for as long as it likes).
pub(super) async fn read_body<S, B>(
    meta: &RequestMeta,
    body: S,
    limits: BodyLimits,
) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let declared = meta
        .headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<u64>().ok());
    read_declared_body(declared, body, limits).await
}

/// [`read_body`] for a body that declared `declared` bytes (its `Content-Length`).
pub(super) async fn read_declared_body<S, B>(
    declared: Option<u64>,
    body: S,
    limits: BodyLimits,
) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let secs = limits.secs;
    tokio::time::timeout(
        std::time::Duration::from_secs(secs),
        read_body_within(declared, body, limits.bytes),
    )
    .await
    .unwrap_or(Err(ApiError::BodyTimeout { secs }))
}

async fn read_body_within<S, B>(
    declared: Option<u64>,
    body: S,
    limit: u64,
) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0) as usize);
    let mut body = std::pin::pin!(body);
    while let Some(chunk) = body.next().await {
        let mut chunk =
            chunk.map_err(|_| ApiError::bad("body", "the request body could not be read"))?;
        if buf.len() as u64 + chunk.remaining() as u64 > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            buf.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(buf.freeze())
}

/// Most JSON values a request body may hold: enough for 2,048 embedding inputs, 1,024 chat
/// messages or a prompt of the whole context window as token ids, many times over.
pub const MAX_JSON_VALUES: usize = 1 << 16;

/// Count the values of a JSON document, stopping with an error past `limit` (or at the
/// first syntax error, which the real parse then reports).
fn count_json_values(body: &[u8], limit: usize) -> Result<usize, serde_json::Error> {
    use serde::de::{DeserializeSeed, Deserializer, Error, MapAccess, SeqAccess, Visitor};

    struct Count<'a> {
        seen: &'a mut usize,
        limit: usize,
    }

    impl Count<'_> {
        fn one<E: Error>(self) -> Result<(), E> {
            *self.seen += 1;
            if *self.seen > self.limit {
                return Err(E::custom("too many values"));
            }
            Ok(())
        }

        fn again(&mut self) -> Count<'_> {
            Count {
                seen: self.seen,
                limit: self.limit,
            }
        }
    }

    impl<'de> DeserializeSeed<'de> for Count<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Count<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E: Error>(self, _: bool) -> Result<(), E> {
            self.one()
        }
        fn visit_i64<E: Error>(self, _: i64) -> Result<(), E> {
            self.one()
        }
        fn visit_u64<E: Error>(self, _: u64) -> Result<(), E> {
            self.one()
        }
        fn visit_f64<E: Error>(self, _: f64) -> Result<(), E> {
            self.one()
        }
        fn visit_str<E: Error>(self, _: &str) -> Result<(), E> {
            self.one()
        }
        fn visit_unit<E: Error>(self) -> Result<(), E> {
            self.one()
        }
        fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
            self.again().one()?;
            while seq.next_element_seed(self.again())?.is_some() {}
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
            self.again().one()?;
            while map.next_key_seed(self.again())?.is_some() {
                map.next_value_seed(self.again())?;
            }
            Ok(())
        }
    }

    let mut seen = 0;
    let mut de = serde_json::Deserializer::from_slice(body);
    Count {
        seen: &mut seen,
        limit,
    }
    .deserialize(&mut de)?;
    Ok(seen)
}

/// Parse a JSON body; anything that is not a JSON object of the right shape is a 400.
pub(super) fn parse_json<T: serde::de::DeserializeOwned>(
    meta: &RequestMeta,
    body: &[u8],
) -> Result<T, ApiError> {
    let content_type = meta
        .headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.as_str());
    if let Some(ct) = content_type {
        let essence = ct.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(ApiError::UnsupportedMediaType);
        }
    }
    if body.is_empty() {
        return Err(ApiError::BadRequest {
            message: "the request body is empty".into(),
            param: None,
        });
    }
    // A JSON value costs tens of bytes in memory however few it takes in the body (`[1,1,`
    // is two bytes a value): count them first, without building any, so that a body is
    // parsed only if it stays within a small multiple of its own size.
    if count_json_values(body, MAX_JSON_VALUES).is_err() {
        return Err(ApiError::Invalid {
            code: "too_many_values",
            param: None,
            message: format!(
                "the request body holds more than {MAX_JSON_VALUES} JSON values (array \
                 elements, object members, scalars); no request needs that many"
            ),
        });
    }
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest {
        message: format!("invalid request body: {e}"),
        param: None,
    })
}

/// `POST /v1/embeddings`.
pub async fn embeddings<S, B>(state: Arc<AppState>, meta: RequestMeta, body: S) -> Response
where
    S: Stream<Item = Result<B, warp::Error>> + Send,
    B: Buf,
{
    let limit = BodyLimits::of(&state.config);
    guarded(
        state,
        meta,
        "/v1/embeddings",
        "inference",
        |ctx| async move {
            let body = read_body(&ctx.meta, body, limit).await?;
            let mut request: EmbeddingsRequest = parse_json(&ctx.meta, &body)?;
            drop(body);
            let encoding = request.encoding()?;
            let inputs = request.take_inputs()?;
            let embedded = ctx.embed(&request.model, inputs).await?;
            let embeddings = embedded.embeddings;
            let prompt_tokens = embeddings.iter().map(|e| e.tokens).sum();
            let data = embeddings
                .into_iter()
                .enumerate()
                .map(|(index, e)| EmbeddingItem {
                    object: "embedding",
                    index,
                    embedding: match encoding {
                        EncodingFormat::Float => Vector::Float(e.vector),
                        EncodingFormat::Base64 => Vector::Base64(base64_vector(&e.vector)),
                    },
                })
                .collect();
            let response = EmbeddingsResponse {
                object: "list",
                data,
                model: embedded.model,
                usage: EmbeddingsUsage {
                    prompt_tokens,
                    total_tokens: prompt_tokens,
                },
            };
            Ok(warp::reply::json(&response).into_response())
        },
    )
    .await
}

/// `GET /v1/models`: ids only.
pub async fn models(state: Arc<AppState>, meta: RequestMeta) -> Response {
    guarded(state, meta, "/v1/models", "inference", |ctx| async move {
        let (ids, created) = ctx.models()?;
        let data = ids
            .into_iter()
            .map(|id| ModelCard {
                id,
                object: "model",
                created,
                owned_by: "warden",
            })
            .collect();
        Ok(warp::reply::json(&ModelList {
            object: "list",
            data,
        })
        .into_response())
    })
    .await
}

/// `GET /v1/metrics`: the metrics exposition, limited to the series the metrics
/// policy lets this caller see. Needs scope `metrics`.
pub async fn metrics(state: Arc<AppState>, meta: RequestMeta) -> Response {
    guarded(state, meta, "/v1/metrics", "metrics", |ctx| async move {
        let text = ctx.visible_metrics().await;
        // OpenMetrics for scrapers that ask for it (Prometheus does), text 0.0.4 otherwise.
        let openmetrics = ctx.meta.headers.iter().any(|(name, value)| {
            name == "accept" && value.contains("application/openmetrics-text")
        });
        let (text, media) = if openmetrics {
            (text, crate::metrics::OPENMETRICS)
        } else {
            (
                crate::metrics::to_prometheus_text(&text),
                crate::metrics::PROMETHEUS_TEXT,
            )
        };
        Ok(warp::reply::with_header(text, "content-type", media).into_response())
    })
    .await
}

/// `GET /health`: the process is up. No auth, nothing about the deployment.
pub fn health() -> Response {
    warp::reply::json(&serde_json::json!({"status": "ok"})).into_response()
}

/// `GET /ready`: 200 once models and plugins are loaded, 503 before.
pub fn ready(state: Arc<AppState>) -> Response {
    let (status, text) = match (state.phase(), state.services()) {
        (crate::Phase::Serving, Some(s)) if s.any_breaker_open() => {
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        }
        (crate::Phase::Serving, Some(_)) => (StatusCode::OK, "ready"),
        (crate::Phase::Serving, None) => (StatusCode::SERVICE_UNAVAILABLE, "loading"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
    };
    warp::reply::with_status(
        warp::reply::json(&serde_json::json!({"status": text})),
        status,
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_values_are_counted_without_being_built() {
        assert_eq!(
            count_json_values(br#"{"a": [1, "x", null, {"b": true}]}"#, 100).unwrap(),
            9,
            "objects, keys, arrays and scalars each count"
        );
        assert!(count_json_values(b"[1,1,1,1]", 4).is_err());
        assert_eq!(count_json_values(b"[1,1,1]", 4).unwrap(), 4);
        let many = format!("[{}1]", "1,".repeat(MAX_JSON_VALUES));
        assert!(count_json_values(many.as_bytes(), MAX_JSON_VALUES).is_err());
    }
}
