//! The dataplanes proven with real packets: the proxy binary runs in node-a of the test bed
//! (see testbed/mod.rs) on manifests, and clients in the client, node and pod namespaces
//! connect to Service frontends. Each test checks which pods answer (all of them, no others),
//! the source address the pod saw (masqueraded or not), and refused versus dropped. The cases
//! shared by the modes are in the tables below; the rest are about one mode.

mod fakeapi;
mod testbed;

use std::time::Duration;

use testbed::{ipaddr, sock, Mode, Outcome, TestBed, PODS};

/// The packet cases, each a function of the dataplane: every case runs in nftables mode and
/// in iptables mode on both backends (`nftables::case`, `iptables_nft::case`,
/// `iptables_legacy::case`), and in ipvs mode inside the VM, so a case is written once. An
/// attribute before the module name goes on every test (`#[ignore]` for the VM's cases).
macro_rules! packet_cases {
    ($modname:ident: $mode:ident => $($case:ident),* $(,)?) => {
        packet_cases!(#[cfg(all())] $modname: $mode => $($case),*);
    };
    (#[$attr:meta] $modname:ident: $mode:ident => $($case:ident),* $(,)?) => {
        mod $modname {
            $(
                #[test]
                #[$attr]
                fn $case() {
                    super::$case(super::Mode::$mode);
                }
            )*
        }
    };
}

packet_cases!(nftables: Nftables =>
    cluster_ip_from_pods_node_and_outside,
    no_endpoints_rejects_and_endpoint_changes_are_followed,
    node_port_and_external_ips_with_cluster_policy,
    external_traffic_policy_local,
    internal_traffic_policy_local,
    client_ip_session_affinity,
    load_balancer_source_ranges,
    masquerading_under_each_local_traffic_detector,
    sctp_services_are_programmed,
    udp_clients_move_to_a_live_endpoint,
    without_conntrack_cleanup_udp_clients_stay_on_the_removed_endpoint,
    health_check_node_ports,
    health_check_with_an_ipv4_only_node_port_addresses_flag,
    upstream_command_line_against_an_api_server,
    api_server_outage_keeps_traffic_and_recovers,
    foreign_edits_are_found_repaired_and_logged,
    invalid_objects_among_valid_ones,
    kill_9_during_syncs_leaves_nothing_broken,
);
packet_cases!(iptables_nft: IptablesNft =>
    cluster_ip_from_pods_node_and_outside,
    no_endpoints_rejects_and_endpoint_changes_are_followed,
    node_port_and_external_ips_with_cluster_policy,
    external_traffic_policy_local,
    internal_traffic_policy_local,
    client_ip_session_affinity,
    load_balancer_source_ranges,
    masquerading_under_each_local_traffic_detector,
    sctp_services_are_programmed,
    udp_clients_move_to_a_live_endpoint,
    without_conntrack_cleanup_udp_clients_stay_on_the_removed_endpoint,
    health_check_node_ports,
    health_check_with_an_ipv4_only_node_port_addresses_flag,
    upstream_command_line_against_an_api_server,
    api_server_outage_keeps_traffic_and_recovers,
    foreign_edits_are_found_repaired_and_logged,
    invalid_objects_among_valid_ones,
    kill_9_during_syncs_leaves_nothing_broken,
    iptables_localhost_node_ports,
    iptables_takeover_canary_mode_switches_and_cleanup,
);
packet_cases!(iptables_legacy: IptablesLegacy =>
    cluster_ip_from_pods_node_and_outside,
    no_endpoints_rejects_and_endpoint_changes_are_followed,
    node_port_and_external_ips_with_cluster_policy,
    external_traffic_policy_local,
    internal_traffic_policy_local,
    client_ip_session_affinity,
    load_balancer_source_ranges,
    masquerading_under_each_local_traffic_detector,
    sctp_services_are_programmed,
    udp_clients_move_to_a_live_endpoint,
    without_conntrack_cleanup_udp_clients_stay_on_the_removed_endpoint,
    health_check_node_ports,
    health_check_with_an_ipv4_only_node_port_addresses_flag,
    upstream_command_line_against_an_api_server,
    api_server_outage_keeps_traffic_and_recovers,
    foreign_edits_are_found_repaired_and_logged,
    invalid_objects_among_valid_ones,
    kill_9_during_syncs_leaves_nothing_broken,
    iptables_localhost_node_ports,
    iptables_takeover_canary_mode_switches_and_cleanup,
);

// The cases in ipvs mode: `#[ignore]`d here (this machine's kernel has no IP_VS), run by
// `ipvs_cases_in_a_vm` inside a VM whose kernel has it (testbed/vm.rs, scripts/vm).
packet_cases!(#[ignore = "needs IP_VS: runs inside the VM (ipvs_cases_in_a_vm)"] ipvs: Ipvs =>
    cluster_ip_from_pods_node_and_outside,
    no_endpoints_rejects_and_endpoint_changes_are_followed,
    node_port_and_external_ips_with_cluster_policy,
    external_traffic_policy_local,
    internal_traffic_policy_local,
    client_ip_session_affinity,
    load_balancer_source_ranges,
    masquerading_under_each_local_traffic_detector,
    sctp_services_are_programmed,
    udp_clients_move_to_a_live_endpoint,
    health_check_node_ports,
);

// userspace mode, on both redirect paths (iptables; nftables, as on a node without
// iptables): the cases whose behaviour upstream's userspace proxier shares (what it cannot
// do: masquerading choices, SCTP, conntrack cleanup, surviving kill -9 — see
// docs/userspace.md), then its own.
macro_rules! userspace_cases {
    ($modname:ident: $mode:ident) => {
        packet_cases!($modname: $mode =>
            cluster_ip_from_pods_node_and_outside,
            no_endpoints_rejects_and_endpoint_changes_are_followed,
            node_port_and_external_ips_with_cluster_policy,
            external_traffic_policy_local,
            internal_traffic_policy_local,
            client_ip_session_affinity,
            load_balancer_source_ranges,
            udp_clients_move_to_a_live_endpoint,
            health_check_node_ports,
            api_server_outage_keeps_traffic_and_recovers,
            userspace_retries_transfers_udp_timeouts_and_listener_lifecycle,
            userspace_foreign_edits_are_found_and_repaired,
        );
    };
}
userspace_cases!(userspace: Userspace);
userspace_cases!(userspace_nft: UserspaceNft);

packet_cases!(userspace_only: Userspace =>
    userspace_redirect_paths_and_mode_switches,
);

packet_cases!(#[ignore = "needs IP_VS: runs inside the VM (ipvs_cases_in_a_vm)"] ipvs_only: Ipvs =>
    ipvs_draining_schedulers_timeouts_and_cleanup,
);

/// Boots the VM and runs the `ipvs::` cases there.
#[test]
fn ipvs_cases_in_a_vm() {
    testbed::vm::run_ignored("ipvs", 2);
}

/// Cases run with the proxy from the container image (`Dockerfile`, built by
/// scripts/image.sh; `KP_IMAGE` names it), as a DaemonSet runs it: privileged, in the node's
/// network namespace.
macro_rules! image_cases {
    ($modname:ident: $mode:ident => $($case:ident),* $(,)?) => {
        mod $modname {
            $(
                #[test]
                fn $case() {
                    if let Some(image) = super::testbed::test_image() {
                        super::testbed::with_image(&image, || super::$case(super::Mode::$mode));
                    }
                }
            )*
        }
    };
}

image_cases!(image_nftables: Nftables =>
    cluster_ip_from_pods_node_and_outside,
    node_port_and_external_ips_with_cluster_policy,
    client_ip_session_affinity,
);
image_cases!(image_iptables_nft: IptablesNft =>
    cluster_ip_from_pods_node_and_outside,
    node_port_and_external_ips_with_cluster_policy,
    iptables_localhost_node_ports,
);
image_cases!(image_iptables_legacy: IptablesLegacy =>
    cluster_ip_from_pods_node_and_outside,
    external_traffic_policy_local,
    iptables_localhost_node_ports,
);

fn pod_ip(name: &str, v6: bool) -> &'static str {
    let pod = PODS.iter().find(|p| p.0 == name).unwrap();
    if v6 {
        pod.3
    } else {
        pod.2
    }
}

fn node_of(name: &str) -> &'static str {
    if PODS.iter().find(|p| p.0 == name).unwrap().1 == "a" {
        "node-a"
    } else {
        "node-b"
    }
}

/// A Service (`spec` is YAML lines indented by 2) and one EndpointSlice per family listing
/// `pods` (each ready unless suffixed `:terminating`).
fn service(name: &str, spec: &str, pods: &[&str]) -> String {
    service_on(name, spec, pods, 8080)
}

/// [`service`] with endpoints on `target` (8081: line echo, 8082: byte echo).
fn service_on(name: &str, spec: &str, pods: &[&str], target: u16) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t}}\nspec:\n{spec}\n"
    );
    for (family, v6) in [("IPv4", false), ("IPv6", true)] {
        yaml.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{}\n  namespace: t\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: {family}\nports:\n- {{name: p, port: {target}, protocol: TCP}}\n- {{name: u, port: {target}, protocol: UDP}}\nendpoints:\n",
            family.to_lowercase()
        ));
        for pod in pods {
            let (pod, terminating) = match pod.split_once(':') {
                Some((p, _)) => (p, true),
                None => (*pod, false),
            };
            let conditions = if terminating {
                "{ready: false, serving: true, terminating: true}"
            } else {
                "{ready: true}"
            };
            yaml.push_str(&format!(
                "- {{addresses: [\"{}\"], nodeName: {}, conditions: {conditions}}}\n",
                pod_ip(pod, v6),
                node_of(pod)
            ));
        }
    }
    yaml
}

const PORTS: &str = "  ports:\n  - {name: p, port: 80, targetPort: 8080, protocol: TCP}\n  - {name: u, port: 80, targetPort: 8080, protocol: UDP}";

/// The ports of `PORTS` with NodePorts (for LoadBalancer Services).
const PORTS_NP: &str = "  ports:\n  - {name: p, port: 80, targetPort: 8080, nodePort: 30045, protocol: TCP}\n  - {name: u, port: 80, targetPort: 8080, nodePort: 30045, protocol: UDP}";

/// Whether `ip` is one of node-a's addresses (where userspace mode's relays connect from).
fn is_node_a(ip: std::net::IpAddr) -> bool {
    [
        "192.0.2.10",
        "198.18.1.1",
        "2001:db8:2::10",
        "2001:db8:18:1::1",
    ]
    .iter()
    .any(|a| ipaddr(a) == ip)
}

fn pods(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn cluster_ip_from_pods_node_and_outside(mode: Mode) {
    if !testbed::available() {
        return;
    }
    let mut bed = TestBed::new("cip");
    bed.mode = mode;
    bed.write_manifest(
        "web",
        &service("web", &format!("  clusterIP: 198.19.0.10\n  clusterIPs: [198.19.0.10, \"2001:db8:19::10\"]\n  ipFamilyPolicy: PreferDualStack\n{PORTS}"), &["a1", "a2", "b1"]),
    );
    bed.start_proxy(&[]);
    match mode {
        Mode::Nftables => bed.wait_for_rules("ip", "198.19.0.10 . udp . 80 : 198.18.2.2 . 8080"),
        Mode::Ipvs => bed.wait_for_rules("ip", "-a -u 198.19.0.10:80 -r 198.18.2.2:8080"),
        Mode::Userspace => bed.wait_for_rules("ip", "-d 198.19.0.10/32 -p udp"),
        Mode::UserspaceNft => bed.wait_for_rules("ip", "ip daddr 198.19.0.10 udp dport 80"),
        _ => bed.wait_for_rules("ip", "DNAT --to-destination 198.18.2.2:8080"),
    }
    let vip = sock("198.19.0.10", 80);

    // From a local pod: every endpoint answers, and none is masqueraded.
    let (answered, sources) = bed.tcp_spread("a1", vip, 40);
    let mut expected_pods = pods(&["a1", "a2", "b1"]);
    expected_pods.sort();
    assert_eq!(answered, expected_pods);
    if mode.is_userspace() {
        // The proxy connects to the endpoints itself: they see the node.
        assert!(sources.iter().all(|s| is_node_a(*s)), "{sources:?}");
    } else {
        // a1 reaching itself is hairpin traffic (masqueraded to the bridge address), the
        // others see a1.
        assert!(sources.contains(&ipaddr("198.18.1.2")), "{sources:?}");
        assert!(
            sources
                .iter()
                .all(|s| *s == ipaddr("198.18.1.2") || *s == ipaddr("198.18.1.1")),
            "{sources:?}"
        );
    }

    // UDP to the same ClusterIP.
    let (answered, _) = bed.udp_spread("a2", vip, 40);
    assert_eq!(answered, expected_pods);

    // From outside the cluster (routed to node-a): masqueraded to the node.
    let (answered, sources) = bed.tcp_spread("client", vip, 40);
    assert_eq!(answered, expected_pods);
    assert!(
        !sources.contains(&ipaddr(testbed::CLIENT)),
        "outside traffic to a ClusterIP is masqueraded: {sources:?}"
    );

    // From the node itself.
    let (answered, _) = bed.tcp_spread("node", vip, 40);
    assert_eq!(answered, expected_pods);

    // IPv6 ClusterIP from a pod.
    let (answered, sources) = bed.tcp_spread("a2", sock("2001:db8:19::10", 80), 40);
    assert_eq!(answered, expected_pods);
    if mode.is_userspace() {
        assert!(sources.iter().all(|s| is_node_a(*s)), "{sources:?}");
    } else {
        assert!(sources.contains(&ipaddr("2001:db8:18:1::3")), "{sources:?}");
    }

    // A port the Service does not have is rejected, not dropped (nftables mode, and ipvs
    // mode's KUBE-IPVS-FILTER; upstream's iptables mode has no such rule).
    if matches!(mode, Mode::Nftables | Mode::Ipvs) {
        assert_eq!(
            bed.tcp("a1", sock("198.19.0.10", 81), None),
            Outcome::Refused
        );
    }
}

/// What only iptables mode has: a ClusterIP and NodePort, REJECT without endpoints, a
/// partial sync, and NodePorts on 127.0.0.1 (`--iptables-localhost-nodeports`, default true)
/// from the node, refused once the flag is off.
fn iptables_localhost_node_ports(mode: Mode) {
    if !testbed::available() {
        return;
    }
    let mut bed = TestBed::new("ipt");
    bed.mode = mode;
    bed.write_manifest(
        "web",
        &service(
            "web",
            &format!("  type: NodePort\n  clusterIP: 198.19.0.60\n{PORTS_NP}"),
            &["a1", "a2", "b1"],
        ),
    );
    bed.write_manifest(
        "none",
        &service("none", &format!("  clusterIP: 198.19.0.61\n{PORTS}"), &[]),
    );
    bed.start_proxy(&["--metrics-bind-address=127.0.0.1:10249"]);
    let vip = sock("198.19.0.60", 80);
    let mut expected = pods(&["a1", "a2", "b1"]);
    expected.sort();
    bed.eventually("every endpoint answers", || {
        bed.tcp_spread("a1", vip, 30).0 == expected
    });
    let (answered, sources) = bed.tcp_spread("client", vip, 30);
    assert_eq!(answered, expected);
    assert!(
        !sources.contains(&ipaddr(testbed::CLIENT)),
        "outside traffic is masqueraded: {sources:?}"
    );
    assert_eq!(bed.tcp_spread("node", vip, 30).0, expected);
    let (answered, _) = bed.udp_spread("a2", vip, 30);
    assert_eq!(answered, expected);
    let node_port = sock(testbed::NODE_A, 30045);
    assert_eq!(bed.tcp_spread("client", node_port, 30).0, expected);
    // localhostNodePorts (default true): the node reaches its NodePorts on 127.0.0.1.
    assert_eq!(
        bed.tcp_spread("node", sock("127.0.0.1", 30045), 30).0,
        expected
    );
    // Each of those connections was counted by upstream's nfacct counter (the nat rule sees
    // a connection's first packet). (`iptables-save` prints `--nfacct-name` with two spaces.)
    let text = metrics_of(&bed);
    let accepted = metric(
        &text,
        "kubeproxy_iptables_localhost_nodeports_accepted_packets_total",
    );
    assert!(accepted.is_some_and(|n| n >= 30.0), "{text}");
    assert!(
        metric(
            &text,
            "kubeproxy_iptables_ct_state_invalid_dropped_packets_total"
        )
        .is_some(),
        "{text}"
    );
    assert!(
        bed.ruleset("ip")
            .contains("-m nfacct --nfacct-name  ct_state_invalid_dropped_pkts -j DROP"),
        "{}",
        bed.ruleset("ip")
    );
    assert_eq!(
        bed.tcp("a1", sock("198.19.0.61", 80), None),
        Outcome::Refused
    );
    bed.write_manifest(
        "web",
        &service(
            "web",
            &format!("  type: NodePort\n  clusterIP: 198.19.0.60\n{PORTS_NP}"),
            &["b1"],
        ),
    );
    bed.eventually("only b1 answers", || {
        bed.tcp_spread("a1", vip, 20).0 == pods(&["b1"])
    });
    let saved = bed.ip_netns_exec("node", &[&mode.save_tool("ip"), "-t", "nat"]);
    assert!(
        saved.contains("-j KUBE-SERVICES") && saved.contains("KUBE-SEP-"),
        "{saved}"
    );
    // Without localhostNodePorts, 127.0.0.1 is not a NodePort address.
    bed.start_proxy(&["--iptables-localhost-nodeports=false"]);
    bed.eventually("127.0.0.1 refused", || {
        bed.tcp("node", sock("127.0.0.1", 30045), None) == Outcome::Refused
    });
    assert_eq!(
        bed.tcp("node", sock(testbed::NODE_A, 30045), None).pod(),
        Some("b1")
    );
    assert!(
        !bed.ip_netns_exec("node", &["nft", "list", "tables"])
            .contains("kube-proxy"),
        "no nftables table in iptables mode"
    );
}

fn no_endpoints_rejects_and_endpoint_changes_are_followed(mode: Mode) {
    if !testbed::available() {
        return;
    }
    let mut bed = TestBed::new("chg");
    bed.mode = mode;
    bed.write_manifest(
        "s",
        &service("s", &format!("  clusterIP: 198.19.0.20\n{PORTS}"), &[]),
    );
    bed.start_proxy(&[]);
    bed.wait_for_rules("ip", "198.19.0.20");
    assert_eq!(
        bed.tcp("a1", sock("198.19.0.20", 80), None),
        Outcome::Refused
    );
    assert_eq!(
        bed.udp("a1", sock("198.19.0.20", 80), None),
        Outcome::Refused
    );

    bed.write_manifest(
        "s",
        &service("s", &format!("  clusterIP: 198.19.0.20\n{PORTS}"), &["a2"]),
    );
    bed.eventually("a2 answers", || {
        bed.tcp("a1", sock("198.19.0.20", 80), None).pod() == Some("a2")
    });
    bed.write_manifest(
        "s",
        &service(
            "s",
            &format!("  clusterIP: 198.19.0.20\n{PORTS}"),
            &["a2", "b1"],
        ),
    );
    bed.eventually("b1 answers too", || {
        bed.tcp_spread("a1", sock("198.19.0.20", 80), 20).0 == pods(&["a2", "b1"])
    });
    bed.write_manifest(
        "s",
        &service("s", &format!("  clusterIP: 198.19.0.20\n{PORTS}"), &["b1"]),
    );
    bed.eventually("only b1 answers", || {
        bed.tcp_spread("a1", sock("198.19.0.20", 80), 20).0 == pods(&["b1"])
    });
    // Terminating endpoints are a fallback only.
    bed.write_manifest(
        "s",
        &service(
            "s",
            &format!("  clusterIP: 198.19.0.20\n{PORTS}"),
            &["b1:terminating", "a1:terminating"],
        ),
    );
    bed.eventually("terminating endpoints serve", || {
        bed.tcp_spread("a2", sock("198.19.0.20", 80), 20).0 == pods(&["a1", "b1"])
    });
    bed.remove_manifest("s");
    bed.eventually("the service is gone", || {
        !bed.ruleset("ip").contains("198.19.0.20")
    });
    // Every change went in as a partial sync: none was rejected (iptables mode deletes the
    // rules of its static chains that changed by their spec).
    let log = bed.proxy_log();
    assert!(!log.contains("Sync failed"), "{log}");
    assert!(log.contains("full=false"), "{log}");
}

fn source_of(outcome: &Outcome) -> Option<std::net::IpAddr> {
    match outcome {
        Outcome::Answered { source, .. } => Some(*source),
        _ => None,
    }
}

fn node_port_and_external_ips_with_cluster_policy(mode: Mode) {
    if !testbed::available() {
        return;
    }
    let mut bed = TestBed::new("npc");
    bed.mode = mode;
    let spec = "  type: NodePort\n  clusterIP: 198.19.0.30\n  clusterIPs: [198.19.0.30, \"2001:db8:19::30\"]\n  ipFamilyPolicy: PreferDualStack\n  externalIPs: [198.51.100.10]\n  ports:\n  - {name: p, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}\n  - {name: u, port: 80, targetPort: 8080, nodePort: 30080, protocol: UDP}";
    bed.write_manifest("np", &service("np", spec, &["a1", "b1"]));
    bed.start_proxy(&[]);
    bed.wait_for_rules("ip", "198.51.100.10");
    bed.wait_for_rules("ip6", "2001:db8:19::30");
    let both = pods(&["a1", "b1"]);
    let client = ipaddr(testbed::CLIENT);

    let (answered, sources) = bed.tcp_spread("client", sock(testbed::NODE_A, 30080), 30);
    assert_eq!(answered, both);
    assert!(
        !sources.contains(&client),
        "eTP Cluster masquerades: {sources:?}"
    );
    let (answered, _) = bed.udp_spread("client", sock(testbed::NODE_A, 30080), 30);
    assert_eq!(answered, both);
    let (answered, sources) = bed.tcp_spread("client", sock("198.51.100.10", 80), 30);
    assert_eq!(answered, both);
    assert!(!sources.contains(&client), "{sources:?}");
    let (answered, _) = bed.tcp_spread("client", sock(testbed::NODE_A6, 30080), 30);
    assert_eq!(answered, both, "IPv6 NodePort");
    // A pod reaching the NodePort of its own node.
    let (answered, _) = bed.tcp_spread("a2", sock(testbed::NODE_A, 30080), 30);
    assert_eq!(answered, both);
}

fn external_traffic_policy_local(mode: Mode) {
    if !testbed::available() {
        return;
    }
    let mut bed = TestBed::new("etp");
    bed.mode = mode;
    let spec = |ingress: &str| {
        format!("  type: LoadBalancer\n  clusterIP: 198.19.0.40\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  ports:\n  - {{name: p, port: 80, targetPort: 8080, nodePort: 30040, protocol: TCP}}\n  - {{name: u, port: 80, targetPort: 8080, nodePort: 30040, protocol: UDP}}\nstatus:\n  loadBalancer:\n    ingress: [{{ip: {ingress}}}]")
    };
    bed.write_manifest("lb", &service("lb", &spec("198.51.100.40"), &["a1", "b1"]));
    bed.start_proxy(&[]);
    bed.wait_for_rules("ip", "198.51.100.40");
    let lb = sock("198.51.100.40", 80);
    let client = ipaddr(testbed::CLIENT);

    if mode.is_userspace() {
        // The relay for external frontends has the local endpoints only; every client is
        // relayed from the node (no client IP kept), pods and the node included.
        for from in ["client", "a2", "node"] {
            let (answered, sources) = bed.tcp_spread(from, lb, 20);
            assert_eq!(answered, pods(&["a1"]), "from {from}");
            assert!(sources.iter().all(|s| is_node_a(*s)), "{sources:?}");
        }
        assert_eq!(
            bed.tcp_spread("client", sock(testbed::NODE_A, 30040), 20).0,
            pods(&["a1"])
        );
        assert_eq!(bed.udp_spread("client", lb, 20).0, pods(&["a1"]));
        // No local endpoint left: the external listener refuses (nothing to relay to);
        // the ClusterIP still reaches b1.
        bed.write_manifest("lb", &service("lb", &spec("198.51.100.40"), &["b1"]));
        bed.eventually("refused without a local endpoint", || {
            bed.tcp("client", lb, None) == Outcome::Refused
        });
        assert_eq!(
            bed.tcp("client", sock(testbed::NODE_A, 30040), None),
            Outcome::Refused
        );
        assert_eq!(
            bed.tcp_spread("a2", sock("198.19.0.40", 80), 10).0,
            pods(&["b1"])
        );
        bed.write_manifest("lb", &service("lb", &spec("198.51.100.40"), &[]));
        bed.eventually("rejected", || {
            bed.tcp("a2", sock("198.19.0.40", 80), None) == Outcome::Refused
        });
        return;
    }

    // Outside clients reach only the local endpoint, and their address is preserved.
    let (answered, sources) = bed.tcp_spread("client", lb, 30);
    assert_eq!(answered, pods(&["a1"]));
    assert_eq!(sources, vec![client], "client IP preserved");
    let (answered, sources) = bed.tcp_spread("client", sock(testbed::NODE_A, 30040), 30);
    assert_eq!(answered, pods(&["a1"]));
    assert_eq!(sources, vec![client]);
    let (answered, _) = bed.udp_spread("client", lb, 20);
    assert_eq!(answered, pods(&["a1"]));
    if mode == Mode::Ipvs {
        // Upstream's ipvs mode has one virtual server for every client: pods and the node
        // reach the local endpoint only, unmasqueraded (no short-circuit).
        let (answered, sources) = bed.tcp_spread("a2", lb, 30);
        assert_eq!(answered, pods(&["a1"]));
        assert_eq!(sources, vec![ipaddr("198.18.1.3")]);
        assert_eq!(bed.tcp_spread("node", lb, 20).0, pods(&["a1"]));
    } else {
        // Pods short-circuit to every endpoint, unmasqueraded.
        let (answered, sources) = bed.tcp_spread("a2", lb, 30);
        assert_eq!(answered, pods(&["a1", "b1"]));
        assert_eq!(sources, vec![ipaddr("198.18.1.3")]);
        // The node itself too, masqueraded.
        let (answered, sources) = bed.tcp_spread("node", lb, 30);
        assert_eq!(answered, pods(&["a1", "b1"]));
        assert!(
            sources
                .iter()
                .all(|s| *s == ipaddr("198.18.1.1") || *s == ipaddr(testbed::NODE_A)),
            "{sources:?}"
        );
    }

    // No local endpoint left: outside clients are dropped, pods still get b1. (ipvs mode
    // sends outside clients to b1 too, unmasqueraded: b1's answer leaves from its own
    // address and never reaches the client as the load balancer's, so they time out all
    // the same.)
    bed.write_manifest("lb", &service("lb", &spec("198.51.100.40"), &["b1"]));
    // Wait on the kernel state: sampling connections could see only b1 by chance too early.
    match mode {
        Mode::Ipvs => {
            bed.wait_for_rules("ip", "-a -t 198.51.100.40:80 -r 198.18.2.2:8080");
            // a1 drains: weight 0 while its closed connections linger in IPVS's table.
            bed.eventually("a1 drained or gone", || {
                let rules = bed.ruleset("ip");
                !rules.contains("-r 198.18.1.2:8080 -m -w 1")
            });
        }
        Mode::IptablesNft | Mode::IptablesLegacy => {
            // iptables-restore commits filter, then nat: wait for both.
            bed.wait_for_rules("ip", "t/lb:p has no local endpoints");
            bed.eventually("a1's endpoint chain gone", || {
                !bed.ruleset("ip").contains("198.18.1.2:8080")
            });
        }
        Mode::Nftables => {
            bed.wait_for_element("ip", "no-endpoint-drop", "198.51.100.40 . tcp . 80")
        }
        Mode::Userspace | Mode::UserspaceNft => unreachable!("returned above"),
    }
    assert_eq!(
        bed.tcp_spread("a2", lb, 20).0,
        pods(&["b1"]),
        "pods reach only b1"
    );
    assert_eq!(
        bed.tcp("client", lb, None),
        Outcome::Timeout,
        "dropped, not rejected"
    );
    assert_eq!(
        bed.tcp("client", sock(testbed::NODE_A, 30040), None),
        Outcome::Timeout
    );
    // No endpoint at all: rejected.
    bed.write_manifest("lb", &service("lb", &spec("198.51.100.40"), &[]));
    bed.eventually("rejected", || {
        bed.tcp("client", lb, None) == Outcome::Refused
    });
    assert_eq!(
        bed.tcp("client", sock(testbed::NODE_A, 30040), None),
        Outcome::Refused
    );
    assert_eq!(
        bed.tcp("a2", sock("198.19.0.40", 80), None),
        Outcome::Refused
    );
}

fn internal_traffic_policy_local(mode: Mode) {
    if !testbed::available() {
        return;
    }
    let mut bed = TestBed::new("itp");
    bed.mode = mode;
    let spec = format!("  clusterIP: 198.19.0.50\n  internalTrafficPolicy: Local\n{PORTS}");
    bed.write_manifest("itp", &service("itp", &spec, &["a1", "b1"]));
    bed.start_proxy(&[]);
    bed.wait_for_rules("ip", "198.19.0.50");
    let vip = sock("198.19.0.50", 80);
    assert_eq!(bed.tcp_spread("a2", vip, 20).0, pods(&["a1"]));
    assert_eq!(bed.udp_spread("a2", vip, 20).0, pods(&["a1"]));
    bed.write_manifest("itp", &service("itp", &spec, &["b1"]));
    // Upstream's ipvs mode falls back to the cluster's endpoints, which a ClusterIP-only
    // Service with iTP Local does not compute: its virtual server has none and refuses.
    // userspace mode's listener has no endpoint to relay to: it refuses too.
    let without_local = match mode {
        Mode::Ipvs | Mode::Userspace | Mode::UserspaceNft => Outcome::Refused,
        _ => Outcome::Timeout,
    };
    bed.eventually("dropped without a local endpoint", || {
        bed.tcp("a2", vip, None) == without_local
    });
    bed.write_manifest("itp", &service("itp", &spec, &[]));
    bed.eventually("rejected without any endpoint", || {
        bed.tcp("a2", vip, None) == Outcome::Refused
    });
}

fn client_ip_session_affinity(mode: Mode) {
    if !testbed::available() {
        return;
    }
    let mut bed = TestBed::new("aff");
    bed.mode = mode;
    let spec = format!("  clusterIP: 198.19.0.60\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 300}}}}\n{PORTS}");
    bed.write_manifest("aff", &service("aff", &spec, &["a1", "a2", "b1"]));
    bed.start_proxy(&[]);
    bed.wait_for_rules("ip", "198.19.0.60");
    let vip = sock("198.19.0.60", 80);
    for from in ["a2", "client", "node"] {
        let (answered, _) = bed.tcp_spread(from, vip, 15);
        assert_eq!(
            answered.len(),
            1,
            "{from} sticks to one endpoint: {answered:?}"
        );
    }
    // Without affinity the same clients spread over all endpoints (the control).
    bed.write_manifest(
        "aff",
        &service(
            "aff",
            &format!("  clusterIP: 198.19.0.60\n{PORTS}"),
            &["a1", "a2", "b1"],
        ),
    );
    bed.eventually("spread again", || {
        bed.tcp_spread("a2", vip, 30).0.len() == 3
    });
}

fn load_balancer_source_ranges(mode: Mode) {
    if !testbed::available() {
        return;
    }
    let mut bed = TestBed::new("lbr");
    bed.mode = mode;
    let spec = "  type: LoadBalancer\n  clusterIP: 198.19.0.70\n  loadBalancerSourceRanges: [203.0.113.0/25]\n  ports:\n  - {name: p, port: 80, targetPort: 8080, nodePort: 30070, protocol: TCP}\nstatus:\n  loadBalancer:\n    ingress: [{ip: 198.51.100.70}]";
    bed.write_manifest("lbr", &service("lbr", spec, &["a1"]));
    bed.start_proxy(&[]);
    bed.wait_for_rules("ip", "198.51.100.70");
    let lb = sock("198.51.100.70", 80);
    assert_eq!(
        bed.tcp("client", lb, Some(ipaddr(testbed::CLIENT))).pod(),
        Some("a1"),
        "inside the range"
    );
    assert_eq!(
        bed.tcp("client", lb, Some(ipaddr(testbed::CLIENT_OUT_OF_RANGE))),
        Outcome::Timeout,
        "outside: dropped"
    );
    if mode == Mode::Ipvs {
        // The node is in no range: its own connections to the load balancer are dropped
        // (KUBE-IPVS-OUT-FILTER; they leave from the LB IP on kube-ipvs0).
        assert_eq!(bed.tcp("node", lb, None), Outcome::Timeout);
    }
    // NodePorts are not subject to source ranges.
    assert_eq!(
        bed.tcp(
            "client",
            sock(testbed::NODE_A, 30070),
            Some(ipaddr(testbed::CLIENT_OUT_OF_RANGE))
        )
        .pod(),
        Some("a1")
    );
}

fn masquerading_under_each_local_traffic_detector(mode: Mode) {
    if !testbed::available() {
        return;
    }
    let mut bed = TestBed::new("msq");
    bed.mode = mode;
    // b1 (remote) shows whether pod traffic is masqueraded; a2 (local) whether the node's is.
    bed.write_manifest(
        "remote",
        &service(
            "remote",
            &format!("  clusterIP: 198.19.0.80\n{PORTS}"),
            &["b1"],
        ),
    );
    bed.write_manifest(
        "local",
        &service(
            "local",
            &format!("  clusterIP: 198.19.0.81\n{PORTS}"),
            &["a2"],
        ),
    );
    let pod = ipaddr("198.18.1.2");
    let node_masqueraded = ipaddr("198.18.1.1");
    let cases: &[(&[&str], bool, bool)] = &[
        // (flags, pod traffic masqueraded, node traffic masqueraded)
        (
            &["--cluster-cidr=198.18.0.0/16,2001:db8:18::/48"],
            false,
            true,
        ),
        (
            &[
                "--cluster-cidr=198.18.0.0/16,2001:db8:18::/48",
                "--masquerade-all",
            ],
            true,
            true,
        ),
        (&["--detect-local-mode=NodeCIDR"], false, true),
        (
            &[
                "--detect-local-mode=BridgeInterface",
                "--pod-bridge-interface=br0",
            ],
            false,
            true,
        ),
        (
            &[
                "--detect-local-mode=InterfaceNamePrefix",
                "--pod-interface-name-prefix=br",
            ],
            false,
            true,
        ),
        // No detector (ClusterCIDR mode without a CIDR): nothing is masqueraded (but in
        // ipvs mode, see below).
        (&["--detect-local-mode=ClusterCIDR"], false, false),
    ];
    for (flags, pod_masq, node_masq) in cases {
        // Upstream's ipvs mode without a detector masquerades connections whose source is a
        // service address: the node's own, which pick the ClusterIP on kube-ipvs0 as source.
        let node_masq = &(*node_masq
            || (mode == Mode::Ipvs
                && flags.len() == 1
                && flags[0] == "--detect-local-mode=ClusterCIDR"));
        bed.start_proxy(flags);
        bed.wait_for_rules("ip", "198.19.0.81");
        let from_pod =
            source_of(&bed.tcp("a1", sock("198.19.0.80", 80), None)).expect("pod reaches b1");
        assert_eq!(
            from_pod != pod,
            *pod_masq,
            "{flags:?}: pod traffic seen as {from_pod}\n{}\n{}",
            bed.proxy_log(),
            bed.ruleset("ip")
        );
        let from_node =
            source_of(&bed.tcp("node", sock("198.19.0.81", 80), None)).expect("node reaches a2");
        assert_eq!(
            from_node == node_masqueraded,
            *node_masq,
            "{flags:?}: node traffic seen as {from_node}"
        );
    }
}

fn sctp_services_are_programmed(mode: Mode) {
    if !testbed::available() {
        return;
    }
    let mut bed = TestBed::new("sct");
    bed.mode = mode;
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: t}\nspec:\n  type: NodePort\n  clusterIP: 198.19.0.90\n  ports: [{name: s, port: 9000, nodePort: 30900, protocol: SCTP}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s-1, namespace: t, labels: {kubernetes.io/service-name: s}}\naddressType: IPv4\nports: [{name: s, port: 9000, protocol: SCTP}]\nendpoints: [{addresses: [198.18.1.2], nodeName: node-a}]\n";
    bed.write_manifest("s", yaml);
    bed.start_proxy(&[]);
    // This kernel has no SCTP sockets to send traffic with; the kernel accepting the rules is
    // what can be proven here.
    if mode == Mode::Ipvs {
        bed.wait_for_rules("ip", "--sctp-service 198.19.0.90:9000 -r 198.18.1.2:9000");
        bed.wait_for_rules("ip", "--sctp-service 192.0.2.10:30900 -r 198.18.1.2:9000");
        bed.wait_for_rules("ip", "KUBE-NODE-PORT-SCTP-HASH dst,dst -j KUBE-MARK-MASQ");
    } else if mode.is_iptables() {
        bed.wait_for_rules("ip", "-m sctp --dport 30900 -j KUBE-EXT-");
        bed.wait_for_rules("ip", "-m sctp -j DNAT --to-destination 198.18.1.2:9000");
    } else {
        bed.wait_for_rules("ip", "198.19.0.90 . sctp . 9000 : 198.18.1.2 . 9000");
        bed.wait_for_rules("ip", "sctp . 30900 : 198.18.1.2 . 9000");
    }
    assert!(
        !bed.proxy_log().contains("Sync failed"),
        "{}",
        bed.proxy_log()
    );
}

/// Serves `fake` inside node-a's namespace and starts the proxy against it through a
/// kubeconfig, with `args` after `--kubeconfig K`; returns the kubeconfig's path.
fn start_against_fake_api(
    bed: &mut TestBed,
    fake: &std::sync::Arc<std::sync::Mutex<fakeapi::Fake>>,
    args: &[&str],
) -> std::path::PathBuf {
    let listener = bind_in_node(bed, 0);
    let url = fakeapi::serve_on(fake.clone(), listener);
    start_with_kubeconfig(bed, &url, args)
}

/// A TCP listener on 127.0.0.1:`port` inside node-a's namespace (0: any port).
fn bind_in_node(bed: &TestBed, port: u16) -> std::net::TcpListener {
    testbed::in_netns(&bed.ns("node"), move || {
        std::net::TcpListener::bind(("127.0.0.1", port)).unwrap()
    })
}

/// Writes a kubeconfig for `url` and starts the proxy with it and `args`.
fn start_with_kubeconfig(bed: &mut TestBed, url: &str, args: &[&str]) -> std::path::PathBuf {
    let kubeconfig = std::env::temp_dir().join(format!("{}-kubeconfig", bed.prefix));
    std::fs::write(
        &kubeconfig,
        format!("apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"{url}\"}}}}]\nusers: [{{name: fake, user: {{}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\ncurrent-context: fake\n"),
    )
    .unwrap();
    let mut all = vec!["--kubeconfig".to_string(), kubeconfig.display().to_string()];
    all.extend(args.iter().map(|s| s.to_string()));
    bed.start_proxy_with(&all);
    kubeconfig
}

/// The command line of the issue, against an API server (the fake list/watch server, bound
/// inside node-a's namespace): the proxy lists and watches, programs the kernel, and traffic
/// flows.
/// In iptables mode on the nf_tables backend the flags name no mode at all (upstream's
/// default, as kubeadm's `mode: ""`); on the legacy backend `--proxy-mode iptables`.
fn upstream_command_line_against_an_api_server(mode: Mode) {
    if !testbed::available() {
        return;
    }
    let mut bed = TestBed::new("api");
    bed.mode = mode;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();
    let fake = std::sync::Arc::new(std::sync::Mutex::new(fakeapi::Fake::default()));
    {
        let mut f = fake.lock().unwrap();
        let svc = serde_json::json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "t", "resourceVersion": "3"},
            "spec": {"clusterIP": "198.19.0.100", "ports": [{"name": "p", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}});
        f.service_lists.push_back(("3".into(), vec![svc]));
        f.slices = vec![
            serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "t", "resourceVersion": "4", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["198.18.1.2"], "nodeName": "node-a"}, {"addresses": ["198.18.2.2"], "nodeName": "node-b"}]}),
        ];
        f.nodes = vec![
            serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "resourceVersion": "5"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}]}}),
        ];
    }
    let mode_flags: &[&str] = match mode {
        Mode::Nftables => &["--proxy-mode", "nftables"],
        Mode::IptablesNft => &[],
        Mode::IptablesLegacy => &["--proxy-mode", "iptables"],
        Mode::Ipvs => &["--proxy-mode", "ipvs"],
        Mode::Userspace | Mode::UserspaceNft => &["--proxy-mode", "userspace"],
    };
    let mut flags = vec!["--hostname-override", "node-a"];
    flags.extend_from_slice(mode_flags);
    flags.extend_from_slice(&[
        "--cluster-cidr",
        "198.18.0.0/16",
        "--healthz-bind-address",
        "0.0.0.0:10256",
        "--metrics-bind-address",
        "127.0.0.1:10249",
        "--conntrack-max-per-core=0",
        "-v=2",
    ]);
    let kubeconfig = start_against_fake_api(&mut bed, &fake, &flags);
    assert_eq!(
        bed.tcp_spread("a2", sock("198.19.0.100", 80), 30).0,
        pods(&["a1", "b1"]),
        "{}",
        bed.proxy_log()
    );
    let log = bed.proxy_log();
    assert!(
        !log.lines().any(|l| l.starts_with('E')),
        "no error logged:\n{log}"
    );
    let requests = fake.lock().unwrap().requests.clone();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("/api/v1/services?") && r.contains("watch=true")),
        "{requests:?}"
    );
    let _ = std::fs::remove_file(kubeconfig);
}

/// A Service `name` at `ip` with ports 80 → 8080 (the "who are you" server) and 81 → 8081
/// (the line-echo server), NodePorts `node_port` and `node_port + 1` unless 0, and its IPv4
/// slice listing `pods`, as API objects with resourceVersion `rv`.
fn api_service(
    name: &str,
    ip: &str,
    node_port: u16,
    pods: &[&str],
    rv: u64,
) -> (serde_json::Value, serde_json::Value) {
    let mut ports = serde_json::json!([
        {"name": "p", "port": 80, "targetPort": 8080, "protocol": "TCP"},
        {"name": "e", "port": 81, "targetPort": 8081, "protocol": "TCP"}]);
    let mut spec = serde_json::json!({"clusterIP": ip});
    if node_port != 0 {
        ports[0]["nodePort"] = node_port.into();
        ports[1]["nodePort"] = (node_port + 1).into();
        spec["type"] = "NodePort".into();
    }
    spec["ports"] = ports;
    let service = serde_json::json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "t", "resourceVersion": rv.to_string()},
        "spec": spec});
    let endpoints: Vec<serde_json::Value> = pods
        .iter()
        .map(|p| serde_json::json!({"addresses": [pod_ip(p, false)], "nodeName": node_of(p)}))
        .collect();
    let slice = serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "namespace": "t", "resourceVersion": rv.to_string(),
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}, {"name": "e", "port": 8081, "protocol": "TCP"}],
        "endpoints": endpoints});
    (service, slice)
}

/// The API server goes away (listener closed, every watch cut) for `KP_OUTAGE_SECONDS`
/// (default 15; the issue's 60 s scaled down: the watches' backoff has grown to 12.8 s by
/// then, so without the reachability probe they would wait ~10 s more). Meanwhile the rules
/// stay, established and new connections to every Service work and `/livez` stays 200. The
/// server comes back on the same address as a restarted API server does: its lists carry what
/// changed during the outage (a new Service, an endpoint added) and watches from older
/// versions are answered `410 Expired`. Measured: time from the server answering to the new
/// Service in the kernel and to it answering; then a change through the resumed watch.
fn api_server_outage_keeps_traffic_and_recovers(mode: Mode) {
    if !testbed::available() {
        return;
    }
    let outage = Duration::from_secs(
        std::env::var("KP_OUTAGE_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(15),
    );
    let mut bed = TestBed::new("outage");
    bed.mode = mode;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();
    let fake = std::sync::Arc::new(std::sync::Mutex::new(fakeapi::Fake::default()));
    let (web, web_slice) = api_service("web", "198.19.0.120", 0, &["a1"], 10);
    let (np, np_slice) = api_service("np", "198.19.0.121", 30121, &["b1"], 11);
    {
        let mut f = fake.lock().unwrap();
        f.service_lists
            .push_back(("12".into(), vec![web.clone(), np.clone()]));
        f.slices = vec![web_slice, np_slice.clone()];
        f.nodes = vec![serde_json::json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-a", "resourceVersion": "5"},
            "status": {"addresses": [{"type": "InternalIP", "address": testbed::NODE_A}]}})];
    }
    let listener = bind_in_node(&bed, 0);
    let port = listener.local_addr().unwrap().port();
    let server = fakeapi::serve_stoppable(fake.clone(), listener);
    let kubeconfig = start_with_kubeconfig(
        &mut bed,
        &server.url,
        &[
            "--hostname-override=node-a",
            "--proxy-mode",
            mode.proxy_mode(),
            "--cluster-cidr=198.18.0.0/16",
            "--healthz-bind-address=0.0.0.0:10256",
            "--metrics-bind-address=",
            "--conntrack-max-per-core=0",
            "-v=2",
        ],
    );
    let web_addr = sock("198.19.0.120", 80);
    let np_addr = sock(testbed::NODE_A, 30121);
    assert_eq!(bed.tcp_spread("a2", web_addr, 10).0, pods(&["a1"]));
    assert_eq!(bed.tcp("client", np_addr, None).pod(), Some("b1"));
    let mut established_web = bed.connect("a2", sock("198.19.0.120", 81));
    let mut established_np = bed.connect("client", sock(testbed::NODE_A, 30122));
    assert_eq!(established_web.exchange("hello").unwrap(), "a1 hello");
    assert_eq!(established_np.exchange("hello").unwrap(), "b1 hello");

    // Down: during the outage a Service is created and web gains an endpoint.
    server.stop();
    let down = std::time::Instant::now();
    let (late, late_slice) = api_service("late", "198.19.0.122", 0, &["a1"], 100);
    let (web, web_slice) = api_service("web", "198.19.0.120", 0, &["a1", "b1"], 101);
    {
        let mut f = fake.lock().unwrap();
        f.service_lists
            .push_back(("102".into(), vec![web, np, late]));
        f.slices = vec![web_slice, np_slice, late_slice];
        f.expired_below = 100;
        f.list_version = Some("102".into());
    }
    let livez = sock(testbed::NODE_A, 10256);
    let mut checks = 0;
    while down.elapsed() < outage {
        assert_eq!(
            established_web.exchange("still").unwrap(),
            "a1 still",
            "an established connection to a ClusterIP survives the outage"
        );
        assert_eq!(established_np.exchange("still").unwrap(), "b1 still");
        assert_eq!(bed.tcp("a2", web_addr, None).pod(), Some("a1"));
        assert_eq!(bed.tcp("client", np_addr, None).pod(), Some("b1"));
        let (status, _, body) = http_get_path_from(&bed, "node", livez, "/livez").unwrap();
        assert_eq!(
            status, 200,
            "/livez stays healthy while nothing is pending: {body}"
        );
        checks += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = bed.proxy_log();
    assert!(
        log.contains("List failed; retrying with backoff")
            || log.contains("Watch failed; resuming with backoff"),
        "the watches back off and log:\n{log}"
    );

    // Up again, on the same address.
    let listener = bind_in_node(&bed, port);
    let up = std::time::Instant::now();
    let _server = fakeapi::serve_stoppable(fake.clone(), listener);
    let late_text = match mode {
        Mode::Nftables => "198.19.0.122 . tcp . 80",
        Mode::UserspaceNft => "ip daddr 198.19.0.122 ",
        _ => "-d 198.19.0.122/32",
    };
    let mut in_kernel = None;
    while up.elapsed() < Duration::from_secs(30) {
        if bed.ruleset("ip").contains(late_text) {
            in_kernel = Some(up.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let in_kernel = in_kernel.unwrap_or_else(|| {
        panic!(
            "the Service created during the outage never reached the kernel\n{}",
            bed.proxy_log()
        )
    });
    let mut answering = None;
    while up.elapsed() < Duration::from_secs(30) {
        if bed.tcp("a2", sock("198.19.0.122", 80), None).pod() == Some("a1") {
            answering = Some(up.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let answering = answering.expect("the new Service answers");
    bed.eventually("web's endpoint added during the outage", || {
        bed.tcp_spread("a2", web_addr, 30).0 == pods(&["a1", "b1"])
    });
    // A change through the resumed watch.
    let (after, after_slice) = api_service("after", "198.19.0.123", 0, &["b1"], 103);
    let written = std::time::Instant::now();
    {
        let mut f = fake.lock().unwrap();
        f.push_event(
            "/apis/discovery.k8s.io/v1/endpointslices",
            &serde_json::json!({"type": "ADDED", "object": after_slice}),
        );
        f.push_event(
            "/api/v1/services",
            &serde_json::json!({"type": "ADDED", "object": after}),
        );
    }
    bed.eventually("a Service written after the return", || {
        bed.tcp("a2", sock("198.19.0.123", 80), None).pod() == Some("b1")
    });
    let after_latency = written.elapsed();
    assert_eq!(
        established_web
            .exchange("after")
            .unwrap()
            .split_whitespace()
            .nth(1),
        Some("after")
    );
    let log = bed.proxy_log();
    let relists = log.matches("Relisting objects").count();
    println!(
        "{mode:?}: outage {outage:?} ({checks} rounds of checks passed), the server answering \
         → the Service written meanwhile in the kernel {in_kernel:?}, answering {answering:?}; \
         a Service written after the return answering {after_latency:?} (minSyncPeriod 1 s after \
         the relist's sync); {relists} relists"
    );
    assert!(
        log.contains("The API server answers again; resuming at once"),
        "the probe ended the backoff:\n{log}"
    );
    // The target is 1 s; the bound leaves room for a noisy machine and still fails when the
    // backoff holds the watches (≥ 9 s here).
    assert!(
        in_kernel < Duration::from_secs(4),
        "the change made during the outage took {in_kernel:?} after the server answered:\n{log}"
    );
    let _ = std::fs::remove_file(kubeconfig);
}

/// Someone else edits our rules: first a small edit (one element of a map deleted in
/// nftables mode; one rule deleted from `KUBE-SERVICES` in iptables mode), then a big one
/// (`nft flush table ip kube-proxy`; `iptables -t nat -F KUBE-SERVICES`). Each time `explain
/// --check` reports the drift, the periodic check (`--iptables-sync-period 2s` here, which
/// every mode takes; the nftables mode lists its table, the iptables mode counts the rules of
/// the chains only it writes)
/// repairs it and logs why, and the Service answers again; the repair time is printed.
fn foreign_edits_are_found_repaired_and_logged(mode: Mode) {
    if !testbed::available() {
        return;
    }
    let mut bed = TestBed::new("edit");
    bed.mode = mode;
    let spec = format!("  clusterIP: 198.19.0.140\n{PORTS}");
    bed.write_manifest("rep", &service("rep", &spec, &["a1", "b1"]));
    bed.start_proxy(&["--iptables-sync-period=2s"]);
    let vip = sock("198.19.0.140", 80);
    let from = ipaddr(pod_ip("a2", false));
    assert_eq!(bed.tcp_spread("a2", vip, 20).0, pods(&["a1", "b1"]));
    let checked = bed.explain(from, vip, "tcp", true);
    assert_eq!(checked["check"]["drift"], false, "{checked:#}");

    // The small edit.
    let tool = mode.save_tool("ip").replace("-save", "");
    match mode {
        Mode::Nftables => bed
            .ip_netns_exec_checked(
                "node",
                &[
                    "nft",
                    "delete element ip kube-proxy backends-0 { 198.19.0.140 . tcp . 80 }",
                ],
            )
            .unwrap(),
        _ => {
            let save = bed.ruleset("ip");
            let rule = save
                .lines()
                .find(|l| {
                    l.starts_with("-A KUBE-SERVICES")
                        && l.contains("198.19.0.140/32")
                        && l.contains("-p tcp")
                })
                .unwrap_or_else(|| panic!("no KUBE-SERVICES rule for the Service:\n{save}"))
                .replacen("-A ", "-D ", 1);
            let mut words = vec![tool.clone(), "-t".into(), "nat".into()];
            words.extend(kube_proxy::explain::split_args(&rule));
            let words: Vec<&str> = words.iter().map(String::as_str).collect();
            bed.ip_netns_exec_checked("node", &words).unwrap()
        }
    };
    let big_nft = ["nft", "flush table ip kube-proxy"];
    let big_iptables = [tool.as_str(), "-t", "nat", "-F", "KUBE-SERVICES"];
    for (what, edit) in [
        ("small", None),
        (
            "big",
            Some(if mode == Mode::Nftables {
                &big_nft[..]
            } else {
                &big_iptables[..]
            }),
        ),
    ] {
        if let Some(edit) = edit {
            bed.ip_netns_exec_checked("node", edit).unwrap();
        }
        let edited = std::time::Instant::now();
        let checked = bed.explain(from, vip, "tcp", true);
        let drift = checked["check"]["drift"] == true;
        let mut repaired = None;
        while edited.elapsed() < Duration::from_secs(20) {
            let checked = bed.explain(from, vip, "tcp", true);
            if checked["check"]["drift"] == false {
                repaired = Some(edited.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let repaired = repaired
            .unwrap_or_else(|| panic!("the {what} edit was never repaired\n{}", bed.proxy_log()));
        assert_eq!(
            bed.tcp_spread("a2", vip, 20).0,
            pods(&["a1", "b1"]),
            "after the {what} edit"
        );
        println!("{mode:?}: {what} foreign edit: explain --check saw the drift: {drift}; repaired after {repaired:?}");
        assert!(
            drift || repaired < Duration::from_millis(300),
            "explain --check did not see the {what} edit"
        );
    }
    let log = bed.proxy_log();
    let expected = match mode {
        Mode::Nftables => "differed from what this proxy wrote",
        _ => "someone else changed it",
    };
    // On a busy machine the legacy backend's check can meet the xtables lock held by another
    // test's restore: the sync then fails, is logged as such and retried in full, which
    // repairs the edit just the same.
    let failed_checks = log
        .matches("Sync failed; will retry with a full sync")
        .count();
    assert!(
        log.matches(expected).count() + failed_checks >= 2,
        "both repairs logged:\n{log}"
    );
}

/// 10k invalid objects mixed with 10k valid ones through the API server: invalid cluster
/// IPs, ports, protocols, names, two IP families in one address, 1250 Services claiming one
/// external IP and port, empty slices and slices with invalid or duplicated endpoints. The
/// proxy does not crash, programs every valid Service (all counted in the kernel, a sample
/// answers), and warns about each invalid object at most once, rate-limited, with a summary
/// of the rest: never a log storm.
fn invalid_objects_among_valid_ones(mode: Mode) {
    if !testbed::available() {
        return;
    }
    const VALID: usize = 10_000;
    const INVALID: usize = 10_000;
    let mut bed = TestBed::new("junk");
    bed.mode = mode;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();
    let fake = std::sync::Arc::new(std::sync::Mutex::new(fakeapi::Fake::default()));
    let ip = |i: usize| format!("198.19.{}.{}", 100 + i / 250, 1 + i % 250);
    let svc = |name: &str, spec: serde_json::Value| {
        serde_json::json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "t", "resourceVersion": "3"}, "spec": spec})
    };
    let slice = |name: &str, service: &str, endpoints: serde_json::Value| {
        serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "t", "resourceVersion": "4",
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints})
    };
    let port =
        serde_json::json!([{"name": "p", "port": 80, "targetPort": 8080, "protocol": "TCP"}]);
    let good = serde_json::json!([{"addresses": ["198.18.1.2"], "nodeName": "node-a"},
                                  {"addresses": ["198.18.2.2"], "nodeName": "node-b"}]);
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for i in 0..VALID {
        let name = format!("v{i}");
        services.push(svc(
            &name,
            serde_json::json!({"clusterIP": ip(i), "ports": port}),
        ));
        slices.push(slice(&format!("{name}-1"), &name, good.clone()));
    }
    for i in 0..INVALID {
        let name = format!("x{i}");
        let valid = format!("v{}", i % VALID);
        match i % 8 {
            0 => services.push(svc(
                &name,
                serde_json::json!({"clusterIP": "not-an-ip", "ports": port}),
            )),
            1 => services.push(svc(
                &name,
                serde_json::json!({"clusterIP": "198.19.99.1",
                "ports": [{"name": "p", "port": 70000, "protocol": "TCP"}]}),
            )),
            2 => services.push(svc(
                &name,
                serde_json::json!({"clusterIP": "198.19.99.2",
                "ports": [{"name": "p", "port": 80, "protocol": "ICMP"}]}),
            )),
            3 => services.push(svc(
                &format!("{}{i}", "x".repeat(300)),
                serde_json::json!({"clusterIP": "198.19.99.3", "ports": port}),
            )),
            4 => services.push(svc(
                &name,
                serde_json::json!({"clusterIP": "2001:db8::zz", "ports": port}),
            )),
            5 => services.push(svc(
                &name,
                serde_json::json!({"clusterIP": format!("198.19.98.{}", i % 250),
                "externalIPs": ["198.51.100.9"], "ports": port}),
            )),
            6 => slices.push(slice(
                &format!("{valid}-{name}"),
                &valid,
                serde_json::json!([]),
            )),
            _ => slices.push(slice(
                &format!("{valid}-{name}"),
                &valid,
                serde_json::json!([
                {"addresses": ["999.1.1.1"]}, {"addresses": ["198.18.1.2"], "nodeName": "node-a"},
                {"addresses": ["198.18.1.2"], "nodeName": "node-a"}]),
            )),
        }
    }
    {
        let mut f = fake.lock().unwrap();
        f.service_lists.push_back(("3".into(), services));
        f.slices = slices;
        f.nodes = vec![serde_json::json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-a", "resourceVersion": "5"},
            "status": {"addresses": [{"type": "InternalIP", "address": testbed::NODE_A}]}})];
    }
    let proxy_mode = if mode == Mode::Nftables {
        "nftables"
    } else {
        "iptables"
    };
    let started = std::time::Instant::now();
    let kubeconfig = start_against_fake_api(
        &mut bed,
        &fake,
        &[
            "--hostname-override=node-a",
            "--proxy-mode",
            proxy_mode,
            "--cluster-cidr=198.18.0.0/16",
            "--healthz-bind-address=",
            "--metrics-bind-address=",
            "-v=2",
        ],
    );
    let first_sync = started.elapsed();
    // Every valid Service is in the kernel.
    let programmed = |bed: &TestBed| -> usize {
        if mode.is_iptables() {
            bed.ruleset("ip")
                .lines()
                .filter(|l| {
                    l.starts_with("-A KUBE-SERVICES")
                        && l.contains("-d 198.19.")
                        && l.contains("cluster IP")
                })
                .filter(|l| !l.contains("198.19.98.") && !l.contains("198.19.99."))
                .count()
        } else {
            bed.ip_netns_exec(
                "node",
                &["nft", "list", "set", "ip", "kube-proxy", "cluster-ips"],
            )
            .matches("198.19.")
            .count()
                - bed
                    .ip_netns_exec(
                        "node",
                        &["nft", "list", "set", "ip", "kube-proxy", "cluster-ips"],
                    )
                    .matches("198.19.98.")
                    .count()
        }
    };
    bed.eventually("every valid Service programmed", || {
        programmed(&bed) == VALID
    });
    // 40 connections: with two endpoints picked at random, 12 missed one of them once in
    // about 2,000 checks (a CI run failed on it); 40 miss one in 2^39.
    for i in [0, 1, 4999, VALID - 1] {
        assert_eq!(
            bed.tcp_spread("a2", sock(&ip(i), 80), 40).0,
            pods(&["a1", "b1"]),
            "v{i}"
        );
    }
    // The summary of what the rate limit held back comes within 10 s.
    bed.eventually("the summary of skipped objects", || {
        bed.proxy_log()
            .contains("More invalid objects or problems were skipped")
    });
    let log = bed.proxy_log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.starts_with('W')).collect();
    let skipped: Vec<&str> = warnings
        .iter()
        .copied()
        .filter(|l| l.contains("Skipping invalid object") || l.contains("with parts ignored"))
        .collect();
    let mut names: Vec<&str> = skipped
        .iter()
        .filter_map(|l| l.split("object=\"").nth(1))
        .filter_map(|rest| rest.split('"').next())
        .collect();
    let individually = names.len();
    names.sort();
    names.dedup();
    assert_eq!(
        names.len(),
        individually,
        "no object warned about twice:\n{}",
        skipped.join("\n")
    );
    let held: u64 = warnings
        .iter()
        .filter(|l| l.contains("More invalid objects or problems were skipped"))
        .filter_map(|l| l.split("count=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|n| n.parse::<u64>().ok())
        .sum();
    assert!(
        warnings.len() < 100,
        "never a log storm: {} warnings\n{}",
        warnings.len(),
        warnings.join("\n")
    );
    assert!(
        held > 1000,
        "the rest is summarised: {held}\n{}",
        warnings.join("\n")
    );
    assert!(!log.contains("panicked"), "{log}");
    println!(
        "{mode:?}: {VALID} valid + {INVALID} invalid objects: first sync after {first_sync:?}, all {VALID} valid Services programmed; {} warnings in the log ({individually} objects named, {held} more summarised)",
        warnings.len()
    );
    let _ = std::fs::remove_file(kubeconfig);
}

/// Our kernel state, normalised for comparison: the nftables tables' objects and elements
/// (each element tagged with its set, sorted: listing order is the kernel's hash order), or
/// our iptables chains and rules (sorted, counters dropped).
fn normalized_state(bed: &TestBed, mode: Mode) -> Vec<String> {
    let mut items = Vec::new();
    for family in ["ip", "ip6"] {
        if mode == Mode::Nftables {
            let text = bed.ip_netns_exec("node", &["nft", "list", "table", family, "kube-proxy"]);
            let mut container = String::new();
            for line in text.lines().map(str::trim) {
                if ["set ", "map ", "chain "]
                    .iter()
                    .any(|p| line.starts_with(p))
                {
                    container = format!("{family} {line}");
                    items.push(container.clone());
                    continue;
                }
                let line = line
                    .trim_start_matches("elements = {")
                    .trim_end_matches('}')
                    .trim();
                for piece in line.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    items.push(format!("{container} | {piece}"));
                }
            }
        } else {
            let save = mode.save_tool(family);
            for table in ["nat", "filter"] {
                let text = bed.ip_netns_exec("node", &[&save, "-t", table]);
                items.extend(
                    text.lines()
                        .filter(|l| l.contains("KUBE-") && !l.starts_with('#'))
                        .map(|l| match l.strip_prefix(':') {
                            Some(decl) => format!(
                                "{family} {table} :{}",
                                decl.split_whitespace().next().unwrap_or("")
                            ),
                            None => format!("{family} {table} {l}"),
                        }),
                );
            }
        }
    }
    items.sort();
    items
}

/// `kill -9` at random points of a cold sync of `KP_KILL_SERVICES` Services × 2 endpoints
/// (default 10k)
/// with the table removed first, and of partial syncs (2,000 endpoint changes and 500 new
/// Services pushed through the watch), `KP_KILL_RUNS` times (default 20, half each): after
/// each restart the kernel state equals a clean run's of the same cluster state after the
/// first sync, and a connection established through a Service before the first kill answers
/// after every restart.
fn kill_9_during_syncs_leaves_nothing_broken(mode: Mode) {
    if !testbed::available() {
        return;
    }
    let runs: usize = std::env::var("KP_KILL_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let n: usize = std::env::var("KP_KILL_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let mut bed = TestBed::new("kill");
    bed.mode = mode;
    // 10k Services take a debug build a few seconds (nftables) to tens of seconds (iptables
    // on a busy machine) to program.
    bed.first_sync_bound = Duration::from_secs(180);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();
    let fake = std::sync::Arc::new(std::sync::Mutex::new(fakeapi::Fake::default()));
    let ip = |i: usize| format!("198.19.{}.{}", 100 + i / 250, 1 + i % 250);
    // State A: n Services with endpoints a1 and b1; state B: the first 2,000 with b1 only
    // and 500 more Services. Both have "web", the Service of the established connection.
    let objects = |b: bool| {
        let mut services = Vec::new();
        let mut slices = Vec::new();
        let (web, web_slice) = api_service("web", "198.19.0.150", 0, &["a1"], 2);
        services.push(web);
        slices.push(web_slice);
        for i in 0..n + if b { 500 } else { 0 } {
            let pods: &[&str] = if b && i < 2000 {
                &["b1"]
            } else {
                &["a1", "b1"]
            };
            // One port each: 10k Services × 2 endpoints, the benchmarks' cluster.
            let (mut svc, mut slice) = api_service(&format!("s{i}"), &ip(i), 0, pods, 3);
            svc["spec"]["ports"].as_array_mut().unwrap().truncate(1);
            slice["ports"].as_array_mut().unwrap().truncate(1);
            services.push(svc);
            slices.push(slice);
        }
        (services, slices)
    };
    let body = |kind: &str, items: &[serde_json::Value]| {
        bytes::Bytes::from(fakeapi::list(kind, "10", items.to_vec()).to_string())
    };
    let states = [objects(false), objects(true)];
    let set_state = |which: usize| {
        let mut f = fake.lock().unwrap();
        f.prepared.insert(
            "/api/v1/services".into(),
            body("ServiceList", &states[which].0),
        );
        f.prepared.insert(
            "/apis/discovery.k8s.io/v1/endpointslices".into(),
            body("EndpointSliceList", &states[which].1),
        );
    };
    {
        let mut f = fake.lock().unwrap();
        f.nodes = vec![serde_json::json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-a", "resourceVersion": "5"},
            "status": {"addresses": [{"type": "InternalIP", "address": testbed::NODE_A}]}})];
    }
    set_state(0);
    let listener = bind_in_node(&bed, 0);
    let url = fakeapi::serve_on(fake.clone(), listener);
    let proxy_mode = if mode == Mode::Nftables {
        "nftables"
    } else {
        "iptables"
    };
    let kubeconfig = start_with_kubeconfig(
        &mut bed,
        &url,
        &[
            "--hostname-override=node-a",
            "--proxy-mode",
            proxy_mode,
            "--cluster-cidr=198.18.0.0/16",
            "--healthz-bind-address=",
            "--metrics-bind-address=",
            "-v=2",
        ],
    );
    let args = bed.proxy_args.clone();
    let cleanup = |bed: &TestBed| {
        bed.ip_netns_exec_checked("node", &[env!("CARGO_BIN_EXE_kube-proxy"), "--cleanup"])
            .unwrap();
    };
    // Clean runs: the expected kernel state of A and B, and how long a cold sync takes.
    let mut clean = Vec::new();
    let mut cold = Duration::ZERO;
    for which in [0, 1] {
        bed.stop_proxy();
        cleanup(&bed);
        set_state(which);
        let started = std::time::Instant::now();
        bed.start_proxy_with(&args);
        cold = cold.max(started.elapsed());
        clean.push(normalized_state(&bed, mode));
    }
    assert!(clean[0].len() > n && clean[0] != clean[1]);
    // The established connection, through A's rules (web is the same in both).
    let web = sock("198.19.0.150", 81);
    let mut established = bed.connect("a2", web);
    assert_eq!(established.exchange("hello").unwrap(), "a1 hello");

    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut random_below = |limit: u128| -> u128 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        u128::from(seed) % limit.max(1)
    };
    let mut current = 1; // the last clean run left B
    let mut outcomes = Vec::new();
    for run in 0..runs {
        let cold_run = run % 2 == 0;
        let target = if cold_run { current } else { 1 - current };
        let delay;
        let syncs_before = bed.proxy_log().matches("\"Synced\"").count();
        if cold_run {
            bed.stop_proxy();
            cleanup(&bed);
            set_state(target);
            delay = Duration::from_millis(random_below(cold.as_millis() * 6 / 5) as u64);
            bed.spawn_proxy(&args);
        } else {
            // The running proxy (synced on `current`) meets the changes through its watches:
            // 2,000 slices modified, 500 Services and their slices added (A→B) or deleted.
            set_state(target);
            let mut f = fake.lock().unwrap();
            let (services, slices) = &states[target];
            for slice in &slices[1..2001] {
                f.push_event(
                    "/apis/discovery.k8s.io/v1/endpointslices",
                    &serde_json::json!({"type": "MODIFIED", "object": slice}),
                );
            }
            let (event, extra) = if target == 1 {
                ("ADDED", (&services[n + 1..], &slices[n + 1..]))
            } else {
                ("DELETED", (&states[1].0[n + 1..], &states[1].1[n + 1..]))
            };
            for (svc, slice) in extra.0.iter().zip(extra.1) {
                f.push_event(
                    "/api/v1/services",
                    &serde_json::json!({"type": event, "object": svc}),
                );
                f.push_event(
                    "/apis/discovery.k8s.io/v1/endpointslices",
                    &serde_json::json!({"type": event, "object": slice}),
                );
            }
            drop(f);
            delay = Duration::from_millis(random_below(1500) as u64);
        }
        std::thread::sleep(delay);
        let log = bed.proxy_log();
        let syncs = log.matches("\"Synced\"").count();
        let phase = if !cold_run {
            match syncs - syncs_before {
                0 => "before the changes were synced",
                1 => "between the families' syncs of the changes",
                _ => "after the changes were synced",
            }
        } else if log.contains("\"Synced\" family=\"IPv6\"") {
            "after its first sync"
        } else if log.contains("\"Synced\" family=\"IPv4\"") {
            "between the families' syncs"
        } else if log.contains("listed; starting to sync") {
            "during the first sync"
        } else {
            "before the lists were in"
        };
        bed.kill_proxy();
        let killed_at = format!(
            "{} run {run}: killed {delay:?} in, {phase}",
            if cold_run { "cold" } else { "partial" }
        );
        bed.start_proxy_with(&args);
        let state = normalized_state(&bed, mode);
        if state != clean[target] {
            let missing: Vec<&String> = clean[target]
                .iter()
                .filter(|i| !state.contains(i))
                .take(10)
                .collect();
            let extra: Vec<&String> = state
                .iter()
                .filter(|i| !clean[target].contains(i))
                .take(10)
                .collect();
            panic!("{killed_at}: after the restart's first sync the kernel differs from a clean run's\nmissing: {missing:#?}\nextra: {extra:#?}\n{}", bed.proxy_log());
        }
        assert_eq!(
            established
                .exchange(&format!("run{run}"))
                .unwrap_or_else(|e| panic!("{killed_at}: the established connection broke: {e}")),
            format!("a1 run{run}"),
            "{killed_at}"
        );
        outcomes.push(killed_at);
        current = target;
    }
    println!(
        "{mode:?}: kill -9 {runs} times at {n} Services (cold sync {cold:?}): the kernel equalled a clean run's after each restart's first sync, the established connection answered every time\n  {}",
        outcomes.join("\n  ")
    );
    let _ = std::fs::remove_file(kubeconfig);
}

/// How many kernel transactions the first IPv4 sync in `log` took.
fn first_sync_transactions(log: &str) -> usize {
    log.lines()
        .find(|l| l.contains("\"Synced\" family=\"IPv4\""))
        .and_then(|l| l.split("transactions=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A restart (SIGTERM, then a new process whose first sync rewrites the table in place) does
/// not break an established connection: NAT state lives in conntrack, and the rules stay in
/// place while no proxy runs. The first process builds its table in stages (as a large
/// cluster's is); the second reads the kernel's table and writes only what differs, which
/// repairs drift: the tables end up exactly as built.
#[test]
fn restart_keeps_established_connections() {
    if !testbed::available() {
        return;
    }
    let mut bed = TestBed::new("rst");
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: t}\nspec:\n  clusterIP: 198.19.0.110\n  ports: [{name: e, port: 80, targetPort: 8081}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: echo-1, namespace: t, labels: {kubernetes.io/service-name: echo}}\naddressType: IPv4\nports: [{name: e, port: 8081}]\nendpoints: [{addresses: [198.18.2.2], nodeName: node-b}]\n";
    bed.write_manifest("echo", yaml);
    bed.proxy_env = vec![("KUBE_PROXY_NFT_STAGED_BUILD_ABOVE".into(), "0".into())];
    bed.start_proxy(&[]);
    bed.proxy_env.clear();
    assert!(
        first_sync_transactions(&bed.proxy_log()) > 2,
        "built in stages: {}",
        bed.proxy_log()
    );
    let built = [bed.ruleset("ip"), bed.ruleset("ip6")];
    assert!(
        built[0].contains("198.19.0.110 . tcp . 80 : 198.18.2.2 . 8081"),
        "{}",
        built[0]
    );
    let mut from_pod = bed.connect("a1", sock("198.19.0.110", 80));
    let mut from_client = bed.connect("client", sock("198.19.0.110", 80));
    assert_eq!(from_pod.exchange("one").unwrap(), "b1 one");
    assert_eq!(from_client.exchange("one").unwrap(), "b1 one");
    bed.stop_proxy();
    // Drift while no proxy runs: one of our elements gone, a foreign one added.
    let node = bed.ns("node");
    for script in [
        "delete element ip kube-proxy backends-0 { 198.19.0.110 . tcp . 80 }",
        "add element ip kube-proxy no-endpoint-reject { 198.19.9.9 . tcp . 9 }",
    ] {
        let ok = std::process::Command::new("ip")
            .args(["netns", "exec", &node, "nft", script])
            .status()
            .unwrap();
        assert!(ok.success(), "{script}");
    }
    assert_eq!(
        from_pod.exchange("two").unwrap(),
        "b1 two",
        "while no proxy runs"
    );
    bed.start_proxy(&[]);
    assert_eq!(first_sync_transactions(&bed.proxy_log()), 1);
    assert_eq!(
        [bed.ruleset("ip"), bed.ruleset("ip6")],
        built,
        "the restarted proxy leaves the tables exactly as built"
    );
    assert_eq!(
        from_pod.exchange("three").unwrap(),
        "b1 three",
        "after the new proxy rewrote the table"
    );
    assert_eq!(
        from_client.exchange("three").unwrap(),
        "b1 three",
        "a masqueraded connection too"
    );
    assert_eq!(
        bed.connect("a2", sock("198.19.0.110", 80))
            .exchange("new")
            .unwrap(),
        "b1 new"
    );

    // A build cut short (base chains without their rules, an element missing) is completed
    // in stages again, since nothing reaches the table yet.
    bed.stop_proxy();
    for script in [
        "flush chain ip kube-proxy nat-prerouting",
        "delete element ip kube-proxy backends-0 { 198.19.0.110 . tcp . 80 }",
    ] {
        let ok = std::process::Command::new("ip")
            .args(["netns", "exec", &node, "nft", script])
            .status()
            .unwrap();
        assert!(ok.success(), "{script}");
    }
    bed.proxy_env = vec![("KUBE_PROXY_NFT_STAGED_BUILD_ABOVE".into(), "0".into())];
    bed.start_proxy(&[]);
    bed.proxy_env.clear();
    assert_eq!(first_sync_transactions(&bed.proxy_log()), 3);
    assert_eq!([bed.ruleset("ip"), bed.ruleset("ip6")], built);
    assert_eq!(from_pod.exchange("four").unwrap(), "b1 four");
}

/// `--init-only` sets the conntrack sysctls a network namespace may change, tolerates the
/// global ones it may not, and exits; `--cleanup` removes both kube-proxy tables.
#[test]
fn init_only_and_cleanup() {
    if !testbed::available() {
        return;
    }
    let mut bed = TestBed::new("ini");
    let node = bed.ns("node");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &node, env!("CARGO_BIN_EXE_kube-proxy")])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let sysctl = |key: &str| {
        std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &node,
                "cat",
                &format!("/proc/sys/net/netfilter/{key}"),
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap()
    };
    let (ok, log) = run(&[
        "--init-only",
        "--proxy-mode=nftables",
        "--conntrack-tcp-timeout-established=2h",
        "--conntrack-tcp-timeout-close-wait=30m",
        "--conntrack-udp-timeout=45s",
        "--conntrack-udp-timeout-stream=3m",
        "--conntrack-tcp-be-liberal",
        // Raising the score needs no privilege (lowering needs CAP_SYS_RESOURCE and is tolerated).
        "--oom-score-adj=100",
    ]);
    assert!(ok, "{log}");
    assert_eq!(sysctl("nf_conntrack_tcp_timeout_established"), "7200");
    assert_eq!(sysctl("nf_conntrack_tcp_timeout_close_wait"), "1800");
    assert_eq!(sysctl("nf_conntrack_udp_timeout"), "45");
    assert_eq!(sysctl("nf_conntrack_udp_timeout_stream"), "180");
    assert_eq!(sysctl("nf_conntrack_tcp_be_liberal"), "1");
    assert!(log.contains("\"Set oom_score_adj\" value=100"), "{log}");
    assert!(log.contains("--init-only: privileged set-up done"), "{log}");

    // Tables programmed by a running proxy are removed by --cleanup, which also succeeds
    // when there is nothing to remove.
    bed.write_manifest(
        "s",
        &service("s", &format!("  clusterIP: 198.19.0.120\n{PORTS}"), &["a1"]),
    );
    bed.start_proxy(&[]);
    bed.stop_proxy();
    assert!(
        bed.ruleset("ip").contains("198.19.0.120"),
        "rules stay after SIGTERM"
    );
    let (ok, log) = run(&["--cleanup"]);
    assert!(ok, "{log}");
    assert_eq!(bed.ruleset("ip"), "");
    assert_eq!(bed.ruleset("ip6"), "");
    let (ok, log) = run(&["--cleanup"]);
    assert!(ok, "nothing to remove is fine: {log}");
}

/// What upstream kube-proxy's iptables mode leaves behind (a Service 198.19.0.130:80 sent to
/// a2), next to chains kubelet owns (KUBE-MARK-MASQ, KUBE-FIREWALL) that must survive.
const UPSTREAM_IPTABLES: &str = "*filter
:KUBE-FIREWALL - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
-A INPUT -j KUBE-FIREWALL
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
*nat
:KUBE-MARK-MASQ - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SVC-TESTAAAAAAAAAAAA - [0:0]
:KUBE-SEP-TESTBBBBBBBBBBBB - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-SERVICES -d 198.19.0.130/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-TESTAAAAAAAAAAAA
-A KUBE-SVC-TESTAAAAAAAAAAAA -j KUBE-SEP-TESTBBBBBBBBBBBB
-A KUBE-SEP-TESTBBBBBBBBBBBB -p tcp -m tcp -j DNAT --to-destination 198.18.1.3:8080
COMMIT
";

/// Taking over a node from upstream kube-proxy in iptables mode: its rules keep carrying
/// the traffic until this proxy's first sync, then they are removed (kubelet's chains stay);
/// `--cleanup` removes them too.
#[test]
fn takes_over_from_upstream_iptables_mode() {
    if !testbed::available() {
        return;
    }
    let mut bed = TestBed::new("ipt");
    let node = bed.ns("node");
    let in_node = |cmd: &[&str], stdin: Option<&str>| -> String {
        use std::io::Write;
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &node])
            .args(cmd)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        drop(input);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let load_upstream = || {
        in_node(
            &["iptables-nft-restore", "--noflush"],
            Some(UPSTREAM_IPTABLES),
        )
    };
    let saved = || in_node(&["iptables-nft-save"], None);
    load_upstream();
    let vip = sock("198.19.0.130", 80);
    assert_eq!(
        bed.tcp_spread("a1", vip, 5).0,
        pods(&["a2"]),
        "upstream's rules are live"
    );

    bed.write_manifest(
        "s",
        &service("s", &format!("  clusterIP: 198.19.0.130\n{PORTS}"), &["a1"]),
    );
    bed.start_proxy(&[]);
    bed.eventually("upstream's chains removed after the first sync", || {
        !saved().contains("KUBE-SERVICES")
    });
    let rules = saved();
    for kept in ["-A KUBE-MARK-MASQ -j MARK", "-A INPUT -j KUBE-FIREWALL"] {
        assert!(rules.contains(kept), "kubelet's {kept} kept:\n{rules}");
    }
    for gone in ["KUBE-SVC-", "KUBE-SEP-", "KUBE-FORWARD", "KUBE-POSTROUTING"] {
        assert!(!rules.contains(gone), "{gone} removed:\n{rules}");
    }
    assert_eq!(
        bed.tcp_spread("a2", vip, 10).0,
        pods(&["a1"]),
        "now served by this proxy"
    );

    // --cleanup removes them as well (and this proxy's tables).
    bed.stop_proxy();
    load_upstream();
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &node,
            env!("CARGO_BIN_EXE_kube-proxy"),
            "--cleanup",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = saved();
    assert!(
        !rules.contains("KUBE-SERVICES") && rules.contains("KUBE-MARK-MASQ"),
        "{rules}"
    );
    assert_eq!(bed.ruleset("ip"), "");
}

/// Rules of others in every built-in chain of every table iptables mode touches, and a
/// chain of their own: they must come out of every run byte-identical.
const FOREIGN_IPTABLES: &str = "*raw
-A PREROUTING -s 203.0.113.250/32 -m comment --comment foreign -j ACCEPT
-A OUTPUT -d 203.0.113.250/32 -m comment --comment foreign -j ACCEPT
COMMIT
*mangle
:FOREIGN - [0:0]
-A PREROUTING -s 203.0.113.250/32 -m comment --comment foreign -j FOREIGN
-A INPUT -s 203.0.113.250/32 -m comment --comment foreign -j ACCEPT
-A FORWARD -s 203.0.113.250/32 -m comment --comment foreign -j ACCEPT
-A OUTPUT -d 203.0.113.250/32 -m comment --comment foreign -j ACCEPT
-A POSTROUTING -d 203.0.113.250/32 -m comment --comment foreign -j ACCEPT
-A FOREIGN -j MARK --set-xmark 0x1/0x1
COMMIT
*filter
:FOREIGN - [0:0]
-A INPUT -s 203.0.113.250/32 -m comment --comment foreign -j FOREIGN
-A FORWARD -s 203.0.113.250/32 -m comment --comment foreign -j ACCEPT
-A OUTPUT -d 203.0.113.250/32 -m comment --comment foreign -j ACCEPT
-A FOREIGN -j ACCEPT
COMMIT
*nat
:FOREIGN - [0:0]
-A PREROUTING -s 203.0.113.250/32 -m comment --comment foreign -j FOREIGN
-A INPUT -s 203.0.113.250/32 -m comment --comment foreign -j ACCEPT
-A OUTPUT -d 203.0.113.250/32 -m comment --comment foreign -j ACCEPT
-A POSTROUTING -d 203.0.113.250/32 -m comment --comment foreign -j ACCEPT
-A FOREIGN -j ACCEPT
COMMIT
";

/// The lines of an `iptables-save` that are not kube-proxy's (no `KUBE-` in them), without
/// the comments and counters that change by themselves.
fn foreign_lines(saved: &str) -> Vec<String> {
    saved
        .lines()
        .filter(|l| !l.starts_with('#') && !l.contains("KUBE-"))
        .map(|l| match l.rfind(" [") {
            Some(at) if l.starts_with(':') => l[..at].to_string(),
            _ => l.to_string(),
        })
        .collect()
}

/// `GET /metrics` of the proxy in node-a (bound to 127.0.0.1:10249 there).
fn metrics_of(bed: &TestBed) -> String {
    use std::io::{Read, Write};
    testbed::in_netns(&bed.ns("node"), || {
        let Ok(mut stream) = std::net::TcpStream::connect("127.0.0.1:10249") else {
            return String::new();
        };
        let _ = write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n"
        );
        let mut body = String::new();
        let _ = stream.read_to_string(&mut body);
        body
    })
}

/// The value of the metric line starting with `series`.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The drop-in path in iptables mode, on one backend: upstream's iptables rules are replaced
/// under an established connection (its stale chains deleted), rules of others in every
/// built-in chain and a foreign nftables table stay byte-identical through every step, the
/// rule-count metrics are live, deleting our chains (the canary with them) is repaired by
/// the next periodic sync, the node switches to nftables mode and back (each mode removing
/// the other's rules after its first sync, the connection surviving), and `--cleanup` leaves
/// only what is not ours (plus kubelet's shared chains, as upstream).
fn iptables_takeover_canary_mode_switches_and_cleanup(mode: Mode) {
    if !testbed::available() {
        return;
    }
    let mut bed = TestBed::new("ipx");
    bed.mode = mode;
    let node = bed.ns("node");
    let backend = mode.backend().unwrap();
    let in_node = |cmd: &[&str], stdin: &str| -> String {
        use std::io::Write;
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &node])
            .args(cmd)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.as_bytes()).unwrap();
        drop(input);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let restore = format!("iptables-{backend}-restore");
    let save_tool = mode.save_tool("ip");
    let save_tool6 = mode.save_tool("ip6");
    // Both families' rules: others' must stay byte-identical in each.
    let saved = || in_node(&[&save_tool], "") + &in_node(&[&save_tool6], "");
    in_node(&[&restore, "--noflush"], FOREIGN_IPTABLES);
    in_node(
        &[&format!("ip6tables-{backend}-restore"), "--noflush"],
        &FOREIGN_IPTABLES.replace("203.0.113.250/32", "2001:db8:203::250/128"),
    );
    // Upstream's Service, sent to a2's long-lived echo server (port 8081).
    in_node(
        &[&restore, "--noflush"],
        &UPSTREAM_IPTABLES.replace("198.18.1.3:8080", "198.18.1.3:8081"),
    );
    in_node(
        &["nft", "-f", "-"],
        "table inet foreign {\n chain input { type filter hook input priority 10; ip saddr 203.0.113.250 accept; }\n}\n",
    );
    let foreign_nft = || in_node(&["nft", "list", "table", "inet", "foreign"], "");
    let (foreign, nft_before) = (foreign_lines(&saved()), foreign_nft());
    let unchanged = |step: &str| {
        assert_eq!(
            foreign_lines(&saved()),
            foreign,
            "{step}: foreign iptables rules"
        );
        assert_eq!(foreign_nft(), nft_before, "{step}: foreign nftables table");
    };
    let vip = sock("198.19.0.130", 80);
    // Upstream's rules send the Service to a2; an established connection through them.
    let mut held = bed.connect("a1", vip);
    assert_eq!(held.exchange("one").unwrap(), "a2 one");

    bed.write_manifest("s", "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: t}\nspec:\n  clusterIP: 198.19.0.130\n  ports: [{name: e, port: 80, targetPort: 8081}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s-1, namespace: t, labels: {kubernetes.io/service-name: s}}\naddressType: IPv4\nports: [{name: e, port: 8081}]\nendpoints: [{addresses: [198.18.1.3], nodeName: node-a}]\n");
    // A new connection's answer, if any.
    let a1 = bed.ns("a1");
    let fresh = |text: &str| {
        let text = text.to_string();
        testbed::in_netns(&a1, move || {
            use std::io::{BufRead, Write};
            let stream = std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(1)).ok()?;
            stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
            (&stream).write_all(format!("{text}\n").as_bytes()).ok()?;
            let mut line = String::new();
            std::io::BufReader::new(&stream).read_line(&mut line).ok()?;
            Some(line.trim_end().to_string())
        })
    };
    let fast = [
        "--iptables-sync-period=1s",
        "--metrics-bind-address=127.0.0.1:10249",
    ];
    bed.start_proxy(&fast);
    let rules = saved();
    assert!(!rules.contains("KUBE-SVC-TESTAAAAAAAAAAAA"), "{rules}");
    assert!(
        rules.contains("-j DNAT --to-destination 198.18.1.3:8081"),
        "{rules}"
    );
    assert_eq!(
        held.exchange("two").unwrap(),
        "a2 two",
        "across the takeover"
    );
    unchanged("after the takeover");
    let text = metrics_of(&bed);
    let nat_total = metric(
        &text,
        "kubeproxy_sync_proxy_rules_iptables_total{ip_family=\"IPv4\",table=\"nat\"}",
    );
    let ours = rules
        .lines()
        .filter(|l| l.starts_with("-A KUBE-") && !l.starts_with("-A KUBE-MARK-MASQ"))
        .count();
    assert!(nat_total.is_some_and(|n| n > 5.0), "{text}");
    assert!(
        metric(
            &text,
            "kubeproxy_sync_proxy_rules_iptables_last{ip_family=\"IPv4\",table=\"filter\"}"
        )
        .is_some_and(|n| n > 0.0),
        "{text}"
    );
    assert!(ours > 5, "{rules}");

    // Someone deletes our nat chains and the canaries: the next periodic sync notices.
    let mut wipe = String::from("*mangle\n-X KUBE-PROXY-CANARY\nCOMMIT\n*nat\n");
    for chain in ["PREROUTING", "OUTPUT"] {
        wipe.push_str(&format!(
            "-D {chain} -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n"
        ));
    }
    wipe.push_str(
        "-F KUBE-SERVICES\n-X KUBE-SERVICES\n-F KUBE-PROXY-CANARY\n-X KUBE-PROXY-CANARY\nCOMMIT\n",
    );
    in_node(&[&restore, "--noflush"], &wipe);
    // (Whether a connection fails in between depends on the next sync's timing.)
    bed.eventually("the canary check repairs the rules", || {
        saved().contains(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
        )
    });
    bed.eventually("the Service answers again", || {
        fresh("new").as_deref() == Some("a2 new")
    });
    bed.eventually("the canary's loss logged", || {
        bed.proxy_log()
            .contains("KUBE-PROXY-CANARY of IPv4 is gone")
    });
    unchanged("after the repair");

    // To nftables mode: the iptables chains go after its first sync.
    bed.mode = Mode::Nftables;
    bed.start_proxy(&[]);
    bed.eventually("iptables chains removed", || {
        !saved().contains("KUBE-SERVICES")
    });
    assert_eq!(
        held.exchange("three").unwrap(),
        "a2 three",
        "into nftables mode"
    );
    assert_eq!(fresh("new").as_deref(), Some("a2 new"));
    unchanged("in nftables mode");
    // And back: the nftables table goes.
    bed.mode = mode;
    bed.start_proxy(&[]);
    bed.eventually("the kube-proxy table removed", || {
        !in_node(&["nft", "list", "tables"], "").contains("kube-proxy")
    });
    assert_eq!(
        held.exchange("four").unwrap(),
        "a2 four",
        "back in iptables mode"
    );
    assert_eq!(fresh("new").as_deref(), Some("a2 new"));
    unchanged("back in iptables mode");

    bed.stop_proxy();
    let cleanup = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &node,
            env!("CARGO_BIN_EXE_kube-proxy"),
            "--cleanup",
        ])
        .output()
        .unwrap();
    assert!(
        cleanup.status.success(),
        "{}",
        String::from_utf8_lossy(&cleanup.stderr)
    );
    let rules = saved();
    let left: Vec<&str> = rules
        .lines()
        .filter(|l| l.contains("KUBE-"))
        .filter(|l| !l.contains("KUBE-MARK-MASQ") && !l.contains("KUBE-FIREWALL"))
        .collect();
    assert!(
        left.is_empty(),
        "only kubelet's shared chains stay: {left:?}"
    );
    unchanged("after --cleanup");
}

/// A UDP client that keeps its source port sends to a Service whose only endpoint (a1) is
/// then replaced by b1. a1's server keeps running, so a stale conntrack entry would keep
/// answering "a1". Returns what the client sees after the change, and the proxy's log.
fn udp_flow_across_endpoint_replacement(
    mode: Mode,
    test: &str,
    extra: &[&str],
) -> (Vec<String>, String) {
    let mut bed = TestBed::new(test);
    bed.mode = mode;
    let spec = "  type: NodePort\n  clusterIP: 198.19.0.60\n  ports:\n  - {name: u, port: 53, targetPort: 8080, nodePort: 30060, protocol: UDP}";
    bed.write_manifest("dns", &service("dns", spec, &["a1"]));
    bed.start_proxy(extra);
    match mode {
        Mode::Nftables => bed.wait_for_rules("ip", "198.19.0.60 . udp . 53"),
        Mode::Ipvs => bed.wait_for_rules("ip", "-a -u 198.19.0.60:53 -r 198.18.1.2:8080"),
        Mode::Userspace => bed.wait_for_rules("ip", "-d 198.19.0.60/32"),
        Mode::UserspaceNft => bed.wait_for_rules("ip", "ip daddr 198.19.0.60 "),
        _ => bed.wait_for_rules("ip", "DNAT --to-destination 198.18.1.2:8080"),
    }
    let vip = sock("198.19.0.60", 53);
    let node_port = sock(testbed::NODE_A, 30060);
    let answer = |outcome: Outcome| match outcome {
        Outcome::Answered { pod, .. } => pod,
        other => format!("{other:?}"),
    };
    assert_eq!(answer(bed.udp_from_port("a2", vip, 40053)), "a1");
    assert_eq!(answer(bed.udp_from_port("client", node_port, 40054)), "a1");
    bed.write_manifest("dns", &service("dns", spec, &["b1"]));
    match mode {
        Mode::Nftables => bed.wait_for_rules("ip", "198.18.2.2 . 8080"),
        Mode::Ipvs => bed.wait_for_rules("ip", "-a -u 198.19.0.60:53 -r 198.18.2.2:8080"),
        // The listeners' endpoints change with no rule changing: the sync below says when.
        Mode::Userspace | Mode::UserspaceNft => {}
        _ => bed.wait_for_rules("ip", "DNAT --to-destination 198.18.2.2:8080"),
    }
    // Give a cleanup (if any) time to run after the sync that programmed b1.
    bed.eventually("the sync to finish", || {
        bed.proxy_log()
            .matches("\"Synced\" family=\"IPv4\"")
            .count()
            >= 2
    });
    std::thread::sleep(Duration::from_millis(500));
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(answer(bed.udp_from_port("a2", vip, 40053)));
        seen.push(answer(bed.udp_from_port("client", node_port, 40054)));
    }
    seen.sort();
    seen.dedup();
    (seen, bed.proxy_log())
}

/// Stale UDP conntrack entries are deleted after the sync that removed their endpoint: the
/// same client socket reaches the new endpoint at once (ClusterIP and NodePort).
fn udp_clients_move_to_a_live_endpoint(mode: Mode) {
    if !testbed::available() {
        return;
    }
    let (seen, log) = udp_flow_across_endpoint_replacement(mode, "ctclean", &[]);
    assert_eq!(seen, pods(&["b1"]), "{log}");
    if matches!(mode, Mode::Ipvs | Mode::Userspace | Mode::UserspaceNft) {
        // IPVS moves the flows itself: a UDP real server is deleted at once and
        // `expire_nodest_conn` expires its connections (no conntrack entry to clean).
        // userspace mode closes a client's flow when its endpoint leaves.
        return;
    }
    // Exactly the two stale entries (ClusterIP and NodePort) were deleted.
    assert!(
        log.lines()
            .any(|l| l.contains("Reconciled UDP conntrack entries") && l.contains("deleted=2")),
        "{log}"
    );
}

/// The control for the test above: with the cleanup disabled the same flows stay stuck on
/// the removed endpoint, so the cleanup is what moves them.
fn without_conntrack_cleanup_udp_clients_stay_on_the_removed_endpoint(mode: Mode) {
    if !testbed::available() {
        return;
    }
    let (seen, log) =
        udp_flow_across_endpoint_replacement(mode, "ctkeep", &["--conntrack-cleanup=false"]);
    assert_eq!(seen, pods(&["a1"]), "{log}");
}

/// `GET /anything` from namespace `from`: Ok((status, lower-cased head, body)) or
/// Err(connection error kind), e.g. "ConnectionRefused".
fn http_get_from(
    bed: &TestBed,
    from: &str,
    to: std::net::SocketAddr,
) -> Result<(u16, String, String), String> {
    http_get_path_from(bed, from, to, "/anything")
}

/// `GET path` from namespace `from`, as [`http_get_from`].
fn http_get_path_from(
    bed: &TestBed,
    from: &str,
    to: std::net::SocketAddr,
    path: &'static str,
) -> Result<(u16, String, String), String> {
    use std::io::{Read, Write};
    testbed::in_netns(&bed.ns(from), move || {
        let mut stream = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))
            .map_err(|e| format!("{:?}", e.kind()))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .map_err(|e| format!("{:?}", e.kind()))?;
        let (head, body) = response.split_once("\r\n\r\n").ok_or("no header end")?;
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        Ok((status, head.to_lowercase(), body.to_string()))
    })
}

/// Health-check node ports, as a cloud load balancer probes them from outside: 200 and the
/// local endpoint count while this node has ready local endpoints, 503 otherwise (remote
/// only, terminating only), per family, on the node's addresses; closed when the Service
/// goes away and moved when its port changes.
fn health_check_node_ports(mode: Mode) {
    if !testbed::available() {
        return;
    }
    let mut bed = TestBed::new("hcnp");
    bed.mode = mode;
    let spec = |hcnp: u16| {
        format!("  type: LoadBalancer\n  clusterIP: 198.19.0.45\n  clusterIPs: [198.19.0.45, \"2001:db8:19::45\"]\n  ipFamilyPolicy: PreferDualStack\n  externalTrafficPolicy: Local\n  healthCheckNodePort: {hcnp}\n{PORTS_NP}")
    };
    bed.write_manifest("lb", &service("lb", &spec(32000), &["a1", "a2", "b1"]));
    bed.start_proxy(&[]);
    let v4 = sock(testbed::NODE_A, 32000);
    let v6 = sock(testbed::NODE_A6, 32000);
    let probe = |to| {
        let mut last = Err(String::new());
        bed.eventually("the health check answers", || {
            last = http_get_from(&bed, "client", to);
            last.is_ok()
        });
        last.unwrap()
    };
    let (status, head, body) = probe(v4);
    assert_eq!(status, 200, "{head}{body}");
    assert!(head.contains("content-type: application/json"), "{head}");
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    assert!(
        head.contains("x-load-balancing-endpoint-weight: 2"),
        "{head}"
    );
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"service": {"namespace": "t", "name": "lb"}, "localEndpoints": 2, "serviceProxyHealthy": true})
    );
    assert_eq!(probe(v6).0, 200, "IPv6 address of the node");

    // Only a remote endpoint: drain this node.
    bed.write_manifest("lb", &service("lb", &spec(32000), &["b1"]));
    bed.eventually("503 without local endpoints", || {
        matches!(http_get_from(&bed, "client", v4), Ok((503, _, body)) if body.contains("\"localEndpoints\": 0"))
    });
    // Only a terminating local endpoint: still drained.
    bed.write_manifest(
        "lb",
        &service("lb", &spec(32000), &["a1:terminating", "b1"]),
    );
    if mode.is_userspace() {
        // No rule names an endpoint: wait for the local terminating endpoint to serve the
        // NodePort (eTP Local falls back to it).
        bed.eventually("a1 (terminating) serves the NodePort", || {
            bed.tcp("client", sock(testbed::NODE_A, 30045), None).pod() == Some("a1")
        });
    } else {
        bed.wait_for_rules("ip", "198.18.1.2");
    }
    // The health check is updated right after the rules of the same sync.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(http_get_from(&bed, "client", v4).unwrap().0, 503);
    bed.write_manifest("lb", &service("lb", &spec(32000), &["a1", "b1"]));
    bed.eventually("200 again", || {
        matches!(http_get_from(&bed, "client", v4), Ok((200, head, _)) if head.contains("weight: 1"))
    });

    // The port moves: the old one closes.
    bed.write_manifest("lb", &service("lb", &spec(32001), &["a1", "b1"]));
    bed.eventually("the new port answers", || {
        matches!(
            http_get_from(&bed, "client", sock(testbed::NODE_A, 32001)),
            Ok((200, _, _))
        )
    });
    assert_eq!(
        http_get_from(&bed, "client", v4).err().as_deref(),
        Some("ConnectionRefused")
    );
    // The Service goes away: nothing listens any more.
    bed.remove_manifest("lb");
    bed.eventually("the port closes", || {
        http_get_from(&bed, "client", sock(testbed::NODE_A, 32001))
            .err()
            .as_deref()
            == Some("ConnectionRefused")
    });
}

/// `--nodeport-addresses` with only an IPv4 CIDR on a dual-stack node: the IPv4 health check
/// listens on the node's address in the CIDR (and not on its other IPv4 addresses), IPv6 on
/// every IPv6 address (a family without a CIDR is not restricted, as upstream), and the node's
/// link-local addresses, which cannot be bound without their interface, do not stop either.
fn health_check_with_an_ipv4_only_node_port_addresses_flag(mode: Mode) {
    if !testbed::available() {
        return;
    }
    let mut bed = TestBed::new("hc4");
    bed.mode = mode;
    let spec = format!("  type: LoadBalancer\n  clusterIP: 198.19.0.46\n  clusterIPs: [198.19.0.46, \"2001:db8:19::46\"]\n  ipFamilyPolicy: PreferDualStack\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32002\n{PORTS_NP}");
    bed.write_manifest("lb", &service("lb", &spec, &["a1", "b1"]));
    bed.start_proxy(&["--nodeport-addresses=192.0.2.0/24"]);
    let mut last = Err(String::new());
    bed.eventually("the IPv4 health check answers", || {
        last = http_get_from(&bed, "client", sock(testbed::NODE_A, 32002));
        last.is_ok()
    });
    let (status, _, body) = last.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"localEndpoints\": 1"), "{body}");
    let (status, _, _) = http_get_from(&bed, "client", sock(testbed::NODE_A6, 32002)).unwrap();
    assert_eq!(status, 200, "IPv6 is not restricted by an IPv4 CIDR");
    // The node's pod-bridge address is outside the CIDR: nothing listens there.
    assert_eq!(
        http_get_from(&bed, "a1", sock("198.18.1.1", 32002))
            .err()
            .as_deref(),
        Some("ConnectionRefused")
    );
    let log = bed.proxy_log();
    assert!(
        !log.contains("Cannot open the health check node port"),
        "every address bound:\n{log}"
    );
}

/// Upstream's "Drop traffic to unallocated ClusterIPs": once the ServiceCIDRs are known, an
/// address inside them that no Service (of this proxy) holds is dropped instead of leaving
/// the node. In the bed, 198.19.0.99 is routed to pod b1 so that a packet that is not dropped
/// is answered: before the ServiceCIDR is known (and after it is gone) b1 answers; while it
/// is known, the same connection times out, for an address nobody has, a Service that was
/// just deleted and a Service labelled for another proxy; real ClusterIPs keep working.
#[test]
fn unallocated_cluster_ips_are_dropped_once_service_cidrs_are_known() {
    if !testbed::available() {
        return;
    }
    let mut bed = TestBed::new("cidr");
    bed.ip("b1", "addr add 198.19.0.99/32 dev eth0");
    bed.ip("node", "route add 198.19.0.99/32 via 192.0.2.11");
    bed.ip("nodeb", "route add 198.19.0.99/32 via 198.18.2.2");
    bed.write_manifest(
        "web",
        &service(
            "web",
            &format!("  clusterIP: 198.19.0.10\n{PORTS}"),
            &["a2"],
        ),
    );
    bed.start_proxy(&[]);
    let stray = sock("198.19.0.99", 8080);
    assert_eq!(bed.tcp("a1", stray, None).pod(), Some("b1"), "routed on");

    let cidrs = "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: kubernetes}\nspec: {cidrs: [198.19.0.0/16, \"2001:db8:19::/112\"]}\n";
    bed.write_manifest("servicecidr", cidrs);
    bed.wait_for_rules("ip", "Drop traffic to unallocated ClusterIPs");
    assert_eq!(bed.tcp("a1", stray, None), Outcome::Timeout, "from a pod");
    assert_eq!(
        bed.tcp("node", stray, None),
        Outcome::Timeout,
        "from the node"
    );
    assert_eq!(
        bed.tcp("a1", sock("198.19.0.10", 80), None).pod(),
        Some("a2"),
        "an allocated ClusterIP still works"
    );
    assert_eq!(
        bed.tcp("a1", sock("198.19.0.10", 81), None),
        Outcome::Refused,
        "a wrong port of a ClusterIP is still rejected"
    );
    // A Service at that address is served; deleted, its address is dropped again.
    bed.write_manifest(
        "gone",
        &service(
            "gone",
            "  clusterIP: 198.19.0.99\n  ports:\n  - {name: p, port: 8080, protocol: TCP}",
            &["a1"],
        ),
    );
    bed.eventually("the Service at 198.19.0.99 is served", || {
        bed.tcp("a2", stray, None).pod() == Some("a1")
    });
    bed.remove_manifest("gone");
    bed.eventually("the deleted Service's address is dropped", || {
        bed.tcp("a2", stray, None) == Outcome::Timeout
    });
    // A Service another proxy handles is not ours: its address is dropped too, as upstream.
    bed.write_manifest(
        "other",
        "apiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: t, labels: {service.kubernetes.io/service-proxy-name: other-proxy}}\nspec:\n  clusterIP: 198.19.0.99\n  ports: [{name: p, port: 8080}]\n",
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(bed.tcp("a1", stray, None), Outcome::Timeout);

    bed.remove_manifest("servicecidr");
    bed.eventually("without ServiceCIDRs nothing is dropped", || {
        bed.tcp("a1", stray, None).pod() == Some("b1")
    });
    let log = bed.proxy_log();
    assert!(
        !log.contains("Sync failed"),
        "the full resyncs for ServiceCIDR changes rewrite the table in place:\n{log}"
    );
}

/// Against an API server whose Node answer comes last: the proxy waits for its Node (as
/// upstream's NodeManager) and writes its first ruleset with the node's addresses, with no
/// failed sync on the way; NodePorts answer on the node's IP from the first sync.
#[test]
fn the_node_arriving_last_delays_the_first_sync() {
    if !testbed::available() {
        return;
    }
    let mut bed = TestBed::new("late");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();
    let fake = std::sync::Arc::new(std::sync::Mutex::new(fakeapi::Fake::default()));
    {
        let mut f = fake.lock().unwrap();
        let svc = serde_json::json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "t", "resourceVersion": "3"},
            "spec": {"type": "NodePort", "clusterIP": "198.19.0.101", "ports": [{"name": "p", "port": 80, "targetPort": 8080, "nodePort": 30101, "protocol": "TCP"}]}});
        f.service_lists.push_back(("3".into(), vec![svc]));
        f.slices = vec![
            serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "t", "resourceVersion": "4", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["198.18.1.2"], "nodeName": "node-a"}]}),
        ];
        f.nodes = vec![
            serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "resourceVersion": "5"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}]}}),
        ];
        f.node_delay = Some(Duration::from_secs(2));
    }
    let kubeconfig = start_against_fake_api(
        &mut bed,
        &fake,
        &[
            "--hostname-override=node-a",
            "--proxy-mode=nftables",
            "--cluster-cidr=198.18.0.0/16",
            "--healthz-bind-address=",
            "--metrics-bind-address=",
            "-v=2",
        ],
    );
    assert_eq!(
        bed.tcp("client", sock(testbed::NODE_A, 30101), None).pod(),
        Some("a1"),
        "{}",
        bed.proxy_log()
    );
    let log = bed.proxy_log();
    let waiting = log
        .find("Waiting for this node's Node object")
        .expect("waited for the Node");
    let ready = log.find("Node object is ready").expect("the Node came");
    let synced = log.find("\"Synced\"").unwrap();
    assert!(waiting < ready && ready < synced, "{log}");
    assert!(
        !log.lines().any(|l| l.starts_with('E')),
        "no error, no failed sync:\n{log}"
    );
    let _ = std::fs::remove_file(kubeconfig);
}

/// What only ipvs mode has (in the VM): a removed endpoint drains (weight 0; its established
/// connection keeps working, new ones go elsewhere), a restart keeps connections, every
/// scheduler upstream accepts is programmed and serves, the IPVS timeouts and strictARP
/// sysctls are set, foreign virtual servers inside `ipvs.excludeCIDRs` survive the syncs and
/// `--cleanup`, and `--cleanup` removes everything else (virtual servers, kube-ipvs0, ipsets,
/// chains).
fn ipvs_draining_schedulers_timeouts_and_cleanup(mode: Mode) {
    if !testbed::available() {
        return;
    }
    let mut bed = TestBed::new("ivs");
    bed.mode = mode;
    // Port 80 answers once (the pods' servers on 8080); port 81 is the pods' line-echo
    // server (8081), for long-lived connections.
    let d = |pods: &[&str]| {
        let endpoints: String = pods
            .iter()
            .map(|p| {
                format!(
                    "- {{addresses: [{}], nodeName: {}}}\n",
                    pod_ip(p, false),
                    node_of(p)
                )
            })
            .collect();
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: d, namespace: t}}\nspec:\n  clusterIP: 198.19.0.130\n  ports: [{{name: p, port: 80, targetPort: 8080}}, {{name: e, port: 81, targetPort: 8081}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: d-1, namespace: t, labels: {{kubernetes.io/service-name: d}}}}\naddressType: IPv4\nports: [{{name: p, port: 8080}}, {{name: e, port: 8081}}]\nendpoints:\n{endpoints}")
    };
    bed.write_manifest("d", &d(&["a1", "b1"]));
    for foreign in ["203.0.113.99:80", "198.51.100.99:80"] {
        bed.ip_netns_exec_checked("node", &["ipvsadm", "-A", "-t", foreign, "-s", "wrr"])
            .unwrap();
    }
    let base = [
        "--ipvs-exclude-cidrs=203.0.113.0/24",
        "--ipvs-strict-arp",
        "--ipvs-tcp-timeout=901s",
        "--ipvs-tcpfin-timeout=31s",
        "--ipvs-udp-timeout=301s",
    ];
    bed.start_proxy(&base);
    bed.wait_for_rules("ip", "-a -t 198.19.0.130:80 -r 198.18.2.2:8080");
    let saved = bed.ip_netns_exec("node", &["ipvsadm", "--save", "-n"]);
    assert!(
        saved.contains("-A -t 203.0.113.99:80 -s wrr"),
        "excluded: kept\n{saved}"
    );
    assert!(
        !saved.contains("198.51.100.99"),
        "not excluded: deleted\n{saved}"
    );
    let timeouts = bed.ip_netns_exec("node", &["ipvsadm", "-L", "--timeout"]);
    assert!(timeouts.contains("901 31 301"), "{timeouts}");
    for (key, value) in [("arp_ignore", "1"), ("arp_announce", "2")] {
        let path = format!("/proc/sys/net/ipv4/conf/all/{key}");
        assert_eq!(
            bed.ip_netns_exec("node", &["cat", &path]).trim(),
            value,
            "{key}"
        );
    }
    let addresses = bed.ip_netns_exec("node", &["ip", "-o", "addr", "show", "dev", "kube-ipvs0"]);
    assert!(addresses.contains("198.19.0.130/32"), "{addresses}");

    // An established connection to a1, kept across a restart and while a1 drains.
    let vip = sock("198.19.0.130", 80);
    let mut answers = Vec::new();
    let mut conn = (0..20)
        .map(|_| bed.connect("a2", sock("198.19.0.130", 81)))
        .find_map(|mut c| {
            let answer = c.exchange("hi");
            answers.push(format!("{answer:?}"));
            answer.ok()?.starts_with("a1 ").then_some(c)
        })
        .unwrap_or_else(|| panic!("no connection to a1: {answers:?}"));
    bed.stop_proxy();
    bed.start_proxy(&base);
    let answer = conn.exchange("after restart");
    assert!(
        answer.as_ref().is_ok_and(|a| a.starts_with("a1 ")),
        "{answer:?}\n{}",
        bed.proxy_log()
    );
    bed.write_manifest("d", &d(&["b1"]));
    bed.wait_for_rules("ip", "-a -t 198.19.0.130:81 -r 198.18.1.2:8081 -m -w 0");
    assert!(conn.exchange("draining").unwrap().starts_with("a1 "));
    assert_eq!(
        bed.tcp_spread("a2", vip, 10).0,
        pods(&["b1"]),
        "new connections"
    );
    drop(conn);

    // Every scheduler upstream accepts.
    bed.write_manifest("d", &d(&["a1", "b1"]));
    for scheduler in [
        "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "sh", "dh", "sed", "nq", "mh",
    ] {
        let flag = format!("--ipvs-scheduler={scheduler}");
        let mut args = base.to_vec();
        args.push(&flag);
        bed.start_proxy(&args);
        let expected = match scheduler {
            "mh" => "-A -t 198.19.0.130:80 -s mh -b mh-port".to_string(),
            other => format!("-A -t 198.19.0.130:80 -s {other}"),
        };
        bed.wait_for_rules("ip", &expected);
        assert!(
            bed.tcp("a2", vip, None).pod().is_some(),
            "{scheduler} serves"
        );
    }

    // --cleanup: everything but the excluded foreign server goes.
    bed.stop_proxy();
    let node = bed.ns("node");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &node, env!("CARGO_BIN_EXE_kube-proxy")])
        .args([
            "--cleanup",
            "--proxy-mode=ipvs",
            "--ipvs-exclude-cidrs=203.0.113.0/24",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let saved = bed.ip_netns_exec("node", &["ipvsadm", "--save", "-n"]);
    assert_eq!(saved.trim(), "-A -t 203.0.113.99:80 -s wrr");
    assert!(bed
        .ip_netns_exec_checked("node", &["ip", "link", "show", "kube-ipvs0"])
        .is_err());
    let sets = bed.ip_netns_exec("node", &["ipset", "list", "-n"]);
    assert!(!sets.contains("KUBE-"), "{sets}");
    // KUBE-MARK-MASQ stays, as in iptables mode's cleanup (kubelet shares it).
    let rules = bed.ip_netns_exec("node", &["iptables-nft-save"]);
    assert!(
        rules
            .lines()
            .all(|l| !l.contains("KUBE-") || l.contains("KUBE-MARK-MASQ")),
        "{rules}"
    );
}

/// The listener port userspace mode redirects `vip` (a `-d` of the rules) to.
fn userspace_port(bed: &TestBed, vip: &str) -> Option<u16> {
    let ruleset = bed.ruleset("ip");
    let port = |text: &str| text.split_whitespace().next()?.parse().ok();
    if bed.mode == Mode::UserspaceNft {
        return ruleset
            .lines()
            .find(|l| l.contains(&format!("ip daddr {vip} ")) && l.contains("redirect to :"))
            .and_then(|l| l.split("redirect to :").nth(1))
            .and_then(port);
    }
    ruleset
        .lines()
        .find(|l| l.contains("KUBE-PORTALS-CONTAINER") && l.contains(&format!("-d {vip}/32")))
        .and_then(|l| l.split("--to-ports ").nth(1))
        .and_then(port)
}

/// The proxy's open file descriptors.
fn open_fds(bed: &TestBed) -> usize {
    let pid = bed.proxy_pid().expect("the proxy runs");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// What only userspace mode does, with real connections: a dead endpoint (no host) and a
/// killed one (port closed) are skipped by the connect retry; 16 MiB go through the relay
/// both ways intact, ended by half-closes; an established connection keeps its endpoint
/// while new ones follow an endpoint change; a UDP client keeps its endpoint within
/// `--udp-timeout` and is balanced anew after it; a Service's listener closes with the
/// Service; and Services coming and going with traffic leak no file descriptor. The relay
/// counters are read from the metrics.
fn userspace_retries_transfers_udp_timeouts_and_listener_lifecycle(mode: Mode) {
    if !testbed::available() {
        return;
    }
    let mut bed = TestBed::new("usr");
    bed.mode = mode;
    // "retry": b1, an address where no host answers and a1 on a port nothing listens on.
    bed.write_manifest(
        "retry",
        "apiVersion: v1\nkind: Service\nmetadata: {name: retry, namespace: t}\nspec:\n  clusterIP: 198.19.0.80\n  ports:\n  - {name: p, port: 80, targetPort: 8080, protocol: TCP}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: retry-1\n  namespace: t\n  labels: {kubernetes.io/service-name: retry}\naddressType: IPv4\nports:\n- {name: p, port: 8080, protocol: TCP}\nendpoints:\n- {addresses: [198.18.1.99], nodeName: node-a, conditions: {ready: true}}\n- {addresses: [198.18.2.2], nodeName: node-b, conditions: {ready: true}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: retry-2\n  namespace: t\n  labels: {kubernetes.io/service-name: retry}\naddressType: IPv4\nports:\n- {name: p, port: 8090, protocol: TCP}\nendpoints:\n- {addresses: [198.18.1.2], nodeName: node-a, conditions: {ready: true}}\n",
    );
    let bulk = "  clusterIP: 198.19.0.81\n  ports:\n  - {name: p, port: 80, targetPort: 8082, protocol: TCP}";
    bed.write_manifest("bulk", &service_on("bulk", bulk, &["b1"], 8082));
    let echo = "  clusterIP: 198.19.0.82\n  ports:\n  - {name: p, port: 80, targetPort: 8081, protocol: TCP}";
    bed.write_manifest("echo", &service_on("echo", echo, &["a1"], 8081));
    bed.write_manifest(
        "dns",
        &service(
            "dns",
            &format!("  clusterIP: 198.19.0.83\n{PORTS}"),
            &["a1", "a2"],
        ),
    );
    bed.start_proxy(&["--udp-timeout=1s", "--metrics-bind-address=127.0.0.1:10249"]);
    bed.eventually("the udp Service redirected", || {
        userspace_port(&bed, "198.19.0.83").is_some()
    });

    // Every connection is answered by b1: the dead and the killed endpoint are retried away.
    let (answered, _) = bed.tcp_spread("a2", sock("198.19.0.80", 80), 12);
    assert_eq!(answered, pods(&["b1"]));
    let text = metrics_of(&bed);
    let failures = metric(
        &text,
        "kubeproxy_userspace_connect_failures_total{service_port=\"t/retry:p\",protocol=\"TCP\"}",
    );
    assert!(failures.is_some_and(|n| n >= 8.0), "{text}");
    let opened = metric(
        &text,
        "kubeproxy_userspace_connections_opened_total{service_port=\"t/retry:p\",protocol=\"TCP\"}",
    );
    assert_eq!(opened, Some(12.0), "{text}");

    // The control: straight to the pod.
    let direct = testbed::bulk_echo(&bed.ns("a1"), sock("198.18.2.2", 8082), 16 << 20).unwrap();
    assert_eq!(direct.received_hash, direct.sent_hash);
    // 16 MiB each way through the relay, from a pod and from outside, intact.
    for from in ["a1", "client"] {
        let transfer = testbed::bulk_echo(&bed.ns(from), sock("198.19.0.81", 80), 16 << 20)
            .unwrap_or_else(|e| panic!("from {from}: {e}"));
        assert_eq!(transfer.received, transfer.sent, "from {from}");
        assert_eq!(transfer.received_hash, transfer.sent_hash, "from {from}");
    }
    let text = metrics_of(&bed);
    for direction in ["to_endpoint", "to_client"] {
        let bytes = metric(
            &text,
            &format!("kubeproxy_userspace_relayed_bytes_total{{service_port=\"t/bulk:p\",protocol=\"TCP\",direction=\"{direction}\"}}"),
        );
        assert_eq!(bytes, Some((32u64 << 20) as f64), "{direction}: {text}");
    }

    // An established connection keeps its endpoint; new connections follow the change.
    let mut held = bed.connect("client", sock("198.19.0.82", 80));
    assert_eq!(held.exchange("one").unwrap(), "a1 one");
    bed.write_manifest("echo", &service_on("echo", echo, &["b1"], 8081));
    bed.eventually("new connections reach b1", || {
        bed.connect("client", sock("198.19.0.82", 80))
            .exchange("probe")
            .is_ok_and(|a| a.starts_with("b1"))
    });
    assert_eq!(held.exchange("two").unwrap(), "a1 two");
    let text = metrics_of(&bed);
    assert!(
        metric(
            &text,
            "kubeproxy_userspace_active_relays{service_port=\"t/echo:p\",protocol=\"TCP\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    drop(held);

    // UDP: the same client address keeps its endpoint while it talks within the timeout,
    // and after a second of silence it is balanced anew (round robin: the other pod).
    let vip = sock("198.19.0.83", 80);
    let first = bed
        .udp_from_port("client", vip, 40100)
        .pod()
        .map(str::to_string);
    assert!(first.is_some());
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            bed.udp_from_port("client", vip, 40100)
                .pod()
                .map(str::to_string),
            first,
            "within the timeout"
        );
    }
    std::thread::sleep(Duration::from_millis(1600));
    let after = bed
        .udp_from_port("client", vip, 40100)
        .pod()
        .map(str::to_string);
    assert!(
        after.is_some() && after != first,
        "{first:?} then {after:?}"
    );

    // A TCP listener is one listening socket per relay thread (one SO_REUSEPORT group), and
    // removing a Service closes all of them.
    let port = userspace_port(&bed, "198.19.0.82").expect("the echo Service's listener");
    let sockets = |port: u16| {
        bed.ip_netns_exec("node", &["ss", "-Htln", &format!("sport = :{port}")])
            .lines()
            .filter(|l| l.contains(&format!(":{port}")))
            .count()
    };
    let listening = |port: u16| sockets(port) > 0;
    let relay_threads =
        std::fs::read_dir(format!("/proc/{}/task", bed.proxy_pid().expect("running")))
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|name| name.starts_with("relay-"))
            .count();
    assert!(relay_threads >= 2, "{relay_threads} relay threads");
    assert_eq!(
        sockets(port),
        relay_threads,
        "one listening socket per relay thread"
    );
    bed.remove_manifest("echo");
    bed.eventually("the listener closed", || !listening(port));
    assert!(userspace_port(&bed, "198.19.0.82").is_none());

    // Churn: Services with traffic come and go; the proxy's descriptors come back to where
    // they were (listeners, relays, pipes and UDP flows all closed).
    let churn = |round: usize| {
        for i in 0..5 {
            bed.write_manifest(
                &format!("churn{i}"),
                &service(
                    &format!("churn{i}"),
                    &format!("  clusterIP: 198.19.1.{}\n{PORTS}", 10 + i),
                    &["a1", "b1"],
                ),
            );
        }
        for i in 0..5 {
            let vip = sock(&format!("198.19.1.{}", 10 + i), 80);
            bed.eventually(&format!("round {round}: churn{i} serves"), || {
                bed.tcp("a2", vip, None).pod().is_some() && bed.udp("a2", vip, None).pod().is_some()
            });
        }
        for i in 0..5 {
            bed.remove_manifest(&format!("churn{i}"));
        }
        bed.eventually(&format!("round {round}: churn gone"), || {
            !bed.ruleset("ip").contains("198.19.1.")
        });
        // UDP flows end after the timeout.
        std::thread::sleep(Duration::from_millis(1500));
    };
    churn(0);
    let baseline = open_fds(&bed);
    for round in 1..6 {
        churn(round);
    }
    let after = open_fds(&bed);
    assert!(
        after <= baseline + 2,
        "file descriptors: {baseline} after the first round, {after} after five more"
    );
}

/// userspace mode's two redirect paths and the switches between them and nftables mode,
/// with real connections: iptables (upstream's chains), then nftables (its own table, as on
/// a node without iptables: the iptables chains go after its first sync), then nftables
/// mode (the userspace table goes), and `--cleanup`; a wrong path is refused at start.
fn userspace_redirect_paths_and_mode_switches(mode: Mode) {
    if !testbed::available() {
        return;
    }
    assert_eq!(mode, Mode::Userspace, "the case switches modes itself");
    let mut bed = TestBed::new("usredir");
    bed.mode = mode;
    bed.write_manifest(
        "web",
        &service(
            "web",
            "  type: NodePort\n  clusterIP: 198.19.0.90\n  ports:\n  - {name: p, port: 80, targetPort: 8080, nodePort: 30090, protocol: TCP}",
            &["a1", "b1"],
        ),
    );
    let vip = sock("198.19.0.90", 80);
    let node_port = sock(testbed::NODE_A, 30090);
    let both = pods(&["a1", "b1"]);
    let userspace_table = |bed: &TestBed| {
        bed.ip_netns_exec("node", &["nft", "list", "tables"])
            .contains("kube-proxy-userspace")
    };
    let portals = |bed: &TestBed| {
        bed.ip_netns_exec("node", &["iptables-nft-save", "-t", "nat"])
            .contains("KUBE-PORTALS-CONTAINER")
    };

    // 1. iptables (this node has it): upstream's chains, no table of ours.
    bed.start_proxy(&[]);
    assert!(
        bed.proxy_log().contains("redirects=\"iptables\""),
        "{}",
        bed.proxy_log()
    );
    assert!(portals(&bed) && !userspace_table(&bed));
    assert_eq!(bed.tcp_spread("a2", vip, 20).0, both);

    // 2. nftables: the same frontends from every client, the iptables chains gone.
    bed.mode = Mode::UserspaceNft;
    bed.start_proxy(&[]);
    assert!(
        bed.proxy_log().contains("redirects=\"nftables\""),
        "{}",
        bed.proxy_log()
    );
    bed.eventually("the iptables chains removed after the first sync", || {
        !portals(&bed)
    });
    assert!(userspace_table(&bed));
    for from in ["a2", "client", "node"] {
        assert_eq!(bed.tcp_spread(from, vip, 20).0, both, "{from}");
    }
    assert_eq!(bed.tcp_spread("client", node_port, 20).0, both);
    let port = userspace_port(&bed, "198.19.0.90").expect("a redirect to a listener");
    assert!(
        bed.ruleset("ip")
            .contains(&format!("dnat to 192.0.2.10:{port}")),
        "the node's own traffic goes to its address: {}",
        bed.ruleset("ip")
    );

    // 3. nftables mode takes over: the userspace table goes once its rules are in place.
    bed.mode = Mode::Nftables;
    bed.start_proxy(&[]);
    bed.eventually("the userspace table removed", || !userspace_table(&bed));
    assert_eq!(bed.tcp_spread("a2", vip, 20).0, both);

    // 4. --cleanup removes the userspace table too.
    bed.mode = Mode::UserspaceNft;
    bed.start_proxy(&[]);
    assert!(userspace_table(&bed));
    bed.stop_proxy();
    bed.ip_netns_exec_checked("node", &[env!("CARGO_BIN_EXE_kube-proxy"), "--cleanup"])
        .expect("--cleanup succeeds");
    assert!(!userspace_table(&bed));

    // 5. A path that does not exist is refused before anything is touched.
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &bed.ns("node"),
            env!("CARGO_BIN_EXE_kube-proxy"),
        ])
        .args(["--proxy-mode=userspace", "--hostname-override=node-a"])
        .arg(format!("--manifests={}", bed.manifests.display()))
        .env("KUBE_PROXY_USERSPACE_REDIRECT", "ipchains")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("invalid KUBE_PROXY_USERSPACE_REDIRECT \"ipchains\": allowed values are \"auto\", \"iptables\" and \"nftables\""),
        "{stderr}"
    );
    assert!(!userspace_table(&bed) && !portals(&bed));
}

/// Someone else's edits of userspace mode's redirects, on either path: a flushed portals
/// chain, then the jump to it (iptables) or the whole table (nftables) deleted. Each is found
/// by the next sync after the sync period, logged and repaired; the Service answers again.
fn userspace_foreign_edits_are_found_and_repaired(mode: Mode) {
    if !testbed::available() {
        return;
    }
    let mut bed = TestBed::new("usedit");
    bed.mode = mode;
    let spec = format!("  clusterIP: 198.19.0.141\n{PORTS}");
    bed.write_manifest("rep", &service("rep", &spec, &["a1", "b1"]));
    bed.start_proxy(&["--iptables-sync-period=2s"]);
    let vip = sock("198.19.0.141", 80);
    let both = pods(&["a1", "b1"]);
    assert_eq!(bed.tcp_spread("a2", vip, 20).0, both);
    let iptables = mode.save_tool("ip").replace("-save", "");
    let edits: [&[&str]; 2] = if mode == Mode::UserspaceNft {
        [
            &[
                "nft",
                "flush chain ip kube-proxy-userspace portals-container",
            ],
            &["nft", "delete table ip kube-proxy-userspace"],
        ]
    } else {
        [
            &[&iptables, "-t", "nat", "-F", "KUBE-PORTALS-CONTAINER"],
            &[&iptables, "-t", "nat", "-F", "PREROUTING"],
        ]
    };
    for (i, edit) in edits.iter().enumerate() {
        bed.ip_netns_exec_checked("node", edit)
            .unwrap_or_else(|e| panic!("{edit:?}: {e}"));
        let edited = std::time::Instant::now();
        bed.eventually(&format!("the edit {edit:?} repaired"), || {
            bed.proxy_log().matches("someone else").count() > i
        });
        bed.eventually("the Service answers again", || {
            bed.tcp_spread("a2", vip, 20).0 == both
        });
        println!("{mode:?}: {edit:?} repaired after {:?}", edited.elapsed());
    }
}
