//! The iptables dataplane (upstream's default mode): the plan rendered as `iptables-restore`
//! input for the `filter` and `nat` tables, with upstream's chain names and rule shapes
//! (`../shared/reference/upstream-kube-proxy.md` §4), so operators reading `iptables-save`
//! see what they know.
//!
//! Pure: it never runs a process; a runner applies what it renders. Built piece by piece:
//! so far the names of per-service chains, the endpoint probabilities and the
//! rules of one service port (`service`), checked against upstream's own examples.

pub mod names;
pub mod probability;
pub mod restore;
pub mod service;

#[cfg(test)]
mod testing;
