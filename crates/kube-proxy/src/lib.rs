//! kube-proxy-rs, the binary's library: sources of cluster state, the event loop, the sync
//! scheduler, dataplanes, logging and the process start-up.
//!
//! Policy lives in `kube-proxy-model` and configuration in `kube-proxy-config` (both pure);
//! this crate is the I/O rim that wires them to the API server, files and the kernel.

pub mod app;
pub mod conntrack;
pub mod dataplane;
pub mod event_loop;
pub mod health;
pub mod host;
pub mod http;
pub mod iptables_cleanup;
pub mod logging;
pub mod metrics;
pub mod metrics_server;
pub mod nft_runner;
pub mod node_setup;
pub mod process_metrics;
pub mod scheduler;
pub mod service_health;
pub mod source;
pub mod sync_status;

/// The Kubernetes release whose kube-proxy this one replaces.
pub const KUBERNETES_VERSION: &str = "v1.36.0";
