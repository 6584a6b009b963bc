//! The live plugin set, swapped atomically.
//!
//! A request takes one snapshot ([`Registry::current`]) and uses it to the end, so a swap
//! never changes the plugins under a request in flight. A new set is loaded and validated
//! off to the side first; a failure leaves the old set live.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use arc_swap::ArcSwap;
use wasmtime::Store;
use wasmtime::component::ResourceAny;

use super::bindings::{
    self, AuthPluginPre, MetricsPolicyPluginPre, SanitizerPlugin, SanitizerPluginPre, WitVerdict,
    World,
};
use super::loader::{LoadError, Loaded, PluginSource};
use super::runtime::{self, DiskCache, PluginState};
use super::{
    ALLOWED_LABELS, FailurePolicy, Fault, FaultKind, FaultSink, InferenceInput, InputKind, Limits,
    Payload, PluginStatus, Principal, Refusal, RequestMeta, RequestSummary, SMOKE_ID, Slot,
    Visibility, WIT_VERSION,
};

/// Longest label value kept.
const MAX_LABEL_VALUE: usize = 64;

/// One plugin per slot.
pub struct PluginSet {
    pub(super) auth: Arc<Loaded<AuthPluginPre<PluginState>>>,
    pub(super) sanitizer: Arc<Loaded<SanitizerPluginPre<PluginState>>>,
    pub(super) metrics: Arc<Loaded<MetricsPolicyPluginPre<PluginState>>>,
}

impl std::fmt::Debug for PluginSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.describe()).finish()
    }
}

/// A refusal the host can pass on: a 4xx status, a code of 1-64 of `[A-Za-z0-9_.-]`, and a
/// message of at most 4 KiB without control characters other than tab and line feed.
fn valid_refusal(r: &Refusal) -> bool {
    (400..=499).contains(&r.status)
        && valid_code(&r.code)
        && r.message.len() <= 4096
        && !r
            .message
            .chars()
            .any(|c| c.is_control() && !matches!(c, '\t' | '\n'))
}

/// A machine-readable code: 1-64 of `[A-Za-z0-9_.-]`.
pub(crate) fn valid_code(code: &str) -> bool {
    !code.is_empty()
        && code.len() <= 64
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Text that may reach a log line or a metrics label: not empty, at most `max` bytes, no
/// control characters.
fn printable(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control)
}

/// Most scopes one principal may carry.
const MAX_SCOPES: usize = 64;

fn valid_principal(p: &Principal) -> bool {
    printable(&p.id, 256)
        && p.tenant
            .as_deref()
            .is_none_or(|t| printable(t, MAX_LABEL_VALUE))
        && p.scopes.len() <= MAX_SCOPES
        && p.scopes.iter().all(|s| printable(s, 256))
}

/// A label value a policy returned: at most [`MAX_LABEL_VALUE`] bytes (longer ones are cut)
/// and no control characters (the exposition escapes the rest).
fn label_value_ok(value: &str) -> bool {
    !value.chars().any(char::is_control)
}

impl PluginSet {
    /// Load all three slots.
    pub fn load(
        auth: &PluginSource,
        sanitizer: &PluginSource,
        metrics: &PluginSource,
        sink: Arc<dyn FaultSink>,
        cache: Option<&DiskCache>,
    ) -> Result<Self, LoadError> {
        for (source, slot) in [
            (auth, Slot::Auth),
            (sanitizer, Slot::Sanitizer),
            (metrics, Slot::MetricsPolicy),
        ] {
            if source.slot != slot {
                return Err(LoadError::Runtime(format!(
                    "a {} plugin was given for the {slot} slot",
                    source.slot
                )));
            }
        }
        Ok(Self {
            auth: Arc::new(Loaded::load(auth, sink.clone(), cache, smoke_auth)?),
            sanitizer: Arc::new(Loaded::load(
                sanitizer,
                sink.clone(),
                cache,
                smoke_sanitizer,
            )?),
            metrics: Arc::new(Loaded::load(metrics, sink, cache, smoke_metrics)?),
        })
    }

    /// The plugin in `slot`.
    fn get(&self, slot: Slot) -> AnyLoaded {
        match slot {
            Slot::Auth => AnyLoaded::Auth(self.auth.clone()),
            Slot::Sanitizer => AnyLoaded::Sanitizer(self.sanitizer.clone()),
            Slot::MetricsPolicy => AnyLoaded::Metrics(self.metrics.clone()),
        }
    }

    /// This set with `plugin` in its slot.
    fn with(&self, plugin: AnyLoaded) -> Self {
        let mut next = Self {
            auth: self.auth.clone(),
            sanitizer: self.sanitizer.clone(),
            metrics: self.metrics.clone(),
        };
        match plugin {
            AnyLoaded::Auth(p) => next.auth = p,
            AnyLoaded::Sanitizer(p) => next.sanitizer = p,
            AnyLoaded::Metrics(p) => next.metrics = p,
        }
        next
    }

    /// Each slot's plugin, as operators see it.
    pub fn describe(&self) -> Vec<PluginStatus> {
        Slot::ALL
            .iter()
            .map(|&slot| self.get(slot).status(false))
            .collect()
    }

    /// Ask the auth plugin who sent the request.
    pub async fn authenticate(
        self: &Arc<Self>,
        meta: &RequestMeta,
    ) -> Result<Result<Principal, Refusal>, Fault> {
        let plugin = self.auth.clone();
        let meta = meta.clone();
        let rid = meta.request_id.clone();
        call(&self.auth, Some(&rid), 0, move || {
            authenticate(&plugin, &meta)
        })
        .await
    }

    /// Start a sanitizer session for one request: one instance that checks the input and
    /// then filters that request's output, and nothing else.
    pub async fn sanitizer_session(
        &self,
        request_id: &Arc<str>,
    ) -> Result<SanitizerSession, Fault> {
        let plugin = self.sanitizer.clone();
        let rid = request_id.clone();
        let inner = call(&self.sanitizer, Some(request_id), 0, move || {
            let (store, instance) = instance(&plugin, Some(&rid))?;
            Ok(SessionInner::new(rid, store, instance))
        })
        .await?;
        Ok(SanitizerSession {
            plugin: self.sanitizer.clone(),
            request_id: request_id.clone(),
            inner: Arc::new(Mutex::new(inner)),
        })
    }

    /// The labels a finished request is recorded under. On a fault the caller should fall
    /// back to `route` and `status_class` (the policy fails open for recording).
    pub async fn labels(
        self: &Arc<Self>,
        summary: &RequestSummary,
        request_id: &Arc<str>,
    ) -> Result<Vec<(String, String)>, Fault> {
        let plugin = self.metrics.clone();
        let summary = summary.clone();
        let rid = request_id.clone();
        call(&self.metrics, Some(request_id), 0, move || {
            labels(&plugin, &summary, &rid)
        })
        .await
    }

    /// What the metrics policy asks for when its `labels` call faults.
    pub fn metrics_failure(&self) -> FailurePolicy {
        self.metrics.failure
    }

    /// Which series `caller` may read. Fails closed: a fault means nothing.
    pub async fn visible_series(
        self: &Arc<Self>,
        caller: &Principal,
        request_id: &Arc<str>,
    ) -> Visibility {
        let plugin = self.metrics.clone();
        let caller = caller.clone();
        let rid = request_id.clone();
        call(&self.metrics, Some(request_id), 0, move || {
            visible_series(&plugin, &caller, &rid)
        })
        .await
        .unwrap_or(Visibility::Nothing)
    }
}

type AuthLoaded = Loaded<AuthPluginPre<PluginState>>;
type SanitizerLoaded = Loaded<SanitizerPluginPre<PluginState>>;
type MetricsLoaded = Loaded<MetricsPolicyPluginPre<PluginState>>;

fn authenticate(
    plugin: &AuthLoaded,
    meta: &RequestMeta,
) -> Result<Result<Principal, Refusal>, Fault> {
    let rid = Some(&meta.request_id);
    let (mut store, instance) = instance(plugin, rid)?;
    let result = bindings::call_authenticate(&instance, &mut store, meta);
    let result = on_time(plugin, &store, rid, result)?;
    match result {
        Ok(p) => {
            let p = bindings::principal_from(p);
            if valid_principal(&p) {
                Ok(Ok(p))
            } else {
                Err(plugin.fault(FaultKind::Malformed, rid))
            }
        }
        Err(r) => {
            let r = bindings::refusal_from(r);
            if valid_refusal(&r) {
                Ok(Err(r))
            } else {
                Err(plugin.fault(FaultKind::Malformed, rid))
            }
        }
    }
}

fn labels(
    plugin: &MetricsLoaded,
    summary: &RequestSummary,
    request_id: &Arc<str>,
) -> Result<Vec<(String, String)>, Fault> {
    let rid = Some(request_id);
    let (mut store, instance) = instance(plugin, rid)?;
    let labels = bindings::call_labels(&instance, &mut store, summary);
    let mut labels = on_time(plugin, &store, rid, labels)?;
    let mut seen = Vec::with_capacity(labels.len());
    for (name, value) in &mut labels {
        if !ALLOWED_LABELS.contains(&name.as_str()) || seen.contains(name) {
            return Err(plugin.fault(FaultKind::Malformed, rid));
        }
        if !label_value_ok(value) {
            return Err(plugin.fault(FaultKind::Malformed, rid));
        }
        seen.push(name.clone());
        truncate(value, MAX_LABEL_VALUE);
    }
    Ok(labels)
}

fn visible_series(
    plugin: &MetricsLoaded,
    caller: &Principal,
    request_id: &Arc<str>,
) -> Result<Visibility, Fault> {
    let rid = Some(request_id);
    let (mut store, instance) = instance(plugin, rid)?;
    let visibility = bindings::call_visible_series(&instance, &mut store, caller);
    let visibility = on_time(plugin, &store, rid, visibility)?;
    match &visibility {
        Visibility::Matching(labels)
            if labels.len() > ALLOWED_LABELS.len()
                || labels.iter().any(|(n, v)| {
                    !ALLOWED_LABELS.contains(&n.as_str())
                        || !label_value_ok(v)
                        || v.len() > MAX_LABEL_VALUE
                }) =>
        {
            Err(plugin.fault(FaultKind::Malformed, rid))
        }
        _ => Ok(visibility),
    }
}

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

fn smoke_auth(plugin: &AuthLoaded) -> Result<(), String> {
    let meta = RequestMeta {
        request_id: SMOKE_ID.into(),
        method: "GET".into(),
        path: "/v1/models".into(),
        headers: Vec::new(),
        client_addr: None,
    };
    smoke("authenticate", || authenticate(plugin, &meta).map(drop))
}

fn smoke_sanitizer(plugin: &SanitizerLoaded) -> Result<(), String> {
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

fn smoke_metrics(plugin: &MetricsLoaded) -> Result<(), String> {
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
pub fn check(source: &PluginSource) -> Result<PluginStatus, LoadError> {
    #[derive(Debug)]
    struct Nowhere;
    impl FaultSink for Nowhere {
        fn fault(&self, _: &Fault) {}
    }
    AnyLoaded::load(source, Arc::new(Nowhere), None).map(|p| p.status(false))
}

/// A loaded plugin of any slot.
#[derive(Clone)]
enum AnyLoaded {
    Auth(Arc<AuthLoaded>),
    Sanitizer(Arc<SanitizerLoaded>),
    Metrics(Arc<MetricsLoaded>),
}

fn status_of<W>(l: &Loaded<W>, rollback_available: bool) -> PluginStatus {
    PluginStatus {
        slot: l.slot,
        plugin: l.name.to_string(),
        world: format!("warden:policy/{}", l.slot.world()),
        wit_version: WIT_VERSION,
        sha256: l.sha256.clone(),
        loaded_at: l
            .loaded_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        calls: l.stats.calls.load(Ordering::Relaxed),
        faults: l.stats.faults.load(Ordering::Relaxed),
        deadline_ms: u64::try_from(l.limits.deadline.as_millis()).unwrap_or(u64::MAX),
        deadline_ms_per_mib: u64::try_from(l.limits.deadline_per_mib.as_millis())
            .unwrap_or(u64::MAX),
        memory_mib: (l.limits.memory_bytes >> 20) as u64,
        failure: l.failure,
        rollback_available,
    }
}

impl AnyLoaded {
    fn load(
        source: &PluginSource,
        sink: Arc<dyn FaultSink>,
        cache: Option<&DiskCache>,
    ) -> Result<Self, LoadError> {
        Ok(match source.slot {
            Slot::Auth => Self::Auth(Arc::new(Loaded::load(source, sink, cache, smoke_auth)?)),
            Slot::Sanitizer => Self::Sanitizer(Arc::new(Loaded::load(
                source,
                sink,
                cache,
                smoke_sanitizer,
            )?)),
            Slot::MetricsPolicy => {
                Self::Metrics(Arc::new(Loaded::load(source, sink, cache, smoke_metrics)?))
            }
        })
    }

    fn status(&self, rollback_available: bool) -> PluginStatus {
        match self {
            Self::Auth(l) => status_of(l, rollback_available),
            Self::Sanitizer(l) => status_of(l, rollback_available),
            Self::Metrics(l) => status_of(l, rollback_available),
        }
    }

    fn same_as(&self, source: &PluginSource) -> bool {
        match self {
            Self::Auth(l) => l.same_as(source),
            Self::Sanitizer(l) => l.same_as(source),
            Self::Metrics(l) => l.same_as(source),
        }
    }

    fn settings(&self) -> (String, Limits, FailurePolicy) {
        fn of<W>(l: &Loaded<W>) -> (String, Limits, FailurePolicy) {
            (l.config.clone(), l.limits, l.failure)
        }
        match self {
            Self::Auth(l) => of(l),
            Self::Sanitizer(l) => of(l),
            Self::Metrics(l) => of(l),
        }
    }

    fn sha256(&self) -> &str {
        match self {
            Self::Auth(l) => &l.sha256,
            Self::Sanitizer(l) => &l.sha256,
            Self::Metrics(l) => &l.sha256,
        }
    }
}

/// Client text above which a call runs on a plugin thread rather than the caller's (about
/// a millisecond of the reference sanitizer's input check; see [`call`]).
const INLINE_MAX_BYTES: usize = 32 << 10;

/// Run `f`, a plugin call handed `bytes` of client text; a call that is lost is a fault of
/// `loaded`.
///
/// A call runs on the caller's thread, a tokio worker included: nothing a plugin can reach
/// waits (`wasi.rs`), and the deadline bounds how long it can hold the thread, so the only
/// cost of a call is the plugin's own work. A call given more than [`INLINE_MAX_BYTES`]
/// (a large input check, whose budget grows with its size) goes to a plugin thread
/// instead, so that a long scan does not hold up the connections that share the worker.
/// A panic on the host side of a call fails the call, not the caller.
async fn call<W: World, R, F>(
    loaded: &Loaded<W>,
    request_id: Option<&Arc<str>>,
    bytes: usize,
    f: F,
) -> Result<R, Fault>
where
    F: FnOnce() -> Result<R, Fault> + Send + 'static,
    R: Send + 'static,
{
    loaded.stats.calls.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let ran = if bytes > INLINE_MAX_BYTES {
        runtime::call(f).await
    } else {
        runtime::inline(f)
    };
    let result = match ran {
        Ok(result) => result,
        Err(lost) => Err(loaded.fault(lost.kind(), request_id)),
    };
    loaded.sink.call_duration(loaded.slot, started.elapsed());
    result
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// A call's result, unless it came back after its deadline: a late answer is a deadline
/// fault whatever it says.
fn on_time<W: World, R>(
    plugin: &Loaded<W>,
    store: &Store<PluginState>,
    request_id: Option<&Arc<str>>,
    result: wasmtime::Result<R>,
) -> Result<R, Fault> {
    match result {
        Ok(_) if runtime::late(store) => Err(plugin.fault(FaultKind::Deadline, request_id)),
        Ok(r) => Ok(r),
        Err(e) => Err(plugin.fault(runtime::classify(store, &e), request_id)),
    }
}

fn instance<W: World>(
    loaded: &Loaded<W>,
    request_id: Option<&Arc<str>>,
) -> Result<(Store<PluginState>, W::Instance), Fault> {
    loaded
        .instance(request_id)
        .map_err(|e| e.into_fault(loaded, request_id))
}

/// One request's sanitizer instance. It lives as long as the request (input check, then
/// the output filters of its responses) and serves no other request.
pub struct SanitizerSession {
    plugin: Arc<Loaded<SanitizerPluginPre<PluginState>>>,
    request_id: Arc<str>,
    inner: Arc<Mutex<SessionInner>>,
}

pub(super) struct SessionInner {
    request_id: Arc<str>,
    store: Store<PluginState>,
    instance: SanitizerPlugin,
    /// Generated text fed to this session's output filters, and text they released.
    fed: usize,
    released: usize,
}

/// An output filter may release at most this many times what it was fed, plus
/// [`RELEASE_SLACK`] bytes: room for placeholders longer than what they replace, never a
/// way to turn a short answer into megabytes.
const RELEASE_FACTOR: usize = 4;
/// See [`RELEASE_FACTOR`].
const RELEASE_SLACK: usize = 4096;

/// A sanitizer's verdict on an input it accepts, with the payload to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// The input as the client sent it.
    Unchanged(Payload),
    /// The plugin's rewrite, of the same shape.
    Rewritten(Payload),
}

impl Checked {
    /// The payload to serve.
    pub fn into_payload(self) -> Payload {
        match self {
            Checked::Unchanged(p) | Checked::Rewritten(p) => p,
        }
    }
}

/// An output filter living in a [`SanitizerSession`].
#[derive(Debug, Clone, Copy)]
pub struct OutputFilter(ResourceAny);

fn same_shape(before: &Payload, after: &Payload) -> bool {
    match (before, after) {
        (Payload::Texts(a), Payload::Texts(b)) => a.len() == b.len(),
        (Payload::Messages(a), Payload::Messages(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.role == y.role)
        }
        _ => false,
    }
}

impl SanitizerSession {
    /// Run `f`, a call given `bytes` of client text, against the session's store.
    async fn run<R, F>(&self, bytes: usize, f: F) -> Result<R, Fault>
    where
        F: FnOnce(&mut SessionInner, &SanitizerLoaded) -> Result<R, Fault> + Send + 'static,
        R: Send + 'static,
    {
        let inner = self.inner.clone();
        let plugin = self.plugin.clone();
        let rid = self.request_id.clone();
        call(&self.plugin, Some(&self.request_id), bytes, move || {
            // A store that saw a host panic is not used again.
            let mut guard = inner
                .lock()
                .map_err(|_| plugin.fault(FaultKind::Trap, Some(&rid)))?;
            f(&mut guard, &plugin)
        })
        .await
    }

    /// Check the input. Returns the payload to use: the input's own, or the plugin's
    /// rewrite (which must keep the input's shape).
    pub async fn check_input(
        &self,
        input: InferenceInput,
    ) -> Result<Result<Checked, Refusal>, Fault> {
        self.run(input.payload.text_bytes(), move |s, p| {
            s.check_input(p, input)
        })
        .await
    }

    /// Create an output filter for one response of this request.
    pub async fn output_filter(&self, kind: InputKind) -> Result<OutputFilter, Fault> {
        self.run(0, move |s, p| s.output_filter(p, kind)).await
    }

    /// Feed generated text; returns what may be released.
    pub async fn push(
        &self,
        filter: OutputFilter,
        chunk: String,
    ) -> Result<Result<String, Refusal>, Fault> {
        self.run(chunk.len(), move |s, p| s.push(p, filter, &chunk))
            .await
    }

    /// End of generation; returns what was held back.
    pub async fn finish(&self, filter: OutputFilter) -> Result<Result<String, Refusal>, Fault> {
        self.run(0, move |s, p| s.finish(p, filter)).await
    }
}

impl SessionInner {
    pub(super) fn new(
        request_id: Arc<str>,
        store: Store<PluginState>,
        instance: SanitizerPlugin,
    ) -> Self {
        Self {
            request_id,
            store,
            instance,
            fed: 0,
            released: 0,
        }
    }

    /// Count `text` as released; a filter that releases far more than it was fed is
    /// malformed.
    fn release(&mut self, plugin: &SanitizerLoaded, text: String) -> Result<String, Fault> {
        self.released = self.released.saturating_add(text.len());
        let allowed = self
            .fed
            .saturating_mul(RELEASE_FACTOR)
            .saturating_add(RELEASE_SLACK);
        if self.released > allowed {
            return Err(plugin.fault(FaultKind::Malformed, Some(&self.request_id)));
        }
        Ok(text)
    }

    fn on_time<R>(
        &self,
        plugin: &SanitizerLoaded,
        result: wasmtime::Result<R>,
    ) -> Result<R, Fault> {
        on_time(plugin, &self.store, Some(&self.request_id), result)
    }

    fn refusal(
        &self,
        plugin: &SanitizerLoaded,
        r: bindings::auth::warden::policy::types::Refusal,
    ) -> Result<Refusal, Fault> {
        let r = bindings::refusal_from(r);
        if valid_refusal(&r) {
            Ok(r)
        } else {
            Err(plugin.fault(FaultKind::Malformed, Some(&self.request_id)))
        }
    }

    pub(super) fn check_input(
        &mut self,
        plugin: &SanitizerLoaded,
        input: InferenceInput,
    ) -> Result<Result<Checked, Refusal>, Fault> {
        runtime::arm(&mut self.store, plugin.limits, input.payload.text_bytes());
        let (payload, result) = bindings::call_check_input(&self.instance, &mut self.store, input);
        let result = self.on_time(plugin, result)?;
        match result {
            Ok(WitVerdict::Pass) => Ok(Ok(Checked::Unchanged(payload))),
            Ok(WitVerdict::Rewrite(p)) => {
                let p = bindings::payload_from(p);
                if same_shape(&payload, &p) {
                    Ok(Ok(Checked::Rewritten(p)))
                } else {
                    Err(plugin.fault(FaultKind::Malformed, Some(&self.request_id)))
                }
            }
            Err(r) => Ok(Err(self.refusal(plugin, r)?)),
        }
    }

    pub(super) fn output_filter(
        &mut self,
        plugin: &SanitizerLoaded,
        kind: InputKind,
    ) -> Result<OutputFilter, Fault> {
        runtime::arm(&mut self.store, plugin.limits, 0);
        let api = bindings::sanitizer_filter(&self.instance);
        let made = api.call_constructor(&mut self.store, bindings::kind_to(kind));
        self.on_time(plugin, made).map(OutputFilter)
    }

    pub(super) fn push(
        &mut self,
        plugin: &SanitizerLoaded,
        filter: OutputFilter,
        chunk: &str,
    ) -> Result<Result<String, Refusal>, Fault> {
        runtime::arm(&mut self.store, plugin.limits, chunk.len());
        let api = bindings::sanitizer_filter(&self.instance);
        self.fed = self.fed.saturating_add(chunk.len());
        let pushed = api.call_push(&mut self.store, filter.0, chunk);
        match self.on_time(plugin, pushed)? {
            Ok(text) => Ok(Ok(self.release(plugin, text)?)),
            Err(r) => Ok(Err(self.refusal(plugin, r)?)),
        }
    }

    pub(super) fn finish(
        &mut self,
        plugin: &SanitizerLoaded,
        filter: OutputFilter,
    ) -> Result<Result<String, Refusal>, Fault> {
        runtime::arm(&mut self.store, plugin.limits, 0);
        let api = bindings::sanitizer_filter(&self.instance);
        let finished = api.call_finish(&mut self.store, filter.0);
        match self.on_time(plugin, finished)? {
            Ok(text) => Ok(Ok(self.release(plugin, text)?)),
            Err(r) => Ok(Err(self.refusal(plugin, r)?)),
        }
    }
}

/// What set a plugin change in motion; recorded in every audit event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// `PUT /admin/plugins/{slot}`.
    Admin,
    /// `POST /admin/plugins/{slot}/rollback`.
    Rollback,
    /// `POST /admin/reload`.
    Reload,
    /// `SIGHUP`.
    Sighup,
    /// A call from the embedding program (tests, tools).
    Api,
}

impl Trigger {
    /// The trigger's name in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Admin => "admin",
            Trigger::Rollback => "rollback",
            Trigger::Reload => "reload",
            Trigger::Sighup => "sighup",
            Trigger::Api => "api",
        }
    }
}

/// What became of a requested change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The new plugin is live.
    Accepted,
    /// Refused; the old plugin stays live.
    Refused,
    /// The requested plugin is the live one (same bytes, configuration and bounds).
    Unchanged,
}

impl Outcome {
    /// The outcome's name in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Refused => "refused",
            Outcome::Unchanged => "unchanged",
        }
    }
}

/// One change to a slot, accepted or refused.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AuditEvent {
    /// Unix time, milliseconds.
    pub at_ms: u64,
    /// Slot.
    pub slot: Slot,
    /// What asked for the change.
    pub trigger: Trigger,
    /// What became of it.
    pub outcome: Outcome,
    /// The plugin asked for (name).
    pub plugin: String,
    /// The live plugin's sha256 before the change.
    pub old_sha256: String,
    /// The sha256 of the plugin asked for, when its bytes were read.
    pub new_sha256: Option<String>,
    /// Why it was refused.
    pub reason: Option<String>,
    /// How long validation and the swap took, milliseconds.
    pub took_ms: f64,
}

/// Most audit events kept in memory (the log and the audit file keep them all).
pub const AUDIT_EVENTS_KEPT: usize = 256;

/// The audit file: one JSON object per line, appended and flushed to disk for every
/// change, readable by its owner only.
pub struct AuditLog {
    file: Mutex<std::fs::File>,
    name: String,
}

impl AuditLog {
    /// Open (creating it with mode 0600) the audit file at `path` for appending. Called
    /// at start, before the server listens, so that an audit trail that cannot be written
    /// stops the start with this error rather than losing events later.
    pub fn open(path: &Path) -> Result<Self, String> {
        let name = super::file_name(path);
        let io = |e: std::io::Error| format!("audit log {name}: {}", e.kind());
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.append(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(path).map_err(io)?;
        Ok(Self {
            file: Mutex::new(file),
            name,
        })
    }

    /// Append `event` and flush it to disk; a failure is logged as an error.
    fn append(&self, event: &AuditEvent) {
        let mut line = serde_json::to_vec(event).unwrap_or_default();
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let written = std::io::Write::write_all(&mut *file, &line).and_then(|()| file.sync_data());
        if let Err(e) = written {
            tracing::error!(file = %self.name, error = %e.kind(), "cannot append to the audit log");
        }
    }
}

/// Rollback targets: each slot's previous plugin.
#[derive(Default)]
struct Previous {
    slots: [Option<AnyLoaded>; 3],
}

impl Previous {
    fn slot(&mut self, slot: Slot) -> &mut Option<AnyLoaded> {
        &mut self.slots[slot.index()]
    }
}

/// The live plugin set, its rollback targets and its audit trail.
pub struct Registry {
    current: ArcSwap<PluginSet>,
    sink: Arc<dyn FaultSink>,
    cache: Option<DiskCache>,
    /// Held for the whole of a change, so changes apply one at a time; requests never
    /// take it.
    previous: Mutex<Previous>,
    audit: Mutex<VecDeque<AuditEvent>>,
    audit_log: Option<AuditLog>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("current", &*self.current.load())
            .finish()
    }
}

/// Tell `sink` which plugins are live, so their fault counters exist at zero.
fn announce(sink: &dyn FaultSink, set: &PluginSet) {
    for status in set.describe() {
        sink.plugin_live(status.slot, &status.plugin);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Registry {
    /// A registry serving `set`; new plugins are compiled through `cache`.
    pub fn new(set: PluginSet, sink: Arc<dyn FaultSink>, cache: Option<DiskCache>) -> Self {
        announce(&*sink, &set);
        Self {
            current: ArcSwap::from_pointee(set),
            sink,
            cache,
            previous: Mutex::new(Previous::default()),
            audit: Mutex::new(VecDeque::with_capacity(AUDIT_EVENTS_KEPT)),
            audit_log: None,
        }
    }

    /// Also append every audit event to `log`.
    pub fn with_audit_log(mut self, log: Option<AuditLog>) -> Self {
        self.audit_log = log;
        self
    }

    /// The set a new request should use, for the whole of that request.
    pub fn current(&self) -> Arc<PluginSet> {
        self.current.load_full()
    }

    fn lock_previous(&self) -> MutexGuard<'_, Previous> {
        self.previous.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Each slot's live plugin, as operators see it.
    pub fn status(&self) -> Vec<PluginStatus> {
        let mut previous = self.lock_previous();
        let live = self.current();
        Slot::ALL
            .iter()
            .map(|&slot| live.get(slot).status(previous.slot(slot).is_some()))
            .collect()
    }

    /// The most recent audit events, oldest first.
    pub fn audit_events(&self) -> Vec<AuditEvent> {
        self.audit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    fn record(&self, event: AuditEvent) {
        let AuditEvent {
            slot,
            trigger,
            outcome,
            ..
        } = event;
        tracing::info!(
            target: "warden::audit",
            slot = slot.as_str(),
            trigger = trigger.as_str(),
            outcome = outcome.as_str(),
            plugin = %event.plugin,
            old_sha256 = %event.old_sha256,
            new_sha256 = event.new_sha256.as_deref().unwrap_or("-"),
            reason = event.reason.as_deref().unwrap_or("-"),
            took_ms = event.took_ms,
            "plugin change"
        );
        self.sink.swap(slot, trigger, outcome);
        if let Some(log) = &self.audit_log {
            log.append(&event);
        }
        let mut audit = self.audit.lock().unwrap_or_else(|e| e.into_inner());
        if audit.len() == AUDIT_EVENTS_KEPT {
            audit.pop_front();
        }
        audit.push_back(event);
    }

    /// A source for `slot` with these bytes that keeps the live plugin's configuration
    /// (unless `config` is given), bounds and failure policy.
    pub fn source_for(
        &self,
        slot: Slot,
        name: String,
        bytes: Arc<[u8]>,
        expected_sha256: Option<String>,
        config: Option<String>,
    ) -> PluginSource {
        let (live_config, limits, failure) = self.current().get(slot).settings();
        PluginSource {
            slot,
            name,
            bytes,
            expected_sha256,
            config: config.unwrap_or(live_config),
            limits,
            failure,
        }
    }

    /// Load `source` beside the live set and, if it validates, make it live in its slot.
    /// On error the live set is untouched. Recorded as an audit event with trigger `api`.
    pub fn replace(&self, source: &PluginSource) -> Result<PluginStatus, LoadError> {
        self.apply(std::slice::from_ref(source), Trigger::Api)
            .map(|mut s| s.remove(0))
    }

    /// The one path every change takes (admin API, reload, signal): validate each source
    /// off to the side, then make all of them live in one atomic swap, or none of them.
    /// A source identical to its slot's live plugin is left alone. Requests in flight keep
    /// the set they started with. Returns the status of each named slot.
    pub fn apply(
        &self,
        sources: &[PluginSource],
        trigger: Trigger,
    ) -> Result<Vec<PluginStatus>, LoadError> {
        let mut previous = self.lock_previous();
        let live = self.current();
        let mut next: Option<PluginSet> = None;
        let mut events = Vec::new();
        for source in sources {
            let started = Instant::now();
            let old = live.get(source.slot);
            let mut event = AuditEvent {
                at_ms: now_ms(),
                slot: source.slot,
                trigger,
                outcome: Outcome::Accepted,
                plugin: source.name.clone(),
                old_sha256: old.sha256().to_string(),
                new_sha256: Some(hex::encode(Sha256::digest(&source.bytes))),
                reason: None,
                took_ms: 0.0,
            };
            // Integrity first: an identical plugin is left alone only if it is the one pinned.
            let loaded = source.verify().and_then(|_| {
                if old.same_as(source) {
                    Ok(None)
                } else {
                    AnyLoaded::load(source, self.sink.clone(), self.cache.as_ref()).map(Some)
                }
            });
            match loaded {
                Ok(None) => {
                    event.outcome = Outcome::Unchanged;
                    events.push(event);
                }
                Ok(Some(plugin)) => {
                    event.took_ms = started.elapsed().as_secs_f64() * 1e3;
                    events.push(event);
                    next = Some(next.as_ref().unwrap_or(&live).with(plugin));
                }
                Err(e) => {
                    event.outcome = Outcome::Refused;
                    event.reason = Some(e.to_string());
                    event.took_ms = started.elapsed().as_secs_f64() * 1e3;
                    // The others in this change were valid but do not go live either.
                    for other in &mut events {
                        if other.outcome == Outcome::Accepted {
                            other.outcome = Outcome::Refused;
                            other.reason = Some(format!("refused with the {} plugin", source.slot));
                        }
                    }
                    events.push(event);
                    for event in events {
                        self.record(event);
                    }
                    return Err(e);
                }
            }
        }
        if let Some(next) = next {
            for event in &events {
                if event.outcome == Outcome::Accepted {
                    *previous.slot(event.slot) = Some(live.get(event.slot));
                }
            }
            announce(&*self.sink, &next);
            self.current.store(Arc::new(next));
        }
        for event in events {
            self.record(event);
        }
        let live = self.current();
        Ok(sources
            .iter()
            .map(|s| live.get(s.slot).status(previous.slot(s.slot).is_some()))
            .collect())
    }

    /// Put `slot`'s previous plugin back (the one it replaces becomes the new rollback
    /// target, so a second rollback undoes the first).
    pub fn rollback(&self, slot: Slot, trigger: Trigger) -> Result<PluginStatus, LoadError> {
        let mut previous = self.lock_previous();
        let live = self.current();
        let old = live.get(slot);
        let mut event = AuditEvent {
            at_ms: now_ms(),
            slot,
            trigger,
            outcome: Outcome::Accepted,
            plugin: String::new(),
            old_sha256: old.sha256().to_string(),
            new_sha256: None,
            reason: None,
            took_ms: 0.0,
        };
        let Some(target) = previous.slot(slot).take() else {
            let e = LoadError::NoRollback { slot };
            event.outcome = Outcome::Refused;
            event.reason = Some(e.to_string());
            event.plugin = old.status(false).plugin;
            self.record(event);
            return Err(e);
        };
        let status = target.status(true);
        event.plugin = status.plugin.clone();
        event.new_sha256 = Some(status.sha256.clone());
        let next = live.with(target);
        announce(&*self.sink, &next);
        self.current.store(Arc::new(next));
        *previous.slot(slot) = Some(old);
        self.record(event);
        Ok(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(status: u16, code: &str, message: &str) -> Refusal {
        Refusal {
            status,
            code: code.into(),
            message: message.into(),
        }
    }

    #[test]
    fn only_well_formed_refusals_pass() {
        assert!(valid_refusal(&refusal(
            401,
            "invalid_api_key",
            "no\tsuch\nkey"
        )));
        assert!(valid_refusal(&refusal(499, "a.b-c_9", "")));
        for bad in [
            refusal(200, "ok", ""),
            refusal(399, "x", ""),
            refusal(500, "x", ""),
            refusal(400, "", ""),
            refusal(400, "two words", ""),
            refusal(400, "new\nline", ""),
            refusal(400, &"c".repeat(65), ""),
            refusal(400, "x", &"m".repeat(4097)),
            refusal(400, "x", "escape \u{1b}[2J"),
            refusal(400, "x", "nul \0"),
        ] {
            assert!(!valid_refusal(&bad), "{bad:?}");
        }
    }

    #[test]
    fn principals_are_bounded_and_printable() {
        let ok = Principal {
            id: "key-1".into(),
            tenant: Some("acme".into()),
            scopes: vec!["inference".into()],
        };
        assert!(valid_principal(&ok));
        let with = |f: &dyn Fn(&mut Principal)| {
            let mut p = ok.clone();
            f(&mut p);
            valid_principal(&p)
        };
        assert!(!with(&|p| p.id = String::new()));
        assert!(!with(&|p| p.id = "i".repeat(257)));
        assert!(!with(&|p| p.id = "a\nb".into()));
        assert!(!with(&|p| p.tenant = Some("x\"} 1\nforged 1".into())));
        assert!(!with(&|p| p.tenant = Some("t".repeat(MAX_LABEL_VALUE + 1))));
        assert!(!with(&|p| p.scopes = vec!["s".into(); MAX_SCOPES + 1]));
        assert!(!with(&|p| p.scopes = vec![String::new()]));
        // Quotes and braces are fine: the exposition escapes them.
        assert!(with(&|p| p.tenant = Some("x\"} 1".into())));
    }
}
