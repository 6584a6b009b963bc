//! `GET /v1/metrics`: scope `metrics` required, and the metrics policy decides which series
//! each caller sees.

use serde_json::json;
use warden::plugins::Slot;
use warden_tests::{INFERENCE_KEY, METRICS_KEY, auth_keys, config, source, start};

const TENANT_KEY: &str = "test-tenant-key-acme-51b0";

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
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"),
        "{:?}",
        r.headers
    );
    assert!(r.text.contains("tenant=\"acme\""), "{}", r.text);
    assert!(r.text.contains("tenant=\"none\""), "{}", r.text);
    assert!(r.text.trim_end().ends_with("# EOF"), "{}", r.text);

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
