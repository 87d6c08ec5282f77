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
    let mut proxier = IptablesProxier::new(policy(), FakeIptables::default());
    sync(&mut proxier, &mut state, &mut plan, true);
    let mut partial_inputs = 0;
    let mut rewrote_less = false;
    for step in 0..400 {
        changes.apply_one(&mut state);
        let before = proxier.runner().restores;
        sync(&mut proxier, &mut state, &mut plan, false);
        partial_inputs += proxier.runner().restores - before;
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
        if step % 20 == 19 {
            let mut fresh = IptablesProxier::new(policy(), FakeIptables::default());
            kube_proxy_model::testing::fresh_sync_ipv4(&mut fresh, &state, &node());
            let partial = proxier.runner().families.clone();
            assert_eq!(partial, fresh.runner().families, "after step {step}");
            sync(&mut proxier, &mut state, &mut plan, true);
            assert_eq!(
                proxier.runner().families,
                partial,
                "full sync after step {step}"
            );
        }
    }
    assert!(partial_inputs > 300);
    assert!(
        rewrote_less,
        "partial inputs left unchanged ports' chains alone"
    );
}
