//! In-process prefill and decode speed of Warden's llama decoder, measured as
//! `../shared/BENCHMARKS.md` measures llama.cpp: prefill = one forward pass over N prompt
//! tokens on an empty cache; decode = 128 single-token steps after a short prompt, greedy;
//! batched decode = the same for 4 and 8 sequences at once, each one batched step per token
//! (`Weights::forward_batch`, as the engine runs concurrent requests), in aggregate tokens
//! per second; a 2,048-token prompt fed whole (how long it held up the other sequences'
//! next tokens before chunked prefill) and in `PREFILL_CHUNK`s as the engine feeds it (the
//! whole prompt's time, and its longest chunk: the stall the other sequences now see).
//! Prints one JSON object per figure (median of `runs` after a warm-up).
//!
//! `cargo run --release --example bench_text -- MODEL.gguf [runs]` (`BENCH_ONLY=decode` or
//! `prefill` for one kind of figure, to profile it)

use std::time::Instant;

use warden::engine::PREFILL_CHUNK;
use warden::engine::decoder::TextWeights;
use warden::engine::llama::argmax;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One figure as a JSON line: its seconds, and tokens per second if it processed `tokens`.
fn report(figure: &str, seconds: f64, tokens: Option<usize>) {
    match tokens {
        Some(n) => println!(
            "{{\"figure\": \"{figure}\", \"tok_per_s\": {:.1}, \"seconds\": {seconds:.4}}}",
            n as f64 / seconds
        ),
        None => println!("{{\"figure\": \"{figure}\", \"seconds\": {seconds:.4}}}"),
    }
}

/// Deterministic prompt tokens (ordinary word tokens, no specials).
fn prompt(n: usize) -> Vec<u32> {
    (0..n).map(|i| 1000 + ((i * 7919) % 30000) as u32).collect()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("usage: bench_text MODEL.gguf [runs]");
    let runs: usize = args.next().map_or(5, |r| r.parse().expect("runs"));
    let mut file = std::fs::File::open(&path).expect("open model");
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).expect("gguf");
    let weights = TextWeights::from_gguf(&content, &mut file).expect("weights");
    // `BENCH_ONLY=decode` (or `prefill`) runs only the figures of that kind, for profiling.
    let only = std::env::var("BENCH_ONLY").ok();
    let want = |kind: &str| only.as_deref().is_none_or(|o| o == kind);

    for n in [64usize, 512, 2048] {
        if !want("prefill") {
            break;
        }
        let tokens = prompt(n);
        let mut times = Vec::new();
        for run in 0..=runs {
            let mut cache = weights.new_cache();
            let t = Instant::now();
            weights.forward(&tokens, &mut cache).expect("forward");
            if run > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        report(&format!("prefill_{n}"), median(times), Some(n));
    }

    // The same long prompt as the engine feeds it: one chunk per round, each chunk a stall
    // for the other sequences.
    let long = prompt(2048);
    let (mut longest, mut total) = (Vec::new(), Vec::new());
    for run in 0..=runs {
        if !want("prefill") {
            break;
        }
        let mut cache = weights.new_cache();
        let mut worst = 0f64;
        let t = Instant::now();
        for part in long.chunks(PREFILL_CHUNK) {
            let c = Instant::now();
            weights.forward(part, &mut cache).expect("forward");
            worst = worst.max(c.elapsed().as_secs_f64());
        }
        if run > 0 {
            longest.push(worst);
            total.push(t.elapsed().as_secs_f64());
        }
    }
    let n = long.len();
    if want("prefill") {
        report(&format!("prefill_{n}_chunked"), median(total), Some(n));
        report(&format!("prefill_{n}_longest_chunk"), median(longest), None);
    }

    let steps = 128;
    for batch in [1usize, 4, 8] {
        if !want("decode") {
            break;
        }
        let mut times = Vec::new();
        for run in 0..=runs {
            // Different prompts, so the sequences attend over different caches.
            let mut caches: Vec<_> = (0..batch).map(|_| weights.new_cache()).collect();
            let mut next: Vec<u32> = caches
                .iter_mut()
                .enumerate()
                .map(|(i, cache)| {
                    let logits = weights.forward(&prompt(16 + i), cache).expect("prompt");
                    argmax(&logits)
                })
                .collect();
            let t = Instant::now();
            for _ in 0..steps {
                next = if batch == 1 {
                    vec![argmax(
                        &weights.forward(&next, &mut caches[0]).expect("step"),
                    )]
                } else {
                    let mut refs: Vec<_> = caches.iter_mut().collect();
                    let rows = weights.forward_batch(&next, &mut refs).expect("step");
                    rows.iter().map(|l| argmax(l)).collect()
                };
            }
            if run > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        let figure = if batch == 1 {
            format!("decode_{steps}")
        } else {
            format!("decode_{steps}_batch_{batch}")
        };
        report(&figure, median(times), Some(steps * batch));
    }
}
