//! What `kube-proxy explain` lists for userspace mode: the redirect rules that send a
//! packet's frontend to its listener (pure; the listener's port is chosen at run time, so
//! it is left open).

use kube_proxy_model::frontends::Frontend;
use kube_proxy_model::FamilyPlan;

use crate::desired::{self, Class};
use crate::rules::{self, table_of, Action, Addressing, Redirect};

/// The rules carrying `frontend` of service port `service_port` (`namespace/name:port`) to
/// its listener of `class` (the ClusterIP's, or that of the external frontends), as
/// `-t <table> -A <chain> <rule>` lines of the iptables path (the nftables path holds the
/// same in table `kube-proxy-userspace`).
pub fn redirect_rules(
    plan: &FamilyPlan,
    addressing: Addressing,
    service_port: &str,
    class: Class,
    frontend: &Frontend,
) -> Vec<String> {
    let listeners = desired::listeners(plan);
    let Some((key, spec)) = listeners
        .listeners
        .iter()
        .find(|(k, _)| k.class == class && k.name.to_string() == service_port)
    else {
        return Vec::new();
    };
    let redirect = Redirect {
        name: &key.name,
        spec,
        proxy_port: 0,
    };
    rules::rules(&[redirect], addressing)
        .into_iter()
        .filter(|r| r.action != Action::AcceptNew)
        .filter(|r| match frontend {
            Frontend::Address(ip, _, port) => r.dest == Some(*ip) && r.dport == *port,
            Frontend::NodePort(_, port) => r.dest.is_none() && r.dport == *port,
        })
        .map(|r| {
            format!(
                "-t {} -A {} {}",
                table_of(r.chain),
                r.chain,
                r.iptables_without_port()
            )
        })
        .collect()
}
