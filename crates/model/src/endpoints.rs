//! `discovery/v1` EndpointSlices → trimmed [`SliceInfo`], and the merge of a Service's slices
//! into per-port endpoint lists (upstream's `EndpointSliceCache`).
//!
//! Slices are kept per (Service, slice name) because endpoints move between slices; merging
//! happens only when a Service's endpoints are read, so a move never shows a transient gap.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::names::{parse_ip_sloppy, IpFamily, NamespacedName, Protocol, ServicePortName};
use crate::service::{LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME};

/// Label that ties a slice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

/// One endpoint (address + port) of one service port, with what kube-proxy needs to choose it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// The endpoint runs on this node.
    pub is_local: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_name: Option<Arc<str>>,
    /// Topology hints, if any (most endpoints have none: one pointer, shared with the slice).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hints: Option<Arc<Hints>>,
}

/// `hints.forZones` and `hints.forNodes` of an endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Hints {
    pub zones: Vec<Arc<str>>,
    pub nodes: Vec<Arc<str>>,
}

impl Endpoint {
    /// `hints.forZones`; empty means no zone hints.
    pub fn zone_hints(&self) -> &[Arc<str>] {
        self.hints
            .as_deref()
            .map(|h| h.zones.as_slice())
            .unwrap_or(&[])
    }
    /// `hints.forNodes`; empty means no node hints.
    pub fn node_hints(&self) -> &[Arc<str>] {
        self.hints
            .as_deref()
            .map(|h| h.nodes.as_slice())
            .unwrap_or(&[])
    }
}

impl Endpoint {
    /// Serving and terminating: usable only as a fallback when nothing is ready.
    pub fn serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }
    /// `ip:port` as upstream prints it (IPv6 in brackets); endpoint lists sort by this string.
    pub fn key(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}", self.port),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}", self.port),
        }
    }
}

/// A port advertised by a slice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: Arc<str>,
    pub port: u16,
    pub protocol: Protocol,
}

/// One address entry of a slice, before it is paired with a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub ip: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<Arc<str>>,
    pub hints: Option<Arc<Hints>>,
}

/// The parts of an EndpointSlice kube-proxy uses; small on purpose (memory at 250k endpoints).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    pub service: NamespacedName,
    pub name: Arc<str>,
    pub family: IpFamily,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

/// What converting one slice produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConvertedSlice {
    Slice {
        slice: SliceInfo,
        warnings: Vec<String>,
    },
    /// Not for kube-proxy: FQDN address type, headless, or handled by another proxy.
    Ignored(&'static str),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SliceError {
    #[error("metadata.name and metadata.namespace are required")]
    MissingName,
    #[error("label {LABEL_SERVICE_NAME} is missing, so the slice belongs to no Service")]
    MissingServiceName,
    #[error("addressType {0:?} is not IPv4, IPv6 or FQDN")]
    InvalidAddressType(String),
}

/// The key a slice is stored under: (its Service, its own name).
pub fn slice_key(slice: &EndpointSlice) -> Option<(NamespacedName, Arc<str>)> {
    let name = slice.metadata.name.as_deref().filter(|s| !s.is_empty())?;
    let namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
    let service = slice.metadata.labels.as_ref()?.get(LABEL_SERVICE_NAME)?;
    Some((NamespacedName::new(namespace, service), name.into()))
}

/// Converts one slice. Locality is decided when slices are merged (see [`merge_slices`]).
pub fn convert_slice(slice: &EndpointSlice) -> Result<ConvertedSlice, SliceError> {
    let name = slice
        .metadata
        .name
        .as_deref()
        .filter(|s| !s.is_empty())
        .ok_or(SliceError::MissingName)?;
    let namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
    let labels = slice.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME)) {
        return Ok(ConvertedSlice::Ignored(
            "labelled for another service proxy",
        ));
    }
    if labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS)) {
        return Ok(ConvertedSlice::Ignored("slice of a headless Service"));
    }
    let service_name = labels
        .and_then(|l| l.get(LABEL_SERVICE_NAME))
        .filter(|s| !s.is_empty())
        .ok_or(SliceError::MissingServiceName)?;
    let family = match slice.address_type.as_str() {
        "IPv4" => IpFamily::V4,
        "IPv6" => IpFamily::V6,
        "FQDN" => return Ok(ConvertedSlice::Ignored("FQDN address type")),
        other => return Err(SliceError::InvalidAddressType(other.to_string())),
    };
    let mut warnings = Vec::new();
    let mut ports = Vec::new();
    for (index, port) in slice.ports.iter().flatten().enumerate() {
        // Upstream skips ports without a name or number.
        let (Some(port_name), Some(number)) = (port.name.as_deref(), port.port) else {
            warnings.push(format!(
                "ignoring ports[{index}]: name and port are required"
            ));
            continue;
        };
        let Some(number) = u16::try_from(number).ok().filter(|p| *p != 0) else {
            warnings.push(format!(
                "ignoring ports[{index}]: port {number} is not in [1, 65535]"
            ));
            continue;
        };
        let Some(protocol) = Protocol::from_api(port.protocol.as_deref()) else {
            warnings.push(format!(
                "ignoring ports[{index}]: protocol {:?} is not TCP, UDP or SCTP",
                port.protocol
            ));
            continue;
        };
        ports.push(SlicePort {
            name: port_name.into(),
            port: number,
            protocol,
        });
    }
    let mut endpoints = Vec::new();
    for (index, endpoint) in slice.endpoints.iter().enumerate() {
        // kube-proxy uses the first address only.
        let Some(raw) = endpoint.addresses.first() else {
            continue;
        };
        let Some(ip) = parse_ip_sloppy(raw) else {
            warnings.push(format!(
                "ignoring endpoints[{index}]: address {raw:?} is not an IP"
            ));
            continue;
        };
        if IpFamily::of(&ip) != family {
            warnings.push(format!(
                "ignoring endpoints[{index}]: address {raw} is not {family}"
            ));
            continue;
        }
        let conditions = endpoint.conditions.as_ref();
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        let serving = conditions.and_then(|c| c.serving).unwrap_or(true);
        let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
        let hints = endpoint.hints.as_ref();
        let zones: Vec<Arc<str>> = hints
            .and_then(|h| h.for_zones.as_ref())
            .map(|zones| zones.iter().map(|z| Arc::from(z.name.as_str())).collect())
            .unwrap_or_default();
        let nodes: Vec<Arc<str>> = hints
            .and_then(|h| h.for_nodes.as_ref())
            .map(|nodes| nodes.iter().map(|n| Arc::from(n.name.as_str())).collect())
            .unwrap_or_default();
        let hints =
            (!zones.is_empty() || !nodes.is_empty()).then(|| Arc::new(Hints { zones, nodes }));
        endpoints.push(SliceEndpoint {
            ip,
            ready,
            serving,
            terminating,
            node_name: endpoint.node_name.as_deref().map(Arc::from),
            hints,
        });
    }
    Ok(ConvertedSlice::Slice {
        slice: SliceInfo {
            service: NamespacedName::new(namespace, service_name),
            name: name.into(),
            family,
            ports,
            endpoints,
        },
        warnings,
    })
}

/// Merges all slices of one Service (one family) into endpoints per service port, as
/// upstream's `endpointInfoByServicePort`: duplicates of the same `ip:port` collapse (a local
/// copy wins), and each list is sorted by its `ip:port` string.
pub fn merge_slices<'a>(
    slices: impl IntoIterator<Item = &'a SliceInfo>,
    node_name: &str,
) -> BTreeMap<ServicePortName, Vec<Arc<Endpoint>>> {
    let mut by_port: BTreeMap<ServicePortName, BTreeMap<String, Arc<Endpoint>>> = BTreeMap::new();
    for slice in slices {
        for port in &slice.ports {
            let name = ServicePortName {
                service: slice.service.clone(),
                port: port.name.clone(),
                protocol: port.protocol,
            };
            let set = by_port.entry(name).or_default();
            for ep in &slice.endpoints {
                let is_local = ep
                    .node_name
                    .as_deref()
                    .is_some_and(|n| !n.is_empty() && n == node_name);
                let endpoint = Endpoint {
                    ip: ep.ip,
                    port: port.port,
                    ready: ep.ready,
                    serving: ep.serving,
                    terminating: ep.terminating,
                    is_local,
                    node_name: ep.node_name.clone(),
                    hints: ep.hints.clone(),
                };
                let key = endpoint.key();
                if is_local || !set.contains_key(&key) {
                    set.insert(key, Arc::new(endpoint));
                }
            }
        }
    }
    // BTreeMap<String, _> iterates in plain string order, which is upstream's sort order.
    by_port
        .into_iter()
        .map(|(name, set)| (name, set.into_values().collect()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(value: serde_json::Value) -> SliceInfo {
        let s: EndpointSlice = serde_json::from_value(value).unwrap();
        match convert_slice(&s).unwrap() {
            ConvertedSlice::Slice { slice, .. } => slice,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn conditions_default_and_hints_are_read() {
        let s = slice(json!({
            "metadata": {"namespace": "ns", "name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [
                {"addresses": ["198.18.1.5"], "nodeName": "node-a", "hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": "node-a"}]}},
                {"addresses": ["198.18.2.7"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["2001:db8::1"]},
                {"addresses": []}
            ]
        }));
        assert_eq!(s.service, NamespacedName::new("ns", "web"));
        assert_eq!(
            s.endpoints.len(),
            2,
            "wrong-family and empty addresses are skipped"
        );
        assert!(s.endpoints[0].ready && s.endpoints[0].serving && !s.endpoints[0].terminating);
        assert_eq!(
            s.endpoints[0].hints.as_ref().unwrap().zones,
            vec![Arc::from("z1")]
        );
        assert!(!s.endpoints[1].ready && s.endpoints[1].serving && s.endpoints[1].terminating);
        assert_eq!(s.ports[0].protocol, Protocol::Tcp);
    }

    #[test]
    fn ignored_and_invalid_slices() {
        let fqdn: EndpointSlice = serde_json::from_value(json!({"metadata": {"namespace": "n", "name": "s", "labels": {"kubernetes.io/service-name": "x"}}, "addressType": "FQDN", "endpoints": []})).unwrap();
        assert!(matches!(
            convert_slice(&fqdn),
            Ok(ConvertedSlice::Ignored(_))
        ));
        let headless: EndpointSlice = serde_json::from_value(json!({"metadata": {"namespace": "n", "name": "s", "labels": {"kubernetes.io/service-name": "x", "service.kubernetes.io/headless": ""}}, "addressType": "IPv4", "endpoints": []})).unwrap();
        assert!(matches!(
            convert_slice(&headless),
            Ok(ConvertedSlice::Ignored(_))
        ));
        let orphan: EndpointSlice = serde_json::from_value(json!({"metadata": {"namespace": "n", "name": "s"}, "addressType": "IPv4", "endpoints": []})).unwrap();
        assert_eq!(convert_slice(&orphan), Err(SliceError::MissingServiceName));
    }

    #[test]
    fn merge_dedups_sorts_by_string_and_prefers_local() {
        let a = slice(json!({
            "metadata": {"namespace": "ns", "name": "a", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "p", "port": 11}, {"name": "q", "port": 12, "protocol": "UDP"}, {"port": 13}],
            "endpoints": [{"addresses": ["10.1.1.11"]}, {"addresses": ["10.1.1.1"]}]
        }));
        let b = slice(json!({
            "metadata": {"namespace": "ns", "name": "b", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "p", "port": 11}],
            "endpoints": [{"addresses": ["10.1.1.1"], "nodeName": "node-a"}, {"addresses": ["10.1.1.2"]}]
        }));
        let merged = merge_slices([&a, &b], "node-a");
        let p = ServicePortName {
            service: NamespacedName::new("ns", "web"),
            port: "p".into(),
            protocol: Protocol::Tcp,
        };
        let keys: Vec<String> = merged[&p].iter().map(|e| e.key()).collect();
        assert_eq!(
            keys,
            vec!["10.1.1.11:11", "10.1.1.1:11", "10.1.1.2:11"],
            "plain string order, deduplicated"
        );
        assert!(
            merged[&p]
                .iter()
                .find(|e| e.key() == "10.1.1.1:11")
                .unwrap()
                .is_local,
            "local copy wins"
        );
        let q = ServicePortName {
            service: NamespacedName::new("ns", "web"),
            port: "q".into(),
            protocol: Protocol::Udp,
        };
        assert_eq!(merged[&q].len(), 2);
        assert_eq!(merged.len(), 2, "the port without a name is ignored");
    }
}
