//! `warden plugin test`: run a plugin on test cases through the real runtime, with its
//! slot's limits and the host's own checks of what it answers, and say per case whether
//! the answer is the one expected, with the time of each phase and the memory it took.
//!
//! A case file has one JSON object per line (blank lines and lines starting with `#` are
//! skipped): a `name`, what to ask, and what to `expect`. The expectation is matched
//! against the answer rendered as JSON: every key the expectation gives must be there with
//! the same value (objects are matched key by key, anything else whole), so a case names
//! only what it cares about; `null` asserts a key is absent (or null).
//!
//! | slot | ask | answer |
//! |---|---|---|
//! | auth | `"request": {"method", "path", "headers": {"name": "value" or ["value", ...]}}` | `{"principal": {"id", "tenant", "scopes"}}` or `{"refusal": {"status", "code", "message"}}` |
//! | sanitizer | `"input": {"kind": "chat" \| "completion" \| "embeddings", "texts": […] \| "messages": [{"role", "content"}]}` | `{"pass": true}`, `{"rewrite": {"texts" \| "messages"}}` or `{"refusal": …}` |
//! | sanitizer | `"output": {"kind", "chunks": […]}` | `{"released": "the whole text", "pieces": […]}` or `{"refusal": …}` |
//! | metrics-policy | `"summary": {"route", "model", "status", "tenant"}` | `{"labels": {"name": "value"}}` |
//! | metrics-policy | `"caller": {"id", "tenant", "scopes"}` | `{"visibility": "all" \| "none" \| {"matching": {"name": "value"}}}` |
//!
//! A call that faults answers `{"fault": "deadline" | "memory" | "trap" | "malformed"}`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::bindings::World;
use super::loader::{Loaded, PluginSource};
use super::registry::{AnyLoaded, authenticate_on, labels_on, valid_refusal, visible_series_on};
use super::runtime::Runtime;
use super::session::{Checked, SessionInner};
use super::state::PluginState;
use super::{
    ChatMessage, Fault, FaultSink, InferenceInput, InputKind, LoadError, Payload, Principal,
    Refusal, RequestMeta, RequestSummary, Visibility,
};

/// How one case went.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaseOutcome {
    /// The case's name (its line number when it has none).
    pub name: String,
    /// Whether the answer matched the expectation.
    pub passed: bool,
    /// What was expected.
    pub expected: Value,
    /// What the plugin answered (after the host's checks).
    pub answer: Value,
    /// A fresh store and instance, in microseconds.
    pub instantiate_us: f64,
    /// `configure`, in microseconds.
    pub configure_us: f64,
    /// The case's calls, in microseconds.
    pub call_us: f64,
    /// The most linear memory the instance asked for, in bytes.
    pub peak_memory_bytes: usize,
    /// WebAssembly instructions `configure` executed (fuel units), on a metered runtime
    /// ([`RuntimeBuilder::metered`](super::RuntimeBuilder::metered)).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub configure_instructions: Option<u64>,
    /// WebAssembly instructions the case's calls executed, on a metered runtime.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call_instructions: Option<u64>,
}

/// What an instance took: its peak memory and, metered, the instructions it executed.
struct Spent {
    peak: usize,
    instructions: Option<u64>,
}

impl Spent {
    fn of(store: &wasmtime::Store<PluginState>) -> Self {
        Self {
            peak: store.data().memory.peak,
            instructions: Runtime::instructions(store),
        }
    }
}

/// Faults are reported in the answers, not logged.
#[derive(Debug)]
struct Quiet;

impl FaultSink for Quiet {
    fn fault(&self, _: &Fault) {}
}

/// Load `source` as a live swap would (integrity, world, version, configuration, smoke
/// call), then run every case of `cases` (JSON lines). A case that cannot be read is an
/// `Err` naming its line.
pub fn run_cases(
    runtime: &Arc<Runtime>,
    source: &PluginSource,
    cases: &str,
) -> Result<Vec<CaseOutcome>, String> {
    let loaded = AnyLoaded::load(runtime, source, Arc::new(Quiet), None)
        .map_err(|e: LoadError| e.to_string())?;
    let mut outcomes = Vec::new();
    for (i, line) in cases.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |e: String| format!("case on line {}: {e}", i + 1);
        let case: Map<String, Value> =
            serde_json::from_str(line).map_err(|e| at(format!("not a JSON object: {e}")))?;
        let name = case
            .get("name")
            .and_then(Value::as_str)
            .map_or_else(|| format!("line {}", i + 1), str::to_string);
        let expected = case
            .get("expect")
            .cloned()
            .ok_or_else(|| at("it has no `expect`".into()))?;
        let rid: Arc<str> = format!("test-{}", i + 1).into();
        let run = match &loaded {
            AnyLoaded::Auth(p) => fresh(p, &rid, |mut store, instance| {
                let meta = request(&case, &rid).map_err(at)?;
                let answer = match authenticate_on(p, &mut store, &instance, &meta) {
                    Ok(Ok(p)) => json!({"principal": principal_json(&p)}),
                    Ok(Err(r)) => refusal_json(&r),
                    Err(f) => fault_json(&f),
                };
                Ok((answer, Spent::of(&store)))
            }),
            AnyLoaded::Sanitizer(p) => fresh(p, &rid, |store, instance| {
                let mut session = SessionInner::new(rid.clone(), store, instance);
                let answer = sanitize(p, &mut session, &case).map_err(at)?;
                let spent = Spent {
                    peak: session.peak_memory(),
                    instructions: session.instructions(),
                };
                Ok((answer, spent))
            }),
            AnyLoaded::Metrics(p) => fresh(p, &rid, |mut store, instance| {
                let answer = if let Some(summary) = case.get("summary") {
                    let summary = summary_of(summary).map_err(at)?;
                    match labels_on(p, &mut store, &instance, &summary, &rid) {
                        Ok(labels) => {
                            let labels: Map<String, Value> =
                                labels.into_iter().map(|(k, v)| (k, v.into())).collect();
                            json!({"labels": labels})
                        }
                        Err(f) => fault_json(&f),
                    }
                } else if let Some(caller) = case.get("caller") {
                    let caller = principal_of(caller).map_err(at)?;
                    match visible_series_on(p, &mut store, &instance, &caller, &rid) {
                        Ok(Visibility::All) => json!({"visibility": "all"}),
                        Ok(Visibility::Nothing) => json!({"visibility": "none"}),
                        Ok(Visibility::Matching(labels)) => {
                            let labels: Map<String, Value> =
                                labels.into_iter().map(|(k, v)| (k, v.into())).collect();
                            json!({"visibility": {"matching": labels}})
                        }
                        Err(f) => fault_json(&f),
                    }
                } else {
                    return Err(at(
                        "a metrics-policy case asks with `summary` or `caller`".into()
                    ));
                };
                Ok((answer, Spent::of(&store)))
            }),
        }?;
        outcomes.push(CaseOutcome {
            passed: matches(&expected, &run.answer),
            name,
            expected,
            answer: run.answer,
            instantiate_us: micros(run.instantiate),
            configure_us: micros(run.configure),
            call_us: micros(run.call),
            peak_memory_bytes: run.peak,
            configure_instructions: run.configure_instructions,
            call_instructions: run.call_instructions,
        });
    }
    Ok(outcomes)
}

fn micros(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e7).round() / 10.0
}

/// One case's answer and what it cost.
struct Run {
    answer: Value,
    instantiate: Duration,
    configure: Duration,
    call: Duration,
    peak: usize,
    configure_instructions: Option<u64>,
    call_instructions: Option<u64>,
}

/// A fresh, configured instance of `plugin`, timed, handed to `call`, which answers and
/// says the most memory the instance took.
fn fresh<W: World>(
    plugin: &Loaded<W>,
    rid: &Arc<str>,
    call: impl FnOnce(wasmtime::Store<PluginState>, W::Instance) -> Result<(Value, Spent), String>,
) -> Result<Run, String> {
    let started = Instant::now();
    let fresh = plugin.fresh(plugin.limits, Some(rid));
    let instantiate = started.elapsed();
    let (mut store, instance) = match fresh {
        Ok(made) => made,
        Err(e) => {
            return Ok(Run {
                answer: fault_json(&e.into_fault(plugin, Some(rid))),
                instantiate,
                configure: Duration::ZERO,
                call: Duration::ZERO,
                peak: 0,
                configure_instructions: None,
                call_instructions: None,
            });
        }
    };
    // Instantiation may run start functions: count from here.
    let before = Runtime::instructions(&store);
    let started = Instant::now();
    let configured = plugin.configure(&mut store, &instance, Some(rid));
    let configure = started.elapsed();
    let configured_at = Runtime::instructions(&store);
    let configure_instructions = configured_at.zip(before).map(|(a, b)| a - b);
    if let Err(e) = configured {
        return Ok(Run {
            answer: fault_json(&e.into_fault(plugin, Some(rid))),
            instantiate,
            configure,
            call: Duration::ZERO,
            peak: store.data().memory.peak,
            configure_instructions,
            call_instructions: None,
        });
    }
    let started = Instant::now();
    let (answer, spent) = call(store, instance)?;
    Ok(Run {
        answer,
        instantiate,
        configure,
        call: started.elapsed(),
        peak: spent.peak,
        configure_instructions,
        call_instructions: spent.instructions.zip(configured_at).map(|(a, b)| a - b),
    })
}

fn request(case: &Map<String, Value>, rid: &Arc<str>) -> Result<RequestMeta, String> {
    let r = case
        .get("request")
        .and_then(Value::as_object)
        .ok_or("an auth case asks with `request`: {method, path, headers}")?;
    let text = |k: &str, default: &str| {
        r.get(k)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_string()
    };
    let headers = match r.get("headers") {
        None => Vec::new(),
        // A list of values is a header sent several times, in that order.
        Some(Value::Object(h)) => h
            .iter()
            .flat_map(|(k, v)| {
                let values = match v {
                    Value::Array(values) => values.iter().collect(),
                    v => vec![v],
                };
                values
                    .into_iter()
                    .map(|v| (k.to_ascii_lowercase(), v.as_str().unwrap_or("").to_string()))
            })
            .collect(),
        Some(_) => {
            return Err("`headers` is an object of names and values (or lists of them)".into());
        }
    };
    Ok(RequestMeta {
        request_id: rid.clone(),
        method: text("method", "GET"),
        path: text("path", "/v1/models"),
        headers,
        client_addr: None,
    })
}

fn kind_of(v: Option<&Value>) -> Result<InputKind, String> {
    match v.and_then(Value::as_str).unwrap_or("chat") {
        "chat" => Ok(InputKind::Chat),
        "completion" => Ok(InputKind::Completion),
        "embeddings" => Ok(InputKind::Embeddings),
        other => Err(format!(
            "unknown kind `{other}`: chat, completion or embeddings"
        )),
    }
}

fn payload_of(v: &Map<String, Value>) -> Result<Payload, String> {
    if let Some(texts) = v.get("texts") {
        let texts: Vec<String> =
            serde_json::from_value(texts.clone()).map_err(|e| format!("texts: {e}"))?;
        return Ok(Payload::Texts(texts));
    }
    let messages = v
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("an input has `texts` or `messages`")?;
    messages
        .iter()
        .map(|m| {
            Ok(ChatMessage {
                role: m["role"].as_str().unwrap_or("user").into(),
                content: m["content"]
                    .as_str()
                    .ok_or("a message has a `content` string")?
                    .into(),
            })
        })
        .collect::<Result<_, String>>()
        .map(Payload::Messages)
}

fn payload_json(p: &Payload) -> Value {
    match p {
        Payload::Texts(t) => json!({"texts": t}),
        Payload::Messages(m) => json!({"messages": m
            .iter()
            .map(|m| json!({"role": m.role, "content": m.content}))
            .collect::<Vec<_>>()}),
    }
}

fn sanitize(
    plugin: &super::registry::SanitizerLoaded,
    session: &mut SessionInner,
    case: &Map<String, Value>,
) -> Result<Value, String> {
    if let Some(input) = case.get("input").and_then(Value::as_object) {
        let input = InferenceInput {
            kind: kind_of(input.get("kind"))?,
            model: input
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or("test-model")
                .into(),
            principal: Principal {
                id: "test".into(),
                tenant: None,
                scopes: vec!["inference".into()],
            },
            payload: payload_of(input)?,
            max_tokens: input
                .get("max_tokens")
                .and_then(Value::as_u64)
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
        };
        return Ok(match session.check_input(plugin, input) {
            Ok(Ok(Checked::Unchanged(_))) => json!({"pass": true}),
            Ok(Ok(Checked::Rewritten(p))) => json!({"rewrite": payload_json(&p)}),
            Ok(Err(r)) => refusal_json(&r),
            Err(f) => fault_json(&f),
        });
    }
    let output = case
        .get("output")
        .and_then(Value::as_object)
        .ok_or("a sanitizer case asks with `input` or `output`")?;
    let chunks: Vec<String> =
        serde_json::from_value(output.get("chunks").cloned().unwrap_or_default())
            .map_err(|e| format!("chunks: {e}"))?;
    let filter = match session.output_filter(plugin, kind_of(output.get("kind"))?) {
        Ok(f) => f,
        Err(f) => return Ok(fault_json(&f)),
    };
    let mut pieces = Vec::new();
    for chunk in chunks {
        match session.push(plugin, filter, &chunk) {
            Ok(Ok(piece)) => pieces.push(piece),
            Ok(Err(r)) => return Ok(refusal_json(&r)),
            Err(f) => return Ok(fault_json(&f)),
        }
    }
    match session.finish(plugin, filter) {
        Ok(Ok(rest)) => pieces.push(rest),
        Ok(Err(r)) => return Ok(refusal_json(&r)),
        Err(f) => return Ok(fault_json(&f)),
    }
    Ok(json!({"released": pieces.concat(), "pieces": pieces}))
}

/// The route templates the host reports to the metrics policy.
const ROUTES: [&str; 7] = [
    "/v1/embeddings",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/metrics",
    "/tokenize",
    "/detokenize",
];

fn summary_of(v: &Value) -> Result<RequestSummary, String> {
    let asked = v["route"].as_str().unwrap_or("/v1/embeddings");
    let route = ROUTES.into_iter().find(|r| *r == asked).ok_or_else(|| {
        format!(
            "`{asked}` is not a route the host reports: {}",
            ROUTES.join(", ")
        )
    })?;
    Ok(RequestSummary {
        route,
        model: v["model"].as_str().map(str::to_string),
        status: v["status"]
            .as_u64()
            .and_then(|s| u16::try_from(s).ok())
            .unwrap_or(200),
        tenant: v["tenant"].as_str().map(str::to_string),
    })
}

fn principal_of(v: &Value) -> Result<Principal, String> {
    Ok(Principal {
        id: v["id"].as_str().unwrap_or("test").into(),
        tenant: v["tenant"].as_str().map(str::to_string),
        scopes: serde_json::from_value(v.get("scopes").cloned().unwrap_or(json!([])))
            .map_err(|e| format!("scopes: {e}"))?,
    })
}

fn principal_json(p: &Principal) -> Value {
    json!({"id": p.id, "tenant": p.tenant, "scopes": p.scopes})
}

fn refusal_json(r: &Refusal) -> Value {
    debug_assert!(valid_refusal(r));
    json!({"refusal": {"status": r.status, "code": r.code, "message": r.message}})
}

fn fault_json(f: &Fault) -> Value {
    json!({"fault": f.kind.as_str()})
}

/// Whether `answer` has everything `expected` gives: objects key by key (a `null` also
/// matches a key that is not there), the rest whole.
fn matches(expected: &Value, answer: &Value) -> bool {
    match (expected, answer) {
        (Value::Object(e), Value::Object(a)) => e.iter().all(|(k, v)| match a.get(k) {
            Some(got) => matches(v, got),
            None => v.is_null(),
        }),
        _ => expected == answer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations_match_what_they_name() {
        let answer = json!({"principal": {"id": "a", "tenant": null, "scopes": ["x"]}});
        assert!(matches(&json!({"principal": {"id": "a"}}), &answer));
        assert!(matches(&json!({"principal": {"scopes": ["x"]}}), &answer));
        assert!(!matches(&json!({"principal": {"scopes": []}}), &answer));
        assert!(!matches(&json!({"refusal": {}}), &answer));
        assert!(!matches(&json!({"principal": {"id": "b"}}), &answer));
        assert!(matches(&json!({"principal": {"tenant": null}}), &answer));
        assert!(matches(
            &json!({"labels": {"tenant": null}}),
            &json!({"labels": {}})
        ));
        assert!(!matches(
            &json!({"labels": {"tenant": null}}),
            &json!({"labels": {"tenant": "a"}})
        ));
    }
}
