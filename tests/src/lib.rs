//! Helpers for the end-to-end tests: a real Warden on `127.0.0.1:0` with the real plugin
//! components (built by `build.rs`) and the real models, and a real HTTP client.

use std::path::PathBuf;
use std::time::Duration;

use warden::Server;
use warden::config::{Config, Secret};
use warden::plugins::{Limits, PluginSource, Slot};

/// Where `build.rs` put the components (`auth-api-key.wasm`, ..., `misbehave.wasm`).
pub const PLUGIN_DIR: &str = env!("WARDEN_TEST_PLUGIN_DIR");

/// The inference key every test server accepts.
pub const INFERENCE_KEY: &str = "test-inference-key-4c1d";
/// The metrics key every test server accepts.
pub const METRICS_KEY: &str = "test-metrics-key-9f2e";

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("WARDEN_TEST_ROOT"))
}

/// The models directory; `make models` fills it.
pub fn models_dir() -> PathBuf {
    let dir =
        std::env::var_os("WARDEN_MODELS_DIR").map_or_else(|| root().join("models"), PathBuf::from);
    assert!(
        dir.join(warden::EMBEDDING_MODEL)
            .join("model.safetensors")
            .is_file(),
        "models are missing: run `make models` (make test does)"
    );
    dir
}

/// Plugin call deadline in tests. The suite runs many servers and models at once on a
/// 2-core machine, where a well-behaved 30 µs call can wait longer than the 10 ms default
/// for a core; the deadline's own behaviour is tested with explicit, lower values.
pub const TEST_DEADLINE: Duration = Duration::from_millis(100);

/// A test configuration: loopback, ephemeral port, the two test keys.
pub fn config() -> Config {
    Config {
        models_dir: models_dir(),
        ..plugin_config()
    }
}

/// [`config`] without the models: for in-process tests, which load only the plugins.
pub fn plugin_config() -> Config {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        plugin_dir: PathBuf::from(PLUGIN_DIR),
        api_key: Some(Secret::new(INFERENCE_KEY)),
        metrics_api_key: Some(Secret::new(METRICS_KEY)),
        ..Config::default()
    };
    // Tests that exercise the disk cache set their own directory.
    config.cache_dir = PathBuf::new();
    // Tests that read the audit file set their own.
    config.audit_log = PathBuf::new();
    let ms = TEST_DEADLINE.as_millis() as u64;
    config.plugins.auth.deadline_ms = ms;
    config.plugins.sanitizer.deadline_ms = ms;
    config.plugins.metrics_policy.deadline_ms = ms;
    config
}

/// The admin token of [`admin_config`] servers.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef-5a7c";

/// [`config`] with the admin API on an ephemeral loopback port.
pub fn admin_config() -> Config {
    Config {
        admin_listen: "127.0.0.1:0".parse().expect("addr"),
        admin_token: Some(Secret::new(ADMIN_TOKEN)),
        ..config()
    }
}

/// sha256 (hex) of a component in `PLUGIN_DIR`.
pub fn plugin_sha256(name: &str) -> String {
    let bytes = std::fs::read(PathBuf::from(PLUGIN_DIR).join(format!("{name}.wasm")))
        .expect("fixture component");
    sha256_hex(&bytes)
}

/// The auth plugin configuration accepting these `(id, key, scopes)`.
pub fn auth_keys(keys: &[(&str, &str, &[&str])]) -> serde_json::Value {
    use sha2::Digest;
    let keys: Vec<_> = keys
        .iter()
        .map(|(id, key, scopes)| {
            serde_json::json!({
                "id": id,
                "sha256": hex::encode(sha2::Sha256::digest(key.as_bytes())),
                "scopes": scopes,
            })
        })
        .collect();
    serde_json::json!({ "keys": keys })
}

/// A component from `PLUGIN_DIR` as a plugin source.
pub fn source(slot: Slot, name: &str, config: serde_json::Value) -> PluginSource {
    let path = PathBuf::from(PLUGIN_DIR).join(format!("{name}.wasm"));
    let limits = Limits {
        deadline: TEST_DEADLINE,
        ..Limits::default()
    };
    PluginSource::from_file(slot, &path, None, config.to_string(), limits)
        .expect("fixture component")
}

/// The component `bytes` as if built against `warden:policy@{version}`: every
/// `warden:policy/...@0.1.0` name rewritten in place (same length, so the binary stays
/// well-formed). Stands in for a plugin built against another release of the WIT package.
pub fn with_wit_version(bytes: &[u8], version: &str) -> Vec<u8> {
    let from = format!("@{}", warden::plugins::WIT_VERSION);
    let to = format!("@{version}");
    assert_eq!(from.len(), to.len(), "same-length versions only");
    let mut out = bytes.to_vec();
    let mut i = 0;
    let mut replaced = 0;
    while let Some(pos) = out[i..]
        .windows(from.len())
        .position(|w| w == from.as_bytes())
    {
        let at = i + pos;
        let before = &out[at.saturating_sub(40)..at];
        if before.windows(14).any(|w| w == b"warden:policy/") {
            out[at..at + to.len()].copy_from_slice(to.as_bytes());
            replaced += 1;
        }
        i = at + from.len();
    }
    assert!(replaced > 0, "no warden:policy names found");
    out
}

/// A running server and a client for it.
pub struct TestServer {
    /// The server.
    pub server: Server,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// A client with no default headers.
    pub client: reqwest::Client,
}

/// sha256 (hex) of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

impl From<Server> for TestServer {
    /// Wrap a server that is already ready.
    fn from(server: Server) -> Self {
        let base = format!("http://{}", server.addr());
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .expect("client");
        TestServer {
            server,
            base,
            client,
        }
    }
}

/// Start a server and wait until it is ready.
pub async fn start(config: Config) -> TestServer {
    let server = Server::start(config).await.expect("server starts");
    tokio::time::timeout(Duration::from_secs(120), server.ready())
        .await
        .expect("ready in time")
        .expect("loads");
    TestServer::from(server)
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    /// Status.
    pub status: u16,
    /// Headers.
    pub headers: reqwest::header::HeaderMap,
    /// Body text.
    pub text: String,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// Assert an OpenAI-style error with this status; returns the `error` object.
    pub fn error(&self, status: u16) -> serde_json::Value {
        assert_eq!(self.status, status, "body: {}", self.text);
        let e = self.json()["error"].clone();
        assert!(
            e["message"].is_string() && e["type"].is_string(),
            "error shape: {}",
            self.text
        );
        assert!(
            e.get("param").is_some() && e.get("code").is_some(),
            "error shape: {}",
            self.text
        );
        // No filesystem path of this deployment and no source location.
        let leaks = [
            root().display().to_string(),
            models_dir().display().to_string(),
            PLUGIN_DIR.to_string(),
            ".rs:".to_string(),
        ];
        for leak in &leaks {
            assert!(
                !self.text.contains(leak.as_str()),
                "leak of {leak}: {}",
                self.text
            );
        }
        e
    }
}

impl TestServer {
    /// Full URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Send a request and read the reply.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.expect("body");
        Reply {
            status,
            headers,
            text,
        }
    }

    /// POST JSON with an optional bearer key.
    pub async fn post(&self, path: &str, key: Option<&str>, body: &serde_json::Value) -> Reply {
        let mut r = self.client.post(self.url(path)).json(body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        self.send(r).await
    }

    /// GET with an optional bearer key.
    pub async fn get(&self, path: &str, key: Option<&str>) -> Reply {
        let mut r = self.client.get(self.url(path));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        self.send(r).await
    }

    /// A POST to `/v1/embeddings` with a raw body of `content_type`, and `key` if given.
    pub fn raw_embeddings(
        &self,
        key: Option<&str>,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::RequestBuilder {
        let mut r = self
            .client
            .post(self.url("/v1/embeddings"))
            .header("content-type", content_type)
            .body(body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r
    }

    /// The admin API's base URL.
    pub fn admin_url(&self, path: &str) -> String {
        let addr = self.server.admin_addr().expect("the admin API runs");
        format!("http://{addr}{path}")
    }

    /// An admin request with the admin token.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.admin_url(path))
            .bearer_auth(ADMIN_TOKEN)
    }

    /// Start a greedy chat stream with the inference key; returns the response after its
    /// first chunk, and that chunk.
    pub async fn open_stream(&self, prompt: &str, max_tokens: u32) -> (reqwest::Response, String) {
        let mut response = self
            .client
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(INFERENCE_KEY)
            .json(&serde_json::json!({
                "model": TEXT_MODEL,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": true,
            }))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
        let first = response
            .chunk()
            .await
            .expect("chunk")
            .expect("a first chunk");
        (response, String::from_utf8(first.to_vec()).expect("UTF-8"))
    }

    /// POST to `/v1/embeddings` with the inference key.
    pub async fn embed(&self, body: serde_json::Value) -> Reply {
        self.post("/v1/embeddings", Some(INFERENCE_KEY), &body)
            .await
    }
}

/// The text model every test server serves.
pub const TEXT_MODEL: &str = "SmolLM2-135M-Instruct";

/// Read the rest of a stream opened by [`TestServer::open_stream`]; a cut connection fails.
pub async fn read_rest(mut response: reqwest::Response, mut text: String) -> Events {
    while let Some(chunk) = response
        .chunk()
        .await
        .expect("a clean end, not a cut socket")
    {
        text.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
    }
    Events::parse(&text)
}

/// A server-sent event stream, read whole.
#[derive(Debug)]
pub struct Events {
    /// Each `data:` payload that is JSON, in order.
    pub chunks: Vec<serde_json::Value>,
    /// Whether the last event was `[DONE]`.
    pub done: bool,
}

impl Events {
    /// Parse an SSE body. Panics on anything that is not `data:` events.
    pub fn parse(body: &str) -> Self {
        let mut chunks = Vec::new();
        let mut done = false;
        for event in body.split("\n\n").filter(|e| !e.trim().is_empty()) {
            assert!(!done, "an event after [DONE]: {body}");
            let data = event
                .strip_prefix("data:")
                .unwrap_or_else(|| panic!("not a data event: {event:?}"))
                .trim_start();
            if data == "[DONE]" {
                done = true;
            } else {
                chunks.push(serde_json::from_str(data).expect("chunk is JSON"));
            }
        }
        Self { chunks, done }
    }

    /// The concatenated text of chat deltas or completion chunks.
    pub fn text(&self) -> String {
        self.chunks
            .iter()
            .filter_map(|c| c["choices"].get(0))
            .filter_map(|c| c["delta"]["content"].as_str().or(c["text"].as_str()))
            .collect()
    }

    /// The finish reasons given, in order.
    pub fn finish_reasons(&self) -> Vec<String> {
        self.chunks
            .iter()
            .filter_map(|c| c["choices"].get(0))
            .filter_map(|c| c["finish_reason"].as_str().map(str::to_string))
            .collect()
    }
}

impl TestServer {
    /// POST to an inference route with the inference key.
    pub async fn infer(&self, path: &str, body: serde_json::Value) -> Reply {
        self.post(path, Some(INFERENCE_KEY), &body).await
    }

    /// A greedy chat completion of `messages`; returns the whole response.
    pub async fn chat(&self, messages: serde_json::Value, max_tokens: u32) -> serde_json::Value {
        let body = serde_json::json!({
            "model": TEXT_MODEL, "messages": messages, "temperature": 0, "max_tokens": max_tokens,
        });
        let reply = self.infer("/v1/chat/completions", body).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        reply.json()
    }

    /// A greedy text completion of `prompt` (text or token ids).
    pub async fn complete(&self, prompt: serde_json::Value, max_tokens: u32) -> serde_json::Value {
        let body = serde_json::json!({
            "model": TEXT_MODEL, "prompt": prompt, "temperature": 0, "max_tokens": max_tokens,
        });
        let reply = self.infer("/v1/completions", body).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        reply.json()
    }
}
