//! Names of per-service objects, exactly as upstream's nftables proxier builds them, so an
//! operator reading `nft list table ip kube-proxy` sees familiar names.
//!
//! Base = `<H8>-<ns>/<svc>/<proto>/<portName>` where H8 is the first 8 characters of the
//! RFC 4648 base32 of SHA-256 of the rest; endpoint bases append `__<ip>/<port>` (IPv6 colons
//! as dots). Names longer than 256 bytes are cut to 253 plus `...`.

use std::net::IpAddr;

use kube_proxy_model::names::hash_prefix;
use kube_proxy_model::ServicePortName;

const MAX_NAME: usize = 256;

fn bounded(name: String) -> String {
    if name.len() <= MAX_NAME {
        return name;
    }
    let mut cut = 253;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}...", &name[..cut])
}

/// `<ns>/<svc>/<proto>/<portName>`.
fn port_path(name: &ServicePortName) -> String {
    format!(
        "{}/{}/{}/{}",
        name.service.namespace,
        name.service.name,
        name.protocol.lower(),
        name.port
    )
}

/// `<H8>-<ns>/<svc>/<proto>/<portName>`.
pub fn service_base(name: &ServicePortName) -> String {
    let path = port_path(name);
    format!("{}-{path}", hash_prefix(&path, 8))
}

/// `<H8>-<ns>/<svc>/<proto>/<portName>__<ip>/<port>`.
pub fn endpoint_base(name: &ServicePortName, ip: IpAddr, port: u16) -> String {
    let ip = ip.to_string().replace(':', ".");
    let path = format!("{}__{ip}/{port}", port_path(name));
    format!("{}-{path}", hash_prefix(&path, 8))
}

pub fn service_chain(name: &ServicePortName) -> String {
    bounded(format!("service-{}", service_base(name)))
}
pub fn local_chain(name: &ServicePortName) -> String {
    bounded(format!("local-{}", service_base(name)))
}
pub fn external_chain(name: &ServicePortName) -> String {
    bounded(format!("external-{}", service_base(name)))
}
pub fn endpoint_chain(name: &ServicePortName, ip: IpAddr, port: u16) -> String {
    bounded(format!("endpoint-{}", endpoint_base(name, ip, port)))
}
pub fn affinity_set(name: &ServicePortName, ip: IpAddr, port: u16) -> String {
    bounded(format!("affinity-{}", endpoint_base(name, ip, port)))
}

/// Per-service chain names always contain a `/`; static names never do (upstream relies on
/// the same property to find stale service chains).
pub fn is_service_chain(name: &str) -> bool {
    name.contains('/')
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube_proxy_model::Protocol;

    fn port(ns: &str, svc: &str, port: &str) -> ServicePortName {
        ServicePortName::new(ns, svc, port, Protocol::Tcp)
    }

    #[test]
    fn hashes_match_upstream() {
        // Values from upstream's proxier tests (upstream-kube-proxy.md §3.6, §3.8, §3.9).
        assert_eq!(
            service_chain(&port("ns1", "svc1", "p80")),
            "service-ULMVA6XW-ns1/svc1/tcp/p80"
        );
        assert_eq!(
            external_chain(&port("ns2", "svc2", "p80")),
            "external-42NFTM6N-ns2/svc2/tcp/p80"
        );
        assert_eq!(
            endpoint_chain(
                &port("ns5", "svc5", "p80"),
                "10.180.0.3".parse().unwrap(),
                80
            ),
            "endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80"
        );
        assert_eq!(
            service_chain(&port("default", "web", "http")),
            "service-SUSTUHLJ-default/web/tcp/http"
        );
        assert_eq!(
            affinity_set(
                &port("default", "web", "http"),
                "10.244.1.5".parse().unwrap(),
                8080
            ),
            "affinity-HGNPOIJ5-default/web/tcp/http__10.244.1.5/8080"
        );
    }

    #[test]
    fn long_names_are_bounded_and_ipv6_colons_become_dots() {
        let long = port(
            "n".repeat(120).as_str(),
            "s".repeat(120).as_str(),
            "p".repeat(63).as_str(),
        );
        let name = endpoint_chain(&long, "2001:db8::1".parse().unwrap(), 80);
        assert!(name.len() <= 256 && name.ends_with("..."), "{name}");
        let short = endpoint_chain(&port("a", "b", "c"), "2001:db8::1".parse().unwrap(), 80);
        assert!(short.ends_with("__2001.db8..1/80"), "{short}");
        assert!(is_service_chain(&short) && !is_service_chain("services"));
    }
}
