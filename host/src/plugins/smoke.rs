//! Smoke checks: one call of each of a plugin's functions on the host's synthetic request
//! before it may go live, and the `plugin check` behind the CLI.

use std::sync::Arc;

use super::loader::{LoadError, PluginSource};
use super::registry::*;
use super::runtime::Runtime;
use super::session::*;
use super::{
    Fault, FaultKind, FaultSink, InferenceInput, InputKind, Payload, PluginStatus, Principal,
    RequestMeta, RequestSummary, SMOKE_ID,
};

/// Smoke calls: the host's synthetic request, marked [`SMOKE_ID`]. A fault fails the smoke
/// call; a deadline is retried twice, on a fresh instance, so that one scheduling hiccup on
/// a busy machine does not refuse a good plugin, while a plugin that is always slow fails.
fn smoke(what: &str, call: impl Fn() -> Result<(), Fault>) -> Result<(), String> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        match call() {
            Ok(()) => return Ok(()),
            Err(f) if f.kind == FaultKind::Deadline && attempts < 3 => continue,
            Err(f) => return Err(format!("{what}: {}", f.kind.as_str())),
        }
    }
}

fn smoke_principal() -> Principal {
    Principal {
        id: SMOKE_ID.into(),
        tenant: None,
        scopes: Vec::new(),
    }
}

pub(super) fn smoke_auth(plugin: &AuthLoaded) -> Result<(), String> {
    let meta = RequestMeta {
        request_id: SMOKE_ID.into(),
        method: "GET".into(),
        path: "/v1/models".into(),
        headers: Vec::new(),
        client_addr: None,
    };
    smoke("authenticate", || authenticate(plugin, &meta).map(drop))
}

pub(super) fn smoke_sanitizer(plugin: &SanitizerLoaded) -> Result<(), String> {
    let rid: Arc<str> = SMOKE_ID.into();
    smoke("check-input and output-filter", || {
        let (store, instance) = instance(plugin, Some(&rid))?;
        let mut session = SessionInner::new(rid.clone(), store, instance);
        let input = InferenceInput {
            kind: InputKind::Completion,
            model: SMOKE_ID.into(),
            principal: smoke_principal(),
            payload: Payload::Texts(vec![SMOKE_ID.into()]),
            max_tokens: Some(1),
        };
        let _verdict = session.check_input(plugin, input)?;
        let filter = session.output_filter(plugin, InputKind::Completion)?;
        let _released = session.push(plugin, filter, SMOKE_ID)?;
        let _held = session.finish(plugin, filter)?;
        Ok(())
    })
}

pub(super) fn smoke_metrics(plugin: &MetricsLoaded) -> Result<(), String> {
    let rid: Arc<str> = SMOKE_ID.into();
    let summary = RequestSummary {
        route: SMOKE_ID,
        model: None,
        status: 200,
        tenant: None,
    };
    smoke("labels", || labels(plugin, &summary, &rid).map(drop))?;
    smoke("visible-series", || {
        visible_series(plugin, &smoke_principal(), &rid).map(drop)
    })
}

/// The full validation a swap runs (integrity, component, world and version,
/// configuration, smoke call), offline: nothing goes live.
pub fn check(runtime: &Arc<Runtime>, source: &PluginSource) -> Result<PluginStatus, LoadError> {
    #[derive(Debug)]
    struct Nowhere;
    impl FaultSink for Nowhere {
        fn fault(&self, _: &Fault) {}
    }
    AnyLoaded::load(runtime, source, Arc::new(Nowhere), None).map(|p| p.status(false))
}
