//! Peak and retained memory of large requests, for docs/performance.md (`make bench-memory`).
//!
//! `memory MODELS_DIR PLUGIN_DIR [CONCURRENCY]` starts Warden in this process with a
//! permissive sanitizer (texts up to 4 MiB, no PII scan), then for each kind of 2 MiB body
//! sends CONCURRENCY (16) of them at once and prints one JSON line: resident memory before,
//! the peak while they ran, and what is left twelve seconds after (the allocator returns
//! freed memory after ten), in MiB; and the same for live heap bytes, counted.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use warden::config::Secret;
use warden::{Config, Server};

/// Counts live heap bytes, so that what requests hold can be told from what the
/// allocator keeps.
struct Counting;

static LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static PEAK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

// SAFETY: forwards to jemalloc (the binary's allocator) unchanged; only counts.
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use std::sync::atomic::Ordering::Relaxed;
        let now = LIVE.fetch_add(layout.size(), Relaxed) + layout.size();
        PEAK.fetch_max(now, Relaxed);
        // SAFETY: the caller's layout, passed on.
        unsafe { tikv_jemallocator::Jemalloc.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        LIVE.fetch_sub(layout.size(), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: allocated by `alloc` above with this layout.
        unsafe { tikv_jemallocator::Jemalloc.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn mib(bytes: usize) -> f64 {
    (bytes as f64 / (1 << 20) as f64 * 10.0).round() / 10.0
}

const KEY: &str = "memory-probe-key-7d1c";
const BODY: usize = 2 << 20;

/// Resident set size of this process, in MiB.
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Words of prose, `bytes` long.
fn text(bytes: usize) -> String {
    let words = "the report was sent to finance on monday and questions go to the desk ";
    words.repeat(bytes / words.len() + 1)[..bytes].to_string()
}

fn bodies() -> Vec<(&'static str, &'static str, Value)> {
    let n = 2048;
    let short = text(BODY / n - 8);
    vec![
        (
            "embeddings, one 2 MiB input",
            "/v1/embeddings",
            json!({"model": "all-MiniLM-L6-v2", "input": text(BODY - 64)}),
        ),
        (
            "embeddings, 2048 inputs of 1 KiB",
            "/v1/embeddings",
            json!({"model": "all-MiniLM-L6-v2", "input": vec![short; n]}),
        ),
        (
            "chat, one 2 MiB message",
            "/v1/chat/completions",
            json!({"model": "SmolLM2-135M-Instruct", "max_tokens": 1,
                   "messages": [{"role": "user", "content": text(BODY - 128)}]}),
        ),
        (
            "completion, 2 MiB prompt",
            "/v1/completions",
            json!({"model": "SmolLM2-135M-Instruct", "max_tokens": 1, "prompt": text(BODY - 128)}),
        ),
        (
            "completion, 2 MiB of token ids",
            "/v1/completions",
            json!({"model": "SmolLM2-135M-Instruct", "max_tokens": 1,
                   "prompt": vec![1u32; BODY / 2 - 64]}),
        ),
    ]
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let models = PathBuf::from(args.next().expect("MODELS_DIR"));
    let plugins = PathBuf::from(args.next().expect("PLUGIN_DIR"));
    let concurrency: usize = args.next().map_or(16, |n| n.parse().expect("CONCURRENCY"));
    let mut config = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        models_dir: models,
        plugin_dir: plugins,
        api_key: Some(Secret::new(KEY)),
        cache_dir: PathBuf::new(),
        ..Config::default()
    };
    config.plugins.sanitizer.config = json!({
        "max_text_bytes": 4 << 20,
        "input": {"email": "off", "phone": "off", "card": "off", "ssn": "off"},
    })
    .as_object()
    .expect("object")
    .clone();
    config.plugins.sanitizer.deadline_ms = 2000;
    let server = Server::start(config).await.expect("starts");
    server.ready().await.expect("loads");
    let base = format!("http://{}", server.addr());
    let client = reqwest::Client::new();
    // Warm up every route once, so that first-use allocations are not counted.
    for (_, route, body) in bodies() {
        let small = match route {
            "/v1/embeddings" => json!({"model": body["model"], "input": "warm up"}),
            "/v1/completions" => json!({"model": body["model"], "prompt": "hi", "max_tokens": 1}),
            _ => json!({"model": body["model"], "max_tokens": 1,
                        "messages": [{"role": "user", "content": "hi"}]}),
        };
        let _ = client
            .post(format!("{base}{route}"))
            .bearer_auth(KEY)
            .json(&small)
            .send()
            .await;
    }
    for (name, route, body) in bodies() {
        let raw = serde_json::to_vec(&body).expect("json");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_mib();
        let live_before = LIVE.load(std::sync::atomic::Ordering::Relaxed);
        PEAK.store(live_before, std::sync::atomic::Ordering::Relaxed);
        let peak = std::sync::Arc::new(std::sync::Mutex::new(before));
        let sampling = {
            let peak = peak.clone();
            tokio::spawn(async move {
                loop {
                    let now = rss_mib();
                    {
                        let mut p = peak.lock().expect("lock");
                        *p = p.max(now);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        let started = Instant::now();
        let requests = (0..concurrency).map(|_| {
            client
                .post(format!("{base}{route}"))
                .bearer_auth(KEY)
                .header("content-type", "application/json")
                .body(raw.clone())
                .send()
        });
        let replies = futures_util::future::join_all(requests).await;
        let took = started.elapsed();
        let statuses: Vec<u16> = replies
            .iter()
            .map(|r| r.as_ref().map_or(0, |r| r.status().as_u16()))
            .collect();
        // jemalloc hands freed pages back after its decay time (10 s).
        tokio::time::sleep(Duration::from_secs(12)).await;
        sampling.abort();
        let after = rss_mib();
        let peak = *peak.lock().expect("lock");
        let live_peak = PEAK.load(std::sync::atomic::Ordering::Relaxed);
        let live_after = LIVE.load(std::sync::atomic::Ordering::Relaxed);
        let mut distinct = statuses.clone();
        distinct.sort();
        distinct.dedup();
        println!(
            "{}",
            json!({
                "request": name,
                "concurrent": concurrency,
                "body_mib": raw.len() as f64 / (1 << 20) as f64,
                "statuses": distinct,
                "seconds": (took.as_secs_f64() * 100.0).round() / 100.0,
                "rss_before_mib": before.round(),
                "rss_peak_mib": peak.round(),
                "rss_after_mib": after.round(),
                "peak_per_request_mib": ((peak - before) / concurrency as f64 * 10.0).round() / 10.0,
                "heap_live_before_mib": mib(live_before),
                "heap_live_peak_mib": mib(live_peak),
                "heap_live_after_mib": mib(live_after),
                "heap_peak_per_request_mib": mib(live_peak.saturating_sub(live_before) / concurrency),
            })
        );
    }
    server.shutdown().await;
}
