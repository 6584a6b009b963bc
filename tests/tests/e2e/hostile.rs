//! Hostile plugins, uploaded through the admin API as an attacker with a plugin would:
//! each is refused at swap with a code, or, once live, fails closed within its deadline
//! plus 5 ms; the server stays healthy and the next request is served normally.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use warden::plugins::Slot;
use warden_tests::{INFERENCE_KEY, METRICS_KEY, PLUGIN_DIR, TestServer, admin_config, start};

/// The hostile plugins' deadline: short, so that a fault that waited for it shows.
const DEADLINE_MS: u64 = 20;
/// What the issue allows beyond the deadline.
const MARGIN: Duration = Duration::from_millis(5);

/// Upload `component` into `slot` with `config` and the hostile deadline.
async fn upload(t: &TestServer, slot: Slot, component: &str, config: Value) -> warden_tests::Reply {
    let bytes = std::fs::read(format!("{PLUGIN_DIR}/{component}.wasm")).unwrap();
    t.send(
        t.admin(Method::PUT, &format!("/admin/plugins/{slot}"))
            .header("content-type", "application/wasm")
            .header("x-plugin-sha256", warden_tests::sha256_hex(&bytes))
            .header("x-plugin-name", "hostile")
            .header("x-plugin-config", config.to_string())
            .body(bytes),
    )
    .await
}

async fn rollback(t: &TestServer, slot: Slot) {
    let r = t
        .send(t.admin(Method::POST, &format!("/admin/plugins/{slot}/rollback")))
        .await;
    assert_eq!(r.status, 200, "rollback {slot}: {}", r.text);
}

/// A request that goes through every slot.
async fn embed(t: &TestServer) -> warden_tests::Reply {
    t.embed(json!({"model": "all-MiniLM-L6-v2", "input": "hello"}))
        .await
}

async fn healthy(t: &TestServer, after: &str) {
    let r = embed(t).await;
    assert_eq!(r.status, 200, "after {after}: {}", r.text);
    assert_eq!(t.get("/health", None).await.status, 200, "after {after}");
}

fn hostile_server_config() -> warden::Config {
    let mut c = admin_config();
    c.plugins.auth.deadline_ms = DEADLINE_MS;
    c.plugins.sanitizer.deadline_ms = DEADLINE_MS;
    c.plugins.metrics_policy.deadline_ms = DEADLINE_MS;
    c
}

#[tokio::test]
async fn hostile_plugins_are_refused_at_swap_with_a_code() {
    let t = start(hostile_server_config()).await;
    let cases: Vec<(Slot, &str, Value, &str, &str)> = vec![
        (
            Slot::Auth,
            "phone-home",
            json!({}),
            "unsupported_import",
            "wasi:sockets",
        ),
        (
            Slot::Auth,
            "misbehave",
            json!({"mode": "sleep"}),
            "smoke_call_failed",
            "blocked",
        ),
        (
            Slot::Auth,
            "misbehave",
            json!({"mode": "poll"}),
            "smoke_call_failed",
            "blocked",
        ),
        (
            Slot::Sanitizer,
            "misbehave",
            json!({"mode": "sleep"}),
            "smoke_call_failed",
            "blocked",
        ),
        (
            Slot::MetricsPolicy,
            "misbehave",
            json!({"mode": "poll"}),
            "smoke_call_failed",
            "blocked",
        ),
        (
            Slot::Auth,
            "misbehave",
            json!({"mode": "huge-principal"}),
            "smoke_call_failed",
            "malformed",
        ),
        (
            Slot::Auth,
            "misbehave",
            json!({"mode": "many-scopes"}),
            "smoke_call_failed",
            "malformed",
        ),
        (
            Slot::Auth,
            "misbehave",
            json!({"mode": "alias-scopes"}),
            "smoke_call_failed",
            "malformed",
        ),
        (
            Slot::Auth,
            "misbehave",
            json!({"mode": "inject"}),
            "smoke_call_failed",
            "malformed",
        ),
        (
            Slot::Sanitizer,
            "misbehave",
            json!({"mode": "alias-rewrite"}),
            "smoke_call_failed",
            "malformed",
        ),
        (
            Slot::Sanitizer,
            "misbehave",
            json!({"mode": "amplify"}),
            "smoke_call_failed",
            "malformed",
        ),
        (
            Slot::Auth,
            "misbehave",
            json!({"mode": "refuse", "status": 200}),
            "smoke_call_failed",
            "malformed",
        ),
        (
            Slot::Auth,
            "misbehave",
            json!({"mode": "refuse", "status": 99}),
            "smoke_call_failed",
            "malformed",
        ),
        (
            Slot::Auth,
            "misbehave",
            json!({"mode": "refuse", "status": 503}),
            "smoke_call_failed",
            "malformed",
        ),
        (
            Slot::Auth,
            "misbehave",
            json!({"mode": "refuse", "status": 65535}),
            "smoke_call_failed",
            "malformed",
        ),
        (
            Slot::Auth,
            "misbehave",
            json!({"mode": "refuse", "code": ""}),
            "smoke_call_failed",
            "malformed",
        ),
        (
            Slot::Auth,
            "misbehave",
            json!({"mode": "refuse", "code": "two words"}),
            "smoke_call_failed",
            "malformed",
        ),
        (
            Slot::Auth,
            "misbehave",
            json!({"mode": "refuse", "code": "c".repeat(65)}),
            "smoke_call_failed",
            "malformed",
        ),
        (
            Slot::Auth,
            "misbehave",
            json!({"mode": "refuse", "message": "x\u{1b}[2J"}),
            "smoke_call_failed",
            "malformed",
        ),
        (
            Slot::Sanitizer,
            "misbehave",
            json!({"mode": "refuse", "message": "m".repeat(5000)}),
            "smoke_call_failed",
            "malformed",
        ),
    ];
    for (slot, component, config, code, reason) in cases {
        let started = Instant::now();
        let r = upload(&t, slot, component, config.clone()).await;
        let took = started.elapsed();
        let e = r.error(422);
        assert_eq!(e["code"], code, "{slot} {config}: {}", r.text);
        assert!(
            e["message"].as_str().unwrap().contains(reason),
            "{slot} {config}: {}",
            r.text
        );
        // A plugin that waits is refused at once, not after its wait.
        assert!(took < Duration::from_secs(2), "{slot} {config}: {took:?}");
        healthy(&t, &format!("refusing {slot} {config}")).await;
    }
    t.server.shutdown().await;
}

/// The fastest of `n` tries of `f`, with what it answered: scheduling noise on a loaded
/// 2-core machine only ever adds time, so the minimum is the host's own cost.
async fn fastest<F, Fut>(n: usize, mut f: F) -> (Duration, warden_tests::Reply)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = warden_tests::Reply>,
{
    let mut best: Option<(Duration, warden_tests::Reply)> = None;
    for _ in 0..n {
        let started = Instant::now();
        let r = f().await;
        let took = started.elapsed();
        if best.as_ref().is_none_or(|(b, _)| took < *b) {
            best = Some((took, r));
        }
    }
    best.unwrap()
}

#[tokio::test]
async fn live_hostile_plugins_fail_closed_within_their_deadline() {
    let t = start(hostile_server_config()).await;
    let deadline = Duration::from_millis(DEADLINE_MS);
    // (slot, configuration, fault it is counted as)
    let cases: Vec<(Slot, Value, &str)> = vec![
        (Slot::Auth, json!({"mode": "sleep"}), "blocked"),
        (Slot::Auth, json!({"mode": "poll"}), "blocked"),
        (
            Slot::Auth,
            json!({"mode": "spin", "spin_iterations": 2_000_000_000u64}),
            "deadline",
        ),
        (Slot::Auth, json!({"mode": "alias-scopes"}), "malformed"),
        (Slot::Auth, json!({"mode": "many-scopes"}), "malformed"),
        (Slot::Auth, json!({"mode": "huge-principal"}), "malformed"),
        (Slot::Auth, json!({"mode": "inject"}), "malformed"),
        (
            Slot::Auth,
            json!({"mode": "refuse", "status": 302}),
            "malformed",
        ),
        (
            Slot::Auth,
            json!({"mode": "refuse", "code": "a\nb"}),
            "malformed",
        ),
        (Slot::Sanitizer, json!({"mode": "sleep"}), "blocked"),
        (
            Slot::Sanitizer,
            json!({"mode": "spin", "spin_iterations": 2_000_000_000u64}),
            "deadline",
        ),
        (
            Slot::Sanitizer,
            json!({"mode": "alias-rewrite"}),
            "malformed",
        ),
        (
            Slot::Sanitizer,
            json!({"mode": "refuse", "status": 200}),
            "malformed",
        ),
    ];
    let metrics = &t.server.state().metrics;
    for (slot, mut config, kind) in cases {
        config["spare_smoke"] = json!(true);
        let r = upload(&t, slot, "misbehave", config.clone()).await;
        assert_eq!(r.status, 200, "{slot} {config}: {}", r.text);
        let all = |m: &warden::metrics::Metrics| -> u64 {
            warden::plugins::FaultKind::ALL
                .iter()
                .map(|k| m.fault_count(slot.as_str(), k.as_str()))
                .sum()
        };
        let before = metrics.fault_count(slot.as_str(), kind);
        let before_all = all(metrics);
        let (took, r) = fastest(5, || embed(&t)).await;
        let e = r.error(503);
        assert_eq!(e["code"], "policy_unavailable", "{slot} {config}");
        assert!(
            took <= deadline + MARGIN,
            "{slot} {config}: failed closed after {took:?}"
        );
        // Every try is one fault; on a loaded machine a slow one may be a deadline.
        assert_eq!(all(metrics), before_all + 5, "{slot} {config}");
        assert!(
            metrics.fault_count(slot.as_str(), kind) > before,
            "{slot} {config}: no {kind} fault"
        );
        rollback(&t, slot).await;
        healthy(&t, &format!("{slot} {config}")).await;
    }
    t.server.shutdown().await;
}

#[tokio::test]
async fn an_amplifying_output_filter_ends_the_response() {
    let t = start(hostile_server_config()).await;
    let r = upload(
        &t,
        Slot::Sanitizer,
        "misbehave",
        json!({"mode": "amplify", "spare_smoke": true}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let body = json!({
        "model": warden_tests::TEXT_MODEL,
        "messages": [{"role": "user", "content": "Count to ten."}],
        "max_tokens": 8,
        "temperature": 0,
    });
    let r = t.infer("/v1/chat/completions", body.clone()).await;
    assert_eq!(r.error(503)["code"], "policy_unavailable");
    assert!(r.text.len() < 4096, "the amplified text reached the client");
    assert!(
        t.server
            .state()
            .metrics
            .fault_count("sanitizer", "malformed")
            >= 1
    );

    // Streamed, the response ends with an error event, not megabytes of text.
    let mut stream = body.clone();
    stream["stream"] = json!(true);
    let r = t.infer("/v1/chat/completions", stream).await;
    assert_eq!(r.status, 200);
    assert!(r.text.len() < 8192, "{} bytes streamed", r.text.len());
    assert!(r.text.contains("policy_unavailable"), "{}", r.text);
    rollback(&t, Slot::Sanitizer).await;
    healthy(&t, "amplify").await;
    t.server.shutdown().await;
}

#[tokio::test]
async fn label_values_cannot_forge_series() {
    let t = start(hostile_server_config()).await;
    // A metrics policy whose label values carry quotes, braces and backslashes.
    let r = upload(
        &t,
        Slot::MetricsPolicy,
        "misbehave",
        json!({"mode": "inject", "spare_smoke": true}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    healthy(&t, "inject").await;
    for accept in ["text/plain", "application/openmetrics-text; version=1.0.0"] {
        let r = t
            .send(
                t.client
                    .get(t.url("/v1/metrics"))
                    .bearer_auth(METRICS_KEY)
                    .header("accept", accept),
            )
            .await;
        assert_eq!(r.status, 200);
        assert!(
            !r.text.lines().any(|l| l.starts_with("warden_forged")),
            "{accept}: a forged series: {}",
            r.text
        );
        let line = r
            .text
            .lines()
            .find(|l| l.contains("warden_forged_total"))
            .expect("the injected value, escaped");
        assert!(
            line.starts_with("warden_requests_total{")
                && line.contains(r#"model="m\"} 1 warden_forged_total{x=\"7\\""#),
            "{accept}: {line}"
        );
        // Every sample line is one series of a registered family.
        for l in r
            .text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            assert!(l.starts_with("warden_"), "{accept}: {l}");
        }
    }
    rollback(&t, Slot::MetricsPolicy).await;
    t.server.shutdown().await;
}

#[tokio::test]
async fn a_log_flood_is_bounded_and_the_host_keeps_serving() {
    let t = start(hostile_server_config()).await;
    let r = upload(
        &t,
        Slot::Auth,
        "misbehave",
        json!({"mode": "log-flood", "spare_smoke": true}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // Each call tries 10,000 lines; the host writes at most 32 per instance and 100 a
    // second for the plugin, so the calls stay within their deadline.
    for _ in 0..20 {
        let r = t.get("/v1/models", Some(INFERENCE_KEY)).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    rollback(&t, Slot::Auth).await;
    healthy(&t, "log-flood").await;
    t.server.shutdown().await;
}

#[tokio::test]
async fn answers_after_the_deadline_are_never_used_under_load() {
    let mut c = config_with_deadline(10);
    c.engine.max_sequences = 4;
    let t = start(c).await;
    let plugins = &t.server.state().services().unwrap().plugins;
    // Calibrate a spin of at least 30 ms on this machine (the fastest of several runs, so
    // that a busy moment cannot make it shorter), with a deadline it cannot reach.
    let calibrate = 100_000_000u64;
    let mut slow = warden_tests::source(
        Slot::Auth,
        "misbehave",
        json!({"mode": "spin", "spin_iterations": calibrate, "spare_smoke": true}),
    );
    slow.limits.deadline = Duration::from_secs(5);
    plugins.replace(&slow).unwrap();
    let (took, r) = fastest(5, || t.get("/v1/models", Some(INFERENCE_KEY))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let per_ms = calibrate as f64 / took.as_secs_f64() / 1e3;
    let iterations = (per_ms * 30.0) as u64;

    // Two generations keep both cores busy while the spinning plugin answers late.
    let g1 = t.open_stream("Write a long story about the sea.", 200);
    let g2 = t.open_stream("Write a long story about the mountains.", 200);
    let ((s1, f1), (s2, f2)) = tokio::join!(g1, g2);
    let mut spinning = warden_tests::source(
        Slot::Auth,
        "misbehave",
        json!({"mode": "spin", "spin_iterations": iterations, "spare_smoke": true}),
    );
    spinning.limits.deadline = Duration::from_millis(10);
    plugins.replace(&spinning).unwrap();
    let mut granted = 0;
    for _ in 0..100 {
        let r = t.get("/v1/models", Some(INFERENCE_KEY)).await;
        match r.status {
            200 => granted += 1,
            503 => assert_eq!(r.error(503)["code"], "policy_unavailable"),
            other => panic!("unexpected {other}: {}", r.text),
        }
    }
    assert_eq!(granted, 0, "answers that came after the deadline were used");
    let (e1, e2) = tokio::join!(
        warden_tests::read_rest(s1, f1),
        warden_tests::read_rest(s2, f2)
    );
    assert!(e1.done && e2.done);
    t.server.shutdown().await;
}

fn config_with_deadline(ms: u64) -> warden::Config {
    let mut c = warden_tests::config();
    c.plugins.auth.deadline_ms = ms;
    c
}
