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
//!   directory, so there is nothing to open.
//! - **Bounded transfers.** Random bytes are capped per call ([`MAX_RANDOM_BYTES`]); what a
//!   plugin hands the host in one call is capped by the store's hostcall fuel.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::HostWallClock;
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock::{
    self, Duration as WasiDuration, Instant,
};
use wasmtime_wasi::p2::bindings::sync::io::poll::HostPollable;
use wasmtime_wasi::p2::bindings::{cli, clocks, filesystem, random, sync};
use wasmtime_wasi::p2::{DynPollable, Pollable, subscribe};

use super::runtime::PluginState;

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

/// Warden's `wasi:io/poll`: answers with what is ready now, and traps where the standard
/// one would wait.
pub struct NoWaiting<'a>(&'a mut ResourceTable);

impl sync::io::poll::Host for NoWaiting<'_> {
    fn poll(&mut self, pollables: Vec<Resource<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
        if pollables.is_empty() {
            return Err(wasmtime::format_err!("empty poll list"));
        }
        let mut ready = Vec::new();
        for (i, pollable) in pollables.into_iter().enumerate() {
            if HostPollable::ready(self.0, pollable)? {
                ready.push(u32::try_from(i)?);
            }
        }
        if ready.is_empty() {
            return Err(no_waiting());
        }
        Ok(ready)
    }
}

impl sync::io::poll::HostPollable for NoWaiting<'_> {
    fn ready(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<bool> {
        HostPollable::ready(self.0, pollable)
    }

    fn block(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        if HostPollable::ready(self.0, pollable)? {
            Ok(())
        } else {
            Err(no_waiting())
        }
    }

    fn drop(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        HostPollable::drop(self.0, pollable)
    }
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
    sync::io::streams::add_to_linker::<T, Io>(l, table)?;

    clocks::wall_clock::add_to_linker::<T, WasiClocks>(l, T::clocks)?;
    monotonic_clock::add_to_linker::<T, Clocks>(l, clock_view)?;

    random::random::add_to_linker::<T, WasiRandom>(l, T::random)?;
    random::insecure::add_to_linker::<T, WasiRandom>(l, T::random)?;
    random::insecure_seed::add_to_linker::<T, WasiRandom>(l, T::random)?;

    filesystem::preopens::add_to_linker::<T, WasiFilesystem>(l, T::filesystem)?;
    sync::filesystem::types::add_to_linker::<T, WasiFilesystem>(l, T::filesystem)?;

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
