//! The decision procedure of upstream-kube-proxy.md §9, one case per rule, and the invariant
//! that incremental plan updates equal a full rebuild.

use super::*;
use crate::state::ClusterState;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{json, Value};

const NODE: &str = "node-a";

fn service(name: &str, spec: Value) -> Service {
    let mut spec = spec;
    let obj = spec.as_object_mut().unwrap();
    obj.entry("clusterIP").or_insert(json!("198.19.0.10"));
    let external_type = matches!(
        obj.get("type").and_then(Value::as_str),
        Some("NodePort" | "LoadBalancer")
    );
    let ports = if external_type {
        json!([{"name": "p", "port": 80, "nodePort": 30080}])
    } else {
        json!([{"name": "p", "port": 80}])
    };
    obj.entry("ports").or_insert(ports);
    let status = obj.remove("status").unwrap_or(json!({}));
    serde_json::from_value(
        json!({"metadata": {"namespace": "ns", "name": name}, "spec": spec, "status": status}),
    )
    .unwrap()
}

/// Endpoints as (ip, node, conditions) with conditions "R" (ready) or "ST" (serving+terminating).
fn slice(svc: &str, eps: &[(&str, &str, &str)]) -> EndpointSlice {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|(ip, node, cond)| {
            json!({"addresses": [ip], "nodeName": node,
                   "conditions": {"ready": cond.contains('R'), "serving": cond.contains('R') || cond.contains('S'), "terminating": cond.contains('T')}})
        })
        .collect();
    serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": format!("{svc}-1"), "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4", "ports": [{"name": "p", "port": 8080}], "endpoints": endpoints}))
    .unwrap()
}

fn plan_of(svc: Service, eps: &[(&str, &str, &str)]) -> Arc<ServicePortPlan> {
    plan_in(svc, eps, PlanContext::default())
}

fn plan_in(svc: Service, eps: &[(&str, &str, &str)], ctx: PlanContext) -> Arc<ServicePortPlan> {
    let mut state = ClusterState::new(NODE);
    let name = svc.metadata.name.clone().unwrap();
    state.apply_service(&svc);
    state.apply_slice(&slice(&name, eps));
    let mut plan = FamilyPlan::default();
    let changes = state.take_changes();
    plan.update(&state, IpFamily::V4, &changes.services, false, ctx);
    assert_eq!(plan.services.len(), 1);
    plan.services.into_values().next().unwrap()
}

fn ips(list: &[Arc<Endpoint>]) -> Vec<String> {
    list.iter().map(|e| e.to_string()).collect()
}

use EndpointSet::{Cluster, Local};
use Target::{Drop, Endpoints, Reject};

#[test]
fn cluster_ip_with_endpoints_uses_cluster_set() {
    let p = plan_of(
        service("s", json!({})),
        &[("198.18.1.1", NODE, "R"), ("198.18.2.1", "node-b", "R")],
    );
    assert_eq!(p.internal, Endpoints(Cluster));
    assert_eq!(
        ips(p.endpoints_for(p.internal)),
        vec!["198.18.1.1:8080", "198.18.2.1:8080"]
    );
    assert_eq!(
        p.external, None,
        "a ClusterIP service without external IPs has no external traffic"
    );
}

#[test]
fn no_endpoints_rejects_everything() {
    let p = plan_of(service("s", json!({"type": "NodePort"})), &[]);
    assert_eq!(p.internal, Reject);
    let ext = p.external.clone().unwrap();
    assert_eq!((ext.from_outside, ext.from_pods_and_node), (Reject, Reject));
    assert!(!p.has_endpoints);
    let p = plan_of(
        service("s", json!({"type": "NodePort"})),
        &[("198.18.1.1", NODE, "")],
    );
    assert_eq!(
        p.internal, Reject,
        "unready, unserving endpoints do not count"
    );
}

#[test]
fn internal_local_drops_without_local_endpoints_but_rejects_without_any() {
    let itp = json!({"internalTrafficPolicy": "Local", "ports": [{"name": "p", "port": 80}]});
    let p = plan_of(service("s", itp.clone()), &[("198.18.2.1", "node-b", "R")]);
    assert_eq!(p.internal, Drop);
    assert!(p.internal_without_local_endpoints());
    let p = plan_of(
        service("s", itp.clone()),
        &[("198.18.1.1", NODE, "R"), ("198.18.2.1", "node-b", "R")],
    );
    assert_eq!(p.internal, Endpoints(Local));
    assert_eq!(ips(&p.local_endpoints), vec!["198.18.1.1:8080"]);
    let p = plan_of(service("s", itp), &[]);
    assert_eq!(p.internal, Reject);
}

#[test]
fn external_cluster_policy_uses_cluster_set_for_everyone() {
    let p = plan_of(
        service("s", json!({"type": "NodePort"})),
        &[("198.18.2.1", "node-b", "R")],
    );
    let ext = p.external.clone().unwrap();
    assert!(!ext.policy_local);
    assert_eq!(ext.from_outside, Endpoints(Cluster));
    assert_eq!(ext.from_pods_and_node, Endpoints(Cluster));
}

/// Upstream's ipvs mode: a Local policy without local endpoints falls back to the cluster's
/// (no DROP), and pods and the node share the outside clients' set (one virtual server).
#[test]
fn local_policies_fall_back_to_cluster_endpoints_in_ipvs_mode() {
    let ipvs = PlanContext {
        local_policy: crate::plan::LocalPolicy::FallBackToCluster,
        ..Default::default()
    };
    let etp = json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 30000,
                     "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}});
    let both = [("198.18.1.1", NODE, "R"), ("198.18.2.1", "node-b", "R")];
    let ext = plan_in(service("s", etp.clone()), &both, ipvs)
        .external
        .clone()
        .unwrap();
    assert_eq!(ext.from_outside, Endpoints(Local));
    assert_eq!(ext.from_pods_and_node, Endpoints(Local), "no short-circuit");
    let p = plan_in(
        service("s", etp.clone()),
        &[("198.18.2.1", "node-b", "R")],
        ipvs,
    );
    let ext = p.external.clone().unwrap();
    assert_eq!(
        ext.from_outside,
        Endpoints(Cluster),
        "falls back, not dropped"
    );
    assert_eq!(ext.from_pods_and_node, Endpoints(Cluster));
    assert!(ext.policy_local, "still not masqueraded");
    assert!(
        p.external_without_local_endpoints(),
        "the metric still counts it"
    );
    assert_eq!(
        plan_in(service("s", etp), &[], ipvs)
            .external
            .clone()
            .unwrap()
            .from_outside,
        Reject
    );
    // iTP Local on a ClusterIP-only Service: the cluster set is not computed, as upstream,
    // so without a local endpoint the virtual server has none: refused.
    let itp = json!({"internalTrafficPolicy": "Local"});
    let p = plan_in(
        service("s", itp.clone()),
        &[("198.18.2.1", "node-b", "R")],
        ipvs,
    );
    assert_eq!(p.internal, Reject);
    let p = plan_in(service("s", itp), &both, ipvs);
    assert_eq!(p.internal, Endpoints(Local));
}

#[test]
fn external_local_policy() {
    let etp = json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 30000,
                     "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}});
    // Local endpoint present: outside clients get it; pods and the node short-circuit.
    let p = plan_of(
        service("s", etp.clone()),
        &[("198.18.1.1", NODE, "R"), ("198.18.2.1", "node-b", "R")],
    );
    let ext = p.external.clone().unwrap();
    assert_eq!(ext.from_outside, Endpoints(Local));
    assert_eq!(ext.from_pods_and_node, Endpoints(Cluster));
    assert_eq!(
        p.internal,
        Endpoints(Cluster),
        "ClusterIP traffic still uses every endpoint"
    );
    // No local endpoint: outside clients are dropped, pods and node still reach the Service.
    let p = plan_of(service("s", etp.clone()), &[("198.18.2.1", "node-b", "R")]);
    let ext = p.external.clone().unwrap();
    assert_eq!(ext.from_outside, Drop);
    assert_eq!(ext.from_pods_and_node, Endpoints(Cluster));
    assert!(p.external_without_local_endpoints());
    // Nothing anywhere: reject.
    let p = plan_of(service("s", etp), &[]);
    assert_eq!(p.external.clone().unwrap().from_outside, Reject);
}

#[test]
fn terminating_endpoints_serve_as_fallback() {
    let p = plan_of(
        service("s", json!({})),
        &[("198.18.1.1", NODE, "ST"), ("198.18.2.1", "node-b", "T")],
    );
    assert_eq!(p.internal, Endpoints(Cluster));
    assert_eq!(ips(&p.cluster_endpoints), vec!["198.18.1.1:8080"]);
}

#[test]
fn external_ips_make_a_cluster_ip_service_external() {
    let p = plan_of(
        service(
            "s",
            json!({"externalIPs": ["198.51.100.7"], "ports": [{"name": "p", "port": 80}]}),
        ),
        &[("198.18.1.1", NODE, "R")],
    );
    assert!(p.external.is_some());
    assert_eq!(
        p.port.external_ips,
        vec!["198.51.100.7".parse::<std::net::IpAddr>().unwrap()]
    );
}

/// A sequence of partial updates must leave the same plan as one full rebuild.
#[test]
fn incremental_updates_equal_full_rebuild() {
    let mut state = ClusterState::new(NODE);
    let mut incremental = FamilyPlan::default();
    type Step = Box<dyn Fn(&mut ClusterState)>;
    let steps: Vec<Step> = vec![
        Box::new(|s| {
            s.apply_service(&service("a", json!({"clusterIP": "198.19.0.1"})));
        }),
        Box::new(|s| {
            s.apply_slice(&slice("a", &[("198.18.1.1", NODE, "R")]));
        }),
        Box::new(|s| {
            s.apply_service(&service("b", json!({"clusterIP": "198.19.0.2", "type": "NodePort", "externalTrafficPolicy": "Local"})));
        }),
        Box::new(|s| {
            s.apply_slice(&slice("b", &[("198.18.2.1", "node-b", "R")]));
        }),
        Box::new(|s| {
            s.apply_slice(&slice(
                "a",
                &[("198.18.1.1", NODE, "ST"), ("198.18.1.2", NODE, "R")],
            ));
        }),
        Box::new(|s| {
            s.delete_service(&NamespacedName::new("ns", "a"));
        }),
        Box::new(|s| {
            s.apply_service(&service(
                "a",
                json!({"clusterIP": "198.19.0.3", "internalTrafficPolicy": "Local"}),
            ));
        }),
        Box::new(|s| {
            s.apply_slice(&slice("b", &[]));
        }),
    ];
    for (i, step) in steps.iter().enumerate() {
        step(&mut state);
        let changes = state.take_changes();
        let changed = incremental.update(
            &state,
            IpFamily::V4,
            &changes.services,
            false,
            PlanContext::default(),
        );
        assert!(!changed.is_empty(), "step {i} changed something");
        let mut full = FamilyPlan::default();
        full.update(
            &state,
            IpFamily::V4,
            &Default::default(),
            true,
            PlanContext::default(),
        );
        assert_eq!(incremental, full, "after step {i}");
    }
}

#[test]
fn update_reports_exactly_the_changed_ports() {
    let mut state = ClusterState::new(NODE);
    state.apply_service(&service("a", json!({"clusterIP": "198.19.0.1"})));
    state.apply_service(&service("b", json!({"clusterIP": "198.19.0.2"})));
    let mut plan = FamilyPlan::default();
    let changes = state.take_changes();
    assert_eq!(
        plan.update(
            &state,
            IpFamily::V4,
            &changes.services,
            false,
            PlanContext::default()
        )
        .len(),
        2
    );
    state.apply_slice(&slice("b", &[("198.18.1.1", NODE, "R")]));
    let changes = state.take_changes();
    let changed = plan.update(
        &state,
        IpFamily::V4,
        &changes.services,
        false,
        PlanContext::default(),
    );
    let names: Vec<String> = changed.iter().map(|n| n.to_string()).collect();
    assert_eq!(names, vec!["ns/b:p"]);
    // Nothing in the IPv6 family.
    let mut v6 = FamilyPlan::default();
    assert!(v6
        .update(
            &state,
            IpFamily::V6,
            &Default::default(),
            true,
            PlanContext::default()
        )
        .is_empty());
}

/// A contested external IP goes to the smallest service port name, whatever the order of
/// the changes: a series of partial updates ends where one full update does, and the port
/// that loses or wins a frontend is reported as changed even when its own Service did not.
#[test]
fn contested_frontends_have_one_owner_whatever_the_history() {
    let mut state = ClusterState::new(NODE);
    let mut plan = FamilyPlan::default();
    let update = |state: &mut ClusterState, plan: &mut FamilyPlan| {
        let changes = state.take_changes();
        let changed = plan.update(
            state,
            IpFamily::V4,
            &changes.services,
            false,
            PlanContext::default(),
        );
        let mut full = FamilyPlan::default();
        full.update(
            state,
            IpFamily::V4,
            &BTreeSet::new(),
            true,
            PlanContext::default(),
        );
        assert_eq!(
            plan.services, full.services,
            "partial updates equal a full one"
        );
        changed
            .into_iter()
            .map(|n| n.service.name.to_string())
            .collect::<Vec<_>>()
    };
    let x = Frontend::Address("198.51.100.40".parse().unwrap(), crate::Protocol::Tcp, 80);
    let refused = |plan: &FamilyPlan, svc: &str| -> Vec<String> {
        plan.services
            .iter()
            .find(|(n, _)| &*n.service.name == svc)
            .map(|(_, p)| {
                p.refused
                    .iter()
                    .map(|r| format!("{} {}", r.frontend, r.owner))
                    .collect()
            })
            .unwrap_or_default()
    };

    state.apply_service(&service(
        "b",
        json!({"clusterIP": "198.19.0.41", "externalIPs": ["198.51.100.40"]}),
    ));
    assert_eq!(update(&mut state, &mut plan), ["b"]);
    assert!(refused(&plan, "b").is_empty());

    // a (smaller) arrives later with the same external IP: it takes it, and b changes.
    state.apply_service(&service(
        "a",
        json!({"clusterIP": "198.19.0.40", "externalIPs": ["198.51.100.40"]}),
    ));
    assert_eq!(update(&mut state, &mut plan), ["a", "b"]);
    assert!(refused(&plan, "a").is_empty());
    assert_eq!(refused(&plan, "b"), [format!("{x} ns/a:p")]);
    assert!(!plan
        .services
        .values()
        .find(|p| &*p.port.name.service.name == "b")
        .unwrap()
        .serves(&x));

    // c (larger) too: only c changes.
    state.apply_service(&service(
        "c",
        json!({"clusterIP": "198.19.0.42", "externalIPs": ["198.51.100.40"]}),
    ));
    assert_eq!(update(&mut state, &mut plan), ["c"]);
    assert_eq!(refused(&plan, "c"), [format!("{x} ns/a:p")]);

    // a goes away: b owns it again, c still refused (now by b).
    state.delete_service(&NamespacedName::new("ns", "a"));
    assert_eq!(update(&mut state, &mut plan), ["a", "b", "c"]);
    assert!(refused(&plan, "b").is_empty());
    assert_eq!(refused(&plan, "c"), [format!("{x} ns/b:p")]);
}
