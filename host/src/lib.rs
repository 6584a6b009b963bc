//! Warden: an OpenAI-compatible inference server whose request policies (authentication,
//! sanitization, metrics) are sandboxed WebAssembly components.
//!
//! Layers: [`http`] (warp) → [`app`] (the request flow and the server's state, no
//! transport types) → [`plugins`] (wasmtime) and [`engine`] (candle). This file is the
//! composition root: [`run`] serves until a shutdown signal; [`Server::start`] is the same
//! server as a handle, for tests.

#![deny(missing_docs)]

pub mod app;
pub mod breaker;
pub mod config;
pub mod engine;
pub mod error;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod plugins;
pub mod scaffold;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

pub use app::{AppState, Phase, ReloadReport, Reloader, Services, aborted};
pub use config::Config;
use engine::{EmbeddingsHandle, GenerateConfig, MiniLm, TextModel, WorkerConfig};
use metrics::Metrics;
use plugins::{AuditLog, DiskCache, PluginSet, PluginSource, Registry, Runtime, Slot, Trigger};

/// The embedding model served by default: a directory of this name under `models_dir`.
pub const EMBEDDING_MODEL: &str = "all-MiniLM-L6-v2";

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// A plugin was refused.
    #[error(transparent)]
    Plugin(#[from] plugins::LoadError),
    /// A model could not be loaded.
    #[error(transparent)]
    Model(#[from] engine::ModelLoadError),
    /// Credentials could not be set up.
    #[error(transparent)]
    Keys(#[from] keys::KeyError),
    /// Anything else at start-up.
    #[error("{0}")]
    Other(String),
}

/// The three slots' plugins as `config` names them, read from disk.
pub(crate) fn plugin_sources(config: &Config) -> Result<Vec<PluginSource>, StartError> {
    configured_sources(config, keys::auth_plugin_config(config)?)
}

/// [`plugin_sources`], with the auth plugin's configuration already built.
fn configured_sources(
    config: &Config,
    auth_config: String,
) -> Result<Vec<PluginSource>, StartError> {
    Ok(vec![
        config.plugin_source(Slot::Auth, auth_config)?,
        config.plugin_source(Slot::Sanitizer, config.plugin_config_json(Slot::Sanitizer))?,
        config.plugin_source(
            Slot::MetricsPolicy,
            config.plugin_config_json(Slot::MetricsPolicy),
        )?,
    ])
}

/// The compiled-plugin disk cache, unless turned off. A cache that cannot be used costs
/// only compile time, so it is a warning, not a start-up failure.
fn disk_cache(config: &Config) -> Option<DiskCache> {
    if config.cache_dir.as_os_str().is_empty() {
        return None;
    }
    DiskCache::open(&config.cache_dir)
        .map_err(|e| tracing::warn!(error = %e, "compiled plugins will not be cached on disk"))
        .ok()
}

/// The audit file, unless turned off; one that cannot be opened stops the start.
fn audit_log(config: &Config) -> Result<Option<AuditLog>, StartError> {
    if config.audit_log.as_os_str().is_empty() {
        return Ok(None);
    }
    AuditLog::open(&config.audit_log)
        .map(Some)
        .map_err(StartError::Other)
}

/// What the start checks and creates before it listens: credentials (a generated key
/// file is written here) and the audit file. Either failing stops the start with a clear
/// error, never a server that listens and then cannot serve.
struct Prepared {
    auth_config: String,
    audit_log: Option<AuditLog>,
}

fn load_plugins(
    config: &Config,
    metrics: Arc<Metrics>,
    prepared: Prepared,
) -> Result<Registry, StartError> {
    let sources = configured_sources(config, prepared.auth_config)?;
    let cache = disk_cache(config);
    let runtime = Runtime::builder().build().map_err(StartError::Other)?;
    let set = PluginSet::load(
        &runtime,
        &sources[0],
        &sources[1],
        &sources[2],
        metrics.clone(),
        cache.as_ref(),
    )?;
    tracing::info!(plugins = ?set, "plugins loaded");
    Ok(Registry::new(set, metrics, cache).with_audit_log(prepared.audit_log))
}

/// The plugin registry `config` names, loaded on a runtime of its own: what a server loads
/// at start, for in-process use (the route tests' [`AppState::serving`]).
pub fn plugin_registry(config: &Config, metrics: Arc<Metrics>) -> Result<Registry, StartError> {
    let prepared = Prepared {
        auth_config: keys::auth_plugin_config(config)?,
        audit_log: audit_log(config)?,
    };
    load_plugins(config, metrics, prepared)
}

fn load_services(
    config: &Config,
    metrics: Arc<Metrics>,
    prepared: Prepared,
) -> Result<Services, StartError> {
    let plugins = load_plugins(config, metrics.clone(), prepared)?;
    let dir = config.models_dir.join(EMBEDDING_MODEL);
    let model = MiniLm::load_with(EMBEDDING_MODEL, &dir, config.engine.embedding_precision)?;
    tracing::info!(
        model = EMBEDDING_MODEL,
        precision = model.precision().as_str(),
        "embedding model loaded"
    );
    let queue_timeout = Duration::from_millis(config.engine.queue_timeout_ms);
    let worker = WorkerConfig {
        queue_capacity: config.engine.queue_capacity,
        max_batch: config.engine.max_batch,
        queue_timeout,
        observer: metrics.clone(),
    };
    let handle = EmbeddingsHandle::spawn(EMBEDDING_MODEL, model, worker)
        .map_err(|e| StartError::Other(format!("cannot start the engine thread: {e}")))?;
    tracing::info!(model = EMBEDDING_MODEL, "model loaded");
    let mut aliases = BTreeMap::new();
    aliases.insert(
        format!("sentence-transformers/{EMBEDDING_MODEL}"),
        EMBEDDING_MODEL.to_string(),
    );

    let text_id = config.text_model_id();
    let generate = GenerateConfig {
        queue_capacity: config.engine.queue_capacity,
        max_active: config.engine.max_sequences,
        queue_timeout,
        observer: metrics.clone(),
        prefix_cache_tokens: config.engine.prefix_cache_tokens,
    };
    let text_model = TextModel::load(&text_id, &config.text_model_file(), generate)?;
    tracing::info!(model = %text_id, context = text_model.context_length(), "model loaded");
    // The file's own name (with its quantization) and the upstream name work too.
    let file_stem = crate::plugins::file_name(&config.text_model)
        .trim_end_matches(".gguf")
        .to_string();
    aliases.insert(file_stem, text_id.clone());
    aliases.insert(format!("HuggingFaceTB/{text_id}"), text_id);
    Ok(Services::new(
        config,
        &metrics,
        plugins,
        vec![handle],
        vec![text_model],
        aliases,
    ))
}

/// After the grace period, how long streams get to send their final event.
const ABORT_GRACE: Duration = Duration::from_secs(5);

async fn bind(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), StartError> {
    let error = |e: std::io::Error| StartError::Bind {
        addr,
        reason: e.kind().to_string(),
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(error)?;
    let bound = listener.local_addr().map_err(error)?;
    Ok((listener, bound))
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    state: Arc<AppState>,
    ready: watch::Receiver<Option<Result<(), String>>>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Bind the listener and start serving at once (`/health` answers, `/ready` says 503),
    /// while plugins and models load in the background.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        let again = config.clone();
        Self::start_with(config, Reloader::new(move || Ok(again.clone()))).await
    }

    /// [`Server::start`], with `reloader` giving the configuration a reload applies.
    pub async fn start_with(config: Config, reloader: Reloader) -> Result<Server, StartError> {
        config.validate()?;
        let prepared = Prepared {
            auth_config: keys::auth_plugin_config(&config)?,
            audit_log: audit_log(&config)?,
        };
        let (listener, addr) = bind(config.listen).await?;
        // Bound before anything loads, so that a taken port fails the start at once.
        let admin_listener = match &config.admin_token {
            Some(_) => Some(bind(config.admin_listen).await?),
            None => None,
        };
        let metrics = Arc::new(Metrics::new());
        let state = AppState::loading(config, metrics, reloader);

        let (ready_tx, ready) = watch::channel(None);
        let loading = state.clone();
        tokio::task::spawn_blocking(move || {
            let result = load_services(&loading.config, loading.metrics.clone(), prepared);
            let outcome = match result {
                Ok(services) => {
                    loading.loaded(services);
                    tracing::info!("ready");
                    Ok(())
                }
                Err(e) => {
                    tracing::error!(error = %e, "start-up failed");
                    Err(e.to_string())
                }
            };
            let _ = ready_tx.send(Some(outcome));
        });

        let (shutdown, signal) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let limits = state.config.http_limits();
        let server = http::serve::serve(
            listener,
            http::routes(state.clone()),
            limits,
            stopped(signal.clone()),
        );
        let mut tasks = vec![tokio::spawn(server)];
        tracing::info!(%addr, "listening");
        let mut admin_addr = None;
        if let Some((listener, bound)) = admin_listener {
            let admin = http::serve::serve(
                listener,
                http::admin_routes(state.clone()),
                limits,
                stopped(signal),
            );
            tasks.push(tokio::spawn(admin));
            tracing::info!(addr = %bound, "admin API listening");
            admin_addr = Some(bound);
        }
        Ok(Server {
            addr,
            admin_addr,
            state,
            ready,
            shutdown,
            tasks,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin API's address, when it runs.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Shared state (metrics, plugins), for tests and embedding.
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Wait until plugins and models are loaded; the error says why loading failed.
    pub async fn ready(&self) -> Result<(), String> {
        let mut rx = self.ready.clone();
        let outcome = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| "the loader stopped".to_string())?;
        outcome.clone().unwrap_or_else(|| Err("not loaded".into()))
    }

    /// Shut down gracefully: `/ready` turns 503 at once; after `shutdown_delay_ms` both
    /// listeners stop accepting; requests and streams in flight run to completion for up to
    /// `shutdown_grace_secs`, after which streams still open end with a final error event.
    pub async fn shutdown(self) {
        let grace = Duration::from_secs(self.state.config.shutdown_grace_secs);
        let delay = Duration::from_millis(self.state.config.shutdown_delay_ms);
        self.state.phase.send_replace(Phase::Draining);
        tracing::info!(grace_secs = grace.as_secs(), "shutting down: draining");
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let _ = self.shutdown.send(true);
        // The listeners' connections, then the Realtime sessions, which close themselves
        // once their response in progress is done (1001 going away).
        let connections = self.state.connections.clone();
        let tasks = self.tasks;
        let all = async move {
            futures_util::future::join_all(tasks).await;
            connections.drained().await;
        };
        tokio::pin!(all);
        if tokio::time::timeout(grace, &mut all).await.is_err() {
            tracing::warn!("grace period over: ending the streams still open");
            self.state.phase.send_replace(Phase::Aborting);
            if tokio::time::timeout(ABORT_GRACE, &mut all).await.is_err() {
                tracing::error!("connections still open after the grace period; closing them");
            }
        }
        tracing::info!("stopped");
    }
}

/// Serve until SIGINT or SIGTERM, then finish the requests in flight and return. SIGHUP
/// reloads the plugins from `reloader`'s configuration.
pub async fn run(config: Config, reloader: Reloader) -> Result<(), StartError> {
    let server = Server::start_with(config, reloader).await?;
    #[cfg(unix)]
    if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        let state = server.state().clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let state = state.clone();
                let outcome =
                    tokio::task::spawn_blocking(move || state.reload(Trigger::Sighup)).await;
                match outcome {
                    Ok(Ok(report)) => tracing::info!(
                        restart_required = ?report.restart_required,
                        "SIGHUP: configuration reloaded"
                    ),
                    Ok(Err(e)) => tracing::error!(error = %e, "SIGHUP: reload refused"),
                    Err(_) => tracing::error!("SIGHUP: the reload panicked"),
                }
            }
        });
    }
    tokio::select! {
        result = server.ready() => result.map_err(StartError::Other)?,
        () = shutdown_signal() => {
            server.shutdown().await;
            return Ok(());
        }
    }
    shutdown_signal().await;
    server.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
