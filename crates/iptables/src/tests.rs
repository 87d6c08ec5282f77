//! Partial syncs equal one full sync, in the in-memory iptables.

use kube_proxy_config::DetectLocal;
use kube_proxy_model::context::ProxyPolicy;
use kube_proxy_model::dataplane::NodeView;
use kube_proxy_model::{ClusterState, FamilyPlan, IpFamily};

use crate::fake::FakeIptables;
use crate::proxier::IptablesProxier;

fn policy() -> ProxyPolicy {
    ProxyPolicy {
        detect_local: DetectLocal::ClusterCidr(vec!["198.18.0.0/16".parse().unwrap()]),
        ..Default::default()
    }
}

fn node() -> NodeView {
    NodeView {
        node_ips: vec!["192.0.2.10".parse().unwrap()],
        ..Default::default()
    }
}

/// The tables with the rules of our static chains in sorted order (their order carries no
/// meaning, and partial syncs insert new rules first), after checking that the NodePorts
/// rule is the last of nat KUBE-SERVICES.
fn normalized(
    families: &std::collections::BTreeMap<IpFamily, crate::fake::Tables>,
) -> std::collections::BTreeMap<IpFamily, crate::fake::Tables> {
    let mut families = families.clone();
    for tables in families.values_mut() {
        if let Some(services) = tables.get("nat").and_then(|nat| nat.get("KUBE-SERVICES")) {
            let last = services
                .iter()
                .rposition(|r| !r.contains("must be the last rule"));
            let first_nodeports = services
                .iter()
                .position(|r| r.contains("must be the last rule"));
            assert!(
                last.zip(first_nodeports).is_none_or(|(l, f)| l < f),
                "the NodePorts rule is last: {services:#?}"
            );
        }
        for chains in tables.values_mut() {
            for (chain, rules) in chains.iter_mut() {
                if chain.starts_with("KUBE-") && !crate::restore::is_service_port_chain(chain) {
                    rules.sort();
                }
            }
        }
    }
    families
}

fn sync(
    proxier: &mut IptablesProxier<FakeIptables>,
    state: &mut ClusterState,
    plan: &mut FamilyPlan,
    full: bool,
) {
    kube_proxy_model::testing::sync_ipv4(proxier, state, plan, full, &node());
}

/// Random changes (contested external IPs and NodePorts, affinity, eTP Local, endpoints on
/// this node and elsewhere), each followed by a partial sync; every 20 steps the tables must
/// equal those of a fresh proxier's full sync, and a full sync must change nothing.
#[test]
fn partial_syncs_equal_one_full_sync_in_the_fake_iptables() {
    let mut changes = kube_proxy_model::testing::RandomChanges::new(0x2545f4914f6cdd1d);
    let mut state = ClusterState::new("node-a");
    let mut plan = FamilyPlan::default();
    // The canary and static-chain check runs before every partial sync: its expected counts
    // must follow the kernel, or it would force needless full syncs.
    let mut proxier = IptablesProxier::new(policy(), FakeIptables::default())
        .with_canary_interval(std::time::Duration::ZERO);
    sync(&mut proxier, &mut state, &mut plan, true);
    let mut partial_inputs = 0;
    let mut untouched_services = 0;
    let mut rewrote_less = false;
    for step in 0..400 {
        changes.apply_one(&mut state);
        let before = proxier.runner().restores;
        let report = kube_proxy_model::testing::sync_ipv4(
            &mut proxier,
            &mut state,
            &mut plan,
            false,
            &node(),
        );
        partial_inputs += proxier.runner().restores - before;
        assert!(
            !report.full,
            "after step {step}: {:?}",
            kube_proxy_model::Dataplane::take_warnings(&mut proxier)
        );
        // The rule counts of the metrics follow the kernel through partial syncs.
        for table in &report.rules {
            let ours: usize = proxier.runner().families[&IpFamily::V4][table.table]
                .iter()
                .filter(|(chain, _)| chain.starts_with("KUBE-"))
                .map(|(_, rules)| rules.len())
                .sum();
            assert_eq!(table.total, ours, "{} after step {step}", table.table);
        }
        // A partial input declares (and so rewrites) only the changed ports' chains.
        let declared = proxier
            .runner()
            .last
            .lines()
            .filter(|l| l.starts_with(":KUBE-SEP-"))
            .count();
        let present = proxier.runner().families[&IpFamily::V4]["nat"]
            .keys()
            .filter(|c| c.starts_with("KUBE-SEP-"))
            .count();
        rewrote_less |= declared < present;
        // An endpoint change leaves KUBE-SERVICES alone (nothing in it changed).
        untouched_services += usize::from(!proxier.runner().last.contains("KUBE-SERVICES"));
        if step % 20 == 19 {
            let mut fresh = IptablesProxier::new(policy(), FakeIptables::default());
            kube_proxy_model::testing::fresh_sync_ipv4(&mut fresh, &state, &node());
            let partial = normalized(&proxier.runner().families);
            assert_eq!(
                partial,
                normalized(&fresh.runner().families),
                "after step {step}"
            );
            // The same written in stages of a few chains (the nf_tables backend's full sync).
            let mut staged = IptablesProxier::new(policy(), FakeIptables::default())
                .with_staged_full_syncs(Some(3));
            kube_proxy_model::testing::fresh_sync_ipv4(&mut staged, &state, &node());
            assert_eq!(
                partial,
                normalized(&staged.runner().families),
                "staged, after step {step}"
            );
            sync(&mut proxier, &mut state, &mut plan, true);
            assert_eq!(
                normalized(&proxier.runner().families),
                partial,
                "full sync after step {step}"
            );
        }
    }
    assert!(partial_inputs > 200, "{partial_inputs}");
    assert!(
        rewrote_less,
        "partial inputs left unchanged ports' chains alone"
    );
    assert!(untouched_services > 50, "{untouched_services}");
}

/// One Service with `n` endpoints (198.18.x.y), as the cluster state's objects.
fn service_with_endpoints(state: &mut ClusterState, n: usize) {
    let service = serde_json::json!({"kind": "Service", "metadata": {"namespace": "ns", "name": "big"},
        "spec": {"clusterIP": "198.19.0.10", "ports": [{"name": "p", "port": 80, "targetPort": 8080}]}});
    let endpoints: Vec<serde_json::Value> = (0..n)
        .map(|i| serde_json::json!({"addresses": [format!("198.18.{}.{}", i / 250, i % 250 + 1)]}))
        .collect();
    let slice = serde_json::json!({"kind": "EndpointSlice",
        "metadata": {"namespace": "ns", "name": "big-1", "labels": {"kubernetes.io/service-name": "big"}},
        "addressType": "IPv4", "ports": [{"name": "p", "port": 8080}], "endpoints": endpoints});
    state.apply_service(&serde_json::from_value(service).unwrap());
    state.apply_slice(&serde_json::from_value(slice).unwrap());
}

fn nat_rules(proxier: &IptablesProxier<FakeIptables>) -> Vec<String> {
    proxier.runner().families[&IpFamily::V4]["nat"]
        .values()
        .flatten()
        .cloned()
        .collect()
}

/// Past 1000 endpoints the per-endpoint rules lose their comments (upstream's large-cluster
/// mode); crossing the threshold either way rewrites every chain, so no port keeps the other
/// style; the rule counts reported for the metrics match the kernel's.
#[test]
fn large_cluster_mode_past_1000_endpoints() {
    let mut state = ClusterState::new("node-a");
    let mut plan = FamilyPlan::default();
    let mut proxier = IptablesProxier::new(policy(), FakeIptables::default());
    service_with_endpoints(&mut state, 1000);
    sync(&mut proxier, &mut state, &mut plan, true);
    let commented = |rules: &[String]| {
        rules
            .iter()
            .filter(|r| r.contains("DNAT") && r.starts_with("-m comment --comment ns/big:p "))
            .count()
    };
    assert_eq!(commented(&nat_rules(&proxier)), 1000, "at the threshold");

    service_with_endpoints(&mut state, 1001);
    let report =
        kube_proxy_model::testing::sync_ipv4(&mut proxier, &mut state, &mut plan, false, &node());
    assert!(report.full, "a style change rewrites everything");
    let rules = nat_rules(&proxier);
    assert_eq!(commented(&rules), 0);
    assert!(rules
        .iter()
        .any(|r| r == "-m tcp -p tcp -j DNAT --to-destination 198.18.4.1:8080"));
    assert!(rules.iter().any(|r| r
        .starts_with("-m comment --comment \"ns/big:p cluster IP\" -m tcp -p tcp -d 198.19.0.10")));
    let nat = report.rules.iter().find(|t| t.table == "nat").unwrap();
    let ours: usize = proxier.runner().families[&IpFamily::V4]["nat"]
        .iter()
        .filter(|(chain, _)| chain.starts_with("KUBE-"))
        .map(|(_, rules)| rules.len())
        .sum();
    assert_eq!(nat.total, ours, "the rules of our nat chains");

    service_with_endpoints(&mut state, 10);
    let report =
        kube_proxy_model::testing::sync_ipv4(&mut proxier, &mut state, &mut plan, false, &node());
    assert!(report.full);
    assert_eq!(commented(&nat_rules(&proxier)), 10);
}

/// Someone deletes our chains (`iptables -X`, `nft flush ruleset`): the canary is gone, the
/// next sync notices and rewrites everything, as upstream's canary check.
#[test]
fn a_missing_canary_forces_a_full_sync() {
    let mut changes = kube_proxy_model::testing::RandomChanges::new(7);
    let mut state = ClusterState::new("node-a");
    for _ in 0..30 {
        changes.apply_one(&mut state);
    }
    let mut plan = FamilyPlan::default();
    let mut proxier = IptablesProxier::new(policy(), FakeIptables::default())
        .with_canary_interval(std::time::Duration::ZERO);
    sync(&mut proxier, &mut state, &mut plan, true);
    let programmed = proxier.runner().families.clone();
    for table in ["mangle", "nat", "filter"] {
        assert!(
            programmed[&IpFamily::V4][table].contains_key("KUBE-PROXY-CANARY"),
            "{table}"
        );
    }
    // Nothing changed and the canary is there: a partial sync.
    let report =
        kube_proxy_model::testing::sync_ipv4(&mut proxier, &mut state, &mut plan, false, &node());
    assert!(!report.full);
    // Delete the nat table's chains, as `iptables -t nat -F; iptables -t nat -X` would.
    proxier
        .runner_mut()
        .families
        .get_mut(&IpFamily::V4)
        .unwrap()
        .insert("nat".to_string(), Default::default());
    let report =
        kube_proxy_model::testing::sync_ipv4(&mut proxier, &mut state, &mut plan, false, &node());
    assert!(report.full, "the missing canary forced a full sync");
    assert_eq!(proxier.runner().families, programmed);
    let warnings = kube_proxy_model::Dataplane::take_warnings(&mut proxier);
    assert!(
        warnings.iter().any(|w| w.contains("KUBE-PROXY-CANARY")),
        "{warnings:?}"
    );

    // `iptables -t nat -F KUBE-SERVICES`: the canaries stay, the emptied chain is noticed.
    for (table, chain) in [("nat", "KUBE-SERVICES"), ("filter", "KUBE-FORWARD")] {
        proxier
            .runner_mut()
            .families
            .get_mut(&IpFamily::V4)
            .unwrap()
            .get_mut(table)
            .unwrap()
            .get_mut(chain)
            .unwrap()
            .clear();
        let report = kube_proxy_model::testing::sync_ipv4(
            &mut proxier,
            &mut state,
            &mut plan,
            false,
            &node(),
        );
        assert!(
            report.full,
            "the flushed {table} {chain} forced a full sync"
        );
        assert_eq!(proxier.runner().families, programmed);
        let warnings = kube_proxy_model::Dataplane::take_warnings(&mut proxier);
        assert!(
            warnings
                .iter()
                .any(|w| w.contains(chain) && w.contains("someone else changed it")),
            "{warnings:?}"
        );
    }
}

/// A rejected input is reported with the line, and the service port it belongs to.
#[test]
fn a_rejected_restore_names_the_line_and_its_service_port() {
    let mut state = ClusterState::new("node-a");
    service_with_endpoints(&mut state, 2);
    let mut plan = FamilyPlan::default();
    let mut proxier = IptablesProxier::new(policy(), FakeIptables::default());
    sync(&mut proxier, &mut state, &mut plan, true);
    // The fake rejects a rule in a chain it does not have: delete one endpoint's chain behind
    // the proxier's back, then change that port.
    let nat = proxier
        .runner_mut()
        .families
        .get_mut(&IpFamily::V4)
        .unwrap()
        .get_mut("nat")
        .unwrap();
    let svc = nat
        .keys()
        .find(|c| c.starts_with("KUBE-SVC-"))
        .unwrap()
        .clone();
    nat.remove(&svc);
    nat.get_mut("KUBE-SERVICES").unwrap().clear();
    // The next partial input deletes the port's old KUBE-SERVICES rule (its cluster IP
    // changed), which is no longer there.
    let service = serde_json::json!({"kind": "Service", "metadata": {"namespace": "ns", "name": "big"},
        "spec": {"clusterIP": "198.19.0.11", "ports": [{"name": "p", "port": 80, "targetPort": 8080}]}});
    state.apply_service(&serde_json::from_value(service).unwrap());
    let error = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        sync(&mut proxier, &mut state, &mut plan, false)
    }))
    .unwrap_err();
    let message = error.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("of service port ns/big:p"), "{message}");
    assert!(
        message.contains(&format!("-D KUBE-SERVICES -m comment --comment \"ns/big:p cluster IP\" -m tcp -p tcp -d 198.19.0.10 --dport 80 -j {svc}")),
        "{message}"
    );
}
