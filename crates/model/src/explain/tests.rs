//! The explanation read back from plans of each kind of Service and traffic.

use std::collections::BTreeSet;

use kube_proxy_config::DetectLocal;
use serde_json::{json, Value};

use super::*;
use crate::context::ProxyPolicy;
use crate::dataplane::NodeView;
use crate::state::ClusterState;
use crate::PlanContext;

const NODE_IP: &str = "192.0.2.10";

/// Plans a Service `s` (spec merged over a ClusterIP 198.19.0.10 port 80) with endpoints
/// `(ip, node)` on port 8080.
fn plan(spec: Value, endpoints: &[(&str, &str)]) -> FamilyPlan {
    plan_with_status(spec, json!({}), endpoints)
}

/// [`plan`] with the Service's `status`.
fn plan_with_status(spec: Value, status: Value, endpoints: &[(&str, &str)]) -> FamilyPlan {
    let mut spec = spec;
    let obj = spec.as_object_mut().unwrap();
    obj.entry("clusterIP").or_insert(json!("198.19.0.10"));
    obj.entry("ports")
        .or_insert(json!([{"name": "p", "port": 80, "nodePort": 30080}]));
    let mut state = ClusterState::new("node-a");
    state.apply_service(
        &serde_json::from_value(
            json!({"metadata": {"namespace": "ns", "name": "s"}, "spec": spec, "status": status}),
        )
        .unwrap(),
    );
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|(ip, node)| json!({"addresses": [ip], "nodeName": node}))
        .collect();
    state.apply_slice(
        &serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": "s-1",
            "labels": {"kubernetes.io/service-name": "s"}},
            "addressType": "IPv4", "ports": [{"name": "p", "port": 8080}], "endpoints": eps}))
        .unwrap(),
    );
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

fn ctx_of(detect: DetectLocal) -> FamilyContext {
    let policy = ProxyPolicy {
        detect_local: detect,
        ..Default::default()
    };
    let node = NodeView {
        node_ips: vec![NODE_IP.parse().unwrap()],
        ..Default::default()
    };
    FamilyContext::resolve(&policy, IpFamily::V4, &node)
}

fn cluster_cidr() -> FamilyContext {
    ctx_of(DetectLocal::ClusterCidr(vec!["198.18.0.0/16"
        .parse()
        .unwrap()]))
}

fn run(plan: &FamilyPlan, ctx: &FamilyContext, from: &str, to: &str) -> Explanation {
    let nft = ModeRules {
        reject_unknown_cluster_ip_ports: true,
        drop_unallocated_service_ips: true,
        ..Default::default()
    };
    run_with(plan, ctx, from, to, nft)
}

/// [`run`] in userspace mode (cluster-CIDR detector).
fn run_userspace(plan: &FamilyPlan, from: &str, to: &str) -> Explanation {
    let userspace = ModeRules {
        userspace: true,
        ..Default::default()
    };
    run_with(plan, &cluster_cidr(), from, to, userspace)
}

fn run_with(
    plan: &FamilyPlan,
    ctx: &FamilyContext,
    from: &str,
    to: &str,
    rules: ModeRules,
) -> Explanation {
    let (ip, port, protocol) = Packet::parse_destination(to).unwrap();
    let packet = Packet {
        from: from.parse().unwrap(),
        to: ip,
        port,
        protocol,
    };
    explain(
        plan,
        ctx,
        &[NODE_IP.parse().unwrap()],
        &packet,
        &SourceHints::default(),
        rules,
    )
}

const TWO: &[(&str, &str)] = &[("198.18.1.2", "node-a"), ("198.18.2.2", "node-b")];

#[test]
fn destinations_parse_with_protocols_and_ipv6() {
    assert_eq!(
        Packet::parse_destination("198.19.0.1:80").unwrap(),
        ("198.19.0.1".parse().unwrap(), 80, Protocol::Tcp)
    );
    assert_eq!(
        Packet::parse_destination("[2001:db8::1]:53/udp").unwrap(),
        ("2001:db8::1".parse().unwrap(), 53, Protocol::Udp)
    );
    assert!(Packet::parse_destination("198.19.0.1:80/icmp")
        .unwrap_err()
        .contains("tcp, udp or sctp"));
    assert!(Packet::parse_destination("198.19.0.1").is_err());
}

#[test]
fn cluster_ip_from_a_pod_and_from_outside() {
    let plan = plan(json!({}), TWO);
    let ctx = cluster_cidr();
    let e = run(&plan, &ctx, "198.18.1.3", "198.19.0.10:80");
    assert_eq!(e.origin.origin, Origin::LocalPod);
    assert_eq!(e.service_port.as_deref(), Some("ns/s:p"));
    assert_eq!(e.frontend_kind, Some(FrontendKind::ClusterIp));
    assert_eq!(e.verdict, Verdict::Dnat);
    assert_eq!(e.endpoints.len(), 2);
    assert_eq!(e.endpoints[0].percent, "50.00");
    assert!(!e.masquerade.as_ref().unwrap().masquerade);

    let e = run(&plan, &ctx, "203.0.113.5", "198.19.0.10:80");
    assert_eq!(e.origin.origin, Origin::Outside);
    assert!(e.masquerade.unwrap().masquerade);
    let e = run(&plan, &ctx, NODE_IP, "198.19.0.10:80");
    assert_eq!(e.origin.origin, Origin::Node);
    assert!(e.masquerade.unwrap().masquerade);

    // Without a detector ClusterIP traffic is not masqueraded; a pod reaching itself is.
    let none = ctx_none();
    let e = run(&plan, &none, "198.18.1.2", "198.19.0.10:80");
    let m = e.masquerade.unwrap();
    assert!(!m.masquerade && m.reason.contains("hairpin"), "{m:?}");
}

fn ctx_none() -> FamilyContext {
    ctx_of(DetectLocal::ClusterCidr(Vec::new()))
}

#[test]
fn unknown_ports_unknown_addresses_and_protocols() {
    let plan = plan(json!({}), TWO);
    let ctx = cluster_cidr();
    let e = run(&plan, &ctx, "198.18.1.3", "198.19.0.10:81");
    assert_eq!((e.verdict, e.service_port), (Verdict::Reject, None));
    let e = run(&plan, &ctx, "198.18.1.3", "198.19.0.10:80/udp");
    assert_eq!(e.verdict, Verdict::Reject, "{}", e.reason);
    let e = run(&plan, &ctx, "198.18.1.3", "198.19.0.11:80");
    assert_eq!(e.verdict, Verdict::NotHandled);
    let in_cidr = ctx
        .clone()
        .with_service_cidrs(&["198.19.0.0/16".parse().unwrap()]);
    let e = run(&plan, &in_cidr, "198.18.1.3", "198.19.0.11:80");
    assert_eq!(e.verdict, Verdict::Drop, "{}", e.reason);
}

#[test]
fn no_endpoints_rejects() {
    let plan = plan(json!({}), &[]);
    let e = run(&plan, &cluster_cidr(), "198.18.1.3", "198.19.0.10:80");
    assert_eq!(e.verdict, Verdict::Reject);
    assert_eq!(e.service_port.as_deref(), Some("ns/s:p"));
}

#[test]
fn node_ports_and_external_traffic_policy_local() {
    let ctx = cluster_cidr();
    let cluster = plan(json!({"type": "NodePort"}), TWO);
    let e = run(&cluster, &ctx, "203.0.113.5", "192.0.2.10:30080");
    assert_eq!(e.frontend_kind, Some(FrontendKind::NodePort));
    assert_eq!(e.endpoints.len(), 2);
    assert!(e.masquerade.unwrap().masquerade);
    // Not a NodePort address.
    let e = run(&cluster, &ctx, "203.0.113.5", "192.0.2.99:30080");
    assert_eq!(e.verdict, Verdict::NotHandled);

    let local = plan(
        json!({"type": "NodePort", "externalTrafficPolicy": "Local"}),
        TWO,
    );
    let e = run(&local, &ctx, "203.0.113.5", "192.0.2.10:30080");
    assert_eq!(e.endpoint_set, Some(EndpointSet::Local));
    assert_eq!(e.endpoints.len(), 1);
    assert!(!e.masquerade.unwrap().masquerade);
    let e = run(&local, &ctx, "198.18.1.3", "192.0.2.10:30080");
    assert_eq!(
        e.endpoint_set,
        Some(EndpointSet::Cluster),
        "pods short-circuit"
    );
    assert!(!e.masquerade.unwrap().masquerade);
    let e = run(&local, &ctx, NODE_IP, "192.0.2.10:30080");
    assert_eq!(
        e.endpoint_set,
        Some(EndpointSet::Cluster),
        "the node short-circuits"
    );
    assert!(e.masquerade.unwrap().masquerade);

    let remote_only = plan(
        json!({"type": "NodePort", "externalTrafficPolicy": "Local"}),
        &[("198.18.2.2", "node-b")],
    );
    let e = run(&remote_only, &ctx, "203.0.113.5", "192.0.2.10:30080");
    assert_eq!(e.verdict, Verdict::Drop, "{}", e.reason);
}

#[test]
fn internal_traffic_policy_local_and_affinity() {
    let ctx = cluster_cidr();
    let p = plan(
        json!({"internalTrafficPolicy": "Local", "sessionAffinity": "ClientIP"}),
        TWO,
    );
    let e = run(&p, &ctx, "198.18.1.3", "198.19.0.10:80");
    assert_eq!(e.endpoint_set, Some(EndpointSet::Local));
    assert_eq!(e.endpoints[0].address, "198.18.1.2:8080");
    assert_eq!(e.endpoints[0].percent, "100.00");
    assert_eq!(e.affinity_timeout_seconds, Some(10800));
    let p = plan(
        json!({"internalTrafficPolicy": "Local"}),
        &[("198.18.2.2", "node-b")],
    );
    assert_eq!(
        run(&p, &ctx, "198.18.1.3", "198.19.0.10:80").verdict,
        Verdict::Drop
    );
}

#[test]
fn load_balancer_source_ranges() {
    let ctx = cluster_cidr();
    let p = plan(
        json!({"type": "LoadBalancer", "loadBalancerSourceRanges": ["203.0.113.0/25"],
               "status": {}}),
        TWO,
    );
    // The VIP comes from the status; without one, only the ClusterIP and NodePort exist.
    let e = run(&p, &ctx, "203.0.113.200", "192.0.2.10:30080");
    assert_eq!(e.verdict, Verdict::Dnat, "NodePorts are not filtered");
    let mut state = ClusterState::new("node-a");
    state.apply_service(
        &serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": "s"},
            "spec": {"type": "LoadBalancer", "clusterIP": "198.19.0.10", "loadBalancerSourceRanges": ["203.0.113.0/25"],
                     "ports": [{"name": "p", "port": 80, "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}]}}}))
        .unwrap(),
    );
    state.apply_slice(
        &serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": "s-1",
            "labels": {"kubernetes.io/service-name": "s"}},
            "addressType": "IPv4", "ports": [{"name": "p", "port": 8080}],
            "endpoints": [{"addresses": ["198.18.2.2"], "nodeName": "node-b"}]}))
        .unwrap(),
    );
    let mut lb = FamilyPlan::default();
    lb.update(
        &state,
        IpFamily::V4,
        &BTreeSet::new(),
        true,
        PlanContext::default(),
    );
    let e = run(&lb, &ctx, "203.0.113.200", "198.51.100.7:80");
    assert_eq!(e.frontend_kind, Some(FrontendKind::LoadBalancerIp));
    assert_eq!(e.verdict, Verdict::Drop);
    assert!(
        e.reason.contains("loadBalancerSourceRanges"),
        "{}",
        e.reason
    );
    let e = run(&lb, &ctx, "203.0.113.5", "198.51.100.7:80");
    assert_eq!(e.verdict, Verdict::Dnat);
}

#[test]
fn interface_detectors_classify_by_the_route_back() {
    let ctx = ctx_of(DetectLocal::BridgeInterface("cbr0".into()));
    let p = plan(json!({}), TWO);
    let e = run(&p, &ctx, "198.18.1.3", "198.19.0.10:80");
    assert_eq!(e.origin.origin, Origin::Outside);
    assert!(
        e.origin.reason.contains("--from-kind"),
        "{}",
        e.origin.reason
    );
    let (to, port, protocol) = Packet::parse_destination("198.19.0.10:80").unwrap();
    let packet = Packet {
        from: "198.18.1.3".parse().unwrap(),
        to,
        port,
        protocol,
    };
    let given = SourceHints {
        assume: Some(Origin::LocalPod),
        interface: None,
    };
    let e = explain(&p, &ctx, &[], &packet, &given, ModeRules::default());
    assert!(!e.masquerade.unwrap().masquerade);
    // The route back to the source tells: through the pod bridge, or another interface.
    for (interface, origin) in [("cbr0", Origin::LocalPod), ("eth0", Origin::Outside)] {
        let routed = SourceHints {
            assume: None,
            interface: Some(interface.into()),
        };
        let e = explain(&p, &ctx, &[], &packet, &routed, ModeRules::default());
        assert_eq!(e.origin.origin, origin, "{}", e.origin.reason);
    }
    let prefix = classify(
        &ctx_of(DetectLocal::InterfaceNamePrefix("veth".into())),
        &[],
        packet.from,
        &SourceHints {
            assume: None,
            interface: Some("veth12ab".into()),
        },
    );
    assert_eq!(prefix.origin, Origin::LocalPod);
}

/// ipvs mode: an eTP Local frontend without a local endpoint falls back to the cluster's,
/// unmasqueraded, so an outside client's reply is lost (and explain says so); pods get the
/// same virtual server; without a detector the node's ClusterIP connections are masqueraded.
#[test]
fn ipvs_mode_fallback_loses_replies_and_masquerades_by_ipsets() {
    let ipvs_ctx = PlanContext {
        local_policy: crate::plan::LocalPolicy::FallBackToCluster,
        ..Default::default()
    };
    let mut state = ClusterState::new("node-a");
    state.apply_service(
        &serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": "s"},
            "spec": {"clusterIP": "198.19.0.10", "type": "NodePort", "externalTrafficPolicy": "Local",
                     "ports": [{"name": "p", "port": 80, "nodePort": 30080}]}}))
        .unwrap(),
    );
    state.apply_slice(
        &serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": "s-1",
            "labels": {"kubernetes.io/service-name": "s"}},
            "addressType": "IPv4", "ports": [{"name": "p", "port": 8080}],
            "endpoints": [{"addresses": ["198.18.2.2"], "nodeName": "node-b"}]}))
        .unwrap(),
    );
    let mut plan = FamilyPlan::default();
    plan.update(&state, IpFamily::V4, &BTreeSet::new(), true, ipvs_ctx);
    let ipvs = ModeRules {
        reject_unknown_cluster_ip_ports: true,
        ipvs: true,
        ..Default::default()
    };
    let ask = |ctx: &FamilyContext, from: &str, to: &str| {
        let (ip, port, protocol) = Packet::parse_destination(to).unwrap();
        let packet = Packet {
            from: from.parse().unwrap(),
            to: ip,
            port,
            protocol,
        };
        explain(
            &plan,
            ctx,
            &[NODE_IP.parse().unwrap()],
            &packet,
            &SourceHints::default(),
            ipvs,
        )
    };
    let ctx = cluster_cidr();
    let outside = ask(&ctx, "203.0.113.5", "192.0.2.10:30080");
    assert_eq!(outside.verdict, Verdict::Dnat);
    assert!(outside.reply_lost, "{outside:?}");
    assert_eq!(
        outside.masquerade.as_ref().map(|m| m.masquerade),
        Some(false)
    );
    let pod = ask(&ctx, "198.18.1.3", "192.0.2.10:30080");
    assert!(!pod.reply_lost, "a pod's reply comes back through the node");
    assert_eq!(pod.masquerade.as_ref().map(|m| m.masquerade), Some(false));
    // No detector: the node's own ClusterIP connection is masqueraded, a pod's is not.
    let none = ctx_of(DetectLocal::ClusterCidr(Vec::new()));
    let node = ask(&none, "198.19.0.10", "198.19.0.10:80");
    assert_eq!(node.masquerade.as_ref().map(|m| m.masquerade), Some(true));
    let pod = ask(&none, "198.18.1.3", "198.19.0.10:80");
    assert_eq!(pod.masquerade.as_ref().map(|m| m.masquerade), Some(false));
}

/// userspace mode: a listener per class of frontend relays to the plan's endpoints for that
/// class, seen from the node; no endpoint refuses; sources outside the ranges and SCTP are
/// not handled.
#[test]
fn userspace_mode_relays_refuses_or_leaves_alone() {
    let lb_plan = plan_with_status(
        json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
            "loadBalancerSourceRanges": ["203.0.113.0/25"]}),
        json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}),
        TWO,
    );

    // The ClusterIP: every endpoint, taken in turn, the endpoint sees the node.
    let e = run_userspace(&lb_plan, "198.18.1.3", "198.19.0.10:80");
    assert_eq!(e.verdict, Verdict::Relay, "{}", e.reason);
    assert_eq!(e.endpoints.len(), 2);
    assert_eq!(e.masquerade.as_ref().map(|m| m.masquerade), Some(true));
    // The NodePort, from a pod too: the listener of external frontends has the local
    // endpoint only (no short-circuit for pods, unlike the kernel modes).
    for from in ["198.18.1.3", "203.0.113.5"] {
        let e = run_userspace(&lb_plan, from, "192.0.2.10:30080");
        assert_eq!(e.verdict, Verdict::Relay, "{}", e.reason);
        let endpoints: Vec<&str> = e.endpoints.iter().map(|ep| ep.address.as_str()).collect();
        assert_eq!(endpoints, ["198.18.1.2:8080"], "{from}");
    }
    // The load-balancer IP from inside and outside the source ranges.
    let e = run_userspace(&lb_plan, "203.0.113.5", "198.51.100.1:80");
    assert_eq!(e.verdict, Verdict::Relay, "{}", e.reason);
    let e = run_userspace(&lb_plan, "203.0.113.200", "198.51.100.1:80");
    assert_eq!(e.verdict, Verdict::NotHandled);
    assert!(e.reason.contains("not redirected"), "{}", e.reason);

    // No local endpoint under externalTrafficPolicy: Local: the listener refuses.
    let remote_only = plan_with_lb_remote_only();
    let e = run_userspace(&remote_only, "203.0.113.5", "192.0.2.10:30080");
    assert_eq!(e.verdict, Verdict::Reject, "{}", e.reason);
    assert!(e.reason.contains("refuses"), "{}", e.reason);

    // SCTP is not relayed.
    let sctp = plan(
        json!({"ports": [{"name": "p", "port": 80, "protocol": "SCTP"}]}),
        TWO,
    );
    let e = run_userspace(&sctp, "198.18.1.3", "198.19.0.10:80/sctp");
    assert_eq!(e.verdict, Verdict::NotHandled);
    assert!(e.reason.contains("SCTP"), "{}", e.reason);
}

/// A NodePort Service under externalTrafficPolicy: Local whose endpoints are all remote.
fn plan_with_lb_remote_only() -> FamilyPlan {
    plan(
        json!({"type": "NodePort", "externalTrafficPolicy": "Local"}),
        &[("198.18.2.2", "node-b")],
    )
}
