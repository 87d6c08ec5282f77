//! The ipvs dataplane (upstream's `--proxy-mode ipvs`, §4.8 of the reference): each frontend
//! of the plan becomes an IPVS virtual server whose real servers are the endpoints the plan
//! selected; the addresses that are not the node's own are put on the dummy interface
//! `kube-ipvs0` so the kernel accepts packets for them; upstream's ipsets and iptables chains
//! do the masquerading, NodePort marking, source ranges, and the filter that refuses other
//! ports of a service address. Names, set types and rule shapes are upstream's, so `ipvsadm
//! -Ln`, `ipset list` and `iptables-save` read as operators know them.
//!
//! Pure: [`desired`] computes the state of one family from the plan, [`ipvsadm`], [`ipset`]
//! and [`rules`] spell it (and parse what the tools print), [`proxier`] diffs it against what
//! was applied and drives an [`proxier::IpvsKernel`] (the binary's runs ipvsadm, ipset and
//! ip; tests use [`fake`]).

pub mod desired;
pub mod explain;
pub mod fake;
pub mod ipset;
pub mod ipvsadm;
pub mod names;
pub mod proxier;
pub mod rules;

#[cfg(test)]
mod tests;
