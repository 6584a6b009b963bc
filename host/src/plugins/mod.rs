//! Everything wasmtime: the policy plugins that every request passes through.
//!
//! The rest of the host sees only the domain types defined here ([`Principal`],
//! [`Refusal`], [`Fault`]); wasmtime and the generated bindings stay inside
//! this module. See `docs/architecture.md` for how a request flows through the plugins.

mod audit;
mod bindings;
mod cache;
mod harness;
mod loader;
mod profile;
mod registry;
mod runtime;
mod session;
mod slot;
mod smoke;
mod state;
mod swap;
mod wasi;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

pub use audit::{AUDIT_EVENTS_KEPT, AuditEvent, AuditLog, Outcome, Trigger};
pub use cache::DiskCache;
pub use harness::{CaseOutcome, run_cases};
pub(crate) use loader::file_name;
pub use loader::{LoadError, PluginSource, versions_served};
#[doc(hidden)]
pub use profile::{PhaseSamples, ProfileRequest, profile_handoff};
pub use registry::PluginSet;
pub use runtime::{
    Limits, MAX_MEMORY_BYTES, Runtime, RuntimeBuilder, hold_epoch_for_tests, host_panics,
};
pub use session::{Checked, OutputFilter, SanitizerSession};
pub use slot::{SLOT_KINDS, Slot, SlotKind};
pub use smoke::{Inspection, check, inspect};
pub use state::escape_log_message;
pub use swap::Registry;

/// What the host does when a plugin call faults. Only the metrics policy has a choice:
/// authentication and sanitization always fail closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// The request is refused (auth, sanitizer: 503); for the metrics policy, the request
    /// is left out of the labelled request series and counted as unlabelled.
    #[default]
    Closed,
    /// Metrics policy only: the request is recorded under `route` and `status_class`.
    Open,
}

impl FailurePolicy {
    /// The default: closed, except for the metrics policy, which records the request
    /// under its route and status class.
    pub fn default_for(slot: Slot) -> Self {
        slot.kind().default_failure
    }
}

/// A slot's live plugin, as `GET /admin/plugins` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PluginStatus {
    /// Slot.
    pub slot: Slot,
    /// Plugin name.
    pub plugin: String,
    /// The world it implements, e.g. `warden:policy/auth-plugin`.
    pub world: String,
    /// The WIT package version the host serves it at.
    pub wit_version: &'static str,
    /// sha256 of the component.
    pub sha256: String,
    /// Unix time it was loaded, seconds.
    pub loaded_at: u64,
    /// Calls into it since it was loaded.
    pub calls: u64,
    /// Of those, faults.
    pub faults: u64,
    /// Per-call deadline.
    pub deadline_ms: u64,
    /// Added to the deadline per MiB of client text.
    pub deadline_ms_per_mib: u64,
    /// Memory cap.
    pub memory_mib: u64,
    /// What a fault does.
    pub failure: FailurePolicy,
    /// Whether a previous plugin can be restored.
    pub rollback_available: bool,
}

/// The request id (and, for the sanitizer and metrics policy, the model, route and
/// principal id) of the host's smoke calls, made once before a plugin goes live.
pub const SMOKE_ID: &str = "warden-smoke";

/// The WIT package version this host serves.
pub const WIT_VERSION: &str = "0.1.0";

/// The request envelope an auth plugin decides on (never the body).
#[derive(Debug, Clone)]
pub struct RequestMeta {
    /// Request id, echoed in `x-request-id`.
    pub request_id: Arc<str>,
    /// Upper-case method.
    pub method: String,
    /// Path without query.
    pub path: String,
    /// Headers with lower-case names.
    pub headers: Vec<(String, String)>,
    /// The peer address.
    pub client_addr: Option<SocketAddr>,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Key or user id; logged, never a metrics label.
    pub id: String,
    /// Tenant, if any.
    pub tenant: Option<String>,
    /// Granted scopes.
    pub scopes: Vec<String>,
}

impl Principal {
    /// Whether the principal holds `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
}

/// A policy's decision not to serve a request (always a 4xx).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status, 400..=499.
    pub status: u16,
    /// Machine-readable code.
    pub code: String,
    /// Message for the client.
    pub message: String,
}

/// Which API an inference input came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// `/v1/embeddings`.
    Embeddings,
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// The client-supplied text of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// Embedding inputs or a prompt.
    Texts(Vec<String>),
    /// A chat conversation.
    Messages(Vec<ChatMessage>),
}

impl Payload {
    /// Bytes of client text: the texts, or the messages' contents.
    pub fn text_bytes(&self) -> usize {
        match self {
            Payload::Texts(t) => t.iter().map(String::len).sum(),
            Payload::Messages(m) => m.iter().map(|m| m.content.len()).sum(),
        }
    }

    /// The texts, or the messages' contents.
    pub fn into_texts(self) -> Vec<String> {
        match self {
            Payload::Texts(t) => t,
            Payload::Messages(m) => m.into_iter().map(|m| m.content).collect(),
        }
    }
}

/// What a sanitizer sees before the model runs.
#[derive(Debug, Clone)]
pub struct InferenceInput {
    /// The API.
    pub kind: InputKind,
    /// Requested model id.
    pub model: String,
    /// The caller.
    pub principal: Principal,
    /// The text.
    pub payload: Payload,
    /// Requested generation length.
    pub max_tokens: Option<u32>,
}

/// What the metrics policy is told about a finished request.
#[derive(Debug, Clone)]
pub struct RequestSummary {
    /// Route template.
    pub route: &'static str,
    /// Model id, if the request named a known one.
    pub model: Option<String>,
    /// Status sent.
    pub status: u16,
    /// Caller's tenant.
    pub tenant: Option<String>,
}

/// Which series a caller may read from `/v1/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visibility {
    /// All series.
    All,
    /// Series carrying all of these labels.
    Matching(Vec<(String, String)>),
    /// None.
    Nothing,
}

/// The label names a metrics policy may use.
pub const ALLOWED_LABELS: [&str; 4] = ["route", "model", "status_class", "tenant"];

/// How a plugin call failed. A fault is the plugin's defect, not a policy decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// The guest trapped (including a Rust panic, which aborts).
    Trap,
    /// The call ran past its epoch deadline.
    Deadline,
    /// The guest tried to grow its memory past the cap.
    Memory,
    /// The call returned something the contract forbids (including a result too large to
    /// take into the host).
    Malformed,
    /// The guest tried to wait (sleep or poll on something not ready); plugins may not.
    Blocked,
    /// No instance could be created (pool exhausted or instantiation failed).
    Unavailable,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 6] = [
        FaultKind::Trap,
        FaultKind::Deadline,
        FaultKind::Memory,
        FaultKind::Malformed,
        FaultKind::Blocked,
        FaultKind::Unavailable,
    ];

    /// Name used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Trap => "trap",
            FaultKind::Deadline => "deadline",
            FaultKind::Memory => "memory",
            FaultKind::Malformed => "malformed",
            FaultKind::Blocked => "blocked",
            FaultKind::Unavailable => "unavailable",
        }
    }
}

/// A plugin fault, already logged once and counted where it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// Which slot.
    pub slot: Slot,
    /// Plugin name (its file stem; never a path).
    pub plugin: Arc<str>,
    /// What went wrong.
    pub kind: FaultKind,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} plugin `{}` failed: {}",
            self.slot,
            self.plugin,
            self.kind.as_str()
        )
    }
}

/// Something that wants to hear about plugin faults (the metrics registry).
pub trait FaultSink: Send + Sync + fmt::Debug {
    /// Called once per fault.
    fn fault(&self, fault: &Fault);

    /// Called when `plugin` becomes the live plugin of `slot` (at start, on a swap or a
    /// rollback), so that its fault counters can be exported at zero before any fault.
    fn plugin_live(&self, _slot: Slot, _plugin: &str) {}

    /// Called once per requested plugin change, whatever became of it.
    fn swap(&self, _slot: Slot, _trigger: Trigger, _outcome: Outcome) {}

    /// Called once per host→plugin call with its wall-clock duration (queueing for a plugin
    /// thread included).
    fn call_duration(&self, _slot: Slot, _duration: std::time::Duration) {}
}
