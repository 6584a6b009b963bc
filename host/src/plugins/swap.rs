//! The live plugin set and its changes: swap, reload and rollback, one at a time, each
//! recorded in the audit trail. A request takes one snapshot ([`Registry::current`]) and
//! uses it to the end, so a change never alters the plugins under a request in flight; a
//! new plugin is loaded and validated off to the side first, and a failure leaves the old
//! one live.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use arc_swap::ArcSwap;

use super::audit::*;
use super::cache::DiskCache;
use super::loader::{LoadError, PluginSource};
use super::registry::*;
use super::{FaultSink, PluginStatus, Slot};

/// Rollback targets: each slot's previous plugin.
#[derive(Default)]
struct Previous {
    slots: [Option<AnyLoaded>; 3],
}

impl Previous {
    fn slot(&mut self, slot: Slot) -> &mut Option<AnyLoaded> {
        &mut self.slots[slot.index()]
    }
}

/// The live plugin set, its rollback targets and its audit trail.
pub struct Registry {
    current: ArcSwap<PluginSet>,
    sink: Arc<dyn FaultSink>,
    cache: Option<DiskCache>,
    /// Held for the whole of a change, so changes apply one at a time; requests and
    /// status reads never take it.
    previous: Mutex<Previous>,
    /// Which slots have a rollback target, as of the last change: what status reads see,
    /// so that they never wait behind a change (which may compile for seconds).
    rollback_ready: [AtomicBool; 3],
    audit: Mutex<VecDeque<AuditEvent>>,
    audit_log: Option<AuditLog>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("current", &*self.current.load())
            .finish()
    }
}

/// Tell `sink` which plugins are live, so their fault counters exist at zero.
fn announce(sink: &dyn FaultSink, set: &PluginSet) {
    for status in set.describe() {
        sink.plugin_live(status.slot, &status.plugin);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Registry {
    /// A registry serving `set`; new plugins are compiled through `cache`.
    pub fn new(set: PluginSet, sink: Arc<dyn FaultSink>, cache: Option<DiskCache>) -> Self {
        announce(&*sink, &set);
        Self {
            current: ArcSwap::from_pointee(set),
            sink,
            cache,
            previous: Mutex::new(Previous::default()),
            rollback_ready: Default::default(),
            audit: Mutex::new(VecDeque::with_capacity(AUDIT_EVENTS_KEPT)),
            audit_log: None,
        }
    }

    /// Also append every audit event to `log`.
    pub fn with_audit_log(mut self, log: Option<AuditLog>) -> Self {
        self.audit_log = log;
        self
    }

    /// The set a new request should use, for the whole of that request.
    pub fn current(&self) -> Arc<PluginSet> {
        self.current.load_full()
    }

    fn lock_previous(&self) -> MutexGuard<'_, Previous> {
        self.previous.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Each slot's live plugin, as operators see it. Never waits for a change in progress.
    pub fn status(&self) -> Vec<PluginStatus> {
        let live = self.current();
        Slot::ALL
            .iter()
            .map(|&slot| live.get(slot).status(self.rollback_available(slot)))
            .collect()
    }

    fn rollback_available(&self, slot: Slot) -> bool {
        self.rollback_ready[slot.index()].load(Ordering::Acquire)
    }

    /// Publish which slots have a rollback target; called under the writer lock.
    fn publish(&self, previous: &mut Previous) {
        for slot in Slot::ALL {
            let ready = previous.slot(slot).is_some();
            self.rollback_ready[slot.index()].store(ready, Ordering::Release);
        }
    }

    /// Run `f` while holding the lock every change holds, as a change that is compiling
    /// would. For tests that reads do not wait behind changes. Never in production.
    #[doc(hidden)]
    pub fn while_changing_for_tests<R>(&self, f: impl FnOnce() -> R) -> R {
        let _change = self.lock_previous();
        f()
    }

    /// The most recent audit events, oldest first.
    pub fn audit_events(&self) -> Vec<AuditEvent> {
        self.audit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    fn record(&self, event: AuditEvent) {
        let AuditEvent {
            slot,
            trigger,
            outcome,
            ..
        } = event;
        tracing::info!(
            target: "warden::audit",
            slot = slot.as_str(),
            trigger = trigger.as_str(),
            outcome = outcome.as_str(),
            plugin = %event.plugin,
            old_sha256 = %event.old_sha256,
            new_sha256 = event.new_sha256.as_deref().unwrap_or("-"),
            reason = event.reason.as_deref().unwrap_or("-"),
            took_ms = event.took_ms,
            "plugin change"
        );
        self.sink.swap(slot, trigger, outcome);
        if let Some(log) = &self.audit_log {
            log.append(&event);
        }
        let mut audit = self.audit.lock().unwrap_or_else(|e| e.into_inner());
        if audit.len() == AUDIT_EVENTS_KEPT {
            audit.pop_front();
        }
        audit.push_back(event);
    }

    /// A source for `slot` with these bytes that keeps the live plugin's configuration
    /// (unless `config` is given), bounds and failure policy.
    pub fn source_for(
        &self,
        slot: Slot,
        name: String,
        bytes: Arc<[u8]>,
        expected_sha256: Option<String>,
        config: Option<String>,
    ) -> PluginSource {
        let (live_config, limits, failure) = self.current().get(slot).settings();
        PluginSource {
            slot,
            name,
            bytes,
            expected_sha256,
            config: config.unwrap_or(live_config),
            limits,
            failure,
        }
    }

    /// Load `source` beside the live set and, if it validates, make it live in its slot.
    /// On error the live set is untouched. Recorded as an audit event with trigger `api`.
    pub fn replace(&self, source: &PluginSource) -> Result<PluginStatus, LoadError> {
        self.apply(std::slice::from_ref(source), Trigger::Api)
            .map(|mut s| s.remove(0))
    }

    /// The one path every change takes (admin API, reload, signal): validate each source
    /// off to the side, then make all of them live in one atomic swap, or none of them.
    /// A source identical to its slot's live plugin is left alone. Requests in flight keep
    /// the set they started with. Returns the status of each named slot.
    pub fn apply(
        &self,
        sources: &[PluginSource],
        trigger: Trigger,
    ) -> Result<Vec<PluginStatus>, LoadError> {
        let mut previous = self.lock_previous();
        let live = self.current();
        let mut next: Option<PluginSet> = None;
        let mut events = Vec::new();
        for source in sources {
            let started = Instant::now();
            let old = live.get(source.slot);
            let mut event = AuditEvent {
                at_ms: now_ms(),
                slot: source.slot,
                trigger,
                outcome: Outcome::Accepted,
                plugin: source.name.clone(),
                old_sha256: old.sha256().to_string(),
                new_sha256: Some(hex::encode(Sha256::digest(&source.bytes))),
                reason: None,
                took_ms: 0.0,
            };
            // Integrity first: an identical plugin is left alone only if it is the one pinned.
            let loaded = source.verify().and_then(|_| {
                if old.same_as(source) {
                    Ok(None)
                } else {
                    AnyLoaded::load(
                        live.runtime(),
                        source,
                        self.sink.clone(),
                        self.cache.as_ref(),
                    )
                    .map(Some)
                }
            });
            match loaded {
                Ok(None) => {
                    event.outcome = Outcome::Unchanged;
                    events.push(event);
                }
                Ok(Some(plugin)) => {
                    event.took_ms = started.elapsed().as_secs_f64() * 1e3;
                    events.push(event);
                    next = Some(next.as_ref().unwrap_or(&live).with(plugin));
                }
                Err(e) => {
                    event.outcome = Outcome::Refused;
                    event.reason = Some(e.to_string());
                    event.took_ms = started.elapsed().as_secs_f64() * 1e3;
                    // The others in this change were valid but do not go live either.
                    for other in &mut events {
                        if other.outcome == Outcome::Accepted {
                            other.outcome = Outcome::Refused;
                            other.reason = Some(format!("refused with the {} plugin", source.slot));
                        }
                    }
                    events.push(event);
                    for event in events {
                        self.record(event);
                    }
                    return Err(e);
                }
            }
        }
        if let Some(next) = next {
            for event in &events {
                if event.outcome == Outcome::Accepted {
                    *previous.slot(event.slot) = Some(live.get(event.slot));
                }
            }
            self.publish(&mut previous);
            announce(&*self.sink, &next);
            self.current.store(Arc::new(next));
        }
        for event in events {
            self.record(event);
        }
        let live = self.current();
        Ok(sources
            .iter()
            .map(|s| live.get(s.slot).status(previous.slot(s.slot).is_some()))
            .collect())
    }

    /// Put `slot`'s previous plugin back (the one it replaces becomes the new rollback
    /// target, so a second rollback undoes the first).
    pub fn rollback(&self, slot: Slot, trigger: Trigger) -> Result<PluginStatus, LoadError> {
        let mut previous = self.lock_previous();
        let live = self.current();
        let old = live.get(slot);
        let mut event = AuditEvent {
            at_ms: now_ms(),
            slot,
            trigger,
            outcome: Outcome::Accepted,
            plugin: String::new(),
            old_sha256: old.sha256().to_string(),
            new_sha256: None,
            reason: None,
            took_ms: 0.0,
        };
        let Some(target) = previous.slot(slot).take() else {
            let e = LoadError::NoRollback { slot };
            event.outcome = Outcome::Refused;
            event.reason = Some(e.to_string());
            event.plugin = old.status(false).plugin;
            self.record(event);
            return Err(e);
        };
        let status = target.status(true);
        event.plugin = status.plugin.clone();
        event.new_sha256 = Some(status.sha256.clone());
        let next = live.with(target);
        announce(&*self.sink, &next);
        self.current.store(Arc::new(next));
        *previous.slot(slot) = Some(old);
        self.publish(&mut previous);
        self.record(event);
        Ok(status)
    }
}
