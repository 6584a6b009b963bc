//! `make bench-ws`: the Realtime API at scale, against the release `warden serve`.
//!
//! Opens N authenticated WebSocket sessions on loopback (10,000 by default), measures the
//! server's resident memory per idle session, then has every session send a lightweight
//! event (`session.update`, answered with `session.updated` without the engine) at a steady
//! rate and times each round trip, while one more session streams a response through the
//! engine every second. Prints the figures docs/performance.md records, and exits 1 when
//! one misses its target (p50 ≤ 1 ms, p99 ≤ 10 ms, ≤ 64 KiB per idle session, every
//! streamed response complete). Last, a 12-turn conversation on a server with kept KV
//! caches and on one without: the time to each turn's first delta as the history grows.
//!
//! Usage: `bench_ws WARDEN_BIN MODELS_DIR PLUGIN_DIR [SESSIONS] [SECONDS] [INTERVAL_MS]`.
//! The file-descriptor limit must allow a descriptor per session in each process: the
//! Makefile raises the soft limit to the hard one before it starts.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[path = "support/serve.rs"]
mod serve;

const KEY: &str = "bench-ws-key-inference-and-metrics-7c2d";
const MODEL: &str = "SmolLM2-135M-Instruct";

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> T {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

/// Resident memory of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// This process's soft limit on open files.
fn fd_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or(0)
}

async fn connect(url: &str) -> Socket {
    let mut request = url.into_client_request().expect("url");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {KEY}").parse().expect("header"),
    );
    // Small client buffers: the client's memory is not what is measured, but 10,000
    // sessions of 128 KiB each would still crowd the machine.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let mut last = None;
    for _ in 0..20 {
        match tokio_tungstenite::connect_async_with_config(request.clone(), Some(config), true)
            .await
        {
            Ok((socket, _)) => return socket,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("connect: {last:?}");
}

/// The next text event, pings answered by the library.
async fn next(ws: &mut Socket) -> Value {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).expect("json"),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("not an event: {other:?}"),
        }
    }
}

async fn until(ws: &mut Socket, kind: &str) -> Vec<Value> {
    let mut events = Vec::new();
    loop {
        let e = next(ws).await;
        let done = e["type"] == kind;
        events.push(e);
        if done {
            return events;
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// One streamed response a second on its own session, for the whole run: the time to its
/// first delta and to `response.done`, in milliseconds, per response.
async fn responses(url: String, stop: Instant) -> (Vec<f64>, Vec<f64>, usize) {
    let mut ws = connect(&url).await;
    assert_eq!(next(&mut ws).await["type"], "session.created");
    let (mut first, mut whole, mut failed) = (Vec::new(), Vec::new(), 0);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while Instant::now() < stop {
        tick.tick().await;
        let item = json!({"type": "conversation.item.create", "item": {"type": "message",
            "role": "user", "content": [{"type": "input_text",
            "text": "Name three colours of the rainbow."}]}});
        ws.send(Message::text(item.to_string()))
            .await
            .expect("send");
        let created = until(&mut ws, "conversation.item.done").await;
        let user_id = created[0]["item"]["id"]
            .as_str()
            .expect("item id")
            .to_string();
        let started = Instant::now();
        let create = json!({"type": "response.create", "response": {"max_output_tokens": 24}});
        ws.send(Message::text(create.to_string()))
            .await
            .expect("send");
        let mut got_first = false;
        let done = loop {
            let e = next(&mut ws).await;
            if e["type"] == "response.output_text.delta" && !got_first {
                got_first = true;
                first.push(started.elapsed().as_secs_f64() * 1e3);
            }
            if e["type"] == "response.done" {
                break e;
            }
        };
        whole.push(started.elapsed().as_secs_f64() * 1e3);
        let response = &done["response"];
        if response["status"] != "completed" && response["status"] != "incomplete" {
            failed += 1;
        }
        // Keep the conversation short: each response starts from one question.
        let mut ids = vec![user_id];
        if let Some(id) = response["output"][0]["id"].as_str() {
            ids.push(id.to_string());
        }
        for id in ids {
            let delete = json!({"type": "conversation.item.delete", "item_id": id});
            ws.send(Message::text(delete.to_string()))
                .await
                .expect("send");
            until(&mut ws, "conversation.item.deleted").await;
        }
    }
    let _ = ws.close(None).await;
    (first, whole, failed)
}

/// A conversation of `turns` turns on one session: per turn, the milliseconds from
/// `response.create` to the first delta, and the `cached_tokens` of its usage.
async fn conversation(url: &str, turns: usize) -> Vec<(f64, u64, u64)> {
    let mut ws = connect(url).await;
    assert_eq!(next(&mut ws).await["type"], "session.created");
    let mut per_turn = Vec::new();
    for turn in 0..turns {
        let text = format!(
            "Turn {turn}: tell me one more fact about lighthouses, their keepers and the \
             ships they guard, in two sentences."
        );
        let item = json!({"type": "conversation.item.create", "item": {"type": "message",
            "role": "user", "content": [{"type": "input_text", "text": text}]}});
        ws.send(Message::text(item.to_string()))
            .await
            .expect("send");
        until(&mut ws, "conversation.item.done").await;
        let started = Instant::now();
        let create = json!({"type": "response.create", "response": {"max_output_tokens": 48}});
        ws.send(Message::text(create.to_string()))
            .await
            .expect("send");
        let mut first = None;
        let done = loop {
            let e = next(&mut ws).await;
            if e["type"] == "response.output_text.delta" && first.is_none() {
                first = Some(started.elapsed().as_secs_f64() * 1e3);
            }
            if e["type"] == "response.done" {
                break e;
            }
        };
        let usage = &done["response"]["usage"];
        per_turn.push((
            first.unwrap_or(f64::NAN),
            usage["input_tokens"].as_u64().unwrap_or(0),
            usage["input_token_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(0),
        ));
    }
    let _ = ws.close(None).await;
    per_turn
}

/// The conversation on a server with kept caches and on one without: the time to the first
/// delta as the history grows.
fn conversations(bin: &str, models: &str, plugins: &str, runtime: &tokio::runtime::Runtime) {
    const TURNS: usize = 12;
    let mut rows = Vec::new();
    for kept in ["4096", "0"] {
        let served = serve::Served::start_with(
            bin,
            models,
            plugins,
            KEY,
            &[("WARDEN_PREFIX_CACHE_TOKENS", kept)],
        );
        let url = format!(
            "{}/v1/realtime?model={MODEL}",
            served.base.replace("http://", "ws://")
        );
        rows.push(runtime.block_on(conversation(&url, TURNS)));
        let mut child = served.child;
        let _ = std::process::Command::new("kill")
            .arg(child.id().to_string())
            .status();
        let _ = child.wait();
    }
    println!("a {TURNS}-turn conversation, first delta per turn (ms), with kept caches | without:");
    for (turn, (with, without)) in rows[0].iter().zip(&rows[1]).enumerate() {
        println!(
            "  turn {:>2}: {:>4} input tokens, {:>4} cached: {:>6.0} ms | {:>6.0} ms",
            turn + 1,
            with.1,
            with.2,
            with.0,
            without.0
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (bin, models, plugins) = (&args[1], &args[2], &args[3]);
    let sessions: usize = arg(&args, 4, 10_000);
    let seconds: u64 = arg(&args, 5, 30);
    let interval_ms: u64 = arg(&args, 6, 5_000);
    let limit = fd_limit();
    assert!(
        limit >= sessions as u64 + 256,
        "the open-file limit is {limit}: {sessions} sessions need more (ulimit -n)"
    );

    // Each session is one principal's: the per-principal limit goes up with the total.
    let most = (sessions + 16).to_string();
    let served = serve::Served::start_with(
        bin,
        models,
        plugins,
        KEY,
        &[
            ("WARDEN_REALTIME_MAX_CONNECTIONS", &most),
            ("WARDEN_REALTIME_MAX_CONNECTIONS_PER_PRINCIPAL", &most),
        ],
    );
    let pid = served.child.id();
    let url = format!(
        "{}/v1/realtime?model={MODEL}",
        served.base.replace("http://", "ws://")
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ok = runtime.block_on(run(url, pid, sessions, seconds, interval_ms));
    let mut child = served.child;
    let _ = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    conversations(bin, models, plugins, &runtime);
    if !ok {
        std::process::exit(1);
    }
}

async fn run(url: String, pid: u32, sessions: usize, seconds: u64, interval_ms: u64) -> bool {
    // Warm up: a few sessions open and close, so the baseline holds the server's own
    // one-time allocations for a session.
    for _ in 0..32 {
        let mut ws = connect(&url).await;
        next(&mut ws).await;
        let _ = ws.close(None).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let base_kib = rss_kib(pid);

    // Open every session, 64 handshakes at a time.
    let opened = Instant::now();
    let mut sockets = Vec::with_capacity(sessions);
    let mut pending = futures_util::stream::iter((0..sessions).map(|_| {
        let url = url.clone();
        async move {
            let mut ws = connect(&url).await;
            assert_eq!(next(&mut ws).await["type"], "session.created");
            ws
        }
    }))
    .buffer_unordered(64);
    while let Some(ws) = pending.next().await {
        sockets.push(ws);
    }
    let open_secs = opened.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_kib = rss_kib(pid);
    let per_session = (idle_kib.saturating_sub(base_kib)) as f64 * 1024.0 / sessions as f64;
    println!(
        "{sessions} sessions open in {open_secs:.1} s; server RSS {:.1} MiB before, {:.1} MiB \
         with all idle: {:.1} KiB per idle session",
        base_kib as f64 / 1024.0,
        idle_kib as f64 / 1024.0,
        per_session / 1024.0
    );

    // Steady load: every session sends a session.update each interval, spread evenly.
    let stop = Instant::now() + Duration::from_secs(seconds);
    let errors = Arc::new(AtomicU64::new(0));
    let engine = tokio::spawn(responses(url.clone(), stop));
    let interval = Duration::from_millis(interval_ms);
    let mut tasks = Vec::with_capacity(sessions);
    for (i, mut ws) in sockets.into_iter().enumerate() {
        let errors = errors.clone();
        let offset = interval.mul_f64(i as f64 / sessions as f64);
        tasks.push(tokio::spawn(async move {
            let mut rtts = Vec::new();
            let start = tokio::time::Instant::now() + offset;
            let mut tick = tokio::time::interval_at(start, interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let event =
                json!({"type": "session.update", "session": {"temperature": 0.5}}).to_string();
            while Instant::now() < stop {
                tick.tick().await;
                let sent = Instant::now();
                if ws.send(Message::text(event.clone())).await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                match tokio::time::timeout(Duration::from_secs(10), next(&mut ws)).await {
                    Ok(e) if e["type"] == "session.updated" => {
                        rtts.push(sent.elapsed().as_secs_f64() * 1e3);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
            (ws, rtts)
        }));
    }
    let mut rtts = Vec::new();
    let mut sockets = Vec::with_capacity(sessions);
    for task in tasks {
        let (ws, mut r) = task.await.expect("session task");
        rtts.append(&mut r);
        sockets.push(ws);
    }
    let (first, whole, failed) = engine.await.expect("responses");
    let loaded_kib = rss_kib(pid);
    rtts.sort_by(f64::total_cmp);
    let (p50, p99, max) = (
        percentile(&rtts, 0.5),
        percentile(&rtts, 0.99),
        rtts.last().copied().unwrap_or(f64::NAN),
    );
    let errors = errors.load(Ordering::Relaxed);
    println!(
        "{} round trips in {seconds} s ({:.0}/s): p50 {p50:.3} ms, p99 {p99:.3} ms, max \
         {max:.1} ms; {errors} errors; server RSS {:.1} MiB under load",
        rtts.len(),
        rtts.len() as f64 / seconds as f64,
        loaded_kib as f64 / 1024.0
    );
    let mut first_sorted = first.clone();
    first_sorted.sort_by(f64::total_cmp);
    let mut whole_sorted = whole.clone();
    whole_sorted.sort_by(f64::total_cmp);
    println!(
        "{} streamed responses (24 tokens) beside them: first delta p50 {:.0} ms, \
         response.done p50 {:.0} ms, max {:.0} ms; {failed} failed",
        whole.len(),
        percentile(&first_sorted, 0.5),
        percentile(&whole_sorted, 0.5),
        whole_sorted.last().copied().unwrap_or(f64::NAN)
    );

    // Close them all; the server's registry drains.
    let closing = Instant::now();
    futures_util::stream::iter(sockets)
        .for_each_concurrent(256, |mut ws| async move {
            let _ = ws.close(None).await;
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
    println!("closed all in {:.1} s", closing.elapsed().as_secs_f64());

    let mut ok = true;
    let mut check = |good: bool, what: String| {
        println!("{} {what}", if good { "ok  " } else { "FAIL" });
        ok &= good;
    };
    check(p50 <= 1.0, format!("p50 {p50:.3} ms <= 1 ms"));
    check(p99 <= 10.0, format!("p99 {p99:.3} ms <= 10 ms"));
    check(
        per_session <= 64.0 * 1024.0,
        format!("{:.1} KiB per idle session <= 64 KiB", per_session / 1024.0),
    );
    check(errors == 0, format!("{errors} session errors"));
    check(
        failed == 0 && whole.len() as u64 + 2 >= seconds,
        format!("{} streamed responses, {failed} failed", whole.len()),
    );
    ok
}
