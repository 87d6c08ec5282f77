//! Endpoint selection: upstream's `CategorizeEndpoints` (pkg/proxy/topology.go).
//!
//! Given a service port's endpoints, decide which serve cluster-wide traffic (ready, filtered
//! by topology hints, else serving-and-terminating anywhere) and which serve Local-policy
//! traffic (local and ready, else local serving-and-terminating). Not-ready, not-serving
//! endpoints are never used. Feature gates are a parameter: nothing global is read.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::endpoints::Endpoint;
use crate::service::ServicePort;

/// The feature gates that change endpoint selection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelectionGates {
    /// `PreferSameTrafficDistribution`: honour node hints (PreferSameNode). On by default
    /// since Kubernetes 1.34.
    pub prefer_same_traffic_distribution: bool,
}

impl Default for SelectionGates {
    fn default() -> Self {
        SelectionGates {
            prefer_same_traffic_distribution: true,
        }
    }
}

/// Where this node is, for topology hints.
#[derive(Clone, Copy, Debug, Default)]
pub struct NodeTopology<'a> {
    pub node_name: &'a str,
    pub zone: Option<&'a str>,
}

/// Which topology filter applied to cluster endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum TopologyMode {
    None,
    PreferSameZone,
    PreferSameNode,
}

/// The result of categorising one service port's endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Categorized {
    /// Endpoints for cluster-wide traffic (internal traffic with iTP Cluster, external with
    /// eTP Cluster, and short-circuited pod/node traffic). Empty if the port does not use them.
    pub cluster: Vec<Arc<Endpoint>>,
    /// Endpoints for Local-policy traffic. Empty if the port does not use them.
    pub local: Vec<Arc<Endpoint>>,
    /// `cluster ∪ local`, sorted; what conntrack cleanup and hairpin handling consider live.
    pub all_reachable: Vec<Arc<Endpoint>>,
    /// Whether the port has any usable endpoint anywhere (decides REJECT versus DROP).
    pub has_any: bool,
    pub topology: Option<TopologyMode>,
}

/// Categorises `endpoints` (sorted, as the slice merge returns them) for `port`.
pub fn categorize_endpoints(
    endpoints: &[Arc<Endpoint>],
    port: &ServicePort,
    node: NodeTopology<'_>,
    gates: SelectionGates,
) -> Categorized {
    let mut result = Categorized::default();
    let uses_cluster = port.uses_cluster_endpoints();
    if uses_cluster {
        let mode = topology_mode_from_hints(endpoints, node, gates);
        result.topology = Some(mode);
        result.cluster = endpoints
            .iter()
            .filter(|ep| ep.ready && available_for_topology(ep, mode, node))
            .cloned()
            .collect();
        // Nothing ready (hints only come from ready endpoints): fall back to endpoints that
        // are terminating but still serving, anywhere, without topology.
        if result.cluster.is_empty() {
            result.cluster = endpoints
                .iter()
                .filter(|ep| ep.serving_terminating())
                .cloned()
                .collect();
        }
        result.has_any = !result.cluster.is_empty();
    }
    if !port.uses_local_endpoints() {
        result.all_reachable = result.cluster.clone();
        return result;
    }

    let mut local_ready = false;
    let mut local_serving_terminating = false;
    for ep in endpoints {
        if ep.ready {
            result.has_any = true;
            local_ready |= ep.is_local;
        } else if ep.serving_terminating() {
            result.has_any = true;
            local_serving_terminating |= ep.is_local;
        }
    }
    if local_ready {
        result.local = endpoints
            .iter()
            .filter(|ep| ep.is_local && ep.ready)
            .cloned()
            .collect();
    } else if local_serving_terminating {
        result.local = endpoints
            .iter()
            .filter(|ep| ep.is_local && ep.serving_terminating())
            .cloned()
            .collect();
    }
    if !uses_cluster {
        result.all_reachable = result.local.clone();
        return result;
    }
    let mut union: BTreeMap<String, Arc<Endpoint>> = BTreeMap::new();
    for ep in result.cluster.iter().chain(result.local.iter()) {
        union.insert(ep.key(), ep.clone());
    }
    result.all_reachable = union.into_values().collect();
    result
}

fn topology_mode_from_hints(
    endpoints: &[Arc<Endpoint>],
    node: NodeTopology<'_>,
    gates: SelectionGates,
) -> TopologyMode {
    let mut has_endpoint_for_node = false;
    let mut all_have_node_hints = true;
    let mut has_endpoint_for_zone = false;
    let mut all_have_zone_hints = true;
    for ep in endpoints.iter().filter(|ep| ep.ready) {
        if ep.node_hints().is_empty() {
            all_have_node_hints = false;
        } else if ep.node_hints().iter().any(|n| &**n == node.node_name) {
            has_endpoint_for_node = true;
        }
        if ep.zone_hints().is_empty() {
            all_have_zone_hints = false;
        } else if node
            .zone
            .is_some_and(|zone| ep.zone_hints().iter().any(|z| &**z == zone))
        {
            has_endpoint_for_zone = true;
        }
    }
    if gates.prefer_same_traffic_distribution && all_have_node_hints && has_endpoint_for_node {
        return TopologyMode::PreferSameNode;
    }
    if all_have_zone_hints && has_endpoint_for_zone {
        return TopologyMode::PreferSameZone;
    }
    TopologyMode::None
}

fn available_for_topology(ep: &Endpoint, mode: TopologyMode, node: NodeTopology<'_>) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::PreferSameNode => ep.node_hints().iter().any(|n| &**n == node.node_name),
        TopologyMode::PreferSameZone => node
            .zone
            .is_some_and(|zone| ep.zone_hints().iter().any(|z| &**z == zone)),
    }
}

#[cfg(test)]
mod tests;
