//! Transactions the proxier writes, checked as text with a recording runner. (Whether the
//! kernel accepts them and what packets do is proven in the binary's network-namespace tests.)

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube_proxy_config::DetectLocal;
use kube_proxy_model::dataplane::{Dataplane, NodeView, SyncInput};

use kube_proxy_model::{ClusterState, FamilyPlan, IpFamily, PlanContext, ServicePortName};
use serde_json::{json, Value};

use crate::{Kernel, KernelTable, NftConfig, NftProxier, RecordingRunner};

pub const NODE: &str = "node-a";

pub fn service(name: &str, spec: Value) -> Service {
    let mut spec = spec;
    let obj = spec.as_object_mut().unwrap();
    let status = obj.remove("status").unwrap_or(json!({}));
    obj.entry("ports")
        .or_insert(json!([{"name": "p", "port": 80}]));
    serde_json::from_value(
        json!({"metadata": {"namespace": "ns", "name": name}, "spec": spec, "status": status}),
    )
    .unwrap()
}

/// Endpoints as (ip, node).
pub fn slice(svc: &str, eps: &[(&str, &str)]) -> EndpointSlice {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|(ip, node)| json!({"addresses": [ip], "nodeName": node}))
        .collect();
    serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": format!("{svc}-1"), "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4", "ports": [{"name": "p", "port": 8080}], "endpoints": endpoints}))
    .unwrap()
}

pub struct Harness {
    pub state: ClusterState,
    pub plan: FamilyPlan,
    pub proxier: NftProxier<RecordingRunner>,
    pub now: Arc<Mutex<Instant>>,
    pub node: NodeView,
    pub service_cidrs: Vec<ipnet::IpNet>,
}

impl Harness {
    pub fn new(config: NftConfig) -> Harness {
        let now = Arc::new(Mutex::new(Instant::now()));
        let clock_now = now.clone();
        Harness {
            state: ClusterState::new(NODE),
            plan: FamilyPlan::default(),
            proxier: NftProxier::new(
                config,
                RecordingRunner::default(),
                Box::new(move || *clock_now.lock().unwrap()),
            ),
            now,
            node: NodeView {
                node_ips: vec!["192.0.2.10".parse().unwrap()],
                ..Default::default()
            },
            service_cidrs: Vec::new(),
        }
    }

    /// Plans what changed and syncs; returns the transaction text ("" when nothing was sent).
    pub fn sync(&mut self, full: bool) -> String {
        let changes = self.state.take_changes();
        let changed: BTreeSet<ServicePortName> = self.plan.update(
            &self.state,
            IpFamily::V4,
            &changes.services,
            changes.full,
            PlanContext::default(),
        );
        let before = self.proxier.runner().scripts.len();
        let input = SyncInput {
            family: IpFamily::V4,
            plan: &self.plan,
            changed: &changed,
            full,
            node: &self.node,
            service_cidrs: &self.service_cidrs,
        };
        self.proxier.sync(input).unwrap();
        let scripts = &self.proxier.runner().scripts;
        // KP_DUMP_DIR=<dir>: keep every transaction, to feed them to a real nft by hand.
        if let (Ok(dir), Some(last), true) = (
            std::env::var("KP_DUMP_DIR"),
            scripts.last(),
            scripts.len() > before,
        ) {
            let n = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
            std::fs::write(
                format!(
                    "{dir}/{:03}-{}.nft",
                    n,
                    std::thread::current()
                        .name()
                        .unwrap_or("t")
                        .replace("::", "_")
                ),
                last,
            )
            .unwrap();
        }
        if scripts.len() > before {
            scripts.last().unwrap().clone()
        } else {
            String::new()
        }
    }

    pub fn advance(&self, by: Duration) {
        *self.now.lock().unwrap() += by;
    }
}

fn config() -> NftConfig {
    NftConfig {
        detect_local: DetectLocal::ClusterCidr(vec!["198.18.0.0/16".parse().unwrap()]),
        ..Default::default()
    }
}

#[test]
fn first_sync_rebuilds_the_table_and_uses_data_elements() {
    let mut h = Harness::new(config());
    h.state.apply_service(&service("web", json!({"clusterIP": "198.19.0.10", "type": "NodePort", "ports": [{"name": "p", "port": 80, "nodePort": 30080}]})));
    h.state.apply_slice(&slice(
        "web",
        &[("198.18.1.5", NODE), ("198.18.2.7", "node-b")],
    ));
    let tx = h.sync(true);
    assert!(
        tx.starts_with("add table ip kube-proxy\ndelete table ip kube-proxy\n"),
        "{tx}"
    );
    for expected in [
        "add element ip kube-proxy cluster-ips { 198.19.0.10 }",
        "add element ip kube-proxy dnat-2 { 198.19.0.10 . tcp . 80 }",
        "add element ip kube-proxy backends-0 { 198.19.0.10 . tcp . 80 : 198.18.1.5 . 8080 }",
        "add element ip kube-proxy backends-1 { 198.19.0.10 . tcp . 80 : 198.18.2.7 . 8080 }",
        "add element ip kube-proxy nodeport-dnat-2 { tcp . 30080 }",
        "add element ip kube-proxy nodeport-backends-1 { tcp . 30080 : 198.18.2.7 . 8080 }",
        "add element ip kube-proxy nodeport-masquerade { tcp . 30080 }",
        "add element ip kube-proxy hairpin-connections { 198.18.1.5 . 198.18.1.5 . tcp . 8080 }",
        "add element ip kube-proxy nodeport-ips { 192.0.2.10 }",
        "add rule ip kube-proxy services ip daddr @cluster-ips ip saddr != { 198.18.0.0/16 } meta mark set meta mark or 0x004000",
        "add rule ip kube-proxy dnat-dispatch ip daddr . meta l4proto . th dport @dnat-2 numgen random mod 2 vmap { 0 : goto slot-0, 1 : goto slot-1 }",
        "add rule ip kube-proxy slot-1 dnat ip addr . port to ip daddr . meta l4proto . th dport map @backends-1",
        "add rule ip kube-proxy nodeport-slot-0 dnat ip addr . port to meta l4proto . th dport map @nodeport-backends-0",
    ] {
        assert!(tx.contains(expected), "missing {expected:?} in\n{tx}");
    }
    assert!(
        !tx.lines()
            .any(|l| l.starts_with("add element") && l.contains("goto")),
        "a plain service needs no verdict elements:\n{tx}"
    );
}

#[test]
fn endpoint_change_is_a_small_element_diff() {
    let mut h = Harness::new(config());
    h.state
        .apply_service(&service("web", json!({"clusterIP": "198.19.0.10"})));
    h.state.apply_slice(&slice(
        "web",
        &[("198.18.1.5", "node-b"), ("198.18.2.7", "node-b")],
    ));
    h.sync(true);
    h.state.apply_slice(&slice(
        "web",
        &[
            ("198.18.1.5", "node-b"),
            ("198.18.2.7", "node-b"),
            ("198.18.3.9", "node-c"),
        ],
    ));
    let tx = h.sync(false);
    let expected = [
        "add set ip kube-proxy dnat-3 { type ipv4_addr . inet_proto . inet_service; comment \"frontends DNATed to this many endpoints\"; }",
        "add map ip kube-proxy backends-2 { type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; comment \"endpoint slot of each frontend\"; }",
        "add chain ip kube-proxy slot-2",
        "add rule ip kube-proxy slot-2 dnat ip addr . port to ip daddr . meta l4proto . th dport map @backends-2",
        "flush chain ip kube-proxy dnat-dispatch",
        "add rule ip kube-proxy dnat-dispatch ip daddr . meta l4proto . th dport @dnat-2 numgen random mod 2 vmap { 0 : goto slot-0, 1 : goto slot-1 }",
        "add rule ip kube-proxy dnat-dispatch ip daddr . meta l4proto . th dport @dnat-3 numgen random mod 3 vmap { 0 : goto slot-0, 1 : goto slot-1, 2 : goto slot-2 }",
        "delete element ip kube-proxy dnat-2 { 198.19.0.10 . tcp . 80 }",
        "add element ip kube-proxy dnat-3 { 198.19.0.10 . tcp . 80 }",
        "add element ip kube-proxy backends-2 { 198.19.0.10 . tcp . 80 : 198.18.3.9 . 8080 }",
        "",
    ];
    assert_eq!(tx, expected.join("\n"));
    // Removing it again reuses the existing dnat-2 set and slots: elements only.
    h.state.apply_slice(&slice(
        "web",
        &[("198.18.1.5", "node-b"), ("198.18.2.7", "node-b")],
    ));
    let tx = h.sync(false);
    let expected = [
        "delete element ip kube-proxy dnat-3 { 198.19.0.10 . tcp . 80 }",
        "delete element ip kube-proxy backends-2 { 198.19.0.10 . tcp . 80 }",
        "add element ip kube-proxy dnat-2 { 198.19.0.10 . tcp . 80 }",
        "",
    ];
    assert_eq!(tx, expected.join("\n"));
    assert_eq!(h.sync(false), "", "no change, no transaction");
}

#[test]
fn no_endpoints_and_policies_use_verdict_sets() {
    let mut h = Harness::new(config());
    h.state
        .apply_service(&service("empty", json!({"clusterIP": "198.19.0.20"})));
    h.state.apply_service(&service(
        "itp",
        json!({"clusterIP": "198.19.0.21", "internalTrafficPolicy": "Local"}),
    ));
    h.state
        .apply_slice(&slice("itp", &[("198.18.2.1", "node-b")]));
    let tx = h.sync(true);
    assert!(
        tx.contains("add element ip kube-proxy no-endpoint-reject { 198.19.0.20 . tcp . 80 }"),
        "{tx}"
    );
    assert!(
        tx.contains("add element ip kube-proxy no-endpoint-drop { 198.19.0.21 . tcp . 80 }"),
        "{tx}"
    );
}

#[test]
fn external_local_and_affinity_use_upstream_chains() {
    let mut h = Harness::new(config());
    h.state.apply_service(&service("lb", json!({
        "clusterIP": "198.19.0.30", "type": "LoadBalancer", "externalTrafficPolicy": "Local", "sessionAffinity": "ClientIP",
        "loadBalancerSourceRanges": ["203.0.113.0/24"],
        "ports": [{"name": "p", "port": 80, "nodePort": 30090}],
        "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.30"}]}}})));
    h.state.apply_slice(&slice(
        "lb",
        &[("198.18.1.5", NODE), ("198.18.2.7", "node-b")],
    ));
    let tx = h.sync(true);
    let name = ServicePortName {
        service: kube_proxy_model::NamespacedName::new("ns", "lb"),
        port: "p".into(),
        protocol: kube_proxy_model::Protocol::Tcp,
    };
    let service_chain = crate::elements::quote(&crate::names::service_chain(&name));
    let external_chain = crate::elements::quote(&crate::names::external_chain(&name));
    let local_chain = crate::elements::quote(&crate::names::local_chain(&name));
    for expected in [
        format!("add element ip kube-proxy service-ips {{ 198.19.0.30 . tcp . 80 : goto {service_chain}, 198.51.100.30 . tcp . 80 : goto {external_chain} }}"),
        format!("add element ip kube-proxy service-nodeports {{ tcp . 30090 : goto {external_chain} }}"),
        format!("add rule ip kube-proxy {external_chain} ip saddr {{ 198.18.0.0/16 }} goto {service_chain} comment \"short-circuit pod traffic\""),
        format!("add rule ip kube-proxy {external_chain} goto {local_chain}"),
        "timeout 10800s".to_string(),
        "add element ip kube-proxy firewall-allow { 198.51.100.30 . tcp . 80 . 203.0.113.0/24 }".to_string(),
    ] {
        assert!(tx.contains(&expected), "missing {expected:?} in\n{tx}");
    }
    // The local endpoint goes away: the local chain is flushed now and deleted a second later.
    h.state
        .apply_slice(&slice("lb", &[("198.18.2.7", "node-b")]));
    let tx = h.sync(false);
    assert!(
        tx.contains(&format!("flush chain ip kube-proxy {local_chain}")),
        "{tx}"
    );
    assert!(
        tx.contains("add element ip kube-proxy no-endpoint-drop { 198.51.100.30 . tcp . 80 }"),
        "{tx}"
    );
    assert!(!tx.contains("delete chain"), "{tx}");
    h.advance(Duration::from_secs(2));
    h.state
        .apply_service(&service("other", json!({"clusterIP": "198.19.0.31"})));
    let tx = h.sync(false);
    assert!(
        tx.contains(&format!("delete chain ip kube-proxy {local_chain}")),
        "{tx}"
    );
}

/// Service `name` with external IP 198.51.100.40 (port 80) and one remote endpoint.
fn with_external_ip(h: &mut Harness, name: &str, cluster_ip: &str, endpoint: &str) {
    h.state.apply_service(&service(
        name,
        json!({"clusterIP": cluster_ip, "externalIPs": ["198.51.100.40"]}),
    ));
    h.state.apply_slice(&slice(name, &[(endpoint, "node-b")]));
}

#[test]
fn conflicting_frontends_do_not_break_the_transaction() {
    let mut h = Harness::new(config());
    with_external_ip(&mut h, "a", "198.19.0.40", "198.18.1.1");
    with_external_ip(&mut h, "b", "198.19.0.41", "198.18.1.2");
    let tx = h.sync(true);
    assert_eq!(tx.matches("198.51.100.40 . tcp . 80 :").count(), 1, "{tx}");
    let warnings = h.proxier.take_warnings();
    assert!(
        warnings[0].contains("ns/b:p") && warnings[0].contains("ns/a:p"),
        "{warnings:?}"
    );
}

#[test]
fn failed_transaction_rebuilds_next_time() {
    let mut h = Harness::new(config());
    h.state
        .apply_service(&service("a", json!({"clusterIP": "198.19.0.50"})));
    h.sync(true);
    h.state
        .apply_service(&service("b", json!({"clusterIP": "198.19.0.51"})));
    h.proxier.runner_mut().fail_next = Some("/dev/stdin:2:1-5: Error: boom".into());
    let changes = h.state.take_changes();
    let changed = h.plan.update(
        &h.state,
        IpFamily::V4,
        &changes.services,
        false,
        PlanContext::default(),
    );
    let input = SyncInput {
        family: IpFamily::V4,
        plan: &h.plan,
        changed: &changed,
        full: false,
        node: &h.node,
        service_cidrs: &[],
    };
    let err = h.proxier.sync(input).unwrap_err().to_string();
    assert!(
        err.contains("line 2 (written for service port ns/b:p)"),
        "{err}"
    );
    let tx = h.sync(false);
    assert!(
        tx.starts_with("add table ip kube-proxy\ndelete table ip kube-proxy\n"),
        "rebuilt after failure:\n{tx}"
    );
    assert!(tx.contains("198.19.0.51") && tx.contains("198.19.0.50"));
}

/// A full sync of a table this process built (hourly, or when node addresses or ServiceCIDRs
/// change) flushes maps as maps: `flush set` on a map fails with "No such file or directory".
/// Known ServiceCIDRs add upstream's drop of unallocated ClusterIPs.
#[test]
fn full_resync_of_a_built_table_and_service_cidrs() {
    let mut h = Harness::new(config());
    h.state
        .apply_service(&service("web", json!({"clusterIP": "198.19.0.10"})));
    h.state.apply_slice(&slice(
        "web",
        &[("198.18.1.2", NODE), ("198.18.2.2", "node-b")],
    ));
    let first = h.sync(true);
    assert!(first.contains("delete table ip kube-proxy"), "{first}");
    assert!(!first.contains("unallocated"), "no ServiceCIDRs known yet");

    h.service_cidrs = vec!["198.19.0.0/16".parse().unwrap()];
    let resync = h.sync(false);
    assert!(
        !resync.contains("delete table"),
        "the table is rewritten in place: {resync}"
    );
    for map in ["service-ips", "service-nodeports", "backends-0"] {
        assert!(
            resync.contains(&format!("flush map ip kube-proxy {map}\n")),
            "{map} flushed as a map: {resync}"
        );
        assert!(!resync.contains(&format!("flush set ip kube-proxy {map}\n")));
    }
    assert!(resync.contains("flush set ip kube-proxy cluster-ips\n"));
    assert!(
        resync.contains("add rule ip kube-proxy cluster-ips-check ip daddr { 198.19.0.0/16 } drop comment \"Drop traffic to unallocated ClusterIPs\""),
        "{resync}"
    );
    // Unchanged context: nothing more to do.
    assert_eq!(h.sync(false), "");
}

/// Three Services with two endpoints each, one of them with ClientIP affinity.
fn three_services(h: &mut Harness) {
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let mut spec = json!({"clusterIP": format!("198.19.0.{}", 10 + i)});
        if *name == "c" {
            spec["sessionAffinity"] = json!("ClientIP");
        }
        h.state.apply_service(&service(name, spec));
        h.state.apply_slice(&slice(
            name,
            &[
                (&format!("198.18.1.{i}"), NODE),
                (&format!("198.18.2.{i}"), "node-b"),
            ],
        ));
    }
}

fn element_lines(script: &str) -> Vec<&str> {
    script.lines().filter(|l| l.contains(" element ")).collect()
}

#[test]
fn a_large_new_table_is_built_in_stages_and_hooked_last() {
    let mut h = Harness::new(NftConfig {
        staged_build_above: 3,
        ..config()
    });
    h.proxier.runner_mut().kernel = Kernel::Absent;
    three_services(&mut h);
    h.sync(true);
    let scripts = h.proxier.runner().scripts.clone();
    assert!(scripts.len() >= 3, "{scripts:#?}");
    let (first, rest) = scripts.split_first().unwrap();
    let (last, middle) = rest.split_last().unwrap();
    // First: the table, every set, chain and regular rule; no element, no base-chain rule.
    assert!(first.contains("add table ip kube-proxy"), "{first}");
    assert!(first.contains("add rule ip kube-proxy services"), "{first}");
    assert!(element_lines(first).is_empty(), "{first}");
    assert!(!first.contains("jump services"), "{first}");
    // Then only elements, then only the base chains' rules.
    for stage in middle {
        assert!(
            stage
                .lines()
                .all(|l| l.starts_with("add element ip kube-proxy ")),
            "{stage}"
        );
    }
    assert!(
        last.contains("add rule ip kube-proxy nat-prerouting jump services"),
        "{last}"
    );
    assert!(
        last.lines().all(|l| {
            l.starts_with("flush chain ip kube-proxy filter-")
                || l.starts_with("flush chain ip kube-proxy nat-")
                || l.starts_with("add rule ip kube-proxy filter-")
                || l.starts_with("add rule ip kube-proxy nat-")
        }),
        "{last}"
    );
    // Below the threshold, one transaction.
    let mut small = Harness::new(config());
    small.proxier.runner_mut().kernel = Kernel::Absent;
    three_services(&mut small);
    small.sync(true);
    assert_eq!(small.proxier.runner().scripts.len(), 1);
}

#[test]
fn a_restart_over_its_own_table_rewrites_no_element_and_repairs_drift() {
    // A first process builds the table (in stages, so the model has every element).
    let mut first = Harness::new(NftConfig {
        staged_build_above: 0,
        ..config()
    });
    first.proxier.runner_mut().kernel = Kernel::Absent;
    three_services(&mut first);
    first.sync(true);
    let kernel = first.proxier.runner().kernel.clone();
    let Kernel::Present(table) = &kernel else {
        panic!("the model has the table");
    };
    // a and b go through the slots; c (affinity) through its own chains.
    assert_eq!(
        table.sets["backends-1"].as_ref().unwrap().len(),
        2,
        "{table:?}"
    );

    // A new process over that table: declarations and rules again, not one element.
    let mut second = Harness::new(config());
    second.proxier.runner_mut().kernel = kernel.clone();
    three_services(&mut second);
    let text = second.sync(true);
    assert!(!text.contains("delete table"), "{text}");
    assert!(element_lines(&text).is_empty(), "{text}");
    assert!(
        text.contains("add rule ip kube-proxy nat-prerouting jump services"),
        "{text}"
    );

    // Someone deleted one of our elements and added one of theirs: exactly those are fixed.
    let Kernel::Present(mut drifted) = kernel else {
        unreachable!()
    };
    let backends = drifted
        .sets
        .get_mut("backends-0")
        .unwrap()
        .as_mut()
        .unwrap();
    let removed = backends.remove(0);
    let mut foreign = removed.clone();
    foreign.0[0] = 203; // 203.x.x.x: a frontend no Service has
    backends.push(foreign);
    let mut third = Harness::new(config());
    third.proxier.runner_mut().kernel = Kernel::Present(drifted);
    three_services(&mut third);
    let text = third.sync(true);
    let lines = element_lines(&text);
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with("delete element ip kube-proxy backends-0 { 203."),
        "{lines:?}"
    );
    assert!(
        lines[1].starts_with("add element ip kube-proxy backends-0 { 198.19.0."),
        "{lines:?}"
    );
}

#[test]
fn a_table_whose_staged_build_was_cut_short_is_completed_in_stages_only_while_unhooked() {
    let mut first = Harness::new(NftConfig {
        staged_build_above: 0,
        ..config()
    });
    first.proxier.runner_mut().kernel = Kernel::Absent;
    three_services(&mut first);
    first.sync(true);
    let Kernel::Present(mut table) = first.proxier.runner().kernel.clone() else {
        panic!("the model has the table");
    };
    assert!(table.hooked, "the last stage hooked it");
    // Cut short: the elements of backends-0 never arrived.
    table
        .sets
        .get_mut("backends-0")
        .unwrap()
        .as_mut()
        .unwrap()
        .clear();
    for (hooked, expected_transactions) in [(false, 3), (true, 1)] {
        let mut next = Harness::new(NftConfig {
            staged_build_above: 0,
            ..config()
        });
        next.proxier.runner_mut().kernel = Kernel::Present(KernelTable {
            hooked,
            ..table.clone()
        });
        three_services(&mut next);
        next.sync(true);
        let scripts = &next.proxier.runner().scripts;
        assert_eq!(
            scripts.len(),
            expected_transactions,
            "hooked: {hooked}: {scripts:#?}"
        );
        let last = scripts.last().unwrap();
        assert!(
            last.contains("add rule ip kube-proxy nat-prerouting jump services"),
            "{last}"
        );
        let added: Vec<&str> = scripts.iter().flat_map(|s| element_lines(s)).collect();
        assert_eq!(added.len(), 1, "only backends-0 is written: {added:?}");
        assert!(
            added[0].starts_with("add element ip kube-proxy backends-0"),
            "{added:?}"
        );
    }
}

/// The owner of a contested external IP is the plan's (the smallest service port name), so
/// a Service that arrives later but sorts first takes the frontend in a partial sync, just
/// as a full sync renders it; before the plan decided it, the partial sync refused it.
#[test]
fn a_contested_frontend_moves_to_its_owner_in_a_partial_sync_as_in_a_full_one() {
    let mut h = Harness::new(config());
    with_external_ip(&mut h, "b", "198.19.0.41", "198.18.1.2");
    let first = h.sync(true);
    assert!(
        first.contains("198.51.100.40 . tcp . 80 : 198.18.1.2 . 8080"),
        "{first}"
    );
    with_external_ip(&mut h, "a", "198.19.0.40", "198.18.1.1");
    let partial = h.sync(false);
    assert!(
        partial.contains("delete element ip kube-proxy backends-0 { 198.51.100.40 . tcp . 80 }"),
        "{partial}"
    );
    assert!(
        partial.contains("198.51.100.40 . tcp . 80 : 198.18.1.1 . 8080"),
        "{partial}"
    );
    let full = h.sync(true);
    assert_eq!(
        full.matches("198.51.100.40 . tcp . 80 :").count(),
        1,
        "{full}"
    );
    assert!(
        full.contains("198.51.100.40 . tcp . 80 : 198.18.1.1 . 8080"),
        "{full}"
    );
}

/// A `kube-proxy` table this proxy did not write (upstream's nftables mode uses the same
/// name) is replaced in one transaction rather than adopted, so none of its chains and sets
/// linger.
#[test]
fn a_foreign_table_of_the_same_name_is_replaced_not_adopted() {
    let mut h = Harness::new(config());
    let mut upstream = KernelTable::default();
    upstream.chains.insert("nat-prerouting".into());
    upstream.chains.insert("service-ULMVA6XW-ns/a/tcp/p".into());
    upstream.sets.insert("no-endpoint-services".into(), None);
    upstream.hooked = true;
    h.proxier.runner_mut().kernel = Kernel::Present(upstream);
    three_services(&mut h);
    let text = h.sync(true);
    assert!(
        text.starts_with("add table ip kube-proxy\ndelete table ip kube-proxy\n"),
        "{text}"
    );
}

/// The tables as traffic sees them: without what a partial sync may leave behind harmlessly
/// (empty `dnat-N` sets and slot maps with their dispatch rules and slot chains, kept for
/// reuse; flushed chains waiting for their deferred deletion).
fn observable(tables: &std::collections::BTreeMap<String, crate::fake::FakeTable>) -> String {
    let mut out = String::new();
    for (family, table) in tables {
        let mut table = table.clone();
        let spare: Vec<String> = table
            .sets
            .iter()
            .filter(|(name, set)| {
                set.elements.is_empty()
                    && ["dnat-", "nodeport-dnat-", "backends-", "nodeport-backends-"]
                        .iter()
                        .any(|p| name.starts_with(p))
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in &spare {
            table.sets.remove(name);
            for rules in table.chains.values_mut() {
                rules.retain(|r| !r.split_whitespace().any(|w| w == format!("@{name}")));
            }
        }
        loop {
            let unused: Vec<String> = table
                .chains
                .iter()
                .filter(|(name, rules)| {
                    rules.is_empty()
                        && !table.chains.values().flatten().any(|r| {
                            r.contains(&format!("goto {name}"))
                                || r.contains(&format!("jump {name}"))
                        })
                })
                .map(|(name, _)| name.clone())
                .collect();
            if unused.is_empty() {
                break;
            }
            for name in unused {
                table.chains.remove(&name);
            }
        }
        out.push_str(&format!("{family}: {table:#?}\n"));
    }
    out
}

/// Random changes, each followed by a partial sync into the fake kernel; every few steps the
/// result must equal a fresh proxier's full sync of the same state, and an in-place full
/// sync must change nothing a packet could see. Contested frontends, NodePorts, affinity
/// and eTP Local are in the mix.
#[test]
fn partial_syncs_equal_one_full_sync_in_the_fake_kernel() {
    partial_syncs_equal_one_full_sync(false);
}

/// The same with a kernel that can be read: full syncs write only the differences, and new
/// tables are built in stages (the threshold is set low).
#[test]
fn partial_syncs_equal_one_full_sync_in_a_readable_fake_kernel() {
    partial_syncs_equal_one_full_sync(true);
}

fn partial_syncs_equal_one_full_sync(readable: bool) {
    use crate::fake::FakeNft;
    let config = || NftConfig {
        staged_build_above: 4,
        ..config()
    };
    let fake = || FakeNft {
        readable,
        ..Default::default()
    };
    let mut changes = kube_proxy_model::testing::RandomChanges::new(0x9e3779b97f4a7c15);
    let now = Arc::new(Mutex::new(Instant::now()));
    let clock_now = now.clone();
    let mut state = ClusterState::new(NODE);
    let mut plan = FamilyPlan::default();
    let mut proxier = NftProxier::new(
        config(),
        fake(),
        Box::new(move || *clock_now.lock().unwrap()),
    );
    let node = NodeView {
        node_ips: vec!["192.0.2.10".parse().unwrap()],
        ..Default::default()
    };
    let sync = |proxier: &mut NftProxier<FakeNft>,
                state: &mut ClusterState,
                plan: &mut FamilyPlan,
                full: bool| {
        kube_proxy_model::testing::sync_ipv4(proxier, state, plan, full, &node);
    };
    sync(&mut proxier, &mut state, &mut plan, true);
    for step in 0..400 {
        changes.apply_one(&mut state);
        *now.lock().unwrap() += Duration::from_secs(2);
        sync(&mut proxier, &mut state, &mut plan, false);
        if step % 20 == 19 {
            let mut fresh = NftProxier::new(config(), fake(), Box::new(Instant::now));
            kube_proxy_model::testing::fresh_sync_ipv4(&mut fresh, &state, &node);
            let partial = observable(&proxier.runner().tables);
            assert_eq!(
                partial,
                observable(&fresh.runner().tables),
                "after step {step}"
            );
            if readable {
                assert!(
                    fresh.runner().transactions > 2,
                    "a new table is built in stages"
                );
            }
            // An in-place full sync of the same state: nothing visible changes, and with a
            // readable kernel it writes not one element...
            sync(&mut proxier, &mut state, &mut plan, true);
            if readable {
                let last = &proxier.runner().last;
                assert!(!last.contains(" element "), "after step {step}: {last}");
            }
            assert_eq!(
                observable(&proxier.runner().tables),
                partial,
                "in-place full sync after step {step}"
            );
            // ...and repairs drift: one of our elements gone, a foreign one added.
            if readable {
                let table = proxier.runner_mut().tables.get_mut("ip").unwrap();
                if let Some(set) = table
                    .sets
                    .iter_mut()
                    .find(|(name, set)| *name != "firewall-allow" && !set.elements.is_empty())
                    .map(|(_, set)| set)
                {
                    let first = set.elements.keys().next().unwrap().clone();
                    set.elements.remove(&first);
                }
                let reject = table.sets.get_mut("no-endpoint-reject").unwrap();
                reject
                    .elements
                    .insert("203.0.113.9 . tcp . 9".into(), String::new());
                sync(&mut proxier, &mut state, &mut plan, true);
                assert_eq!(
                    observable(&proxier.runner().tables),
                    partial,
                    "drift repaired after step {step}"
                );
            }
        }
    }
    assert!(proxier.runner().transactions > 100);
}

/// The nftables mode's canary: every verify interval without changes the table is listed
/// and what someone else changed (a deleted element, flushed base chains) is repaired and
/// reported; with nothing changed it writes no element and reports nothing.
#[test]
fn periodic_verification_repairs_and_reports_foreign_changes() {
    use crate::fake::FakeNft;
    let now = Arc::new(Mutex::new(Instant::now()));
    let clock_now = now.clone();
    let mut proxier = NftProxier::new(
        config(),
        FakeNft {
            readable: true,
            ..Default::default()
        },
        Box::new(move || *clock_now.lock().unwrap()),
    )
    .with_verify_interval(Duration::from_secs(30));
    let mut state = ClusterState::new(NODE);
    state.apply_service(&service("a", json!({"clusterIP": "198.19.0.1"})));
    state.apply_slice(&slice(
        "a",
        &[("198.18.1.2", NODE), ("198.18.2.2", "node-b")],
    ));
    let mut plan = FamilyPlan::default();
    let node = NodeView {
        node_ips: vec!["192.0.2.10".parse().unwrap()],
        ..Default::default()
    };
    let sync =
        |proxier: &mut NftProxier<FakeNft>, plan: &mut FamilyPlan, state: &mut ClusterState| {
            kube_proxy_model::testing::sync_ipv4(proxier, state, plan, false, &node);
        };
    sync(&mut proxier, &mut plan, &mut state);
    let built = observable(&proxier.runner().tables);
    let transactions = proxier.runner().transactions;

    // Within the interval, nothing is listed or written.
    *now.lock().unwrap() += Duration::from_secs(10);
    sync(&mut proxier, &mut plan, &mut state);
    assert_eq!(proxier.runner().transactions, transactions);

    // Someone deletes an element and flushes the base chain traffic enters by.
    {
        let tables = &mut proxier.runner_mut().tables;
        let table = tables.get_mut("ip").unwrap();
        let backends = &mut table.sets.get_mut("backends-1").unwrap().elements;
        let first = backends.keys().next().unwrap().clone();
        backends.remove(&first);
        table.chains.get_mut("nat-prerouting").unwrap().clear();
    }
    *now.lock().unwrap() += Duration::from_secs(30);
    sync(&mut proxier, &mut plan, &mut state);
    assert_eq!(observable(&proxier.runner().tables), built, "repaired");
    let drift = proxier.last_drift(IpFamily::V4).unwrap().clone();
    assert_eq!(drift.elements, 1, "{drift:?}");
    assert!(drift.unhooked, "{drift:?}");
    let warnings = proxier.take_warnings();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("differed from what this proxy wrote")),
        "{warnings:?}"
    );

    // The next verification finds nothing: no element written, nothing reported.
    *now.lock().unwrap() += Duration::from_secs(30);
    sync(&mut proxier, &mut plan, &mut state);
    assert!(
        !proxier.runner().last.contains(" element "),
        "{}",
        proxier.runner().last
    );
    assert!(proxier.last_drift(IpFamily::V4).unwrap().is_empty());
    assert!(proxier.take_warnings().is_empty());
}
