//! The iptables dataplane (upstream's default mode): the plan rendered as `iptables-restore`
//! input for the `filter` and `nat` tables, with upstream's chain names and rule shapes
//! (`../shared/reference/upstream-kube-proxy.md` §4), so operators reading `iptables-save`
//! see what they know.
//!
//! Pure: it never runs a process; a `Restorer` applies what it renders. Built piece by
//! piece: the names of per-service chains, the endpoint probabilities, the rules of one
//! service port (`service`, checked against upstream's own examples), the full and partial
//! restore inputs (`restore`), and the dataplane with its bookkeeping (`proxier`), proven
//! against an in-memory iptables (`fake`). The binary runs it for `--proxy-mode iptables`.

pub mod explain;
pub mod fake;
pub mod names;
pub mod probability;
pub mod proxier;
pub mod restore;
pub mod service;

#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
