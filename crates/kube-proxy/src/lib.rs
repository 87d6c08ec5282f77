//! kube-proxy-rs, the binary's library, by role: `source` (cluster state from the API server
//! or manifests), `sync` (the event loop, its scheduler, the dataplanes it drives), `servers`
//! (health, metrics, health-check node ports), `telemetry` (logs and metrics), `explain` (where
//! a packet goes, read back from the plan, checked against the kernel), `kernel` (the
//! only code that touches the kernel: nft and netlink, conntrack, sysctls), and `app` (the
//! process start-up that wires them).
//!
//! Policy lives in `kube-proxy-model` and configuration in `kube-proxy-config` (both pure);
//! this crate is the I/O rim that wires them to the API server, files and the kernel.

pub mod app;
pub mod explain;
pub mod kernel;
pub mod servers;
pub mod source;
pub mod sync;
pub mod telemetry;

/// The Kubernetes release whose kube-proxy this one replaces.
pub const KUBERNETES_VERSION: &str = "v1.36.0";
