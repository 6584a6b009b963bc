//! Operating plugins on a live server: the admin API, swaps under load, refused swaps,
//! rollback, reload, audit, and streams that outlive a swap.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use warden::plugins::{Outcome, Slot};
use warden_tests::{
    ADMIN_TOKEN, INFERENCE_KEY, METRICS_KEY, PLUGIN_DIR, TestServer, admin_config, auth_keys,
    plugin_sha256, start,
};

const EXTRA_KEY: &str = "test-extra-key-77d1";

/// Auth configuration with or without the extra key.
fn auth_config(extra: bool) -> Value {
    let mut keys: Vec<(&str, &str, &[&str])> = vec![
        ("inference", INFERENCE_KEY, &["inference"]),
        ("metrics", METRICS_KEY, &["metrics"]),
    ];
    if extra {
        keys.push(("extra", EXTRA_KEY, &["inference"]));
    }
    auth_keys(&keys)
}

async fn put_file(
    t: &TestServer,
    slot: &str,
    file: &str,
    sha256: &str,
    config: Value,
) -> (u16, Value) {
    let r = t
        .send(
            t.admin(Method::PUT, &format!("/admin/plugins/{slot}"))
                .json(&json!({"path": file, "sha256": sha256, "config": config})),
        )
        .await;
    (r.status, r.json())
}

/// Roll `slot` back; returns the reply.
async fn rollback(t: &TestServer, slot: &str) -> warden_tests::Reply {
    t.send(t.admin(Method::POST, &format!("/admin/plugins/{slot}/rollback")))
        .await
}

async fn models_status(t: &TestServer, key: &str) -> u16 {
    t.get("/v1/models", Some(key)).await.status
}

#[tokio::test]
async fn swaps_under_load_lose_no_request() {
    let t = Arc::new(start(admin_config()).await);
    let auth_sha = plugin_sha256("auth-api-key");
    assert_eq!(models_status(&t, EXTRA_KEY).await, 401);

    const CLIENTS: usize = 32;
    const PER_CLIENT: usize = 64;
    const SWAPS: usize = 24;
    let swapping = Arc::new(AtomicBool::new(true));
    let sent = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let t = t.clone();
        let swapping = swapping.clone();
        let sent = sent.clone();
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut n = 0;
            while n < PER_CLIENT || swapping.load(Ordering::Relaxed) {
                let r = if (c + n) % 4 == 0 {
                    t.embed(json!({"model": "all-MiniLM-L6-v2", "input": "swap"}))
                        .await
                } else {
                    t.get("/v1/models", Some(INFERENCE_KEY)).await
                };
                if r.status != 200 {
                    failures.push(format!("{}: {}", r.status, r.text));
                }
                n += 1;
                sent.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }

    let mut latencies = Vec::new();
    for i in 0..SWAPS {
        let extra = i % 2 == 0;
        let started = Instant::now();
        let (status, body) = put_file(
            &t,
            "auth",
            "auth-api-key.wasm",
            &auth_sha,
            auth_config(extra),
        )
        .await;
        latencies.push(started.elapsed());
        assert_eq!(status, 200, "swap {i}: {body}");
        assert_eq!(body["plugin"]["sha256"], auth_sha.as_str());
        assert_eq!(body["plugin"]["rollback_available"], true);
        let expected = if extra { 200 } else { 401 };
        assert_eq!(
            models_status(&t, EXTRA_KEY).await,
            expected,
            "after swap {i}"
        );

        // Refused changes in between change nothing.
        let refused = match i {
            4 => {
                let garbage = b"\0asm\x0d\0\x01\0 not a component".to_vec();
                let sha = warden_tests::sha256_hex(&garbage);
                let r = t
                    .send(
                        t.admin(Method::PUT, "/admin/plugins/auth")
                            .header("content-type", "application/wasm")
                            .header("x-plugin-sha256", sha)
                            .body(garbage),
                    )
                    .await;
                Some((r.error(422)["code"].clone(), "invalid_component"))
            }
            8 => {
                let (s, b) = put_file(
                    &t,
                    "auth",
                    "auth-api-key.wasm",
                    &"ab".repeat(32),
                    auth_config(true),
                )
                .await;
                assert_eq!(s, 422, "{b}");
                assert!(
                    b["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("sha256 mismatch")
                );
                Some((b["error"]["code"].clone(), "sha256_mismatch"))
            }
            12 => {
                let (s, b) = put_file(
                    &t,
                    "auth",
                    "auth-api-key.wasm",
                    &auth_sha,
                    json!({"keys": "every one"}),
                )
                .await;
                assert_eq!(s, 422, "{b}");
                Some((b["error"]["code"].clone(), "configuration_rejected"))
            }
            16 => {
                let (s, b) = put_file(
                    &t,
                    "auth",
                    "sanitize-basic.wasm",
                    &plugin_sha256("sanitize-basic"),
                    json!({}),
                )
                .await;
                assert_eq!(s, 422, "{b}");
                assert!(
                    b["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("does not implement world warden:policy/auth-plugin"),
                    "{b}"
                );
                Some((b["error"]["code"].clone(), "wrong_world"))
            }
            _ => None,
        };
        if let Some((code, expected_code)) = refused {
            assert_eq!(code, expected_code);
            assert_eq!(
                models_status(&t, EXTRA_KEY).await,
                expected,
                "after refusal {i}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    swapping.store(false, Ordering::Relaxed);
    let mut failures = Vec::new();
    for c in clients {
        failures.extend(c.await.unwrap());
    }
    let total = sent.load(Ordering::Relaxed);
    assert!(total >= CLIENTS * PER_CLIENT, "{total}");
    assert!(
        failures.is_empty(),
        "{} of {total} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );

    // The last swap removed the extra key; rollback restores the one before, which had it.
    assert_eq!(models_status(&t, EXTRA_KEY).await, 401);
    let r = rollback(&t, "auth").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(models_status(&t, EXTRA_KEY).await, 200);
    let r = rollback(&t, "auth").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(models_status(&t, EXTRA_KEY).await, 401);

    let metrics = &t.server.state().metrics;
    assert_eq!(
        metrics.swap_count(Slot::Auth, Outcome::Accepted),
        SWAPS as u64 + 2
    );
    assert_eq!(metrics.swap_count(Slot::Auth, Outcome::Refused), 4);
    latencies.sort();
    eprintln!(
        "swap latency over {SWAPS} admin swaps under load ({total} requests): median {:?}, max {:?}",
        latencies[SWAPS / 2],
        latencies[SWAPS - 1]
    );

    let audit = t.send(t.admin(Method::GET, "/admin/audit")).await.json();
    let events = audit["events"].as_array().unwrap();
    let refused: Vec<&Value> = events
        .iter()
        .filter(|e| e["outcome"] == "refused")
        .collect();
    assert_eq!(refused.len(), 4, "{audit}");
    for e in &refused {
        assert_eq!(e["slot"], "auth");
        assert_eq!(e["trigger"], "admin");
        assert!(
            e["reason"].is_string() && e["old_sha256"] == auth_sha.as_str(),
            "{e}"
        );
    }
    assert!(
        events
            .iter()
            .any(|e| e["trigger"] == "rollback" && e["outcome"] == "accepted")
    );
    let text = audit.to_string();
    assert!(
        !text.contains(PLUGIN_DIR) && !text.contains(INFERENCE_KEY),
        "{text}"
    );
    Arc::into_inner(t).unwrap().server.shutdown().await;
}

#[tokio::test]
async fn a_stream_started_before_a_swap_finishes_after_it() {
    let t = start(admin_config()).await;
    let (response, first) = t
        .open_stream("Write a long story about a lighthouse.", 48)
        .await;

    // Mid-stream: an auth plugin that no longer knows this key, and a new sanitizer.
    let (s, b) = put_file(
        &t,
        "auth",
        "auth-api-key.wasm",
        &plugin_sha256("auth-api-key"),
        auth_keys(&[("extra", EXTRA_KEY, &["inference"])]),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = put_file(
        &t,
        "sanitizer",
        "sanitize-basic.wasm",
        &plugin_sha256("sanitize-basic"),
        json!({"max_texts": 1}),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(models_status(&t, INFERENCE_KEY).await, 401);

    let events = warden_tests::read_rest(response, first).await;
    assert!(events.done, "{events:?}");
    assert!(
        events.chunks.iter().all(|c| c.get("error").is_none()),
        "{events:?}"
    );
    let last = events.chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length", "{events:?}");
    t.server.shutdown().await;
}

#[tokio::test]
async fn the_admin_api_is_the_hosts_own() {
    // Off unless a token is set.
    let t = start(warden_tests::config()).await;
    assert!(t.server.admin_addr().is_none());
    t.server.shutdown().await;

    let t = start(admin_config()).await;
    let url = t.admin_url("/admin/plugins");
    let r = t.send(t.client.get(&url)).await;
    assert_eq!(r.error(401)["code"], "missing_admin_token");
    assert!(r.headers.contains_key("www-authenticate"));
    for wrong in [INFERENCE_KEY, "x", &ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1]] {
        let r = t.send(t.client.get(&url).bearer_auth(wrong)).await;
        assert_eq!(r.error(401)["code"], "invalid_admin_token");
    }
    // The admin token is not an API key.
    assert_eq!(models_status(&t, ADMIN_TOKEN).await, 401);

    let r = t.send(t.admin(Method::GET, "/admin/plugins")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let plugins = r.json()["plugins"].as_array().unwrap().clone();
    let slots: Vec<&str> = plugins
        .iter()
        .map(|p| p["slot"].as_str().unwrap())
        .collect();
    assert_eq!(slots, ["auth", "sanitizer", "metrics-policy"]);
    assert_eq!(plugins[0]["world"], "warden:policy/auth-plugin");
    assert_eq!(plugins[0]["wit_version"], "0.1.0");
    assert_eq!(plugins[0]["sha256"], plugin_sha256("auth-api-key").as_str());
    assert_eq!(plugins[0]["rollback_available"], false);
    assert!(plugins[0]["calls"].as_u64().unwrap() >= 1);
    assert_eq!(plugins[2]["failure"], "open");

    // A broken auth plugin, uploaded as bytes, locks clients out but not operators.
    let bytes = std::fs::read(format!("{PLUGIN_DIR}/misbehave.wasm")).unwrap();
    let r = t
        .send(
            t.admin(Method::PUT, "/admin/plugins/auth")
                .header("content-type", "application/wasm")
                .header("x-plugin-sha256", warden_tests::sha256_hex(&bytes))
                .header("x-plugin-name", "broken-auth")
                .header(
                    "x-plugin-config",
                    r#"{"mode": "trap", "spare_smoke": true}"#,
                )
                .body(bytes),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["plugin"]["plugin"], "broken-auth");
    t.get("/v1/models", Some(INFERENCE_KEY)).await.error(503);
    let r = t.send(t.admin(Method::GET, "/admin/plugins")).await;
    assert_eq!(r.status, 200);
    assert!(
        r.json()["plugins"][0]["faults"].as_u64().unwrap() >= 1,
        "{}",
        r.text
    );
    let r = rollback(&t, "auth").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(models_status(&t, INFERENCE_KEY).await, 200);

    // Bad admin requests are 4xx with a reason.
    let r = rollback(&t, "sanitizer").await;
    assert_eq!(r.error(409)["code"], "no_rollback_target");
    let r = t
        .send(t.admin(Method::PUT, "/admin/plugins/nope").json(&json!({})))
        .await;
    assert_eq!(r.error(404)["code"], "unknown_slot");
    let sha = plugin_sha256("auth-api-key");
    for (path, code) in [
        ("../auth-api-key.wasm", "invalid_path"),
        ("/etc/passwd", "invalid_path"),
    ] {
        let (s, b) = put_file(&t, "auth", path, &sha, json!({})).await;
        assert_eq!(
            (s, b["error"]["code"].as_str().unwrap()),
            (400, code),
            "{b}"
        );
    }
    let (s, b) = put_file(&t, "auth", "missing.wasm", &sha, json!({})).await;
    assert_eq!(s, 404, "{b}");
    assert_eq!(
        b["error"]["message"],
        "auth plugin file not found: missing.wasm"
    );
    let r = t
        .send(
            t.admin(Method::PUT, "/admin/plugins/auth")
                .json(&json!({"path": "auth-api-key.wasm"})),
        )
        .await;
    assert_eq!(r.error(400)["code"], "missing_sha256");
    let r = t
        .send(
            t.admin(Method::PUT, "/admin/plugins/auth")
                .header("content-type", "text/plain")
                .body("x"),
        )
        .await;
    assert_eq!(r.error(415)["code"], "unsupported_media_type");
    // An upload without a length is refused before any of it is buffered.
    let chunks = futures_util::stream::iter([Ok::<_, std::io::Error>(b"\0asm".to_vec())]);
    let r = t
        .send(
            t.admin(Method::PUT, "/admin/plugins/auth")
                .header("content-type", "application/wasm")
                .header("x-plugin-sha256", "0".repeat(64))
                .body(reqwest::Body::wrap_stream(chunks)),
        )
        .await;
    assert_eq!(r.error(411)["code"], "length_required");
    // Without the admin token, a declared 32 MiB upload is refused before any of it is read.
    let mut stream = tokio::net::TcpStream::connect(t.server.admin_addr().unwrap())
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut stream,
        b"PUT /admin/plugins/auth HTTP/1.1\r\nHost: x\r\nContent-Type: application/wasm\r\n\
          Content-Length: 33554432\r\n\r\n\0asm",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut stream, &mut buf),
    )
    .await
    .expect("the server waited for the body before refusing")
    .unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]);
    assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
    t.server.shutdown().await;
}

#[tokio::test]
async fn reload_applies_the_file_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("warden.toml");
    let base = admin_config();
    let reloader = {
        let base = base.clone();
        let file = file.clone();
        warden::Reloader::new(move || {
            let read = warden::Config::from_toml_file(&file)?;
            let mut next = base.clone();
            next.plugins.sanitizer = read.plugins.sanitizer;
            next.listen = read.listen;
            Ok(next)
        })
    };
    let server = warden::Server::start_with(base, reloader).await.unwrap();
    server.ready().await.unwrap();
    let t = TestServer::from(server);
    let three = json!({"model": "all-MiniLM-L6-v2", "input": ["a", "b", "c"]});
    assert_eq!(t.embed(three.clone()).await.status, 200);

    std::fs::write(
        &file,
        "listen = \"127.0.0.1:1\"\n[plugins.sanitizer]\ndeadline_ms = 100\n[plugins.sanitizer.config]\nmax_texts = 2\n",
    )
    .unwrap();
    let r = t.send(t.admin(Method::POST, "/admin/reload")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["restart_required"], json!(["listen"]));
    t.embed(three.clone()).await.error(400);

    // A pinned digest that does not match refuses the whole reload.
    std::fs::write(
        &file,
        format!(
            "[plugins.sanitizer]\nfile = \"sanitize-basic.wasm\"\nsha256 = \"{}\"\n",
            "0".repeat(64)
        ),
    )
    .unwrap();
    let r = t.send(t.admin(Method::POST, "/admin/reload")).await;
    let e = r.error(422);
    assert!(
        e["message"].as_str().unwrap().contains("sha256 mismatch"),
        "{e}"
    );
    t.embed(three).await.error(400);

    let events = t.send(t.admin(Method::GET, "/admin/audit")).await.json();
    let reloads: Vec<&Value> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["trigger"] == "reload")
        .collect();
    assert!(
        reloads
            .iter()
            .any(|e| e["slot"] == "sanitizer" && e["outcome"] == "accepted")
    );
    assert!(
        reloads
            .iter()
            .any(|e| e["slot"] == "sanitizer" && e["outcome"] == "refused")
    );
    assert!(
        reloads
            .iter()
            .any(|e| e["slot"] == "auth" && e["outcome"] == "unchanged")
    );
    t.server.shutdown().await;
}

#[tokio::test]
async fn every_change_is_appended_to_the_audit_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audit").join("audit.jsonl");
    let mut c = admin_config();
    c.audit_log = file.clone();
    let t = start(c).await;
    let sha = plugin_sha256("auth-api-key");
    let (status, _) = put_file(&t, "auth", "auth-api-key.wasm", &sha, auth_config(true)).await;
    assert_eq!(status, 200);
    let (status, _) = put_file(&t, "auth", "auth-api-key.wasm", &"0".repeat(64), json!({})).await;
    assert_eq!(status, 422);
    assert_eq!(rollback(&t, "auth").await.status, 200);
    let served = t.send(t.admin(Method::GET, "/admin/audit")).await.json();
    t.server.shutdown().await;

    let lines: Vec<Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(&lines, served["events"].as_array().unwrap());
    let outcomes: Vec<(&str, &str)> = lines
        .iter()
        .map(|e| {
            (
                e["trigger"].as_str().unwrap(),
                e["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            ("admin", "accepted"),
            ("admin", "refused"),
            ("rollback", "accepted")
        ]
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
    }
    // A second start appends.
    let mut c = admin_config();
    c.audit_log = file.clone();
    let t = start(c).await;
    assert_eq!(rollback(&t, "auth").await.status, 409);
    t.server.shutdown().await;
    let after: Vec<Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(after[..lines.len()], lines[..]);
    assert_eq!(after.len(), lines.len() + 1);
    let last = &after[lines.len()];
    assert_eq!(
        (&last["trigger"], &last["outcome"]),
        (&json!("rollback"), &json!("refused"))
    );
}

#[tokio::test]
async fn a_start_that_cannot_keep_its_key_or_audit_trail_fails_before_listening() {
    let dir = tempfile::tempdir().unwrap();
    // A regular file where a directory is needed: not writable, even for root.
    let blocker = dir.path().join("not-a-directory");
    std::fs::write(&blocker, b"").unwrap();
    let mut c = warden_tests::config();
    c.audit_log = blocker.join("audit.jsonl");
    let Err(err) = warden::Server::start(c).await else {
        panic!("started")
    };
    let text = err.to_string();
    assert!(text.starts_with("audit log audit.jsonl:"), "{text}");
    assert!(!text.contains(&dir.path().display().to_string()), "{text}");

    let mut c = warden_tests::config();
    c.api_key = None;
    c.metrics_api_key = None;
    c.generated_key_file = blocker.join("api-key");
    let Err(err) = warden::Server::start(c).await else {
        panic!("started")
    };
    let text = err.to_string();
    assert!(
        text.starts_with("generated API key file api-key:"),
        "{text}"
    );
    assert!(!text.contains(&dir.path().display().to_string()), "{text}");
}

#[tokio::test]
async fn compiled_plugins_are_cached_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = warden_tests::config();
    c.cache_dir = dir.path().join("cache");
    let t = start(c).await;
    let files: Vec<String> = std::fs::read_dir(dir.path().join("cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for name in ["auth-api-key", "sanitize-basic", "metrics-policy-basic"] {
        let sha = plugin_sha256(name);
        assert!(
            files.iter().any(|f| f.ends_with(&format!("-{sha}.cwasm"))),
            "{name}: {files:?}"
        );
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("cache"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
    }
    t.server.shutdown().await;
}

#[tokio::test]
async fn plugin_authors_can_inspect_and_check_offline() {
    let bytes = std::fs::read(format!("{PLUGIN_DIR}/sanitize-basic.wasm")).unwrap();
    // The runtime a tool builds for itself: no server, no process-wide engine.
    let runtime = warden::plugins::Runtime::builder()
        .instances(16)
        .build()
        .unwrap();
    let report = warden::plugins::inspect(&runtime, &bytes).unwrap();
    assert_eq!(
        report.world.as_deref(),
        Some("warden:policy/sanitizer-plugin")
    );
    assert_eq!(report.wit_versions, ["0.1.0"]);
    assert!(report.served);
    assert_eq!(report.sha256, plugin_sha256("sanitize-basic"));
    assert!(
        report
            .exports
            .iter()
            .any(|e| e == "warden:policy/sanitizer@0.1.0")
    );
    assert!(
        report.imports.iter().any(|i| i.starts_with("wasi:")),
        "{:?}",
        report.imports
    );

    let newer =
        warden::plugins::inspect(&runtime, &warden_tests::with_wit_version(&bytes, "0.2.0"))
            .unwrap();
    assert_eq!(newer.wit_versions, ["0.2.0"]);
    assert!(!newer.served);

    let ok = warden::plugins::check(
        &runtime,
        &warden_tests::source(Slot::Sanitizer, "sanitize-basic", json!({})),
    )
    .unwrap();
    assert_eq!(ok.world, "warden:policy/sanitizer-plugin");
    let err = warden::plugins::check(
        &runtime,
        &warden_tests::source(Slot::Auth, "sanitize-basic", json!({})),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("does not implement world"),
        "{err}"
    );
    let err = warden::plugins::check(
        &runtime,
        &warden_tests::source(Slot::MetricsPolicy, "misbehave", json!({"mode": "loop"})),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "metrics-policy plugin `misbehave` failed its smoke call: labels: deadline"
    );
}

/// Admin reads never wait behind a change: while the lock every change holds (for as long
/// as it compiles and validates) is taken, `GET /admin/plugins` still answers, and nothing
/// blocks the worker that serves it. Before the status read had its own data, it waited on
/// that lock on a tokio worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_status_answers_while_a_change_is_in_progress() {
    let t = start(admin_config()).await;
    let state = t.server.state().clone();
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let plugins = &state.services().expect("serving").plugins;
        plugins.while_changing_for_tests(|| {
            held_tx.send(()).unwrap();
            let _ = release_rx.recv();
        })
    });
    held_rx.recv().unwrap();
    let answered = tokio::time::timeout(
        Duration::from_secs(30),
        t.send(t.admin(Method::GET, "/admin/plugins")),
    )
    .await;
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    let r = answered.expect("GET /admin/plugins answered while a change was in progress");
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["plugins"].as_array().unwrap().len(), 3);
    t.server.shutdown().await;
}
