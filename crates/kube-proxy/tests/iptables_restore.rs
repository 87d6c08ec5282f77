//! The iptables dataplane's restore input is accepted by the real `iptables-restore` and
//! `ip6tables-restore` (whichever backend the machine's `iptables` is), loaded into a fresh
//! network namespace, for Services that use every rule shape: endpoints with affinity,
//! eTP Local with a load balancer, source ranges, an external IP and a health-check node
//! port, and a Service without endpoints. (Packets through these rules come with the
//! dataplane itself; this proves the syntax and the chain structure.)

mod testbed;

use std::collections::BTreeSet;

use kube_proxy_config::{DetectLocal, NodePortAddresses};
use kube_proxy_model::context::{FamilyContext, ProxyPolicy};
use kube_proxy_model::{ClusterState, FamilyPlan, IpFamily, NodeView, PlanContext};
use serde_json::{json, Value};
use testbed::Netns;

fn objects(v6: bool) -> Vec<Value> {
    let (cluster, pod, lb, ext, client) = if v6 {
        (
            "2001:db8:19::",
            "2001:db8:18::",
            "2001:db8:51::1",
            "2001:db8:51::2",
            "2001:db8:203::/64",
        )
    } else {
        (
            "198.19.0.",
            "198.18.0.",
            "198.51.100.1",
            "198.51.100.2",
            "203.0.113.0/24",
        )
    };
    let family = if v6 { "IPv6" } else { "IPv4" };
    vec![
        json!({"kind": "Service", "metadata": {"namespace": "t", "name": "web"},
            "spec": {"clusterIP": format!("{cluster}10"), "sessionAffinity": "ClientIP",
                "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
        json!({"kind": "EndpointSlice", "metadata": {"namespace": "t", "name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": family, "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [format!("{pod}1")], "nodeName": "node-a"}, {"addresses": [format!("{pod}2")], "nodeName": "node-b"}]}),
        json!({"kind": "Service", "metadata": {"namespace": "t", "name": "lb"},
            "spec": {"type": "LoadBalancer", "clusterIP": format!("{cluster}11"), "externalIPs": [ext],
                "externalTrafficPolicy": "Local", "healthCheckNodePort": 30999,
                "loadBalancerSourceRanges": [client],
                "ports": [{"name": "p", "port": 443, "nodePort": 30443, "protocol": "TCP"}, {"name": "dns", "port": 53, "nodePort": 30053, "protocol": "UDP"}]},
            "status": {"loadBalancer": {"ingress": [{"ip": lb}]}}}),
        json!({"kind": "EndpointSlice", "metadata": {"namespace": "t", "name": "lb-1", "labels": {"kubernetes.io/service-name": "lb"}},
            "addressType": family, "ports": [{"name": "p", "port": 8443}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": [{"addresses": [format!("{pod}3")], "nodeName": "node-a"}, {"addresses": [format!("{pod}4")], "nodeName": "node-b"}]}),
        json!({"kind": "Service", "metadata": {"namespace": "t", "name": "empty"},
            "spec": {"clusterIP": format!("{cluster}12"), "ports": [{"name": "p", "port": 80}]}}),
    ]
}

/// The cluster state of `objects` for node-a.
fn state_of(v6: bool) -> ClusterState {
    let mut state = ClusterState::new("node-a");
    for object in objects(v6) {
        if object["kind"] == "Service" {
            state.apply_service(&serde_json::from_value(object).unwrap());
        } else {
            state.apply_slice(&serde_json::from_value(object).unwrap());
        }
    }
    state
}

fn restore_input(v6: bool) -> String {
    let state = state_of(v6);
    let family = if v6 { IpFamily::V6 } else { IpFamily::V4 };
    let mut plan = FamilyPlan::default();
    plan.update(
        &state,
        family,
        &BTreeSet::new(),
        true,
        PlanContext::default(),
    );
    assert_eq!(plan.services.len(), 4);
    let policy = ProxyPolicy {
        detect_local: DetectLocal::ClusterCidr(vec![if v6 {
            "2001:db8:18::/48"
        } else {
            "198.18.0.0/16"
        }
        .parse()
        .unwrap()]),
        node_port_addresses: NodePortAddresses::All,
        ..Default::default()
    };
    let node = NodeView {
        node_ips: vec![if v6 { "2001:db8:2::10" } else { "192.0.2.10" }
            .parse()
            .unwrap()],
        ..Default::default()
    };
    let ctx = FamilyContext::resolve(&policy, family, &node);
    kube_proxy_iptables::restore::render_full(&plan, &ctx, &BTreeSet::new())
}

#[test]
fn restore_input_is_accepted_by_iptables_restore() {
    if !testbed::available() {
        return;
    }
    let ns = Netns::new("iptr");
    for (v6, restore, save) in [
        (false, "iptables-restore", "iptables-save"),
        (true, "ip6tables-restore", "ip6tables-save"),
    ] {
        let input = restore_input(v6);
        if let Err(e) = ns.run(restore, &["--noflush"], Some(&input)) {
            panic!("{restore} rejected the input: {e}\n{input}");
        }
        // Twice: a second full input replaces the first (declared chains are emptied).
        ns.run(restore, &["--noflush"], Some(&input)).unwrap();
        let saved = ns.run(save, &[], None).unwrap();
        let rules = |table: &str| {
            let text = saved.split(&format!("*{table}\n")).nth(1).unwrap_or("");
            text.split("COMMIT")
                .next()
                .unwrap_or("")
                .lines()
                .filter(|l| l.starts_with("-A "))
                .count()
        };
        let expected = |table: &str| {
            input
                .split(&format!("*{table}\n"))
                .nth(1)
                .unwrap()
                .split("COMMIT")
                .next()
                .unwrap()
                .lines()
                .filter(|l| l.starts_with("-A "))
                .count()
        };
        assert_eq!(
            rules("nat"),
            expected("nat"),
            "{save}: every nat rule once\n{saved}"
        );
        assert_eq!(
            rules("filter"),
            expected("filter"),
            "{save}: every filter rule once\n{saved}"
        );
        for needle in [
            "KUBE-SVC-",
            "KUBE-SEP-",
            "KUBE-EXT-",
            "KUBE-FW-",
            "--rcheck",
            "has no endpoints",
            "health check node port",
        ] {
            assert!(saved.contains(needle), "{save} lacks {needle}:\n{saved}");
        }
    }
}

/// The dataplane through the real tools of each backend: a full sync, a partial sync after
/// an endpoint moved (its old KUBE-SEP chain deleted, the new one written), another full sync
/// that finds the built-in chains' jumps in place and adds none twice, and large-cluster mode
/// (a Service with 1001 endpoints: the endpoint rules lose their comments, everything is
/// rewritten, the kernel takes the input).
#[test]
fn the_iptables_dataplane_syncs_through_the_real_tools() {
    use kube_proxy::kernel::iptables_backend::Backend;
    for backend in [Backend::Nft, Backend::Legacy] {
        syncs_through_the_real_tools(backend);
    }
}

fn syncs_through_the_real_tools(backend: kube_proxy::kernel::iptables_backend::Backend) {
    use kube_proxy::kernel::iptables_runner::IptablesCommand;
    use kube_proxy_iptables::proxier::IptablesProxier;
    use kube_proxy_model::testing::sync_ipv4;
    if !testbed::available() {
        return;
    }
    let ns = Netns::new("iptd");
    let name = ns.0.clone();
    let save_tool = backend.tool("iptables", "save");
    let saved = testbed::in_netns(&name, move || {
        let mut state = state_of(false);
        let policy = ProxyPolicy {
            detect_local: DetectLocal::ClusterCidr(vec!["198.18.0.0/16".parse().unwrap()]),
            ..Default::default()
        };
        let node = NodeView {
            node_ips: vec!["192.0.2.10".parse().unwrap()],
            ..Default::default()
        };
        // Small stages on the nf_tables backend, so the large-cluster sync below is staged.
        let stages = backend.full_sync_stage_chains().map(|_| 100);
        let mut proxier = IptablesProxier::new(policy, IptablesCommand::new(backend))
            .with_staged_full_syncs(stages);
        let mut plan = FamilyPlan::default();
        sync_ipv4(&mut proxier, &mut state, &mut plan, true, &node);
        let save = || {
            let out = std::process::Command::new(&save_tool).output().unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let first = save();
        state.apply_slice(
            &serde_json::from_value(json!({"metadata": {"namespace": "t", "name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
                "endpoints": [{"addresses": ["198.18.0.1"], "nodeName": "node-a"}, {"addresses": ["198.18.0.9"], "nodeName": "node-b"}]}))
            .unwrap(),
        );
        sync_ipv4(&mut proxier, &mut state, &mut plan, false, &node);
        let second = save();
        sync_ipv4(&mut proxier, &mut state, &mut plan, true, &node);
        let third = save();
        // Large-cluster mode.
        state.apply_service(&serde_json::from_value(json!({"metadata": {"namespace": "t", "name": "big"},
            "spec": {"clusterIP": "198.19.0.200", "ports": [{"name": "p", "port": 80, "targetPort": 8080}]}})).unwrap());
        let endpoints: Vec<serde_json::Value> = (0..1001)
            .map(|i| json!({"addresses": [format!("198.18.{}.{}", 10 + i / 250, i % 250 + 1)]}))
            .collect();
        state.apply_slice(&serde_json::from_value(json!({"metadata": {"namespace": "t", "name": "big-1", "labels": {"kubernetes.io/service-name": "big"}},
            "addressType": "IPv4", "ports": [{"name": "p", "port": 8080}], "endpoints": endpoints})).unwrap());
        let report = sync_ipv4(&mut proxier, &mut state, &mut plan, false, &node);
        assert!(
            report.full,
            "entering large-cluster mode rewrites everything"
        );
        (first, second, third, save())
    });
    let (first, second, third, large) = saved;
    let count = |text: &str, needle: &str| text.lines().filter(|l| l.contains(needle)).count();
    assert!(
        first.contains("-A KUBE-SEP-") && first.contains("198.18.0.2:8080"),
        "{first}"
    );
    assert!(
        !second.contains("198.18.0.2:8080"),
        "the moved endpoint's chain is gone:\n{second}"
    );
    assert!(second.contains("198.18.0.9:8080"), "{second}");
    for text in [&first, &second, &third, &large] {
        assert_eq!(count(text, "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"), 1, "{text}");
        assert_eq!(count(text, "-j KUBE-POSTROUTING"), 1, "{text}");
        assert_eq!(count(text, "-A INPUT "), 3, "{text}");
        assert_eq!(
            count(text, ":KUBE-PROXY-CANARY "),
            3,
            "mangle, filter, nat:\n{text}"
        );
    }
    let chains = |text: &str| text.lines().filter(|l| l.starts_with(":KUBE-")).count();
    assert_eq!(
        chains(&second),
        chains(&third),
        "a full sync after a partial one finds nothing stale"
    );
    let dnat: Vec<&str> = large.lines().filter(|l| l.contains("-j DNAT")).collect();
    assert!(dnat.len() > 1001, "{backend:?}");
    assert!(
        dnat.iter().all(|l| !l.contains("--comment")),
        "no comments on endpoint rules in large-cluster mode: {:?}",
        &dnat[..3]
    );
    assert!(large.contains("--comment \"t/big:p cluster IP\""));
}
