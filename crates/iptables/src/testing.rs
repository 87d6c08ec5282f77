//! Test helpers shared by the renderer's unit tests.

use std::collections::BTreeSet;

use kube_proxy_config::DetectLocal;
use kube_proxy_model::context::{FamilyContext, ProxyPolicy};
use kube_proxy_model::{ClusterState, FamilyPlan, IpFamily, NodeView, PlanContext};
use serde_json::Value;

/// Plans `objects` (Services and EndpointSlices as JSON) for node-a.
pub fn plan(objects: &[Value]) -> FamilyPlan {
    let mut state = ClusterState::new("node-a");
    for object in objects {
        if object["kind"] == "Service" {
            state.apply_service(&serde_json::from_value(object.clone()).unwrap());
        } else {
            state.apply_slice(&serde_json::from_value(object.clone()).unwrap());
        }
    }
    let mut plan = FamilyPlan::default();
    plan.update(
        &state,
        IpFamily::V4,
        &BTreeSet::new(),
        true,
        PlanContext::default(),
    );
    plan
}

pub fn context(cluster_cidr: &str) -> FamilyContext {
    let policy = ProxyPolicy {
        detect_local: DetectLocal::ClusterCidr(vec![cluster_cidr.parse().unwrap()]),
        ..Default::default()
    };
    let node = NodeView {
        node_ips: vec!["192.0.2.10".parse().unwrap()],
        ..Default::default()
    };
    FamilyContext::resolve(&policy, IpFamily::V4, &node)
}
