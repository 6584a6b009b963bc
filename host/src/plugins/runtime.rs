//! The wasmtime engine plugins run on, and the bounds of every call.
//!
//! A [`Runtime`] is a value, built with [`Runtime::builder`] and passed to whatever loads
//! plugins (the server's registry, the CLI's `plugin check`): one [`Engine`] with epoch
//! interruption (a ticker thread advances the epoch every millisecond) and the pooling
//! allocator, and its plugin threads. Components are compiled once per runtime (cached by
//! their sha256) and pre-instantiated; each request gets fresh [`Store`]s, so no state can
//! pass from one request (or principal) to another through a plugin's memory.
//!
//! A call runs on the thread that needs it ([`inline`]), a tokio worker included: the WASI
//! surface plugins see never waits and needs no runtime (`wasi.rs`), and the deadline bounds
//! what a call can take. Calls that may legitimately run long (a large input check) go to a
//! small pool of plugin threads instead ([`call`]), fed by a bounded queue, so that they do
//! not hold up the connections sharing a worker.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime_wasi::WasiCtx;

use super::cache::DiskCache;
use super::state::{MemoryCap, PluginState, StoreTag};
use super::{Fault, FaultKind, Slot, file_name};

/// How often the epoch advances: the granularity of deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// The largest memory cap a plugin may be given; the pooling allocator's slot size.
pub const MAX_MEMORY_BYTES: usize = 256 << 20;

/// Linear memory and table bytes each pool slot keeps resident when an instance ends,
/// reset with `memset` rather than `madvise`: the next instance in the slot starts on
/// resident pages (a fresh instance's first call here 7 → 3 µs, instantiation 12 → 9 µs).
/// Where the kernel has `PAGEMAP_SCAN` (Linux 6.7+), only the pages the instance wrote are
/// reset, and no `madvise` (with its TLB-shootdown IPIs) is needed at all for a plugin that
/// writes less than this: `configure` 7–10 → 0.4–1.5 µs, teardown 9 → 2.4 µs per slot.
/// A JavaScript or Python plugin writes megabytes of its runtime's heap per request: at
/// 128 KiB its pages faulted back in on every instance (the JWT plugin's `configure` 500 →
/// 300 µs at 8 MiB). What a slot keeps is what its plugins wrote, at most this much, and
/// only slots that were ever used: a few MiB for a Rust plugin set at the server's
/// concurrency, up to 8 MiB per concurrent request for a JavaScript or Python one.
const KEEP_RESIDENT: usize = 8 << 20;

/// Plugin calls waiting for a plugin thread; beyond this a call fails as `unavailable`.
const CALL_QUEUE: usize = 1024;

/// Bounds on every call into one plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock budget per call (instantiation and configuration included). A call that
    /// returns after it is a deadline fault, whatever it returned.
    pub deadline: Duration,
    /// Added to the deadline of a call per MiB of client text it is given (a sanitizer's
    /// input check), so that a large input the plugin documents as acceptable can be
    /// served, while a small request keeps a short budget.
    pub deadline_per_mib: Duration,
    /// Linear memory cap.
    pub memory_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            deadline: Duration::from_millis(10),
            deadline_per_mib: Duration::ZERO,
            memory_bytes: 16 << 20,
        }
    }
}

impl Limits {
    /// The budget of a call given `bytes` of client text.
    pub fn deadline_for(&self, bytes: usize) -> Duration {
        self.deadline
            + self
                .deadline_per_mib
                .mul_f64(bytes as f64 / (1 << 20) as f64)
    }
}

/// A plugin engine: one wasmtime [`Engine`] with its pooling allocator, epoch ticker and
/// plugin threads, built with [`Runtime::builder`] and shared by every plugin loaded on it.
pub struct Runtime {
    pub(super) engine: Engine,
    metered: bool,
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

/// Run `f` (which calls into a plugin) on this thread; a panic on the host side fails the
/// call, not the thread.
pub(super) fn inline<R>(f: impl FnOnce() -> R) -> Result<R, CallLost> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|_| {
        host_panicked();
        CallLost::Panicked
    })
}

/// Host-side panics during plugin calls since start: a bug in Warden whatever the plugin
/// did, so the tests assert there are none.
static HOST_PANICS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn host_panicked() {
    HOST_PANICS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::error!("a plugin call panicked in the host; the call failed");
}

/// How many plugin calls panicked on the host side (see [`HOST_PANICS`]). For tests.
#[doc(hidden)]
pub fn host_panics() -> u64 {
    HOST_PANICS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Run `f` (which calls into a plugin) on a plugin thread and wait for its result without
/// blocking the caller's thread.
pub(super) async fn call<R, F>(runtime: &Runtime, f: F) -> Result<R, CallLost>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
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
                        host_panicked();
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

/// How to build a [`Runtime`]: its pool of instance slots and its plugin threads.
#[derive(Debug, Clone)]
pub struct RuntimeBuilder {
    instances: u32,
    call_threads: usize,
    metered: bool,
}

impl Default for RuntimeBuilder {
    fn default() -> Self {
        Self {
            instances: 1000,
            call_threads: std::thread::available_parallelism().map_or(2, |n| n.get().max(2)),
            metered: false,
        }
    }
}

impl RuntimeBuilder {
    /// Component instances that may live at once (each request holds up to three); the
    /// pooling allocator reserves their address space up front. Default 1,000.
    pub fn instances(mut self, instances: u32) -> Self {
        self.instances = instances.max(3);
        self
    }

    /// Threads for the calls that do not run on the caller's thread (large input checks).
    /// Default: one per CPU, at least two.
    pub fn call_threads(mut self, threads: usize) -> Self {
        self.call_threads = threads.max(1);
        self
    }

    /// Count what guests execute, with wasmtime's fuel: about one unit per WebAssembly
    /// instruction, the same on every run and machine (see [`Runtime::instructions`]). For
    /// `warden plugin test`; the compiled code checks a counter, so never for serving.
    pub fn metered(mut self, metered: bool) -> Self {
        self.metered = metered;
        self
    }

    /// Build the runtime and start its epoch ticker and plugin threads. They stop when the
    /// last handle to the runtime is dropped.
    pub fn build(self) -> Result<Arc<Runtime>, String> {
        Runtime::new(&self)
            .map(Arc::new)
            .map_err(|e| format!("plugin runtime: {e}"))
    }
}

impl Runtime {
    /// A builder with the server's defaults.
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder::default()
    }

    fn new(settings: &RuntimeBuilder) -> wasmtime::Result<Self> {
        let n = settings.instances;
        let mut pool = PoolingAllocationConfig::default();
        // Rust components hold three to four core instances; a Python one (componentize-py:
        // CPython and its libraries, dynamically linked) holds 38. 32 per component
        // instance on average still lets about 700 requests with a Python sanitizer run at
        // once; the slots are address space until used.
        pool.total_component_instances(n)
            .total_core_instances(32 * n)
            .total_memories(n)
            .total_tables(2 * n)
            .max_memories_per_component(4)
            .max_tables_per_component(8)
            .max_core_instances_per_component(64)
            .max_memory_size(MAX_MEMORY_BYTES)
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(KEEP_RESIDENT)
            .pagemap_scan(wasmtime::Enabled::Auto);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .memory_reservation(4 << 30)
            .memory_guard_size(32 << 20)
            .memory_reservation_for_growth(0)
            .consume_fuel(settings.metered);
        // For profiling plugins with `perf`: WARDEN_WASM_PROFILER=perfmap names the
        // compiled guest functions in /tmp/perf-PID.map (jitdump for `perf inject`).
        match std::env::var("WARDEN_WASM_PROFILER").as_deref() {
            Ok("perfmap") => {
                config.profiler(wasmtime::ProfilingStrategy::PerfMap);
            }
            Ok("jitdump") => {
                config.profiler(wasmtime::ProfilingStrategy::JitDump);
            }
            _ => {}
        }
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        super::wasi::add_to_linker(&mut linker)?;
        super::bindings::add_host_to_linker(&mut linker)?;

        // Each tick makes every running guest check its wall-clock deadline (see
        // [`Runtime::store`]): a ticker that falls behind on a loaded machine delays the
        // check, never moves the deadline.
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("warden-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    if !EPOCH_HELD.load(std::sync::atomic::Ordering::Relaxed) {
                        engine.increment_epoch();
                    }
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|e| wasmtime::format_err!("cannot start the epoch ticker: {e}"))?;
        let calls = start_call_threads(settings.call_threads)
            .map_err(|e| wasmtime::format_err!("cannot start the plugin threads: {e}"))?;
        Ok(Self {
            engine,
            metered: settings.metered,
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
    /// missing, unreadable, damaged or from another engine.
    fn load_cached(&self, path: &Path) -> Option<Component> {
        let discard = |why: &str| {
            tracing::warn!(file = %file_name(path), error = why, "discarding a compiled plugin from the cache; recompiling");
            let _ = std::fs::remove_file(path);
            None
        };
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => return discard(&e.kind().to_string()),
        };
        let Some(code) = DiskCache::verified(&bytes) else {
            return discard("its checksum does not match: the file is damaged");
        };
        // SAFETY: wasmtime requires that the bytes were produced by `Component::serialize`
        // of a compatible engine and not altered since. Warden wrote them, followed by
        // their sha256 (checked just above, so a torn write or a flipped bit is caught
        // here), atomically by rename into a directory it created and that
        // [`DiskCache::open`] checked is its own and not writable by group or others;
        // [`DiskCache::trusted`] checked that this file is a regular file of that owner,
        // writable by nobody else. wasmtime checks the header and engine settings and
        // refuses anything else, which lands here as a recompile.
        #[allow(unsafe_code)]
        let component = unsafe { Component::deserialize(&self.engine, code) };
        match component {
            Ok(c) => Some(c),
            Err(e) => discard(&e.to_string()),
        }
    }

    /// A fresh store for one plugin instance: no WASI capabilities, a memory cap, a cap
    /// on what one call may hand the host, and the deadline armed for the first call.
    pub(super) fn store(
        &self,
        tag: &StoreTag,
        limits: Limits,
        request_id: Option<&Arc<str>>,
    ) -> Store<PluginState> {
        let state = PluginState {
            // Grants nothing: no preopened directories, no environment, no arguments,
            // stdio to nowhere, no network (see `wasi.rs`), a wall clock in whole seconds.
            wasi: WasiCtx::builder()
                .wall_clock(super::wasi::CoarseWallClock)
                .max_random_size(super::wasi::MAX_RANDOM_BYTES)
                .build(),
            table: ResourceTable::new(),
            memory: MemoryCap {
                cap: limits.memory_bytes,
                exceeded: false,
                peak: 0,
            },
            clock: super::wasi::VirtualClock::default(),
            plugin: tag.plugin.clone(),
            slot: tag.slot,
            request_id: request_id.cloned(),
            log_lines: 0,
            log_budget: tag.log.clone(),
            deadline_at: Instant::now() + limits.deadline,
            timed_out: false,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.memory);
        // Results are lifted into host memory: bound what one call may produce, so that a
        // list whose elements all alias one large string cannot make the host allocate
        // without limit.
        store.set_hostcall_fuel(tag.slot.result_bytes(limits));
        // The epoch only wakes this check; the deadline itself is the wall clock.
        store.epoch_deadline_callback(|mut ctx| {
            let state = ctx.data_mut();
            if Instant::now() >= state.deadline_at {
                state.timed_out = true;
                Ok(wasmtime::UpdateDeadline::Interrupt)
            } else {
                Ok(wasmtime::UpdateDeadline::Continue(1))
            }
        });
        store.set_epoch_deadline(1);
        if self.metered {
            // Never runs out: metering counts, the deadline bounds.
            let _ = store.set_fuel(u64::MAX);
        }
        store
    }

    /// The WebAssembly instructions (fuel units) `store` has executed, on a
    /// [`RuntimeBuilder::metered`] runtime.
    pub(super) fn instructions(store: &Store<PluginState>) -> Option<u64> {
        store.get_fuel().ok().map(|left| u64::MAX - left)
    }
}

/// Stops the epoch ticker while `true`: guests then run on past their deadline, and only
/// the wall-clock check when a call returns can catch them. For tests of that check.
static EPOCH_HELD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Hold (or release) the epoch ticker, for tests of late answers. Never in production.
#[doc(hidden)]
pub fn hold_epoch_for_tests(held: bool) {
    EPOCH_HELD.store(held, std::sync::atomic::Ordering::Relaxed);
}

/// Re-arm the deadline before another call on a live store, one given `bytes` of client
/// text (see [`Limits::deadline_for`]).
pub(super) fn arm(store: &mut Store<PluginState>, limits: Limits, bytes: usize) {
    store.data_mut().deadline_at = Instant::now() + limits.deadline_for(bytes);
    store.set_epoch_deadline(1);
}

/// Whether the call that just returned on `store` came back after its deadline. Such an
/// answer is never used: the plugin thread may have been held up by the machine rather
/// than the plugin, but a verdict that arrives late is a fault either way, and treating
/// it as one is the only rule that cannot be gamed.
pub(super) fn late(store: &Store<PluginState>) -> bool {
    Instant::now() > store.data().deadline_at
}

/// Name a failed call's fault.
pub(super) fn classify(store: &Store<PluginState>, error: &wasmtime::Error) -> FaultKind {
    let state = store.data();
    if state.memory.exceeded {
        return FaultKind::Memory;
    }
    let interrupted = matches!(
        error.downcast_ref::<wasmtime::Trap>(),
        Some(wasmtime::Trap::Interrupt)
    );
    if state.timed_out || interrupted {
        return FaultKind::Deadline;
    }
    // A result too large to lift is malformed even when lifting it ran past the deadline:
    // that time is the host's copying, and the answer is refused either way.
    if unliftable(error) {
        return FaultKind::Malformed;
    }
    if late(store) {
        return FaultKind::Deadline;
    }
    match error.downcast_ref::<wasmtime::Trap>() {
        Some(_) => FaultKind::Trap,
        None if format!("{error:#}").contains(super::wasi::NO_WAITING) => FaultKind::Blocked,
        None => FaultKind::Trap,
    }
}

/// Whether `error` says the guest's result could not be lifted into the host: larger than
/// the hostcall fuel allows, or not valid UTF-8. wasmtime reports these as plain errors.
fn unliftable(error: &wasmtime::Error) -> bool {
    let text = format!("{error:#}");
    text.contains("fuel allocated for hostcalls") || text.contains("utf-8")
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
