//! The live plugin set, swapped atomically.
//!
//! A request takes one snapshot ([`Registry::current`]) and uses it to the end, so a swap
//! never changes the plugins under a request in flight. A new set is loaded and validated
//! off to the side first; a failure leaves the old set live.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use wasmtime::Store;
use wasmtime::component::ResourceAny;

use super::bindings::{
    self, AuthPluginPre, MetricsPolicyPluginPre, SanitizerPlugin, SanitizerPluginPre, WitVerdict,
    World,
};
use super::loader::{LoadError, Loaded, PluginSource};
use super::runtime::{self, PluginState};
use super::{
    ALLOWED_LABELS, Fault, FaultKind, FaultSink, InferenceInput, InputKind, Payload, Principal,
    Refusal, RequestMeta, RequestSummary, Slot, Visibility,
};

/// Longest label value kept.
const MAX_LABEL_VALUE: usize = 64;

/// One plugin per slot.
pub struct PluginSet {
    auth: Arc<Loaded<AuthPluginPre<PluginState>>>,
    sanitizer: Arc<Loaded<SanitizerPluginPre<PluginState>>>,
    metrics: Arc<Loaded<MetricsPolicyPluginPre<PluginState>>>,
}

impl std::fmt::Debug for PluginSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.describe()).finish()
    }
}

/// What an operator sees of a loaded plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginInfo {
    /// Slot.
    pub slot: Slot,
    /// Name (file stem).
    pub name: String,
    /// sha256 of the component.
    pub sha256: String,
}

fn valid_refusal(r: &Refusal) -> bool {
    (400..=499).contains(&r.status)
        && !r.code.is_empty()
        && r.code.len() <= 64
        && r.message.len() <= 4096
}

fn valid_principal(p: &Principal) -> bool {
    let short = |s: &str| !s.is_empty() && s.len() <= 256;
    short(&p.id)
        && p.tenant
            .as_deref()
            .is_none_or(|t| short(t) && t.len() <= MAX_LABEL_VALUE)
        && p.scopes.len() <= 64
        && p.scopes.iter().all(|s| short(s))
}

impl PluginSet {
    /// Load all three slots.
    pub fn load(
        auth: &PluginSource,
        sanitizer: &PluginSource,
        metrics: &PluginSource,
        sink: Arc<dyn FaultSink>,
    ) -> Result<Self, LoadError> {
        Ok(Self {
            auth: Arc::new(Loaded::load(auth, sink.clone())?),
            sanitizer: Arc::new(Loaded::load(sanitizer, sink.clone())?),
            metrics: Arc::new(Loaded::load(metrics, sink)?),
        })
    }

    /// This set with one slot replaced by a newly loaded plugin.
    pub fn with_replaced(
        &self,
        source: &PluginSource,
        sink: Arc<dyn FaultSink>,
    ) -> Result<Self, LoadError> {
        let mut next = Self {
            auth: self.auth.clone(),
            sanitizer: self.sanitizer.clone(),
            metrics: self.metrics.clone(),
        };
        match source.slot {
            Slot::Auth => next.auth = Arc::new(Loaded::load(source, sink)?),
            Slot::Sanitizer => next.sanitizer = Arc::new(Loaded::load(source, sink)?),
            Slot::MetricsPolicy => next.metrics = Arc::new(Loaded::load(source, sink)?),
        }
        Ok(next)
    }

    /// Name and digest of each slot's plugin.
    pub fn describe(&self) -> Vec<PluginInfo> {
        fn info<W>(l: &Loaded<W>) -> PluginInfo {
            PluginInfo {
                slot: l.slot,
                name: l.name.to_string(),
                sha256: l.sha256.clone(),
            }
        }
        vec![info(&self.auth), info(&self.sanitizer), info(&self.metrics)]
    }

    /// Ask the auth plugin who sent the request.
    pub async fn authenticate(
        self: &Arc<Self>,
        meta: &RequestMeta,
    ) -> Result<Result<Principal, Refusal>, Fault> {
        let set = self.clone();
        let meta = meta.clone();
        let rid = meta.request_id.clone();
        off_reactor(&self.auth, Some(&rid), move || set.authenticate_now(&meta)).await
    }

    fn authenticate_now(&self, meta: &RequestMeta) -> Result<Result<Principal, Refusal>, Fault> {
        let rid = Some(&meta.request_id);
        let (mut store, instance) = instance(&self.auth, rid)?;
        let result = bindings::call_authenticate(&instance, &mut store, meta)
            .map_err(|e| self.auth.fault(runtime::classify(&store, &e), rid))?;
        match result {
            Ok(p) => {
                let p = bindings::principal_from(p);
                if valid_principal(&p) {
                    Ok(Ok(p))
                } else {
                    Err(self.auth.fault(FaultKind::Malformed, rid))
                }
            }
            Err(r) => {
                let r = bindings::refusal_from(r);
                if valid_refusal(&r) {
                    Ok(Err(r))
                } else {
                    Err(self.auth.fault(FaultKind::Malformed, rid))
                }
            }
        }
    }

    /// Start a sanitizer session for one request: one instance that checks the input and
    /// then filters that request's output, and nothing else.
    pub async fn sanitizer_session(
        &self,
        request_id: &Arc<str>,
    ) -> Result<SanitizerSession, Fault> {
        let plugin = self.sanitizer.clone();
        let rid = request_id.clone();
        let inner = off_reactor(&self.sanitizer, Some(request_id), move || {
            let (store, instance) = instance(&plugin, Some(&rid))?;
            Ok(SessionInner {
                plugin,
                request_id: rid,
                store,
                instance,
            })
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
        let set = self.clone();
        let summary = summary.clone();
        let rid = request_id.clone();
        off_reactor(&self.metrics, Some(request_id), move || {
            set.labels_now(&summary, &rid)
        })
        .await
    }

    fn labels_now(
        &self,
        summary: &RequestSummary,
        request_id: &Arc<str>,
    ) -> Result<Vec<(String, String)>, Fault> {
        let rid = Some(request_id);
        let (mut store, instance) = instance(&self.metrics, rid)?;
        let mut labels = bindings::call_labels(&instance, &mut store, summary)
            .map_err(|e| self.metrics.fault(runtime::classify(&store, &e), rid))?;
        let mut seen = Vec::with_capacity(labels.len());
        for (name, value) in &mut labels {
            if !ALLOWED_LABELS.contains(&name.as_str()) || seen.contains(name) {
                return Err(self.metrics.fault(FaultKind::Malformed, rid));
            }
            seen.push(name.clone());
            truncate(value, MAX_LABEL_VALUE);
        }
        Ok(labels)
    }

    /// Which series `caller` may read. Fails closed: a fault means nothing.
    pub async fn visible_series(
        self: &Arc<Self>,
        caller: &Principal,
        request_id: &Arc<str>,
    ) -> Visibility {
        let set = self.clone();
        let caller = caller.clone();
        let rid = request_id.clone();
        off_reactor(&self.metrics, Some(request_id), move || {
            let (mut store, instance) = instance(&set.metrics, Some(&rid))?;
            bindings::call_visible_series(&instance, &mut store, &caller)
                .map_err(|e| set.metrics.fault(runtime::classify(&store, &e), Some(&rid)))
        })
        .await
        .unwrap_or(Visibility::Nothing)
    }
}

/// Run `f` (a plugin call) on a plugin thread; a call that is lost is a fault of `loaded`.
async fn off_reactor<W: World, R, F>(
    loaded: &Loaded<W>,
    request_id: Option<&Arc<str>>,
    f: F,
) -> Result<R, Fault>
where
    F: FnOnce() -> Result<R, Fault> + Send + 'static,
    R: Send + 'static,
{
    match runtime::call(f).await {
        Ok(result) => result,
        Err(lost) => Err(loaded.fault(lost.kind(), request_id)),
    }
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

struct SessionInner {
    plugin: Arc<Loaded<SanitizerPluginPre<PluginState>>>,
    request_id: Arc<str>,
    store: Store<PluginState>,
    instance: SanitizerPlugin,
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
    /// Run `f` against the session's store on a plugin thread.
    async fn run<R, F>(&self, f: F) -> Result<R, Fault>
    where
        F: FnOnce(&mut SessionInner) -> Result<R, Fault> + Send + 'static,
        R: Send + 'static,
    {
        let inner = self.inner.clone();
        let plugin = self.plugin.clone();
        let rid = self.request_id.clone();
        off_reactor(&self.plugin, Some(&self.request_id), move || {
            // A store that saw a host panic is not used again.
            let mut guard = inner
                .lock()
                .map_err(|_| plugin.fault(FaultKind::Trap, Some(&rid)))?;
            f(&mut guard)
        })
        .await
    }

    /// Check the input. Returns the payload to use: the input's own, or the plugin's
    /// rewrite (which must keep the input's shape).
    pub async fn check_input(
        &self,
        input: InferenceInput,
    ) -> Result<Result<Payload, Refusal>, Fault> {
        self.run(move |s| s.check_input(input)).await
    }

    /// Create an output filter for one response of this request.
    pub async fn output_filter(&self, kind: InputKind) -> Result<OutputFilter, Fault> {
        self.run(move |s| s.output_filter(kind)).await
    }

    /// Feed generated text; returns what may be released.
    pub async fn push(
        &self,
        filter: OutputFilter,
        chunk: String,
    ) -> Result<Result<String, Refusal>, Fault> {
        self.run(move |s| s.push(filter, &chunk)).await
    }

    /// End of generation; returns what was held back.
    pub async fn finish(&self, filter: OutputFilter) -> Result<Result<String, Refusal>, Fault> {
        self.run(move |s| s.finish(filter)).await
    }
}

impl SessionInner {
    fn fault(&self, kind: FaultKind) -> Fault {
        self.plugin.fault(kind, Some(&self.request_id))
    }

    fn failed(&self, e: &wasmtime::Error) -> Fault {
        self.fault(runtime::classify(&self.store, e))
    }

    fn refusal(&self, r: bindings::auth::warden::policy::types::Refusal) -> Result<Refusal, Fault> {
        let r = bindings::refusal_from(r);
        if valid_refusal(&r) {
            Ok(r)
        } else {
            Err(self.fault(FaultKind::Malformed))
        }
    }

    fn check_input(&mut self, input: InferenceInput) -> Result<Result<Payload, Refusal>, Fault> {
        runtime::arm(&mut self.store, self.plugin.limits);
        let result = bindings::call_check_input(&self.instance, &mut self.store, &input)
            .map_err(|e| self.failed(&e))?;
        match result {
            Ok(WitVerdict::Pass) => Ok(Ok(input.payload)),
            Ok(WitVerdict::Rewrite(p)) => {
                let p = bindings::payload_from(p);
                if same_shape(&input.payload, &p) {
                    Ok(Ok(p))
                } else {
                    Err(self.fault(FaultKind::Malformed))
                }
            }
            Err(r) => Ok(Err(self.refusal(r)?)),
        }
    }

    fn output_filter(&mut self, kind: InputKind) -> Result<OutputFilter, Fault> {
        runtime::arm(&mut self.store, self.plugin.limits);
        let api = bindings::sanitizer_filter(&self.instance);
        api.call_constructor(&mut self.store, bindings::kind_to(kind))
            .map(OutputFilter)
            .map_err(|e| self.failed(&e))
    }

    fn push(
        &mut self,
        filter: OutputFilter,
        chunk: &str,
    ) -> Result<Result<String, Refusal>, Fault> {
        runtime::arm(&mut self.store, self.plugin.limits);
        let api = bindings::sanitizer_filter(&self.instance);
        match api
            .call_push(&mut self.store, filter.0, chunk)
            .map_err(|e| self.failed(&e))?
        {
            Ok(text) => Ok(Ok(text)),
            Err(r) => Ok(Err(self.refusal(r)?)),
        }
    }

    fn finish(&mut self, filter: OutputFilter) -> Result<Result<String, Refusal>, Fault> {
        runtime::arm(&mut self.store, self.plugin.limits);
        let api = bindings::sanitizer_filter(&self.instance);
        match api
            .call_finish(&mut self.store, filter.0)
            .map_err(|e| self.failed(&e))?
        {
            Ok(text) => Ok(Ok(text)),
            Err(r) => Ok(Err(self.refusal(r)?)),
        }
    }
}

/// The live plugin set.
pub struct Registry {
    current: ArcSwap<PluginSet>,
    sink: Arc<dyn FaultSink>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("current", &*self.current.load())
            .finish()
    }
}

impl Registry {
    /// A registry serving `set`.
    pub fn new(set: PluginSet, sink: Arc<dyn FaultSink>) -> Self {
        Self {
            current: ArcSwap::from_pointee(set),
            sink,
        }
    }

    /// The set a new request should use, for the whole of that request.
    pub fn current(&self) -> Arc<PluginSet> {
        self.current.load_full()
    }

    /// Load `source` beside the live set and, if it loads and configures, make a set with
    /// it live. On error the live set is untouched.
    pub fn replace(&self, source: &PluginSource) -> Result<(), LoadError> {
        let next = self.current().with_replaced(source, self.sink.clone())?;
        self.current.store(Arc::new(next));
        tracing::info!(slot = source.slot.as_str(), plugin = %source.name, "plugin swapped");
        Ok(())
    }
}
