//! Graceful shutdown: `/ready` turns 503 at once, streams in flight run to completion, and a
//! stream still running when the grace period ends gets a final error event and a clean end.

use std::time::{Duration, Instant};

use warden_tests::{TestServer, config, read_rest, start};

const PROMPT: &str = "Tell me a very long story about the sea.";

#[tokio::test]
async fn streams_in_flight_finish_and_ready_turns_503_at_once() {
    let mut c = config();
    c.shutdown_delay_ms = 1500;
    let t = start(c).await;
    let (response, first) = t.open_stream(PROMPT, 24).await;
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
    let (response, first) = t.open_stream(PROMPT, 4000).await;
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
