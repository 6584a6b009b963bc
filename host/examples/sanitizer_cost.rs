//! What the reference sanitizer costs per MiB of input, through the real runtime (fresh
//! instance, configure, the input copied into the guest, the PII scan), for sizing its
//! deadline and limits (docs/performance.md; `make bench-sanitizer` runs it).
//!
//! `sanitizer_cost PLUGIN_DIR [ROUNDS]` prints one JSON line per input shape: the median
//! and the worst call in milliseconds, and MiB/s at the median.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use warden::metrics::Metrics;
use warden::plugins::{
    InferenceInput, InputKind, Limits, Payload, PluginSet, PluginSource, Principal, Slot,
};

fn source(dir: &std::path::Path, slot: Slot, name: &str, config: &str) -> PluginSource {
    let limits = Limits {
        deadline: Duration::from_secs(5),
        ..Limits::default()
    };
    PluginSource::from_file(
        slot,
        &dir.join(format!("{name}.wasm")),
        None,
        config.to_string(),
        limits,
    )
    .expect("component")
}

/// English prose with the occasional number, address and phone number, `bytes` long.
fn prose(bytes: usize) -> String {
    let sentence = "The quarterly report was sent to finance on 2024-03-15; questions go to \
                    jane.doe@example.com or +1 (555) 123-4567, and the total was 48,210 units. ";
    let mut text = String::with_capacity(bytes + sentence.len());
    while text.len() < bytes {
        text.push_str(sentence);
    }
    text.truncate(bytes);
    text
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("PLUGIN_DIR"));
    let rounds: usize = args.next().map_or(20, |n| n.parse().expect("ROUNDS"));
    let sink = Arc::new(Metrics::new());
    let set = Arc::new(
        PluginSet::load(
            &warden::plugins::Runtime::builder()
                .build()
                .expect("plugin runtime"),
            &source(&dir, Slot::Auth, "auth-api-key", r#"{"keys":[]}"#),
            &source(&dir, Slot::Sanitizer, "sanitize-basic", "{}"),
            &source(&dir, Slot::MetricsPolicy, "metrics-policy-basic", "{}"),
            sink,
            None,
        )
        .expect("plugins load"),
    );
    let principal = Principal {
        id: "bench".into(),
        tenant: None,
        scopes: vec!["inference".into()],
    };
    let shapes: Vec<(&str, Vec<String>)> = vec![
        ("8 x 256 KiB prose", vec![prose(256 << 10); 8]),
        ("1 x 256 KiB prose", vec![prose(256 << 10)]),
        ("2048 x 1 KiB prose", vec![prose(1 << 10); 2048]),
        ("8 x 256 KiB letters", vec!["a".repeat(256 << 10); 8]),
        (
            "8 x 256 KiB digits",
            vec!["4111 ".repeat((256 << 10) / 5); 8],
        ),
    ];
    for (name, texts) in shapes {
        let bytes: usize = texts.iter().map(String::len).sum();
        let mut times = Vec::with_capacity(rounds);
        for i in 0..rounds + 2 {
            let rid: Arc<str> = format!("bench-{i}").into();
            let input = InferenceInput {
                kind: InputKind::Embeddings,
                model: "m".into(),
                principal: principal.clone(),
                payload: Payload::Texts(texts.clone()),
                max_tokens: None,
            };
            let started = Instant::now();
            let session = set.sanitizer_session(&rid).await.expect("instance");
            let verdict = session.check_input(input).await.expect("no fault");
            let took = started.elapsed();
            assert!(verdict.is_ok(), "{name}: refused: {verdict:?}");
            if i >= 2 {
                times.push(took);
            }
        }
        times.sort();
        let median = times[times.len() / 2];
        let worst = times[times.len() - 1];
        let mib = bytes as f64 / (1 << 20) as f64;
        println!(
            "{}",
            serde_json::json!({
                "input": name,
                "mib": (mib * 1000.0).round() / 1000.0,
                "median_ms": (median.as_secs_f64() * 1e5).round() / 100.0,
                "worst_ms": (worst.as_secs_f64() * 1e5).round() / 100.0,
                "mib_per_s": (mib / median.as_secs_f64()).round(),
                "ms_per_mib": (median.as_secs_f64() * 1e3 / mib * 100.0).round() / 100.0,
            })
        );
    }
}
