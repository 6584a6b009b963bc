//! The slot kinds as data. One [`SlotKind`] per slot says everything the host does
//! differently for it: the WIT world and interface a plugin must target, the reference
//! plugin it runs by default, its failure rule, whether its calls carry client text (which
//! lengthens their deadline and lets them return more), the smoke call made before a plugin
//! goes live, and how a component for it is loaded. The loader, the registry, the admin
//! API, the `warden serve` flags and their `WARDEN_*` variables, and the operations guide's
//! table are all read from [`SLOT_KINDS`]; a new slot kind is an entry here, its WIT world,
//! its typed calls and its smoke call.

use std::fmt;
use std::sync::Arc;

use super::cache::DiskCache;
use super::loader::{Loaded, PluginSource};
use super::registry::AnyLoaded;
use super::smoke::{smoke_auth, smoke_metrics, smoke_sanitizer};
use super::{FailurePolicy, FaultSink, Limits, LoadError, Runtime};

/// The plugin slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    /// Authentication.
    Auth,
    /// Input and output sanitization.
    Sanitizer,
    /// Metrics labels and visibility.
    MetricsPolicy,
}

/// Loads a component for one slot kind and makes its smoke call.
type Load = fn(
    &Arc<Runtime>,
    &PluginSource,
    Arc<dyn FaultSink>,
    Option<&DiskCache>,
) -> Result<AnyLoaded, LoadError>;

/// What the host knows about one slot kind.
pub struct SlotKind {
    /// The slot.
    pub slot: Slot,
    /// Its name in configuration, flags, logs, metrics and the admin API.
    pub name: &'static str,
    /// What its plugin decides, in a line (the docs' tables).
    pub summary: &'static str,
    /// The interface its plugin exports (`warden:policy/NAME@VERSION`).
    pub interface: &'static str,
    /// The world its plugin targets.
    pub world: &'static str,
    /// The reference plugin's component, in the plugin directory.
    pub default_file: &'static str,
    /// What a fault does unless configured otherwise.
    pub default_failure: FailurePolicy,
    /// Whether an operator may make it fail open (only where a fault cannot let a request
    /// through unchecked).
    pub may_fail_open: bool,
    /// Whether its calls are given client text: their deadline then grows per MiB of it
    /// (`deadline_ms_per_mib`, default [`SlotKind::default_deadline_ms_per_mib`]), and a
    /// call may hand back as much as the plugin's memory holds.
    pub takes_client_text: bool,
    /// The calls made once, with harmless input, before a plugin goes live.
    pub smoke_calls: &'static [&'static str],
    load: Load,
}

impl fmt::Debug for SlotKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotKind")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Every slot kind, in the order operators see them.
pub static SLOT_KINDS: [SlotKind; 3] = [
    SlotKind {
        slot: Slot::Auth,
        name: "auth",
        summary: "who sent a request, and with which scopes and tenant",
        interface: "auth",
        world: "auth-plugin",
        default_file: "auth-api-key.wasm",
        default_failure: FailurePolicy::Closed,
        may_fail_open: false,
        takes_client_text: false,
        smoke_calls: &["authenticate"],
        load: |rt, source, sink, cache| {
            Ok(AnyLoaded::Auth(Arc::new(Loaded::load(
                rt, source, sink, cache, smoke_auth,
            )?)))
        },
    },
    SlotKind {
        slot: Slot::Sanitizer,
        name: "sanitizer",
        summary: "whether inference input may pass, rewritten or not, and what output text \
                  the client sees",
        interface: "sanitizer",
        world: "sanitizer-plugin",
        default_file: "sanitize-basic.wasm",
        default_failure: FailurePolicy::Closed,
        may_fail_open: false,
        takes_client_text: true,
        smoke_calls: &["check-input", "output-filter"],
        load: |rt, source, sink, cache| {
            Ok(AnyLoaded::Sanitizer(Arc::new(Loaded::load(
                rt,
                source,
                sink,
                cache,
                smoke_sanitizer,
            )?)))
        },
    },
    SlotKind {
        slot: Slot::MetricsPolicy,
        name: "metrics-policy",
        summary: "the labels a request is recorded under, and which series a caller may see",
        interface: "metrics-policy",
        world: "metrics-policy-plugin",
        default_file: "metrics-policy-basic.wasm",
        default_failure: FailurePolicy::Open,
        may_fail_open: true,
        takes_client_text: false,
        smoke_calls: &["labels", "visible-series"],
        load: |rt, source, sink, cache| {
            Ok(AnyLoaded::Metrics(Arc::new(Loaded::load(
                rt,
                source,
                sink,
                cache,
                smoke_metrics,
            )?)))
        },
    },
];

impl SlotKind {
    /// `deadline_ms_per_mib` when the configuration gives none.
    pub fn default_deadline_ms_per_mib(&self) -> u64 {
        if self.takes_client_text { 60 } else { 0 }
    }

    /// The most bytes one call may hand the host (wasmtime's hostcall fuel: strings and list
    /// elements lifted from guest memory). Principals, refusals and labels are small; a
    /// rewrite or released text may be as large as the plugin's own memory.
    pub fn result_bytes(&self, limits: Limits) -> usize {
        if self.takes_client_text {
            limits.memory_bytes.max(1 << 20)
        } else {
            1 << 20
        }
    }

    /// Load `source` (a component for this kind), smoke-test it, and hold it ready.
    pub(super) fn load(
        &self,
        runtime: &Arc<Runtime>,
        source: &PluginSource,
        sink: Arc<dyn FaultSink>,
        cache: Option<&DiskCache>,
    ) -> Result<AnyLoaded, LoadError> {
        (self.load)(runtime, source, sink, cache)
    }
}

impl Slot {
    /// Every slot, in the order operators see them.
    pub const ALL: [Slot; 3] = [Slot::Auth, Slot::Sanitizer, Slot::MetricsPolicy];

    /// Where the slot is in [`Slot::ALL`] and [`SLOT_KINDS`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// What the host knows about this slot.
    pub fn kind(self) -> &'static SlotKind {
        &SLOT_KINDS[self.index()]
    }

    /// The slot named `name` (`auth`, `sanitizer`, `metrics-policy`).
    pub fn from_name(name: &str) -> Option<Slot> {
        SLOT_KINDS.iter().find(|k| k.name == name).map(|k| k.slot)
    }

    /// The slot's name in configuration, logs and metrics.
    pub fn as_str(self) -> &'static str {
        self.kind().name
    }

    /// The interface that a plugin in this slot exports.
    pub fn interface(self) -> &'static str {
        self.kind().interface
    }

    /// The WIT world a plugin in this slot must target.
    pub fn world(self) -> &'static str {
        self.kind().world
    }

    /// See [`SlotKind::result_bytes`].
    pub fn result_bytes(self, limits: Limits) -> usize {
        self.kind().result_bytes(limits)
    }
}

impl serde::Serialize for Slot {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The operations guide's table of slot kinds, as the descriptors make it.
    fn docs_table() -> String {
        let mut t = String::from(
            "| Slot | World | Its plugin decides | Reference plugin | On a fault | Smoke calls |\n\
             |---|---|---|---|---|---|\n",
        );
        for k in &SLOT_KINDS {
            let failure = match (k.default_failure, k.may_fail_open) {
                (FailurePolicy::Open, _) => "open (or `closed`)",
                (FailurePolicy::Closed, true) => "closed (or `open`)",
                (FailurePolicy::Closed, false) => "closed, always",
            };
            t.push_str(&format!(
                "| `{}` | `warden:policy/{}` | {} | `{}` | {} | `{}` |\n",
                k.name,
                k.world,
                k.summary,
                k.default_file,
                failure,
                k.smoke_calls.join("`, `")
            ));
        }
        t
    }

    #[test]
    fn the_operations_guide_lists_every_slot_kind_as_the_table_says() {
        let docs = include_str!("../../../docs/operations.md");
        let table = docs_table();
        assert!(
            docs.contains(&table),
            "docs/operations.md must hold this table, made from SLOT_KINDS:\n{table}"
        );
    }

    #[test]
    fn the_table_is_in_slot_order_and_names_are_unique() {
        for (i, kind) in SLOT_KINDS.iter().enumerate() {
            assert_eq!(kind.slot.index(), i, "{}", kind.name);
            assert_eq!(Slot::ALL[i], kind.slot);
            assert_eq!(Slot::from_name(kind.name), Some(kind.slot));
            assert!(kind.may_fail_open || kind.default_failure == FailurePolicy::Closed);
        }
    }
}
