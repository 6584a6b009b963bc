//! What operators do, without any transport's types: check the admin token, read the
//! plugin slots and the audit trail, change a slot, roll it back, reload the configuration.
//! The token is checked by the host itself (constant-time, over digests), never by the
//! swappable auth plugin, so a broken auth plugin can neither lock operators out nor grant
//! admin rights. Changes compile off the reactor.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use warp::http::StatusCode;

use super::{AppState, ReloadReport};
use crate::error::ApiError;
use crate::plugins::{
    AuditEvent, LoadError, PluginSource, PluginStatus, SLOT_KINDS, Slot, Trigger,
};

/// An admin API error with its own status and code.
pub(crate) fn admin_error(
    status: StatusCode,
    code: &'static str,
    message: impl Into<String>,
) -> ApiError {
    ApiError::Admin {
        status,
        code,
        message: message.into(),
    }
}

/// The status and code a refused change is answered with.
pub(crate) fn refused(e: LoadError) -> ApiError {
    let (status, code) = match &e {
        LoadError::NotFound { .. } => (StatusCode::NOT_FOUND, "plugin_file_not_found"),
        LoadError::NotReadable { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "plugin_not_readable"),
        LoadError::Sha256Mismatch { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "sha256_mismatch"),
        LoadError::Invalid { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_component"),
        LoadError::Version { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "unsupported_wit_version"),
        LoadError::World { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "wrong_world"),
        LoadError::Import { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "unsupported_import"),
        LoadError::Configure { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "configuration_rejected"),
        LoadError::Smoke { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "smoke_call_failed"),
        LoadError::NoRollback { .. } => (StatusCode::CONFLICT, "no_rollback_target"),
        LoadError::Runtime(_) => (StatusCode::UNPROCESSABLE_ENTITY, "plugin_refused"),
    };
    admin_error(status, code, e.to_string())
}

/// The slot named `name`, or a 404 that lists the slots.
pub fn slot(name: &str) -> Result<Slot, ApiError> {
    Slot::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = SLOT_KINDS.iter().map(|k| k.name).collect();
        ApiError::Admin {
            status: StatusCode::NOT_FOUND,
            code: "unknown_slot",
            message: format!("no such slot; the slots are {}", names.join(", ")),
        }
    })
}

/// Check the `Authorization` values a request carries (at most one, `Bearer <token>`)
/// against `admin_token`, in constant time (over digests, so the length leaks nothing).
pub fn authorize(state: &AppState, authorization: &[&str]) -> Result<(), ApiError> {
    let unauthorized = |code: &str, message: &str| ApiError::Unauthorized {
        message: message.into(),
        code: code.into(),
    };
    let Some(token) = &state.config.admin_token else {
        return Err(unauthorized("invalid_admin_token", "the admin API is off"));
    };
    if authorization.len() > 1 {
        return Err(admin_error(
            StatusCode::BAD_REQUEST,
            "ambiguous_credentials",
            "the request carries more than one `authorization` header; send one token",
        ));
    }
    let given = authorization
        .first()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            unauthorized(
                "missing_admin_token",
                "send the admin token as `Authorization: Bearer <token>`",
            )
        })?;
    let expected = Sha256::digest(token.expose().as_bytes());
    let given = Sha256::digest(given.trim().as_bytes());
    if bool::from(expected.as_slice().ct_eq(given.as_slice())) {
        Ok(())
    } else {
        Err(unauthorized("invalid_admin_token", "invalid admin token"))
    }
}

/// Run a change (which compiles) off the reactor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|_| {
        tracing::error!("an admin change panicked; the live plugin set is unchanged");
        Err(ApiError::Internal)
    })
}

impl AppState {
    /// Each slot's live plugin.
    pub fn plugin_status(&self) -> Result<Vec<PluginStatus>, ApiError> {
        let services = self.services().ok_or(ApiError::NotReady)?;
        Ok(services.plugins.status())
    }

    /// The audit trail, oldest first.
    pub fn plugin_audit(&self) -> Result<Vec<AuditEvent>, ApiError> {
        let services = self.services().ok_or(ApiError::NotReady)?;
        Ok(services.plugins.audit_events())
    }

    /// Put the plugin `source` makes (built on a blocking thread by `make`, which may read
    /// files) live in its slot, through the same checks as every change.
    pub async fn change_plugin(
        self: &std::sync::Arc<Self>,
        make: impl FnOnce(&AppState) -> Result<PluginSource, ApiError> + Send + 'static,
    ) -> Result<PluginStatus, ApiError> {
        let state = self.clone();
        blocking(move || {
            let source = make(&state)?;
            let services = state.services().ok_or(ApiError::NotReady)?;
            services
                .plugins
                .apply(std::slice::from_ref(&source), Trigger::Admin)
                .map(|mut s| s.remove(0))
                .map_err(refused)
        })
        .await
    }

    /// Restore `slot`'s previous plugin. Off the reactor too: it waits for a change in
    /// progress (which may be compiling) to finish.
    pub async fn roll_back(
        self: &std::sync::Arc<Self>,
        slot: Slot,
    ) -> Result<PluginStatus, ApiError> {
        let state = self.clone();
        blocking(move || {
            let services = state.services().ok_or(ApiError::NotReady)?;
            services
                .plugins
                .rollback(slot, Trigger::Rollback)
                .map_err(refused)
        })
        .await
    }

    /// Read the configuration again and apply its plugin slots, all or none.
    pub async fn reload_plugins(self: &std::sync::Arc<Self>) -> Result<ReloadReport, ApiError> {
        self.services().ok_or(ApiError::NotReady)?;
        let state = self.clone();
        blocking(move || {
            state.reload(Trigger::Reload).map_err(|message| {
                admin_error(StatusCode::UNPROCESSABLE_ENTITY, "reload_refused", message)
            })
        })
        .await
    }
}
