//! The userspace dataplane against a fake relay and the in-memory iptables: the listeners and
//! rules of upstream's userspace proxier for a Service, the traffic policies, the order of
//! opening and closing, recovery from a failed restore, and partial syncs that agree with a
//! full one.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;

use kube_proxy_iptables::fake::FakeIptables;
use kube_proxy_iptables::proxier::{RestoreError, Restorer};
use kube_proxy_model::dataplane::NodeView;
use kube_proxy_model::testing::{apply, web, web_slice};
use kube_proxy_model::{ClusterState, Dataplane, FamilyPlan, IpFamily, Protocol, SyncInput};
use serde_json::json;

use crate::desired::{Class, ListenerKey, ListenerSpec};
use crate::proxier::{UserspaceConfig, UserspaceProxier};
use crate::redirect::iptables::IptablesRedirects;
use crate::redirect::nft::NftRedirects;
use crate::redirect::Redirects;
use crate::relay::ListenerControl;

/// Listeners in memory: what is open, in which order things happened.
#[derive(Default)]
struct FakeRelay {
    open: BTreeMap<(IpFamily, ListenerKey), (u16, ListenerSpec)>,
    claims: BTreeSet<(IpFamily, Protocol, u16)>,
    next_port: u16,
    log: Vec<String>,
    /// Ports `open` finds taken by someone else.
    busy: BTreeSet<u16>,
}

impl ListenerControl for FakeRelay {
    fn open(
        &mut self,
        family: IpFamily,
        key: &ListenerKey,
        spec: &ListenerSpec,
        candidates: &[u16],
    ) -> io::Result<u16> {
        let port = match candidates.iter().find(|p| !self.busy.contains(p)) {
            Some(0) => {
                self.next_port += 1;
                40000 + self.next_port
            }
            Some(p) => *p,
            None => return Err(io::Error::new(io::ErrorKind::AddrInUse, "range exhausted")),
        };
        assert!(
            self.open
                .insert((family, key.clone()), (port, spec.clone()))
                .is_none(),
            "{key} opened twice"
        );
        self.log.push(format!("open {key} {port}"));
        Ok(port)
    }

    fn update(
        &mut self,
        family: IpFamily,
        key: &ListenerKey,
        spec: &ListenerSpec,
    ) -> io::Result<()> {
        let entry = self.open.get_mut(&(family, key.clone())).expect("open");
        entry.1 = spec.clone();
        self.log.push(format!("update {key}"));
        Ok(())
    }

    fn close(&mut self, family: IpFamily, key: &ListenerKey) {
        assert!(
            self.open.remove(&(family, key.clone())).is_some(),
            "{key} not open"
        );
        self.log.push(format!("close {key}"));
    }

    fn claim_node_port(
        &mut self,
        family: IpFamily,
        protocol: Protocol,
        port: u16,
    ) -> io::Result<()> {
        self.claims.insert((family, protocol, port));
        Ok(())
    }

    fn release_node_port(&mut self, family: IpFamily, protocol: Protocol, port: u16) {
        self.claims.remove(&(family, protocol, port));
    }
}

/// The in-memory iptables, failing the next restore when asked.
#[derive(Default)]
struct Iptables {
    fake: FakeIptables,
    fail_next: bool,
}

impl Restorer for Iptables {
    fn restore(&mut self, family: IpFamily, input: &str) -> Result<(), RestoreError> {
        if std::mem::take(&mut self.fail_next) {
            return Err(RestoreError::Rejected("injected".into()));
        }
        self.fake.restore(family, input)
    }
    fn save(&mut self, family: IpFamily) -> Result<String, RestoreError> {
        self.fake.save(family)
    }
    fn chain_rules(
        &mut self,
        family: IpFamily,
        table: &str,
        chain: &str,
    ) -> Result<Option<usize>, RestoreError> {
        self.fake.chain_rules(family, table, chain)
    }
}

type Proxier = UserspaceProxier<FakeRelay, IptablesRedirects<Iptables>>;

fn node() -> NodeView {
    NodeView {
        node_ips: vec!["192.0.2.10".parse().unwrap()],
        ..Default::default()
    }
}

fn proxier() -> Proxier {
    UserspaceProxier::new(
        UserspaceConfig::default(),
        FakeRelay::default(),
        IptablesRedirects::new(Iptables::default()),
    )
}

fn sync<D: Redirects>(
    proxier: &mut UserspaceProxier<FakeRelay, D>,
    state: &mut ClusterState,
    plan: &mut FamilyPlan,
    full: bool,
) {
    try_sync(proxier, state, plan, full).unwrap_or_else(|e| panic!("{e}"));
}

fn try_sync<D: Redirects>(
    proxier: &mut UserspaceProxier<FakeRelay, D>,
    state: &mut ClusterState,
    plan: &mut FamilyPlan,
    full: bool,
) -> Result<kube_proxy_model::SyncReport, kube_proxy_model::SyncError> {
    let changes = state.take_changes();
    let changed = plan.update(
        state,
        IpFamily::V4,
        &changes.services,
        changes.full || full,
        Default::default(),
    );
    proxier.sync(SyncInput {
        family: IpFamily::V4,
        plan,
        changed: &changed,
        full,
        node: &node(),
        service_cidrs: &[],
    })
}

fn key(class: Class) -> ListenerKey {
    ListenerKey {
        name: kube_proxy_model::ServicePortName::new("ns", "web", "http", Protocol::Tcp),
        class,
    }
}

fn chain(proxier: &Proxier, table: &str, chain: &str) -> Vec<String> {
    proxier.redirects().restorer.fake.families[&IpFamily::V4][table]
        .get(chain)
        .cloned()
        .unwrap_or_default()
}

fn endpoints<D: Redirects>(
    proxier: &UserspaceProxier<FakeRelay, D>,
    class: Class,
) -> Vec<SocketAddr> {
    proxier.listeners().open[&(IpFamily::V4, key(class))]
        .1
        .endpoints
        .clone()
}

fn sa(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// A LoadBalancer Service with an external IP, a NodePort, ClientIP affinity and
/// `source_ranges`.
fn load_balancer_object(source_ranges: &[&str]) -> k8s_openapi::api::core::v1::Service {
    serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": "web"},
        "spec": {"type": "LoadBalancer", "clusterIP": "198.19.0.10", "externalIPs": ["198.51.100.1"],
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080, "protocol": "TCP"}],
            "loadBalancerSourceRanges": source_ranges,
            "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 300}}},
        "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.2"}]}}}))
    .unwrap()
}

/// `proxier` after a full sync of [`load_balancer_service`], with the state, the plan and the
/// ports of the cluster and external listeners.
fn synced_load_balancer<D: Redirects>(
    mut proxier: UserspaceProxier<FakeRelay, D>,
) -> (
    UserspaceProxier<FakeRelay, D>,
    ClusterState,
    FamilyPlan,
    u16,
    u16,
) {
    let mut state = ClusterState::new("node-a");
    let mut plan = FamilyPlan::default();
    load_balancer_service(&mut state);
    sync(&mut proxier, &mut state, &mut plan, true);
    let ports = proxier.ports(IpFamily::V4);
    let (cluster, external) = (ports[&key(Class::Cluster)], ports[&key(Class::External)]);
    (proxier, state, plan, cluster, external)
}

/// [`load_balancer_object`] without source ranges, with two endpoints.
fn load_balancer_service(state: &mut ClusterState) {
    state.apply_service(&load_balancer_object(&[]));
    apply(
        state,
        web_slice(&[("198.18.1.2", "node-a"), ("198.18.2.2", "node-b")]),
    );
}

#[test]
fn a_node_port_service_gets_upstreams_portal_rules_and_its_listeners() {
    let (mut proxier, mut state, mut plan, cluster, external) = synced_load_balancer(proxier());
    let ports = proxier.ports(IpFamily::V4);
    assert_ne!(cluster, external);
    let both = vec![sa("198.18.1.2:8080"), sa("198.18.2.2:8080")];
    assert_eq!(endpoints(&proxier, Class::Cluster), both);
    assert_eq!(endpoints(&proxier, Class::External), both);
    let spec = &proxier.listeners().open[&(IpFamily::V4, key(Class::Cluster))].1;
    assert_eq!(spec.affinity, Some(std::time::Duration::from_secs(300)));
    assert_eq!(
        proxier.listeners().claims,
        [(IpFamily::V4, Protocol::Tcp, 30080)].into()
    );

    let c = "-m comment --comment \"ns/web:http\" -p tcp -m tcp";
    assert_eq!(
        chain(&proxier, "nat", "KUBE-PORTALS-CONTAINER"),
        vec![
            format!("{c} --dport 80 -d 198.19.0.10/32 -j REDIRECT --to-ports {cluster}"),
            format!("{c} --dport 80 -d 198.51.100.1/32 -m physdev ! --physdev-is-in -j REDIRECT --to-ports {external}"),
            format!("{c} --dport 80 -d 198.51.100.1/32 -m addrtype --dst-type LOCAL -j REDIRECT --to-ports {external}"),
            format!("{c} --dport 80 -d 198.51.100.2/32 -j REDIRECT --to-ports {external}"),
        ]
    );
    assert_eq!(
        chain(&proxier, "nat", "KUBE-PORTALS-HOST"),
        vec![
            format!("{c} --dport 80 -d 198.19.0.10/32 -j DNAT --to-destination 192.0.2.10:{cluster}"),
            format!("{c} --dport 80 -d 198.51.100.1/32 -m addrtype --dst-type LOCAL -j DNAT --to-destination 192.0.2.10:{external}"),
            format!("{c} --dport 80 -d 198.51.100.2/32 -j DNAT --to-destination 192.0.2.10:{external}"),
        ]
    );
    assert_eq!(
        chain(&proxier, "nat", "KUBE-NODEPORT-CONTAINER"),
        vec![format!(
            "{c} --dport 30080 -j REDIRECT --to-ports {external}"
        )]
    );
    assert_eq!(
        chain(&proxier, "nat", "KUBE-NODEPORT-HOST"),
        vec![format!(
            "{c} --dport 30080 -j DNAT --to-destination 192.0.2.10:{external}"
        )]
    );
    assert_eq!(
        chain(&proxier, "filter", "KUBE-NODEPORT-NON-LOCAL"),
        vec![format!(
            "{c} --dport {external} -m state --state NEW -j ACCEPT"
        )]
    );
    // The jumps: portals first in PREROUTING/OUTPUT, NodePorts last, INPUT's accept first.
    let prerouting = chain(&proxier, "nat", "PREROUTING");
    assert!(
        prerouting[0].ends_with("-j KUBE-PORTALS-CONTAINER"),
        "{prerouting:?}"
    );
    assert!(
        prerouting
            .last()
            .unwrap()
            .starts_with("-m addrtype --dst-type LOCAL")
            && prerouting
                .last()
                .unwrap()
                .ends_with("-j KUBE-NODEPORT-CONTAINER"),
        "{prerouting:?}"
    );
    assert_eq!(chain(&proxier, "nat", "OUTPUT").len(), 2);
    assert_eq!(chain(&proxier, "filter", "INPUT").len(), 1);
    // A second full sync finds the jumps and adds none.
    sync(&mut proxier, &mut state, &mut plan, true);
    assert_eq!(chain(&proxier, "nat", "PREROUTING").len(), 2);
    assert_eq!(proxier.ports(IpFamily::V4), ports, "listeners kept");
}

#[test]
fn traffic_policies_pick_each_listeners_endpoints() {
    let mut proxier = proxier();
    let mut state = ClusterState::new("node-a");
    let mut plan = FamilyPlan::default();
    apply(
        &mut state,
        web(json!({"type": "NodePort", "externalTrafficPolicy": "Local",
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]})),
    );
    apply(
        &mut state,
        web_slice(&[("198.18.1.2", "node-a"), ("198.18.2.2", "node-b")]),
    );
    sync(&mut proxier, &mut state, &mut plan, true);
    assert_eq!(
        endpoints(&proxier, Class::Cluster),
        vec![sa("198.18.1.2:8080"), sa("198.18.2.2:8080")]
    );
    assert_eq!(
        endpoints(&proxier, Class::External),
        vec![sa("198.18.1.2:8080")],
        "eTP Local: this node's endpoint only"
    );
    // No local endpoint: the external listener refuses, the ClusterIP one still serves.
    apply(&mut state, web_slice(&[("198.18.2.2", "node-b")]));
    sync(&mut proxier, &mut state, &mut plan, false);
    assert!(endpoints(&proxier, Class::External).is_empty());
    assert_eq!(
        endpoints(&proxier, Class::Cluster),
        vec![sa("198.18.2.2:8080")]
    );
    // iTP Local: the ClusterIP listener gets the local endpoints only.
    apply(&mut state, web(json!({"internalTrafficPolicy": "Local"})));
    apply(
        &mut state,
        web_slice(&[("198.18.1.2", "node-a"), ("198.18.2.2", "node-b")]),
    );
    sync(&mut proxier, &mut state, &mut plan, false);
    assert_eq!(
        endpoints(&proxier, Class::Cluster),
        vec![sa("198.18.1.2:8080")]
    );
    assert!(
        !proxier
            .listeners()
            .open
            .contains_key(&(IpFamily::V4, key(Class::External))),
        "no external frontend, no external listener"
    );
    assert!(proxier.listeners().claims.is_empty(), "NodePort released");
}

#[test]
fn listeners_open_before_rules_and_close_after_and_a_failed_restore_keeps_them() {
    let mut proxier = proxier();
    let mut state = ClusterState::new("node-a");
    let mut plan = FamilyPlan::default();
    apply(&mut state, web(json!({})));
    apply(&mut state, web_slice(&[("198.18.1.2", "node-a")]));
    sync(&mut proxier, &mut state, &mut plan, true);
    let port = proxier.ports(IpFamily::V4)[&key(Class::Cluster)];

    // The Service goes, but iptables-restore fails: the rules still point at the listener,
    // so it stays open; the next sync is full and removes both.
    state.delete_service(&kube_proxy_model::NamespacedName::new("ns", "web"));
    proxier.redirects_mut().restorer.fail_next = true;
    assert!(try_sync(&mut proxier, &mut state, &mut plan, false).is_err());
    assert!(proxier
        .listeners()
        .open
        .contains_key(&(IpFamily::V4, key(Class::Cluster))));
    assert!(!chain(&proxier, "nat", "KUBE-PORTALS-CONTAINER").is_empty());
    let report = try_sync(&mut proxier, &mut state, &mut plan, false).unwrap();
    assert!(report.full, "after a failure the sync is full");
    assert!(chain(&proxier, "nat", "KUBE-PORTALS-CONTAINER").is_empty());
    assert!(proxier.listeners().open.is_empty());
    assert_eq!(
        proxier.listeners().log,
        vec![
            format!("open ns/web:http (cluster) {port}"),
            "close ns/web:http (cluster)".to_string()
        ]
    );
}

#[test]
fn a_port_range_is_honoured_and_sctp_is_skipped_with_a_warning() {
    let mut proxier = UserspaceProxier::new(
        UserspaceConfig {
            port_range: Some((45000, 45001)),
            ..Default::default()
        },
        FakeRelay {
            busy: [45000].into(),
            ..Default::default()
        },
        IptablesRedirects::new(Iptables::default()),
    );
    let mut state = ClusterState::new("node-a");
    let mut plan = FamilyPlan::default();
    apply(&mut state, web(json!({})));
    apply(
        &mut state,
        json!({"kind": "Service", "metadata": {"namespace": "ns", "name": "sctp"},
            "spec": {"clusterIP": "198.19.0.11", "ports": [{"name": "s", "port": 80, "protocol": "SCTP"}]}}),
    );
    sync(&mut proxier, &mut state, &mut plan, true);
    assert_eq!(
        proxier.ports(IpFamily::V4)[&key(Class::Cluster)],
        45001,
        "45000 is taken"
    );
    let warnings = proxier.take_warnings();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("ns/sctp:s") && w.contains("SCTP")),
        "{warnings:?}"
    );
    assert!(proxier.take_warnings().is_empty(), "warned once");
    // The range is exhausted for a second Service: it is left unserved, with a warning.
    apply(
        &mut state,
        json!({"kind": "Service", "metadata": {"namespace": "ns", "name": "more"},
            "spec": {"clusterIP": "198.19.0.12", "ports": [{"name": "p", "port": 80}]}}),
    );
    sync(&mut proxier, &mut state, &mut plan, false);
    let warnings = proxier.take_warnings();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("ns/more:p") && w.contains("range exhausted")),
        "{warnings:?}"
    );
}

/// Random changes, each a partial sync; every 25 steps the rules must equal (as sets: a
/// partial sync appends) what a fresh proxier's full sync writes for the same ports, and
/// the listeners must be those the plan asks for.
#[test]
fn partial_syncs_equal_one_full_sync() {
    let mut changes = kube_proxy_model::testing::RandomChanges::new(0x5eed_1234_abcd);
    let mut state = ClusterState::new("node-a");
    let mut plan = FamilyPlan::default();
    let mut proxier = proxier();
    sync(&mut proxier, &mut state, &mut plan, true);
    for step in 0..300 {
        changes.apply_one(&mut state);
        let report = try_sync(&mut proxier, &mut state, &mut plan, false)
            .unwrap_or_else(|e| panic!("step {step}: {e}"));
        assert!(!report.full, "step {step}");
        if step % 25 == 24 {
            // A full sync of the same proxier rewrites the chains in order; the partial
            // result must hold the same rules.
            let partial = proxier.redirects().restorer.fake.families.clone();
            sync(&mut proxier, &mut state, &mut plan, true);
            let full = &proxier.redirects().restorer.fake.families;
            for (table, chains) in &full[&IpFamily::V4] {
                for (name, rules) in chains {
                    let mut a = partial[&IpFamily::V4][table]
                        .get(name)
                        .cloned()
                        .unwrap_or_default();
                    let mut b = rules.clone();
                    a.sort();
                    b.sort();
                    assert_eq!(a, b, "step {step}: {table} {name}");
                }
            }
            let open: BTreeSet<ListenerKey> = proxier
                .listeners()
                .open
                .keys()
                .map(|(_, k)| k.clone())
                .collect();
            let wanted: BTreeSet<ListenerKey> = crate::desired::listeners(&plan)
                .listeners
                .into_keys()
                .collect();
            assert_eq!(open, wanted, "step {step}");
        }
    }
}

#[test]
fn load_balancer_source_ranges_limit_who_is_redirected() {
    let mut proxier = proxier();
    let mut state = ClusterState::new("node-a");
    let mut plan = FamilyPlan::default();
    state.apply_service(
        &serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": "web"},
            "spec": {"type": "LoadBalancer", "clusterIP": "198.19.0.10",
                "loadBalancerSourceRanges": ["203.0.113.0/25", "2001:db8::/64"],
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080, "protocol": "TCP"}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.2"}]}}}))
        .unwrap(),
    );
    apply(&mut state, web_slice(&[("198.18.1.2", "node-a")]));
    sync(&mut proxier, &mut state, &mut plan, true);
    let external = proxier.ports(IpFamily::V4)[&key(Class::External)];
    let lb: Vec<String> = chain(&proxier, "nat", "KUBE-PORTALS-CONTAINER")
        .into_iter()
        .filter(|r| r.contains("198.51.100.2"))
        .collect();
    assert_eq!(
        lb,
        vec![format!("-m comment --comment \"ns/web:http\" -p tcp -m tcp --dport 80 -d 198.51.100.2/32 -s 203.0.113.0/25 -j REDIRECT --to-ports {external}")],
        "only the IPv4 range, and nothing for other sources"
    );
    // NodePorts are not limited by the ranges.
    assert_eq!(chain(&proxier, "nat", "KUBE-NODEPORT-CONTAINER").len(), 1);
}

#[test]
fn the_nodes_own_traffic_goes_to_an_address_the_host_holds() {
    let mut proxier = proxier();
    let mut state = ClusterState::new("node-a");
    let mut plan = FamilyPlan::default();
    apply(&mut state, web(json!({})));
    apply(&mut state, web_slice(&[("198.18.1.2", "node-a")]));
    let changed = plan.update(
        &state,
        IpFamily::V4,
        &Default::default(),
        true,
        Default::default(),
    );
    // The InternalIP is not on an interface here: the first usable local address serves.
    let node = NodeView {
        node_ips: vec!["192.0.2.10".parse().unwrap()],
        local_addresses: ["127.0.0.1", "169.254.1.1", "198.18.1.1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect(),
        ..Default::default()
    };
    proxier
        .sync(SyncInput {
            family: IpFamily::V4,
            plan: &plan,
            changed: &changed,
            full: true,
            node: &node,
            service_cidrs: &[],
        })
        .unwrap();
    let port = proxier.ports(IpFamily::V4)[&key(Class::Cluster)];
    assert_eq!(
        chain(&proxier, "nat", "KUBE-PORTALS-HOST"),
        vec![format!("-m comment --comment \"ns/web:http\" -p tcp -m tcp --dport 80 -d 198.19.0.10/32 -j DNAT --to-destination 198.18.1.1:{port}")]
    );
}

/// The nftables path: the same redirects as upstream's chains, in our own table, rewritten
/// whole in one transaction when something changed and not at all when nothing did.
#[test]
fn the_nftables_path_writes_the_same_redirects_in_its_own_table() {
    let (mut proxier, mut state, mut plan, cluster, external) =
        synced_load_balancer(UserspaceProxier::new(
            UserspaceConfig::default(),
            FakeRelay::default(),
            NftRedirects::new(
                kube_proxy_nftables::RecordingRunner::default(),
                // Read back only after the verify interval (30 s): never in this test.
                Box::new(|_| Err("not read in this test".into())),
            ),
        ));
    let t = "add rule ip kube-proxy-userspace";
    let c = "comment \"ns/web:http\"";
    let expected = [
        "add table ip kube-proxy-userspace".to_string(),
        "flush table ip kube-proxy-userspace".into(),
        "add chain ip kube-proxy-userspace portals-container { type nat hook prerouting priority -105; }".into(),
        "add chain ip kube-proxy-userspace portals-host { type nat hook output priority -105; }".into(),
        "add chain ip kube-proxy-userspace nodeports-container { type nat hook prerouting priority -95; }".into(),
        "add chain ip kube-proxy-userspace nodeports-host { type nat hook output priority -95; }".into(),
        format!("{t} portals-container ip daddr 198.19.0.10 tcp dport 80 redirect to :{cluster} {c}"),
        format!("{t} portals-host ip daddr 198.19.0.10 tcp dport 80 dnat to 192.0.2.10:{cluster} {c}"),
        // Upstream's physdev rule has no nftables form: it redirects bridged traffic too.
        format!("{t} portals-container ip daddr 198.51.100.1 tcp dport 80 redirect to :{external} {c}"),
        format!("{t} portals-container ip daddr 198.51.100.1 fib daddr type local tcp dport 80 redirect to :{external} {c}"),
        format!("{t} portals-host ip daddr 198.51.100.1 fib daddr type local tcp dport 80 dnat to 192.0.2.10:{external} {c}"),
        format!("{t} portals-container ip daddr 198.51.100.2 tcp dport 80 redirect to :{external} {c}"),
        format!("{t} portals-host ip daddr 198.51.100.2 tcp dport 80 dnat to 192.0.2.10:{external} {c}"),
        format!("{t} nodeports-container tcp dport 30080 redirect to :{external} {c}"),
        format!("{t} nodeports-host tcp dport 30080 dnat to 192.0.2.10:{external} {c}"),
    ];
    let scripts = &proxier.redirects().runner.scripts;
    assert_eq!(scripts.len(), 1);
    assert_eq!(scripts[0].lines().collect::<Vec<_>>(), expected);

    // Nothing changed: no transaction. New endpoints: the listeners change, the rules do not.
    sync(&mut proxier, &mut state, &mut plan, false);
    apply(&mut state, web_slice(&[("198.18.1.3", "node-a")]));
    sync(&mut proxier, &mut state, &mut plan, false);
    assert_eq!(proxier.redirects().runner.scripts.len(), 1);
    assert_eq!(
        endpoints(&proxier, Class::Cluster),
        vec![sa("198.18.1.3:8080")]
    );

    // Load-balancer source ranges: one rule per range, matching the source.
    state.apply_service(&load_balancer_object(&[
        "203.0.113.0/25",
        "203.0.113.128/26",
    ]));
    sync(&mut proxier, &mut state, &mut plan, false);
    let last = proxier.redirects().runner.scripts.last().unwrap();
    for range in ["203.0.113.0/25", "203.0.113.128/26"] {
        assert!(
            last.contains(&format!("portals-container ip saddr {range} ip daddr 198.51.100.2 tcp dport 80 redirect to :{external}")),
            "{last}"
        );
    }
    assert!(
        !last.contains("portals-container ip daddr 198.51.100.2"),
        "no rule for every source: {last}"
    );

    // The Service goes: the table is rewritten without its rules, then its listeners close.
    state.delete_service(&kube_proxy_model::NamespacedName::new("ns", "web"));
    sync(&mut proxier, &mut state, &mut plan, false);
    let last = proxier.redirects().runner.scripts.last().unwrap();
    assert!(!last.contains("add rule"), "{last}");
    assert!(proxier.listeners().open.is_empty());
}

/// A comment longer than nft allows (128 bytes) is cut, never rejected.
#[test]
fn long_service_names_fit_nfts_comment_limit() {
    use crate::rules::{Action, Rule, PORTALS_CONTAINER};
    let rule = Rule {
        chain: PORTALS_CONTAINER,
        name: kube_proxy_model::ServicePortName::new(
            &"n".repeat(63),
            &"s".repeat(63),
            &"p".repeat(15),
            Protocol::Tcp,
        ),
        protocol: Protocol::Tcp,
        dest: Some("2001:db8::10".parse().unwrap()),
        dport: 80,
        source: None,
        not_bridged: false,
        dst_local: false,
        action: Action::Dnat("[2001:db8::1]:40000".parse().unwrap()),
    };
    let statement = crate::redirect::nft::statement(&rule).unwrap();
    let comment = statement
        .split("comment \"")
        .nth(1)
        .unwrap()
        .trim_end_matches('"');
    assert_eq!(comment.len(), 128);
    assert!(
        statement.starts_with("portals-container ip6 daddr 2001:db8::10 tcp dport 80 dnat to [2001:db8::1]:40000 comment"),
        "{statement}"
    );
}

/// Someone flushes a chain or deletes a jump: the next sync after the verify interval finds
/// it, says so and writes everything again.
#[test]
fn foreign_edits_of_the_iptables_chains_are_found_and_repaired() {
    let (mut proxier, mut state, mut plan, _, _) = synced_load_balancer(UserspaceProxier::new(
        UserspaceConfig {
            verify_interval: std::time::Duration::ZERO,
            ..Default::default()
        },
        FakeRelay::default(),
        IptablesRedirects::new(Iptables::default()),
    ));
    let before = chain(&proxier, "nat", "KUBE-PORTALS-CONTAINER");
    assert_eq!(before.len(), 4);
    // Untouched: nothing to say, nothing written.
    let report = try_sync(&mut proxier, &mut state, &mut plan, false).unwrap();
    assert!(!report.full && proxier.take_warnings().is_empty());

    for edit in ["flush", "jump"] {
        let nat = proxier
            .redirects_mut()
            .restorer
            .fake
            .families
            .get_mut(&IpFamily::V4)
            .unwrap()
            .get_mut("nat")
            .unwrap();
        match edit {
            "flush" => nat.get_mut("KUBE-PORTALS-CONTAINER").unwrap().clear(),
            _ => nat
                .get_mut("PREROUTING")
                .unwrap()
                .retain(|r| !r.contains("KUBE-PORTALS-CONTAINER")),
        }
        let report = try_sync(&mut proxier, &mut state, &mut plan, false).unwrap();
        assert!(report.full, "{edit}");
        let warnings = proxier.take_warnings();
        assert!(
            warnings.len() == 1 && warnings[0].contains("someone else changed it"),
            "{edit}: {warnings:?}"
        );
        assert_eq!(chain(&proxier, "nat", "KUBE-PORTALS-CONTAINER"), before);
        assert!(chain(&proxier, "nat", "PREROUTING")
            .iter()
            .any(|r| r.ends_with("-j KUBE-PORTALS-CONTAINER")));
    }
}

/// The nftables path reads its table back: a missing rule, chain or table is found.
#[test]
fn foreign_edits_of_the_nftables_table_are_found() {
    let listing = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    let read = listing.clone();
    let (mut proxier, mut state, mut plan, cluster, _) =
        synced_load_balancer(UserspaceProxier::new(
            UserspaceConfig {
                verify_interval: std::time::Duration::ZERO,
                ..Default::default()
            },
            FakeRelay::default(),
            NftRedirects::new(
                kube_proxy_nftables::RecordingRunner::default(),
                Box::new(move |_| Ok(read.lock().unwrap().clone())),
            ),
        ));
    // What nft lists for the table as written (rules in the order of the transaction).
    let script = proxier.redirects().runner.scripts[0].clone();
    let mut text = String::from("table ip kube-proxy-userspace {\n");
    for chain in [
        "portals-container",
        "portals-host",
        "nodeports-container",
        "nodeports-host",
    ] {
        text.push_str(&format!("\tchain {chain} {{\n\t\ttype nat hook prerouting priority dstnat - 5; policy accept;\n"));
        let prefix = format!("add rule ip kube-proxy-userspace {chain} ");
        for rule in script.lines().filter_map(|l| l.strip_prefix(&prefix)) {
            text.push_str(&format!("\t\t{rule}\n"));
        }
        text.push_str("\t}\n");
    }
    text.push_str("}\n");
    assert_eq!(
        crate::redirect::nft::listed_rules(&text),
        vec![
            ("portals-container".to_string(), 4),
            ("portals-host".to_string(), 3),
            ("nodeports-container".to_string(), 1),
            ("nodeports-host".to_string(), 1),
        ]
    );
    *listing.lock().unwrap() = Some(text.clone());
    let report = try_sync(&mut proxier, &mut state, &mut plan, false).unwrap();
    assert!(!report.full && proxier.take_warnings().is_empty());

    let without_one = text.replace(
        &format!("\t\tip daddr 198.19.0.10 tcp dport 80 redirect to :{cluster} comment \"ns/web:http\"\n"),
        "",
    );
    assert_ne!(without_one, text);
    for (edit, listed, says) in [
        ("a rule deleted", Some(without_one), "portals-container"),
        ("the table deleted", None, "is gone"),
    ] {
        *listing.lock().unwrap() = listed;
        let report = try_sync(&mut proxier, &mut state, &mut plan, false).unwrap();
        assert!(report.full, "{edit}");
        let warnings = proxier.take_warnings();
        assert!(
            warnings.len() == 1 && warnings[0].contains(says),
            "{edit}: {warnings:?}"
        );
    }
}
