//! Plugin swap latency, for docs/performance.md (`make bench-swap` runs it twice).
//!
//! `bench_swap PLUGIN_DIR CACHE_DIR [SWAPS]` loads the three reference plugins through the
//! disk cache in CACHE_DIR (cold if it is empty, warm on the second run), then swaps the auth
//! plugin SWAPS times between two configurations (the re-activation of a known component:
//! validation, configure and smoke call, no compile) and prints one JSON line.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use warden::metrics::Metrics;
use warden::plugins::{DiskCache, Limits, PluginSet, PluginSource, Registry, Slot, Trigger};

fn source(dir: &std::path::Path, slot: Slot, name: &str, config: &str) -> PluginSource {
    PluginSource::from_file(
        slot,
        &dir.join(format!("{name}.wasm")),
        None,
        config.to_string(),
        Limits::default(),
    )
    .expect("component")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("PLUGIN_DIR"));
    let cache_dir = PathBuf::from(args.next().expect("CACHE_DIR"));
    let swaps: usize = args.next().map_or(200, |n| n.parse().expect("SWAPS"));
    let warm = std::fs::read_dir(&cache_dir).is_ok_and(|mut d| d.next().is_some());
    let cache = DiskCache::open(&cache_dir).expect("cache dir");
    let keys = |n: usize| {
        let keys: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    r#"{{"id":"k{i}","sha256":"{}","scopes":["inference"]}}"#,
                    "a".repeat(64)
                )
            })
            .collect();
        format!(r#"{{"keys":[{}]}}"#, keys.join(","))
    };
    let sink = Arc::new(Metrics::new());

    let started = Instant::now();
    let set = PluginSet::load(
        &warden::plugins::Runtime::builder()
            .build()
            .expect("plugin runtime"),
        &source(&dir, Slot::Auth, "auth-api-key", &keys(1)),
        &source(&dir, Slot::Sanitizer, "sanitize-basic", "{}"),
        &source(&dir, Slot::MetricsPolicy, "metrics-policy-basic", "{}"),
        sink.clone(),
        Some(&cache),
    )
    .expect("plugins load");
    let load = started.elapsed();
    let registry = Registry::new(set, sink, Some(cache));

    let mut times = Vec::with_capacity(swaps);
    for i in 0..swaps {
        let next = source(&dir, Slot::Auth, "auth-api-key", &keys(1 + i % 2));
        let started = Instant::now();
        registry
            .apply(std::slice::from_ref(&next), Trigger::Api)
            .expect("swap");
        times.push(started.elapsed());
    }
    times.sort();
    let pct = |p: f64| ms(times[((times.len() - 1) as f64 * p).round() as usize]);
    let started = Instant::now();
    let _ = registry
        .rollback(Slot::Auth, Trigger::Api)
        .expect("rollback");
    let rollback = started.elapsed();
    println!(
        r#"{{"cache":"{}","load_three_ms":{:.1},"swaps":{swaps},"swap_p50_ms":{:.3},"swap_p95_ms":{:.3},"swap_max_ms":{:.3},"rollback_ms":{:.4}}}"#,
        if warm { "warm" } else { "cold" },
        ms(load),
        pct(0.5),
        pct(0.95),
        pct(1.0),
        ms(rollback)
    );
}
