//! The server's shared state: the configuration it started with, its metrics, the models
//! and plugins once loaded ([`Services`]), where it is in its life ([`Phase`]), and the
//! reload of the plugin slots from the configuration.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::breaker::{self, Breaker};
use crate::config::{self, Config};
use crate::engine::{EmbeddingsHandle, TextModel};
use crate::metrics::Metrics;
use crate::plugins::{PluginStatus, Registry, Trigger};

/// Everything that is loaded after the listener is up.
#[derive(Debug)]
pub struct Services {
    /// The live plugin set.
    pub plugins: Registry,
    pub(crate) embeddings: BTreeMap<String, EmbeddingsHandle>,
    pub(crate) text: BTreeMap<String, TextModel>,
    pub(crate) aliases: BTreeMap<String, String>,
    pub(crate) breakers: BTreeMap<String, Arc<Breaker>>,
    /// Unix time the models were loaded.
    pub loaded_at: u64,
}

impl Services {
    /// Services of `plugins` and these models (`aliases`: other names → model ids), each
    /// model with its circuit breaker as `config.engine` sets it, announced in `metrics`.
    pub fn new(
        config: &Config,
        metrics: &Arc<Metrics>,
        plugins: Registry,
        embeddings: Vec<EmbeddingsHandle>,
        text: Vec<TextModel>,
        aliases: BTreeMap<String, String>,
    ) -> Self {
        let embeddings: BTreeMap<String, EmbeddingsHandle> = embeddings
            .into_iter()
            .map(|m| (m.id().to_string(), m))
            .collect();
        let text: BTreeMap<String, TextModel> =
            text.into_iter().map(|m| (m.id.clone(), m)).collect();
        let loaded_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for id in text.keys().chain(embeddings.keys()) {
            metrics.model_loaded(id);
        }
        let cooldown = Duration::from_millis(config.engine.breaker_cooldown_ms);
        let breakers = text
            .keys()
            .chain(embeddings.keys())
            .map(|id| {
                let metrics = metrics.clone();
                let breaker =
                    Breaker::new(id, config.engine.breaker_failures, cooldown, move |m, s| {
                        metrics.set_breaker_state(m, s)
                    });
                (id.clone(), breaker)
            })
            .collect();
        Self {
            plugins,
            embeddings,
            text,
            aliases,
            breakers,
            loaded_at,
        }
    }

    /// The embedding model a client named, by id or alias.
    pub fn embedding_model(&self, name: &str) -> Option<&EmbeddingsHandle> {
        let id = self.aliases.get(name).map_or(name, String::as_str);
        self.embeddings.get(id)
    }

    /// The text model a client named, by id or alias.
    pub fn text_model(&self, name: &str) -> Option<&TextModel> {
        let id = self.aliases.get(name).map_or(name, String::as_str);
        self.text.get(id)
    }

    /// The text model used when a request names none (`/tokenize`, `/detokenize`).
    pub fn default_text_model(&self) -> Option<&TextModel> {
        self.text.values().next()
    }

    /// The circuit breaker of the model with this id.
    pub fn breaker(&self, id: &str) -> Option<&Arc<Breaker>> {
        self.breakers.get(id)
    }

    /// Whether some model's breaker is open (refusing requests).
    pub fn any_breaker_open(&self) -> bool {
        self.breakers
            .values()
            .any(|b| b.state() == breaker::BreakerState::Open)
    }

    /// Ids of all served models.
    pub fn model_ids(&self) -> impl Iterator<Item = &str> {
        self.text
            .keys()
            .chain(self.embeddings.keys())
            .map(String::as_str)
    }
}

/// Produces the configuration a reload applies: for `warden serve`, the configuration file
/// read again under the same flags and environment.
#[derive(Clone)]
pub struct Reloader(pub(crate) Arc<dyn Fn() -> Result<Config, config::ConfigError> + Send + Sync>);

impl Reloader {
    /// A reloader from a function.
    pub fn new(
        f: impl Fn() -> Result<Config, config::ConfigError> + Send + Sync + 'static,
    ) -> Self {
        Self(Arc::new(f))
    }
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reloader")
    }
}

/// What a reload did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadReport {
    /// Each slot after the reload.
    pub plugins: Vec<PluginStatus>,
    /// Settings that changed in the file but take effect only on a restart.
    pub restart_required: Vec<&'static str>,
}

/// Where the server is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accepting and serving.
    Serving,
    /// Shutting down: `/ready` says 503; requests in flight run to completion.
    Draining,
    /// The grace period is over: streams still open end with an error event.
    Aborting,
}

/// Resolves once the server is [`Phase::Aborting`] (at once if it already is).
pub async fn aborted(phase: &mut watch::Receiver<Phase>) {
    if phase.wait_for(|p| *p == Phase::Aborting).await.is_err() {
        // The server is gone: nothing will ever abort this work.
        std::future::pending::<()>().await;
    }
}

/// State shared by all handlers.
#[derive(Debug)]
pub struct AppState {
    /// The configuration the server started with.
    pub config: Config,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    pub(crate) services: OnceLock<Services>,
    pub(crate) reloader: Reloader,
    pub(crate) phase: watch::Sender<Phase>,
    /// The open Realtime API connections.
    pub connections: Arc<super::connections::Connections>,
}

impl AppState {
    /// A state still loading: `/health` answers, the rest say 503 until
    /// [`AppState::loaded`] is given the services.
    pub fn loading(config: Config, metrics: Arc<Metrics>, reloader: Reloader) -> Arc<Self> {
        let connections =
            super::connections::Connections::new(&config.realtime, metrics.realtime.open.clone());
        Arc::new(Self {
            connections: Arc::new(connections),
            config,
            metrics,
            services: OnceLock::new(),
            reloader,
            phase: watch::Sender::new(Phase::Serving),
        })
    }

    /// A state serving `services` at once, with no listener: what in-process tests of the
    /// routes run against (`warp::test` on [`crate::http::routes`]). A reload re-applies
    /// `config`.
    pub fn serving(config: Config, metrics: Arc<Metrics>, services: Services) -> Arc<Self> {
        let again = config.clone();
        let state = Self::loading(config, metrics, Reloader::new(move || Ok(again.clone())));
        state.loaded(services);
        state
    }

    /// The services are loaded: the state starts serving them. Only the first call counts.
    pub fn loaded(&self, services: Services) {
        let _ = self.services.set(services);
    }

    /// The loaded services, or `None` while still loading.
    pub fn services(&self) -> Option<&Services> {
        self.services.get()
    }

    /// Where the server is in its life.
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// A watch on the phase, for work that must end cleanly once a shutdown's grace period
    /// is over (see [`aborted`]).
    pub fn phase_watch(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Read the configuration again and apply its plugin slots, all or none, through the
    /// same path as every other change. Blocking: compiles plugins.
    pub fn reload(&self, trigger: Trigger) -> Result<ReloadReport, String> {
        let services = self
            .services()
            .ok_or_else(|| "the server is still starting".to_string())?;
        let config = (self.reloader.0)().map_err(|e| e.to_string())?;
        let sources = crate::plugin_sources(&config).map_err(|e| e.to_string())?;
        let plugins = services
            .plugins
            .apply(&sources, trigger)
            .map_err(|e| e.to_string())?;
        let restart_required = self.config.restart_required(&config);
        if !restart_required.is_empty() {
            tracing::warn!(
                settings = ?restart_required,
                "reloaded the plugins; these changed settings take effect on restart"
            );
        }
        Ok(ReloadReport {
            plugins,
            restart_required,
        })
    }
}
