//! Embeddings match sentence-transformers (cosine ≥ 0.9999), as floats and as base64.

use base64::Engine;
use serde_json::{Value, json};
use warden_tests::{config, root, start};

struct Reference {
    input: String,
    tokens: u64,
    embedding: Vec<f32>,
}

fn reference() -> Vec<Reference> {
    let path = root().join("tests/fixtures/embeddings-reference.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| Reference {
            input: i["input"].as_str().unwrap().to_string(),
            tokens: i["tokens"].as_u64().unwrap(),
            embedding: i["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect(),
        })
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn floats(item: &Value) -> Vec<f32> {
    item["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn decode_base64(item: &Value) -> Vec<f32> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(item["embedding"].as_str().unwrap())
        .unwrap();
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The fused encoder in-process, every precision on every instruction set this CPU has
/// (the fast paths and the portable fallbacks), batched (packed end to end) and one text
/// at a time: cosine against sentence-transformers, with the worst printed.
#[test]
fn the_fused_encoder_matches_sentence_transformers_on_every_path() {
    use warden::engine::kernels::Isa;
    use warden::engine::kernels::dense::Precision;
    let dir = warden_tests::models_dir().join("all-MiniLM-L6-v2");
    let refs = reference();
    for precision in [Precision::F32, Precision::Bf16] {
        let mut model =
            warden::engine::MiniLm::load_with("all-MiniLM-L6-v2", &dir, precision).unwrap();
        let ids: Vec<Vec<u32>> = refs
            .iter()
            .map(|r| model.encode(&r.input).unwrap())
            .collect();
        let encoder = model.encoder_mut();
        let seqs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        for isa in Isa::available() {
            if !precision.fast_on(isa) && isa != Isa::Scalar {
                continue;
            }
            let batched = encoder.forward_with(isa, &seqs).unwrap();
            let mut worst = 1f64;
            for (i, (got, r)) in batched.iter().zip(&refs).enumerate() {
                let alone = &encoder.forward_with(isa, &seqs[i..=i]).unwrap()[0];
                let same = cosine(got, alone);
                assert!(
                    same > 0.999_999,
                    "{precision:?}/{}: batch vs alone {same}",
                    isa.as_str()
                );
                let c = cosine(got, &r.embedding);
                worst = worst.min(c);
                assert!(
                    c >= 0.9999,
                    "{precision:?}/{} input {i} ({:?}): cosine {c}",
                    isa.as_str(),
                    r.input
                );
            }
            println!(
                "{} on {}: worst cosine {worst:.7}",
                precision.as_str(),
                isa.as_str()
            );
        }
    }
}

#[tokio::test]
async fn batch_matches_sentence_transformers_in_float_and_base64() {
    let t = start(config()).await;
    let refs = reference();
    let inputs: Vec<&str> = refs.iter().map(|r| r.input.as_str()).collect();
    // The sanitizer would redact nothing in these inputs.
    for (format, decode) in [
        ("float", floats as fn(&Value) -> Vec<f32>),
        ("base64", decode_base64),
    ] {
        let r = t
            .embed(json!({"model": "all-MiniLM-L6-v2", "input": inputs, "encoding_format": format}))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let v = r.json();
        assert_eq!(v["object"], "list");
        assert_eq!(v["model"], "all-MiniLM-L6-v2");
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len(), refs.len());
        for (i, (item, reference)) in data.iter().zip(&refs).enumerate() {
            assert_eq!(item["index"], i);
            assert_eq!(item["object"], "embedding");
            let got = decode(item);
            assert_eq!(got.len(), 384);
            let c = cosine(&got, &reference.embedding);
            assert!(
                c >= 0.9999,
                "{format} input {i} ({:?}): cosine {c}",
                reference.input
            );
        }
        let tokens: u64 = refs.iter().map(|r| r.tokens).sum();
        assert_eq!(v["usage"]["prompt_tokens"], tokens);
        assert_eq!(v["usage"]["total_tokens"], tokens);
    }
    t.server.shutdown().await;
}

#[tokio::test]
async fn single_strings_and_concurrent_requests_agree_with_the_reference() {
    let t = start(config()).await;
    let refs = reference();
    let requests = refs
        .iter()
        .map(|r| t.embed(json!({"model": "all-MiniLM-L6-v2", "input": r.input})));
    let replies = futures_util::future::join_all(requests).await;
    for (reply, reference) in replies.iter().zip(&refs) {
        assert_eq!(reply.status, 200, "{}", reply.text);
        let v = reply.json();
        let c = cosine(&floats(&v["data"][0]), &reference.embedding);
        assert!(c >= 0.9999, "{:?}: cosine {c}", reference.input);
        assert_eq!(v["usage"]["prompt_tokens"], reference.tokens);
    }
    t.server.shutdown().await;
}

/// Token-id inputs (the model's own WordPiece ids, as OpenAI allows lists of ids) give the
/// vectors of the text they encode, one array or several, and are truncated as text is.
#[tokio::test]
async fn token_arrays_give_the_vectors_of_their_text() {
    let t = start(config()).await;
    let dir = warden_tests::models_dir().join("all-MiniLM-L6-v2");
    let mut tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    // The file pads to 128 ([PAD] ids would be embedded as tokens): ids as a client sends
    // them, unpadded and without the frame.
    tokenizer.with_padding(None);
    let texts = [
        "The quick brown fox jumps over the lazy dog.",
        "Hello, world!",
    ];
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| tokenizer.encode(*t, false).unwrap().get_ids().to_vec())
        .collect();
    let by_text = t
        .embed(json!({"model": "all-MiniLM-L6-v2", "input": texts}))
        .await;
    assert_eq!(by_text.status, 200, "{}", by_text.text);
    let by_ids = t
        .embed(json!({"model": "all-MiniLM-L6-v2", "input": ids}))
        .await;
    assert_eq!(by_ids.status, 200, "{}", by_ids.text);
    let one = t
        .embed(json!({"model": "all-MiniLM-L6-v2", "input": ids[0]}))
        .await;
    assert_eq!(one.status, 200, "{}", one.text);
    let (by_text, by_ids) = (by_text.json(), by_ids.json());
    for i in 0..texts.len() {
        assert_eq!(
            floats(&by_ids["data"][i]),
            floats(&by_text["data"][i]),
            "input {i}: ids and text give the same vector"
        );
    }
    assert_eq!(floats(&one.json()["data"][0]), floats(&by_text["data"][0]));
    assert_eq!(by_ids["usage"], by_text["usage"]);
    // 1,000 ids: the first 254 and the frame.
    let long: Vec<u32> = (0..1000).map(|i| 2000 + i % 500).collect();
    let r = t
        .embed(json!({"model": "all-MiniLM-L6-v2", "input": [long]}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["usage"]["prompt_tokens"], 256);
    t.server.shutdown().await;
}

#[tokio::test]
async fn long_inputs_are_truncated_to_256_tokens() {
    let t = start(config()).await;
    let long = "word ".repeat(2000);
    let r = t
        .embed(json!({"model": "sentence-transformers/all-MiniLM-L6-v2", "input": long}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["usage"]["prompt_tokens"], 256);
    t.server.shutdown().await;
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after() {
    let mut c = config();
    c.engine.queue_capacity = 1;
    c.engine.max_batch = 1;
    let t = start(c).await;
    // Many concurrent heavy requests against a queue of one: some must be refused at once.
    let long = "lorem ipsum dolor ".repeat(100);
    let inputs: Vec<&str> = vec![long.as_str(); 16];
    let requests = (0..8).map(|_| t.embed(json!({"model": "all-MiniLM-L6-v2", "input": inputs})));
    let replies = futures_util::future::join_all(requests).await;
    let busy: Vec<_> = replies.iter().filter(|r| r.status == 429).collect();
    assert!(
        !busy.is_empty(),
        "statuses: {:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    for r in busy {
        assert_eq!(r.error(429)["code"], "queue_full");
        assert_eq!(r.headers["retry-after"], "1");
    }
    assert!(replies.iter().all(|r| r.status == 200 || r.status == 429));
    t.server.shutdown().await;
}
