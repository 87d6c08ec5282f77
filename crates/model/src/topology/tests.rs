//! Every selection rule of upstream-kube-proxy.md §2.3, one row each.

use std::net::IpAddr;
use std::num::NonZeroU16;
use std::sync::Arc;

use super::*;
use crate::names::{IpFamily, NamespacedName, Protocol, ServicePortName};

/// Compact endpoint spec: "ip" then flags: R ready, S serving, T terminating, L local;
/// `z=a|b` zone hints, `n=x|y` node hints. Without R/S/T flags an endpoint is ready+serving.
fn ep(spec: &str) -> Arc<Endpoint> {
    let mut parts = spec.split_whitespace();
    let ip: IpAddr = parts.next().unwrap().parse().unwrap();
    let mut e = Endpoint {
        ip,
        port: 80,
        ready: true,
        serving: true,
        terminating: false,
        is_local: false,
        node_name: None,
        hints: None,
    };
    for part in parts {
        if let Some(z) = part.strip_prefix("z=") {
            let mut hints = e.hints.as_deref().cloned().unwrap_or_default();
            hints.zones = z.split('|').map(Arc::from).collect();
            e.hints = Some(Arc::new(hints));
        } else if let Some(n) = part.strip_prefix("n=") {
            let mut hints = e.hints.as_deref().cloned().unwrap_or_default();
            hints.nodes = n.split('|').map(Arc::from).collect();
            e.hints = Some(Arc::new(hints));
        } else {
            // Conditions given explicitly: start from all-false.
            e.ready = part.contains('R');
            e.serving = part.contains('S');
            e.terminating = part.contains('T');
            e.is_local = part.contains('L');
        }
    }
    Arc::new(e)
}

fn local(spec: &str) -> Arc<Endpoint> {
    let mut e = (*ep(spec)).clone();
    e.is_local = true;
    Arc::new(e)
}

#[derive(Clone, Copy)]
enum Svc {
    /// Plain ClusterIP service.
    Cluster,
    /// iTP Local, no external access.
    InternalLocal,
    /// eTP Local with a NodePort.
    ExternalLocal,
    /// Both policies Local with a NodePort.
    BothLocal,
    /// eTP Local on a Service without any external frontend (has no effect).
    ExternalLocalNoFrontend,
}

fn port(kind: Svc) -> ServicePort {
    let mut p = ServicePort {
        name: ServicePortName {
            service: NamespacedName::new("ns", "svc"),
            port: "p".into(),
            protocol: Protocol::Tcp,
        },
        family: IpFamily::V4,
        cluster_ip: "198.19.0.1".parse().unwrap(),
        port: 80,
        protocol: Protocol::Tcp,
        node_port: None,
        external_ips: vec![],
        load_balancer_vips: vec![],
        load_balancer_source_ranges: vec![],
        session_affinity_timeout: None,
        external_policy_local: false,
        internal_policy_local: false,
        health_check_node_port: None,
    };
    match kind {
        Svc::Cluster => {}
        Svc::InternalLocal => p.internal_policy_local = true,
        Svc::ExternalLocal => {
            p.external_policy_local = true;
            p.node_port = NonZeroU16::new(30080);
        }
        Svc::BothLocal => {
            p.external_policy_local = true;
            p.internal_policy_local = true;
            p.node_port = NonZeroU16::new(30080);
        }
        Svc::ExternalLocalNoFrontend => p.external_policy_local = true,
    }
    p
}

struct Case {
    name: &'static str,
    svc: Svc,
    zone: Option<&'static str>,
    gates: SelectionGates,
    endpoints: Vec<Arc<Endpoint>>,
    cluster: Option<&'static [&'static str]>,
    local: Option<&'static [&'static str]>,
    reachable: &'static [&'static str],
    has_any: bool,
}

fn ips(list: &[Arc<Endpoint>]) -> Vec<String> {
    list.iter().map(|e| e.ip.to_string()).collect()
}

#[track_caller]
fn check(case: Case) {
    let got = categorize_endpoints(
        &case.endpoints,
        &port(case.svc),
        NodeTopology {
            node_name: "node-a",
            zone: case.zone,
        },
        case.gates,
    );
    let want = |l: Option<&[&str]>| {
        l.unwrap_or(&[])
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ips(&got.cluster),
        want(case.cluster),
        "{}: cluster endpoints",
        case.name
    );
    assert_eq!(
        ips(&got.local),
        want(case.local),
        "{}: local endpoints",
        case.name
    );
    assert_eq!(
        ips(&got.all_reachable),
        want(Some(case.reachable)),
        "{}: all reachable",
        case.name
    );
    assert_eq!(got.has_any, case.has_any, "{}: has any", case.name);
}

const ON: SelectionGates = SelectionGates {
    prefer_same_traffic_distribution: true,
};
const OFF: SelectionGates = SelectionGates {
    prefer_same_traffic_distribution: false,
};

#[test]
fn zone_hints_filter_cluster_endpoints() {
    check(Case {
        name: "hints for my zone",
        svc: Svc::Cluster,
        zone: Some("zone-a"),
        gates: ON,
        endpoints: vec![
            ep("10.1.2.3 z=zone-a"),
            ep("10.1.2.4 z=zone-b"),
            ep("10.1.2.5 z=zone-c"),
            ep("10.1.2.6 z=zone-a"),
        ],
        cluster: Some(&["10.1.2.3", "10.1.2.6"]),
        local: None,
        reachable: &["10.1.2.3", "10.1.2.6"],
        has_any: true,
    });
}

#[test]
fn hints_ignored_without_zone_label() {
    check(Case {
        name: "node has no zone label",
        svc: Svc::Cluster,
        zone: None,
        gates: ON,
        endpoints: vec![ep("10.1.2.3 z=zone-a"), ep("10.1.2.4 z=zone-b")],
        cluster: Some(&["10.1.2.3", "10.1.2.4"]),
        local: None,
        reachable: &["10.1.2.3", "10.1.2.4"],
        has_any: true,
    });
}

#[test]
fn hints_ignored_when_none_for_my_zone() {
    check(Case {
        name: "no endpoint hinted for my zone",
        svc: Svc::Cluster,
        zone: Some("zone-x"),
        gates: ON,
        endpoints: vec![ep("10.1.2.3 z=zone-a"), ep("10.1.2.4 z=zone-b")],
        cluster: Some(&["10.1.2.3", "10.1.2.4"]),
        local: None,
        reachable: &["10.1.2.3", "10.1.2.4"],
        has_any: true,
    });
}

#[test]
fn hints_ignored_when_one_ready_endpoint_lacks_them() {
    check(Case {
        name: "missing hints on one ready endpoint",
        svc: Svc::Cluster,
        zone: Some("zone-a"),
        gates: ON,
        endpoints: vec![
            ep("10.1.2.3 z=zone-a"),
            ep("10.1.2.4"),
            ep("10.1.2.5 z=zone-a"),
        ],
        cluster: Some(&["10.1.2.3", "10.1.2.4", "10.1.2.5"]),
        local: None,
        reachable: &["10.1.2.3", "10.1.2.4", "10.1.2.5"],
        has_any: true,
    });
}

#[test]
fn unready_endpoints_do_not_count_for_hints() {
    check(Case {
        name: "an unready endpoint without hints does not disable them",
        svc: Svc::Cluster,
        zone: Some("zone-a"),
        gates: ON,
        endpoints: vec![
            ep("10.1.2.3 z=zone-a"),
            ep("10.1.2.4 S"),
            ep("10.1.2.5 z=zone-b"),
        ],
        cluster: Some(&["10.1.2.3"]),
        local: None,
        reachable: &["10.1.2.3"],
        has_any: true,
    });
}

#[test]
fn multi_zone_hints() {
    check(Case {
        name: "an endpoint hinted for several zones",
        svc: Svc::Cluster,
        zone: Some("zone-b"),
        gates: ON,
        endpoints: vec![ep("10.1.2.3 z=zone-a|zone-b"), ep("10.1.2.4 z=zone-c")],
        cluster: Some(&["10.1.2.3"]),
        local: None,
        reachable: &["10.1.2.3"],
        has_any: true,
    });
}

#[test]
fn node_hints_with_gate() {
    let endpoints = vec![
        ep("10.1.2.3 z=zone-a n=node-a"),
        ep("10.1.2.4 z=zone-a n=node-b"),
        ep("10.1.2.5 z=zone-b n=node-c"),
    ];
    check(Case {
        name: "PreferSameNode with the gate on",
        svc: Svc::Cluster,
        zone: Some("zone-a"),
        gates: ON,
        endpoints: endpoints.clone(),
        cluster: Some(&["10.1.2.3"]),
        local: None,
        reachable: &["10.1.2.3"],
        has_any: true,
    });
    check(Case {
        name: "node hints ignored with the gate off: zone hints apply",
        svc: Svc::Cluster,
        zone: Some("zone-a"),
        gates: OFF,
        endpoints,
        cluster: Some(&["10.1.2.3", "10.1.2.4"]),
        local: None,
        reachable: &["10.1.2.3", "10.1.2.4"],
        has_any: true,
    });
}

#[test]
fn node_hints_not_for_me_fall_back_to_zone() {
    check(Case {
        name: "node hints exist but none for this node",
        svc: Svc::Cluster,
        zone: Some("zone-a"),
        gates: ON,
        endpoints: vec![
            ep("10.1.2.4 z=zone-a n=node-b"),
            ep("10.1.2.5 z=zone-b n=node-c"),
        ],
        cluster: Some(&["10.1.2.4"]),
        local: None,
        reachable: &["10.1.2.4"],
        has_any: true,
    });
}

#[test]
fn terminating_fallback_for_cluster_traffic() {
    check(Case {
        name: "no ready endpoints: serving-terminating ones, ignoring topology",
        svc: Svc::Cluster,
        zone: Some("zone-a"),
        gates: ON,
        endpoints: vec![
            ep("10.0.0.1 ST z=zone-b"),
            ep("10.0.0.2 T"),
            ep("10.0.0.3 S"),
            ep("10.0.0.4 ST"),
        ],
        cluster: Some(&["10.0.0.1", "10.0.0.4"]),
        local: None,
        reachable: &["10.0.0.1", "10.0.0.4"],
        has_any: true,
    });
    check(Case {
        name: "ready endpoints exist: terminating ones are not used",
        svc: Svc::Cluster,
        zone: None,
        gates: ON,
        endpoints: vec![ep("10.0.0.1 ST"), ep("10.0.0.2 RS")],
        cluster: Some(&["10.0.0.2"]),
        local: None,
        reachable: &["10.0.0.2"],
        has_any: true,
    });
}

#[test]
fn nothing_usable() {
    check(Case {
        name: "only not-ready, not-serving endpoints",
        svc: Svc::Cluster,
        zone: None,
        gates: ON,
        endpoints: vec![ep("10.0.0.1 T"), ep("10.0.0.2 -")],
        cluster: None,
        local: None,
        reachable: &[],
        has_any: false,
    });
    check(Case {
        name: "no endpoints at all",
        svc: Svc::Cluster,
        zone: None,
        gates: ON,
        endpoints: vec![],
        cluster: None,
        local: None,
        reachable: &[],
        has_any: false,
    });
}

#[test]
fn internal_local_uses_only_local_endpoints() {
    check(Case {
        name: "iTP Local with local endpoints; topology ignored for local lists",
        svc: Svc::InternalLocal,
        zone: Some("zone-a"),
        gates: ON,
        endpoints: vec![
            local("10.0.0.0 RSL z=zone-b"),
            local("10.0.0.1 RSL z=zone-a"),
            ep("10.0.0.2 z=zone-a"),
        ],
        cluster: None,
        local: Some(&["10.0.0.0", "10.0.0.1"]),
        reachable: &["10.0.0.0", "10.0.0.1"],
        has_any: true,
    });
    check(Case {
        name: "iTP Local without local endpoints, but some elsewhere",
        svc: Svc::InternalLocal,
        zone: None,
        gates: ON,
        endpoints: vec![ep("10.0.0.2"), ep("10.0.0.3")],
        cluster: None,
        local: None,
        reachable: &[],
        has_any: true,
    });
    check(Case {
        name: "iTP Local without any endpoints",
        svc: Svc::InternalLocal,
        zone: None,
        gates: ON,
        endpoints: vec![],
        cluster: None,
        local: None,
        reachable: &[],
        has_any: false,
    });
}

#[test]
fn local_terminating_fallback() {
    check(Case {
        name: "iTP Local: only local serving-terminating endpoints",
        svc: Svc::InternalLocal,
        zone: None,
        gates: ON,
        endpoints: vec![
            local("10.0.0.0 STL"),
            local("10.0.0.1 TL"),
            ep("10.0.0.2 ST"),
        ],
        cluster: None,
        local: Some(&["10.0.0.0"]),
        reachable: &["10.0.0.0"],
        has_any: true,
    });
    check(Case {
        name: "iTP Local: a local ready endpoint beats local terminating ones",
        svc: Svc::InternalLocal,
        zone: None,
        gates: ON,
        endpoints: vec![local("10.0.0.0 STL"), local("10.0.0.1 RSL")],
        cluster: None,
        local: Some(&["10.0.0.1"]),
        reachable: &["10.0.0.1"],
        has_any: true,
    });
    check(Case {
        name: "iTP Local: remote ready endpoints do not stop the local terminating fallback",
        svc: Svc::InternalLocal,
        zone: None,
        gates: ON,
        endpoints: vec![local("10.0.0.0 STL"), ep("10.0.0.2 RS")],
        cluster: None,
        local: Some(&["10.0.0.0"]),
        reachable: &["10.0.0.0"],
        has_any: true,
    });
    check(Case {
        name: "iTP Local: local endpoints terminating and not serving are unusable",
        svc: Svc::InternalLocal,
        zone: None,
        gates: ON,
        endpoints: vec![local("10.0.0.0 TL"), ep("10.0.0.2 T")],
        cluster: None,
        local: None,
        reachable: &[],
        has_any: false,
    });
}

#[test]
fn external_local_needs_both_lists() {
    check(Case {
        name: "eTP Local: cluster list (topology-filtered) and local list (not filtered)",
        svc: Svc::ExternalLocal,
        zone: Some("zone-a"),
        gates: ON,
        endpoints: vec![
            local("10.1.2.3 RSL z=zone-a"),
            local("10.1.2.4 RSL z=zone-b"),
            ep("10.1.2.5 z=zone-c"),
            ep("10.1.2.6 z=zone-a"),
        ],
        cluster: Some(&["10.1.2.3", "10.1.2.6"]),
        local: Some(&["10.1.2.3", "10.1.2.4"]),
        reachable: &["10.1.2.3", "10.1.2.4", "10.1.2.6"],
        has_any: true,
    });
    check(Case {
        name: "eTP Local without local endpoints",
        svc: Svc::ExternalLocal,
        zone: None,
        gates: ON,
        endpoints: vec![ep("10.0.0.2"), ep("10.0.0.3")],
        cluster: Some(&["10.0.0.2", "10.0.0.3"]),
        local: None,
        reachable: &["10.0.0.2", "10.0.0.3"],
        has_any: true,
    });
    check(Case {
        name: "eTP Local: remote ready, local only serving-terminating",
        svc: Svc::ExternalLocal,
        zone: None,
        gates: ON,
        endpoints: vec![local("10.0.0.1 STL"), ep("10.0.0.2 RS")],
        cluster: Some(&["10.0.0.2"]),
        local: Some(&["10.0.0.1"]),
        reachable: &["10.0.0.1", "10.0.0.2"],
        has_any: true,
    });
}

#[test]
fn both_policies_local() {
    check(Case {
        name: "iTP and eTP Local with a NodePort: cluster list still needed for short-circuits",
        svc: Svc::BothLocal,
        zone: None,
        gates: ON,
        endpoints: vec![local("10.0.0.0 RSL"), ep("10.0.0.1")],
        cluster: Some(&["10.0.0.0", "10.0.0.1"]),
        local: Some(&["10.0.0.0"]),
        reachable: &["10.0.0.0", "10.0.0.1"],
        has_any: true,
    });
}

#[test]
fn external_local_without_external_frontend_is_cluster() {
    check(Case {
        name: "eTP Local on a port with no external frontend behaves as Cluster",
        svc: Svc::ExternalLocalNoFrontend,
        zone: None,
        gates: ON,
        endpoints: vec![local("10.0.0.0 RSL"), ep("10.0.0.1")],
        cluster: Some(&["10.0.0.0", "10.0.0.1"]),
        local: None,
        reachable: &["10.0.0.0", "10.0.0.1"],
        has_any: true,
    });
}
