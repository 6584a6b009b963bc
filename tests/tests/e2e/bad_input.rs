//! Bad input gets a clear 4xx with an OpenAI-style body: never a 500 or a path.

use serde_json::json;
use warden_tests::{INFERENCE_KEY, config, start};

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
async fn limits_the_host_can_check_are_400_before_any_plugin_runs() {
    let t = start(config()).await;
    let metrics = &t.server.state().metrics;
    let calls = || t.server.state().services().unwrap().plugins.status()[1].calls;
    let before = calls();
    // 100,000 embedding inputs (OpenAI allows 2,048).
    let many = vec!["a"; 100_000];
    let r = t
        .embed(json!({"model": "all-MiniLM-L6-v2", "input": many}))
        .await;
    let e = r.error(400);
    assert_eq!(
        (e["code"].as_str(), e["param"].as_str()),
        (Some("too_many_values"), None)
    );
    let r = t
        .embed(json!({"model": "all-MiniLM-L6-v2", "input": vec!["a"; 2049]}))
        .await;
    let e = r.error(400);
    assert_eq!(e["code"], "too_many_inputs", "{}", r.text);
    // 1,025 chat messages.
    let messages = vec![json!({"role": "user", "content": "hi"}); 1025];
    let r = t
        .infer(
            "/v1/chat/completions",
            json!({"model": warden_tests::TEXT_MODEL, "messages": messages}),
        )
        .await;
    assert_eq!(r.error(400)["code"], "too_many_messages");
    // A prompt of more token ids than the context window, and one of more text than it
    // can hold: refused without tokenizing.
    let r = t
        .infer(
            "/v1/completions",
            json!({"model": warden_tests::TEXT_MODEL, "prompt": vec![1; 9000]}),
        )
        .await;
    assert_eq!(r.error(400)["code"], "context_length_exceeded");
    let r = t
        .infer(
            "/v1/completions",
            json!({"model": warden_tests::TEXT_MODEL, "prompt": "word ".repeat(400_000)}),
        )
        .await;
    let e = r.error(400);
    assert_eq!(
        (e["code"].as_str(), e["param"].as_str()),
        (Some("context_length_exceeded"), Some("prompt"))
    );
    // None of these reached the sanitizer.
    assert_eq!(
        calls(),
        before,
        "a plugin was called for a request the host could refuse"
    );
    assert_eq!(metrics.fault_count("sanitizer", "deadline"), 0);
    t.server.shutdown().await;
}

#[tokio::test]
async fn headers_over_the_limit_are_431_and_duplicate_credentials_400() {
    let t = start(config()).await;
    let r = t
        .send(
            t.client
                .get(t.url("/v1/models"))
                .bearer_auth(INFERENCE_KEY)
                .header("x-padding", "p".repeat(200 * 1024)),
        )
        .await;
    assert_eq!(r.status, 431, "{}", r.text);
    // Headers under the limit are fine.
    let r = t
        .send(
            t.client
                .get(t.url("/v1/models"))
                .bearer_auth(INFERENCE_KEY)
                .header("x-padding", "p".repeat(32 * 1024)),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // Two Authorization headers, the valid key first or second: never resolved by order.
    for (first, second) in [(INFERENCE_KEY, "wrong-key"), ("wrong-key", INFERENCE_KEY)] {
        let r = t
            .send(
                t.client
                    .get(t.url("/v1/models"))
                    .header("authorization", format!("Bearer {first}"))
                    .header("authorization", format!("Bearer {second}")),
            )
            .await;
        assert_eq!(r.error(400)["code"], "ambiguous_credentials", "{}", r.text);
    }
    t.server.shutdown().await;
}

#[tokio::test]
async fn a_client_that_trickles_its_headers_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = config();
    c.header_timeout_secs = 1;
    let t = start(c).await;
    let mut stream = tokio::net::TcpStream::connect(t.server.addr())
        .await
        .unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut buf),
    )
    .await;
    assert!(read.is_ok(), "the connection was left open");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(t.get("/health", None).await.status, 200);
    t.server.shutdown().await;
}

#[tokio::test]
async fn a_client_that_trickles_its_body_gets_408_and_idle_connections_close() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = config();
    c.header_timeout_secs = 1;
    c.body_timeout_secs = 1;
    let t = start(c).await;
    // Headers whole, then 10 of the 100 bytes the body declares, and nothing more.
    let mut stream = tokio::net::TcpStream::connect(t.server.addr())
        .await
        .unwrap();
    let head = format!(
        "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {INFERENCE_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\":"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut buf))
        .await
        .expect("no answer to a stalled body")
        .unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("\"code\":\"request_timeout\""), "{reply}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));

    // A kept-alive connection that sends no further request is closed, not held.
    let mut idle = tokio::net::TcpStream::connect(t.server.addr())
        .await
        .unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        idle.read_to_end(&mut rest),
    )
    .await;
    assert!(
        closed.is_ok(),
        "an idle keep-alive connection was held open"
    );
    assert_eq!(t.get("/health", None).await.status, 200);
    t.server.shutdown().await;
}
