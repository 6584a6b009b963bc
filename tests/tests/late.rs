//! A verdict that arrives after its deadline is a fault, always: with the epoch ticker
//! held (as when it falls behind on a loaded machine), nothing interrupts a plugin that
//! spins past its deadline and then grants every caller, and the host still refuses to use
//! its answer. Its own test binary, because holding the ticker is process-wide.

// Test helpers may unwrap: a failure is a test failure.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::json;
use warden::plugins::Slot;
use warden_tests::{INFERENCE_KEY, config, source, start};

#[tokio::test]
async fn an_answer_after_the_deadline_is_a_deadline_fault() {
    let t = start(config()).await;
    let plugins = &t.server.state().services().unwrap().plugins;
    let mut spinning = source(
        Slot::Auth,
        "misbehave",
        json!({"mode": "spin", "spin_iterations": 300_000_000u64, "spare_smoke": true}),
    );
    spinning.limits.deadline = Duration::from_millis(20);
    plugins.replace(&spinning).unwrap();
    let metrics = &t.server.state().metrics;
    let before = metrics.fault_count("auth", "deadline");

    warden::plugins::hold_epoch_for_tests(true);
    for _ in 0..3 {
        let started = Instant::now();
        let r = t.get("/v1/models", Some(INFERENCE_KEY)).await;
        let took = started.elapsed();
        assert!(
            took > Duration::from_millis(20),
            "the spin was not late: {took:?}"
        );
        assert_eq!(r.error(503)["code"], "policy_unavailable", "{}", r.text);
    }
    warden::plugins::hold_epoch_for_tests(false);
    assert_eq!(metrics.fault_count("auth", "deadline"), before + 3);

    // The same plugin is also refused at swap when its smoke call comes back late.
    let mut late = source(
        Slot::Auth,
        "misbehave",
        json!({"mode": "spin", "spin_iterations": 300_000_000u64}),
    );
    late.limits.deadline = Duration::from_millis(20);
    warden::plugins::hold_epoch_for_tests(true);
    let err = plugins.replace(&late).unwrap_err();
    warden::plugins::hold_epoch_for_tests(false);
    assert!(err.to_string().contains("authenticate: deadline"), "{err}");
    t.server.shutdown().await;
}
