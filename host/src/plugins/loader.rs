//! Loading a plugin: read, verify sha256, compile, check the world and WIT version,
//! pre-instantiate, and validate its configuration on a throw-away instance.

use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// Least time the load-time configuration check gets, whatever the slot's deadline.
const VALIDATION_DEADLINE: std::time::Duration = std::time::Duration::from_secs(1);
use wasmtime::Store;

use super::bindings::World;
use super::runtime::{self, PluginState, Runtime};
use super::{Fault, FaultKind, FaultSink, Limits, Slot, WIT_VERSION};

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
        "{slot} plugin `{plugin}` targets warden:policy@{found}, but this host serves \
         warden:policy@{served}"
    )]
    Version {
        /// Slot.
        slot: Slot,
        /// Plugin name.
        plugin: String,
        /// The plugin's version.
        found: String,
        /// The host's version.
        served: &'static str,
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
        })
    }
}

/// A plugin ready to be instantiated, with everything each instance needs.
pub struct Loaded<W> {
    pub(super) slot: Slot,
    pub(super) name: Arc<str>,
    pub(super) sha256: String,
    pub(super) pre: W,
    config: String,
    pub(super) limits: Limits,
    pub(super) sink: Arc<dyn FaultSink>,
}

/// The `warden:policy` versions named in a component's imports and exports.
fn policy_versions(names: impl Iterator<Item = String>) -> Vec<String> {
    let mut versions: Vec<String> = names
        .filter_map(|n| n.strip_prefix("warden:policy/").map(str::to_string))
        .filter_map(|n| n.split_once('@').map(|(_, v)| v.to_string()))
        .collect();
    versions.sort();
    versions.dedup();
    versions
}

impl<W: World> Loaded<W> {
    /// Load and validate a plugin for its slot.
    pub fn load(source: &PluginSource, sink: Arc<dyn FaultSink>) -> Result<Self, LoadError> {
        let slot = source.slot;
        let plugin = source.name.clone();
        let rt = Runtime::get().map_err(LoadError::Runtime)?;
        let digest: [u8; 32] = Sha256::digest(&source.bytes).into();
        let found = hex::encode(digest);
        if let Some(expected) = &source.expected_sha256
            && !expected.trim().eq_ignore_ascii_case(&found)
        {
            return Err(LoadError::Sha256Mismatch {
                slot,
                plugin,
                expected: expected.trim().to_ascii_lowercase(),
                found,
            });
        }
        let component = rt
            .compile(digest, &source.bytes)
            .map_err(|e| LoadError::Invalid {
                slot,
                plugin: plugin.clone(),
                reason: e.to_string(),
            })?;
        let ty = component.component_type();
        let names = ty
            .imports(&rt.engine)
            .map(|(n, _)| n.to_string())
            .chain(ty.exports(&rt.engine).map(|(n, _)| n.to_string()));
        if let Some(other) = policy_versions(names)
            .into_iter()
            .find(|v| v != WIT_VERSION)
        {
            return Err(LoadError::Version {
                slot,
                plugin,
                found: other,
                served: WIT_VERSION,
            });
        }
        let world_error = |e: wasmtime::Error| LoadError::World {
            slot,
            plugin: plugin.clone(),
            world: slot.world(),
            reason: e.to_string(),
        };
        let pre = rt.linker.instantiate_pre(&component).map_err(world_error)?;
        let pre = W::new(pre).map_err(world_error)?;
        let loaded = Self {
            slot,
            name: plugin.clone().into(),
            sha256: found,
            pre,
            config: source.config.clone(),
            limits: source.limits,
            sink,
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
        Ok(loaded)
    }

    /// Record a fault of this plugin.
    pub(super) fn fault(&self, kind: FaultKind, request_id: Option<&Arc<str>>) -> Fault {
        runtime::fault(self.slot, &self.name, kind, request_id, &*self.sink)
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
        let rt = Runtime::get()
            .map_err(|_| InstanceError::Fault(self.fault(FaultKind::Unavailable, request_id)))?;
        let mut store = rt.store(self.slot, &self.name, limits, request_id);
        let instance = match self.pre.instantiate(&mut store) {
            Ok(i) => i,
            Err(e) => {
                let kind = match e.downcast_ref::<wasmtime::Trap>() {
                    Some(_) => runtime::classify(&store, &e),
                    None => FaultKind::Unavailable,
                };
                return Err(InstanceError::Fault(self.fault(kind, request_id)));
            }
        };
        match W::configure(&instance, &mut store, &self.config) {
            Ok(Ok(())) => Ok((store, instance)),
            // Accepted at load, refused now: only a validation call may see this.
            Ok(Err(message)) => match request_id {
                None => Err(InstanceError::Refused(message)),
                Some(_) => Err(InstanceError::Fault(
                    self.fault(FaultKind::Malformed, request_id),
                )),
            },
            Err(e) => {
                let kind = runtime::classify(&store, &e);
                Err(InstanceError::Fault(self.fault(kind, request_id)))
            }
        }
    }
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
            "wasi:cli/environment@0.2.3",
            "warden:policy/host@0.1.0",
            "warden:policy/auth@0.2.0",
            "warden:policy/lifecycle@0.1.0",
        ];
        assert_eq!(
            policy_versions(names.iter().map(|s| s.to_string())),
            ["0.1.0", "0.2.0"]
        );
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
