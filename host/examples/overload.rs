//! Overload, for docs/performance.md (`make overload`).
//!
//! `overload WARDEN_BIN MODELS_DIR PLUGIN_DIR [CLIENTS] [SECONDS]` starts `warden serve`
//! (the release binary, its three reference plugins) on a free port and drives it with
//! CLIENTS (256) concurrent clients for SECONDS (60), each on its own connection, over a
//! mix of routes: streamed chat completions, embeddings, `GET /v1/models` and
//! `GET /v1/metrics`. A separate client asks `GET /health` every 50 ms. It prints one JSON
//! object: answers by status, 429s without `Retry-After`, transport errors (a connection
//! reset or a stream cut off, neither `[DONE]` nor an error event), `/health` latency
//! percentiles, and the server's resident
//! memory every second. The promise it checks: only 200, 429 and 503; no transport error;
//! RSS flat from the 10th second to the end; `/health` p99 under 50 ms. It exits 1 if a
//! promise is broken.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

#[path = "support/serve.rs"]
mod serve;

const KEY: &str = "overload-key-inference-and-metrics-4b1e";

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

#[derive(Default)]
struct Tally {
    statuses: BTreeMap<String, u64>,
    missing_retry_after: u64,
    transport_errors: BTreeMap<String, u64>,
    streams_incomplete: u64,
    /// Streams that ended with an error event (a queue timeout once started): a clean end.
    streams_ended_by_error_event: u64,
}

impl Tally {
    fn status(&mut self, route: &str, status: u16) {
        *self
            .statuses
            .entry(format!("{route} {status}"))
            .or_default() += 1;
    }
    fn transport(&mut self, route: &str, e: &reqwest::Error) {
        let kind = if e.is_connect() {
            "connect"
        } else if e.is_timeout() {
            "timeout"
        } else if e.is_body() || e.is_decode() {
            "body"
        } else {
            "request"
        };
        *self
            .transport_errors
            .entry(format!("{route} {kind}"))
            .or_default() += 1;
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    (sorted[i] * 100.0).round() / 100.0
}

async fn one(client: &reqwest::Client, base: &str, kind: usize, tally: &Mutex<Tally>) {
    let (route, request) = match kind % 4 {
        0 => (
            "chat-stream",
            client
                .post(format!("{base}/v1/chat/completions"))
                .json(&json!({
                    "model": "SmolLM2-135M-Instruct",
                    "messages": [{"role": "user", "content": "Name three colours."}],
                    "max_tokens": 16,
                    "stream": true,
                })),
        ),
        1 => (
            "embeddings",
            client.post(format!("{base}/v1/embeddings")).json(&json!({
                "model": "all-MiniLM-L6-v2",
                "input": ["the report was sent on monday", "questions go to the desk"],
            })),
        ),
        2 => ("models", client.get(format!("{base}/v1/models"))),
        _ => ("metrics", client.get(format!("{base}/v1/metrics"))),
    };
    let response = match request.bearer_auth(KEY).send().await {
        Ok(r) => r,
        Err(e) => return tally.lock().expect("tally").transport(route, &e),
    };
    let status = response.status().as_u16();
    let retry_after = response.headers().contains_key("retry-after");
    let body = response.text().await;
    let mut t = tally.lock().expect("tally");
    t.status(route, status);
    if status == 429 && !retry_after {
        t.missing_retry_after += 1;
    }
    match body {
        Err(e) => t.transport(route, &e),
        Ok(body) if route == "chat-stream" && status == 200 => {
            let last = body.trim_end().lines().last().unwrap_or_default();
            if last.ends_with("[DONE]") {
            } else if last.starts_with("data:") && last.contains("\"error\"") {
                t.streams_ended_by_error_event += 1;
            } else {
                t.streams_incomplete += 1;
            }
        }
        Ok(_) => {}
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let bin = args.next().expect("WARDEN_BIN");
    let models = args.next().expect("MODELS_DIR");
    let plugins = args.next().expect("PLUGIN_DIR");
    let clients: usize = args.next().map_or(256, |n| n.parse().expect("CLIENTS"));
    let seconds: u64 = args.next().map_or(60, |n| n.parse().expect("SECONDS"));

    let served = serve::Served::start(&bin, &models, &plugins, KEY);
    let mut child = served.child;
    let pid = child.id();
    let rx = served.logs;
    let base = served.base;
    // Later log lines (warnings under load) are drained and counted.
    let warnings = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    {
        let warnings = warnings.clone();
        std::thread::spawn(move || {
            for line in rx {
                if line["level"] != "INFO" {
                    let m = line["fields"]["message"]
                        .as_str()
                        .unwrap_or("?")
                        .to_string();
                    *warnings.lock().expect("warnings").entry(m).or_default() += 1;
                }
            }
        });
    }

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (stop, tally, base) = (stop.clone(), tally.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            // One connection per client, as 256 separate programs would have.
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .timeout(Duration::from_secs(120))
                .build()
                .expect("client");
            let mut n = c;
            while !stop.load(Ordering::Relaxed) {
                one(&client, &base, n, &tally).await;
                n += 1;
            }
        }));
    }
    let health = {
        let (stop, base) = (stop.clone(), base.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut times = Vec::new();
            let mut failures = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match client.get(format!("{base}/health")).send().await {
                    Ok(r) if r.status() == 200 => times.push(t.elapsed().as_secs_f64() * 1e3),
                    _ => failures += 1,
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (times, failures)
        })
    };
    let mut rss = Vec::new();
    for _ in 0..seconds {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss.push((rss_mib(pid) * 10.0).round() / 10.0);
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let (mut times, health_failures) = health.await.expect("health");
    let elapsed = started.elapsed().as_secs_f64();
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let exit = child.wait().expect("wait");
    times.sort_by(f64::total_cmp);

    let tally = tally.lock().expect("tally");
    let total: u64 = tally.statuses.values().sum();
    let unexpected: u64 = tally
        .statuses
        .iter()
        .filter(|(k, _)| !(k.ends_with(" 200") || k.ends_with(" 429") || k.ends_with(" 503")))
        .map(|(_, v)| v)
        .sum();
    let transport: u64 = tally.transport_errors.values().sum();
    let settled = &rss[rss.len().min(10).saturating_sub(1)..];
    let rss_10 = settled.first().copied().unwrap_or(0.0);
    let rss_end = rss.last().copied().unwrap_or(0.0);
    let rss_max = settled.iter().copied().fold(0.0, f64::max);
    let p99 = percentile(&times, 0.99);
    let verdict = unexpected == 0
        && transport == 0
        && tally.missing_retry_after == 0
        && tally.streams_incomplete == 0
        && health_failures == 0
        && p99 < 50.0
        // Flat: the last reading within 10% (or 32 MiB) of the 10th second's.
        && (rss_end - rss_10).abs() <= (rss_10 * 0.1).max(32.0);
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "clients": clients,
            "seconds": (elapsed * 10.0).round() / 10.0,
            "answers": total,
            "answers_per_second": (total as f64 / elapsed).round(),
            "by_route_and_status": tally.statuses,
            "unexpected_statuses": unexpected,
            "429_without_retry_after": tally.missing_retry_after,
            "transport_errors": tally.transport_errors,
            "streams_incomplete": tally.streams_incomplete,
            "streams_ended_by_error_event": tally.streams_ended_by_error_event,
            "health": {
                "probes": times.len(),
                "failures": health_failures,
                "p50_ms": percentile(&times, 0.5),
                "p99_ms": p99,
                "max_ms": percentile(&times, 1.0),
            },
            "rss_mib": {"at_10s": rss_10, "max_after_10s": rss_max, "at_end": rss_end, "every_second": rss},
            "server_warnings": *warnings.lock().expect("warnings"),
            "server_exit": exit.code(),
            "promises_kept": verdict,
        }))
        .expect("json")
    );
    if !verdict {
        std::process::exit(1);
    }
}
