//! One snapshot of the live plugins ([`PluginSet`]): the calls a request makes on each
//! slot, the checks of what plugins answer, and the plugins of any slot as one type.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Instant, UNIX_EPOCH};

use wasmtime::Store;

use super::bindings::{self, AuthPluginPre, MetricsPolicyPluginPre, SanitizerPluginPre, World};
use super::cache::DiskCache;
use super::loader::{LoadError, Loaded, PluginSource};
use super::runtime::{self, Runtime};
use super::session::{SanitizerSession, SessionInner};
use super::state::PluginState;
use super::{
    ALLOWED_LABELS, FailurePolicy, Fault, FaultKind, FaultSink, Limits, PluginStatus, Principal,
    Refusal, RequestMeta, RequestSummary, Slot, Visibility, WIT_VERSION,
};

/// Longest label value kept.
pub(super) const MAX_LABEL_VALUE: usize = 64;

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
pub(super) fn valid_refusal(r: &Refusal) -> bool {
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
pub(super) fn printable(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control)
}

/// Most scopes one principal may carry.
const MAX_SCOPES: usize = 64;

pub(super) fn valid_principal(p: &Principal) -> bool {
    printable(&p.id, 256)
        && p.tenant
            .as_deref()
            .is_none_or(|t| printable(t, MAX_LABEL_VALUE))
        && p.scopes.len() <= MAX_SCOPES
        && p.scopes.iter().all(|s| printable(s, 256))
}

/// A label value a policy returned: at most [`MAX_LABEL_VALUE`] bytes (longer ones are cut)
/// and no control characters (the exposition escapes the rest).
pub(super) fn label_value_ok(value: &str) -> bool {
    !value.chars().any(char::is_control)
}

impl PluginSet {
    /// Load all three slots on `runtime`.
    pub fn load(
        runtime: &Arc<Runtime>,
        auth: &PluginSource,
        sanitizer: &PluginSource,
        metrics: &PluginSource,
        sink: Arc<dyn FaultSink>,
        cache: Option<&DiskCache>,
    ) -> Result<Self, LoadError> {
        let sources = [auth, sanitizer, metrics];
        let mut loaded = Vec::with_capacity(sources.len());
        for (source, slot) in sources.into_iter().zip(Slot::ALL) {
            if source.slot != slot {
                return Err(LoadError::Runtime(format!(
                    "a {} plugin was given for the {slot} slot",
                    source.slot
                )));
            }
            loaded.push(AnyLoaded::load(runtime, source, sink.clone(), cache)?);
        }
        Ok(Self::assemble(loaded))
    }

    /// A set of the plugins `parts`, one per slot.
    fn assemble(parts: impl IntoIterator<Item = AnyLoaded>) -> Self {
        let (mut auth, mut sanitizer, mut metrics) = (None, None, None);
        for part in parts {
            match part {
                AnyLoaded::Auth(p) => auth = Some(p),
                AnyLoaded::Sanitizer(p) => sanitizer = Some(p),
                AnyLoaded::Metrics(p) => metrics = Some(p),
            }
        }
        match (auth, sanitizer, metrics) {
            (Some(auth), Some(sanitizer), Some(metrics)) => Self {
                auth,
                sanitizer,
                metrics,
            },
            _ => unreachable!("a plugin set is assembled from one plugin per slot"),
        }
    }

    /// The runtime this set's plugins live on.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.auth.runtime
    }

    /// The plugin in `slot`.
    pub(super) fn get(&self, slot: Slot) -> AnyLoaded {
        match slot {
            Slot::Auth => AnyLoaded::Auth(self.auth.clone()),
            Slot::Sanitizer => AnyLoaded::Sanitizer(self.sanitizer.clone()),
            Slot::MetricsPolicy => AnyLoaded::Metrics(self.metrics.clone()),
        }
    }

    /// This set with `plugin` in its slot.
    pub(super) fn with(&self, plugin: AnyLoaded) -> Self {
        let slot = plugin.slot();
        let mut plugin = Some(plugin);
        Self::assemble(Slot::ALL.map(|s| match s == slot {
            true => plugin.take().unwrap_or_else(|| self.get(s)),
            false => self.get(s),
        }))
    }

    /// Whether `other` holds the same auth plugin, the same load of it: false after any
    /// change of the auth slot (a new plugin, a new configuration, a rollback).
    pub fn same_auth(&self, other: &PluginSet) -> bool {
        Arc::ptr_eq(&self.auth, &other.auth)
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

pub(super) type AuthLoaded = Loaded<AuthPluginPre<PluginState>>;
pub(super) type SanitizerLoaded = Loaded<SanitizerPluginPre<PluginState>>;
pub(super) type MetricsLoaded = Loaded<MetricsPolicyPluginPre<PluginState>>;

pub(super) fn authenticate(
    plugin: &AuthLoaded,
    meta: &RequestMeta,
) -> Result<Result<Principal, Refusal>, Fault> {
    let (mut store, instance) = instance(plugin, Some(&meta.request_id))?;
    authenticate_on(plugin, &mut store, &instance, meta)
}

/// [`authenticate`] on an instance made and configured already.
pub(super) fn authenticate_on(
    plugin: &AuthLoaded,
    store: &mut Store<PluginState>,
    instance: &<AuthPluginPre<PluginState> as World>::Instance,
    meta: &RequestMeta,
) -> Result<Result<Principal, Refusal>, Fault> {
    let rid = Some(&meta.request_id);
    let result = bindings::call_authenticate(instance, store, meta);
    let result = on_time(plugin, store, rid, result)?;
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

pub(super) fn labels(
    plugin: &MetricsLoaded,
    summary: &RequestSummary,
    request_id: &Arc<str>,
) -> Result<Vec<(String, String)>, Fault> {
    let (mut store, instance) = instance(plugin, Some(request_id))?;
    labels_on(plugin, &mut store, &instance, summary, request_id)
}

/// [`labels`] on an instance made and configured already.
pub(super) fn labels_on(
    plugin: &MetricsLoaded,
    store: &mut Store<PluginState>,
    instance: &<MetricsPolicyPluginPre<PluginState> as World>::Instance,
    summary: &RequestSummary,
    request_id: &Arc<str>,
) -> Result<Vec<(String, String)>, Fault> {
    let rid = Some(request_id);
    let labels = bindings::call_labels(instance, store, summary);
    let mut labels = on_time(plugin, store, rid, labels)?;
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

pub(super) fn visible_series(
    plugin: &MetricsLoaded,
    caller: &Principal,
    request_id: &Arc<str>,
) -> Result<Visibility, Fault> {
    let (mut store, instance) = instance(plugin, Some(request_id))?;
    visible_series_on(plugin, &mut store, &instance, caller, request_id)
}

/// [`visible_series`] on an instance made and configured already.
pub(super) fn visible_series_on(
    plugin: &MetricsLoaded,
    store: &mut Store<PluginState>,
    instance: &<MetricsPolicyPluginPre<PluginState> as World>::Instance,
    caller: &Principal,
    request_id: &Arc<str>,
) -> Result<Visibility, Fault> {
    let rid = Some(request_id);
    let visibility = bindings::call_visible_series(instance, store, caller);
    let visibility = on_time(plugin, store, rid, visibility)?;
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

/// A loaded plugin of any slot.
#[derive(Clone)]
pub(super) enum AnyLoaded {
    Auth(Arc<AuthLoaded>),
    Sanitizer(Arc<SanitizerLoaded>),
    Metrics(Arc<MetricsLoaded>),
}

pub(super) fn status_of<W>(l: &Loaded<W>, rollback_available: bool) -> PluginStatus {
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
    pub(super) fn load(
        runtime: &Arc<Runtime>,
        source: &PluginSource,
        sink: Arc<dyn FaultSink>,
        cache: Option<&DiskCache>,
    ) -> Result<Self, LoadError> {
        source.slot.kind().load(runtime, source, sink, cache)
    }

    /// The plugin, whatever its slot's calls.
    fn plugin(&self) -> &dyn Described {
        match self {
            Self::Auth(l) => &**l,
            Self::Sanitizer(l) => &**l,
            Self::Metrics(l) => &**l,
        }
    }

    pub(super) fn slot(&self) -> Slot {
        self.plugin().slot()
    }

    pub(super) fn status(&self, rollback_available: bool) -> PluginStatus {
        self.plugin().status(rollback_available)
    }

    pub(super) fn same_as(&self, source: &PluginSource) -> bool {
        self.plugin().same_as(source)
    }

    pub(super) fn settings(&self) -> (String, Limits, FailurePolicy) {
        self.plugin().settings()
    }

    pub(super) fn sha256(&self) -> &str {
        self.plugin().sha256()
    }
}

/// What the host reads of a loaded plugin of any slot.
trait Described {
    fn slot(&self) -> Slot;
    fn sha256(&self) -> &str;
    fn status(&self, rollback_available: bool) -> PluginStatus;
    fn same_as(&self, source: &PluginSource) -> bool;
    fn settings(&self) -> (String, Limits, FailurePolicy);
}

impl<W: World> Described for Loaded<W> {
    fn slot(&self) -> Slot {
        self.slot
    }

    fn sha256(&self) -> &str {
        &self.sha256
    }

    fn status(&self, rollback_available: bool) -> PluginStatus {
        status_of(self, rollback_available)
    }

    fn same_as(&self, source: &PluginSource) -> bool {
        Loaded::same_as(self, source)
    }

    fn settings(&self) -> (String, Limits, FailurePolicy) {
        (self.config.clone(), self.limits, self.failure)
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
pub(super) async fn call<W: World, R, F>(
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
        runtime::call(&loaded.runtime, f).await
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

pub(super) fn truncate(s: &mut String, max: usize) {
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
pub(super) fn on_time<W: World, R>(
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

pub(super) fn instance<W: World>(
    loaded: &Loaded<W>,
    request_id: Option<&Arc<str>>,
) -> Result<(Store<PluginState>, W::Instance), Fault> {
    loaded
        .instance(request_id)
        .map_err(|e| e.into_fault(loaded, request_id))
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
