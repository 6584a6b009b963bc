//! Warden: an OpenAI-compatible inference server whose request policies (authentication,
//! sanitization, metrics) are sandboxed WebAssembly components.
//!
//! Layers: [`http`] (warp) → [`plugins`] (wasmtime) and [`engine`] (candle). [`run`] serves
//! until a shutdown signal; [`Server::start`] is the same server as a handle, for tests.

#![deny(missing_docs)]

pub mod config;
pub mod engine;
pub mod error;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod plugins;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{oneshot, watch};

pub use config::Config;
use engine::{EmbeddingsHandle, GenerateConfig, MiniLm, TextModel, WorkerConfig};
use metrics::Metrics;
use plugins::{PluginSet, PluginSource, Registry, Slot};

/// The embedding model served by default: a directory of this name under `models_dir`.
pub const EMBEDDING_MODEL: &str = "all-MiniLM-L6-v2";

/// Everything that is loaded after the listener is up.
#[derive(Debug)]
pub struct Services {
    /// The live plugin set.
    pub plugins: Registry,
    embeddings: BTreeMap<String, EmbeddingsHandle>,
    text: BTreeMap<String, TextModel>,
    aliases: BTreeMap<String, String>,
    /// Unix time the models were loaded.
    pub loaded_at: u64,
}

impl Services {
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

    /// Ids of all served models.
    pub fn model_ids(&self) -> impl Iterator<Item = &str> {
        self.text
            .keys()
            .chain(self.embeddings.keys())
            .map(String::as_str)
    }
}

/// State shared by all handlers.
#[derive(Debug)]
pub struct AppState {
    /// The configuration in force.
    pub config: Config,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    services: OnceLock<Services>,
}

impl AppState {
    /// The loaded services, or `None` while still loading.
    pub fn services(&self) -> Option<&Services> {
        self.services.get()
    }
}

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

fn load_plugins(
    config: &Config,
    auth_config: String,
    metrics: Arc<Metrics>,
) -> Result<Registry, StartError> {
    let source = |slot: Slot, json: String| {
        let s = config.plugins.slot(slot);
        PluginSource::from_file(
            slot,
            &config.plugin_file(slot),
            s.sha256.clone(),
            json,
            s.limits(),
        )
    };
    let json = |slot: Slot| {
        serde_json::Value::Object(config.plugins.slot(slot).config.clone()).to_string()
    };
    let set = PluginSet::load(
        &source(Slot::Auth, auth_config)?,
        &source(Slot::Sanitizer, json(Slot::Sanitizer))?,
        &source(Slot::MetricsPolicy, json(Slot::MetricsPolicy))?,
        metrics.clone(),
    )?;
    tracing::info!(plugins = ?set, "plugins loaded");
    Ok(Registry::new(set, metrics))
}

fn load_services(config: &Config, metrics: Arc<Metrics>) -> Result<Services, StartError> {
    let auth_config = keys::auth_plugin_config(config)?;
    let plugins = load_plugins(config, auth_config, metrics)?;
    let dir = config.models_dir.join(EMBEDDING_MODEL);
    let model = MiniLm::load(EMBEDDING_MODEL, &dir)?;
    let worker = WorkerConfig {
        queue_capacity: config.engine.queue_capacity,
        max_batch: config.engine.max_batch,
    };
    let handle = EmbeddingsHandle::spawn(EMBEDDING_MODEL, model, worker)
        .map_err(|e| StartError::Other(format!("cannot start the engine thread: {e}")))?;
    tracing::info!(model = EMBEDDING_MODEL, "model loaded");
    let mut embeddings = BTreeMap::new();
    embeddings.insert(EMBEDDING_MODEL.to_string(), handle);
    let mut aliases = BTreeMap::new();
    aliases.insert(
        format!("sentence-transformers/{EMBEDDING_MODEL}"),
        EMBEDDING_MODEL.to_string(),
    );

    let text_id = config.text_model_id();
    let generate = GenerateConfig {
        queue_capacity: config.engine.queue_capacity,
        max_active: config.engine.max_sequences,
    };
    let text_model = TextModel::load(&text_id, &config.text_model_file(), generate)?;
    tracing::info!(model = %text_id, context = text_model.handle.context_length(), "model loaded");
    // The file's own name (with its quantization) and the upstream name work too.
    let file_stem = crate::plugins::file_name(&config.text_model)
        .trim_end_matches(".gguf")
        .to_string();
    aliases.insert(file_stem, text_id.clone());
    aliases.insert(format!("HuggingFaceTB/{text_id}"), text_id.clone());
    let mut text = BTreeMap::new();
    text.insert(text_id, text_model);
    let loaded_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(Services {
        plugins,
        embeddings,
        text,
        aliases,
        loaded_at,
    })
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    state: Arc<AppState>,
    ready: watch::Receiver<Option<Result<(), String>>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Bind the listener and start serving at once (`/health` answers, `/ready` says 503),
    /// while plugins and models load in the background.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        config.validate()?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| StartError::Bind {
                addr: config.listen,
                reason: e.kind().to_string(),
            })?;
        let addr = listener.local_addr().map_err(|e| StartError::Bind {
            addr: config.listen,
            reason: e.kind().to_string(),
        })?;
        let metrics = Arc::new(Metrics::new());
        let state = Arc::new(AppState {
            config,
            metrics,
            services: OnceLock::new(),
        });

        let (ready_tx, ready) = watch::channel(None);
        let loading = state.clone();
        tokio::task::spawn_blocking(move || {
            let result = load_services(&loading.config, loading.metrics.clone());
            let outcome = match result {
                Ok(services) => {
                    let _ = loading.services.set(services);
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

        let (shutdown, signal) = oneshot::channel::<()>();
        let server = warp::serve(http::routes(state.clone()))
            .incoming(listener)
            .graceful(async move {
                let _ = signal.await;
            });
        let task = tokio::spawn(server.run());
        tracing::info!(%addr, "listening");
        Ok(Server {
            addr,
            state,
            ready,
            shutdown: Some(shutdown),
            task,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
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

    /// Stop accepting connections and wait for requests in flight to finish.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// Serve until SIGINT or SIGTERM, then finish the requests in flight and return.
pub async fn run(config: Config) -> Result<(), StartError> {
    let server = Server::start(config).await?;
    tokio::select! {
        result = server.ready() => result.map_err(StartError::Other)?,
        () = shutdown_signal() => {
            server.shutdown().await;
            return Ok(());
        }
    }
    shutdown_signal().await;
    tracing::info!("shutting down");
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
