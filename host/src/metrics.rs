//! Aggregate metrics. Only counters and histograms: never per-request raw values, and a
//! hard cap on the number of label sets so no caller can grow memory without bound.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::plugins::{Fault, FaultSink, Outcome, Slot, Trigger, Visibility};

mod exposition;
use exposition::sample_labels;
pub use exposition::{OPENMETRICS, PROMETHEUS_TEXT, to_prometheus_text};

/// Most distinct label sets recorded for requests; later ones are folded into an
/// `overflow` series.
pub const MAX_LABEL_SETS: usize = 1000;

/// A label value that is escaped as the exposition formats require (`\\`, `\"`, `\n`), in
/// text 0.0.4 and OpenMetrics alike, so that no value (a tenant from the auth plugin, a
/// label from the metrics policy, a plugin name) can end its series and start another.
#[derive(Debug, Clone, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct LabelValue(String);

impl LabelValue {
    /// Wrap a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
}

impl EncodeLabelValue for LabelValue {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        let mut rest = self.0.as_str();
        while let Some(i) = rest.find(['\\', '"', '\n']) {
            encoder.write_str(&rest[..i])?;
            encoder.write_str(match rest.as_bytes()[i] {
                b'\\' => "\\\\",
                b'"' => "\\\"",
                _ => "\\n",
            })?;
            rest = &rest[i + 1..];
        }
        encoder.write_str(rest)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FaultLabels {
    slot: &'static str,
    plugin: LabelValue,
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SwapLabels {
    slot: &'static str,
    trigger: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
    status_class: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SlotLabels {
    slot: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: LabelValue,
}

impl ModelLabels {
    fn of(model: &str) -> Self {
        Self {
            model: LabelValue::new(model),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Why a Realtime session closed, for `warden_realtime_closes_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed it, or its connection went away.
    Client,
    /// No client event for the idle timeout.
    Idle,
    /// The client fell too far behind its events (1008).
    SlowReader,
    /// The server is shutting down (1001).
    Shutdown,
    /// After a change of the auth plugin, the session's credentials were refused (4001).
    Unauthorized,
    /// The client sent a message larger than an event may be (1009).
    TooLarge,
}

impl CloseReason {
    /// Every reason, for series exported at zero.
    pub const ALL: [Self; 6] = [
        Self::Client,
        Self::Idle,
        Self::SlowReader,
        Self::Shutdown,
        Self::Unauthorized,
        Self::TooLarge,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Idle => "idle",
            Self::SlowReader => "slow_reader",
            Self::Shutdown => "shutdown",
            Self::Unauthorized => "unauthorized",
            Self::TooLarge => "too_large",
        }
    }
}

/// The Realtime API's counters, held where a session's events pass many times a second:
/// no label lookup on that path.
#[derive(Debug, Clone, Default)]
pub struct RealtimeCounters {
    /// Sessions open now.
    pub open: Gauge,
    /// Client events received.
    pub events_in: Counter,
    /// Server events sent.
    pub events_out: Counter,
    closes: Family<ReasonLabels, Counter>,
}

impl RealtimeCounters {
    /// Count a session's close.
    pub fn closed(&self, reason: CloseReason) {
        self.closes
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Closes counted for `reason`.
    pub fn closes(&self, reason: CloseReason) -> u64 {
        self.closes
            .get(&ReasonLabels {
                reason: reason.as_str(),
            })
            .map_or(0, |c| c.get())
    }
}

/// One request's label set, as recorded.
type RequestLabels = Vec<(String, LabelValue)>;

/// The host's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    families: Vec<String>,
    requests: Family<RequestLabels, Counter>,
    plugin_faults: Family<FaultLabels, Counter>,
    engine_errors: Family<ModelLabels, Counter>,
    plugin_swaps: Family<SwapLabels, Counter>,
    unlabelled: Counter,
    request_duration: Family<RouteLabels, Histogram>,
    plugin_call_duration: Family<SlotLabels, Histogram>,
    time_to_first_token: Family<ModelLabels, Histogram>,
    time_per_output_token: Family<ModelLabels, Histogram>,
    prompt_tokens: Family<ModelLabels, Counter>,
    generated_tokens: Family<ModelLabels, Counter>,
    streams_in_flight: Gauge,
    stream_duration: Family<ModelLabels, Histogram>,
    breaker_state: Family<ModelLabels, Gauge>,
    queue_depth: Family<ModelLabels, Gauge>,
    queue_wait: Family<ModelLabels, Histogram>,
    queue_timeouts: Family<ModelLabels, Counter>,
    /// The Realtime API's sessions and events.
    pub realtime: RealtimeCounters,
    label_sets: Mutex<HashSet<RequestLabels>>,
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
        let mut families = Vec::new();
        let requests = Family::<RequestLabels, Counter>::default();
        register(
            &mut registry,
            &mut families,
            "requests",
            "API requests served, by policy labels",
            requests.clone(),
        );
        let plugin_faults = Family::<FaultLabels, Counter>::default();
        register(
            &mut registry,
            &mut families,
            "plugin_faults",
            "Plugin calls that trapped, timed out, hit the memory cap or returned malformed results",
            plugin_faults.clone(),
        );
        let engine_errors = Family::<ModelLabels, Counter>::default();
        register(
            &mut registry,
            &mut families,
            "engine_errors",
            "Requests the model failed on (answered 500), by model",
            engine_errors.clone(),
        );
        let plugin_swaps = Family::<SwapLabels, Counter>::default();
        register(
            &mut registry,
            &mut families,
            "plugin_swaps",
            "Requested plugin changes, by slot, trigger and outcome",
            plugin_swaps.clone(),
        );
        let unlabelled = Counter::default();
        register(
            &mut registry,
            &mut families,
            "requests_unlabelled",
            "Requests left out of the labelled series because the metrics policy faulted \
             and fails closed",
            unlabelled.clone(),
        );
        // Fixed buckets (bounded memory), fine enough for p50/p95/p99: factor 1.5 gives
        // quantile estimates within about 25 %.
        let request_duration =
            Family::<RouteLabels, Histogram>::new_with_constructor(|| seconds(0.0005, 30));
        register(
            &mut registry,
            &mut families,
            "request_duration_seconds",
            "Time from the request's arrival to its response head (for streams: until the \
             stream starts), by route and status class",
            request_duration.clone(),
        );
        let plugin_call_duration =
            Family::<SlotLabels, Histogram>::new_with_constructor(|| seconds(0.00001, 30));
        register(
            &mut registry,
            &mut families,
            "plugin_call_duration_seconds",
            "Host to plugin calls, queueing for a plugin thread included, by slot",
            plugin_call_duration.clone(),
        );
        let time_to_first_token =
            Family::<ModelLabels, Histogram>::new_with_constructor(|| seconds(0.005, 26));
        register(
            &mut registry,
            &mut families,
            "time_to_first_token_seconds",
            "From the engine accepting a generation (queue wait and prefill included) to its \
             first token",
            time_to_first_token.clone(),
        );
        let time_per_output_token =
            Family::<ModelLabels, Histogram>::new_with_constructor(|| seconds(0.001, 22));
        register(
            &mut registry,
            &mut families,
            "time_per_output_token_seconds",
            "Mean time per generated token after the first, one observation per generation",
            time_per_output_token.clone(),
        );
        let prompt_tokens = Family::<ModelLabels, Counter>::default();
        register(
            &mut registry,
            &mut families,
            "prompt_tokens",
            "Prompt tokens of finished generations",
            prompt_tokens.clone(),
        );
        let generated_tokens = Family::<ModelLabels, Counter>::default();
        register(
            &mut registry,
            &mut families,
            "generated_tokens",
            "Tokens generated by finished generations",
            generated_tokens.clone(),
        );
        let streams_in_flight = Gauge::default();
        register(
            &mut registry,
            &mut families,
            "streams_in_flight",
            "Server-sent event streams open now",
            streams_in_flight.clone(),
        );
        let stream_duration =
            Family::<ModelLabels, Histogram>::new_with_constructor(|| seconds(0.01, 30));
        register(
            &mut registry,
            &mut families,
            "stream_duration_seconds",
            "Time from a stream's start to its end (finished, failed, or the client left)",
            stream_duration.clone(),
        );
        let breaker_state = Family::<ModelLabels, Gauge>::default();
        register(
            &mut registry,
            &mut families,
            "circuit_breaker_state",
            "Each model's circuit breaker: 0 closed, 1 half-open, 2 open",
            breaker_state.clone(),
        );
        let queue_depth = Family::<ModelLabels, Gauge>::default();
        register(
            &mut registry,
            &mut families,
            "queue_depth",
            "Requests waiting for each model's engine",
            queue_depth.clone(),
        );
        let queue_wait =
            Family::<ModelLabels, Histogram>::new_with_constructor(|| seconds(0.0001, 32));
        register(
            &mut registry,
            &mut families,
            "queue_wait_seconds",
            "How long requests waited before the engine took them, by model",
            queue_wait.clone(),
        );
        let queue_timeouts = Family::<ModelLabels, Counter>::default();
        register(
            &mut registry,
            &mut families,
            "queue_timeouts",
            "Requests that waited longer than the queue timeout and got 503, by model",
            queue_timeouts.clone(),
        );
        let realtime = RealtimeCounters::default();
        register(
            &mut registry,
            &mut families,
            "realtime_connections",
            "Realtime API sessions open now",
            realtime.open.clone(),
        );
        let events = Family::<DirectionLabels, Counter>::default();
        // One at a time: `get_or_create` holds the family's lock until its guard is gone.
        let events_in = events
            .get_or_create(&DirectionLabels { direction: "in" })
            .clone();
        let events_out = events
            .get_or_create(&DirectionLabels { direction: "out" })
            .clone();
        register(
            &mut registry,
            &mut families,
            "realtime_events",
            "Realtime API events, by direction: `in` from clients, `out` to them",
            events,
        );
        for reason in CloseReason::ALL {
            drop(realtime.closes.get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            }));
        }
        register(
            &mut registry,
            &mut families,
            "realtime_closes",
            "Realtime API sessions closed, by reason",
            realtime.closes.clone(),
        );
        let realtime = RealtimeCounters {
            events_in,
            events_out,
            ..realtime
        };
        Self {
            realtime,
            registry,
            families,
            requests,
            plugin_faults,
            engine_errors,
            plugin_swaps,
            unlabelled,
            request_duration,
            plugin_call_duration,
            time_to_first_token,
            time_per_output_token,
            prompt_tokens,
            generated_tokens,
            streams_in_flight,
            stream_duration,
            breaker_state,
            queue_depth,
            queue_wait,
            queue_timeouts,
            label_sets: Mutex::new(HashSet::new()),
        }
    }

    /// The name of every metric family, as registered (`warden_requests`; counters' series
    /// add `_total`), whether or not it has series yet.
    pub fn families(&self) -> &[String] {
        &self.families
    }

    /// Count one request under `labels` (already validated by the plugin layer).
    pub fn record_request(&self, labels: Vec<(String, String)>) {
        let mut labels: RequestLabels = labels
            .into_iter()
            .map(|(name, value)| (name, LabelValue(value)))
            .collect();
        labels.sort();
        let mut sets = self.label_sets.lock().unwrap_or_else(|e| e.into_inner());
        if !sets.contains(&labels) {
            if sets.len() >= MAX_LABEL_SETS {
                labels = vec![("overflow".into(), LabelValue::new("true"))];
            } else {
                sets.insert(labels.clone());
            }
        }
        drop(sets);
        self.requests.get_or_create(&labels).inc();
    }

    /// Observe a request's duration.
    pub fn observe_request(&self, route: &'static str, status: u16, duration: Duration) {
        let status_class = match status / 100 {
            1 => "1xx",
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            _ => "5xx",
        };
        self.request_duration
            .get_or_create(&RouteLabels {
                route,
                status_class,
            })
            .observe(duration.as_secs_f64());
    }

    /// Observe the first token of a generation.
    pub fn observe_first_token(&self, model: &str, after: Duration) {
        self.time_to_first_token
            .get_or_create(&ModelLabels::of(model))
            .observe(after.as_secs_f64());
    }

    /// Record a finished generation: its token counts and its mean time per output token.
    pub fn record_generation(
        &self,
        model: &str,
        prompt_tokens: usize,
        completion_tokens: usize,
        after_first: Option<Duration>,
    ) {
        let labels = ModelLabels::of(model);
        self.prompt_tokens
            .get_or_create(&labels)
            .inc_by(prompt_tokens as u64);
        self.generated_tokens
            .get_or_create(&labels)
            .inc_by(completion_tokens as u64);
        if let Some(d) = after_first
            && completion_tokens > 1
        {
            self.time_per_output_token
                .get_or_create(&labels)
                .observe(d.as_secs_f64() / (completion_tokens - 1) as f64);
        }
    }

    /// A stream of `model` opened; the guard closes it, and observes its duration, when
    /// dropped.
    pub fn stream_opened(self: &Arc<Self>, model: &str) -> StreamGuard {
        self.streams_in_flight.inc();
        StreamGuard {
            metrics: self.clone(),
            model: model.to_string(),
            opened: std::time::Instant::now(),
        }
    }

    /// Record a circuit breaker's new state.
    pub fn set_breaker_state(&self, model: &str, state: crate::breaker::BreakerState) {
        self.breaker_state
            .get_or_create(&ModelLabels::of(model))
            .set(state.gauge());
    }

    /// Count one request that timed out in `model`'s queue.
    pub fn record_queue_timeout(&self, model: &str) {
        self.queue_timeouts
            .get_or_create(&ModelLabels::of(model))
            .inc();
    }

    /// Streams open now.
    pub fn streams_in_flight(&self) -> i64 {
        self.streams_in_flight.get()
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

    /// Export `model`'s per-model counters at zero, before anything happens to it, so that
    /// `rate()` and alerts on them work from the start.
    pub fn model_loaded(&self, model: &str) {
        let labels = ModelLabels::of(model);
        drop(self.engine_errors.get_or_create(&labels));
        drop(self.queue_timeouts.get_or_create(&labels));
    }

    /// Count one engine failure of `model`.
    pub fn record_engine_error(&self, model: &str) {
        self.engine_errors
            .get_or_create(&ModelLabels::of(model))
            .inc();
    }

    /// Engine failures counted for `model`.
    pub fn engine_error_count(&self, model: &str) -> u64 {
        self.engine_errors
            .get(&ModelLabels::of(model))
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

    /// The exposition, limited to what `visibility` allows: every series, the series that
    /// carry all of the given labels, or none (the metric descriptions stay).
    pub fn encode_visible(&self, visibility: &Visibility) -> String {
        let text = self.encode();
        let required: &[(String, String)] = match visibility {
            Visibility::All => return text,
            Visibility::Nothing => &[],
            Visibility::Matching(labels) => labels,
        };
        let nothing = matches!(visibility, Visibility::Nothing);
        let mut out = String::with_capacity(text.len());
        for line in text.lines() {
            let keep = line.starts_with('#')
                || (!nothing
                    && sample_labels(line).is_some_and(|set| {
                        required
                            .iter()
                            .all(|(n, v)| set.iter().any(|(name, value)| name == n && value == v))
                    }));
            if keep {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

impl crate::engine::QueueObserver for Metrics {
    fn depth(&self, model: &str, delta: i64) {
        self.queue_depth
            .get_or_create(&ModelLabels::of(model))
            .inc_by(delta);
    }

    fn waited(&self, model: &str, wait: Duration) {
        self.queue_wait
            .get_or_create(&ModelLabels::of(model))
            .observe(wait.as_secs_f64());
    }
}

impl FaultSink for Metrics {
    fn plugin_live(&self, slot: Slot, plugin: &str) {
        for kind in crate::plugins::FaultKind::ALL {
            drop(self.plugin_faults.get_or_create(&FaultLabels {
                slot: slot.as_str(),
                plugin: LabelValue::new(plugin),
                kind: kind.as_str(),
            }));
        }
    }

    fn fault(&self, fault: &Fault) {
        self.plugin_faults
            .get_or_create(&FaultLabels {
                slot: fault.slot.as_str(),
                plugin: LabelValue::new(&*fault.plugin),
                kind: fault.kind.as_str(),
            })
            .inc();
    }

    fn call_duration(&self, slot: Slot, duration: Duration) {
        self.plugin_call_duration
            .get_or_create(&SlotLabels {
                slot: slot.as_str(),
            })
            .observe(duration.as_secs_f64());
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

/// Register `metric` as `warden_{name}` and remember the name.
fn register(
    registry: &mut Registry,
    families: &mut Vec<String>,
    name: &str,
    help: &str,
    metric: impl prometheus_client::registry::Metric,
) {
    families.push(format!("warden_{name}"));
    registry.register(name, help, metric);
}

/// A histogram of seconds with `count` buckets from `start`, each 1.5 times the last.
fn seconds(start: f64, count: u16) -> Histogram {
    Histogram::new(exponential_buckets(start, 1.5, count))
}

/// Keeps `warden_streams_in_flight` counted while a stream is open, and observes
/// `warden_stream_duration_seconds` when it closes.
#[derive(Debug)]
pub struct StreamGuard {
    metrics: Arc<Metrics>,
    model: String,
    opened: std::time::Instant,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.metrics.streams_in_flight.dec();
        self.metrics
            .stream_duration
            .get_or_create(&ModelLabels::of(&self.model))
            .observe(self.opened.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests;
