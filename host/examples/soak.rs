//! Memory under a long run, for docs/performance.md (`make soak`).
//!
//! `soak MODELS_DIR PLUGIN_DIR [REQUESTS] [CLIENTS]` starts Warden in-process on a free
//! port with its three reference plugins and sends REQUESTS (100,000 by default) requests
//! from CLIENTS (16) concurrent clients: `GET /v1/models` with a fresh `x-request-id` each, and
//! every 10th an unauthenticated one (401). It prints the process's resident memory and the
//! metrics exposition's size every 10,000 requests, as JSON lines: both must stay flat, since
//! metrics are aggregates and nothing is kept per request.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use warden::config::{Config, Secret};

const KEY: &str = "soak-inference-and-metrics-key";

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let models_dir = PathBuf::from(args.next().expect("MODELS_DIR"));
    let plugin_dir = PathBuf::from(args.next().expect("PLUGIN_DIR"));
    let total: usize = args
        .next()
        .map_or(100_000, |n| n.parse().expect("REQUESTS"));
    let clients: usize = args.next().map_or(16, |n| n.parse().expect("CLIENTS"));
    let config = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        models_dir,
        plugin_dir,
        api_key: Some(Secret::new(KEY)),
        metrics_api_key: Some(Secret::new(KEY)),
        cache_dir: PathBuf::new(),
        ..Config::default()
    };
    let server = warden::Server::start(config).await.expect("start");
    server.ready().await.expect("ready");
    let base = format!("http://{}", server.addr());
    let client = reqwest::Client::new();
    let sent = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let report = move |done: usize, metrics_len: usize| {
        println!(
            r#"{{"requests":{done},"rss_mib":{:.1},"metrics_bytes":{metrics_len},"elapsed_s":{:.1}}}"#,
            rss_kib() as f64 / 1024.0,
            started.elapsed().as_secs_f64()
        );
    };
    let metrics_len = |client: reqwest::Client, base: String| async move {
        client
            .get(format!("{base}/v1/metrics"))
            .bearer_auth(KEY)
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("body")
            .len()
    };
    report(0, metrics_len(client.clone(), base.clone()).await);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, base, sent, failed) =
            (client.clone(), base.clone(), sent.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let n = sent.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return;
                }
                let mut request = client
                    .get(format!("{base}/v1/models"))
                    .header("x-request-id", format!("soak-{n}"));
                let expected = if n % 10 == 0 {
                    401
                } else {
                    request = request.bearer_auth(KEY);
                    200
                };
                let status = request.send().await.map(|r| r.status().as_u16());
                if status.as_ref().ok() != Some(&expected) {
                    failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("request {n}: expected {expected}, got {status:?}");
                }
                if (n + 1) % 10_000 == 0 {
                    let len = metrics_len(client.clone(), base.clone()).await;
                    report(n + 1, len);
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    let failed = failed.load(Ordering::Relaxed);
    println!(
        r#"{{"done":{total},"failed":{failed},"requests_per_s":{:.0}}}"#,
        total as f64 / started.elapsed().as_secs_f64()
    );
    server.shutdown().await;
    assert_eq!(failed, 0, "requests failed");
}
