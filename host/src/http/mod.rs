//! warp only: filters, handlers, request/response models. Handlers see the plugin
//! registry and engine handles through [`AppState`]; no wasmtime or candle types here.

mod admin;
#[doc(hidden)]
pub mod fuzz;
mod generation;
mod handlers;
mod params;
mod realtime;
pub mod serve;
mod types;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use warp::http::{HeaderMap, Method};
use warp::path::FullPath;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::AppState;
use crate::error::ApiError;
use crate::plugins::RequestMeta;

pub use admin::routes as admin_routes;
pub use types::base64_vector;

/// Header carrying the request id both ways.
pub const REQUEST_ID: &str = "x-request-id";

/// The client's request id if it is sane (1–128 of `[A-Za-z0-9._-]`), or a new one.
fn request_id(headers: &HeaderMap) -> Arc<str> {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 128
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
        .map(Arc::from)
        .unwrap_or_else(|| Arc::from(uuid::Uuid::new_v4().simple().to_string()))
}

fn meta() -> impl Filter<Extract = (RequestMeta,), Error = Infallible> + Clone {
    let peer = warp::ext::optional::<serve::ClientAddr>()
        .and(warp::addr::remote())
        .map(
            |ours: Option<serve::ClientAddr>, warps: Option<SocketAddr>| {
                ours.map(|a| a.0).or(warps)
            },
        );
    warp::method()
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .and(peer)
        .map(
            |method: Method, path: FullPath, headers: HeaderMap, addr: Option<SocketAddr>| {
                RequestMeta {
                    request_id: request_id(&headers),
                    method: method.as_str().to_string(),
                    path: path.as_str().to_string(),
                    headers: headers
                        .iter()
                        .filter_map(|(k, v)| {
                            Some((k.as_str().to_string(), v.to_str().ok()?.to_string()))
                        })
                        .collect(),
                    client_addr: addr,
                }
            },
        )
}

/// All routes, with every rejection turned into an OpenAI-style error.
pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let with_state = warp::any().map(move || state.clone());
    let embeddings = warp::path!("v1" / "embeddings")
        .and(warp::post())
        .and(with_state.clone())
        .and(meta())
        .and(warp::body::stream())
        .then(handlers::embeddings);
    let models = warp::path!("v1" / "models")
        .and(warp::get())
        .and(with_state.clone())
        .and(meta())
        .then(handlers::models);
    let post = |route: warp::filters::BoxedFilter<()>| {
        route
            .and(warp::post())
            .and(with_state.clone())
            .and(meta())
            .and(warp::body::stream())
    };
    let chat = post(warp::path!("v1" / "chat" / "completions").boxed()).then(generation::chat);
    let completions = post(warp::path!("v1" / "completions").boxed()).then(generation::completions);
    let tokenize = post(warp::path!("tokenize").boxed()).then(generation::tokenize);
    let detokenize = post(warp::path!("detokenize").boxed()).then(generation::detokenize);
    let metrics = warp::path!("v1" / "metrics")
        .and(warp::get())
        .and(with_state.clone())
        .and(meta())
        .then(handlers::metrics);
    // Without upgrade headers the route still answers, with 426 and an error body.
    let realtime = warp::path!("v1" / "realtime")
        .and(warp::get())
        .and(with_state.clone())
        .and(meta())
        .and(warp::query::<std::collections::HashMap<String, String>>())
        .and(realtime::upgrade_request())
        .then(realtime::upgrade);
    let health = warp::path!("health").and(warp::get()).map(handlers::health);
    let ready = warp::path!("ready")
        .and(warp::get())
        .and(with_state)
        .map(handlers::ready);
    embeddings
        .or(chat)
        .unify()
        .or(completions)
        .unify()
        .or(tokenize)
        .unify()
        .or(detokenize)
        .unify()
        .or(models)
        .unify()
        .or(metrics)
        .unify()
        .or(realtime)
        .unify()
        .or(health)
        .unify()
        .or(ready)
        .unify()
        .recover(rejection)
        .unify()
}

/// Map warp's rejections (no route, wrong method) to the API's errors.
async fn rejection(r: Rejection) -> Result<Response, Infallible> {
    let error = if r.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::MethodNotAllowed
    } else {
        ApiError::RouteNotFound
    };
    Ok(error.into_response())
}
