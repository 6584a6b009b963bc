//! The wasmtime engine every plugin runs on, and the bounds of every call.
//!
//! One [`Engine`] per process with epoch interruption (a ticker thread advances the epoch
//! every millisecond) and the pooling allocator. Components are compiled once (cached by
//! their sha256) and pre-instantiated; each request gets fresh [`Store`]s, so no state can
//! pass from one request (or principal) to another through a plugin's memory.
//!
//! Guest code never runs on a tokio worker. wasmtime-wasi's synchronous bindings block on
//! tokio for stream operations (a plugin that writes to stderr, a Rust panic message for
//! instance), which must not happen on a reactor thread; and a plugin spinning until its
//! deadline must not stall the connections that share its worker. Every instantiation and
//! call therefore runs on a small pool of plugin threads ([`call`]), fed by a bounded queue.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Duration;

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::{Fault, FaultKind, Slot, file_name};

/// How often the epoch advances: the granularity of deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// The largest memory cap a plugin may be given; the pooling allocator's slot size.
pub const MAX_MEMORY_BYTES: usize = 256 << 20;

/// Plugin calls waiting for a plugin thread; beyond this a call fails as `unavailable`.
const CALL_QUEUE: usize = 1024;

/// Most log lines one plugin call may write; further lines are dropped.
const MAX_LOG_LINES_PER_STORE: u32 = 32;
/// Longest log line kept, in bytes.
const MAX_LOG_LINE: usize = 512;

/// Bounds on every call into one plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock budget per call (instantiation and configuration included).
    pub deadline: Duration,
    /// Linear memory cap.
    pub memory_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            deadline: Duration::from_millis(10),
            memory_bytes: 16 << 20,
        }
    }
}

impl Limits {
    fn deadline_ticks(&self) -> u64 {
        let ticks = self.deadline.as_micros().div_ceil(EPOCH_TICK.as_micros());
        u64::try_from(ticks).unwrap_or(u64::MAX).max(1)
    }
}

/// Enforces the memory cap and remembers that it was hit, so the fault is named right.
#[derive(Debug)]
struct MemoryCap {
    cap: usize,
    exceeded: bool,
}

impl wasmtime::ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.cap {
            self.exceeded = true;
            return Err(wasmtime::format_err!("plugin memory cap exceeded"));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// The data of one plugin [`Store`].
pub struct PluginState {
    wasi: WasiCtx,
    table: ResourceTable,
    memory: MemoryCap,
    plugin: Arc<str>,
    slot: Slot,
    request_id: Option<Arc<str>>,
    log_lines: u32,
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl PluginState {
    /// A line from the guest's `log` import, attributed and bounded.
    pub(super) fn guest_log(&mut self, level: tracing::Level, message: &str) {
        if self.log_lines >= MAX_LOG_LINES_PER_STORE {
            return;
        }
        self.log_lines += 1;
        let mut end = message.len().min(MAX_LOG_LINE);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let message = &message[..end];
        let plugin = &*self.plugin;
        let slot = self.slot.as_str();
        let request_id = self.request_id.as_deref().unwrap_or("-");
        match level {
            tracing::Level::ERROR => tracing::error!(plugin, slot, request_id, "{message}"),
            tracing::Level::WARN => tracing::warn!(plugin, slot, request_id, "{message}"),
            tracing::Level::INFO => tracing::info!(plugin, slot, request_id, "{message}"),
            tracing::Level::DEBUG => tracing::debug!(plugin, slot, request_id, "{message}"),
            tracing::Level::TRACE => tracing::trace!(plugin, slot, request_id, "{message}"),
        }
    }
}

/// The process-wide plugin engine.
pub struct Runtime {
    pub(super) engine: Engine,
    pub(super) linker: Linker<PluginState>,
    components: Mutex<HashMap<[u8; 32], Component>>,
    calls: mpsc::SyncSender<Job>,
}

type Job = Box<dyn FnOnce() + Send>;

/// Why a call handed to the plugin threads produced no result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CallLost {
    /// The queue was full (or the runtime could not start).
    Busy,
    /// The host side of the call panicked; the thread survived.
    Panicked,
}

impl CallLost {
    pub(super) fn kind(self) -> FaultKind {
        match self {
            CallLost::Busy => FaultKind::Unavailable,
            CallLost::Panicked => FaultKind::Trap,
        }
    }
}

/// Run `f` (which calls into a plugin) on a plugin thread and wait for its result without
/// blocking the caller's thread.
pub(super) async fn call<R, F>(f: F) -> Result<R, CallLost>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let runtime = Runtime::get().map_err(|_| CallLost::Busy)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    runtime.calls.try_send(job).map_err(|_| CallLost::Busy)?;
    rx.await.map_err(|_| CallLost::Panicked)
}

fn start_call_threads(threads: usize) -> std::io::Result<mpsc::SyncSender<Job>> {
    let (tx, rx) = mpsc::sync_channel::<Job>(CALL_QUEUE);
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..threads {
        let rx = rx.clone();
        std::thread::Builder::new()
            .name(format!("warden-plugin-{i}"))
            .spawn(move || {
                loop {
                    let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok(job) = job else { return };
                    // A panic drops the job's result sender: the caller sees `Panicked`.
                    if std::panic::catch_unwind(AssertUnwindSafe(job)).is_err() {
                        tracing::error!("a plugin call panicked in the host; the call failed");
                    }
                }
            })?;
    }
    Ok(tx)
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").finish_non_exhaustive()
    }
}

static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();

impl Runtime {
    /// The shared runtime, created (and its epoch ticker started) on first use.
    pub fn get() -> Result<&'static Runtime, String> {
        RUNTIME
            .get_or_init(|| Runtime::new().map_err(|e| format!("plugin runtime: {e}")))
            .as_ref()
            .map_err(Clone::clone)
    }

    fn new() -> wasmtime::Result<Self> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(1000)
            .total_core_instances(4000)
            .total_memories(1000)
            .total_tables(2000)
            .max_memories_per_component(4)
            .max_tables_per_component(8)
            .max_core_instances_per_component(16)
            .max_memory_size(MAX_MEMORY_BYTES);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .memory_reservation(MAX_MEMORY_BYTES as u64)
            .memory_guard_size(32 << 20)
            .memory_reservation_for_growth(0);
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        super::bindings::add_host_to_linker(&mut linker)?;

        let weak = engine.weak();
        std::thread::Builder::new()
            .name("warden-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|e| wasmtime::format_err!("cannot start the epoch ticker: {e}"))?;
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
        let calls = start_call_threads(threads)
            .map_err(|e| wasmtime::format_err!("cannot start the plugin threads: {e}"))?;
        Ok(Self {
            engine,
            linker,
            components: Mutex::new(HashMap::new()),
            calls,
        })
    }

    /// Compile a component, or take it from the in-memory cache of components already
    /// compiled, or from the disk cache (keyed by this engine's compatibility hash and the
    /// component's sha256), so that re-activating a plugin or restarting does not
    /// recompile it.
    pub(super) fn compile(
        &self,
        sha256: [u8; 32],
        bytes: &[u8],
        disk: Option<&DiskCache>,
    ) -> wasmtime::Result<Component> {
        let cached = disk.map(|d| d.path(&self.engine, &sha256));
        let in_memory = self
            .components
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&sha256)
            .cloned();
        if let Some(c) = in_memory {
            // Compiled before this cache was in use: fill it, once.
            if let (Some(disk), Some(path)) = (disk, &cached)
                && !path.is_file()
            {
                disk.store(path, &c);
            }
            return Ok(c);
        }
        let loaded = match (disk, cached.as_deref()) {
            (Some(disk), Some(path)) if disk.trusted(path) => self.load_cached(path),
            _ => None,
        };
        let component = match loaded {
            Some(c) => c,
            None => {
                let component = Component::from_binary(&self.engine, bytes)?;
                if let (Some(disk), Some(path)) = (disk, &cached) {
                    disk.store(path, &component);
                }
                component
            }
        };
        self.components
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sha256, component.clone());
        Ok(component)
    }

    /// A compiled component from the disk cache; `None` (and the file removed) if it is
    /// missing, unreadable or from another engine.
    fn load_cached(&self, path: &Path) -> Option<Component> {
        if !path.is_file() {
            return None;
        }
        // SAFETY: wasmtime requires that the file was produced by `Component::serialize`
        // of a compatible engine and not altered since. Warden writes it (atomically, by
        // rename) into a directory it created and that [`DiskCache::open`] checked is its
        // own and not writable by group or others; [`DiskCache::trusted`] checked that this
        // file is a regular file of that owner, writable by nobody else. wasmtime checks the
        // header and engine settings and refuses anything else, which lands here as a
        // recompile.
        #[allow(unsafe_code)]
        let component = unsafe { Component::deserialize_file(&self.engine, path) };
        match component {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(file = %file_name(path), error = %e, "discarding a compiled plugin from the cache");
                let _ = std::fs::remove_file(path);
                None
            }
        }
    }

    /// A fresh store for one plugin instance: no WASI capabilities, a memory cap, and the
    /// epoch deadline armed for the first call.
    pub(super) fn store(
        &self,
        slot: Slot,
        plugin: &Arc<str>,
        limits: Limits,
        request_id: Option<&Arc<str>>,
    ) -> Store<PluginState> {
        let state = PluginState {
            // Grants nothing: no preopened directories, no environment, no arguments,
            // stdio to nowhere, and every socket address denied.
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            memory: MemoryCap {
                cap: limits.memory_bytes,
                exceeded: false,
            },
            plugin: plugin.clone(),
            slot,
            request_id: request_id.cloned(),
            log_lines: 0,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.memory);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(limits.deadline_ticks());
        store
    }
}

/// Compiled components on disk. Files are named by the engine's compatibility hash and
/// the component's sha256, so a wasmtime upgrade or different settings never load a stale
/// artifact, and a component is compiled once per engine.
#[derive(Debug, Clone)]
pub struct DiskCache {
    dir: PathBuf,
    /// The user that owns the directory, and must own every file loaded from it: Warden's.
    #[cfg(unix)]
    owner: u32,
}

impl DiskCache {
    /// Use `dir` (created with mode 0700 if missing). Refused if group or others may write
    /// to it, or if another user owns it: its files are loaded as machine code.
    pub fn open(dir: &Path) -> Result<Self, String> {
        let name = file_name(dir);
        let io = |e: std::io::Error| format!("plugin cache directory {name}: {}", e.kind());
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(dir).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(dir).map_err(io)?;
            if meta.mode() & 0o022 != 0 {
                return Err(format!(
                    "plugin cache directory {name} is writable by group or others; \
                     make it 0700 or choose another"
                ));
            }
            // A file Warden creates belongs to Warden's user: the directory must too.
            let probe = dir.join(format!(".owner-{}", std::process::id()));
            let mine = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&probe)
                .and_then(|f| f.metadata())
                .map(|m| m.uid());
            let _ = std::fs::remove_file(&probe);
            let mine = mine.map_err(io)?;
            if meta.uid() != mine {
                return Err(format!(
                    "plugin cache directory {name} belongs to another user; choose another"
                ));
            }
            Ok(Self {
                dir: dir.to_path_buf(),
                owner: mine,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// Whether the file at `path` may be loaded: a regular file (not a link) of the
    /// directory's owner that group and others cannot write. Anything else is ignored (and
    /// replaced by a fresh compile), with a warning unless it is simply missing.
    fn trusted(&self, path: &Path) -> bool {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return false;
        };
        #[cfg(unix)]
        let foreign = {
            use std::os::unix::fs::MetadataExt;
            meta.uid() != self.owner || meta.mode() & 0o022 != 0
        };
        #[cfg(not(unix))]
        let foreign = false;
        if !meta.file_type().is_file() || foreign {
            tracing::warn!(
                file = %file_name(path),
                "ignoring a compiled plugin in the cache that is not a regular file of \
                 Warden's user, or that others may change; recompiling"
            );
            return false;
        }
        true
    }

    fn path(&self, engine: &Engine, sha256: &[u8; 32]) -> PathBuf {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        self.dir.join(format!(
            "{:016x}-{}.cwasm",
            hasher.finish(),
            hex::encode(sha256)
        ))
    }

    /// Write `component` to `path` atomically; a failure only costs a recompile later.
    fn store(&self, path: &Path, component: &Component) {
        let written = component
            .serialize()
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                let tmp = path.with_extension(format!("tmp{}", std::process::id()));
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create(true).truncate(true);
                // Owner-only whatever the umask: `trusted` refuses files others may change.
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                options
                    .open(&tmp)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, &bytes))
                    .and_then(|()| std::fs::rename(&tmp, path))
                    .map_err(|e| e.kind().to_string())
            });
        if let Err(e) = written {
            tracing::warn!(file = %file_name(path), error = %e, "cannot cache a compiled plugin");
        }
    }
}

/// Re-arm the deadline before another call on a live store.
pub(super) fn arm(store: &mut Store<PluginState>, limits: Limits) {
    store.set_epoch_deadline(limits.deadline_ticks());
}

/// Name a failed call's fault.
pub(super) fn classify(store: &Store<PluginState>, error: &wasmtime::Error) -> FaultKind {
    if store.data().memory.exceeded {
        return FaultKind::Memory;
    }
    match error.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => FaultKind::Deadline,
        Some(_) => FaultKind::Trap,
        None => FaultKind::Trap,
    }
}

/// Build a fault, log it once and report it to the sink.
pub(super) fn fault(
    slot: Slot,
    plugin: &Arc<str>,
    kind: FaultKind,
    request_id: Option<&Arc<str>>,
    sink: &dyn super::FaultSink,
) -> Fault {
    let fault = Fault {
        slot,
        plugin: plugin.clone(),
        kind,
    };
    tracing::warn!(
        slot = slot.as_str(),
        plugin = &**plugin,
        fault = kind.as_str(),
        request_id = request_id.map(|r| &**r).unwrap_or("-"),
        "plugin fault"
    );
    sink.fault(&fault);
    fault
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn the_disk_cache_loads_only_its_owners_private_files() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("cache");
        let cache = DiskCache::open(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "probe left behind"
        );

        let file = dir.join("a.cwasm");
        std::fs::write(&file, b"x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(cache.trusted(&file));
        assert!(!cache.trusted(&dir.join("missing.cwasm")));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o620)).unwrap();
        assert!(!cache.trusted(&file), "group-writable");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.join("b.cwasm");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(!cache.trusted(&link), "a link");
        let stranger = DiskCache {
            owner: cache.owner.wrapping_add(1),
            ..cache.clone()
        };
        assert!(!stranger.trusted(&file), "another user's file");

        // A directory others may write to is refused.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = DiskCache::open(&dir).unwrap_err();
        assert!(err.contains("writable by group or others"), "{err}");
        assert!(!err.contains(&root.path().display().to_string()), "{err}");
    }
}
