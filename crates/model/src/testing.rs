//! Random cluster changes for property tests of the dataplanes (feature `testing`): Services
//! that come and go with contested external IPs and NodePorts, ClientIP affinity and
//! `externalTrafficPolicy: Local`, and EndpointSlices with endpoints on this node
//! (`node-a`) and elsewhere. Deterministic for a seed.

use serde_json::json;

use crate::names::NamespacedName;
use crate::state::ClusterState;

pub struct RandomChanges {
    seed: u64,
}

impl RandomChanges {
    pub fn new(seed: u64) -> Self {
        RandomChanges { seed: seed.max(1) }
    }

    /// A number below `n` (xorshift).
    pub fn below(&mut self, n: u64) -> u64 {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        self.seed % n
    }

    /// Applies one random change to one of eight Services `ns/s0`..`ns/s7`.
    pub fn apply_one(&mut self, state: &mut ClusterState) {
        let i = self.below(8);
        let name = format!("s{i}");
        match self.below(5) {
            0 => {
                state.delete_service(&NamespacedName::new("ns", &name));
            }
            1 | 2 => {
                let mut spec = json!({"clusterIP": format!("198.19.0.{}", 10 + i), "ports": [{"name": "p", "port": 80}]});
                if self.below(2) == 0 {
                    spec["externalIPs"] = json!([format!("198.51.100.{}", self.below(2))]);
                }
                if self.below(3) == 0 {
                    spec["type"] = json!("NodePort");
                    spec["ports"] =
                        json!([{"name": "p", "port": 80, "nodePort": 30000 + self.below(3)}]);
                    if self.below(2) == 0 {
                        spec["externalTrafficPolicy"] = json!("Local");
                    }
                }
                if self.below(4) == 0 {
                    spec["sessionAffinity"] = json!("ClientIP");
                }
                let service = json!({"metadata": {"namespace": "ns", "name": name}, "spec": spec});
                state.apply_service(&serde_json::from_value(service).unwrap());
            }
            _ => {
                let endpoints: Vec<_> = (0..self.below(4))
                    .map(|k| {
                        let node = if self.below(2) == 0 {
                            "node-a"
                        } else {
                            "node-b"
                        };
                        json!({"addresses": [format!("198.18.{i}.{k}")], "nodeName": node})
                    })
                    .collect();
                let slice = json!({"metadata": {"namespace": "ns", "name": format!("{name}-1"), "labels": {"kubernetes.io/service-name": name}},
                    "addressType": "IPv4", "ports": [{"name": "p", "port": 8080}], "endpoints": endpoints});
                state.apply_slice(&serde_json::from_value(slice).unwrap());
            }
        }
    }
}

/// Plans what changed in `state` (everything when `full`) and syncs `dataplane` for IPv4;
/// panics on a failed sync.
pub fn sync_ipv4(
    dataplane: &mut dyn crate::Dataplane,
    state: &mut ClusterState,
    plan: &mut crate::FamilyPlan,
    full: bool,
    node: &crate::NodeView,
) -> crate::dataplane::SyncReport {
    let changes = state.take_changes();
    let changed = plan.update(
        state,
        crate::IpFamily::V4,
        &changes.services,
        changes.full || full,
        crate::PlanContext::default(),
    );
    let input = crate::SyncInput {
        family: crate::IpFamily::V4,
        plan,
        changed: &changed,
        full,
        node,
        service_cidrs: &[],
    };
    dataplane.sync(input).unwrap_or_else(|e| panic!("{e}"))
}

/// A fresh plan of everything in `state`, synced in full into `dataplane` (IPv4).
pub fn fresh_sync_ipv4(
    dataplane: &mut dyn crate::Dataplane,
    state: &ClusterState,
    node: &crate::NodeView,
) {
    let mut plan = crate::FamilyPlan::default();
    let changed = plan.update(
        state,
        crate::IpFamily::V4,
        &Default::default(),
        true,
        crate::PlanContext::default(),
    );
    let input = crate::SyncInput {
        family: crate::IpFamily::V4,
        plan: &plan,
        changed: &changed,
        full: true,
        node,
        service_cidrs: &[],
    };
    dataplane.sync(input).unwrap_or_else(|e| panic!("{e}"));
}

/// Applies a Service or an EndpointSlice given as JSON (`"kind"` tells which).
pub fn apply(state: &mut ClusterState, object: serde_json::Value) {
    if object["kind"] == "Service" {
        state.apply_service(&serde_json::from_value(object).unwrap());
    } else {
        state.apply_slice(&serde_json::from_value(object).unwrap());
    }
}

/// Service `ns/web` (ClusterIP 198.19.0.10, TCP port `http` 80 → 8080) with `spec`'s fields
/// set over it.
pub fn web(spec: serde_json::Value) -> serde_json::Value {
    let mut service = json!({"kind": "Service", "metadata": {"namespace": "ns", "name": "web"},
        "spec": {"clusterIP": "198.19.0.10", "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}});
    for (k, v) in spec.as_object().unwrap() {
        service["spec"][k] = v.clone();
    }
    service
}

/// The EndpointSlice of `web`: endpoints (IP, node name) on port 8080.
pub fn web_slice(endpoints: &[(&str, &str)]) -> serde_json::Value {
    let endpoints: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|(ip, node)| json!({"addresses": [ip], "nodeName": node}))
        .collect();
    json!({"kind": "EndpointSlice",
        "metadata": {"namespace": "ns", "name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": endpoints})
}
