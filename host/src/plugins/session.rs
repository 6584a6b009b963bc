//! A request's sanitizer session: one fresh instance that checks the request's input and
//! then filters the text of its responses, and serves no other request.

use std::sync::{Arc, Mutex};

use wasmtime::Store;
use wasmtime::component::ResourceAny;

use super::bindings::{self, SanitizerPlugin, SanitizerPluginPre, WitVerdict};
use super::loader::Loaded;
use super::registry::*;
use super::runtime;
use super::state::PluginState;
use super::{Fault, FaultKind, InferenceInput, InputKind, Payload, Refusal};

/// One request's sanitizer instance. It lives as long as the request (input check, then
/// the output filters of its responses) and serves no other request.
pub struct SanitizerSession {
    pub(super) plugin: Arc<Loaded<SanitizerPluginPre<PluginState>>>,
    pub(super) request_id: Arc<str>,
    pub(super) inner: Arc<Mutex<SessionInner>>,
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

    /// The most linear memory the session's instance asked for, in bytes.
    pub(super) fn peak_memory(&self) -> usize {
        self.store.data().memory.peak
    }

    /// The instructions the session's instance has executed, on a metered runtime.
    pub(super) fn instructions(&self) -> Option<u64> {
        super::Runtime::instructions(&self.store)
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
