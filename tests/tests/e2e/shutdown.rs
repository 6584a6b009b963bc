//! Graceful shutdown: `/ready` turns 503 at once, streams in flight run to completion, and a
//! stream still running when the grace period ends gets a final error event and a clean end.

use std::time::{Duration, Instant};

use serde_json::json;
use warden_tests::{Events, INFERENCE_KEY, TEXT_MODEL, TestServer, config, start};

/// Start a greedy chat stream; returns the response after its first chunk, and that chunk.
async fn open_stream(t: &TestServer, max_tokens: u32) -> (reqwest::Response, String) {
    let mut response = t
        .client
        .post(t.url("/v1/chat/completions"))
        .bearer_auth(INFERENCE_KEY)
        .json(&json!({
            "model": TEXT_MODEL,
            "messages": [{"role": "user", "content": "Tell me a very long story about the sea."}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": true,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let first = response.chunk().await.unwrap().unwrap();
    (response, String::from_utf8(first.to_vec()).unwrap())
}

/// Read the rest of a stream; a cut connection fails the test.
async fn read_rest(mut response: reqwest::Response, mut text: String) -> Events {
    while let Some(chunk) = response
        .chunk()
        .await
        .expect("a clean end, not a cut socket")
    {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    Events::parse(&text)
}

#[tokio::test]
async fn streams_in_flight_finish_and_ready_turns_503_at_once() {
    let mut c = config();
    c.shutdown_delay_ms = 1500;
    let t = start(c).await;
    let (response, first) = open_stream(&t, 24).await;
    let TestServer {
        server,
        base,
        client,
    } = t;
    let addr = server.addr();
    let stopping = tokio::spawn(server.shutdown());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ready = client.get(format!("{base}/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(
        ready.json::<serde_json::Value>().await.unwrap()["status"],
        "draining"
    );

    let events = read_rest(response, first).await;
    assert!(events.done, "{events:?}");
    let last = events.chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    tokio::time::timeout(Duration::from_secs(60), stopping)
        .await
        .expect("shutdown ends once the stream is done")
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}

#[tokio::test]
async fn a_stream_past_the_grace_period_ends_with_an_error_event() {
    let mut c = config();
    c.shutdown_grace_secs = 1;
    let t = start(c).await;
    let (response, first) = open_stream(&t, 4000).await;
    let started = Instant::now();
    let stopping = tokio::spawn(t.server.shutdown());
    let events = read_rest(response, first).await;
    assert!(!events.done, "{events:?}");
    let last = events.chunks.last().unwrap();
    assert_eq!(last["error"]["code"], "server_shutting_down", "{last}");
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shutdown ends after the grace period")
        .unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(8),
        "{took:?}"
    );
}
