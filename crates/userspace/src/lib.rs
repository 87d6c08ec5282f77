//! userspace mode: the proxy itself accepts every Service connection and relays it to an
//! endpoint (upstream's v1.25 `pkg/proxy/userspace`, from the same plan as the kernel modes).
//!
//! - [`desired`]: the plan as listeners — one per service port and class of frontend
//!   (ClusterIP; NodePort/externalIPs/load-balancer IPs), each with the endpoints the plan
//!   selects for that traffic (pure).
//! - [`rules`]: the redirect rules, decided once as data, with upstream's chains
//!   (`KUBE-PORTALS-CONTAINER`, `KUBE-PORTALS-HOST`, `KUBE-NODEPORT-CONTAINER`,
//!   `KUBE-NODEPORT-HOST`, filter `KUBE-NODEPORT-NON-LOCAL`) and their iptables text (pure).
//! - [`redirect`]: the two paths that write them: iptables (`iptables-restore --noflush`)
//!   and nftables (table `kube-proxy-userspace`), each reading them back to find others' edits.
//! - [`explain`]: the redirect rules of one frontend, for `kube-proxy explain` (pure).
//! - [`balancer`]: round robin with ClientIP affinity, upstream's `LoadBalancerRR` (pure).
//! - [`ports`]: which host port a listener takes (`portRange`) (pure).
//! - [`relay`]: the listeners and relays (tokio on a fixed number of threads; TCP bytes move
//!   with splice(2) through a pipe, never through user space).
//! - [`proxier`]: the dataplane: opens listeners before the rules point at them, writes the
//!   rules atomically, closes what is gone after.

pub mod balancer;
pub mod desired;
pub mod explain;
pub mod ports;
pub mod proxier;
pub mod redirect;
pub mod relay;
pub mod rules;

#[cfg(test)]
mod tests;
