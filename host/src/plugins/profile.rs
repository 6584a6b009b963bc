//! Where a plugin call's time goes, phase by phase: for `make bench-plugins`
//! (`examples/bench_plugins.rs`), not for the request path.
//!
//! Each round takes a fresh store and instance of every slot's plugin, as a request does,
//! and times the phases apart: `instantiate` (store and instance), `configure`, each call a
//! request makes, and `teardown` (dropping the store). `handoff` is the round trip of an
//! empty job through the plugin threads, which is what a call costs on top when it is not
//! run on the caller's thread.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::registry::PluginSet;
use super::runtime::Runtime;
use super::session::SessionInner;
use super::{InferenceInput, InputKind, Payload, Principal, RequestMeta, RequestSummary, Slot};
use super::{bindings, runtime};

/// The samples of one phase of one slot.
#[derive(Debug, Clone)]
pub struct PhaseSamples {
    /// The slot, or `host` for the hand-off.
    pub slot: &'static str,
    /// The phase: `instantiate`, `configure`, a call's name, `teardown`, `handoff`.
    pub phase: &'static str,
    /// One duration per round (per call, for calls made several times a round).
    pub samples: Vec<Duration>,
}

/// What one profiled request sends: the bearer token, and the chunks of its generated text.
#[derive(Debug, Clone)]
pub struct ProfileRequest {
    /// `Authorization` header value.
    pub authorization: String,
    /// The prompt given to the sanitizer's input check.
    pub prompt: String,
    /// Generated text, as the engine would hand it to the output filter.
    pub chunks: Vec<String>,
}

impl ProfileRequest {
    /// What the auth plugin sees of this request, under `request_id`.
    pub fn meta(&self, request_id: &Arc<str>) -> RequestMeta {
        RequestMeta {
            request_id: request_id.clone(),
            method: "POST".into(),
            path: "/v1/completions".into(),
            headers: vec![("authorization".into(), self.authorization.clone())],
            client_addr: None,
        }
    }
}

struct Recorder {
    phases: Vec<PhaseSamples>,
}

impl Recorder {
    fn time<R>(&mut self, slot: Slot, phase: &'static str, f: impl FnOnce() -> R) -> R {
        let started = Instant::now();
        let out = f();
        let elapsed = started.elapsed();
        let slot = slot.as_str();
        match self
            .phases
            .iter_mut()
            .find(|p| p.slot == slot && p.phase == phase)
        {
            Some(p) => p.samples.push(elapsed),
            None => self.phases.push(PhaseSamples {
                slot,
                phase,
                samples: vec![elapsed],
            }),
        }
        out
    }
}

/// Panics with the fault's kind: a profile of a failing plugin measures nothing.
fn ok<R>(what: &str, r: Result<R, super::Fault>) -> R {
    r.unwrap_or_else(|f| panic!("{what}: plugin fault {}", f.kind.as_str()))
}

fn fresh<W: bindings::World>(
    rec: &mut Recorder,
    loaded: &super::loader::Loaded<W>,
    rid: &Arc<str>,
) -> (wasmtime::Store<super::state::PluginState>, W::Instance) {
    let slot = loaded.slot;
    let (mut store, instance) = rec
        .time(slot, "instantiate", || {
            loaded.fresh(loaded.limits, Some(rid))
        })
        .unwrap_or_else(|_| panic!("{slot}: cannot instantiate"));
    rec.time(slot, "configure", || {
        loaded.configure(&mut store, &instance, Some(rid))
    })
    .unwrap_or_else(|_| panic!("{slot}: configure failed"));
    (store, instance)
}

impl PluginSet {
    /// Time `rounds` requests' plugin work phase by phase, on this thread.
    #[doc(hidden)]
    pub fn profile_phases(&self, request: &ProfileRequest, rounds: usize) -> Vec<PhaseSamples> {
        let mut rec = Recorder { phases: Vec::new() };
        let principal = Principal {
            id: "bench".into(),
            tenant: None,
            scopes: vec!["inference".into()],
        };
        for round in 0..rounds {
            let rid: Arc<str> = format!("profile-{round}").into();
            let meta = request.meta(&rid);

            let auth = &*self.auth;
            let (mut store, instance) = fresh(&mut rec, auth, &rid);
            let answer = rec.time(Slot::Auth, "authenticate", || {
                bindings::call_authenticate(&instance, &mut store, &meta)
            });
            assert!(
                matches!(answer, Ok(Ok(_))),
                "the profiled request must authenticate"
            );
            rec.time(Slot::Auth, "teardown", || drop((instance, store)));

            let sanitizer = &*self.sanitizer;
            let (store, instance) = fresh(&mut rec, sanitizer, &rid);
            let mut session = SessionInner::new(rid.clone(), store, instance);
            let input = InferenceInput {
                kind: InputKind::Completion,
                model: "bench".into(),
                principal: principal.clone(),
                payload: Payload::Texts(vec![request.prompt.clone()]),
                max_tokens: Some(16),
            };
            let verdict = rec.time(Slot::Sanitizer, "check-input", || {
                session.check_input(sanitizer, input)
            });
            assert!(ok("check-input", verdict).is_ok(), "input refused");
            let filter = rec.time(Slot::Sanitizer, "output-filter", || {
                session.output_filter(sanitizer, InputKind::Completion)
            });
            let filter = ok("output-filter", filter);
            for chunk in &request.chunks {
                let pushed = rec.time(Slot::Sanitizer, "push", || {
                    session.push(sanitizer, filter, chunk)
                });
                ok("push", pushed).expect("output refused");
            }
            let finished = rec.time(Slot::Sanitizer, "finish", || {
                session.finish(sanitizer, filter)
            });
            ok("finish", finished).expect("output refused");
            rec.time(Slot::Sanitizer, "teardown", || drop(session));

            let metrics = &*self.metrics;
            let (mut store, instance) = fresh(&mut rec, metrics, &rid);
            let summary = RequestSummary {
                route: "/v1/completions",
                model: Some("bench".into()),
                status: 200,
                tenant: None,
            };
            let labels = rec.time(Slot::MetricsPolicy, "labels", || {
                bindings::call_labels(&instance, &mut store, &summary)
            });
            assert!(labels.is_ok(), "labels faulted");
            rec.time(Slot::MetricsPolicy, "teardown", || drop((instance, store)));
        }
        rec.phases
    }
}

/// Time `rounds` round trips of an empty job through `runtime`'s plugin threads, from a
/// tokio task.
#[doc(hidden)]
pub async fn profile_handoff(runtime: Arc<Runtime>, rounds: usize) -> PhaseSamples {
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        runtime::call(&runtime, || ())
            .await
            .expect("plugin threads");
        samples.push(started.elapsed());
    }
    PhaseSamples {
        slot: "host",
        phase: "handoff",
        samples,
    }
}
