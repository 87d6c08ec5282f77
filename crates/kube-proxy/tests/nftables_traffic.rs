//! The nftables dataplane proven with real packets: the proxy binary runs in node-a of the
//! test bed (see testbed/mod.rs) on manifests, and clients in the client, node and pod
//! namespaces connect to Service frontends. Each test checks which pods answer (all of them,
//! no others), the source address the pod saw (masqueraded or not), and refused versus dropped.

mod testbed;

use testbed::{ipaddr, sock, Outcome, TestBed, PODS};

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
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: t}}\nspec:\n{spec}\n"
    );
    for (family, v6) in [("IPv4", false), ("IPv6", true)] {
        yaml.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{}\n  namespace: t\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: {family}\nports:\n- {{name: p, port: 8080, protocol: TCP}}\n- {{name: u, port: 8080, protocol: UDP}}\nendpoints:\n",
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

fn pods(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn cluster_ip_from_pods_node_and_outside() {
    if !testbed::available() {
        return;
    }
    let mut bed = TestBed::new("cip");
    bed.write_manifest(
        "web",
        &service("web", &format!("  clusterIP: 198.19.0.10\n  clusterIPs: [198.19.0.10, \"2001:db8:19::10\"]\n  ipFamilyPolicy: PreferDualStack\n{PORTS}"), &["a1", "a2", "b1"]),
    );
    bed.start_proxy(&[]);
    bed.wait_for_rules("ip", "198.19.0.10 . udp . 80 : 198.18.2.2 . 8080");
    let vip = sock("198.19.0.10", 80);

    // From a local pod: every endpoint answers, and none is masqueraded.
    let (answered, sources) = bed.tcp_spread("a1", vip, 40);
    let mut expected_pods = pods(&["a1", "a2", "b1"]);
    expected_pods.sort();
    assert_eq!(answered, expected_pods);
    // a1 reaching itself is hairpin traffic (masqueraded to the bridge address), the others see a1.
    assert!(sources.contains(&ipaddr("198.18.1.2")), "{sources:?}");
    assert!(
        sources
            .iter()
            .all(|s| *s == ipaddr("198.18.1.2") || *s == ipaddr("198.18.1.1")),
        "{sources:?}"
    );

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
    assert!(sources.contains(&ipaddr("2001:db8:18:1::3")), "{sources:?}");

    // A port the Service does not have is rejected, not dropped.
    assert_eq!(
        bed.tcp("a1", sock("198.19.0.10", 81), None),
        Outcome::Refused
    );
}

#[test]
fn no_endpoints_rejects_and_endpoint_changes_are_followed() {
    if !testbed::available() {
        return;
    }
    let mut bed = TestBed::new("chg");
    bed.write_manifest(
        "s",
        &service("s", &format!("  clusterIP: 198.19.0.20\n{PORTS}"), &[]),
    );
    bed.start_proxy(&[]);
    bed.wait_for_rules("ip", "198.19.0.20 . tcp . 80");
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
}
