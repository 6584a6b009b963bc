//! The `warden` binary as operators and plugin authors run it: `plugin inspect`,
//! `plugin check`, and `serve` with a configuration file that SIGHUP reloads and SIGTERM
//! ends cleanly.
//!
//! The components come from `target/wasm-plugins`, which the end-to-end tests' build
//! script fills during the same `cargo test --workspace` build (`make test`).

// Test helpers outside `#[test]` functions may unwrap: a failure is a test failure.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_warden");
const API_KEY: &str = "cli-test-inference-key-31f0";
const ADMIN_TOKEN: &str = "cli-test-admin-token-0123456789abcdef";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A reference component, by package name.
fn component(package: &str) -> PathBuf {
    let path = root().join(format!(
        "target/wasm-plugins/wasm32-wasip2/release/{}.wasm",
        package.replace('-', "_")
    ));
    assert!(
        path.is_file(),
        "{} is missing: build the plugins (`make plugins`; `make test` does)",
        path.display()
    );
    path
}

/// A plugin directory under `root` with the three reference components.
fn plugin_dir(root: &Path) -> PathBuf {
    let plugins = root.join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    for p in ["auth-api-key", "sanitize-basic", "metrics-policy-basic"] {
        std::fs::copy(component(p), plugins.join(format!("{p}.wasm"))).unwrap();
    }
    plugins
}

fn models_dir() -> PathBuf {
    let dir =
        std::env::var_os("WARDEN_MODELS_DIR").map_or_else(|| root().join("models"), PathBuf::from);
    assert!(
        dir.join("all-MiniLM-L6-v2/model.safetensors").is_file(),
        "models are missing: run `make models` (make test does)"
    );
    dir
}

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN).args(args).output().expect("run warden");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn inspect_names_world_version_and_digest() {
    let file = component("auth-api-key");
    let (ok, out) = run(&["plugin", "inspect", file.to_str().unwrap(), "--json"]);
    assert!(ok, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["world"], "warden:policy/auth-plugin");
    assert_eq!(report["wit_versions"], serde_json::json!(["0.1.0"]));
    assert_eq!(report["served"], true);
    assert_eq!(report["sha256"].as_str().unwrap().len(), 64);
    assert!(
        report["exports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "warden:policy/auth@0.1.0")
    );
    let (ok, out) = run(&["plugin", "inspect", file.to_str().unwrap()]);
    assert!(
        ok && out.contains("world:    warden:policy/auth-plugin"),
        "{out}"
    );
}

#[test]
fn test_runs_a_case_file_and_exits_by_its_verdict() {
    let auth = component("auth-api-key");
    let dir = root().join("plugins/auth-api-key/tests");
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cases = dir.join("cases.jsonl");
    let args = |cases: &str, json: bool| {
        let mut a = vec![
            "plugin".to_string(),
            "test".into(),
            auth.to_str().unwrap().into(),
            "--slot".into(),
            "auth".into(),
            "--config".into(),
            config.clone(),
            "--cases".into(),
            cases.into(),
        ];
        if json {
            a.push("--json".into());
        }
        a
    };
    let (ok, out) = run(&args(cases.to_str().unwrap(), false)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert!(ok, "{out}");
    assert!(
        out.contains("PASS a configured key is its principal"),
        "{out}"
    );
    assert!(
        out.contains("instantiate") && out.contains("memory"),
        "{out}"
    );
    assert!(out.trim_end().ends_with("5 passed, 0 failed"), "{out}");

    let (ok, out) = run(&args(cases.to_str().unwrap(), true)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert!(ok, "{out}");
    let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(first["passed"], true);
    assert!(first["configure_us"].as_f64().is_some());

    let tmp = tempfile::tempdir().unwrap();
    let wrong = tmp.path().join("wrong.jsonl");
    std::fs::write(
        &wrong,
        r#"{"name": "no key is not alice", "request": {}, "expect": {"principal": {"id": "alice"}}}"#,
    )
    .unwrap();
    let (ok, out) = run(&args(wrong.to_str().unwrap(), false)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert!(!ok, "{out}");
    assert!(out.contains("FAIL no key is not alice"), "{out}");
    assert!(out.contains("answered: {\"refusal\""), "{out}");
}

#[test]
fn check_gives_a_verdict() {
    let auth = component("auth-api-key");
    let (ok, out) = run(&[
        "plugin",
        "check",
        auth.to_str().unwrap(),
        "--slot",
        "auth",
        "--config",
        r#"{"keys": []}"#,
    ]);
    assert!(
        ok && out.starts_with("PASS: auth plugin `auth_api_key`"),
        "{out}"
    );

    let sanitizer = component("sanitize-basic");
    let (ok, out) = run(&[
        "plugin",
        "check",
        sanitizer.to_str().unwrap(),
        "--slot",
        "auth",
    ]);
    assert!(!ok, "{out}");
    assert!(
        out.starts_with("FAIL: auth plugin `sanitize_basic` does not implement world"),
        "{out}"
    );
    let (ok, out) = run(&[
        "plugin",
        "check",
        sanitizer.to_str().unwrap(),
        "--slot",
        "sanitizer",
        "--config",
        r#"{"max_texts": "many"}"#,
    ]);
    assert!(!ok && out.contains("rejected its configuration"), "{out}");
    let (ok, out) = run(&[
        "plugin",
        "check",
        sanitizer.to_str().unwrap(),
        "--slot",
        "sanitizer",
        "--sha256",
        &"0".repeat(64),
    ]);
    assert!(!ok && out.contains("sha256 mismatch"), "{out}");
    assert!(!out.contains(&root().display().to_string()), "{out}");
}

/// A `warden serve` process and its log lines (JSON), read on a thread.
struct Serving {
    child: Child,
    lines: mpsc::Receiver<serde_json::Value>,
    log: Vec<serde_json::Value>,
}

impl Serving {
    /// Start `warden serve --config CONFIG` with the test's credentials.
    fn spawn(config: &Path) -> Self {
        let mut child = Command::new(BIN)
            .args(["--log-json", "serve", "--config", config.to_str().unwrap()])
            .env("WARDEN_MODELS_DIR", models_dir())
            .env("WARDEN_API_KEY", API_KEY)
            .env("WARDEN_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", "info")
            // The suite starts several servers and models at once on two cores, where a
            // 30 µs plugin call can wait past the 10 ms default for a core (as in the e2e
            // suite's `TEST_DEADLINE`); the sanitizer's is set in each test's file.
            .env("WARDEN_AUTH_DEADLINE_MS", "100")
            .env("WARDEN_METRICS_POLICY_DEADLINE_MS", "100")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn warden serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({"fields": {"message": line}}));
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        Serving {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// The addresses of the API and the admin API, once the server is ready.
    fn ready(&mut self) -> (String, String) {
        let addr = self.wait_for("listening")["fields"]["addr"]
            .as_str()
            .unwrap()
            .to_string();
        let admin = self.wait_for("admin API listening")["fields"]["addr"]
            .as_str()
            .unwrap()
            .to_string();
        self.wait_for("ready");
        (addr, admin)
    }

    /// Kill the process without warning, as a crash or the OOM killer would.
    fn kill(mut self) -> Vec<serde_json::Value> {
        signal(&self.child, "KILL");
        let _ = self.child.wait();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(1)) {
            self.log.push(line);
        }
        self.log
    }

    /// Read the log up to the next line whose message is `message`.
    fn wait_for(&mut self, message: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no `{message}` in the log: {:#?}", self.log));
            self.log.push(line.clone());
            if line["fields"]["message"] == message {
                return line;
            }
        }
    }
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reloads_on_sighup_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugin_dir(dir.path());
    let config = dir.path().join("warden.toml");
    let write_config = |max_texts: &str| {
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
                 plugin_dir = \"{}\"\ncache_dir = \"{}\"\naudit_log = \"{}\"\n\
                 [plugins.sanitizer]\ndeadline_ms = 100\n\
                 [plugins.sanitizer.config]\nmax_texts = {max_texts}\n",
                plugins.display(),
                dir.path().join("cache").display(),
                dir.path().join("audit.jsonl").display()
            ),
        )
        .unwrap();
    };
    write_config("4");
    let mut s = Serving::spawn(&config);
    let (addr, admin) = s.ready();

    let client = reqwest::Client::new();
    let embed = |n: usize| {
        let inputs: Vec<String> = (0..n).map(|i| format!("text {i}")).collect();
        client
            .post(format!("http://{addr}/v1/embeddings"))
            .bearer_auth(API_KEY)
            .json(&serde_json::json!({"model": "all-MiniLM-L6-v2", "input": inputs}))
            .send()
    };
    assert_eq!(embed(3).await.unwrap().status(), 200);

    write_config("2");
    signal(&s.child, "HUP");
    s.wait_for("SIGHUP: configuration reloaded");
    assert_eq!(embed(3).await.unwrap().status(), 400);
    let audit: serde_json::Value = client
        .get(format!("http://{admin}/admin/audit"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        audit["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["trigger"] == "sighup"
                && e["slot"] == "sanitizer"
                && e["outcome"] == "accepted"),
        "{audit}"
    );

    // A configuration the plugin rejects: refused, and the running set stays.
    write_config("\"two\"");
    signal(&s.child, "HUP");
    s.wait_for("SIGHUP: reload refused");
    assert_eq!(embed(3).await.unwrap().status(), 400);
    assert_eq!(embed(2).await.unwrap().status(), 200);

    // SIGTERM with a stream in flight: the stream runs to its end, then the process exits 0.
    let mut stream = client
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(API_KEY)
        .json(&serde_json::json!({
            "model": "SmolLM2-135M-Instruct",
            "messages": [{"role": "user", "content": "Count from one to twenty in words."}],
            "max_tokens": 24,
            "temperature": 0,
            "stream": true,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut body = String::from_utf8(stream.chunk().await.unwrap().unwrap().to_vec()).unwrap();
    signal(&s.child, "TERM");
    while let Some(chunk) = stream.chunk().await.expect("a clean end") {
        body.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    // Whole: every piece, a finish reason (the answer's own end or the token limit) and
    // `[DONE]`, not a stream cut off by the shutdown.
    assert!(body.trim_end().ends_with("[DONE]"), "{body}");
    assert!(
        body.contains("\"finish_reason\":\"length\"")
            || body.contains("\"finish_reason\":\"stop\""),
        "{body}"
    );
    assert!(body.matches("\"content\":").count() > 8, "{body}");
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{status}");
    while let Ok(line) = s.lines.recv_timeout(Duration::from_secs(5)) {
        s.log.push(line);
    }
    let log = serde_json::to_string(&s.log).unwrap();
    for secret in [API_KEY, ADMIN_TOKEN] {
        assert!(!log.contains(secret), "a secret in the log");
    }
    // File names only: never the absolute path of the models, the plugins or the config.
    for dir in [models_dir(), plugins.clone(), dir.path().to_path_buf()] {
        let dir = dir.display().to_string();
        assert!(!log.contains(&dir), "{dir} in the log: {log}");
    }
    // No request or response body either: the prompts sent above never appear.
    for text in ["text 0", "Count from one to twenty"] {
        assert!(!log.contains(text), "a body in the log");
    }
    // The compiled plugins were cached for the next start.
    let cached = std::fs::read_dir(dir.path().join("cache")).unwrap().count();
    assert_eq!(cached, 3);
}

/// `component` with a custom section appended: the same plugin, a different digest, so
/// that loading it compiles anew.
fn recompiled(component: &[u8], tag: &str) -> Vec<u8> {
    let name = b"warden-test";
    let mut payload = vec![u8::try_from(name.len()).unwrap()];
    payload.extend_from_slice(name);
    payload.extend_from_slice(tag.as_bytes());
    let mut bytes = component.to_vec();
    bytes.push(0); // custom section
    let mut size = payload.len();
    loop {
        let byte = u8::try_from(size & 0x7f).unwrap();
        size >>= 7;
        bytes.push(if size == 0 { byte } else { byte | 0x80 });
        if size == 0 {
            break;
        }
    }
    bytes.extend_from_slice(&payload);
    bytes
}

fn sha256_hex(bytes: &[u8]) -> String {
    let out = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            std::io::Write::write_all(child.stdin.as_mut().unwrap(), bytes)?;
            drop(child.stdin.take());
            child.wait_with_output()
        })
        .expect("sha256sum");
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_swap_and_a_damaged_cache_leave_the_next_start_whole() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    let cache = dir.path().join("cache");
    std::fs::create_dir(&plugins).unwrap();
    for p in ["auth-api-key", "sanitize-basic", "metrics-policy-basic"] {
        std::fs::copy(component(p), plugins.join(format!("{p}.wasm"))).unwrap();
    }
    let sanitizer = std::fs::read(component("sanitize-basic")).unwrap();
    let configured = sha256_hex(&sanitizer);
    let config = dir.path().join("warden.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             plugin_dir = \"{}\"\ncache_dir = \"{}\"\naudit_log = \"{}\"\n\
             [plugins.sanitizer]\ndeadline_ms = 100\n",
            plugins.display(),
            cache.display(),
            dir.path().join("audit.jsonl").display()
        ),
    )
    .unwrap();
    let client = reqwest::Client::new();
    let live_sanitizer = |admin: String| {
        let client = client.clone();
        async move {
            let status: serde_json::Value = client
                .get(format!("http://{admin}/admin/plugins"))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            status["plugins"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["slot"] == "sanitizer")
                .unwrap()["sha256"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let embed = |addr: String| {
        let client = client.clone();
        async move {
            client
                .post(format!("http://{addr}/v1/embeddings"))
                .bearer_auth(API_KEY)
                .json(&serde_json::json!({"model": "all-MiniLM-L6-v2", "input": "a crash"}))
                .send()
                .await
                .unwrap()
                .status()
        }
    };

    // Killed while a swap to a plugin never compiled before is under way.
    let mut s = Serving::spawn(&config);
    let (addr, admin) = s.ready();
    assert_eq!(embed(addr).await, 200);
    for round in 0..3 {
        let file = format!("sanitize-basic-{round}.wasm");
        let bytes = recompiled(&sanitizer, &round.to_string());
        std::fs::write(plugins.join(&file), &bytes).unwrap();
        let swap = client
            .put(format!("http://{admin}/admin/plugins/sanitizer"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&serde_json::json!({"path": file, "sha256": sha256_hex(&bytes)}))
            .send();
        let swap = tokio::spawn(swap);
        // Part-way through compiling (a compile here takes several hundred ms).
        tokio::time::sleep(Duration::from_millis(40 + 60 * round)).await;
        s.kill();
        assert!(
            swap.await.unwrap().is_err(),
            "the swap finished before the kill"
        );
        s = Serving::spawn(&config);
        let (addr, admin) = s.ready();
        assert_eq!(live_sanitizer(admin.clone()).await, configured);
        assert_eq!(embed(addr).await, 200);
        if round < 2 {
            continue;
        }
        // Damage every compiled plugin in the cache: a flipped bit, a cut-off file.
        s.kill();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
            .collect();
        files.sort();
        assert!(files.len() >= 3, "{files:?}");
        for (i, file) in files.iter().enumerate() {
            let mut bytes = std::fs::read(file).unwrap();
            if i % 2 == 0 {
                let middle = bytes.len() / 2;
                bytes[middle] ^= 0x04;
            } else {
                bytes.truncate(bytes.len() * 2 / 3);
            }
            std::fs::write(file, &bytes).unwrap();
        }
        // And a temporary file a writer killed long ago left behind.
        let stale = cache.join("0000000000000000-dead.tmp4242");
        std::fs::write(&stale, b"partial").unwrap();
        let status = Command::new("touch")
            .args(["-d", "1 hour ago", stale.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(status.success());

        s = Serving::spawn(&config);
        let (addr, admin) = s.ready();
        assert_eq!(live_sanitizer(admin).await, configured);
        assert_eq!(embed(addr).await, 200);
        let log = s.kill();
        let discarded = log
            .iter()
            .filter(|l| {
                l["fields"]["message"] == "discarding a compiled plugin from the cache; recompiling"
            })
            .count();
        assert_eq!(discarded, 3, "{log:#?}");
        assert!(!stale.exists(), "the stale temporary file is still there");
        // Recompiled and stored whole again: the next start reads them without complaint.
        let mut s = Serving::spawn(&config);
        s.ready();
        let log = s.kill();
        assert!(
            !log.iter().any(|l| l["fields"]["message"]
                == "discarding a compiled plugin from the cache; recompiling"),
            "{log:#?}"
        );
        return;
    }
}

/// Resident memory of process `pid`, in MiB.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Send `n` copies of `body` to `route` at once while sampling the server's RSS; returns
/// the statuses and the peak RSS.
async fn burst(
    client: &reqwest::Client,
    url: String,
    body: Vec<u8>,
    n: usize,
    pid: u32,
) -> (Vec<u16>, f64) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0f64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_mib(pid));
                std::thread::sleep(Duration::from_millis(2));
            }
            peak
        })
    };
    let mut tasks = Vec::new();
    for _ in 0..n {
        let request = client
            .post(&url)
            .bearer_auth(API_KEY)
            .header("content-type", "application/json")
            .body(body.clone())
            .send();
        tasks.push(tokio::spawn(request));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap().unwrap().status().as_u16());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    (statuses, sampler.join().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_cost_memory_in_proportion_and_it_is_given_back() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugin_dir(dir.path());
    // A permissive sanitizer: 4 MiB texts, no scan for personal data.
    let config = dir.path().join("warden.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             plugin_dir = \"{}\"\ncache_dir = \"\"\naudit_log = \"\"\n\
             [plugins.sanitizer]\ndeadline_ms = 2000\n\
             [plugins.sanitizer.config]\nmax_text_bytes = 4194304\n\
             [plugins.sanitizer.config.input]\n\
             email = \"off\"\nphone = \"off\"\ncard = \"off\"\nssn = \"off\"\n",
            plugins.display()
        ),
    )
    .unwrap();
    let mut s = Serving::spawn(&config);
    let (addr, _) = s.ready();
    let pid = s.child.id();
    let client = reqwest::Client::new();
    let prose = |bytes: usize| {
        let words = "the report was sent to finance on monday and questions go to the desk ";
        words.repeat(bytes / words.len() + 1)[..bytes].to_string()
    };
    let two_mib = 2 << 20;
    let cases = [
        (
            "/v1/chat/completions",
            serde_json::json!({"model": "SmolLM2-135M-Instruct", "max_tokens": 1,
                "messages": [{"role": "user", "content": prose(two_mib - 128)}]}),
            400,
            // MiB a request may add to the peak.
            16.0,
        ),
        (
            "/v1/completions",
            serde_json::json!({"model": "SmolLM2-135M-Instruct", "max_tokens": 1,
                "prompt": prose(two_mib - 128)}),
            400,
            16.0,
        ),
        (
            "/v1/embeddings",
            serde_json::json!({"model": "all-MiniLM-L6-v2", "input": prose(two_mib - 64)}),
            200,
            40.0,
        ),
    ];
    for (route, body, status, per_request) in cases {
        // Once small, so that first-use allocations are not counted.
        let url = format!("http://{addr}{route}");
        let _ = client
            .post(&url)
            .bearer_auth(API_KEY)
            .json(
                &serde_json::json!({"model": body["model"], "input": "hi", "prompt": "hi",
                "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}),
            )
            .send()
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let before = rss_mib(pid);
        let (statuses, peak) =
            burst(&client, url, serde_json::to_vec(&body).unwrap(), 16, pid).await;
        assert!(
            statuses.iter().all(|&s| s == status),
            "{route}: {statuses:?}"
        );
        let added = peak - before;
        eprintln!("{route}: 16 x 2 MiB: {before:.0} MiB before, peak +{added:.0} MiB");
        assert!(
            added <= 16.0 * per_request,
            "{route}: 16 requests of 2 MiB added {added:.0} MiB to the peak ({before:.0} MiB before)"
        );
        // Given back: the allocator's decay is 2 s; allow it a few.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let after = rss_mib(pid);
            if after <= before + 48.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{route}: {after:.0} MiB resident after, {before:.0} MiB before"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    s.kill();
}
