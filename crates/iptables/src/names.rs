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
    use kube_proxy_model::{NamespacedName, Protocol};

    fn port(ns: &str, svc: &str, port: &str) -> ServicePortName {
        ServicePortName {
            service: NamespacedName::new(ns, svc),
            port: port.into(),
            protocol: Protocol::Tcp,
        }
    }

    /// The suffixes of upstream's TestOverallIPTablesRules.
    #[test]
    fn chain_names_match_upstream() {
        assert_eq!(
            service_chain(&port("ns1", "svc1", "p80")),
            "KUBE-SVC-XPGD46QRK7WJZT7O"
        );
        assert_eq!(
            external_chain(&port("ns2", "svc2", "p80")),
            "KUBE-EXT-GNZBNJ2PO5MGZ6GT"
        );
        assert_eq!(
            local_chain(&port("ns3", "svc3", "p80")),
            "KUBE-SVL-X27LE4BHSL4DOUIK"
        );
        assert_eq!(
            firewall_chain(&port("ns5", "svc5", "p80")),
            "KUBE-FW-NUKIZ6OKUXPJNT4C"
        );
        assert_eq!(
            endpoint_chain(
                &port("ns5", "svc5", "p80"),
                "10.180.0.3".parse().unwrap(),
                80
            ),
            "KUBE-SEP-I77PXRDZVX7PMWMN"
        );
    }
}
