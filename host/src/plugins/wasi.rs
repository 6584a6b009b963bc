//! The WASI 0.2 surface a plugin sees: what a component built by an ordinary toolchain
//! imports (`wasi:io`, `wasi:cli`, `wasi:clocks`, `wasi:random`, `wasi:filesystem`), granting
//! nothing and never blocking.
//!
//! wasmtime's epoch deadline interrupts only guest code, not a host call that waits, so no
//! host function here may wait:
//!
//! - **Waiting traps.** `wasi:io/poll` is Warden's own: `poll` returns the pollables that
//!   are ready now and `block` returns if its pollable is ready now; when nothing is ready,
//!   the call traps instead of waiting ("plugins may not wait"), so the plugin fails at once
//!   (at its smoke call, before it ever goes live, if it waits there) rather than holding a
//!   plugin thread past its deadline.
//! - **Clocks are virtual.** The monotonic clock stands still at zero for the whole life
//!   of an instance: a subscription to a later instant or a non-zero duration is never
//!   ready (waiting on it traps), a zero one always is. The wall clock is real but
//!   truncated to whole seconds (enough for expiry checks, useless for timing anything).
//!   A plugin can therefore neither wait out its deadline in a host call nor time the
//!   host.
//! - **Streams are closed.** stdin is empty, stdout and stderr discard, so no stream ever
//!   waits for a reader.
//! - **No network.** `wasi:sockets` is not linked at all: a plugin that imports it is
//!   refused at load, with the missing import named, instead of failing at run time.
//! - **No files.** `wasi:filesystem` is linked (toolchains import it) with no preopened
//!   directory, so there is nothing to open; its descriptor functions, unreachable
//!   without a descriptor, trap.
//! - **No runtime needed.** Nothing here waits, so nothing needs an async runtime: every
//!   operation that could wait completes on its first poll or traps ([`now`]), and a call
//!   may run on any thread, a tokio worker included.
//! - **Bounded transfers.** Random bytes are capped per call ([`MAX_RANDOM_BYTES`]); what a
//!   plugin hands the host in one call is capped by the store's hostcall fuel.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::HostWallClock;
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock::{
    self, Duration as WasiDuration, Instant,
};
use wasmtime_wasi::p2::bindings::io::poll::HostPollable as AsyncPollable;
use wasmtime_wasi::p2::bindings::io::streams::{
    HostInputStream as AsyncInput, HostOutputStream as AsyncOutput,
};
use wasmtime_wasi::p2::bindings::sync::filesystem::types as fs;
use wasmtime_wasi::p2::bindings::sync::io::poll::HostPollable;
use wasmtime_wasi::p2::bindings::sync::io::streams::{self, InputStream, OutputStream};
use wasmtime_wasi::p2::bindings::{cli, clocks, filesystem, random, sync};
use wasmtime_wasi::p2::{
    DynPollable, FsError, FsResult, Pollable, StreamError, StreamResult, subscribe,
};

use super::state::PluginState;

/// Most random bytes one call may ask for (a seed or a nonce needs a few dozen).
pub const MAX_RANDOM_BYTES: u64 = 64 << 10;

/// The wall clock plugins read: real time, truncated to whole seconds.
pub struct CoarseWallClock;

impl HostWallClock for CoarseWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn now(&self) -> Duration {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Duration::from_secs(now.as_secs())
    }
}

/// A clock subscription: ready (an instant already reached) or never (a later one).
struct Subscription {
    ready: bool,
}

#[wasmtime_wasi::async_trait]
impl Pollable for Subscription {
    async fn ready(&mut self) {
        if !self.ready {
            std::future::pending::<()>().await;
        }
    }
}

/// One instance's virtual monotonic clock: it stands still (see the module docs).
#[derive(Debug, Default, Clone, Copy)]
pub struct VirtualClock {
    now: u64,
}

/// What the error a wait traps with says.
pub const NO_WAITING: &str = "plugins may not wait";

/// The error a wait traps with.
fn no_waiting() -> wasmtime::Error {
    wasmtime::format_err!("the plugin polled with nothing ready: {NO_WAITING}")
}

/// Run `f` if it completes when first polled; otherwise trap: a plugin may not wait.
///
/// Every WASI operation a plugin can reach completes at once (closed or discarding
/// streams, a clock that stands still), so this never traps a well-behaved call; and it
/// needs no async runtime, so a plugin call may run on any thread, a tokio worker
/// included (wasmtime-wasi's own synchronous bindings enter tokio's `block_on`, which
/// panics there).
fn now<F: Future>(f: F) -> wasmtime::Result<F::Output> {
    let mut f = std::pin::pin!(f);
    match f
        .as_mut()
        .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    {
        std::task::Poll::Ready(out) => Ok(out),
        std::task::Poll::Pending => Err(no_waiting()),
    }
}

/// Warden's `wasi:io/poll` and `wasi:io/streams`: they answer with what is ready now, and
/// trap where the standard ones would wait.
pub struct NoWaiting<'a>(&'a mut ResourceTable);

impl sync::io::poll::Host for NoWaiting<'_> {
    fn poll(&mut self, pollables: Vec<Resource<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
        if pollables.is_empty() {
            return Err(wasmtime::format_err!("empty poll list"));
        }
        let mut ready = Vec::new();
        for (i, pollable) in pollables.into_iter().enumerate() {
            if HostPollable::ready(self, pollable)? {
                ready.push(u32::try_from(i)?);
            }
        }
        if ready.is_empty() {
            return Err(no_waiting());
        }
        Ok(ready)
    }
}

impl HostPollable for NoWaiting<'_> {
    fn ready(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<bool> {
        now(AsyncPollable::ready(self.0, pollable))?
    }

    fn block(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        if HostPollable::ready(self, pollable)? {
            Ok(())
        } else {
            Err(no_waiting())
        }
    }

    fn drop(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        AsyncPollable::drop(self.0, pollable)
    }
}

impl streams::Host for NoWaiting<'_> {
    fn convert_stream_error(&mut self, err: StreamError) -> wasmtime::Result<streams::StreamError> {
        streams::Host::convert_stream_error(self.0, err)
    }
}

impl streams::HostInputStream for NoWaiting<'_> {
    fn drop(&mut self, stream: Resource<InputStream>) -> wasmtime::Result<()> {
        now(AsyncInput::drop(self.0, stream))?
    }

    fn read(&mut self, stream: Resource<InputStream>, len: u64) -> StreamResult<Vec<u8>> {
        streams::HostInputStream::read(self.0, stream, len)
    }

    fn blocking_read(&mut self, stream: Resource<InputStream>, len: u64) -> StreamResult<Vec<u8>> {
        now(AsyncInput::blocking_read(self.0, stream, len)).map_err(StreamError::Trap)?
    }

    fn skip(&mut self, stream: Resource<InputStream>, len: u64) -> StreamResult<u64> {
        streams::HostInputStream::skip(self.0, stream, len)
    }

    fn blocking_skip(&mut self, stream: Resource<InputStream>, len: u64) -> StreamResult<u64> {
        now(AsyncInput::blocking_skip(self.0, stream, len)).map_err(StreamError::Trap)?
    }

    fn subscribe(
        &mut self,
        stream: Resource<InputStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        streams::HostInputStream::subscribe(self.0, stream)
    }
}

impl streams::HostOutputStream for NoWaiting<'_> {
    fn drop(&mut self, stream: Resource<OutputStream>) -> wasmtime::Result<()> {
        now(AsyncOutput::drop(self.0, stream))?
    }

    fn check_write(&mut self, stream: Resource<OutputStream>) -> StreamResult<u64> {
        streams::HostOutputStream::check_write(self.0, stream)
    }

    fn write(&mut self, stream: Resource<OutputStream>, bytes: Vec<u8>) -> StreamResult<()> {
        streams::HostOutputStream::write(self.0, stream, bytes)
    }

    fn blocking_write_and_flush(
        &mut self,
        stream: Resource<OutputStream>,
        bytes: Vec<u8>,
    ) -> StreamResult<()> {
        now(AsyncOutput::blocking_write_and_flush(self.0, stream, bytes))
            .map_err(StreamError::Trap)?
    }

    fn blocking_write_zeroes_and_flush(
        &mut self,
        stream: Resource<OutputStream>,
        len: u64,
    ) -> StreamResult<()> {
        now(AsyncOutput::blocking_write_zeroes_and_flush(
            self.0, stream, len,
        ))
        .map_err(StreamError::Trap)?
    }

    fn subscribe(
        &mut self,
        stream: Resource<OutputStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        streams::HostOutputStream::subscribe(self.0, stream)
    }

    fn write_zeroes(&mut self, stream: Resource<OutputStream>, len: u64) -> StreamResult<()> {
        streams::HostOutputStream::write_zeroes(self.0, stream, len)
    }

    fn flush(&mut self, stream: Resource<OutputStream>) -> StreamResult<()> {
        streams::HostOutputStream::flush(self.0, stream)
    }

    fn blocking_flush(&mut self, stream: Resource<OutputStream>) -> StreamResult<()> {
        now(AsyncOutput::blocking_flush(self.0, stream)).map_err(StreamError::Trap)?
    }

    fn splice(
        &mut self,
        dst: Resource<OutputStream>,
        src: Resource<InputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        streams::HostOutputStream::splice(self.0, dst, src, len)
    }

    fn blocking_splice(
        &mut self,
        dst: Resource<OutputStream>,
        src: Resource<InputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        now(AsyncOutput::blocking_splice(self.0, dst, src, len)).map_err(StreamError::Trap)?
    }
}

/// Warden's `wasi:filesystem/types`. No directory is preopened, so a plugin never holds a
/// descriptor and none of these can be reached; each traps rather than touch a file.
pub struct NoFiles;

fn no_files() -> wasmtime::Error {
    wasmtime::format_err!("plugins have no files")
}

impl fs::Host for NoFiles {
    fn convert_error_code(&mut self, err: FsError) -> wasmtime::Result<fs::ErrorCode> {
        Err(wasmtime::format_err!("{err}"))
    }

    fn filesystem_error_code(
        &mut self,
        _err: Resource<streams::Error>,
    ) -> wasmtime::Result<Option<fs::ErrorCode>> {
        Ok(None)
    }
}

/// The error types a trap travels in.
trait Trapping {
    fn trapping(e: wasmtime::Error) -> Self;
}

impl Trapping for wasmtime::Error {
    fn trapping(e: wasmtime::Error) -> Self {
        e
    }
}

impl Trapping for FsError {
    fn trapping(e: wasmtime::Error) -> Self {
        FsError::trap(e)
    }
}

/// Descriptor methods that all trap (see [`NoFiles`]).
macro_rules! no_files {
    ($( fn $name:ident(&mut self $(, $arg:ident: $ty:ty)*) -> $ret:ty; )*) => {
        $(
            fn $name(&mut self $(, $arg: $ty)*) -> $ret {
                let _ = ($($arg,)*);
                Err(Trapping::trapping(no_files()))
            }
        )*
    };
}

type Fd = Resource<fs::Descriptor>;

impl fs::HostDescriptor for NoFiles {
    no_files! {
        fn advise(&mut self, fd: Fd, offset: u64, len: u64, advice: fs::Advice) -> FsResult<()>;
        fn sync_data(&mut self, fd: Fd) -> FsResult<()>;
        fn get_flags(&mut self, fd: Fd) -> FsResult<fs::DescriptorFlags>;
        fn get_type(&mut self, fd: Fd) -> FsResult<fs::DescriptorType>;
        fn set_size(&mut self, fd: Fd, size: u64) -> FsResult<()>;
        fn set_times(&mut self, fd: Fd, a: fs::NewTimestamp, m: fs::NewTimestamp) -> FsResult<()>;
        fn read(&mut self, fd: Fd, len: u64, offset: u64) -> FsResult<(Vec<u8>, bool)>;
        fn write(&mut self, fd: Fd, buf: Vec<u8>, offset: u64) -> FsResult<u64>;
        fn read_directory(&mut self, fd: Fd) -> FsResult<Resource<fs::DirectoryEntryStream>>;
        fn sync(&mut self, fd: Fd) -> FsResult<()>;
        fn create_directory_at(&mut self, fd: Fd, path: String) -> FsResult<()>;
        fn stat(&mut self, fd: Fd) -> FsResult<fs::DescriptorStat>;
        fn stat_at(&mut self, fd: Fd, f: fs::PathFlags, path: String) -> FsResult<fs::DescriptorStat>;
        fn set_times_at(
            &mut self, fd: Fd, f: fs::PathFlags, path: String, a: fs::NewTimestamp,
            m: fs::NewTimestamp
        ) -> FsResult<()>;
        fn link_at(
            &mut self, fd: Fd, f: fs::PathFlags, old: String, new_fd: Fd, new: String
        ) -> FsResult<()>;
        fn open_at(
            &mut self, fd: Fd, f: fs::PathFlags, path: String, o: fs::OpenFlags,
            d: fs::DescriptorFlags
        ) -> FsResult<Fd>;
        fn readlink_at(&mut self, fd: Fd, path: String) -> FsResult<String>;
        fn remove_directory_at(&mut self, fd: Fd, path: String) -> FsResult<()>;
        fn rename_at(&mut self, fd: Fd, old: String, new_fd: Fd, new: String) -> FsResult<()>;
        fn symlink_at(&mut self, fd: Fd, src: String, dest: String) -> FsResult<()>;
        fn unlink_file_at(&mut self, fd: Fd, path: String) -> FsResult<()>;
        fn read_via_stream(&mut self, fd: Fd, offset: u64) -> FsResult<Resource<InputStream>>;
        fn write_via_stream(&mut self, fd: Fd, offset: u64) -> FsResult<Resource<OutputStream>>;
        fn append_via_stream(&mut self, fd: Fd) -> FsResult<Resource<OutputStream>>;
        fn is_same_object(&mut self, a: Fd, b: Fd) -> wasmtime::Result<bool>;
        fn metadata_hash(&mut self, fd: Fd) -> FsResult<fs::MetadataHashValue>;
        fn metadata_hash_at(
            &mut self, fd: Fd, f: fs::PathFlags, path: String
        ) -> FsResult<fs::MetadataHashValue>;
        fn drop(&mut self, fd: Fd) -> wasmtime::Result<()>;
    }
}

impl fs::HostDirectoryEntryStream for NoFiles {
    no_files! {
        fn read_directory_entry(
            &mut self, s: Resource<fs::DirectoryEntryStream>
        ) -> FsResult<Option<fs::DirectoryEntry>>;
        fn drop(&mut self, s: Resource<fs::DirectoryEntryStream>) -> wasmtime::Result<()>;
    }
}

impl HasData for NoFiles {
    type Data<'a> = NoFiles;
}

struct Polls;

impl HasData for Polls {
    type Data<'a> = NoWaiting<'a>;
}

/// The view of a store that the clock functions need.
pub struct ClockView<'a> {
    clock: &'a mut VirtualClock,
    table: &'a mut ResourceTable,
}

impl ClockView<'_> {
    fn subscription(&mut self, ready: bool) -> wasmtime::Result<Resource<DynPollable>> {
        let subscription = self.table.push(Subscription { ready })?;
        subscribe(self.table, subscription)
    }
}

impl monotonic_clock::Host for ClockView<'_> {
    fn now(&mut self) -> wasmtime::Result<Instant> {
        Ok(self.clock.now)
    }

    fn resolution(&mut self) -> wasmtime::Result<Instant> {
        Ok(1)
    }

    fn subscribe_instant(&mut self, when: Instant) -> wasmtime::Result<Resource<DynPollable>> {
        let ready = when <= self.clock.now;
        self.subscription(ready)
    }

    fn subscribe_duration(
        &mut self,
        duration: WasiDuration,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        self.subscription(duration == 0)
    }
}

struct Clocks;

impl HasData for Clocks {
    type Data<'a> = ClockView<'a>;
}

struct Io;

impl HasData for Io {
    type Data<'a> = &'a mut ResourceTable;
}

fn clock_view(state: &mut PluginState) -> ClockView<'_> {
    let (clock, table) = state.clock_and_table();
    ClockView { clock, table }
}

fn table(state: &mut PluginState) -> &mut ResourceTable {
    state.clock_and_table().1
}

/// Add the plugin WASI surface to `linker`.
pub fn add_to_linker(l: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    type T = PluginState;
    use wasmtime_wasi::cli::{WasiCli, WasiCliView};
    use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView};
    use wasmtime_wasi::filesystem::{WasiFilesystem, WasiFilesystemView};
    use wasmtime_wasi::random::{WasiRandom, WasiRandomView};

    wasmtime_wasi::p2::bindings::io::error::add_to_linker::<T, Io>(l, table)?;
    sync::io::poll::add_to_linker::<T, Polls>(l, |t| NoWaiting(table(t)))?;
    sync::io::streams::add_to_linker::<T, Polls>(l, |t| NoWaiting(table(t)))?;

    clocks::wall_clock::add_to_linker::<T, WasiClocks>(l, T::clocks)?;
    monotonic_clock::add_to_linker::<T, Clocks>(l, clock_view)?;

    random::random::add_to_linker::<T, WasiRandom>(l, T::random)?;
    random::insecure::add_to_linker::<T, WasiRandom>(l, T::random)?;
    random::insecure_seed::add_to_linker::<T, WasiRandom>(l, T::random)?;

    filesystem::preopens::add_to_linker::<T, WasiFilesystem>(l, T::filesystem)?;
    fs::add_to_linker::<T, NoFiles>(l, |_| NoFiles)?;

    cli::exit::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::environment::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::stdin::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::stdout::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::stderr::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_input::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_output::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_stdin::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_stdout::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_stderr::add_to_linker::<T, WasiCli>(l, T::cli)?;
    Ok(())
}
