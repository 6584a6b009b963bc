//! The admin API, on its own listener: inspect, swap and roll back plugins, reload the
//! configuration, read the audit trail. The host authenticates it with `admin_token`
//! itself (constant-time compare), never through the swappable auth plugin, so a broken
//! auth plugin can neither lock operators out nor grant admin rights.

use std::path::{Component, Path};
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;
use warp::http::{HeaderMap, StatusCode};
use warp::reply::Response;
use warp::{Filter, Reply};

use crate::AppState;
use crate::app::admin::{self, admin_error, refused, slot};
use crate::error::ApiError;
use crate::plugins::{PluginSource, Slot};

/// Largest component accepted by `PUT /admin/plugins/{slot}`.
pub const MAX_COMPONENT_BYTES: u64 = 64 << 20;

/// The admin token check, on this request's `Authorization` values.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let values: Vec<&str> = headers
        .get_all(warp::http::header::AUTHORIZATION)
        .iter()
        .map(|v| v.to_str().unwrap_or(""))
        .collect();
    admin::authorize(state, &values)
}

fn ok(value: serde_json::Value) -> Response {
    warp::reply::json(&value).into_response()
}

/// Parse the optional plugin configuration: a JSON object, as text.
fn plugin_config(value: Option<serde_json::Value>) -> Result<Option<String>, ApiError> {
    match value {
        None => Ok(None),
        Some(v @ serde_json::Value::Object(_)) => Ok(Some(v.to_string())),
        Some(_) => Err(admin_error(
            StatusCode::BAD_REQUEST,
            "invalid_config",
            "the plugin configuration must be a JSON object",
        )),
    }
}

fn sha256_param(value: Option<&str>, what: &str) -> Result<String, ApiError> {
    match value.map(str::trim) {
        Some(v) if v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(v.to_ascii_lowercase())
        }
        Some(_) => Err(admin_error(
            StatusCode::BAD_REQUEST,
            "invalid_sha256",
            format!("{what} must be 64 hexadecimal digits"),
        )),
        None => Err(admin_error(
            StatusCode::BAD_REQUEST,
            "missing_sha256",
            format!("{what} is required: the expected sha256 of the component"),
        )),
    }
}

/// A plugin name an operator gave: letters, digits, `.`, `_`, `-`, at most 64.
fn plugin_name(name: Option<&str>, sha256: &str) -> Result<String, ApiError> {
    match name {
        None => Ok(format!("uploaded-{}", &sha256[..12])),
        Some(n)
            if !n.is_empty()
                && n.len() <= 64
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) =>
        {
            Ok(n.to_string())
        }
        Some(_) => Err(admin_error(
            StatusCode::BAD_REQUEST,
            "invalid_plugin_name",
            "X-Plugin-Name must be 1-64 of letters, digits, `.`, `_` and `-`",
        )),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileChange {
    path: String,
    sha256: Option<String>,
    config: Option<serde_json::Value>,
}

/// What a `PUT /admin/plugins/{slot}` asks for, parsed and validated, before anything is
/// read or loaded.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A component uploaded as the body.
    Upload {
        /// Its expected sha256 (`X-Plugin-Sha256`).
        sha256: String,
        /// Its name (`X-Plugin-Name`, or one made from the digest).
        name: String,
        /// Its configuration (`X-Plugin-Config`), if given.
        config: Option<String>,
    },
    /// A file in the plugin directory.
    File {
        /// The path relative to the plugin directory: normal components only.
        path: std::path::PathBuf,
        /// Its expected sha256.
        sha256: String,
        /// Its configuration, if given.
        config: Option<String>,
    },
}

/// Parse a `PUT` request's headers and body into a [`Change`]; every malformed part is a
/// 4xx with a code.
pub fn parse_change(headers: &HeaderMap, body: &[u8]) -> Result<Change, ApiError> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let content_type = header("content-type").unwrap_or_default();
    let media = content_type.split(';').next().unwrap_or_default().trim();
    if media.eq_ignore_ascii_case("application/wasm") {
        let sha256 = sha256_param(header("x-plugin-sha256"), "X-Plugin-Sha256")?;
        let config = match header("x-plugin-config") {
            None => None,
            Some(text) => plugin_config(Some(serde_json::from_str(text).map_err(|_| {
                admin_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_config",
                    "X-Plugin-Config must be a JSON object",
                )
            })?))?,
        };
        let name = plugin_name(header("x-plugin-name"), &sha256)?;
        return Ok(Change::Upload {
            sha256,
            name,
            config,
        });
    }
    if !media.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::Admin {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: "unsupported_media_type",
            message: "send the component as application/wasm, or application/json naming a \
                      file in the plugin directory"
                .into(),
        });
    }
    let change: FileChange = serde_json::from_slice(body).map_err(|e| {
        admin_error(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("invalid body: {e}"),
        )
    })?;
    let sha256 = sha256_param(change.sha256.as_deref(), "sha256")?;
    let relative = Path::new(&change.path);
    if change.path.is_empty()
        || !relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(admin_error(
            StatusCode::BAD_REQUEST,
            "invalid_path",
            "path must be relative to the plugin directory, without `..`",
        ));
    }
    Ok(Change::File {
        path: relative.to_path_buf(),
        sha256,
        config: plugin_config(change.config)?,
    })
}

/// The source a `PUT` names: uploaded bytes or a file under the plugin directory.
fn change_source(
    state: &AppState,
    slot: Slot,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<PluginSource, ApiError> {
    let services = state.services().ok_or(ApiError::NotReady)?;
    match parse_change(headers, &body)? {
        Change::Upload {
            sha256,
            name,
            config,
        } => {
            Ok(services
                .plugins
                .source_for(slot, name, body.to_vec().into(), Some(sha256), config))
        }
        Change::File {
            path,
            sha256,
            config,
        } => {
            let file = PluginSource::from_file(
                slot,
                &state.config.plugin_dir.join(path),
                Some(sha256.clone()),
                String::new(),
                Default::default(),
            )
            .map_err(refused)?;
            Ok(services
                .plugins
                .source_for(slot, file.name, file.bytes, Some(sha256), config))
        }
    }
}

async fn list(state: Arc<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    Ok(ok(json!({"plugins": state.plugin_status()?})))
}

async fn audit(state: Arc<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    Ok(ok(json!({"events": state.plugin_audit()?})))
}

async fn put<S, B>(
    name: String,
    state: Arc<AppState>,
    headers: HeaderMap,
    body: S,
) -> Result<Response, ApiError>
where
    S: futures_util::Stream<Item = Result<B, warp::Error>>,
    B: bytes::Buf,
{
    // Authorized before a byte of the body is read: an unauthenticated client cannot make
    // the server buffer an upload, nor hold a connection by trickling one.
    authorize(&state, &headers)?;
    let slot = slot(&name)?;
    let declared = headers
        .get(warp::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_none() {
        return Err(length_required());
    }
    let limits = super::handlers::BodyLimits::with_bytes(&state.config, MAX_COMPONENT_BYTES);
    let body = super::handlers::read_declared_body(declared, body, limits).await?;
    let status = state
        .change_plugin(move |state| change_source(state, slot, &headers, body))
        .await?;
    Ok(ok(json!({"plugin": status})))
}

async fn rollback(
    name: String,
    state: Arc<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let status = state.roll_back(slot(&name)?).await?;
    Ok(ok(json!({"plugin": status})))
}

async fn reload(state: Arc<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let report = state.reload_plugins().await?;
    Ok(ok(serde_json::to_value(report).unwrap_or_default()))
}

fn respond(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(|e| {
        if e.status() != StatusCode::UNAUTHORIZED {
            tracing::info!(status = e.status().as_u16(), error = %e, "admin request refused");
        }
        e.into_response()
    })
}

/// The admin routes.
pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = std::convert::Infallible> + Clone {
    let with_state = warp::any().map(move || state.clone());
    let headers = warp::header::headers_cloned();
    let list = warp::path!("admin" / "plugins")
        .and(warp::get())
        .and(with_state.clone())
        .and(headers)
        .then(list)
        .map(respond);
    let audit = warp::path!("admin" / "audit")
        .and(warp::get())
        .and(with_state.clone())
        .and(headers)
        .then(audit)
        .map(respond);
    let put = warp::path!("admin" / "plugins" / String)
        .and(warp::put())
        .and(with_state.clone())
        .and(headers)
        .and(warp::body::stream())
        .then(put)
        .map(respond);
    let rollback = warp::path!("admin" / "plugins" / String / "rollback")
        .and(warp::post())
        .and(with_state.clone())
        .and(headers)
        .then(rollback)
        .map(respond);
    let reload = warp::path!("admin" / "reload")
        .and(warp::post())
        .and(with_state)
        .and(headers)
        .then(reload)
        .map(respond);
    list.or(audit)
        .unify()
        .or(put)
        .unify()
        .or(rollback)
        .unify()
        .or(reload)
        .unify()
        .recover(rejection)
        .unify()
}

/// The API's rejections, plus the body limits of an upload.
async fn rejection(r: warp::Rejection) -> Result<Response, std::convert::Infallible> {
    if r.find::<warp::reject::PayloadTooLarge>().is_some() {
        return Ok(ApiError::PayloadTooLarge {
            limit: MAX_COMPONENT_BYTES,
        }
        .into_response());
    }
    if r.find::<warp::reject::LengthRequired>().is_some() {
        return Ok(length_required().into_response());
    }
    super::rejection(r).await
}

fn length_required() -> ApiError {
    admin_error(
        StatusCode::LENGTH_REQUIRED,
        "length_required",
        "send the component with a Content-Length",
    )
}
