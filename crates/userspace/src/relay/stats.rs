//! Counters per service port, read by the metrics endpoint: connections opened (TCP
//! connections accepted, UDP clients seen), failed connects to endpoints, bytes each way and
//! the relays active now. Atomics, so relays never wait on a reader.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kube_proxy_model::Protocol;

#[derive(Debug, Default)]
pub struct Counters {
    pub opened: AtomicU64,
    pub connect_failures: AtomicU64,
    /// Connections closed because no endpoint could be reached (none, or every attempt failed).
    pub unserved: AtomicU64,
    pub bytes_to_endpoint: AtomicU64,
    pub bytes_to_client: AtomicU64,
    pub active: AtomicI64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// A snapshot of one service port's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    pub service_port: String,
    pub protocol: &'static str,
    pub opened: u64,
    pub connect_failures: u64,
    pub unserved: u64,
    pub bytes_to_endpoint: u64,
    pub bytes_to_client: u64,
    pub active: i64,
}

#[derive(Debug, Default)]
pub struct Stats {
    ports: Mutex<BTreeMap<(String, &'static str), Arc<Counters>>>,
}

impl Stats {
    /// The counters of a service port (shared by its listeners of both families).
    pub fn port(&self, name: &str, protocol: Protocol) -> Arc<Counters> {
        self.ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((name.to_string(), protocol.upper()))
            .or_default()
            .clone()
    }

    /// Drops the counters no listener or relay holds any more (the Service is gone).
    pub fn forget_unused(&self) {
        self.ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, c| Arc::strong_count(c) > 1);
    }

    pub fn snapshot(&self) -> Vec<PortStats> {
        let ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        ports
            .iter()
            .map(|((name, protocol), c)| PortStats {
                service_port: name.clone(),
                protocol,
                opened: c.opened.load(Ordering::Relaxed),
                connect_failures: c.connect_failures.load(Ordering::Relaxed),
                unserved: c.unserved.load(Ordering::Relaxed),
                bytes_to_endpoint: c.bytes_to_endpoint.load(Ordering::Relaxed),
                bytes_to_client: c.bytes_to_client.load(Ordering::Relaxed),
                active: c.active.load(Ordering::Relaxed),
            })
            .collect()
    }
}
