//! The registry of open Realtime API connections: how many there are, in total and per
//! principal, under limits checked before a WebSocket is upgraded; each connection holds a
//! [`Guard`] while it lives, and a shutdown waits for [`Connections::drained`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

use crate::config::RealtimeConfig;

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The server holds its most connections.
    Total,
    /// This principal holds its most connections.
    Principal,
}

/// Open connections and their limits.
#[derive(Debug)]
pub struct Connections {
    max_total: usize,
    max_per_principal: usize,
    per_principal: Mutex<HashMap<String, usize>>,
    open: watch::Sender<usize>,
    /// `warden_realtime_connections`, kept equal to `open`.
    gauge: Gauge,
}

impl Connections {
    /// A registry with the limits of `config`, counting open connections in `gauge`.
    pub fn new(config: &RealtimeConfig, gauge: Gauge) -> Self {
        Self {
            max_total: config.max_connections,
            max_per_principal: config.max_connections_per_principal,
            per_principal: Mutex::new(HashMap::new()),
            open: watch::Sender::new(0),
            gauge,
        }
    }

    /// Admit a connection of `principal`, or say which limit it meets.
    pub fn admit(self: &Arc<Self>, principal: &str) -> Result<Guard, Full> {
        let mut held = self
            .per_principal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *self.open.borrow() >= self.max_total {
            return Err(Full::Total);
        }
        let mine = held.entry(principal.to_string()).or_insert(0);
        if *mine >= self.max_per_principal {
            return Err(Full::Principal);
        }
        *mine += 1;
        self.open.send_modify(|n| *n += 1);
        self.gauge.inc();
        Ok(Guard {
            registry: self.clone(),
            principal: principal.to_string(),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        *self.open.borrow()
    }

    /// Resolves once no connection is open.
    pub async fn drained(&self) {
        let mut open = self.open.subscribe();
        let _ = open.wait_for(|n| *n == 0).await;
    }
}

/// One open connection's place in the registry, given back when dropped.
#[derive(Debug)]
pub struct Guard {
    registry: Arc<Connections>,
    principal: String,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut held = self
            .registry
            .per_principal
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = held.get_mut(&self.principal) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.principal);
            }
        }
        self.registry.open.send_modify(|n| *n = n.saturating_sub(1));
        self.registry.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(max_connections: usize, max_connections_per_principal: usize) -> Arc<Connections> {
        let config = RealtimeConfig {
            max_connections,
            max_connections_per_principal,
            ..RealtimeConfig::default()
        };
        Arc::new(Connections::new(&config, Gauge::default()))
    }

    #[test]
    fn limits_hold_in_total_and_per_principal_and_guards_give_back() {
        let r = registry(3, 2);
        let a1 = r.admit("alice").unwrap();
        let _a2 = r.admit("alice").unwrap();
        assert_eq!(r.admit("alice").unwrap_err(), Full::Principal);
        let _b1 = r.admit("bob").unwrap();
        assert_eq!(r.admit("carol").unwrap_err(), Full::Total);
        assert_eq!(r.open(), 3);
        assert_eq!(r.gauge.get(), 3);
        drop(a1);
        assert_eq!(r.open(), 2);
        assert_eq!(r.gauge.get(), 2);
        let _c1 = r.admit("carol").unwrap();
        assert_eq!(r.per_principal.lock().unwrap().get("alice"), Some(&1));
    }

    #[tokio::test]
    async fn drained_waits_for_the_last_guard() {
        let r = registry(4, 4);
        let g = r.admit("a").unwrap();
        let waiter = tokio::spawn({
            let r = r.clone();
            async move { r.drained().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(g);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("drained")
            .unwrap();
    }
}
