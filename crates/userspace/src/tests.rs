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

type Proxier = UserspaceProxier<FakeRelay, Iptables>;

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
        Iptables::default(),
    )
}

fn sync(proxier: &mut Proxier, state: &mut ClusterState, plan: &mut FamilyPlan, full: bool) {
    try_sync(proxier, state, plan, full).unwrap_or_else(|e| panic!("{e}"));
}

fn try_sync(
    proxier: &mut Proxier,
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
    proxier.iptables().fake.families[&IpFamily::V4][table]
        .get(chain)
        .cloned()
        .unwrap_or_default()
}

fn endpoints(proxier: &Proxier, class: Class) -> Vec<SocketAddr> {
    proxier.listeners().open[&(IpFamily::V4, key(class))]
        .1
        .endpoints
        .clone()
}

fn sa(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

#[test]
fn a_node_port_service_gets_upstreams_portal_rules_and_its_listeners() {
    let mut proxier = proxier();
    let mut state = ClusterState::new("node-a");
    let mut plan = FamilyPlan::default();
    state.apply_service(
        &serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": "web"},
            "spec": {"type": "LoadBalancer", "clusterIP": "198.19.0.10", "externalIPs": ["198.51.100.1"],
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080, "protocol": "TCP"}],
                "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 300}}},
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.2"}]}}}))
        .unwrap(),
    );
    apply(
        &mut state,
        web_slice(&[("198.18.1.2", "node-a"), ("198.18.2.2", "node-b")]),
    );
    sync(&mut proxier, &mut state, &mut plan, true);

    let ports = proxier.ports(IpFamily::V4);
    let (cluster, external) = (ports[&key(Class::Cluster)], ports[&key(Class::External)]);
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
    proxier.iptables_mut().fail_next = true;
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
        Iptables::default(),
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
            let partial = proxier.iptables().fake.families.clone();
            sync(&mut proxier, &mut state, &mut plan, true);
            let full = &proxier.iptables().fake.families;
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
