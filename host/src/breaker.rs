//! A circuit breaker around each model's engine.
//!
//! Closed: requests pass; `threshold` engine failures in a row open it. Open: requests are
//! answered 503 at once, with `Retry-After`, until `cooldown` has passed. Half-open: one
//! request (the probe) passes; its success closes the breaker, its failure opens it again.
//! Load (a full queue, a queue timeout) and client behaviour (a disconnect) are neither
//! success nor failure: only the model's own faults count.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The breaker's state, as `/ready` and the metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests pass.
    Closed,
    /// Requests are refused at once.
    Open,
    /// One probe request passes.
    HalfOpen,
}

impl BreakerState {
    /// Name in `/ready` and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }

    /// Value of the `warden_circuit_breaker_state` gauge: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

#[derive(Debug)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// Hears every state change of a breaker (the metrics gauge).
type OnChange = dyn Fn(&str, BreakerState) + Send + Sync;

/// One model's breaker.
pub struct Breaker {
    model: String,
    threshold: u32,
    cooldown: Duration,
    inner: Mutex<Inner>,
    on_change: Box<OnChange>,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("model", &self.model)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

/// Leave to call the engine. Report the outcome with [`Permit::succeeded`] or
/// [`Permit::failed`]; dropping it reports neither (a probe's place is freed).
#[derive(Debug)]
pub struct Permit {
    breaker: Arc<Breaker>,
    probe: bool,
    done: bool,
}

impl Breaker {
    /// A closed breaker for `model`; `on_change` hears every state change.
    pub fn new(
        model: &str,
        threshold: u32,
        cooldown: Duration,
        on_change: impl Fn(&str, BreakerState) + Send + Sync + 'static,
    ) -> Arc<Self> {
        let breaker = Arc::new(Self {
            model: model.to_string(),
            threshold: threshold.max(1),
            cooldown,
            inner: Mutex::new(Inner::Closed { failures: 0 }),
            on_change: Box::new(on_change),
        });
        (breaker.on_change)(model, BreakerState::Closed);
        breaker
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state now (an open breaker whose cooldown has passed reads as half-open).
    pub fn state(&self) -> BreakerState {
        match &*self.lock() {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { until } if Instant::now() < *until => BreakerState::Open,
            Inner::Open { .. } | Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    fn set(&self, inner: &mut Inner, next: Inner, state: BreakerState) {
        *inner = next;
        tracing::warn!(model = %self.model, state = state.as_str(), "circuit breaker");
        (self.on_change)(&self.model, state);
    }

    /// A permit, or how long to wait before retrying.
    pub fn admit(self: &Arc<Self>) -> Result<Permit, Duration> {
        let mut inner = self.lock();
        let probe = match &*inner {
            Inner::Closed { .. } => false,
            Inner::Open { until } => {
                let now = Instant::now();
                if now < *until {
                    return Err(*until - now);
                }
                self.set(
                    &mut inner,
                    Inner::HalfOpen { probing: true },
                    BreakerState::HalfOpen,
                );
                true
            }
            Inner::HalfOpen { probing: true } => return Err(Duration::from_secs(1)),
            Inner::HalfOpen { probing: false } => {
                *inner = Inner::HalfOpen { probing: true };
                true
            }
        };
        Ok(Permit {
            breaker: self.clone(),
            probe,
            done: false,
        })
    }
}

impl Permit {
    /// The engine served the request.
    pub fn succeeded(mut self) {
        self.done = true;
        let b = &self.breaker;
        let mut inner = b.lock();
        match &*inner {
            Inner::Closed { .. } => *inner = Inner::Closed { failures: 0 },
            Inner::HalfOpen { .. } if self.probe => {
                b.set(
                    &mut inner,
                    Inner::Closed { failures: 0 },
                    BreakerState::Closed,
                );
            }
            _ => {}
        }
    }

    /// The engine failed on the request.
    pub fn failed(mut self) {
        self.done = true;
        let b = &self.breaker;
        let mut inner = b.lock();
        let open = Inner::Open {
            until: Instant::now() + b.cooldown,
        };
        match &*inner {
            Inner::Closed { failures } if failures + 1 >= b.threshold => {
                b.set(&mut inner, open, BreakerState::Open);
            }
            Inner::Closed { failures } => {
                *inner = Inner::Closed {
                    failures: failures + 1,
                }
            }
            Inner::HalfOpen { .. } if self.probe => b.set(&mut inner, open, BreakerState::Open),
            _ => {}
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done && self.probe {
            let mut inner = self.breaker.lock();
            if let Inner::HalfOpen { .. } = &*inner {
                *inner = Inner::HalfOpen { probing: false };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_failures_and_closes_after_a_good_probe() {
        let b = Breaker::new("m", 3, Duration::from_millis(50), |_, _| {});
        b.admit().unwrap().failed();
        b.admit().unwrap().succeeded();
        b.admit().unwrap().failed();
        b.admit().unwrap().failed();
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "a success resets the count"
        );
        b.admit().unwrap().failed();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.admit().is_err());
        std::thread::sleep(Duration::from_millis(60));
        let probe = b.admit().unwrap();
        assert!(b.admit().is_err(), "one probe at a time");
        drop(probe);
        let probe = b.admit().unwrap();
        probe.failed();
        assert_eq!(b.state(), BreakerState::Open);
        std::thread::sleep(Duration::from_millis(60));
        b.admit().unwrap().succeeded();
        assert_eq!(b.state(), BreakerState::Closed);
        b.admit().unwrap().succeeded();
    }
}
