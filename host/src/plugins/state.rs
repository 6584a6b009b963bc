//! The data of one plugin store: its WASI context and resources, its memory cap, its
//! deadline, and its log lines, attributed, escaped and bounded.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::Slot;

/// Most log lines one plugin instance may write; further lines are dropped.
const MAX_LOG_LINES_PER_STORE: u32 = 32;
/// Most log lines one plugin may write per second over all its instances; the lines past
/// that are dropped and counted, and the count is logged once the second is over.
const MAX_LOG_LINES_PER_SECOND: u32 = 100;
/// Longest log line kept, in bytes (before escaping).
const MAX_LOG_LINE: usize = 512;

/// Enforces the memory cap and remembers that it was hit, so the fault is named right.
#[derive(Debug)]
pub(super) struct MemoryCap {
    pub(super) cap: usize,
    pub(super) exceeded: bool,
    /// The most linear memory the instance asked for, in bytes.
    pub(super) peak: usize,
}

impl wasmtime::ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.peak = self.peak.max(desired);
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

/// A plugin's log allowance per second, shared by all its instances, so that no number of
/// requests lets it flood the host's log.
#[derive(Debug, Default)]
pub struct LogBudget {
    /// (second the window started, lines written in it, lines dropped in it)
    window: Mutex<(u64, u32, u64)>,
}

impl LogBudget {
    /// Whether one more line may be written now. Returns the lines dropped in the previous
    /// window when a new one opens, so the caller can say so once.
    fn take(&self) -> (bool, u64) {
        let second = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let mut dropped_before = 0;
        if w.0 != second {
            dropped_before = w.2;
            *w = (second, 0, 0);
        }
        if w.1 < MAX_LOG_LINES_PER_SECOND {
            w.1 += 1;
            (true, dropped_before)
        } else {
            w.2 += 1;
            (false, dropped_before)
        }
    }
}

/// The data of one plugin [`wasmtime::Store`].
pub struct PluginState {
    pub(super) wasi: WasiCtx,
    pub(super) table: ResourceTable,
    pub(super) memory: MemoryCap,
    pub(super) clock: super::wasi::VirtualClock,
    pub(super) plugin: Arc<str>,
    pub(super) slot: Slot,
    pub(super) request_id: Option<Arc<str>>,
    pub(super) log_lines: u32,
    pub(super) log_budget: Arc<LogBudget>,
    /// When the current call's budget ends (wall clock).
    pub(super) deadline_at: Instant,
    /// Set when the epoch callback interrupted the guest for its deadline.
    pub(super) timed_out: bool,
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Whether `c` must not reach a log line as it is: control characters (line breaks and
/// terminal escapes among them), Unicode line and paragraph separators, and the
/// bidirectional overrides that can make a line read differently from what it says.
fn unsafe_in_log(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{061c}'
        )
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

/// `message` cut to at most `max` bytes (at a character boundary) with every character of
/// `unsafe_in_log` escaped (`\n`, `\r`, `\t`, `\u{1b}`), so that one call is one line and
/// nothing in it can pass for another line or another writer.
pub fn escape_log_message(message: &str, max: usize) -> String {
    let mut end = message.len().min(max);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let truncated = end < message.len();
    let message = &message[..end];
    let mut out = String::with_capacity(message.len());
    for c in message.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if unsafe_in_log(c) => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    if truncated {
        out.push('…');
    }
    out
}

impl PluginState {
    /// The instance's virtual clock and its resource table.
    pub(super) fn clock_and_table(
        &mut self,
    ) -> (&mut super::wasi::VirtualClock, &mut ResourceTable) {
        (&mut self.clock, &mut self.table)
    }

    /// A line from the guest's `log` import, attributed, escaped and bounded.
    pub(super) fn guest_log(&mut self, level: tracing::Level, message: &str) {
        if self.log_lines >= MAX_LOG_LINES_PER_STORE {
            return;
        }
        self.log_lines += 1;
        let plugin = &*self.plugin;
        let slot = self.slot.as_str();
        let (allowed, dropped) = self.log_budget.take();
        if dropped > 0 {
            tracing::warn!(
                plugin,
                slot,
                dropped,
                "a plugin logged more than {MAX_LOG_LINES_PER_SECOND} lines in a second; the rest were dropped"
            );
        }
        if !allowed {
            return;
        }
        let message = escape_log_message(message, MAX_LOG_LINE);
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

/// What every store of one plugin shares: who it is, and its log allowance.
#[derive(Debug, Clone)]
pub(super) struct StoreTag {
    pub(super) slot: Slot,
    pub(super) plugin: Arc<str>,
    pub(super) log: Arc<LogBudget>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_messages_are_one_line_and_nothing_else() {
        let forged = "ok\n2026-12-01T00:00:00Z  INFO warden::audit: plugin change accepted\r\u{1b}[2J\u{2028}\u{202e}end\t.";
        let line = escape_log_message(forged, 512);
        assert_eq!(
            line,
            "ok\\n2026-12-01T00:00:00Z  INFO warden::audit: plugin change accepted\\r\\u{1b}[2J\\u{2028}\\u{202e}end\\t."
        );
        assert!(!line.chars().any(unsafe_in_log));
        // Cut at a character boundary, and said so.
        let cut = escape_log_message(&"é".repeat(300), 511);
        assert_eq!(cut, format!("{}…", "é".repeat(255)));
        assert_eq!(escape_log_message("plain", 512), "plain");
    }

    #[test]
    fn a_plugins_log_budget_is_per_second() {
        let budget = LogBudget::default();
        let allowed = (0..MAX_LOG_LINES_PER_SECOND + 50)
            .filter(|_| budget.take().0)
            .count();
        // Unless the second turned over mid-way, exactly the budget is allowed.
        assert!(
            allowed == MAX_LOG_LINES_PER_SECOND as usize
                || allowed > MAX_LOG_LINES_PER_SECOND as usize
                    && allowed <= 2 * MAX_LOG_LINES_PER_SECOND as usize,
            "{allowed}"
        );
    }
}
