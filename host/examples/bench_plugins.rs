//! What the policy plugins cost a request, for docs/performance.md (`make bench-plugins`).
//!
//! `bench_plugins PLUGIN_DIR [ROUNDS] [WARDEN_BIN MODELS_DIR]` loads the three reference
//! plugins and measures, on an otherwise idle machine:
//!
//! 1. **phases**: per slot, a fresh store and instance (`instantiate`), `configure`, each
//!    call a short completion makes (auth `authenticate`; sanitizer `check-input`,
//!    `output-filter`, eight `push`es, `finish`; metrics `labels`) and `teardown`, on one
//!    thread; and `handoff`, the round trip of an empty job through the plugin threads;
//! 2. **chain**: the same request through the public API the HTTP layer calls
//!    (`authenticate`, a sanitizer session, `labels`), from a tokio task on a two-worker
//!    runtime as in the server: the host time plugins add to one request;
//! 3. **HTTP** (with `WARDEN_BIN` and `MODELS_DIR`): `warden serve` started on a free port,
//!    `GET /health` (no plugin) and `GET /v1/models` (auth and metrics labels) one after
//!    the other on one kept-alive connection;
//! 4. **other languages** (when `PLUGIN_DIR` holds them: `make js-plugins python-plugins`):
//!    the JavaScript JWT auth plugin and the Python prompt-guard sanitizer in place of the
//!    Rust ones, their sizes, load (compile) times and the same phases, a tenth of the
//!    rounds (they cost milliseconds).
//!
//! Prints a table (p50 and p99 in µs) and one JSON object per figure.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use warden::metrics::Metrics;
use warden::plugins::{
    InferenceInput, InputKind, Limits, Payload, PhaseSamples, PluginSet, PluginSource,
    ProfileRequest, RequestSummary, Slot, profile_handoff,
};

#[path = "support/serve.rs"]
mod serve;

const KEY: &str = "bench-plugins-key-for-inference-only";

fn source(dir: &Path, slot: Slot, name: &str, config: String) -> PluginSource {
    PluginSource::from_file(
        slot,
        &dir.join(format!("{name}.wasm")),
        None,
        config,
        Limits::default(),
    )
    .expect("component")
}

fn micros(mut samples: Vec<Duration>) -> (f64, f64, usize) {
    samples.sort();
    let at = |p: f64| {
        let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
        (samples[i].as_secs_f64() * 1e7).round() / 10.0
    };
    (at(0.5), at(0.99), samples.len())
}

fn report(group: &str, slot: &str, phase: &str, samples: Vec<Duration>) {
    let (p50, p99, n) = micros(samples);
    println!("{group:<7} {slot:<15} {phase:<22} {p50:>9.1} {p99:>9.1} {n:>7}");
    eprintln!(
        "{}",
        json!({"group": group, "slot": slot, "phase": phase, "p50_us": p50, "p99_us": p99, "n": n})
    );
}

/// The request every round makes: a short completion of eight chunks.
fn request() -> ProfileRequest {
    ProfileRequest {
        authorization: format!("Bearer {KEY}"),
        prompt: "Write one sentence about the sea.".into(),
        chunks: [
            "The", " sea", " is", " wide", " and", " calm", " today", ".",
        ]
        .map(String::from)
        .to_vec(),
    }
}

/// One request's plugin work through the API the HTTP layer uses; returns per-slot times.
async fn chain(set: &Arc<PluginSet>, round: usize, req: &ProfileRequest) -> [Duration; 3] {
    let rid: Arc<str> = format!("chain-{round}").into();
    let meta = req.meta(&rid);
    let started = Instant::now();
    let principal = set
        .authenticate(&meta)
        .await
        .expect("auth fault")
        .expect("authenticated");
    let auth = started.elapsed();

    let started = Instant::now();
    let session = set.sanitizer_session(&rid).await.expect("session");
    let input = InferenceInput {
        kind: InputKind::Completion,
        model: "bench".into(),
        principal,
        payload: Payload::Texts(vec![req.prompt.clone()]),
        max_tokens: Some(16),
    };
    session
        .check_input(input)
        .await
        .expect("check fault")
        .expect("input accepted");
    let filter = session
        .output_filter(InputKind::Completion)
        .await
        .expect("filter");
    for chunk in &req.chunks {
        session
            .push(filter, chunk.clone())
            .await
            .expect("push fault")
            .expect("released");
    }
    session
        .finish(filter)
        .await
        .expect("finish fault")
        .expect("released");
    drop(session);
    let sanitizer = started.elapsed();

    let started = Instant::now();
    let summary = RequestSummary {
        route: "/v1/completions",
        model: Some("bench".into()),
        status: 200,
        tenant: None,
    };
    set.labels(&summary, &rid).await.expect("labels");
    [auth, sanitizer, started.elapsed()]
}

async fn http(bin: &str, models: &str, plugins: &str, rounds: usize) {
    let served = serve::Served::start(bin, models, plugins, KEY);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .expect("client");
    let mut health = Vec::with_capacity(rounds);
    let mut models_route = Vec::with_capacity(rounds);
    for i in 0..rounds + rounds / 10 {
        let started = Instant::now();
        let r = client
            .get(format!("{}/health", served.base))
            .send()
            .await
            .expect("health");
        assert!(r.status().is_success());
        r.bytes().await.expect("body");
        let h = started.elapsed();
        let started = Instant::now();
        let r = client
            .get(format!("{}/v1/models", served.base))
            .bearer_auth(KEY)
            .send()
            .await
            .expect("models");
        assert!(r.status().is_success(), "{}", r.status());
        r.bytes().await.expect("body");
        let m = started.elapsed();
        if i >= rounds / 10 {
            health.push(h);
            models_route.push(m);
        }
    }
    let (h50, ..) = micros(health.clone());
    let (m50, ..) = micros(models_route.clone());
    report("http", "-", "GET /health", health);
    report("http", "auth+metrics", "GET /v1/models", models_route);
    println!("http    /v1/models - /health at p50: {:.1} µs", m50 - h50);
    let mut child = served.child;
    let _ = child.kill();
    let _ = child.wait();
}

/// The JavaScript auth and Python sanitizer (with the Rust metrics policy), if built.
fn other_languages(dir: &Path, rounds: usize) {
    let (js, py) = (
        dir.join("jwt-auth-js.wasm"),
        dir.join("prompt-guard-py.wasm"),
    );
    if !js.is_file() || !py.is_file() {
        println!("(no jwt-auth-js.wasm or prompt-guard-py.wasm in the plugin directory: skipped)");
        return;
    }
    for path in [&js, &py] {
        let bytes = std::fs::metadata(path).expect("component").len();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        println!("size    {name:<38} {bytes:>9} bytes");
        eprintln!(
            "{}",
            json!({"group": "size", "plugin": name, "bytes": bytes})
        );
    }
    // The JWT plugin's test configuration, and its first case's token (valid until 2100).
    let tests = Path::new("plugins/jwt-auth-js/tests");
    let config = std::fs::read_to_string(tests.join("config.json")).expect("jwt config");
    let cases = std::fs::read_to_string(tests.join("cases.jsonl")).expect("jwt cases");
    let first: serde_json::Value = cases
        .lines()
        .find(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok())
        .expect("a case");
    let authorization = first["request"]["headers"]["authorization"]
        .as_str()
        .expect("a token")
        .to_string();
    let limits = Limits {
        deadline: Duration::from_secs(1),
        memory_bytes: 64 << 20,
        ..Limits::default()
    };
    let from = |slot, path: &Path, config: String| {
        PluginSource::from_file(slot, path, None, config, limits).expect("component")
    };
    let runtime = warden::plugins::Runtime::builder()
        .build()
        .expect("plugin runtime");
    let started = Instant::now();
    let set = PluginSet::load(
        &runtime,
        &from(Slot::Auth, &js, config),
        &from(Slot::Sanitizer, &py, "{}".into()),
        &source(
            dir,
            Slot::MetricsPolicy,
            "metrics-policy-basic",
            "{}".into(),
        ),
        Arc::new(Metrics::new()),
        None,
    )
    .expect("plugins load");
    let load = started.elapsed().as_secs_f64();
    println!("load    jwt-auth-js + prompt-guard-py (compile, check, smoke) {load:>9.2} s");
    eprintln!(
        "{}",
        json!({"group": "load", "plugin": "jwt-auth-js+prompt-guard-py", "s": load})
    );
    let req = ProfileRequest {
        authorization,
        ..request()
    };
    let rounds = (rounds / 10).max(10);
    set.profile_phases(&req, rounds / 10);
    for p in set.profile_phases(&req, rounds) {
        let lang = if p.slot == "auth" {
            "js auth"
        } else if p.slot == "sanitizer" {
            "py sanitizer"
        } else {
            p.slot
        };
        report("lang", lang, p.phase, p.samples);
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("PLUGIN_DIR"));
    let rounds: usize = args.next().map_or(2000, |n| n.parse().expect("ROUNDS"));
    let server = args.next().zip(args.next());

    let auth_config = json!({"keys": [{
        "id": "bench",
        "sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(KEY)),
        "scopes": ["inference"],
    }]})
    .to_string();
    let set = Arc::new(
        PluginSet::load(
            &warden::plugins::Runtime::builder()
                .build()
                .expect("plugin runtime"),
            &source(&dir, Slot::Auth, "auth-api-key", auth_config),
            &source(&dir, Slot::Sanitizer, "sanitize-basic", "{}".into()),
            &source(
                &dir,
                Slot::MetricsPolicy,
                "metrics-policy-basic",
                "{}".into(),
            ),
            Arc::new(Metrics::new()),
            None,
        )
        .expect("plugins load"),
    );
    let req = request();
    println!(
        "{:<7} {:<15} {:<22} {:>9} {:>9} {:>7}",
        "group", "slot", "phase", "p50 µs", "p99 µs", "n"
    );

    // Phases, on this thread. A tenth of the rounds again first, as a warm-up.
    set.profile_phases(&req, rounds / 10);
    let phases: Vec<PhaseSamples> = set.profile_phases(&req, rounds);
    let mut per_round = vec![Duration::ZERO; rounds];
    for p in phases {
        if p.samples.len() == rounds {
            for (total, s) in per_round.iter_mut().zip(&p.samples) {
                *total += *s;
            }
        } else {
            // The pushes: several per round.
            let per = p.samples.len() / rounds;
            for (total, s) in per_round.iter_mut().zip(p.samples.chunks(per)) {
                *total += s.iter().sum::<Duration>();
            }
        }
        report("phase", p.slot, p.phase, p.samples);
    }
    report("phase", "all", "sum of phases", per_round);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let handoff = tokio::spawn(profile_handoff(set.runtime().clone(), rounds))
            .await
            .expect("task");
        report("phase", handoff.slot, handoff.phase, handoff.samples);

        let set2 = set.clone();
        let req2 = req.clone();
        let times = tokio::spawn(async move {
            for round in 0..rounds / 10 {
                chain(&set2, round, &req2).await;
            }
            let mut times = Vec::with_capacity(rounds);
            for round in 0..rounds {
                times.push(chain(&set2, round, &req2).await);
            }
            times
        })
        .await
        .expect("task");
        let column = |i: usize| times.iter().map(|t| t[i]).collect::<Vec<_>>();
        report("chain", "auth", "authenticate", column(0));
        report("chain", "sanitizer", "session (10 calls)", column(1));
        report("chain", "metrics-policy", "labels", column(2));
        report(
            "chain",
            "all",
            "one request",
            times.iter().map(|t| t.iter().sum()).collect(),
        );

        if let Some((bin, models)) = &server {
            http(bin, models, &dir.to_string_lossy(), rounds).await;
        }
    });
    other_languages(&dir, rounds);
}
