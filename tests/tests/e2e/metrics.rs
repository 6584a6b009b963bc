//! `GET /v1/metrics`: scope `metrics` required, and the metrics policy decides which series
//! each caller sees.

use serde_json::json;
use warden::plugins::Slot;
use warden_tests::{INFERENCE_KEY, METRICS_KEY, auth_keys, config, source, start};

const TENANT_KEY: &str = "test-tenant-key-acme-51b0";

/// Every `warden_…` identifier in `text`.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("warden_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names.sort();
    names.dedup();
    assert!(names.len() >= 5, "{names:?}");
    names
}

/// `promtool check metrics` (Debian package `prometheus`, which `make test` installs).
fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is missing: `make test` installs it (Debian package prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn metrics_need_the_scope_and_show_what_the_policy_allows() {
    let t = start(config()).await;
    let r = t.get("/v1/metrics", None).await;
    assert_eq!(r.error(401)["code"], "missing_api_key");
    let r = t.get("/v1/metrics", Some(INFERENCE_KEY)).await;
    assert_eq!(r.error(403)["code"], "insufficient_scope");

    // A tenant's key, next to the operator keys.
    let mut keys = auth_keys(&[
        ("inference", INFERENCE_KEY, &["inference"]),
        ("metrics", METRICS_KEY, &["metrics"]),
        ("acme", TENANT_KEY, &["inference", "metrics"]),
    ]);
    keys["keys"][2]["tenant"] = json!("acme");
    let services = t.server.state().services().unwrap();
    services
        .plugins
        .replace(&source(Slot::Auth, "auth-api-key", keys))
        .unwrap();
    let body = json!({"model": "all-MiniLM-L6-v2", "input": "hello"});
    assert_eq!(
        t.post("/v1/embeddings", Some(TENANT_KEY), &body)
            .await
            .status,
        200
    );
    assert_eq!(t.embed(body).await.status, 200);

    let r = t.get("/v1/metrics", Some(METRICS_KEY)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert!(r.text.contains("tenant=\"acme\""), "{}", r.text);
    assert!(r.text.contains("tenant=\"none\""), "{}", r.text);
    promtool_check_metrics(&r.text);
    for family in [
        "warden_requests_total",
        "warden_request_duration_seconds_bucket",
        "warden_plugin_call_duration_seconds_bucket",
        "warden_circuit_breaker_state",
        "warden_streams_in_flight",
        "warden_queue_depth{",
        "warden_queue_wait_seconds_bucket{",
    ] {
        assert!(r.text.contains(family), "{family}: {}", r.text);
    }

    // Every metric the dashboard and the alert rules use is one Warden exports.
    for file in ["alerts.yml", "grafana-dashboard.json"] {
        let doc = std::fs::read_to_string(warden_tests::root().join("docs/monitoring").join(file))
            .unwrap();
        for name in metric_names(&doc) {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .fold(name.as_str(), |n, s| n.strip_suffix(s).unwrap_or(n));
            let families = t.server.state().metrics.families();
            let known = |f: &str| families.iter().any(|k| k == f);
            assert!(
                known(family) || family.strip_suffix("_total").is_some_and(known),
                "{file} uses {name}, which Warden does not export"
            );
        }
    }

    // A scraper that asks for OpenMetrics gets it.
    let om = t
        .send(
            t.client
                .get(t.url("/v1/metrics"))
                .bearer_auth(METRICS_KEY)
                .header(
                    "accept",
                    "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
                ),
        )
        .await;
    assert!(
        om.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    assert!(om.text.trim_end().ends_with("# EOF"), "{}", om.text);

    let r = t.get("/v1/metrics", Some(TENANT_KEY)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let samples: Vec<&str> = r.text.lines().filter(|l| !l.starts_with('#')).collect();
    assert!(!samples.is_empty(), "{}", r.text);
    assert!(
        samples.iter().all(|l| l.contains("tenant=\"acme\"")),
        "{}",
        r.text
    );
    // Never a key or a principal id as a label.
    assert!(!r.text.contains(TENANT_KEY) && !r.text.contains("\"acme\",\"id"));
    t.server.shutdown().await;
}
