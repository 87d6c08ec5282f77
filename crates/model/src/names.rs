//! Kubernetes nouns shared by the whole model: IP family, protocol, object and port names.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

/// An IP family. kube-proxy runs one pipeline per family (dual-stack = both).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum IpFamily {
    #[serde(rename = "IPv4")]
    V4,
    #[serde(rename = "IPv6")]
    V6,
}

impl IpFamily {
    pub const ALL: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

    pub fn of(ip: &IpAddr) -> IpFamily {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
    pub fn of_net(net: &ipnet::IpNet) -> IpFamily {
        IpFamily::of(&net.addr())
    }
    /// The family's wildcard address (`0.0.0.0` or `::`).
    pub fn unspecified(self) -> IpAddr {
        match self {
            IpFamily::V4 => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            IpFamily::V6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The L4 protocols a Service port can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses the API's protocol string; an unset protocol is TCP, as the API defaults it.
    pub fn from_api(value: Option<&str>) -> Option<Protocol> {
        match value {
            None | Some("TCP") => Some(Protocol::Tcp),
            Some("UDP") => Some(Protocol::Udp),
            Some("SCTP") => Some(Protocol::Sctp),
            Some(_) => None,
        }
    }
    /// Lower-case name as used in nftables and chain-name hashes (`tcp`, `udp`, `sctp`).
    pub fn lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
    pub fn upper(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.upper())
    }
}

/// `namespace/name` of an object. Strings are shared (`Arc<str>`) because every port and
/// endpoint of a Service refers to the same name; at 50k Services that matters.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamespacedName {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl NamespacedName {
    pub fn new(namespace: &str, name: &str) -> Self {
        NamespacedName {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl serde::Serialize for NamespacedName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One port of one Service: upstream's `ServicePortName`. Its string form is
/// `namespace/name:port`, or `namespace/name` when the port is unnamed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    pub service: NamespacedName,
    pub port: Arc<str>,
    pub protocol: Protocol,
}

impl ServicePortName {
    pub fn new(namespace: &str, name: &str, port: &str, protocol: Protocol) -> ServicePortName {
        ServicePortName {
            service: NamespacedName::new(namespace, name),
            port: port.into(),
            protocol,
        }
    }
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}", self.service)
        } else {
            write!(f, "{}:{}", self.service, self.port)
        }
    }
}

impl serde::Serialize for ServicePortName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Parses an IP address the way Go's `netutils.ParseIPSloppy` does: IPv4 octets with leading
/// zeros are read as decimal (`172.30.0.041` is `172.30.0.41`), as old API objects allow.
pub fn parse_ip_sloppy(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    let octets: Vec<&str> = text.split('.').collect();
    if octets.len() != 4 {
        return None;
    }
    let mut bytes = [0u8; 4];
    for (i, octet) in octets.iter().enumerate() {
        if octet.is_empty() || octet.len() > 3 || !octet.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        bytes[i] = octet.parse().ok()?;
    }
    Some(IpAddr::from(bytes))
}

/// Parses a CIDR like `netutils.ParseCIDRSloppy`, normalising the address to the network.
pub fn parse_cidr_sloppy(text: &str) -> Option<ipnet::IpNet> {
    let text = text.trim();
    let (addr, prefix) = text.split_once('/')?;
    let ip = parse_ip_sloppy(addr)?;
    let prefix: u8 = if prefix.len() > 1 && prefix.starts_with('0') {
        prefix.trim_start_matches('0').parse().ok().or(Some(0))?
    } else {
        prefix.parse().ok()?
    };
    ipnet::IpNet::new(ip, prefix).ok().map(|n| n.trunc())
}

/// The first `chars` characters of the RFC 4648 base32 (A-Z, 2-7) of the SHA-256 of `input`:
/// how upstream's proxiers derive short, stable chain names from a service port.
pub fn hash_prefix(input: &str, chars: usize) -> String {
    use sha2::{Digest, Sha256};
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = Sha256::digest(input.as_bytes());
    let mut out = String::with_capacity(chars);
    let mut buffer: u32 = 0;
    let mut bits = 0;
    for byte in digest.iter() {
        buffer = (buffer << 8) | u32::from(*byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
            if out.len() == chars {
                return out;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_port_name_strings_match_upstream() {
        let svc = NamespacedName::new("ns1", "svc1");
        let named = ServicePortName {
            service: svc.clone(),
            port: "p80".into(),
            protocol: Protocol::Tcp,
        };
        assert_eq!(named.to_string(), "ns1/svc1:p80");
        let unnamed = ServicePortName {
            service: svc,
            port: "".into(),
            protocol: Protocol::Tcp,
        };
        assert_eq!(unnamed.to_string(), "ns1/svc1");
    }

    #[test]
    fn sloppy_ip_and_cidr_parsing() {
        assert_eq!(
            parse_ip_sloppy("172.30.0.041"),
            Some("172.30.0.41".parse().unwrap())
        );
        assert_eq!(
            parse_ip_sloppy(" 2001:db8::1 "),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(parse_ip_sloppy("1.2.3"), None);
        assert_eq!(parse_ip_sloppy("256.1.1.1"), None);
        assert_eq!(
            parse_cidr_sloppy("203.0.113.000/025"),
            Some("203.0.113.0/25".parse().unwrap())
        );
        assert_eq!(
            parse_cidr_sloppy("198.51.100.7/24"),
            Some("198.51.100.0/24".parse().unwrap())
        );
        assert_eq!(parse_cidr_sloppy("nonsense"), None);
    }

    #[test]
    fn protocol_defaults_to_tcp() {
        assert_eq!(Protocol::from_api(None), Some(Protocol::Tcp));
        assert_eq!(Protocol::from_api(Some("SCTP")), Some(Protocol::Sctp));
        assert_eq!(Protocol::from_api(Some("ICMP")), None);
    }
}
