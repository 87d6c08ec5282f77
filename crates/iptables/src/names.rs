//! Names of per-service-port chains, exactly as upstream's iptables proxier builds them.
//!
//! `KUBE-SVC-`, `KUBE-SVL-`, `KUBE-EXT-` and `KUBE-FW-` share one suffix per service port: the
//! first 16 characters of base32(SHA-256(`<ns>/<svc>:<port><protocol>`)); `KUBE-SEP-` hashes
//! the endpoint (`ip:port`, IPv6 in brackets) in as well.

use std::net::{IpAddr, SocketAddr};

use kube_proxy_model::names::hash_prefix;
use kube_proxy_model::ServicePortName;

fn suffix(name: &ServicePortName) -> String {
    hash_prefix(&format!("{name}{}", name.protocol.lower()), 16)
}

/// Cluster-policy endpoint selection.
pub fn service_chain(name: &ServicePortName) -> String {
    format!("KUBE-SVC-{}", suffix(name))
}

/// Local-policy endpoint selection.
pub fn local_chain(name: &ServicePortName) -> String {
    format!("KUBE-SVL-{}", suffix(name))
}

/// External destinations (masquerade or short-circuit).
pub fn external_chain(name: &ServicePortName) -> String {
    format!("KUBE-EXT-{}", suffix(name))
}

/// `loadBalancerSourceRanges` allow-list.
pub fn firewall_chain(name: &ServicePortName) -> String {
    format!("KUBE-FW-{}", suffix(name))
}

/// One endpoint: hairpin mark and DNAT.
pub fn endpoint_chain(name: &ServicePortName, ip: IpAddr, port: u16) -> String {
    let endpoint = SocketAddr::new(ip, port);
    format!(
        "KUBE-SEP-{}",
        hash_prefix(&format!("{name}{}{endpoint}", name.protocol.lower()), 16)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube_proxy_model::Protocol;

    /// The suffixes of upstream's TestOverallIPTablesRules.
    #[test]
    fn chain_names_match_upstream() {
        let port =
            |svc: &str| ServicePortName::new(&svc.replace("svc", "ns"), svc, "p80", Protocol::Tcp);
        let cases = [
            (service_chain(&port("svc1")), "KUBE-SVC-XPGD46QRK7WJZT7O"),
            (external_chain(&port("svc2")), "KUBE-EXT-GNZBNJ2PO5MGZ6GT"),
            (local_chain(&port("svc3")), "KUBE-SVL-X27LE4BHSL4DOUIK"),
            (firewall_chain(&port("svc5")), "KUBE-FW-NUKIZ6OKUXPJNT4C"),
            (
                endpoint_chain(&port("svc5"), "10.180.0.3".parse().unwrap(), 80),
                "KUBE-SEP-I77PXRDZVX7PMWMN",
            ),
        ];
        for (name, upstream) in cases {
            assert_eq!(name, upstream);
        }
    }
}
