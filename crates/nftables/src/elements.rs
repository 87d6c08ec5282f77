//! The sets and maps of the `kube-proxy` table, and their elements as typed values.
//!
//! The data path keeps what changes often in set and map *elements* rather than in chains or
//! verdicts: adding or removing a data element does not make the kernel re-validate the
//! table, so a change costs milliseconds however many Services exist (see docs/nftables.md).

use std::fmt::{self, Write as _};
use std::net::IpAddr;

use ipnet::IpNet;
use kube_proxy_model::{IpFamily, Protocol};

/// A named set or map of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SetName {
    /// Every active ClusterIP (masquerade of outside traffic; REJECT of unknown ports).
    ClusterIps,
    /// Node IPs that accept NodePort traffic (absent when all local addresses do).
    NodePortIps,
    /// Frontends (`addr . proto . port`) DNATed to N endpoints.
    Dnat(u32),
    /// NodePorts (`proto . port`) DNATed to N endpoints.
    NodePortDnat(u32),
    /// Slot i of the data path: `frontend : i-th endpoint` of every frontend with more than i.
    Backends(u32),
    /// Slot i for NodePorts: `proto . nodePort : i-th endpoint`.
    NodePortBackends(u32),
    /// External IPs and load-balancer IPs whose traffic is masqueraded (eTP Cluster).
    ExternalMasquerade,
    /// NodePorts whose traffic is masqueraded (eTP Cluster).
    NodePortMasquerade,
    NoEndpointReject,
    NoEndpointDrop,
    NodePortNoEndpointReject,
    NodePortNoEndpointDrop,
    /// Load-balancer frontends with `loadBalancerSourceRanges`.
    FirewallIps,
    /// `frontend . allowed source range` (interval).
    FirewallAllow,
    /// `endpoint . endpoint . proto . port` of local endpoints, masqueraded when a pod
    /// reaches itself through a Service.
    HairpinConnections,
    /// Verdict map for frontends handled by per-service chains (affinity, eTP Local).
    ServiceIps,
    /// Verdict map for NodePorts handled by per-service chains.
    ServiceNodePorts,
}

impl SetName {
    pub fn name(self) -> String {
        match self {
            SetName::ClusterIps => "cluster-ips".into(),
            SetName::NodePortIps => "nodeport-ips".into(),
            SetName::Dnat(n) => format!("dnat-{n}"),
            SetName::NodePortDnat(n) => format!("nodeport-dnat-{n}"),
            SetName::Backends(i) => format!("backends-{i}"),
            SetName::NodePortBackends(i) => format!("nodeport-backends-{i}"),
            SetName::ExternalMasquerade => "external-masquerade".into(),
            SetName::NodePortMasquerade => "nodeport-masquerade".into(),
            SetName::NoEndpointReject => "no-endpoint-reject".into(),
            SetName::NoEndpointDrop => "no-endpoint-drop".into(),
            SetName::NodePortNoEndpointReject => "nodeport-no-endpoint-reject".into(),
            SetName::NodePortNoEndpointDrop => "nodeport-no-endpoint-drop".into(),
            SetName::FirewallIps => "firewall-ips".into(),
            SetName::FirewallAllow => "firewall-allow".into(),
            SetName::HairpinConnections => "hairpin-connections".into(),
            SetName::ServiceIps => "service-ips".into(),
            SetName::ServiceNodePorts => "service-nodeports".into(),
        }
    }

    /// `map` for maps, `set` for sets: nft's commands name the kind (`flush map`, `delete
    /// set`), and the wrong one fails with "No such file or directory".
    pub fn keyword(self) -> &'static str {
        match self {
            SetName::Backends(_)
            | SetName::NodePortBackends(_)
            | SetName::ServiceIps
            | SetName::ServiceNodePorts => "map",
            _ => "set",
        }
    }

    /// The `set`/`map` declaration body for a family.
    pub fn declaration(self, family: IpFamily) -> String {
        let addr = match family {
            IpFamily::V4 => "ipv4_addr",
            IpFamily::V6 => "ipv6_addr",
        };
        let frontend = format!("{addr} . inet_proto . inet_service");
        let (body, comment) = match self {
            SetName::ClusterIps => (format!("type {addr}"), "Active ClusterIPs"),
            SetName::NodePortIps => (format!("type {addr}"), "IPs that accept NodePort traffic"),
            SetName::Dnat(_) => (
                format!("type {frontend}"),
                "frontends DNATed to this many endpoints",
            ),
            SetName::NodePortDnat(_) => (
                "type inet_proto . inet_service".into(),
                "NodePorts DNATed to this many endpoints",
            ),
            SetName::Backends(_) => (
                format!("type {frontend} : {addr} . inet_service"),
                "endpoint slot of each frontend",
            ),
            SetName::NodePortBackends(_) => (
                format!("type inet_proto . inet_service : {addr} . inet_service"),
                "endpoint slot of each NodePort",
            ),
            SetName::ExternalMasquerade => (
                format!("type {frontend}"),
                "external IPs and LB IPs whose traffic is masqueraded",
            ),
            SetName::NodePortMasquerade => (
                "type inet_proto . inet_service".into(),
                "NodePorts whose traffic is masqueraded",
            ),
            SetName::NoEndpointReject => (
                format!("type {frontend}"),
                "frontends of services with no endpoints",
            ),
            SetName::NoEndpointDrop => (
                format!("type {frontend}"),
                "frontends of services with no local endpoints",
            ),
            SetName::NodePortNoEndpointReject => (
                "type inet_proto . inet_service".into(),
                "NodePorts of services with no endpoints",
            ),
            SetName::NodePortNoEndpointDrop => (
                "type inet_proto . inet_service".into(),
                "NodePorts of services with no local endpoints",
            ),
            SetName::FirewallIps => (
                format!("type {frontend}"),
                "destinations that are subject to LoadBalancerSourceRanges",
            ),
            SetName::FirewallAllow => (
                format!("type {frontend} . {addr}; flags interval"),
                "allowed sources of each destination with LoadBalancerSourceRanges",
            ),
            SetName::HairpinConnections => (
                format!("type {addr} . {addr} . inet_proto . inet_service"),
                "service hairpin connections",
            ),
            SetName::ServiceIps => (
                format!("type {frontend} : verdict"),
                "ClusterIP, ExternalIP and LoadBalancer IP traffic handled by per-service chains",
            ),
            SetName::ServiceNodePorts => (
                "type inet_proto . inet_service : verdict".into(),
                "NodePort traffic handled by per-service chains",
            ),
        };
        format!(
            "{} {} {{ {body}; comment \"{comment}\"; }}",
            self.keyword(),
            self.name()
        )
    }
}

/// An element key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    Addr(IpAddr),
    Frontend(IpAddr, Protocol, u16),
    NodePort(Protocol, u16),
    Allow(IpAddr, Protocol, u16, IpNet),
    Hairpin(IpAddr, Protocol, u16),
}

/// A map element's value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Value {
    None,
    Endpoint(IpAddr, u16),
    Goto(std::sync::Arc<str>),
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Addr(a) => write!(f, "{a}"),
            Key::Frontend(a, p, port) => write!(f, "{a} . {} . {port}", p.lower()),
            Key::NodePort(p, port) => write!(f, "{} . {port}", p.lower()),
            Key::Allow(a, p, port, range) => {
                // A host range is written as an address (nft normalises /32 that way).
                if range.prefix_len() == range.max_prefix_len() {
                    write!(f, "{a} . {} . {port} . {}", p.lower(), range.addr())
                } else {
                    write!(f, "{a} . {} . {port} . {range}", p.lower())
                }
            }
            Key::Hairpin(a, p, port) => write!(f, "{a} . {a} . {} . {port}", p.lower()),
        }
    }
}

/// Writes `key` or `key : value` into `out`.
pub fn write_element(out: &mut String, key: &Key, value: &Value) {
    let _ = write!(out, "{key}");
    match value {
        Value::None => {}
        Value::Endpoint(ip, port) => {
            let _ = write!(out, " : {ip} . {port}");
        }
        Value::Goto(chain) => {
            let _ = write!(out, " : goto {}", quote(chain));
        }
    }
}

/// Object names are written as they are: upstream's names (`service-ULMVA6XW-ns/svc/tcp/p`)
/// are valid nft identifiers, because the model only admits Kubernetes-valid names (DNS
/// labels and IANA service names) and IP addresses. nft 1.0.6 would not accept them quoted.
pub fn quote(name: &str) -> String {
    debug_assert!(
        name.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c)),
        "unexpected character in object name {name:?}"
    );
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_text() {
        let mut out = String::new();
        write_element(
            &mut out,
            &Key::Frontend("198.19.0.1".parse().unwrap(), Protocol::Tcp, 80),
            &Value::Endpoint("198.18.0.2".parse().unwrap(), 8080),
        );
        assert_eq!(out, "198.19.0.1 . tcp . 80 : 198.18.0.2 . 8080");
        assert_eq!(
            Key::Allow(
                "198.51.100.1".parse().unwrap(),
                Protocol::Tcp,
                443,
                "198.51.100.1/32".parse().unwrap()
            )
            .to_string(),
            "198.51.100.1 . tcp . 443 . 198.51.100.1"
        );
        assert_eq!(
            Key::Hairpin("2001:db8::5".parse().unwrap(), Protocol::Udp, 53).to_string(),
            "2001:db8::5 . 2001:db8::5 . udp . 53"
        );
        assert_eq!(
            quote("service-ULMVA6XW-ns1/svc1/tcp/p80"),
            "service-ULMVA6XW-ns1/svc1/tcp/p80"
        );
        assert_eq!(quote("dnat-2"), "dnat-2");
    }
}
