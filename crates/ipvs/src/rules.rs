//! The iptables rules of ipvs mode (upstream's `writeIptablesRules`): masquerading decided by
//! ipset matches, the jump to `KUBE-NODE-PORT` for local destinations, the source-range
//! firewall, `KUBE-IPVS-FILTER` (which refuses new connections to ports of a service address
//! that no virtual server has) and the forward/mark plumbing. They depend on the service
//! ports only through which sets are empty and the load-balancer frontends the node must not
//! reach, so they are rewritten rarely. The restore input declares (and so empties) our chains
//! and nothing else, and inserts the jumps from the built-in chains that `saved` lacks.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use kube_proxy_model::context::{FamilyContext, LocalTraffic};
use kube_proxy_model::IpFamily;

use crate::desired::Desired;
use crate::names::*;

fn set_rule(
    out: &mut Vec<ChainRule>,
    chain: &'static str,
    set: Set,
    family: IpFamily,
    protocol: Option<&str>,
    match_type: &str,
    target: &str,
) {
    let proto = protocol.map(|p| format!("-p {p} ")).unwrap_or_default();
    out.push((
        chain,
        format!(
            "{proto}-m comment --comment \"{}\" -m set --match-set {} {match_type} -j {target}",
            set.comment(),
            set.name(family)
        ),
    ));
}

/// `! -s …` / `! -i …`: traffic that is not from a local pod.
fn not_local(local: &LocalTraffic) -> String {
    match local {
        // One CIDR per family, as upstream's detector has.
        LocalTraffic::FromCidrs(cidrs) => cidrs
            .first()
            .map(|c| format!("! -s {c}"))
            .unwrap_or_default(),
        LocalTraffic::FromInterface(name) => format!("! -i {name}"),
        LocalTraffic::FromInterfacePrefix(prefix) => format!("! -i {prefix}+"),
    }
}

/// One rule: the chain it is appended to and the rest of its `-A` line.
pub type ChainRule = (&'static str, String);

/// The rules of both tables, per chain, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    pub nat: Vec<ChainRule>,
    pub filter: Vec<ChainRule>,
}

pub fn rules(desired: &Desired, ctx: &FamilyContext) -> Rules {
    let family = ctx.family;
    let empty = |set: Set| desired.sets.get(&set).is_none_or(BTreeSet::is_empty);
    let mut nat = Vec::new();
    let mut filter = Vec::new();
    let loopback = match family {
        IpFamily::V4 => "127.0.0.0/8",
        IpFamily::V6 => "::1/128",
    };
    nat.push((KUBE_SERVICES, format!("-s {loopback} -j RETURN")));
    // Upstream's ipsetWithIptablesChain, in its order (LOCAL sets before the others).
    let nat_matches: [(Set, &'static str, Option<&str>, &str, &str); 9] = [
        (
            Set::LoopBack,
            KUBE_POSTROUTING,
            None,
            "dst,dst,src",
            "MASQUERADE",
        ),
        (
            Set::LoadBalancer,
            KUBE_SERVICES,
            None,
            "dst,dst",
            KUBE_LOAD_BALANCER,
        ),
        (
            Set::LoadBalancerLocal,
            KUBE_LOAD_BALANCER,
            None,
            "dst,dst",
            "RETURN",
        ),
        (
            Set::NodePortLocalTcp,
            KUBE_NODE_PORT,
            Some("tcp"),
            "dst",
            "RETURN",
        ),
        (
            Set::NodePortTcp,
            KUBE_NODE_PORT,
            Some("tcp"),
            "dst",
            KUBE_MARK_MASQ,
        ),
        (
            Set::NodePortLocalUdp,
            KUBE_NODE_PORT,
            Some("udp"),
            "dst",
            "RETURN",
        ),
        (
            Set::NodePortUdp,
            KUBE_NODE_PORT,
            Some("udp"),
            "dst",
            KUBE_MARK_MASQ,
        ),
        (
            Set::NodePortLocalSctp,
            KUBE_NODE_PORT,
            Some("sctp"),
            "dst,dst",
            "RETURN",
        ),
        (
            Set::NodePortSctp,
            KUBE_NODE_PORT,
            Some("sctp"),
            "dst,dst",
            KUBE_MARK_MASQ,
        ),
    ];
    for (set, chain, proto, match_type, target) in nat_matches {
        if !empty(set) {
            set_rule(&mut nat, chain, set, family, proto, match_type, target);
        }
    }
    let filter_matches: [(Set, &'static str, &str, &str); 3] = [
        (
            Set::LoadBalancerFw,
            KUBE_PROXY_FIREWALL,
            "dst,dst",
            KUBE_SOURCE_RANGES_FIREWALL,
        ),
        (
            Set::LoadBalancerSourceCidr,
            KUBE_SOURCE_RANGES_FIREWALL,
            "dst,dst,src",
            "RETURN",
        ),
        (
            Set::LoadBalancerSourceIp,
            KUBE_SOURCE_RANGES_FIREWALL,
            "dst,dst,src",
            "RETURN",
        ),
    ];
    for (set, chain, match_type, target) in filter_matches {
        if !empty(set) {
            set_rule(&mut filter, chain, set, family, None, match_type, target);
        }
    }
    let match_set = |set: Set, match_type: &str| {
        format!(
            "-m comment --comment \"{}\" -m set --match-set {} {match_type}",
            set.comment(),
            set.name(family)
        )
    };
    if !empty(Set::ClusterIp) {
        let base = match_set(Set::ClusterIp, "dst,dst");
        let rule = if ctx.masquerade_all {
            format!("{base} -j {KUBE_MARK_MASQ}")
        } else if let Some(local) = &ctx.local {
            format!("{base} {} -j {KUBE_MARK_MASQ}", not_local(local))
        } else {
            // Without a detector, node-originated connections that picked a service address
            // (on kube-ipvs0) as their source are masqueraded.
            format!(
                "{} -j {KUBE_MARK_MASQ}",
                match_set(Set::ClusterIp, "src,dst")
            )
        };
        nat.push((KUBE_SERVICES, rule));
    }
    for (set, masquerade) in [(Set::ExternalIp, true), (Set::ExternalIpLocal, false)] {
        if empty(set) {
            continue;
        }
        let base = match_set(set, "dst,dst");
        if masquerade {
            nat.push((KUBE_SERVICES, format!("{base} -j {KUBE_MARK_MASQ}")));
        }
        // Traffic from off the machine (not bridged, not local), and traffic to external IPs
        // that happen to be local addresses, is accepted for IPVS.
        nat.push((
            KUBE_SERVICES,
            format!("{base} -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT"),
        ));
        nat.push((
            KUBE_SERVICES,
            format!("{base} -m addrtype --dst-type LOCAL -j ACCEPT"),
        ));
    }
    nat.push((
        KUBE_SERVICES,
        format!("-m addrtype --dst-type LOCAL -j {KUBE_NODE_PORT}"),
    ));
    nat.push((KUBE_LOAD_BALANCER, format!("-j {KUBE_MARK_MASQ}")));
    filter.push((KUBE_SOURCE_RANGES_FIREWALL, "-j DROP".into()));
    for address in &desired.lb_no_node_access {
        filter.push((
            KUBE_IPVS_OUT_FILTER,
            format!(
                "-s {ip} -m ipvs --vaddr {ip} --vproto {} --vport {} -j DROP",
                address.protocol.lower(),
                address.port,
                ip = host(address.ip)
            ),
        ));
    }
    for set in [Set::ClusterIp, Set::LoadBalancer] {
        if !empty(set) {
            nat.push((
                KUBE_SERVICES,
                format!("-m set --match-set {} dst,dst -j ACCEPT", set.name(family)),
            ));
        }
    }
    let mark = format!("{:#x}", ctx.mark);
    filter.push((
        KUBE_FORWARD,
        format!("-m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT"),
    ));
    filter.push((
        KUBE_FORWARD,
        "-m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".into(),
    ));
    filter.push((
        KUBE_NODE_PORT,
        format!("{} -j ACCEPT", match_set(Set::HealthCheckNodePort, "dst")),
    ));
    for (set, match_type) in [
        (Set::LoadBalancer, "dst,dst"),
        (Set::ClusterIp, "dst,dst"),
        (Set::ExternalIp, "dst,dst"),
        (Set::ExternalIpLocal, "dst,dst"),
        (Set::HealthCheckNodePort, "dst"),
    ] {
        filter.push((
            KUBE_IPVS_FILTER,
            format!(
                "-m set --match-set {} {match_type} -j RETURN",
                set.name(family)
            ),
        ));
    }
    filter.push((
        KUBE_IPVS_FILTER,
        format!(
            "-m conntrack --ctstate NEW -m set --match-set {} dst -j REJECT",
            Set::IpvsIps.name(family)
        ),
    ));
    nat.push((
        KUBE_POSTROUTING,
        format!("-m mark ! --mark {mark}/{mark} -j RETURN"),
    ));
    nat.push((KUBE_POSTROUTING, format!("-j MARK --xor-mark {mark}")));
    nat.push((
        KUBE_POSTROUTING,
        "-m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully".into(),
    ));
    nat.push((KUBE_MARK_MASQ, format!("-j MARK --or-mark {mark}")));
    Rules { nat, filter }
}

fn host(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => format!("{v4}/32"),
        std::net::IpAddr::V6(v6) => format!("{v6}/128"),
    }
}

/// The `iptables-restore --noflush` input writing `rules`; `has_jump(table, from, to)` tells
/// which jumps from built-in chains already exist (they are inserted otherwise).
pub fn restore_input(rules: &Rules, has_jump: &dyn Fn(&str, &str, &str) -> bool) -> String {
    let mut text = String::new();
    let tables: [(&str, &[&str], &[ChainRule]); 2] = [
        ("filter", &FILTER_CHAINS[..], &rules.filter),
        ("nat", &NAT_CHAINS[..], &rules.nat),
    ];
    for (table, chains, lines) in tables {
        let _ = writeln!(text, "*{table}");
        for chain in chains {
            let _ = writeln!(text, ":{chain} - [0:0]");
        }
        for (t, from, to, comment) in JUMPS {
            if t == table && !has_jump(table, from, to) {
                let _ = writeln!(
                    text,
                    "-I {from} 1 -m comment --comment \"{comment}\" -j {to}"
                );
            }
        }
        for (chain, rule) in lines {
            let _ = writeln!(text, "-A {chain} {rule}");
        }
        text.push_str("COMMIT\n");
    }
    text
}
