//! The ipvs dataplane against the in-memory kernel: upstream's objects for a Service, the
//! Local policies' fallback, draining, excludeCIDRs, recovery from a failed batch, and
//! partial syncs that agree with one full sync.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use kube_proxy_config::DetectLocal;
use kube_proxy_iptables::fake::FakeIptables;
use kube_proxy_model::context::ProxyPolicy;
use kube_proxy_model::dataplane::{NodeView, SyncReport};
use kube_proxy_model::testing::{apply, web, web_slice};
use kube_proxy_model::{
    ClusterState, Dataplane, FamilyPlan, IpFamily, LocalPolicy, PlanContext, Protocol, SyncInput,
};
use serde_json::json;

use crate::desired::{Scheduling, VirtualAddress};
use crate::fake::FakeIpvs;
use crate::ipvsadm;
use crate::proxier::{IpvsConfig, IpvsProxier};

type Proxier = IpvsProxier<FakeIpvs, FakeIptables>;

fn node() -> NodeView {
    NodeView {
        node_ips: vec!["192.0.2.10".parse().unwrap()],
        local_addresses: vec!["127.0.0.1".parse().unwrap(), "192.0.2.10".parse().unwrap()],
        ..Default::default()
    }
}

fn config() -> IpvsConfig {
    IpvsConfig {
        policy: ProxyPolicy {
            detect_local: DetectLocal::ClusterCidr(vec!["198.18.0.0/16".parse().unwrap()]),
            node_port_addresses: kube_proxy_config::NodePortAddresses::All,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A proxier whose clock the test moves.
fn proxier_with_clock(config: IpvsConfig) -> (Proxier, std::sync::Arc<std::sync::Mutex<Instant>>) {
    let now = std::sync::Arc::new(std::sync::Mutex::new(Instant::now()));
    let clock = now.clone();
    (
        IpvsProxier::new(
            config,
            FakeIpvs::default(),
            FakeIptables::default(),
            Box::new(move || *clock.lock().unwrap()),
        ),
        now,
    )
}

fn ipvs_plan_context() -> PlanContext {
    PlanContext {
        local_policy: LocalPolicy::FallBackToCluster,
        ..Default::default()
    }
}

fn sync(
    proxier: &mut Proxier,
    state: &mut ClusterState,
    plan: &mut FamilyPlan,
    full: bool,
) -> SyncReport {
    let changes = state.take_changes();
    let changed = plan.update(
        state,
        IpFamily::V4,
        &changes.services,
        changes.full || full,
        ipvs_plan_context(),
    );
    proxier
        .sync(SyncInput {
            family: IpFamily::V4,
            plan,
            changed: &changed,
            full,
            node: &node(),
            service_cidrs: &[],
        })
        .unwrap_or_else(|e| panic!("{e}"))
}

fn va(ip: &str, protocol: Protocol, port: u16) -> VirtualAddress {
    VirtualAddress {
        ip: ip.parse().unwrap(),
        protocol,
        port,
    }
}

fn sa(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

fn reals(proxier: &Proxier, address: &VirtualAddress) -> Vec<(SocketAddr, u32)> {
    proxier.kernel().table[address]
        .reals
        .iter()
        .map(|(r, w)| (*r, *w))
        .collect()
}

fn set(proxier: &Proxier, name: &str) -> BTreeSet<String> {
    proxier.kernel().sets.get(name).cloned().unwrap_or_default()
}

fn chain(proxier: &Proxier, table: &str, chain: &str) -> Vec<String> {
    proxier.iptables().families[&IpFamily::V4][table]
        .get(chain)
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_node_port_service_becomes_upstreams_virtual_servers_sets_and_rules() {
    let (mut proxier, _) = proxier_with_clock(config());
    let mut state = ClusterState::new("node-a");
    let mut plan = FamilyPlan::default();
    apply(
        &mut state,
        web(
            json!({"type": "NodePort", "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}],
            "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 300}}}),
        ),
    );
    apply(
        &mut state,
        web_slice(&[("198.18.1.2", "node-a"), ("198.18.2.2", "node-b")]),
    );
    let report = sync(&mut proxier, &mut state, &mut plan, true);
    assert!(report.full);

    let both = vec![(sa("198.18.1.2:8080"), 1), (sa("198.18.2.2:8080"), 1)];
    let cluster = va("198.19.0.10", Protocol::Tcp, 80);
    let node_port = va("192.0.2.10", Protocol::Tcp, 30080);
    assert_eq!(reals(&proxier, &cluster), both);
    assert_eq!(reals(&proxier, &node_port), both);
    assert_eq!(proxier.kernel().table.len(), 2, "no NodePort on loopback");
    let settings = &proxier.kernel().table[&cluster].settings;
    assert_eq!(
        (settings.scheduler.as_str(), settings.persistence),
        ("rr", Some(300))
    );
    assert_eq!(
        proxier.kernel().bound,
        ["198.19.0.10".parse::<IpAddr>().unwrap()].into()
    );
    assert_eq!(
        set(&proxier, "KUBE-CLUSTER-IP"),
        ["198.19.0.10,tcp:80".to_string()].into()
    );
    assert_eq!(
        set(&proxier, "KUBE-NODE-PORT-TCP"),
        ["30080".to_string()].into()
    );
    assert_eq!(
        set(&proxier, "KUBE-IPVS-IPS"),
        ["198.19.0.10".to_string()].into()
    );
    assert_eq!(
        set(&proxier, "KUBE-LOOP-BACK"),
        ["198.18.1.2,tcp:8080,198.18.1.2".to_string()].into(),
        "only the local endpoint hairpins"
    );
    assert!(set(&proxier, "KUBE-NODE-PORT-LOCAL-TCP").is_empty());

    let services = chain(&proxier, "nat", "KUBE-SERVICES");
    assert_eq!(services[0], "-s 127.0.0.0/8 -j RETURN");
    assert!(services.contains(&"-m comment --comment \"Kubernetes service cluster ip + port for masquerade purpose\" -m set --match-set KUBE-CLUSTER-IP dst,dst ! -s 198.18.0.0/16 -j KUBE-MARK-MASQ".to_string()), "{services:#?}");
    assert!(services.contains(&"-m addrtype --dst-type LOCAL -j KUBE-NODE-PORT".to_string()));
    assert_eq!(
        services.last().unwrap(),
        "-m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT"
    );
    assert_eq!(
        chain(&proxier, "nat", "KUBE-NODE-PORT"),
        ["-p tcp -m comment --comment \"Kubernetes nodeport TCP port for masquerade purpose\" -m set --match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ"]
    );
    let filter = chain(&proxier, "filter", "KUBE-IPVS-FILTER");
    assert_eq!(
        filter.last().unwrap(),
        "-m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT"
    );
    // The jumps from the built-in chains, once.
    assert_eq!(
        chain(&proxier, "nat", "PREROUTING"),
        ["-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"]
    );
    assert_eq!(chain(&proxier, "filter", "INPUT").len(), 3);
    sync(&mut proxier, &mut state, &mut plan, true);
    assert_eq!(
        chain(&proxier, "filter", "INPUT").len(),
        3,
        "a second full sync adds no jump"
    );
}

#[test]
fn local_policies_fall_back_to_cluster_endpoints_and_skip_masquerade() {
    let (mut proxier, _) = proxier_with_clock(config());
    let mut state = ClusterState::new("node-a");
    let mut plan = FamilyPlan::default();
    apply(
        &mut state,
        web(
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local",
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}],
            "externalIPs": ["198.51.100.7"]}),
        ),
    );
    apply(&mut state, web_slice(&[("198.18.2.2", "node-b")]));
    sync(&mut proxier, &mut state, &mut plan, true);
    // No local endpoint: every frontend falls back to the cluster's (upstream's ipvs mode).
    let remote = vec![(sa("198.18.2.2:8080"), 1)];
    for address in [
        va("198.19.0.10", Protocol::Tcp, 80),
        va("198.51.100.7", Protocol::Tcp, 80),
        va("192.0.2.10", Protocol::Tcp, 30080),
    ] {
        assert_eq!(reals(&proxier, &address), remote, "{address}");
    }
    assert_eq!(
        set(&proxier, "KUBE-NODE-PORT-LOCAL-TCP"),
        ["30080".to_string()].into()
    );
    assert_eq!(
        set(&proxier, "KUBE-EXTERNAL-IP-LOCAL"),
        ["198.51.100.7,tcp:80".to_string()].into()
    );
    assert!(set(&proxier, "KUBE-EXTERNAL-IP").is_empty());
    // A local endpoint appears: only it serves.
    apply(
        &mut state,
        web_slice(&[("198.18.2.2", "node-b"), ("198.18.1.2", "node-a")]),
    );
    let report = sync(&mut proxier, &mut state, &mut plan, false);
    assert!(!report.full);
    assert_eq!(
        reals(&proxier, &va("192.0.2.10", Protocol::Tcp, 30080)),
        vec![(sa("198.18.1.2:8080"), 1)],
        "the remote endpoint had no connection: gone at once"
    );
}

#[test]
fn removed_tcp_real_servers_drain_until_their_connections_end() {
    let (mut proxier, now) = proxier_with_clock(config());
    let mut state = ClusterState::new("node-a");
    let mut plan = FamilyPlan::default();
    apply(&mut state, web(json!({})));
    apply(
        &mut state,
        web_slice(&[("198.18.1.2", "node-a"), ("198.18.2.2", "node-b")]),
    );
    sync(&mut proxier, &mut state, &mut plan, true);
    let cluster = va("198.19.0.10", Protocol::Tcp, 80);
    proxier
        .kernel_mut()
        .connections
        .insert((cluster, sa("198.18.2.2:8080")), 3);

    apply(&mut state, web_slice(&[("198.18.1.2", "node-a")]));
    sync(&mut proxier, &mut state, &mut plan, false);
    assert_eq!(
        reals(&proxier, &cluster),
        vec![(sa("198.18.1.2:8080"), 1), (sa("198.18.2.2:8080"), 0)]
    );
    assert_eq!(proxier.draining(), 1);
    // Still connected: it stays at weight 0.
    sync(&mut proxier, &mut state, &mut plan, false);
    assert_eq!(reals(&proxier, &cluster).len(), 2);
    // Back while draining: weight 1 again.
    apply(
        &mut state,
        web_slice(&[("198.18.1.2", "node-a"), ("198.18.2.2", "node-b")]),
    );
    sync(&mut proxier, &mut state, &mut plan, false);
    assert_eq!(reals(&proxier, &cluster)[1], (sa("198.18.2.2:8080"), 1));
    assert_eq!(proxier.draining(), 0);
    // Gone again; its connections end: deleted at the next sync.
    apply(&mut state, web_slice(&[("198.18.1.2", "node-a")]));
    sync(&mut proxier, &mut state, &mut plan, false);
    proxier.kernel_mut().connections.clear();
    sync(&mut proxier, &mut state, &mut plan, false);
    assert_eq!(reals(&proxier, &cluster), vec![(sa("198.18.1.2:8080"), 1)]);
    // Connections that never end: deleted after the bound.
    proxier
        .kernel_mut()
        .connections
        .insert((cluster, sa("198.18.1.2:8080")), 1);
    apply(&mut state, web_slice(&[("198.18.2.2", "node-b")]));
    sync(&mut proxier, &mut state, &mut plan, false);
    assert_eq!(reals(&proxier, &cluster).len(), 2);
    *now.lock().unwrap() += Duration::from_secs(16 * 60);
    sync(&mut proxier, &mut state, &mut plan, false);
    assert_eq!(reals(&proxier, &cluster), vec![(sa("198.18.2.2:8080"), 1)]);
}

#[test]
fn removed_udp_real_servers_go_at_once() {
    let (mut proxier, _) = proxier_with_clock(config());
    let mut state = ClusterState::new("node-a");
    let mut plan = FamilyPlan::default();
    apply(
        &mut state,
        web(
            json!({"ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "UDP"}]}),
        ),
    );
    let mut slice = web_slice(&[("198.18.1.2", "node-a"), ("198.18.2.2", "node-b")]);
    slice["ports"][0]["protocol"] = json!("UDP");
    apply(&mut state, slice.clone());
    sync(&mut proxier, &mut state, &mut plan, true);
    slice["endpoints"] = json!([{"addresses": ["198.18.1.2"], "nodeName": "node-a"}]);
    apply(&mut state, slice);
    sync(&mut proxier, &mut state, &mut plan, false);
    assert_eq!(
        reals(&proxier, &va("198.19.0.10", Protocol::Udp, 80)),
        vec![(sa("198.18.1.2:8080"), 1)]
    );
    assert_eq!(proxier.draining(), 0);
}

#[test]
fn foreign_virtual_servers_survive_only_in_exclude_cidrs() {
    let mut config = config();
    config.exclude_cidrs = vec!["203.0.113.0/24".parse().unwrap()];
    let (mut proxier, _) = proxier_with_clock(config);
    for ip in ["203.0.113.9", "198.51.100.99", "2001:db8::9"] {
        let address = VirtualAddress {
            ip: ip.parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 80,
        };
        let mut commands = ipvsadm::Commands::default();
        commands.add_service(
            &address,
            &crate::desired::ServiceSettings {
                scheduler: "wrr".into(),
                persistence: None,
                flags: None,
            },
        );
        crate::proxier::IpvsKernel::ipvs_restore(proxier.kernel_mut(), &commands.text).unwrap();
    }
    let mut state = ClusterState::new("node-a");
    let mut plan = FamilyPlan::default();
    apply(&mut state, web(json!({})));
    sync(&mut proxier, &mut state, &mut plan, true);
    let left: Vec<String> = proxier
        .kernel()
        .table
        .keys()
        .map(|a| a.ip.to_string())
        .collect();
    assert_eq!(
        left,
        ["198.19.0.10", "203.0.113.9", "2001:db8::9"],
        "the IPv4 sync deletes the unexcluded IPv4 server only"
    );
    // No endpoints: the virtual server exists without real servers (IPVS refuses).
    assert!(reals(&proxier, &va("198.19.0.10", Protocol::Tcp, 80)).is_empty());
}

#[test]
fn mh_scheduler_sets_upstreams_source_hash_flag() {
    let mut config = config();
    config.scheduling = Scheduling::new("mh");
    let (mut proxier, _) = proxier_with_clock(config);
    let mut state = ClusterState::new("node-a");
    let mut plan = FamilyPlan::default();
    apply(&mut state, web(json!({})));
    sync(&mut proxier, &mut state, &mut plan, true);
    let settings = &proxier.kernel().table[&va("198.19.0.10", Protocol::Tcp, 80)].settings;
    assert_eq!(
        (settings.scheduler.as_str(), settings.flags.as_deref()),
        ("mh", Some("mh-port"))
    );
}

#[test]
fn a_failed_batch_makes_the_next_sync_full_and_it_converges() {
    let (mut proxier, _) = proxier_with_clock(config());
    let mut state = ClusterState::new("node-a");
    let mut plan = FamilyPlan::default();
    apply(&mut state, web(json!({})));
    apply(&mut state, web_slice(&[("198.18.1.2", "node-a")]));
    sync(&mut proxier, &mut state, &mut plan, true);
    apply(
        &mut state,
        web_slice(&[
            ("198.18.1.2", "node-a"),
            ("198.18.1.3", "node-a"),
            ("198.18.2.2", "node-b"),
        ]),
    );
    proxier.kernel_mut().fail_after = Some(1);
    let changes = state.take_changes();
    let changed = plan.update(
        &state,
        IpFamily::V4,
        &changes.services,
        false,
        ipvs_plan_context(),
    );
    let error = proxier
        .sync(SyncInput {
            family: IpFamily::V4,
            plan: &plan,
            changed: &changed,
            full: false,
            node: &node(),
            service_cidrs: &[],
        })
        .unwrap_err();
    assert!(error.message.contains("injected failure"), "{error}");
    // Half applied; the retry reads the kernel and finishes.
    let report = sync(&mut proxier, &mut state, &mut plan, false);
    assert!(report.full);
    assert_eq!(
        reals(&proxier, &va("198.19.0.10", Protocol::Tcp, 80)).len(),
        3
    );
}

/// Random changes, each a partial sync; every 25 steps the kernel must equal what a fresh
/// proxier's full sync writes (draining aside: the fake reports no connections, so drained
/// real servers go at the next sync).
#[test]
fn partial_syncs_equal_one_full_sync_in_the_fake_kernel() {
    let mut changes = kube_proxy_model::testing::RandomChanges::new(0x9e3779b97f4a7c15);
    let mut state = ClusterState::new("node-a");
    let mut plan = FamilyPlan::default();
    let (mut proxier, _) = proxier_with_clock(config());
    sync(&mut proxier, &mut state, &mut plan, true);
    for step in 0..300 {
        changes.apply_one(&mut state);
        let report = sync(&mut proxier, &mut state, &mut plan, false);
        assert!(!report.full, "step {step}");
        if step % 25 == 24 {
            // Let draining finish (no connections), then compare.
            sync(&mut proxier, &mut state, &mut plan, false);
            let (mut fresh, _) = proxier_with_clock(config());
            let mut fresh_plan = FamilyPlan::default();
            let changed = fresh_plan.update(
                &state,
                IpFamily::V4,
                &BTreeSet::new(),
                true,
                ipvs_plan_context(),
            );
            fresh
                .sync(SyncInput {
                    family: IpFamily::V4,
                    plan: &fresh_plan,
                    changed: &changed,
                    full: true,
                    node: &node(),
                    service_cidrs: &[],
                })
                .unwrap();
            assert_eq!(proxier.kernel().table, fresh.kernel().table, "step {step}");
            assert_eq!(proxier.kernel().sets, fresh.kernel().sets, "step {step}");
            assert_eq!(proxier.kernel().bound, fresh.kernel().bound, "step {step}");
            assert_eq!(
                proxier.iptables().families,
                fresh.iptables().families,
                "step {step}"
            );
        }
    }
}

#[test]
fn ipvsadm_save_and_list_output_parse() {
    let saved = "-A -t 198.19.0.10:80 -s rr -p 10800\n\
                 -a -t 198.19.0.10:80 -r 198.18.1.2:8080 -m -w 1\n\
                 -a -t 198.19.0.10:80 -r 198.18.2.2:8080 -m -w 0\n\
                 -A -u [2001:db8:19::10]:53 -s mh -b mh-port\n\
                 -a -u [2001:db8:19::10]:53 -r [2001:db8:18:1::2]:53 -m -w 1\n\
                 -A -f 5 -s rr\n";
    let table = ipvsadm::parse_save(saved);
    assert_eq!(table.len(), 2);
    let tcp = &table[&va("198.19.0.10", Protocol::Tcp, 80)];
    assert_eq!(tcp.settings.persistence, Some(10800));
    assert_eq!(tcp.reals[&sa("198.18.2.2:8080")], 0);
    let udp = &table[&va("2001:db8:19::10", Protocol::Udp, 53)];
    assert_eq!(udp.settings.flags.as_deref(), Some("mh-port"));
    assert_eq!(udp.reals.len(), 1);
    let listed = "IP Virtual Server version 1.2.1 (size=4096)\n\
        Prot LocalAddress:Port Scheduler Flags\n\
          -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n\
        TCP  198.19.0.10:80 rr persistent 10800\n\
          -> 198.18.1.2:8080              Masq    1      2          5\n\
        UDP  [2001:db8:19::10]:53 mh (mh-port)\n\
          -> [2001:db8:18:1::2]:53        Masq    1      0          0\n";
    let connections = ipvsadm::parse_connections(listed);
    assert_eq!(
        connections[&(va("198.19.0.10", Protocol::Tcp, 80), sa("198.18.1.2:8080"))],
        7
    );
    assert_eq!(
        connections[&(
            va("2001:db8:19::10", Protocol::Udp, 53),
            sa("[2001:db8:18:1::2]:53")
        )],
        0
    );
}

#[test]
fn proc_net_ip_vs_parses() {
    let proc = "IP Virtual Server version 1.2.1 (size=4096)\n\
        Prot LocalAddress:Port Scheduler Flags\n\
          -> RemoteAddress:Port Forward Weight ActiveConn InActConn\n\
        TCP  C613000A:0050 rr persistent 10800 FFFFFFFF\n\
          -> C6120102:1F90      Masq    0      1          2         \n\
        UDP  [2001:0db8:0019:0000:0000:0000:0000:0010]:0035 rr \n\
          -> [2001:0db8:0018:0001:0000:0000:0000:0002]:0035      Masq    1      0          0         \n";
    let connections = ipvsadm::parse_proc_connections(proc);
    assert_eq!(
        connections[&(va("198.19.0.10", Protocol::Tcp, 80), sa("198.18.1.2:8080"))],
        3
    );
    assert_eq!(
        connections[&(
            va("2001:db8:19::10", Protocol::Udp, 53),
            sa("[2001:db8:18:1::2]:53")
        )],
        0
    );
}

/// A full sync of both families reads the kernel once: the IPv6 sync that follows the IPv4
/// one in the same pass uses what the IPv4 sync read; later it reads again.
#[test]
fn both_families_full_syncs_read_the_kernel_once() {
    let (mut proxier, now) = proxier_with_clock(config());
    let mut state = ClusterState::new("node-a");
    let mut plan = FamilyPlan::default();
    apply(&mut state, web(json!({})));
    sync(&mut proxier, &mut state, &mut plan, true);
    let v6 = FamilyPlan::default();
    let full_v6 = |proxier: &mut Proxier| {
        proxier
            .sync(SyncInput {
                family: IpFamily::V6,
                plan: &v6,
                changed: &BTreeSet::new(),
                full: true,
                node: &node(),
                service_cidrs: &[],
            })
            .unwrap();
    };
    full_v6(&mut proxier);
    assert_eq!(proxier.kernel().reads, 1);
    // However long the first family's sync took.
    sync(&mut proxier, &mut state, &mut plan, true);
    *now.lock().unwrap() += Duration::from_millis(500);
    full_v6(&mut proxier);
    assert_eq!(proxier.kernel().reads, 2);
    *now.lock().unwrap() += Duration::from_secs(5);
    full_v6(&mut proxier);
    assert_eq!(proxier.kernel().reads, 3, "a stale read is not reused");
}
