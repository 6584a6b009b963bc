//! The routes in process: `warp::test` requests against [`warden::http::routes`] over the
//! application facade, with the real plugin components and a fake embedding engine, and no
//! listener or model file. The tables of parameter validation, authentication and scopes,
//! and the admin API's refusals live here, where each case costs microseconds; what needs a
//! real server (sockets, limits on the wire, models, shutdown) stays in `e2e`.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};
use warden::engine::{
    ChatTemplate, EmbedInput, Embedder, Embedding, EmbeddingsHandle, EngineError, Forward,
    GenerateConfig, GenerateHandle, GgufTokenizer, TextModel, Vocabulary, WorkerConfig,
};
use warden::metrics::Metrics;
use warden::{AppState, Config, Services};
use warden_tests::{ADMIN_TOKEN, INFERENCE_KEY, METRICS_KEY, plugin_config};

/// The embedding model's id in these tests: the real one's, so requests read the same.
const EMBEDDER: &str = "all-MiniLM-L6-v2";
/// The fake's vocabulary: as large as MiniLM's.
const VOCABULARY: usize = 30522;

/// An embedder that answers at once: each input's vector is its length in bytes and a one.
struct FakeEmbedder;

struct FakeVocabulary;

impl Vocabulary for FakeVocabulary {
    fn size(&self) -> usize {
        VOCABULARY
    }

    fn decode(&self, ids: &[u32]) -> Result<String, EngineError> {
        Ok(ids.iter().map(|id| format!("t{id} ")).collect())
    }
}

impl Embedder for FakeEmbedder {
    fn embed(&mut self, inputs: &[&EmbedInput]) -> Result<Vec<Embedding>, EngineError> {
        Ok(inputs
            .iter()
            .map(|input| {
                let tokens = match input {
                    EmbedInput::Text(t) => t.len(),
                    EmbedInput::Tokens(ids) => ids.len(),
                };
                Embedding {
                    vector: vec![tokens as f32, 1.0],
                    tokens,
                }
            })
            .collect())
    }

    fn dimensions(&self) -> usize {
        2
    }

    fn vocabulary(&self) -> Option<Arc<dyn Vocabulary>> {
        Some(Arc::new(FakeVocabulary))
    }
}

/// The scripted text model's id.
const COUNTER: &str = "counter";

/// A scripted text model over one token per byte: after `a` comes `b`, … after `z` the end
/// of the turn (id 256); after anything else, `a`. Its window is 256 tokens.
struct Counter;

impl Forward for Counter {
    type Cache = usize;

    fn context_length(&self) -> usize {
        256
    }

    fn new_cache(&self) -> usize {
        0
    }

    fn cached(cache: &usize) -> usize {
        *cache
    }

    fn truncate(cache: &mut usize, len: usize) -> candle_core::Result<()> {
        *cache = (*cache).min(len);
        Ok(())
    }

    fn forward(&self, tokens: &[u32], cache: &mut usize) -> candle_core::Result<Vec<f32>> {
        *cache += tokens.len();
        Ok(next(*tokens.last().unwrap_or(&0)))
    }

    fn forward_batch(
        &self,
        tokens: &[u32],
        caches: &mut [&mut usize],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        for c in caches.iter_mut() {
            **c += 1;
        }
        Ok(tokens.iter().map(|&t| next(t)).collect())
    }
}

fn next(last: u32) -> Vec<f32> {
    let next = match u8::try_from(last) {
        Ok(b @ b'a'..=b'y') => u32::from(b + 1),
        Ok(b'z') => 256,
        _ => u32::from(b'a'),
    };
    let mut logits = vec![0.0; 257];
    // Peaked enough that sampling at the default temperature picks it too.
    logits[next as usize] = 30.0;
    logits
}

const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fn counter() -> TextModel {
    let tokenizer = Arc::new(GgufTokenizer::one_token_per_byte());
    let handle = GenerateHandle::spawn(
        COUNTER,
        Arc::new(Counter),
        tokenizer,
        GenerateConfig::default(),
    )
    .expect("engine thread");
    TextModel {
        id: COUNTER.into(),
        handle,
        template: Some(ChatTemplate::new(CHATML, "", "<|im_end|>").expect("template")),
    }
}

/// A state serving the real plugins `config` names, the fake embedder, and no text model.
fn serving(config: Config) -> Arc<AppState> {
    serving_with(config, Vec::new())
}

/// [`serving`] with these text models.
fn serving_with(config: Config, text: Vec<TextModel>) -> Arc<AppState> {
    let metrics = Arc::new(Metrics::new());
    let plugins = warden::plugin_registry(&config, metrics.clone()).expect("plugins load");
    let embedder = EmbeddingsHandle::spawn(EMBEDDER, FakeEmbedder, WorkerConfig::default())
        .expect("engine thread");
    let services = Services::new(
        &config,
        &metrics,
        plugins,
        vec![embedder],
        text,
        BTreeMap::new(),
    );
    AppState::serving(config, metrics, services)
}

/// One answer: status, headers, body.
struct Answer {
    status: u16,
    headers: warp::http::HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// The error object, after checking the status and the body's OpenAI shape.
    fn error(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "{}", self.body);
        let v = self.json();
        let e = &v["error"];
        assert!(e["message"].is_string() && e["type"].is_string(), "{v}");
        assert!(!leaks_a_path(&self.body), "{}", self.body);
        e.clone()
    }
}

/// Whether `body` names a file of this machine: the checkout, the plugin directory, or a
/// source location.
fn leaks_a_path(body: &str) -> bool {
    let root = warden_tests::root();
    body.contains(&*root.to_string_lossy())
        || body.contains(warden_tests::PLUGIN_DIR)
        || body.contains(".rs:")
}

async fn send(state: &Arc<AppState>, request: warp::test::RequestBuilder) -> Answer {
    let reply = request.reply(&warden::http::routes(state.clone())).await;
    Answer {
        status: reply.status().as_u16(),
        headers: reply.headers().clone(),
        body: String::from_utf8_lossy(reply.body()).into_owned(),
    }
}

fn post(path: &str, key: Option<&str>, body: &Value) -> warp::test::RequestBuilder {
    let r = warp::test::request().method("POST").path(path).json(body);
    match key {
        Some(k) => r.header("authorization", format!("Bearer {k}")),
        None => r,
    }
}

fn get(path: &str, key: Option<&str>) -> warp::test::RequestBuilder {
    let r = warp::test::request().method("GET").path(path);
    match key {
        Some(k) => r.header("authorization", format!("Bearer {k}")),
        None => r,
    }
}

#[tokio::test]
async fn no_bad_and_wrong_scope_credentials_are_refused() {
    let state = serving(plugin_config());
    let body = json!({"model": EMBEDDER, "input": "hello"});

    let none = send(&state, post("/v1/embeddings", None, &body)).await;
    assert_eq!(none.error(401)["code"], "missing_api_key");
    assert_eq!(none.headers["www-authenticate"], "Bearer");

    let bad = send(&state, post("/v1/embeddings", Some("not-a-key"), &body)).await;
    assert_eq!(bad.error(401)["code"], "invalid_api_key");
    assert!(!bad.body.contains("not-a-key"), "the key is echoed");

    let basic = post("/v1/embeddings", None, &body).header("authorization", "Basic abc");
    send(&state, basic).await.error(401);

    // The metrics key is valid but lacks the `inference` scope, and the other way round.
    let wrong = send(&state, post("/v1/embeddings", Some(METRICS_KEY), &body)).await;
    assert_eq!(wrong.error(403)["code"], "insufficient_scope");
    let wrong = send(&state, get("/v1/metrics", Some(INFERENCE_KEY))).await;
    assert_eq!(wrong.error(403)["code"], "insufficient_scope");

    let ok = send(&state, post("/v1/embeddings", Some(INFERENCE_KEY), &body)).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.json()["data"][0]["embedding"], json!([5.0, 1.0]));
    assert!(ok.headers.contains_key("x-request-id"));
    let metrics = send(&state, get("/v1/metrics", Some(METRICS_KEY))).await;
    assert_eq!(metrics.status, 200, "{}", metrics.body);
    assert!(
        metrics.body.contains("warden_requests_total"),
        "{}",
        metrics.body
    );
}

#[tokio::test]
async fn malformed_embedding_requests_are_4xx_with_openai_errors() {
    let state = serving(plugin_config());
    let raw = |body: &'static str| {
        warp::test::request()
            .method("POST")
            .path("/v1/embeddings")
            .header("authorization", format!("Bearer {INFERENCE_KEY}"))
            .header("content-type", "application/json")
            .body(body)
    };
    for body in [
        "{",
        "",
        "[1,2]",
        "null",
        r#"{"model": 5, "input": "x"}"#,
        r#"{"input": "x"}"#,
        r#"{"model":"all-MiniLM-L6-v2"}"#,
        r#"{"model":"all-MiniLM-L6-v2","input":"x","temperature":1}"#,
    ] {
        send(&state, raw(body)).await.error(400);
    }
    let cases = [
        // Token ids outside the vocabulary, negative, fractional, empty, or mixed with text.
        (json!({"model": EMBEDDER, "input": [1, 2, 30522]}), "input"),
        (json!({"model": EMBEDDER, "input": [[1, 2], [-3]]}), "input"),
        (json!({"model": EMBEDDER, "input": [[1.5]]}), "input"),
        (json!({"model": EMBEDDER, "input": [[7592], []]}), "input"),
        (
            json!({"model": EMBEDDER, "input": [[7592], "hello"]}),
            "input",
        ),
        (json!({"model": EMBEDDER, "input": []}), "input"),
        (json!({"model": EMBEDDER, "input": ""}), "input"),
        (json!({"model": EMBEDDER, "input": ["a", null]}), "input"),
        (
            json!({"model": EMBEDDER, "input": "a", "dimensions": 64}),
            "dimensions",
        ),
        (
            json!({"model": EMBEDDER, "input": "a", "encoding_format": "int8"}),
            "encoding_format",
        ),
    ];
    for (body, param) in cases {
        let r = send(&state, post("/v1/embeddings", Some(INFERENCE_KEY), &body)).await;
        assert_eq!(r.error(400)["param"], param, "{body}");
    }
    // The sanitizer plugin's refusal.
    let control = json!({"model": EMBEDDER, "input": ["ok", "a\u{7}b"]});
    let r = send(
        &state,
        post("/v1/embeddings", Some(INFERENCE_KEY), &control),
    )
    .await;
    assert!(
        r.error(400)["message"]
            .as_str()
            .unwrap()
            .contains("input[1]"),
        "{}",
        r.body
    );
    let unknown = json!({"model": "gpt-4", "input": "a"});
    let r = send(
        &state,
        post("/v1/embeddings", Some(INFERENCE_KEY), &unknown),
    )
    .await;
    let e = r.error(404);
    assert_eq!(
        (e["code"].as_str(), e["param"].as_str()),
        (Some("model_not_found"), Some("model"))
    );
    let not_json = raw("hi").header("content-type", "text/plain");
    send(&state, not_json).await.error(415);

    // Unauthenticated clients learn nothing about their body.
    let r = warp::test::request()
        .method("POST")
        .path("/v1/embeddings")
        .body("{");
    send(&state, r).await.error(401);
}

#[tokio::test]
async fn chat_and_completion_parameters_are_checked_before_any_model() {
    let state = serving(plugin_config());
    let chat = |extra: Value| {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let cases = [
        (chat(json!({"temperature": 3})), "temperature"),
        (chat(json!({"temperature": "hot"})), "temperature"),
        (chat(json!({"top_p": 1.5})), "top_p"),
        (chat(json!({"max_tokens": -1})), "max_tokens"),
        (chat(json!({"n": 2})), "n"),
        (chat(json!({"stop": ["a", "b", "c", "d", "e"]})), "stop"),
        (chat(json!({"logprobs": true})), "logprobs"),
        (chat(json!({"tools": [{"type": "function"}]})), "tools"),
        (chat(json!({"stream": "yes"})), "stream"),
        (chat(json!({"messages": []})), "messages"),
        (
            chat(json!({"messages": [{"role": "wizard", "content": "x"}]})),
            "messages",
        ),
        (chat(json!({"messages": [{"role": "user"}]})), "messages"),
    ];
    for (body, param) in cases {
        let r = send(
            &state,
            post("/v1/chat/completions", Some(INFERENCE_KEY), &body),
        )
        .await;
        assert_eq!(
            (r.status, r.json()["error"]["param"].clone()),
            (400, json!(param)),
            "{body}: {}",
            r.body
        );
    }
    // An unknown parameter is named in the message (OpenAI leaves `param` null).
    let r = send(
        &state,
        post(
            "/v1/chat/completions",
            Some(INFERENCE_KEY),
            &chat(json!({"frobnicate": 1})),
        ),
    )
    .await;
    assert!(
        r.error(400)["message"]
            .as_str()
            .unwrap()
            .contains("frobnicate"),
        "{}",
        r.body
    );
    let completions = [
        (json!({"model": "m", "prompt": 5}), "prompt"),
        (json!({"model": "m", "prompt": [1, -2]}), "prompt"),
        (json!({"model": "m"}), "prompt"),
        (json!({"model": "m", "prompt": "x", "echo": true}), "echo"),
    ];
    for (body, param) in completions {
        let r = send(&state, post("/v1/completions", Some(INFERENCE_KEY), &body)).await;
        assert_eq!(r.error(400)["param"], param, "{body}");
    }
    // A valid request for a model that is not served.
    let r = send(
        &state,
        post(
            "/v1/chat/completions",
            Some(INFERENCE_KEY),
            &chat(json!({})),
        ),
    )
    .await;
    assert_eq!(r.error(404)["code"], "model_not_found");
    // No text model: tokenizing with the default model has nowhere to go.
    let r = send(
        &state,
        post("/tokenize", Some(INFERENCE_KEY), &json!({"content": "x"})),
    )
    .await;
    r.error(404);
}

#[tokio::test]
async fn unknown_routes_and_methods() {
    let state = serving(plugin_config());
    send(&state, get("/v1/nope", Some(INFERENCE_KEY)))
        .await
        .error(404);
    send(&state, get("/v1/embeddings", Some(INFERENCE_KEY)))
        .await
        .error(405);
    let models = send(&state, get("/v1/models", Some(INFERENCE_KEY))).await;
    assert_eq!(models.status, 200);
    assert_eq!(models.json()["data"][0]["id"], EMBEDDER);
    assert_eq!(models.json()["data"].as_array().map(Vec::len), Some(1));
    send(&state, get("/v1/models", None)).await.error(401);
    assert_eq!(send(&state, get("/health", None)).await.status, 200);
    assert_eq!(send(&state, get("/ready", None)).await.status, 200);
}

#[tokio::test]
async fn the_admin_api_needs_its_token_and_names_what_it_refuses() {
    let mut config = plugin_config();
    config.admin_token = Some(warden::config::Secret::new(ADMIN_TOKEN));
    let state = serving(config);
    let admin = warden::http::admin_routes(state.clone());
    let ask = |r: warp::test::RequestBuilder| {
        let admin = admin.clone();
        async move {
            let reply = r.reply(&admin).await;
            Answer {
                status: reply.status().as_u16(),
                headers: reply.headers().clone(),
                body: String::from_utf8_lossy(reply.body()).into_owned(),
            }
        }
    };
    let list = |token: Option<&str>| {
        let r = warp::test::request().method("GET").path("/admin/plugins");
        match token {
            Some(t) => r.header("authorization", format!("Bearer {t}")),
            None => r,
        }
    };
    ask(list(None)).await.error(401);
    ask(list(Some(INFERENCE_KEY))).await.error(401);
    let ok = ask(list(Some(ADMIN_TOKEN))).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let slots: Vec<String> = ok.json()["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["slot"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(slots, ["auth", "sanitizer", "metrics-policy"]);

    let put = |slot: &str, body: &str| {
        warp::test::request()
            .method("PUT")
            .path(&format!("/admin/plugins/{slot}"))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .header("content-type", "application/json")
            .body(body)
    };
    let unknown = ask(put("quota", r#"{"file": "x.wasm", "sha256": "00"}"#)).await;
    assert_eq!(unknown.status / 100, 4, "{}", unknown.body);
    let escape = ask(put(
        "auth",
        &format!(r#"{{"file": "../x.wasm", "sha256": "{}"}}"#, "0".repeat(64)),
    ))
    .await;
    assert_eq!(escape.status / 100, 4, "{}", escape.body);
    assert!(!leaks_a_path(&escape.body), "{}", escape.body);
    let bad_json = ask(put("auth", "{")).await;
    assert_eq!(bad_json.status, 400, "{}", bad_json.body);
}

#[tokio::test]
async fn generation_through_the_facade_whole_and_streamed_gives_the_same_text() {
    let state = serving_with(plugin_config(), vec![counter()]);
    let body = json!({
        "model": COUNTER,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
    });
    let whole = send(
        &state,
        post("/v1/chat/completions", Some(INFERENCE_KEY), &body),
    )
    .await;
    assert_eq!(whole.status, 200, "{}", whole.body);
    let v = whole.json();
    // The prompt ends with the template's "\n": the counter answers from `a`.
    assert_eq!(v["choices"][0]["message"]["content"], "abcde");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let sse = send(
        &state,
        post("/v1/chat/completions", Some(INFERENCE_KEY), &streamed),
    )
    .await;
    assert_eq!(sse.status, 200, "{}", sse.body);
    let events: Vec<&str> = sse
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("data:").map(str::trim_start))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "abcde");
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 5);

    // A completion ends at the end-of-turn token: after `z`.
    let completion = json!({"model": COUNTER, "prompt": "w", "max_tokens": 10});
    let r = send(
        &state,
        post("/v1/completions", Some(INFERENCE_KEY), &completion),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["choices"][0]["text"], "xyz");
    assert_eq!(r.json()["choices"][0]["finish_reason"], "stop");

    // The window is 256 tokens: the host refuses before the engine.
    let long = json!({"model": COUNTER, "prompt": "a".repeat(250), "max_tokens": 10});
    let r = send(&state, post("/v1/completions", Some(INFERENCE_KEY), &long)).await;
    assert_eq!(r.error(400)["code"], "context_length_exceeded");
    let ids = json!({"model": COUNTER, "prompt": [97, 98], "max_tokens": 2});
    let r = send(&state, post("/v1/completions", Some(INFERENCE_KEY), &ids)).await;
    assert_eq!(r.json()["choices"][0]["text"], "cd", "{}", r.body);

    // Tokenizing goes through the same model.
    let r = send(
        &state,
        post("/tokenize", Some(INFERENCE_KEY), &json!({"content": "ab"})),
    )
    .await;
    assert_eq!(r.json()["tokens"], json!([97, 98]), "{}", r.body);
    let r = send(
        &state,
        post(
            "/detokenize",
            Some(INFERENCE_KEY),
            &json!({"tokens": [97, 300]}),
        ),
    )
    .await;
    assert_eq!(r.error(400)["param"], "tokens");
}
