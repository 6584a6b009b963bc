//! One configuration struct: built-in defaults < TOML file < `WARDEN_*` environment < flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::engine::kernels::dense::PrecisionSetting;
use crate::plugins::{FailurePolicy, Limits, LoadError, MAX_MEMORY_BYTES, PluginSource, Slot};

mod args;
mod slot_flags;
pub use args::ServeArgs;
pub use slot_flags::{SlotArgs, SlotFlags, all_flags as slot_flags, env_name};

/// A secret string: usable, never printed.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself; use it, do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One plugin slot.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SlotConfig {
    /// Component file; relative paths are resolved against `plugin_dir`.
    pub file: Option<PathBuf>,
    /// Required sha256 of the file (hex). Required when `file` is given in a config file.
    pub sha256: Option<String>,
    /// The plugin's own configuration, passed to its `configure` as JSON.
    pub config: serde_json::Map<String, serde_json::Value>,
    /// Per-call deadline in milliseconds.
    pub deadline_ms: u64,
    /// Milliseconds added to a call's deadline per MiB of client text it is given (the
    /// sanitizer's input check). Default: 60 for the sanitizer, sized from its measured
    /// worst case (about 30 ms per MiB on the reference machine, docs/performance.md);
    /// 0 for the others.
    pub deadline_ms_per_mib: Option<u64>,
    /// Memory cap in MiB.
    pub memory_mib: u64,
    /// What a fault does: `closed` (auth and sanitizer: the only choice) or, for the
    /// metrics policy, `open` (its default: record under route and status class).
    pub failure: Option<FailurePolicy>,
}

impl Default for SlotConfig {
    fn default() -> Self {
        let limits = Limits::default();
        Self {
            file: None,
            sha256: None,
            config: serde_json::Map::new(),
            deadline_ms: limits.deadline.as_millis() as u64,
            deadline_ms_per_mib: None,
            memory_mib: (limits.memory_bytes >> 20) as u64,
            failure: None,
        }
    }
}

/// The default of `deadline_ms_per_mib` per slot: only the sanitizer is given client text.
pub fn default_deadline_ms_per_mib(slot: Slot) -> u64 {
    slot.kind().default_deadline_ms_per_mib()
}

impl SlotConfig {
    /// The call bounds of this slot's plugin.
    pub fn limits(&self, slot: Slot) -> Limits {
        let per_mib = self
            .deadline_ms_per_mib
            .unwrap_or_else(|| default_deadline_ms_per_mib(slot));
        Limits {
            deadline: Duration::from_millis(self.deadline_ms),
            deadline_per_mib: Duration::from_millis(per_mib),
            memory_bytes: usize::try_from(self.memory_mib.saturating_mul(1 << 20))
                .unwrap_or(usize::MAX),
        }
    }
}

/// The three slots.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Authentication.
    pub auth: SlotConfig,
    /// Sanitization.
    pub sanitizer: SlotConfig,
    /// Metrics policy.
    #[serde(rename = "metrics-policy", alias = "metrics_policy")]
    pub metrics_policy: SlotConfig,
}

impl PluginsConfig {
    /// The configuration of `slot`.
    pub fn slot(&self, slot: Slot) -> &SlotConfig {
        match slot {
            Slot::Auth => &self.auth,
            Slot::Sanitizer => &self.sanitizer,
            Slot::MetricsPolicy => &self.metrics_policy,
        }
    }

    /// The configuration of `slot`, to change.
    pub fn slot_mut(&mut self, slot: Slot) -> &mut SlotConfig {
        match slot {
            Slot::Auth => &mut self.auth,
            Slot::Sanitizer => &mut self.sanitizer,
            Slot::MetricsPolicy => &mut self.metrics_policy,
        }
    }
}

/// Engine queue and batching.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Requests that may wait per model; more get 429.
    pub queue_capacity: usize,
    /// Most texts per embedding forward pass.
    pub max_batch: usize,
    /// Text sequences the generation thread advances together.
    pub max_sequences: usize,
    /// The embedding model's linear layers: `auto` (bf16 where this CPU runs it
    /// measurably faster than f32, measured at load), `f32` (exact) or `bf16` (cosine
    /// about 0.99998 against sentence-transformers; needs AVX-512 BF16, else f32).
    pub embedding_precision: PrecisionSetting,
    /// A request that cannot start within this many milliseconds gets 503.
    pub queue_timeout_ms: u64,
    /// Positions of finished generations' KV caches kept for reuse, in all: a prompt that
    /// starts as a kept one did (the next turn of a conversation, a shared system prompt)
    /// computes only the rest. 0 keeps none. About 23 KiB per position for SmolLM2-135M.
    pub prefix_cache_tokens: usize,
    /// Engine failures in a row that open a model's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker refuses requests before it lets a probe through.
    pub breaker_cooldown_ms: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 64,
            max_batch: 32,
            max_sequences: 8,
            embedding_precision: crate::engine::DEFAULT_PRECISION,
            queue_timeout_ms: 30_000,
            prefix_cache_tokens: 4096,
            breaker_failures: 5,
            breaker_cooldown_ms: 10_000,
        }
    }
}

/// The Realtime API's WebSocket sessions (`/v1/realtime`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RealtimeConfig {
    /// Most sessions open at once; an upgrade past it is refused with 429.
    pub max_connections: usize,
    /// Most sessions one principal may hold open; past it, 429.
    pub max_connections_per_principal: usize,
    /// A session with no client event for this many seconds is closed (1000).
    pub idle_timeout_secs: u64,
    /// How often the server pings a session, in seconds.
    pub ping_interval_secs: u64,
    /// Server events a session may have waiting for its client; a client this far behind
    /// is closed (1008) instead of buffered for.
    pub max_queued_events: usize,
}

impl Default for RealtimeConfig {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_connections_per_principal: 16,
            idle_timeout_secs: 300,
            ping_interval_secs: 30,
            max_queued_events: 1024,
        }
    }
}

/// Everything Warden needs to run.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Directory holding the models.
    pub models_dir: PathBuf,
    /// The generative model: a llama-family GGUF file, relative to `models_dir` unless
    /// absolute. Its id is the file name up to the first `.`.
    pub text_model: PathBuf,
    /// Directory holding the plugin components.
    pub plugin_dir: PathBuf,
    /// Key with scope `inference` (replaces the auth plugin's configured keys).
    pub api_key: Option<Secret>,
    /// Key with scope `metrics`.
    pub metrics_api_key: Option<Secret>,
    /// Where a generated key is kept when no key is configured.
    pub generated_key_file: PathBuf,
    /// Largest request body, in bytes.
    pub body_limit_bytes: u64,
    /// Largest request head (request line and all headers), in bytes; larger is 431.
    pub header_limit_bytes: usize,
    /// How long a client may take to send its request head, in seconds.
    pub header_timeout_secs: u64,
    /// How long a client may take to send its request body, in seconds; slower is 408.
    pub body_timeout_secs: u64,
    /// Most client connections open at once (per listener); further ones wait in the
    /// kernel's backlog until one closes.
    pub max_connections: usize,
    /// On SIGTERM/SIGINT, how long requests and streams in flight may run before the streams
    /// still open get a final error event.
    pub shutdown_grace_secs: u64,
    /// On SIGTERM/SIGINT, how long `/ready` answers 503 while new connections are still
    /// accepted, so that a load balancer stops routing here first.
    pub shutdown_delay_ms: u64,
    /// Engine settings.
    pub engine: EngineConfig,
    /// Plugin slots.
    pub plugins: PluginsConfig,
    /// Realtime API sessions.
    pub realtime: RealtimeConfig,
    /// Admin API listen address; the admin API runs only when `admin_token` is set.
    pub admin_listen: SocketAddr,
    /// Bearer token for the admin API (at least 32 characters).
    pub admin_token: Option<Secret>,
    /// Where compiled plugins are cached; empty turns the disk cache off.
    pub cache_dir: PathBuf,
    /// File every plugin change is appended to (JSON lines); empty turns it off.
    pub audit_log: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            models_dir: PathBuf::from("models"),
            text_model: PathBuf::from(DEFAULT_TEXT_MODEL),
            plugin_dir: PathBuf::from("target/plugins"),
            api_key: None,
            metrics_api_key: None,
            generated_key_file: PathBuf::from(".warden/api-key"),
            body_limit_bytes: 2 * 1024 * 1024,
            header_limit_bytes: 64 * 1024,
            header_timeout_secs: 10,
            body_timeout_secs: 30,
            max_connections: 1024,
            shutdown_grace_secs: 30,
            shutdown_delay_ms: 0,
            engine: EngineConfig::default(),
            plugins: PluginsConfig::default(),
            realtime: RealtimeConfig::default(),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            admin_token: None,
            cache_dir: PathBuf::from(".warden/cache"),
            audit_log: PathBuf::from(".warden/audit.jsonl"),
        }
    }
}

/// Shortest admin token accepted: a token an operator could guess or type is refused.
pub const MIN_ADMIN_TOKEN_LEN: usize = 32;

/// The GGUF served for chat and completions unless configured otherwise.
pub const DEFAULT_TEXT_MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// A configuration problem, said plainly.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config file {file}: {reason}")]
    Read {
        /// File name.
        file: String,
        /// Why.
        reason: String,
    },
    /// The file is not valid (unknown keys are named).
    #[error("config file {file}: {reason}")]
    Parse {
        /// File name.
        file: String,
        /// The parser's message.
        reason: String,
    },
    /// A value is out of range.
    #[error("{0}")]
    Invalid(String),
}

/// Default component file name per slot.
pub fn default_plugin_file(slot: Slot) -> &'static str {
    slot.kind().default_file
}

impl Config {
    /// Parse a TOML configuration file.
    pub fn from_toml_file(path: &Path) -> Result<Self, ConfigError> {
        let file = crate::plugins::file_name(path);
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            file: file.clone(),
            reason: match e.kind() {
                std::io::ErrorKind::NotFound => "file not found".into(),
                _ => "not readable".into(),
            },
        })?;
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            file: file.clone(),
            reason: e.message().to_string(),
        })?;
        for slot in Slot::ALL {
            let s = config.plugins.slot(slot);
            if s.file.is_some() && s.sha256.is_none() {
                return Err(ConfigError::Parse {
                    file,
                    reason: format!(
                        "plugins.{slot}.sha256 is required when plugins.{slot}.file is set"
                    ),
                });
            }
        }
        Ok(config)
    }

    /// Check ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for slot in Slot::ALL {
            let s = self.plugins.slot(slot);
            if s.deadline_ms == 0 || s.deadline_ms > 10_000 {
                return Err(ConfigError::Invalid(format!(
                    "plugins.{slot}.deadline_ms must be between 1 and 10000"
                )));
            }
            if s.deadline_ms_per_mib.is_some_and(|ms| ms > 10_000) {
                return Err(ConfigError::Invalid(format!(
                    "plugins.{slot}.deadline_ms_per_mib must be at most 10000"
                )));
            }
            if s.memory_mib == 0 || s.limits(slot).memory_bytes > MAX_MEMORY_BYTES {
                return Err(ConfigError::Invalid(format!(
                    "plugins.{slot}.memory_mib must be between 1 and {}",
                    MAX_MEMORY_BYTES >> 20
                )));
            }
            if s.failure == Some(FailurePolicy::Open) && !slot.kind().may_fail_open {
                return Err(ConfigError::Invalid(format!(
                    "plugins.{slot}.failure must be \"closed\": only the metrics policy may fail open"
                )));
            }
            if let Some(d) = &s.sha256
                && (d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(ConfigError::Invalid(format!(
                    "plugins.{slot}.sha256 must be 64 hexadecimal digits"
                )));
            }
        }
        if let Some(t) = &self.admin_token
            && t.expose().len() < MIN_ADMIN_TOKEN_LEN
        {
            return Err(ConfigError::Invalid(format!(
                "admin_token must be at least {MIN_ADMIN_TOKEN_LEN} characters"
            )));
        }
        if self.engine.queue_capacity == 0
            || self.engine.max_batch == 0
            || self.engine.max_sequences == 0
            || self.engine.queue_timeout_ms == 0
            || self.engine.breaker_failures == 0
        {
            return Err(ConfigError::Invalid(
                "engine.queue_capacity, engine.max_batch, engine.max_sequences, \
                 engine.queue_timeout_ms and engine.breaker_failures must be positive"
                    .into(),
            ));
        }
        if self.header_limit_bytes < 4096 || self.header_limit_bytes > 1 << 20 {
            return Err(ConfigError::Invalid(
                "header_limit_bytes must be between 4096 and 1048576".into(),
            ));
        }
        if self.header_timeout_secs == 0 || self.body_timeout_secs == 0 || self.max_connections == 0
        {
            return Err(ConfigError::Invalid(
                "header_timeout_secs, body_timeout_secs and max_connections must be positive"
                    .into(),
            ));
        }
        let r = &self.realtime;
        if r.max_connections == 0
            || r.max_connections_per_principal == 0
            || r.idle_timeout_secs == 0
            || r.ping_interval_secs == 0
            || r.max_queued_events < 16
        {
            return Err(ConfigError::Invalid(
                "realtime.max_connections, realtime.max_connections_per_principal, \
                 realtime.idle_timeout_secs and realtime.ping_interval_secs must be positive, \
                 realtime.max_queued_events at least 16"
                    .into(),
            ));
        }
        if self.text_model_id().is_empty() {
            return Err(ConfigError::Invalid(
                "text_model must name a .gguf file".into(),
            ));
        }
        Ok(())
    }

    /// The bounds of the HTTP listeners.
    pub fn http_limits(&self) -> crate::http::serve::Limits {
        crate::http::serve::Limits {
            header_bytes: self.header_limit_bytes,
            header_timeout: Duration::from_secs(self.header_timeout_secs),
            connections: self.max_connections,
        }
    }

    /// The text model's file.
    pub fn text_model_file(&self) -> PathBuf {
        self.models_dir.join(&self.text_model)
    }

    /// The id clients use for the text model: its file name up to the first `.`
    /// (`SmolLM2-135M-Instruct.Q4_1.gguf` is `SmolLM2-135M-Instruct`).
    pub fn text_model_id(&self) -> String {
        let name = crate::plugins::file_name(&self.text_model);
        name.split('.').next().unwrap_or_default().to_string()
    }

    /// The slot's plugin, read from its file, with `config_json` as its configuration.
    pub fn plugin_source(
        &self,
        slot: Slot,
        config_json: String,
    ) -> Result<PluginSource, LoadError> {
        let s = self.plugins.slot(slot);
        let mut source = PluginSource::from_file(
            slot,
            &self.plugin_file(slot),
            s.sha256.clone(),
            config_json,
            s.limits(slot),
        )?;
        source.failure = s.failure.unwrap_or(FailurePolicy::default_for(slot));
        Ok(source)
    }

    /// The slot's own configuration table as JSON text.
    pub fn plugin_config_json(&self, slot: Slot) -> String {
        serde_json::Value::Object(self.plugins.slot(slot).config.clone()).to_string()
    }

    /// The settings that differ from `other` and take effect only on a restart.
    pub fn restart_required(&self, other: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let mut check = |name, differs: bool| {
            if differs {
                changed.push(name);
            }
        };
        check("listen", self.listen != other.listen);
        check("models_dir", self.models_dir != other.models_dir);
        check("text_model", self.text_model != other.text_model);
        check(
            "body_limit_bytes",
            self.body_limit_bytes != other.body_limit_bytes,
        );
        check(
            "header_limit_bytes",
            self.header_limit_bytes != other.header_limit_bytes,
        );
        check(
            "header_timeout_secs",
            self.header_timeout_secs != other.header_timeout_secs,
        );
        check(
            "body_timeout_secs",
            self.body_timeout_secs != other.body_timeout_secs,
        );
        check(
            "max_connections",
            self.max_connections != other.max_connections,
        );
        check("engine", self.engine != other.engine);
        check("realtime", self.realtime != other.realtime);
        check(
            "shutdown_grace_secs",
            self.shutdown_grace_secs != other.shutdown_grace_secs,
        );
        check(
            "shutdown_delay_ms",
            self.shutdown_delay_ms != other.shutdown_delay_ms,
        );
        check("admin_listen", self.admin_listen != other.admin_listen);
        check("admin_token", self.admin_token != other.admin_token);
        check("cache_dir", self.cache_dir != other.cache_dir);
        check("audit_log", self.audit_log != other.audit_log);
        changed
    }

    /// The component file of `slot`.
    pub fn plugin_file(&self, slot: Slot) -> PathBuf {
        match &self.plugins.slot(slot).file {
            Some(f) => self.plugin_dir.join(f),
            None => self.plugin_dir.join(default_plugin_file(slot)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show_in_debug() {
        let config = Config {
            api_key: Some(Secret::new("sk-very-secret")),
            ..Config::default()
        };
        let text = format!("{config:?}");
        assert!(!text.contains("sk-very-secret") && text.contains("<redacted>"));
    }

    #[test]
    fn unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("warden.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:9\"\nlisten_port = 3\n").unwrap();
        let err = Config::from_toml_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("listen_port") && err.starts_with("config file warden.toml"),
            "{err}"
        );
        assert!(!err.contains(&dir.path().display().to_string()), "{err}");
    }

    #[test]
    fn a_pinned_file_needs_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.toml");
        std::fs::write(&path, "[plugins.auth]\nfile = \"x.wasm\"\n").unwrap();
        let err = Config::from_toml_file(&path).unwrap_err().to_string();
        assert!(err.contains("plugins.auth.sha256 is required"), "{err}");
    }

    #[test]
    fn unsafe_settings_are_refused() {
        let c = Config {
            admin_token: Some(Secret::new("short")),
            ..Config::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("at least 32")
        );
        let mut c = Config::default();
        c.plugins.auth.failure = Some(FailurePolicy::Open);
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("must be \"closed\"")
        );
        let mut c = Config::default();
        c.plugins.metrics_policy.failure = Some(FailurePolicy::Closed);
        assert!(c.validate().is_ok());
        c.plugins.sanitizer.sha256 = Some("xyz".into());
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("64 hexadecimal")
        );
        assert!(
            Config::default().admin_token.is_none(),
            "admin API off by default"
        );
        assert!(Config::default().listen.ip().is_loopback());
        assert!(Config::default().admin_listen.ip().is_loopback());
    }

    #[test]
    fn restart_only_settings_are_named() {
        let a = Config::default();
        let mut b = a.clone();
        b.listen = "127.0.0.1:1".parse().unwrap();
        b.plugins.sanitizer.deadline_ms = 5;
        assert_eq!(a.restart_required(&b), ["listen"]);
    }

    #[test]
    fn limits_are_checked() {
        let mut c = Config::default();
        c.plugins.auth.deadline_ms = 0;
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.plugins.sanitizer.memory_mib = 100_000;
        assert!(c.validate().is_err());
        assert!(Config::default().validate().is_ok());
    }
}
