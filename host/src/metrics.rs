//! Aggregate metrics. Only counters and histograms: never per-request raw values, and a
//! hard cap on the number of label sets so no caller can grow memory without bound.

use std::collections::HashSet;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::plugins::{Fault, FaultSink, Outcome, Slot, Trigger};

/// Most distinct label sets recorded for requests; later ones are folded into an
/// `overflow` series.
pub const MAX_LABEL_SETS: usize = 1000;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FaultLabels {
    slot: &'static str,
    plugin: String,
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SwapLabels {
    slot: &'static str,
    trigger: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

/// The host's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<Vec<(String, String)>, Counter>,
    plugin_faults: Family<FaultLabels, Counter>,
    engine_errors: Family<ModelLabels, Counter>,
    plugin_swaps: Family<SwapLabels, Counter>,
    unlabelled: Counter,
    label_sets: Mutex<HashSet<Vec<(String, String)>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Empty metrics.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("warden");
        let requests = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "requests",
            "API requests served, by policy labels",
            requests.clone(),
        );
        let plugin_faults = Family::<FaultLabels, Counter>::default();
        registry.register(
            "plugin_faults",
            "Plugin calls that trapped, timed out, hit the memory cap or returned malformed results",
            plugin_faults.clone(),
        );
        let engine_errors = Family::<ModelLabels, Counter>::default();
        registry.register(
            "engine_errors",
            "Requests the model failed on (answered 500), by model",
            engine_errors.clone(),
        );
        let plugin_swaps = Family::<SwapLabels, Counter>::default();
        registry.register(
            "plugin_swaps",
            "Requested plugin changes, by slot, trigger and outcome",
            plugin_swaps.clone(),
        );
        let unlabelled = Counter::default();
        registry.register(
            "requests_unlabelled",
            "Requests left out of the labelled series because the metrics policy faulted \
             and fails closed",
            unlabelled.clone(),
        );
        Self {
            registry,
            requests,
            plugin_faults,
            engine_errors,
            plugin_swaps,
            unlabelled,
            label_sets: Mutex::new(HashSet::new()),
        }
    }

    /// Count one request under `labels` (already validated by the plugin layer).
    pub fn record_request(&self, mut labels: Vec<(String, String)>) {
        labels.sort();
        let mut sets = self.label_sets.lock().unwrap_or_else(|e| e.into_inner());
        if !sets.contains(&labels) {
            if sets.len() >= MAX_LABEL_SETS {
                labels = vec![("overflow".into(), "true".into())];
            } else {
                sets.insert(labels.clone());
            }
        }
        drop(sets);
        self.requests.get_or_create(&labels).inc();
    }

    /// Count one request the metrics policy could not label.
    pub fn record_unlabelled_request(&self) {
        self.unlabelled.inc();
    }

    /// Plugin changes counted for `slot` with `outcome`, over all triggers.
    pub fn swap_count(&self, slot: Slot, outcome: Outcome) -> u64 {
        [
            Trigger::Admin,
            Trigger::Rollback,
            Trigger::Reload,
            Trigger::Sighup,
            Trigger::Api,
        ]
        .into_iter()
        .filter_map(|trigger| {
            self.plugin_swaps
                .get(&SwapLabels {
                    slot: slot.as_str(),
                    trigger: trigger.as_str(),
                    outcome: outcome.as_str(),
                })
                .map(|c| c.get())
        })
        .sum()
    }

    /// Count one engine failure of `model`.
    pub fn record_engine_error(&self, model: &str) {
        self.engine_errors
            .get_or_create(&ModelLabels {
                model: model.to_string(),
            })
            .inc();
    }

    /// Engine failures counted for `model`.
    pub fn engine_error_count(&self, model: &str) -> u64 {
        self.engine_errors
            .get(&ModelLabels {
                model: model.to_string(),
            })
            .map_or(0, |c| c.get())
    }

    /// Faults counted for `slot` and `kind`, over all plugins.
    pub fn fault_count(&self, slot: &str, kind: &str) -> u64 {
        let mut text = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text.lines()
            .filter(|l| l.starts_with("warden_plugin_faults_total{"))
            .filter(|l| {
                l.contains(&format!("slot=\"{slot}\"")) && l.contains(&format!("kind=\"{kind}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

impl FaultSink for Metrics {
    fn fault(&self, fault: &Fault) {
        self.plugin_faults
            .get_or_create(&FaultLabels {
                slot: fault.slot.as_str(),
                plugin: fault.plugin.to_string(),
                kind: fault.kind.as_str(),
            })
            .inc();
    }

    fn swap(&self, slot: Slot, trigger: Trigger, outcome: Outcome) {
        self.plugin_swaps
            .get_or_create(&SwapLabels {
                slot: slot.as_str(),
                trigger: trigger.as_str(),
                outcome: outcome.as_str(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_sets_are_capped() {
        let m = Metrics::new();
        for i in 0..MAX_LABEL_SETS + 50 {
            m.record_request(vec![("tenant".into(), format!("t{i}"))]);
        }
        assert_eq!(m.label_sets.lock().unwrap().len(), MAX_LABEL_SETS);
        let text = m.encode();
        assert!(
            text.contains("warden_requests_total{overflow=\"true\"} 50"),
            "{text}"
        );
    }

    #[test]
    fn faults_are_counted() {
        let m = Metrics::new();
        let f = Fault {
            slot: crate::plugins::Slot::Sanitizer,
            plugin: "p".into(),
            kind: crate::plugins::FaultKind::Deadline,
        };
        m.fault(&f);
        m.fault(&f);
        assert_eq!(m.fault_count("sanitizer", "deadline"), 2);
        assert_eq!(m.fault_count("auth", "deadline"), 0);
    }
}
