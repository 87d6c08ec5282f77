//! The proxy's own Node: what of it kube-proxy uses.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;

use crate::names::{parse_cidr_sloppy, parse_ip_sloppy, IpFamily};

pub const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";
/// Taint the cluster autoscaler puts on nodes it is about to delete (KEP-3836).
pub const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct NodeInfo {
    pub name: String,
    /// `topology.kubernetes.io/zone`, the only label kube-proxy's routing depends on.
    pub zone: Option<String>,
    /// The node's IPs as upstream's `GetNodeHostIPs`: InternalIPs first, then ExternalIPs.
    pub addresses: Vec<IpAddr>,
    pub pod_cidrs: Vec<IpNet>,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// Tainted `ToBeDeletedByClusterAutoscaler`.
    pub to_be_deleted: bool,
}

impl NodeInfo {
    pub fn from_api(node: &Node) -> NodeInfo {
        let status = node.status.as_ref();
        let mut internal = Vec::new();
        let mut external = Vec::new();
        for address in status
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
        {
            let Some(ip) = parse_ip_sloppy(&address.address) else {
                continue;
            };
            match address.type_.as_str() {
                "InternalIP" => internal.push(ip),
                "ExternalIP" => external.push(ip),
                _ => {}
            }
        }
        internal.extend(external);
        let spec = node.spec.as_ref();
        let mut pod_cidrs: Vec<IpNet> = spec
            .and_then(|s| s.pod_cidrs.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|c| parse_cidr_sloppy(c))
            .collect();
        if pod_cidrs.is_empty() {
            pod_cidrs.extend(
                spec.and_then(|s| s.pod_cidr.as_deref())
                    .and_then(parse_cidr_sloppy),
            );
        }
        NodeInfo {
            name: node.metadata.name.clone().unwrap_or_default(),
            zone: node
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_TOPOLOGY_ZONE))
                .cloned(),
            addresses: internal,
            pod_cidrs,
            deleting: node.metadata.deletion_timestamp.is_some(),
            to_be_deleted: spec
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|t| t.iter().any(|t| t.key == TAINT_TO_BE_DELETED)),
        }
    }

    /// The first node IP of a family: that family's "primary" IP.
    pub fn primary_ip(&self, family: IpFamily) -> Option<IpAddr> {
        self.addresses
            .iter()
            .copied()
            .find(|ip| IpFamily::of(ip) == family)
    }

    /// Whether `/healthz` may report this node as eligible for load-balancer traffic.
    pub fn eligible(&self) -> bool {
        !self.deleting && !self.to_be_deleted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_what_kube_proxy_uses() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "z1"}, "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"podCIDRs": ["198.18.1.0/24", "2001:db8:18:1::/64"],
                     "taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]},
            "status": {"addresses": [
                {"type": "Hostname", "address": "node-a"},
                {"type": "ExternalIP", "address": "192.0.2.100"},
                {"type": "InternalIP", "address": "192.0.2.10"},
                {"type": "InternalIP", "address": "2001:db8:2::10"}
            ]}
        }))
        .unwrap();
        let info = NodeInfo::from_api(&node);
        assert_eq!(info.zone.as_deref(), Some("z1"));
        assert_eq!(
            info.primary_ip(IpFamily::V4),
            Some("192.0.2.10".parse().unwrap())
        );
        assert_eq!(
            info.primary_ip(IpFamily::V6),
            Some("2001:db8:2::10".parse().unwrap())
        );
        assert_eq!(info.pod_cidrs.len(), 2);
        assert!(info.deleting && info.to_be_deleted && !info.eligible());
    }
}
