//! API objects as the API server sends them (JSON): a Service, an EndpointSlice and a Node
//! decoded from one input each (split at NUL bytes), applied to the model, planned for both
//! families, and rendered by both dataplanes: whatever the objects say, nothing panics.
#![no_main]
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube_proxy_model::context::{FamilyContext, ProxyPolicy};
use kube_proxy_model::{ClusterState, FamilyPlan, IpFamily, NodeView, PlanContext};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|b| *b == 0);
    let mut state = ClusterState::new("node-a");
    if let Some(Ok(service)) = parts.next().map(serde_json::from_slice::<Service>) {
        let _ = state.apply_service(&service);
    }
    if let Some(Ok(slice)) = parts.next().map(serde_json::from_slice::<EndpointSlice>) {
        let _ = state.apply_slice(&slice);
    }
    if let Some(Ok(node)) = parts.next().map(serde_json::from_slice::<Node>) {
        let _ = state.set_node(Some(&node));
    }
    let policy = ProxyPolicy {
        detect_local: kube_proxy_config::DetectLocal::ClusterCidr(vec![
            "198.18.0.0/16".parse().unwrap(),
            "2001:db8:18::/48".parse().unwrap(),
        ]),
        ..Default::default()
    };
    for family in IpFamily::ALL {
        let mut plan = FamilyPlan::default();
        plan.update(
            &state,
            family,
            &Default::default(),
            true,
            PlanContext::default(),
        );
        let node = NodeView {
            node_ips: vec![match family {
                IpFamily::V4 => "192.0.2.10".parse().unwrap(),
                IpFamily::V6 => "2001:db8:2::10".parse().unwrap(),
            }],
            ..Default::default()
        };
        let ctx = FamilyContext::resolve(&policy, family, &node);
        let nft = kube_proxy_nftables::context::Context(ctx.clone());
        for port in plan.services.values() {
            let _ = kube_proxy_nftables::contribution::contribute(port, &nft);
            let _ = kube_proxy_iptables::service::render(port, &ctx);
        }
    }
});
