//! Misbehaving plugins: auth and sanitizer fail closed (503) within the deadline plus a small
//! margin, the metrics policy fails open, every fault is counted once, and the next request
//! with a good plugin succeeds. Bad plugins are refused at load and the live set stays.

use std::time::{Duration, Instant};

use serde_json::json;
use warden::plugins::{LoadError, Slot};
use warden_tests::{config, source, start};

const MODES: [(&str, &str); 5] = [
    ("loop", "deadline"),
    ("memory", "memory"),
    ("trap", "trap"),
    ("panic", "trap"),
    ("garbage", "malformed"),
];

fn good(slot: Slot) -> &'static str {
    match slot {
        Slot::Auth => "auth-api-key",
        Slot::Sanitizer => "sanitize-basic",
        Slot::MetricsPolicy => "metrics-policy-basic",
    }
}

#[tokio::test]
async fn every_fault_in_every_slot_is_contained() {
    let t = start(config()).await;
    let services = t.server.state().services().unwrap();
    let metrics = &t.server.state().metrics;
    let body = json!({"model": "all-MiniLM-L6-v2", "input": "hello"});
    let auth_config = warden::keys::auth_plugin_config(&config()).unwrap();
    let good_config = |slot: Slot| match slot {
        Slot::Auth => serde_json::from_str(&auth_config).unwrap(),
        _ => json!({}),
    };

    for slot in [Slot::Auth, Slot::Sanitizer, Slot::MetricsPolicy] {
        for (mode, kind) in MODES {
            services
                .plugins
                .replace(&source(
                    slot,
                    "misbehave",
                    json!({"mode": mode, "spare_smoke": true}),
                ))
                .unwrap();
            let before = metrics.fault_count(slot.as_str(), kind);
            let r = t.embed(body.clone()).await;
            match slot {
                Slot::MetricsPolicy => assert_eq!(r.status, 200, "{slot} {mode}: {}", r.text),
                _ => {
                    let e = r.error(503);
                    assert_eq!(e["code"], "policy_unavailable", "{slot} {mode}");
                    assert!(
                        !r.text.contains("misbehave") && !r.text.contains(kind),
                        "{}",
                        r.text
                    );
                    assert!(r.headers.contains_key("retry-after"));
                }
            }
            assert_eq!(
                metrics.fault_count(slot.as_str(), kind),
                before + 1,
                "{slot} {mode}"
            );

            services
                .plugins
                .replace(&source(slot, good(slot), good_config(slot)))
                .unwrap();
            let r = t.embed(body.clone()).await;
            assert_eq!(r.status, 200, "after {slot} {mode}: {}", r.text);
        }
    }
    // Calls run on the request's own task: a guest panic (its message written to stderr)
    // or a trap must fail the call in wasmtime, never panic the host side of it.
    assert_eq!(
        warden::plugins::host_panics(),
        0,
        "a plugin fault panicked the host"
    );
    t.server.shutdown().await;
}

#[tokio::test]
async fn bad_plugins_are_refused_at_load_and_the_live_set_stays() {
    let t = start(config()).await;
    let plugins = &t.server.state().services().unwrap().plugins;
    let body = json!({"model": "all-MiniLM-L6-v2", "input": "hello"});

    let err = plugins
        .replace(&source(
            Slot::Sanitizer,
            "misbehave",
            json!({"mode": "bad-config"}),
        ))
        .unwrap_err();
    assert!(matches!(err, LoadError::Configure { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("this fixture refuses its configuration"),
        "{err}"
    );

    let err = plugins
        .replace(&source(
            Slot::Sanitizer,
            "sanitize-basic",
            json!({"max_texts": "many"}),
        ))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("rejected its configuration: invalid configuration"),
        "{err}"
    );

    // A sanitizer in the auth slot does not implement the auth world.
    let err = plugins
        .replace(&source(Slot::Auth, "sanitize-basic", json!({})))
        .unwrap_err();
    assert!(matches!(err, LoadError::World { .. }), "{err}");
    assert!(
        err.to_string().contains("warden:policy/auth-plugin"),
        "{err}"
    );

    let mut pinned = source(Slot::MetricsPolicy, "metrics-policy-basic", json!({}));
    pinned.expected_sha256 = Some("00".repeat(32));
    let err = plugins.replace(&pinned).unwrap_err();
    assert!(err.to_string().contains("sha256 mismatch"), "{err}");

    let mut garbage = source(Slot::Auth, "auth-api-key", json!({}));
    garbage.bytes = b"\0asm not really".to_vec().into();
    let err = plugins.replace(&garbage).unwrap_err();
    assert!(matches!(err, LoadError::Invalid { .. }), "{err}");

    assert!(!err.to_string().contains(warden_tests::PLUGIN_DIR), "{err}");

    // A plugin that faults on every call is caught by the smoke call, in every slot.
    for slot in [Slot::Auth, Slot::Sanitizer, Slot::MetricsPolicy] {
        for (mode, kind) in [
            ("loop", "deadline"),
            ("trap", "trap"),
            ("garbage", "malformed"),
        ] {
            let err = plugins
                .replace(&source(slot, "misbehave", json!({"mode": mode})))
                .unwrap_err();
            assert!(matches!(err, LoadError::Smoke { .. }), "{err}");
            assert!(
                err.to_string().contains("failed its smoke call") && err.to_string().contains(kind),
                "{slot} {mode}: {err}"
            );
        }
    }

    // A component built against another WIT version is named with both versions.
    let mut newer = source(Slot::Auth, "auth-api-key", json!({}));
    newer.bytes = warden_tests::with_wit_version(&newer.bytes, "0.2.0").into();
    let err = plugins.replace(&newer).unwrap_err();
    assert!(matches!(err, LoadError::Version { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "auth plugin `auth-api-key` exports warden:policy/auth@0.2.0; this host serves 0.1.x: rebuild it against warden:policy 0.1.x (warden-policy 0.1.x, or the wit/ of this release)"
    );
    let r = t.embed(body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    t.server.shutdown().await;
}

#[tokio::test]
async fn a_misconfigured_plugin_stops_start_up_with_a_clear_error() {
    let mut c = config();
    c.plugins.sanitizer.config = json!({"unknown_option": 1}).as_object().unwrap().clone();
    let server = warden::Server::start(c).await.unwrap();
    let err = server.ready().await.unwrap_err();
    assert!(
        err.contains("sanitizer plugin `sanitize-basic` rejected its configuration"),
        "{err}"
    );
    let r = reqwest::get(format!("http://{}/ready", server.addr()))
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    server.shutdown().await;

    let mut c = config();
    c.plugin_dir = std::env::temp_dir().join("warden-nowhere");
    let server = warden::Server::start(c).await.unwrap();
    let err = server.ready().await.unwrap_err();
    assert_eq!(err, "auth plugin file not found: auth-api-key.wasm");
    server.shutdown().await;
}

/// A limit in obeyed and violated pairs: the same plugin just inside the limit serves, just
/// outside it faults with the limit's kind, counted once. No timing upper bound: a loaded
/// machine can delay a call, never change its fault kind.
#[tokio::test]
async fn memory_caps_and_deadlines_hold_in_obeyed_and_violated_pairs() {
    let t = start(config()).await;
    let services = t.server.state().services().unwrap();
    let metrics = &t.server.state().metrics;
    let body = json!({"model": "all-MiniLM-L6-v2", "input": "x"});
    let cases = [
        // (configuration, memory cap MiB, deadline ms, fault kind or none)
        (json!({"mode": "hold", "hold_mib": 1}), 4, 100, None),
        (
            json!({"mode": "hold", "hold_mib": 8}),
            4,
            100,
            Some("memory"),
        ),
        (json!({"mode": "hold", "hold_mib": 8}), 16, 100, None),
        (
            json!({"mode": "spin", "spin_iterations": 1000}),
            16,
            50,
            None,
        ),
        (json!({"mode": "loop"}), 16, 50, Some("deadline")),
    ];
    for (config, memory_mib, deadline_ms, fault) in cases {
        let mut spared = config.clone();
        spared["spare_smoke"] = json!(true);
        let mut plugin = source(Slot::Sanitizer, "misbehave", spared);
        plugin.limits.memory_bytes = memory_mib << 20;
        plugin.limits.deadline = Duration::from_millis(deadline_ms);
        services.plugins.replace(&plugin).unwrap();
        let kinds = ["memory", "deadline"];
        let before: Vec<u64> = kinds
            .iter()
            .map(|k| metrics.fault_count("sanitizer", k))
            .collect();
        let started = Instant::now();
        let r = t.embed(body.clone()).await;
        let took = started.elapsed();
        let after: Vec<u64> = kinds
            .iter()
            .map(|k| metrics.fault_count("sanitizer", k))
            .collect();
        for ((kind, b), a) in kinds.iter().zip(&before).zip(&after) {
            let expected = u64::from(fault == Some(*kind));
            assert_eq!(
                a - b,
                expected,
                "{config} at {memory_mib} MiB: {kind} faults"
            );
        }
        match fault {
            None => assert_eq!(r.status, 200, "{config} at {memory_mib} MiB: {}", r.text),
            Some(kind) => {
                assert_eq!(r.error(503)["code"], "policy_unavailable", "{config}");
                if kind == "deadline" {
                    assert!(took >= Duration::from_millis(deadline_ms), "{took:?}");
                }
            }
        }
    }
    t.server.shutdown().await;
}
