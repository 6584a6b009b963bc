//! Smoke checks: one call of each of a plugin's functions on the host's synthetic request
//! before it may go live; and the offline tools behind the CLI, `plugin check` and
//! `plugin inspect`.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::loader::{LoadError, PluginSource, version_served};
use super::registry::*;
use super::runtime::Runtime;
use super::session::*;
use super::{
    Fault, FaultKind, FaultSink, InferenceInput, InputKind, Payload, PluginStatus, Principal,
    RequestMeta, RequestSummary, SMOKE_ID, Slot,
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

/// What `warden plugin inspect` shows of a component.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Inspection {
    /// Size in bytes.
    pub size: usize,
    /// sha256 (hex).
    pub sha256: String,
    /// The Warden world its exports match, if any (e.g. `warden:policy/auth-plugin`).
    pub world: Option<String>,
    /// The `warden:policy` versions it names.
    pub wit_versions: Vec<String>,
    /// Whether this host serves those versions.
    pub served: bool,
    /// Imported interfaces.
    pub imports: Vec<String>,
    /// Exported interfaces.
    pub exports: Vec<String>,
}

/// Compile `bytes` on `rt` and describe the component, without instantiating it.
pub fn inspect(rt: &Runtime, bytes: &[u8]) -> Result<Inspection, String> {
    let digest: [u8; 32] = Sha256::digest(bytes).into();
    let component = rt
        .compile(digest, bytes, None)
        .map_err(|e| format!("not a valid WebAssembly component: {e}"))?;
    let ty = component.component_type();
    let imports: Vec<String> = ty.imports(&rt.engine).map(|(n, _)| n.to_string()).collect();
    let exports: Vec<String> = ty.exports(&rt.engine).map(|(n, _)| n.to_string()).collect();
    let mut wit_versions: Vec<String> = imports
        .iter()
        .chain(&exports)
        .filter(|n| n.starts_with("warden:policy/"))
        .filter_map(|n| n.split_once('@').map(|(_, v)| v.to_string()))
        .collect();
    wit_versions.sort();
    wit_versions.dedup();
    let world = Slot::ALL.into_iter().find_map(|slot| {
        let interface = format!("warden:policy/{}@", slot.interface());
        exports
            .iter()
            .any(|e| e.starts_with(&interface))
            .then(|| format!("warden:policy/{}", slot.world()))
    });
    Ok(Inspection {
        size: bytes.len(),
        sha256: hex::encode(digest),
        world,
        served: !wit_versions.is_empty() && wit_versions.iter().all(|v| version_served(v)),
        wit_versions,
        imports,
        exports,
    })
}
