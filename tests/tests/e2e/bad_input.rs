//! Bad input gets a clear 4xx with an OpenAI-style body: never a 500 or a path.

use serde_json::json;
use warden_tests::{INFERENCE_KEY, config, start};

#[tokio::test]
async fn malformed_requests_are_4xx_with_openai_errors() {
    let t = start(config()).await;
    let raw = |body: &'static str| t.raw_embeddings(Some(INFERENCE_KEY), "application/json", body);
    for body in [
        "{",
        "",
        "[1,2]",
        "null",
        r#"{"model": 5, "input": "x"}"#,
        r#"{"input": "x"}"#,
        r#"{"model": "all-MiniLM-L6-v2"}"#,
        r#"{"model":"all-MiniLM-L6-v2","input":"x","temperature":1}"#,
    ] {
        let r = t.send(raw(body)).await;
        r.error(400);
    }
    let cases = [
        (
            json!({"model": "all-MiniLM-L6-v2", "input": [1, 2, 3]}),
            "input",
        ),
        (
            json!({"model": "all-MiniLM-L6-v2", "input": [[1, 2], [3]]}),
            "input",
        ),
        (json!({"model": "all-MiniLM-L6-v2", "input": []}), "input"),
        (json!({"model": "all-MiniLM-L6-v2", "input": ""}), "input"),
        (
            json!({"model": "all-MiniLM-L6-v2", "input": ["a", null]}),
            "input",
        ),
        (
            json!({"model": "all-MiniLM-L6-v2", "input": "a", "dimensions": 64}),
            "dimensions",
        ),
        (
            json!({"model": "all-MiniLM-L6-v2", "input": "a", "encoding_format": "int8"}),
            "encoding_format",
        ),
    ];
    for (body, param) in cases {
        let r = t.embed(body.clone()).await;
        assert_eq!(r.error(400)["param"], param, "{body}");
    }
    let unknown = t.embed(json!({"model": "gpt-4", "input": "a"})).await;
    let e = unknown.error(404);
    assert_eq!(
        (e["code"].as_str(), e["param"].as_str()),
        (Some("model_not_found"), Some("model"))
    );

    let not_json = t
        .send(t.raw_embeddings(Some(INFERENCE_KEY), "text/plain", "hi"))
        .await;
    not_json.error(415);
    t.server.shutdown().await;
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_declared_or_streamed() {
    let t = start(config()).await;
    let big = "x".repeat(2 * 1024 * 1024 + 1);
    let body = format!(r#"{{"model":"all-MiniLM-L6-v2","input":"{big}"}}"#);
    let r = t
        .send(t.raw_embeddings(Some(INFERENCE_KEY), "application/json", body.clone()))
        .await;
    assert_eq!(r.error(413)["code"], "payload_too_large");
    // Chunked, with no Content-Length to trust.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body
        .into_bytes()
        .chunks(64 * 1024)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let stream = futures_util::stream::iter(chunks);
    let r = t
        .send(t.raw_embeddings(
            Some(INFERENCE_KEY),
            "application/json",
            reqwest::Body::wrap_stream(stream),
        ))
        .await;
    r.error(413);
    t.server.shutdown().await;
}

#[tokio::test]
async fn unknown_routes_and_methods() {
    let t = start(config()).await;
    t.get("/v1/nope", Some(INFERENCE_KEY)).await.error(404);
    t.get("/v1/embeddings", Some(INFERENCE_KEY))
        .await
        .error(405);
    t.server.shutdown().await;
}

#[tokio::test]
async fn unauthenticated_clients_learn_nothing_about_the_body() {
    let t = start(config()).await;
    let r = t
        .send(t.raw_embeddings(None, "application/json", "{"))
        .await;
    r.error(401);
    t.server.shutdown().await;
}
