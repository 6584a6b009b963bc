//! The request flow every transport shares, without any transport's types: take one
//! snapshot of the plugin set, admit the request (one credential header at most, the auth
//! plugin's verdict, the route's scope: the host's rule), let the caller do the route's
//! work, then record how it ended (the metrics policy's labels, with its failure rule, and
//! the latency). HTTP handlers wrap it with their span, error rendering and headers; a
//! WebSocket session would wrap it the same way.

pub mod admin;
pub mod connections;
mod embeddings;
mod engines;
mod generation;
pub mod realtime;
mod state;

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tracing::Instrument;

pub use embeddings::Embedded;
pub use generation::{Completed, Generation, GenerationInput, GenerationRequest, Step};
pub use state::{AppState, Phase, ReloadReport, Reloader, Services, aborted};

use crate::error::ApiError;
use crate::plugins::{FailurePolicy, PluginSet, Principal, RequestMeta, RequestSummary};

/// A request admitted for its route: what the route's work gets.
pub struct Admitted {
    /// The server's state.
    pub state: Arc<AppState>,
    /// The plugin snapshot the whole request uses (a swap never changes it).
    pub plugins: Arc<PluginSet>,
    /// Who the auth plugin says sent it.
    pub principal: Principal,
    /// The request's envelope: id, method, path, headers, peer.
    pub meta: RequestMeta,
    /// The model the request named, once known (for metrics).
    pub model: Arc<OnceLock<String>>,
}

/// One request from its snapshot of the plugin set to its metrics.
pub struct Flow {
    state: Arc<AppState>,
    plugins: Arc<PluginSet>,
    request_id: Arc<str>,
    route: &'static str,
    started: Instant,
}

impl Flow {
    /// Start a request on `route`: the plugin snapshot it will use to its end. Refused
    /// with [`ApiError::NotReady`] before the models and plugins are loaded.
    pub fn begin(
        state: &Arc<AppState>,
        request_id: Arc<str>,
        route: &'static str,
    ) -> Result<Self, ApiError> {
        let started = Instant::now();
        let services = state.services().ok_or(ApiError::NotReady)?;
        Ok(Self {
            state: state.clone(),
            plugins: services.plugins.current(),
            request_id,
            route,
            started,
        })
    }

    /// Admit the request for `scope`, or say why not.
    pub async fn admit(
        &self,
        meta: RequestMeta,
        scope: &'static str,
    ) -> Result<Admitted, ApiError> {
        let principal = authorize(&self.plugins, &meta, scope).await?;
        Ok(Admitted {
            state: self.state.clone(),
            plugins: self.plugins.clone(),
            principal,
            meta,
            model: Arc::new(OnceLock::new()),
        })
    }

    /// Admit the request for a principal the auth plugin already named: one event of a
    /// Realtime session, authenticated at its upgrade, served with the plugins current now.
    pub fn admitted_as(&self, meta: RequestMeta, principal: Principal) -> Admitted {
        Admitted {
            state: self.state.clone(),
            plugins: self.plugins.clone(),
            principal,
            meta,
            model: Arc::new(OnceLock::new()),
        }
    }

    /// Record how the request ended: under the metrics policy's labels, or, when the
    /// policy faults, as its failure rule says (route and status class if it fails open,
    /// unlabelled if closed); and its latency.
    pub async fn finish(self, status: u16, model: Option<String>, tenant: Option<String>) {
        let summary = RequestSummary {
            route: self.route,
            model,
            status,
            tenant,
        };
        let labels = self
            .plugins
            .labels(&summary, &self.request_id)
            .instrument(tracing::debug_span!(
                "plugin.metrics_policy",
                call = "labels"
            ))
            .await;
        let metrics = &self.state.metrics;
        match labels {
            Ok(labels) => metrics.record_request(labels),
            Err(_) if self.plugins.metrics_failure() == FailurePolicy::Open => {
                let class = format!("{}xx", summary.status / 100);
                metrics.record_request(vec![
                    ("route".into(), self.route.into()),
                    ("status_class".into(), class),
                ]);
            }
            Err(_) => metrics.record_unlabelled_request(),
        }
        metrics.observe_request(self.route, summary.status, self.started.elapsed());
    }
}

/// Headers that carry credentials: a request may send each at most once. Two of them
/// would leave the choice of credential to whoever reads first, so such a request is
/// refused before any plugin sees it.
const CREDENTIAL_HEADERS: [&str; 3] = ["authorization", "x-api-key", "api-key"];

/// A 400 if `meta` carries a credential header more than once.
pub fn single_credentials(meta: &RequestMeta) -> Result<(), ApiError> {
    for name in CREDENTIAL_HEADERS {
        if meta.headers.iter().filter(|(k, _)| k == name).count() > 1 {
            return Err(ApiError::Invalid {
                code: "ambiguous_credentials",
                param: None,
                message: format!(
                    "the request carries more than one `{name}` header; send one credential"
                ),
            });
        }
    }
    Ok(())
}

/// Authenticate with the auth plugin, then check the route's scope (the host's rule).
async fn authorize(
    plugins: &Arc<PluginSet>,
    meta: &RequestMeta,
    scope: &'static str,
) -> Result<Principal, ApiError> {
    single_credentials(meta)?;
    let verdict = plugins
        .authenticate(meta)
        .instrument(tracing::debug_span!("plugin.auth"))
        .await?;
    match verdict {
        Ok(p) if p.has_scope(scope) => Ok(p),
        Ok(_) => Err(ApiError::Forbidden { scope }),
        Err(r) if r.status == 401 => Err(ApiError::Unauthorized {
            message: r.message,
            code: r.code,
        }),
        Err(r) => Err(ApiError::Refused(r)),
    }
}
