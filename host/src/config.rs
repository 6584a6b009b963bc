//! One configuration struct: built-in defaults < TOML file < `WARDEN_*` environment < flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::plugins::{Limits, MAX_MEMORY_BYTES, Slot};

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
    /// Memory cap in MiB.
    pub memory_mib: u64,
}

impl Default for SlotConfig {
    fn default() -> Self {
        let limits = Limits::default();
        Self {
            file: None,
            sha256: None,
            config: serde_json::Map::new(),
            deadline_ms: limits.deadline.as_millis() as u64,
            memory_mib: (limits.memory_bytes >> 20) as u64,
        }
    }
}

impl SlotConfig {
    /// The call bounds.
    pub fn limits(&self) -> Limits {
        Limits {
            deadline: Duration::from_millis(self.deadline_ms),
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
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 64,
            max_batch: 32,
            max_sequences: 4,
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
    /// Engine settings.
    pub engine: EngineConfig,
    /// Plugin slots.
    pub plugins: PluginsConfig,
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
            engine: EngineConfig::default(),
            plugins: PluginsConfig::default(),
        }
    }
}

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
    match slot {
        Slot::Auth => "auth-api-key.wasm",
        Slot::Sanitizer => "sanitize-basic.wasm",
        Slot::MetricsPolicy => "metrics-policy-basic.wasm",
    }
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
        for slot in [Slot::Auth, Slot::Sanitizer, Slot::MetricsPolicy] {
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
        for slot in [Slot::Auth, Slot::Sanitizer, Slot::MetricsPolicy] {
            let s = self.plugins.slot(slot);
            if s.deadline_ms == 0 || s.deadline_ms > 10_000 {
                return Err(ConfigError::Invalid(format!(
                    "plugins.{slot}.deadline_ms must be between 1 and 10000"
                )));
            }
            if s.memory_mib == 0 || s.limits().memory_bytes > MAX_MEMORY_BYTES {
                return Err(ConfigError::Invalid(format!(
                    "plugins.{slot}.memory_mib must be between 1 and {}",
                    MAX_MEMORY_BYTES >> 20
                )));
            }
        }
        if self.engine.queue_capacity == 0
            || self.engine.max_batch == 0
            || self.engine.max_sequences == 0
        {
            return Err(ConfigError::Invalid(
                "engine.queue_capacity, engine.max_batch and engine.max_sequences must be positive"
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

    /// The component file of `slot`.
    pub fn plugin_file(&self, slot: Slot) -> PathBuf {
        match &self.plugins.slot(slot).file {
            Some(f) => self.plugin_dir.join(f),
            None => self.plugin_dir.join(default_plugin_file(slot)),
        }
    }
}

/// `warden serve` flags; each also reads a `WARDEN_*` variable.
#[derive(Debug, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "WARDEN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Listen address [default: 127.0.0.1:8080].
    #[arg(long, env = "WARDEN_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Models directory [default: models].
    #[arg(long, env = "WARDEN_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
    /// Text model GGUF, relative to the models directory
    /// [default: SmolLM2-135M-Instruct.Q4_1.gguf].
    #[arg(long, env = "WARDEN_TEXT_MODEL")]
    pub text_model: Option<PathBuf>,
    /// Plugin components directory [default: target/plugins].
    #[arg(long, env = "WARDEN_PLUGIN_DIR")]
    pub plugin_dir: Option<PathBuf>,
    /// API key with scope `inference`.
    #[arg(long, env = "WARDEN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// API key with scope `metrics`.
    #[arg(long, env = "WARDEN_METRICS_API_KEY", hide_env_values = true)]
    pub metrics_api_key: Option<String>,
}

impl ServeArgs {
    /// Resolve: flags and environment over the file over the defaults.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::from_toml_file(path)?,
            None => Config::default(),
        };
        if let Some(v) = self.listen {
            config.listen = v;
        }
        if let Some(v) = self.models_dir {
            config.models_dir = v;
        }
        if let Some(v) = self.text_model {
            config.text_model = v;
        }
        if let Some(v) = self.plugin_dir {
            config.plugin_dir = v;
        }
        if let Some(v) = self.api_key.filter(|k| !k.is_empty()) {
            config.api_key = Some(Secret(v));
        }
        if let Some(v) = self.metrics_api_key.filter(|k| !k.is_empty()) {
            config.metrics_api_key = Some(Secret(v));
        }
        config.validate()?;
        Ok(config)
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
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\nmodels_dir = \"m\"\n[plugins.sanitizer.config]\nmax_texts = 3\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            listen: Some("127.0.0.1:9001".parse().unwrap()),
            ..ServeArgs::default()
        };
        let config = args.resolve().unwrap();
        assert_eq!(config.listen.port(), 9001);
        assert_eq!(config.models_dir, PathBuf::from("m"));
        assert_eq!(config.plugins.sanitizer.config["max_texts"], 3);
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
