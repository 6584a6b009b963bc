//! Authentication and scopes: the host's rule over the auth plugin's principals.

use serde_json::json;
use warden_tests::{INFERENCE_KEY, config, start};

#[tokio::test]
async fn models_lists_ids_only_and_needs_a_key() {
    let t = start(config()).await;
    t.get("/v1/models", None).await.error(401);
    let r = t.get("/v1/models", Some(INFERENCE_KEY)).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"]);
    assert_eq!(v["data"][0]["object"], "model");
    assert!(!r.text.contains('/'), "a path in /v1/models: {}", r.text);
    t.server.shutdown().await;
}

#[tokio::test]
async fn health_and_ready_need_no_key_and_leak_nothing() {
    let t = start(config()).await;
    let h = t.get("/health", None).await;
    assert_eq!((h.status, h.json()), (200, json!({"status": "ok"})));
    let r = t.get("/ready", None).await;
    assert_eq!((r.status, r.json()), (200, json!({"status": "ready"})));
    t.server.shutdown().await;
}

#[tokio::test]
async fn request_ids_are_echoed_or_generated() {
    let t = start(config()).await;
    let r = t
        .send(
            t.client
                .get(t.url("/v1/models"))
                .bearer_auth(INFERENCE_KEY)
                .header("x-request-id", "abc-123"),
        )
        .await;
    assert_eq!(r.headers["x-request-id"], "abc-123");
    let r = t
        .send(
            t.client
                .get(t.url("/v1/models"))
                .bearer_auth(INFERENCE_KEY)
                .header("x-request-id", "bad id!"),
        )
        .await;
    let id = r.headers["x-request-id"].to_str().unwrap();
    assert!(id != "bad id!" && id.len() == 32, "{id}");
    t.server.shutdown().await;
}

#[tokio::test]
async fn without_configured_keys_a_private_key_is_generated() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("api-key");
    let mut c = config();
    c.api_key = None;
    c.metrics_api_key = None;
    c.generated_key_file = key_file.clone();
    let t = start(c).await;
    let key = std::fs::read_to_string(&key_file).unwrap();
    let body = json!({"model": "all-MiniLM-L6-v2", "input": "hello"});
    t.post("/v1/embeddings", Some(INFERENCE_KEY), &body)
        .await
        .error(401);
    let ok = t.post("/v1/embeddings", Some(key.trim()), &body).await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    t.server.shutdown().await;
}
