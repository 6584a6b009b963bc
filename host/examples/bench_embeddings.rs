//! In-process speed of Warden's embedding model on the inputs of
//! `tests/python/bench_embeddings.py`: one sentence (median of 50 calls), 256 short
//! sentences in batches of 32 and 64 long ones in batches of 16 (the whole set's time, as
//! sentence-transformers' `encode(batch_size=…)` is timed). Prints one JSON object per
//! figure. `WARDEN_EMBEDDING_PRECISION` (`auto`, `f32` or `bf16`) chooses the arithmetic, as for
//! the server.
//!
//! `cargo run --release --example bench_embeddings -- MODEL_DIR INPUTS.json`

use std::time::Instant;

use warden::engine::kernels::dense::PrecisionSetting;
use warden::engine::{DEFAULT_PRECISION, EmbedInput, Embedder, MiniLm};

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .expect("usage: bench_embeddings MODEL_DIR INPUTS.json");
    let inputs = args
        .next()
        .expect("usage: bench_embeddings MODEL_DIR INPUTS.json");
    let inputs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(inputs).expect("inputs")).expect("json");
    let texts = |kind: &str| -> Vec<EmbedInput> {
        inputs[kind]
            .as_array()
            .expect("a list of inputs")
            .iter()
            .map(|t| EmbedInput::Text(t.as_str().expect("text").to_string()))
            .collect()
    };
    let one = EmbedInput::Text(inputs["one"].as_str().expect("one").to_string());
    let precision = std::env::var("WARDEN_EMBEDDING_PRECISION")
        .ok()
        .map_or(DEFAULT_PRECISION, |p| {
            PrecisionSetting::parse(&p).expect("WARDEN_EMBEDDING_PRECISION: auto, f32 or bf16")
        });
    let mut model = MiniLm::load_with("all-MiniLM-L6-v2", std::path::Path::new(&dir), precision)
        .expect("model");
    eprintln!("precision: {}", model.precision().as_str());

    model.embed(&[&one]).expect("embed");
    let mut times = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        model.embed(&[&one]).expect("embed");
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{{\"figure\": \"one\", \"seconds\": {:.6}}}",
        times[times.len() / 2]
    );
    for (kind, batch) in [("short", 32), ("long", 16)] {
        let all = texts(kind);
        let all: Vec<&EmbedInput> = all.iter().collect();
        model.embed(&all[..batch]).expect("embed");
        let t = Instant::now();
        for chunk in all.chunks(batch) {
            model.embed(chunk).expect("embed");
        }
        println!(
            "{{\"figure\": \"{kind}\", \"seconds\": {:.6}}}",
            t.elapsed().as_secs_f64()
        );
    }
}
