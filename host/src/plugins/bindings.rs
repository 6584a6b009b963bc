//! The only `bindgen!` in the host, and the conversions between generated types and the
//! domain types of [`super`].

use wasmtime::Store;
use wasmtime::component::{HasSelf, InstancePre, Linker};

use super::state::PluginState;
use super::{ChatMessage, InferenceInput, InputKind, Payload, Principal, Refusal, RequestMeta};

pub mod auth {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "warden:policy/auth-plugin@0.1.0",
    });
}

pub mod sanitizer {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "warden:policy/sanitizer-plugin@0.1.0",
        with: {
            "warden:policy/types": super::auth::warden::policy::types,
            "warden:policy/host": super::auth::warden::policy::host,
        },
    });
}

pub mod metrics {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "warden:policy/metrics-policy-plugin@0.1.0",
        with: {
            "warden:policy/types": super::auth::warden::policy::types,
            "warden:policy/host": super::auth::warden::policy::host,
        },
    });
}

use auth::warden::policy::host::{self as wit_host, Level};
use auth::warden::policy::types as wit_types;
use metrics::exports::warden::policy::metrics_policy as wit_metrics;
use sanitizer::exports::warden::policy::sanitizer as wit_sanitizer;

pub use auth::{AuthPlugin, AuthPluginPre};
pub use metrics::{MetricsPolicyPlugin, MetricsPolicyPluginPre};
pub use sanitizer::{SanitizerPlugin, SanitizerPluginPre};
pub use wit_metrics::{RequestSummary as WitSummary, Visibility as WitVisibility};
pub use wit_sanitizer::{GuestOutputFilter, InputVerdict as WitVerdict};

/// Adds the `warden:policy/host` import to the linker.
pub fn add_host_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    wit_host::add_to_linker::<PluginState, HasSelf<PluginState>>(linker, |s| s)
}

impl wit_host::Host for PluginState {
    fn log(&mut self, level: Level, message: String) {
        let level = match level {
            Level::Trace => tracing::Level::TRACE,
            Level::Debug => tracing::Level::DEBUG,
            Level::Info => tracing::Level::INFO,
            Level::Warn => tracing::Level::WARN,
            Level::Error => tracing::Level::ERROR,
        };
        self.guest_log(level, &message);
    }
}

impl wit_types::Host for PluginState {}

/// What the runtime needs from each world's generated bindings.
pub trait World: Sized + Send + Sync + 'static {
    /// The live instance.
    type Instance;
    /// Check the component's exports against the world.
    fn new(pre: InstancePre<PluginState>) -> wasmtime::Result<Self>;
    /// Instantiate into `store`.
    fn instantiate(&self, store: &mut Store<PluginState>) -> wasmtime::Result<Self::Instance>;
    /// Call the `lifecycle.configure` export.
    fn configure(
        instance: &Self::Instance,
        store: &mut Store<PluginState>,
        config: &str,
    ) -> wasmtime::Result<Result<(), String>>;
}

macro_rules! world {
    ($pre:ty, $inst:ty, $lifecycle:ident) => {
        impl World for $pre {
            type Instance = $inst;
            fn new(pre: InstancePre<PluginState>) -> wasmtime::Result<Self> {
                <$pre>::new(pre)
            }
            fn instantiate(
                &self,
                store: &mut Store<PluginState>,
            ) -> wasmtime::Result<Self::Instance> {
                <$pre>::instantiate(self, store)
            }
            fn configure(
                instance: &Self::Instance,
                store: &mut Store<PluginState>,
                config: &str,
            ) -> wasmtime::Result<Result<(), String>> {
                instance.$lifecycle().call_configure(store, config)
            }
        }
    };
}

world!(
    AuthPluginPre<PluginState>,
    AuthPlugin,
    warden_policy_lifecycle
);
world!(
    SanitizerPluginPre<PluginState>,
    SanitizerPlugin,
    warden_policy_lifecycle
);
world!(
    MetricsPolicyPluginPre<PluginState>,
    MetricsPolicyPlugin,
    warden_policy_lifecycle
);

pub fn request_info(meta: &RequestMeta) -> wit_types::RequestInfo {
    wit_types::RequestInfo {
        request_id: meta.request_id.to_string(),
        method: meta.method.clone(),
        path: meta.path.clone(),
        headers: meta
            .headers
            .iter()
            .map(|(name, value)| wit_types::Header {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
        client_addr: meta.client_addr.map(|a| a.to_string()),
    }
}

pub fn principal_from(p: wit_types::Principal) -> Principal {
    Principal {
        id: p.id,
        tenant: p.tenant,
        scopes: p.scopes,
    }
}

pub fn principal_to(p: &Principal) -> wit_types::Principal {
    wit_types::Principal {
        id: p.id.clone(),
        tenant: p.tenant.clone(),
        scopes: p.scopes.clone(),
    }
}

pub fn refusal_from(r: wit_types::Refusal) -> Refusal {
    Refusal {
        status: r.status,
        code: r.code,
        message: r.message,
    }
}

pub fn call_authenticate(
    instance: &AuthPlugin,
    store: &mut Store<PluginState>,
    meta: &RequestMeta,
) -> wasmtime::Result<Result<wit_types::Principal, wit_types::Refusal>> {
    instance
        .warden_policy_auth()
        .call_authenticate(store, &request_info(meta))
}

pub fn kind_to(kind: InputKind) -> wit_sanitizer::InputKind {
    match kind {
        InputKind::Embeddings => wit_sanitizer::InputKind::Embeddings,
        InputKind::Chat => wit_sanitizer::InputKind::Chat,
        InputKind::Completion => wit_sanitizer::InputKind::Completion,
    }
}

/// The payload as the WIT type, by move: the client's text is never copied on the host
/// side (it is copied once, into the guest's memory, by the call).
fn payload_to(p: Payload) -> wit_sanitizer::Payload {
    match p {
        Payload::Texts(t) => wit_sanitizer::Payload::Texts(t),
        Payload::Messages(m) => wit_sanitizer::Payload::Messages(
            m.into_iter()
                .map(|m| wit_sanitizer::ChatMessage {
                    role: m.role,
                    content: m.content,
                })
                .collect(),
        ),
    }
}

pub fn payload_from(p: wit_sanitizer::Payload) -> Payload {
    match p {
        wit_sanitizer::Payload::Texts(t) => Payload::Texts(t),
        wit_sanitizer::Payload::Messages(m) => Payload::Messages(
            m.into_iter()
                .map(|m| ChatMessage {
                    role: m.role,
                    content: m.content,
                })
                .collect(),
        ),
    }
}

/// Call `check-input`; the input's payload is handed back (moved, not copied) with the
/// verdict.
pub fn call_check_input(
    instance: &SanitizerPlugin,
    store: &mut Store<PluginState>,
    input: InferenceInput,
) -> (
    Payload,
    wasmtime::Result<Result<WitVerdict, wit_types::Refusal>>,
) {
    let wit = wit_sanitizer::InferenceInput {
        kind: kind_to(input.kind),
        model: input.model,
        principal: principal_to(&input.principal),
        payload: payload_to(input.payload),
        max_tokens: input.max_tokens,
    };
    let verdict = instance
        .warden_policy_sanitizer()
        .call_check_input(store, &wit);
    (payload_from(wit.payload), verdict)
}

pub fn sanitizer_filter(instance: &SanitizerPlugin) -> GuestOutputFilter<'_> {
    instance.warden_policy_sanitizer().output_filter()
}

pub fn call_labels(
    instance: &MetricsPolicyPlugin,
    store: &mut Store<PluginState>,
    summary: &super::RequestSummary,
) -> wasmtime::Result<Vec<(String, String)>> {
    let wit = WitSummary {
        route: summary.route.to_string(),
        model: summary.model.clone(),
        status: summary.status,
        tenant: summary.tenant.clone(),
    };
    let labels = instance
        .warden_policy_metrics_policy()
        .call_labels(store, &wit)?;
    Ok(labels.into_iter().map(|l| (l.name, l.value)).collect())
}

pub fn call_visible_series(
    instance: &MetricsPolicyPlugin,
    store: &mut Store<PluginState>,
    caller: &Principal,
) -> wasmtime::Result<super::Visibility> {
    let v = instance
        .warden_policy_metrics_policy()
        .call_visible_series(store, &principal_to(caller))?;
    Ok(match v {
        WitVisibility::All => super::Visibility::All,
        WitVisibility::Matching(labels) => {
            super::Visibility::Matching(labels.into_iter().map(|l| (l.name, l.value)).collect())
        }
        WitVisibility::None => super::Visibility::Nothing,
    })
}
