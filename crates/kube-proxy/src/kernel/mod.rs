//! Kernel adapters: the only code that runs kernel tools or talks netlink — the nft runner
//! (and nf_tables netlink), the iptables-restore/-save runner, conntrack, the cleanup of
//! upstream's iptables rules, the node's sysctls and limits, and the host's addresses.

pub mod conntrack;
pub mod host;
pub mod iptables_backend;
pub mod iptables_cleanup;
pub mod iptables_runner;
pub mod ipvs_runner;
pub mod nfacct;
pub mod nft_runner;
pub mod node_setup;
