//! Loading a plugin: read, verify sha256, compile, check the world and WIT version,
//! pre-instantiate, and validate its configuration on a throw-away instance.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

/// Least time the load-time configuration check gets, whatever the slot's deadline.
const VALIDATION_DEADLINE: std::time::Duration = std::time::Duration::from_secs(1);
use wasmtime::Store;

use super::bindings::World;
use super::cache::DiskCache;
use super::runtime::{self, Runtime};
use super::state::{LogBudget, PluginState, StoreTag};
use super::{FailurePolicy, Fault, FaultKind, FaultSink, Limits, Slot, WIT_VERSION};

/// Why a plugin was refused. Messages name files by file name only, never a path.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum LoadError {
    /// The file does not exist.
    #[error("{slot} plugin file not found: {file}")]
    NotFound {
        /// Slot.
        slot: Slot,
        /// File name.
        file: String,
    },
    /// The file exists but cannot be read.
    #[error("{slot} plugin file not readable: {file}")]
    NotReadable {
        /// Slot.
        slot: Slot,
        /// File name.
        file: String,
    },
    /// The file's sha256 differs from the configured one.
    #[error("{slot} plugin `{plugin}`: sha256 mismatch (expected {expected}, found {found})")]
    Sha256Mismatch {
        /// Slot.
        slot: Slot,
        /// Plugin name.
        plugin: String,
        /// Configured digest.
        expected: String,
        /// Actual digest.
        found: String,
    },
    /// Not a valid component.
    #[error("{slot} plugin `{plugin}` is not a valid WebAssembly component: {reason}")]
    Invalid {
        /// Slot.
        slot: Slot,
        /// Plugin name.
        plugin: String,
        /// Compiler message.
        reason: String,
    },
    /// Built against a WIT version this host does not serve.
    #[error(
        "{slot} plugin `{plugin}` {direction} {interface}; this host serves {served}: rebuild \
         it against warden:policy {served} (warden-policy {served}, or the wit/ of this \
         release)"
    )]
    Version {
        /// Slot.
        slot: Slot,
        /// Plugin name.
        plugin: String,
        /// `exports` or `imports`.
        direction: &'static str,
        /// The versioned interface name, e.g. `warden:policy/auth@0.2.0`.
        interface: String,
        /// The versions this host serves, e.g. `0.1.x`.
        served: String,
    },
    /// Not a component of the slot's world (wrong exports or unsupported imports).
    #[error("{slot} plugin `{plugin}` does not implement world warden:policy/{world}: {reason}")]
    World {
        /// Slot.
        slot: Slot,
        /// Plugin name.
        plugin: String,
        /// Expected world.
        world: &'static str,
        /// What is missing or extra.
        reason: String,
    },
    /// The component imports something the host does not give plugins (the network, for
    /// one: `wasi:sockets` is never linked).
    #[error(
        "{slot} plugin `{plugin}` imports {import}, which Warden does not provide to plugins \
         (no network, and no capability beyond WASI's clocks, random, closed stdio and the \
         warden:policy host interface)"
    )]
    Import {
        /// Slot.
        slot: Slot,
        /// Plugin name.
        plugin: String,
        /// The import, e.g. `wasi:sockets/network@0.2.6`.
        import: String,
    },
    /// `configure` refused the configuration or faulted.
    #[error("{slot} plugin `{plugin}` rejected its configuration: {message}")]
    Configure {
        /// Slot.
        slot: Slot,
        /// Plugin name.
        plugin: String,
        /// The plugin's message (or the fault).
        message: String,
    },
    /// The plugin loaded and configured, but a smoke call of its functions failed.
    #[error("{slot} plugin `{plugin}` failed its smoke call: {reason}")]
    Smoke {
        /// Slot.
        slot: Slot,
        /// Plugin name.
        plugin: String,
        /// Which call and how it failed.
        reason: String,
    },
    /// A rollback was asked for a slot that has no previous plugin.
    #[error("{slot} has no previous plugin to roll back to")]
    NoRollback {
        /// Slot.
        slot: Slot,
    },
    /// The plugin runtime could not start.
    #[error("{0}")]
    Runtime(String),
}

/// A plugin to load: its bytes and how to run it.
#[derive(Clone)]
pub struct PluginSource {
    /// The slot it is for.
    pub slot: Slot,
    /// Display name: the file stem.
    pub name: String,
    /// The component.
    pub bytes: Arc<[u8]>,
    /// Required sha256 (hex), if the operator pinned one.
    pub expected_sha256: Option<String>,
    /// The plugin's configuration, JSON text.
    pub config: String,
    /// Call bounds.
    pub limits: Limits,
    /// What a fault does (only the metrics policy may fail open).
    pub failure: FailurePolicy,
}

impl std::fmt::Debug for PluginSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The configuration may hold secrets (key hashes): never print it.
        f.debug_struct("PluginSource")
            .field("slot", &self.slot)
            .field("name", &self.name)
            .field("bytes", &self.bytes.len())
            .field("expected_sha256", &self.expected_sha256)
            .field("config", &"<redacted>")
            .field("limits", &self.limits)
            .field("failure", &self.failure)
            .finish()
    }
}

/// The file name of `path`, for messages.
pub(crate) fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "?".into())
}

impl PluginSource {
    /// Read a component file.
    pub fn from_file(
        slot: Slot,
        path: &Path,
        expected_sha256: Option<String>,
        config: String,
        limits: Limits,
    ) -> Result<Self, LoadError> {
        let file = file_name(path);
        let bytes = std::fs::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => LoadError::NotFound {
                slot,
                file: file.clone(),
            },
            _ => LoadError::NotReadable {
                slot,
                file: file.clone(),
            },
        })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or(file);
        Ok(Self {
            slot,
            name,
            bytes: bytes.into(),
            expected_sha256,
            config,
            limits,
            failure: FailurePolicy::default_for(slot),
        })
    }
}

/// Calls into one loaded plugin and how many of them faulted, since it was loaded.
#[derive(Debug, Default)]
pub(super) struct CallStats {
    pub(super) calls: AtomicU64,
    pub(super) faults: AtomicU64,
}

impl PluginSource {
    /// The bytes' sha256, checked against the pinned one if there is one.
    pub fn verify(&self) -> Result<[u8; 32], LoadError> {
        let digest: [u8; 32] = Sha256::digest(&self.bytes).into();
        let found = hex::encode(digest);
        match &self.expected_sha256 {
            Some(expected) if !expected.trim().eq_ignore_ascii_case(&found) => {
                Err(LoadError::Sha256Mismatch {
                    slot: self.slot,
                    plugin: self.name.clone(),
                    expected: expected.trim().to_ascii_lowercase(),
                    found,
                })
            }
            _ => Ok(digest),
        }
    }
}

/// A plugin ready to be instantiated, with everything each instance needs.
pub struct Loaded<W> {
    pub(super) slot: Slot,
    pub(super) name: Arc<str>,
    pub(super) sha256: String,
    pub(super) pre: W,
    pub(super) config: String,
    pub(super) limits: Limits,
    pub(super) failure: FailurePolicy,
    pub(super) sink: Arc<dyn FaultSink>,
    /// When it was loaded.
    pub(super) loaded_at: SystemTime,
    pub(super) stats: CallStats,
    /// What its stores share: name, slot, log allowance.
    pub(super) tag: StoreTag,
    /// The runtime its instances live on.
    pub(super) runtime: Arc<Runtime>,
}

/// Whether a plugin built against WIT version `version` can be served by this host:
/// semver-compatible with [`WIT_VERSION`] (same major; for 0.x, the same minor). Within
/// that line, wasmtime resolves names by semver, and what a newer plugin would need and the
/// host lacks fails at pre-instantiation with the missing name.
pub(crate) fn version_served(version: &str) -> bool {
    let parse = |v: &str| -> Option<(u64, u64, u64)> {
        let mut parts = v.split('.').map(|p| p.parse::<u64>().ok());
        let triple = (parts.next()??, parts.next()??, parts.next()??);
        parts.next().is_none().then_some(triple)
    };
    let (Some(host), Some(plugin)) = (parse(WIT_VERSION), parse(version)) else {
        return false;
    };
    match host.0 {
        0 => plugin.0 == 0 && plugin.1 == host.1,
        major => plugin.0 == major,
    }
}

/// The versions this host serves, as operators read them (`0.1.x`).
pub fn versions_served() -> String {
    let mut parts = WIT_VERSION.split('.');
    match (parts.next(), parts.next()) {
        (Some("0"), Some(minor)) => format!("0.{minor}.x"),
        (Some(major), _) => format!("{major}.x"),
        _ => WIT_VERSION.to_string(),
    }
}

/// The first `warden:policy` interface, among `(direction, name)` pairs, whose version this
/// host does not serve.
fn unserved_interface<'a>(
    names: impl Iterator<Item = (&'static str, &'a str)>,
) -> Option<(&'static str, String)> {
    names
        .filter(|(_, n)| n.starts_with("warden:policy/"))
        .find(|(_, n)| n.split_once('@').is_none_or(|(_, v)| !version_served(v)))
        .map(|(d, n)| (d, n.to_string()))
}

impl<W: World> Loaded<W> {
    /// Load and validate a plugin for its slot: integrity, component, world and version,
    /// configuration, then `smoke` (one call of each function, which must answer within the
    /// slot's deadline). Faults during validation are the plugin's refusal, not request
    /// faults: they reach `sink` only once the plugin is live.
    pub fn load(
        runtime: &Arc<Runtime>,
        source: &PluginSource,
        sink: Arc<dyn FaultSink>,
        cache: Option<&DiskCache>,
        smoke: impl Fn(&Self) -> Result<(), String>,
    ) -> Result<Self, LoadError> {
        let slot = source.slot;
        let plugin = source.name.clone();
        if source.failure == FailurePolicy::Open && !slot.kind().may_fail_open {
            return Err(LoadError::Runtime(format!(
                "the {slot} slot always fails closed; only the metrics policy may fail open"
            )));
        }
        let rt = &**runtime;
        let digest = source.verify()?;
        let found = hex::encode(digest);
        let component =
            rt.compile(digest, &source.bytes, cache)
                .map_err(|e| LoadError::Invalid {
                    slot,
                    plugin: plugin.clone(),
                    reason: e.to_string(),
                })?;
        let ty = component.component_type();
        // The slot's own interface first: it is the one an operator recognises.
        let own = format!("warden:policy/{}@", slot.interface());
        let mut names: Vec<_> = ty
            .exports(&rt.engine)
            .map(|(n, _)| ("exports", n))
            .chain(ty.imports(&rt.engine).map(|(n, _)| ("imports", n)))
            .collect();
        names.sort_by_key(|(_, n)| !n.starts_with(&own));
        if let Some((direction, interface)) = unserved_interface(names.into_iter()) {
            return Err(LoadError::Version {
                slot,
                plugin,
                direction,
                interface,
                served: versions_served(),
            });
        }
        let world_error = |e: wasmtime::Error| match missing_import(&format!("{e:#}")) {
            Some(import) => LoadError::Import {
                slot,
                plugin: plugin.clone(),
                import,
            },
            None => LoadError::World {
                slot,
                plugin: plugin.clone(),
                world: slot.world(),
                reason: e.to_string(),
            },
        };
        let pre = rt.linker.instantiate_pre(&component).map_err(world_error)?;
        let pre = W::new(pre).map_err(world_error)?;
        let mut loaded = Self {
            slot,
            name: plugin.clone().into(),
            sha256: found,
            pre,
            config: source.config.clone(),
            limits: source.limits,
            failure: source.failure,
            sink: Arc::new(Unrecorded),
            loaded_at: SystemTime::now(),
            stats: CallStats::default(),
            runtime: runtime.clone(),
            tag: StoreTag {
                slot,
                plugin: plugin.clone().into(),
                log: Arc::new(LogBudget::default()),
            },
        };
        // Validate the configuration once, on an instance of its own. Loading is off the
        // request path and often competes with model loading for the CPU, so the check gets
        // at least `VALIDATION_DEADLINE`; whether calls fit the slot's deadline is for the
        // requests to show.
        let limits = Limits {
            deadline: loaded.limits.deadline.max(VALIDATION_DEADLINE),
            ..loaded.limits
        };
        if let Err(e) = loaded.instance_within(limits, None) {
            let message = match e {
                InstanceError::Refused(m) => m,
                InstanceError::Fault(f) => format!("configure failed: {}", f.kind.as_str()),
            };
            return Err(LoadError::Configure {
                slot,
                plugin,
                message,
            });
        }
        smoke(&loaded).map_err(|reason| LoadError::Smoke {
            slot,
            plugin,
            reason,
        })?;
        loaded.sink = sink;
        loaded.stats = CallStats::default();
        loaded.loaded_at = SystemTime::now();
        Ok(loaded)
    }

    /// Record a fault of this plugin.
    pub(super) fn fault(&self, kind: FaultKind, request_id: Option<&Arc<str>>) -> Fault {
        self.stats.faults.fetch_add(1, Ordering::Relaxed);
        runtime::fault(self.slot, &self.name, kind, request_id, &*self.sink)
    }

    /// Whether `source` would load as this very plugin: same bytes, configuration and bounds.
    pub(super) fn same_as(&self, source: &PluginSource) -> bool {
        self.sha256 == hex::encode(Sha256::digest(&source.bytes))
            && self.config == source.config
            && self.limits == source.limits
            && self.failure == source.failure
    }

    /// A fresh, configured instance in a fresh store.
    pub(super) fn instance(
        &self,
        request_id: Option<&Arc<str>>,
    ) -> Result<(Store<PluginState>, W::Instance), InstanceError> {
        self.instance_within(self.limits, request_id)
    }

    fn instance_within(
        &self,
        limits: Limits,
        request_id: Option<&Arc<str>>,
    ) -> Result<(Store<PluginState>, W::Instance), InstanceError> {
        let (mut store, instance) = self.fresh(limits, request_id)?;
        self.configure(&mut store, &instance, request_id)?;
        Ok((store, instance))
    }

    /// A fresh instance in a fresh store, its deadline armed, not yet configured.
    pub(super) fn fresh(
        &self,
        limits: Limits,
        request_id: Option<&Arc<str>>,
    ) -> Result<(Store<PluginState>, W::Instance), InstanceError> {
        let mut store = self.runtime.store(&self.tag, limits, request_id);
        match self.pre.instantiate(&mut store) {
            Ok(i) => Ok((store, i)),
            Err(e) => {
                let kind = match e.downcast_ref::<wasmtime::Trap>() {
                    Some(_) => runtime::classify(&store, &e),
                    None => FaultKind::Unavailable,
                };
                Err(InstanceError::Fault(self.fault(kind, request_id)))
            }
        }
    }

    /// Hand a fresh instance its configuration.
    pub(super) fn configure(
        &self,
        store: &mut Store<PluginState>,
        instance: &W::Instance,
        request_id: Option<&Arc<str>>,
    ) -> Result<(), InstanceError> {
        let configured = W::configure(instance, store, &self.config);
        if runtime::late(store) {
            let kind = FaultKind::Deadline;
            return Err(InstanceError::Fault(self.fault(kind, request_id)));
        }
        match configured {
            Ok(Ok(())) => Ok(()),
            // Accepted at load, refused now: only a validation call may see this.
            Ok(Err(message)) => match request_id {
                None => Err(InstanceError::Refused(message)),
                Some(_) => Err(InstanceError::Fault(
                    self.fault(FaultKind::Malformed, request_id),
                )),
            },
            Err(e) => {
                let kind = runtime::classify(store, &e);
                Err(InstanceError::Fault(self.fault(kind, request_id)))
            }
        }
    }
}

/// The import wasmtime could not satisfy, from its error text ("component imports
/// instance `wasi:sockets/network@0.2.6`, but a matching implementation was not found").
fn missing_import(error: &str) -> Option<String> {
    let at = error.find("component imports ")?;
    let rest = &error[at..];
    if !rest.contains("was not found in the linker") {
        return None;
    }
    let start = rest.find('`')? + 1;
    let len = rest[start..].find('`')?;
    Some(rest[start..start + len].to_string())
}

/// Where validation faults go: nowhere (the load error reports them).
#[derive(Debug)]
struct Unrecorded;

impl FaultSink for Unrecorded {
    fn fault(&self, _: &Fault) {}
}

/// Why no instance could be had.
pub(super) enum InstanceError {
    /// `configure` returned an error.
    Refused(String),
    /// A fault, already recorded.
    Fault(Fault),
}

impl InstanceError {
    pub(super) fn into_fault<W: World>(
        self,
        loaded: &Loaded<W>,
        request_id: Option<&Arc<str>>,
    ) -> Fault {
        match self {
            InstanceError::Fault(f) => f,
            InstanceError::Refused(_) => loaded.fault(FaultKind::Malformed, request_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_names() {
        let names = [
            ("imports", "wasi:cli/environment@0.2.3"),
            ("imports", "warden:policy/host@0.1.0"),
            ("exports", "warden:policy/auth@0.2.0"),
            ("exports", "warden:policy/lifecycle@0.1.0"),
        ];
        assert_eq!(
            unserved_interface(names.into_iter()),
            Some(("exports", "warden:policy/auth@0.2.0".to_string()))
        );
        assert_eq!(unserved_interface(names[..2].iter().copied()), None);
        assert_eq!(versions_served(), "0.1.x");
        assert!(version_served("0.1.0"));
        assert!(version_served("0.1.7"));
        assert!(!version_served("0.2.0") && !version_served("1.1.0"));
        assert!(!version_served("0.1") && !version_served("0.1.0-rc1"));
    }

    #[test]
    fn a_missing_import_is_named() {
        let error = "component imports instance `wasi:sockets/network@0.2.6`, but a matching \
                     implementation was not found in the linker";
        assert_eq!(
            missing_import(error).as_deref(),
            Some("wasi:sockets/network@0.2.6")
        );
        assert_eq!(missing_import("export `auth` not found"), None);
    }

    #[test]
    fn missing_file_is_named_without_its_directory() {
        let dir = std::env::temp_dir().join("warden-no-such-dir");
        let err = PluginSource::from_file(
            Slot::Auth,
            &dir.join("nope.wasm"),
            None,
            "{}".into(),
            Limits::default(),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "auth plugin file not found: nope.wasm");
    }
}
