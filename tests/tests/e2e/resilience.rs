//! The circuit breaker around each engine, and the queue timeout.

use std::time::{Duration, Instant};

use serde_json::json;
use warden_tests::{METRICS_KEY, TEXT_MODEL, config, start};

#[tokio::test]
async fn repeated_engine_failures_open_the_breaker_and_a_good_probe_closes_it() {
    let mut c = config();
    c.engine.breaker_failures = 3;
    c.engine.breaker_cooldown_ms = 1500;
    let t = start(c).await;
    let services = t.server.state().services().unwrap();
    let model = services.text_model(TEXT_MODEL).unwrap();
    let body = json!({"model": TEXT_MODEL, "prompt": "Hello", "temperature": 0, "max_tokens": 4});
    let gauge = |text: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("warden_circuit_breaker_state{")
                    && l.contains(&format!("model=\"{TEXT_MODEL}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap().to_string())
    };

    model.handle.inject_failures(3);
    for _ in 0..3 {
        let e = t.infer("/v1/completions", body.clone()).await.error(500);
        assert_eq!(e["code"], "engine_error");
    }
    // Open: refused at once, with Retry-After; /ready and the metrics say so.
    let started = Instant::now();
    let r = t.infer("/v1/completions", body.clone()).await;
    assert_eq!(r.error(503)["code"], "engine_unavailable");
    assert!(started.elapsed() < Duration::from_millis(500));
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    let ready = t.get("/ready", None).await;
    assert_eq!(
        (ready.status, ready.json()),
        (503, json!({"status": "unavailable"}))
    );
    let metrics = t.get("/v1/metrics", Some(METRICS_KEY)).await;
    assert_eq!(
        gauge(&metrics.text).as_deref(),
        Some("2"),
        "{}",
        metrics.text
    );
    // Other models have their own breaker.
    let r = t
        .embed(json!({"model": "all-MiniLM-L6-v2", "input": "still here"}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);

    // After the cooldown a probe goes through; its success closes the breaker.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let r = t.infer("/v1/completions", body.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(t.get("/ready", None).await.status, 200);
    let metrics = t.get("/v1/metrics", Some(METRICS_KEY)).await;
    assert_eq!(
        gauge(&metrics.text).as_deref(),
        Some("0"),
        "{}",
        metrics.text
    );
    t.server.shutdown().await;
}

#[tokio::test]
async fn a_request_that_cannot_start_in_time_gets_503() {
    let mut c = config();
    c.engine.max_sequences = 1;
    c.engine.queue_timeout_ms = 300;
    let t = start(c).await;
    // One long generation holds the only place.
    let (busy, _first) = t
        .open_stream("Write a long poem about mountains.", 400)
        .await;
    let started = Instant::now();
    let r = t
        .infer(
            "/v1/completions",
            json!({"model": TEXT_MODEL, "prompt": "Hi", "max_tokens": 2}),
        )
        .await;
    let took = started.elapsed();
    assert_eq!(r.error(503)["code"], "queue_timeout");
    assert!(r.headers.contains_key("retry-after"));
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    drop(busy);
    let metrics = t.get("/v1/metrics", Some(METRICS_KEY)).await;
    assert!(
        metrics.text.contains(&format!(
            "warden_queue_timeouts_total{{model=\"{TEXT_MODEL}\"}} 1"
        )),
        "{}",
        metrics.text
    );
    t.server.shutdown().await;
}
