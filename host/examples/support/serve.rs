//! Starting the release `warden serve` for a benchmark: a free port, the reference plugins,
//! one API key for inference and metrics, JSON logs read back until it is ready.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

/// A running server and its log lines after `ready`.
pub struct Served {
    pub child: Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    /// Log lines, parsed (a line that is not JSON comes as `{"fields": {"message": line}}`).
    /// Not every benchmark reads them.
    #[allow(dead_code)]
    pub logs: std::sync::mpsc::Receiver<Value>,
    _dir: tempfile::TempDir,
}

impl Served {
    /// Start `bin` and wait (up to two minutes) until it says `ready`. Not every benchmark
    /// uses both constructors.
    #[allow(dead_code)]
    pub fn start(bin: &str, models: &str, plugins: &str, key: &str) -> Served {
        Self::start_with(bin, models, plugins, key, &[])
    }

    /// [`Served::start`] with more `WARDEN_*` settings in the environment.
    pub fn start_with(
        bin: &str,
        models: &str,
        plugins: &str,
        key: &str,
        env: &[(&str, &str)],
    ) -> Served {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("warden.toml");
        std::fs::write(
            &config,
            "listen = \"127.0.0.1:0\"\ncache_dir = \"\"\naudit_log = \"\"\n",
        )
        .expect("config");
        let mut child = Command::new(bin)
            .args(["--log-json", "serve", "--config"])
            .arg(&config)
            .env("WARDEN_MODELS_DIR", models)
            .env("WARDEN_PLUGIN_DIR", plugins)
            .env("WARDEN_API_KEY", key)
            .env("WARDEN_METRICS_API_KEY", key)
            .env("RUST_LOG", "warn,warden=info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn warden serve");
        let stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let (tx, rx) = std::sync::mpsc::channel::<Value>();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let v: Value =
                    serde_json::from_str(&line).unwrap_or(json!({"fields": {"message": line}}));
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        let mut addr = String::new();
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(120))
                .expect("the server starts");
            let message = line["fields"]["message"].as_str().unwrap_or_default();
            if message == "listening" {
                addr = line["fields"]["addr"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
            }
            if message == "ready" {
                break;
            }
            assert!(message != "start-up failed", "{line}");
        }
        Served {
            child,
            base: format!("http://{addr}"),
            logs: rx,
            _dir: dir,
        }
    }
}
