//! Tracing: one `http` span per request carrying its request id, with a child span for each
//! plugin call and for the engine's work, and the id returned in `x-request-id`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::{Value, json};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use warden_tests::{INFERENCE_KEY, Reply, TEXT_MODEL, TestServer, config, start};

/// A span as it was opened: its name, the request id it belongs to (its own `request_id`
/// field or its nearest ancestor's) and its ancestors' names, nearest first.
#[derive(Debug, Clone)]
struct Opened {
    name: &'static str,
    request_id: String,
    ancestors: Vec<&'static str>,
}

/// The request id a span carries, kept in its extensions for its descendants.
struct RequestId(String);

#[derive(Default)]
struct FindRequestId(Option<String>);

impl Visit for FindRequestId {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "request_id" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

/// Records every span Warden opens. Span ids are reused once closed, so the tree is taken
/// when each span opens, from its live ancestors.
struct Capture(Arc<Mutex<Vec<Opened>>>);

impl<S> Layer<S> for Capture
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut own = FindRequestId::default();
        attrs.record(&mut own);
        let inherited = span
            .parent()
            .and_then(|p| p.extensions().get::<RequestId>().map(|r| r.0.clone()));
        let Some(request_id) = own.0.or(inherited) else {
            return;
        };
        let ancestors = span.scope().skip(1).map(|s| s.name()).collect();
        span.extensions_mut().insert(RequestId(request_id.clone()));
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Opened {
                name: span.name(),
                request_id,
                ancestors,
            });
    }
}

/// The process-wide capture, installed once for the whole test binary (other tests' spans
/// are recorded too, under their own request ids).
fn capture() -> Arc<Mutex<Vec<Opened>>> {
    static SPANS: OnceLock<Arc<Mutex<Vec<Opened>>>> = OnceLock::new();
    SPANS
        .get_or_init(|| {
            let spans = Arc::new(Mutex::new(Vec::new()));
            let layer = Capture(spans.clone())
                .with_filter(Targets::new().with_target("warden", tracing::Level::TRACE));
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
                .expect("no other global subscriber in the e2e tests");
            spans
        })
        .clone()
}

fn spans_of(spans: &Mutex<Vec<Opened>>, request_id: &str) -> Vec<Opened> {
    spans
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.request_id == request_id)
        .cloned()
        .collect()
}

/// Every span of the request descends from its one `http` span, and `names` are among its
/// descendants.
fn assert_tree(spans: &[Opened], names: &[&str]) {
    let roots: Vec<_> = spans.iter().filter(|s| s.ancestors.is_empty()).collect();
    assert_eq!(roots.len(), 1, "{spans:#?}");
    assert_eq!(roots[0].name, "http", "{spans:#?}");
    for s in spans.iter().filter(|s| !s.ancestors.is_empty()) {
        assert_eq!(s.ancestors.last(), Some(&"http"), "{s:?}");
    }
    let seen: BTreeSet<_> = spans
        .iter()
        .filter(|s| !s.ancestors.is_empty())
        .map(|s| s.name)
        .collect();
    for name in names {
        assert!(seen.contains(name), "no {name} span: {seen:?}");
    }
}

/// POST `body` to `path` with `x-request-id: id`, and the inference key if `authorized`.
async fn post(t: &TestServer, path: &str, id: &str, authorized: bool, body: Value) -> Reply {
    let mut request = t.client.post(t.url(path)).header("x-request-id", id);
    if authorized {
        request = request.bearer_auth(INFERENCE_KEY);
    }
    t.send(request.json(&body)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_has_a_span_tree_under_its_request_id() {
    let spans = capture();
    let t = start(config()).await;
    let plugins_and = |engine| {
        [
            "plugin.auth",
            "plugin.sanitizer",
            engine,
            "plugin.metrics_policy",
        ]
    };

    // An embedding with the client's id: plugin calls and the engine's work under it.
    let embed = json!({"input": "spans", "model": "all-MiniLM-L6-v2"});
    let r = post(
        &t,
        "/v1/embeddings",
        "span-test-embed-1",
        true,
        embed.clone(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.headers["x-request-id"], "span-test-embed-1");
    assert_tree(
        &spans_of(&spans, "span-test-embed-1"),
        &plugins_and("engine.embed"),
    );

    // A chat completion: the engine's thread opens its span under the request's.
    let chat = json!({
        "model": TEXT_MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3,
        "temperature": 0,
    });
    let r = post(&t, "/v1/chat/completions", "span-test-chat-1", true, chat).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_tree(
        &spans_of(&spans, "span-test-chat-1"),
        &plugins_and("engine.generate"),
    );

    // A refused request has its tree too, and an id the server made when the client's is
    // not a sane one.
    let r = post(&t, "/v1/embeddings", "not a sane id", false, embed).await;
    assert_eq!(r.status, 401);
    let id = r.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 32, "{id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    assert_tree(&spans_of(&spans, &id), &["plugin.auth"]);
}
