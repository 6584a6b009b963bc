//! `warden serve`'s flags, each also read from a `WARDEN_*` variable, and how they overlay
//! the configuration file.

use std::path::PathBuf;

use super::slot_flags::SlotFlags;
use super::*;

/// `warden serve` flags; each also reads a `WARDEN_*` variable. Precedence: flag >
/// environment > file > built-in default.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file (re-read on SIGHUP and `POST /admin/reload`).
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
    /// Where a generated key is kept when none is configured [default: .warden/api-key].
    #[arg(long, env = "WARDEN_GENERATED_KEY_FILE")]
    pub generated_key_file: Option<PathBuf>,
    /// Largest request body in bytes [default: 2097152].
    #[arg(long, env = "WARDEN_BODY_LIMIT_BYTES")]
    pub body_limit_bytes: Option<u64>,
    /// Largest request head (request line and headers) in bytes; larger is 431 [default: 65536].
    #[arg(long, env = "WARDEN_HEADER_LIMIT_BYTES")]
    pub header_limit_bytes: Option<usize>,
    /// Seconds a client may take to send its request head [default: 10].
    #[arg(long, env = "WARDEN_HEADER_TIMEOUT_SECS")]
    pub header_timeout_secs: Option<u64>,
    /// Seconds a client may take to send its request body; slower is 408 [default: 30].
    #[arg(long, env = "WARDEN_BODY_TIMEOUT_SECS")]
    pub body_timeout_secs: Option<u64>,
    /// Most client connections open at once, per listener [default: 1024].
    #[arg(long, env = "WARDEN_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Seconds requests in flight get to finish on shutdown [default: 30].
    #[arg(long, env = "WARDEN_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<u64>,
    /// Milliseconds `/ready` says 503 before the listener closes on shutdown [default: 0].
    #[arg(long, env = "WARDEN_SHUTDOWN_DELAY_MS")]
    pub shutdown_delay_ms: Option<u64>,
    /// Requests that may wait per model [default: 64].
    #[arg(long, env = "WARDEN_QUEUE_CAPACITY")]
    pub queue_capacity: Option<usize>,
    /// Most texts per embedding forward pass [default: 32].
    #[arg(long, env = "WARDEN_MAX_BATCH")]
    pub max_batch: Option<usize>,
    /// Text sequences generated together [default: 8].
    #[arg(long, env = "WARDEN_MAX_SEQUENCES")]
    pub max_sequences: Option<usize>,
    /// The embedding model's arithmetic, `auto`, `f32` or `bf16` [default: auto].
    #[arg(long, env = "WARDEN_EMBEDDING_PRECISION", value_parser = parse_precision)]
    pub embedding_precision: Option<PrecisionSetting>,
    /// Milliseconds a request may wait for the engine before it gets 503 [default: 30000].
    #[arg(long, env = "WARDEN_QUEUE_TIMEOUT_MS")]
    pub queue_timeout_ms: Option<u64>,
    /// Positions of finished generations' KV caches kept for reuse by a prompt that starts
    /// the same way; 0 keeps none [default: 4096].
    #[arg(long, env = "WARDEN_PREFIX_CACHE_TOKENS")]
    pub prefix_cache_tokens: Option<usize>,
    /// Engine failures in a row that open a model's circuit breaker [default: 5].
    #[arg(long, env = "WARDEN_BREAKER_FAILURES")]
    pub breaker_failures: Option<u32>,
    /// Milliseconds an open circuit breaker refuses requests [default: 10000].
    #[arg(long, env = "WARDEN_BREAKER_COOLDOWN_MS")]
    pub breaker_cooldown_ms: Option<u64>,
    /// Most Realtime API sessions open at once [default: 256].
    #[arg(long, env = "WARDEN_REALTIME_MAX_CONNECTIONS")]
    pub realtime_max_connections: Option<usize>,
    /// Most Realtime API sessions one principal may hold open [default: 16].
    #[arg(long, env = "WARDEN_REALTIME_MAX_CONNECTIONS_PER_PRINCIPAL")]
    pub realtime_max_connections_per_principal: Option<usize>,
    /// Seconds a Realtime session may go without a client event before it is closed
    /// [default: 300].
    #[arg(long, env = "WARDEN_REALTIME_IDLE_TIMEOUT_SECS")]
    pub realtime_idle_timeout_secs: Option<u64>,
    /// Seconds between the server's pings of a Realtime session [default: 30].
    #[arg(long, env = "WARDEN_REALTIME_PING_INTERVAL_SECS")]
    pub realtime_ping_interval_secs: Option<u64>,
    /// Server events a Realtime session may have waiting for a slow client before it is
    /// closed [default: 1024].
    #[arg(long, env = "WARDEN_REALTIME_MAX_QUEUED_EVENTS")]
    pub realtime_max_queued_events: Option<usize>,
    /// Admin API listen address [default: 127.0.0.1:8081].
    #[arg(long, env = "WARDEN_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Admin API bearer token, at least 32 characters; the admin API is off without it.
    #[arg(long, env = "WARDEN_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Compiled-plugin cache directory; empty turns it off [default: .warden/cache].
    #[arg(long, env = "WARDEN_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// File every plugin change is appended to; empty turns it off
    /// [default: .warden/audit.jsonl].
    #[arg(long, env = "WARDEN_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// Per-slot flags (`--auth-plugin`, `--sanitizer-deadline-ms`, …), made from the
    /// slot kinds.
    #[command(flatten)]
    pub slots: SlotFlags,
}

/// A precision named on the command line or in the environment.
fn parse_precision(name: &str) -> Result<PrecisionSetting, String> {
    PrecisionSetting::parse(name)
        .ok_or_else(|| format!("`{name}` is not a precision: use auto, f32 or bf16"))
}

fn set_some<T>(field: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *field = v;
    }
}

impl ServeArgs {
    /// Resolve: flags and environment over the file over the defaults.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let this = self.clone();
        let mut config = match &this.config {
            Some(path) => Config::from_toml_file(path)?,
            None => Config::default(),
        };
        set_some(&mut config.listen, this.listen);
        set_some(&mut config.models_dir, this.models_dir);
        set_some(&mut config.text_model, this.text_model);
        set_some(&mut config.plugin_dir, this.plugin_dir);
        set_some(&mut config.generated_key_file, this.generated_key_file);
        set_some(&mut config.admin_listen, this.admin_listen);
        set_some(&mut config.cache_dir, this.cache_dir);
        set_some(&mut config.audit_log, this.audit_log);
        set_some(&mut config.body_limit_bytes, this.body_limit_bytes);
        set_some(&mut config.header_limit_bytes, this.header_limit_bytes);
        set_some(&mut config.header_timeout_secs, this.header_timeout_secs);
        set_some(&mut config.body_timeout_secs, this.body_timeout_secs);
        set_some(&mut config.max_connections, this.max_connections);
        set_some(&mut config.shutdown_grace_secs, this.shutdown_grace_secs);
        set_some(&mut config.shutdown_delay_ms, this.shutdown_delay_ms);
        if let Some(v) = this.queue_capacity {
            config.engine.queue_capacity = v;
        }
        if let Some(v) = this.max_batch {
            config.engine.max_batch = v;
        }
        if let Some(v) = this.max_sequences {
            config.engine.max_sequences = v;
        }
        if let Some(v) = this.embedding_precision {
            config.engine.embedding_precision = v;
        }
        set_some(&mut config.engine.queue_timeout_ms, this.queue_timeout_ms);
        set_some(&mut config.engine.breaker_failures, this.breaker_failures);
        set_some(
            &mut config.engine.prefix_cache_tokens,
            this.prefix_cache_tokens,
        );
        set_some(
            &mut config.engine.breaker_cooldown_ms,
            this.breaker_cooldown_ms,
        );
        let r = &mut config.realtime;
        set_some(&mut r.max_connections, this.realtime_max_connections);
        set_some(
            &mut r.max_connections_per_principal,
            this.realtime_max_connections_per_principal,
        );
        set_some(&mut r.idle_timeout_secs, this.realtime_idle_timeout_secs);
        set_some(&mut r.ping_interval_secs, this.realtime_ping_interval_secs);
        set_some(&mut r.max_queued_events, this.realtime_max_queued_events);
        let secret = |v: Option<String>| v.filter(|k| !k.is_empty()).map(Secret);
        if let Some(v) = secret(this.api_key) {
            config.api_key = Some(v);
        }
        if let Some(v) = secret(this.metrics_api_key) {
            config.metrics_api_key = Some(v);
        }
        if let Some(v) = secret(this.admin_token) {
            config.admin_token = Some(v);
        }
        for slot in Slot::ALL {
            this.slots
                .slot(slot)
                .overlay(slot, config.plugins.slot_mut(slot))?;
        }
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn every_setting_has_a_flag_and_flags_win() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.toml");
        std::fs::write(
            &path,
            "body_limit_bytes = 10\n[engine]\nmax_sequences = 2\n\
             [plugins.auth]\nfile = \"a.wasm\"\nsha256 = \"",
        )
        .unwrap();
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&format!("{}\"\ndeadline_ms = 7\n", "a".repeat(64)));
        std::fs::write(&path, text).unwrap();
        let cli = Cli::try_parse_from([
            "warden",
            "--config",
            path.to_str().unwrap(),
            "--max-sequences",
            "3",
            "--auth-deadline-ms",
            "9",
            "--sanitizer-plugin-config",
            r#"{"max_texts": 2}"#,
            "--metrics-policy-failure",
            "closed",
            "--admin-token",
            "t0123456789abcdef0123456789abcdef",
        ])
        .unwrap();
        let c = cli.serve.resolve().unwrap();
        assert_eq!(c.body_limit_bytes, 10, "file over default");
        assert_eq!(c.engine.max_sequences, 3, "flag over file");
        assert_eq!(c.plugins.auth.deadline_ms, 9);
        assert_eq!(c.plugins.auth.sha256.as_deref(), Some(&*"a".repeat(64)));
        assert_eq!(c.plugins.sanitizer.config["max_texts"], 2);
        assert_eq!(
            c.plugins.metrics_policy.failure,
            Some(FailurePolicy::Closed)
        );
        assert!(!format!("{c:?}").contains("t0123456789abcdef"));

        // A new file from a flag drops the file's digest, which was for another file.
        let cli = Cli::try_parse_from([
            "warden",
            "--config",
            path.to_str().unwrap(),
            "--auth-plugin",
            "b.wasm",
        ])
        .unwrap();
        assert_eq!(cli.serve.resolve().unwrap().plugins.auth.sha256, None);
    }
}
