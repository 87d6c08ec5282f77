//! The static part of the ruleset: base chains, the static chains with their rules, and the
//! declarations of every set and map. Hooks and priorities are upstream's (1.36), so other
//! components that order themselves around kube-proxy keep working.

use std::collections::BTreeSet;

use crate::context::Context;
use crate::elements::SetName;
use crate::transaction::Transaction;

pub const TABLE: &str = "kube-proxy";
pub const DISPATCH_CHAIN: &str = "dnat-dispatch";

/// Base chains: name, type, hook, priority. Priorities are upstream's `dstnat - 10`,
/// `filter`, `dstnat` and `srcnat`, written as numbers because nft 1.0.6 does not accept the
/// symbolic `dstnat` on the output hook.
const BASE_CHAINS: &[(&str, &str, &str, &str)] = &[
    ("filter-prerouting-pre-dnat", "filter", "prerouting", "-110"),
    ("filter-output-pre-dnat", "filter", "output", "-110"),
    ("filter-input", "filter", "input", "0"),
    ("filter-forward", "filter", "forward", "0"),
    ("filter-output", "filter", "output", "0"),
    ("nat-prerouting", "nat", "prerouting", "-100"),
    ("nat-output", "nat", "output", "-100"),
    ("nat-postrouting", "nat", "postrouting", "100"),
];

/// Regular static chains (besides the dispatch chain).
const STATIC_CHAINS: &[&str] = &[
    "services",
    "masquerading",
    "cluster-ips-check",
    "service-endpoints-check",
    "nodeport-endpoints-check",
    "firewall-check",
];

/// Sets and maps that always exist.
const ALWAYS_SETS: [SetName; 12] = [
    SetName::ClusterIps,
    SetName::ExternalMasquerade,
    SetName::NodePortMasquerade,
    SetName::NoEndpointReject,
    SetName::NoEndpointDrop,
    SetName::NodePortNoEndpointReject,
    SetName::NodePortNoEndpointDrop,
    SetName::FirewallIps,
    SetName::FirewallAllow,
    SetName::HairpinConnections,
    SetName::ServiceIps,
    SetName::ServiceNodePorts,
];

/// Sets and maps that always exist (`nodeport-ips` only when NodePorts are restricted).
pub fn static_sets(ctx: &Context) -> Vec<SetName> {
    let mut sets = ALWAYS_SETS.to_vec();
    if ctx.nodeports_restricted() {
        sets.push(SetName::NodePortIps);
    }
    sets
}

/// How many endpoint slots (maps and chains) the data path has, for addresses and NodePorts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slots {
    pub addresses: u32,
    pub node_ports: u32,
}

impl Slots {
    /// Slots needed for these `dnat-N` / `nodeport-dnat-N` sets: the largest N of each kind.
    pub fn needed(dnat_sets: &BTreeSet<SetName>) -> Slots {
        let mut slots = Slots::default();
        for set in dnat_sets {
            match set {
                SetName::Dnat(n) => slots.addresses = slots.addresses.max(*n),
                SetName::NodePortDnat(n) => slots.node_ports = slots.node_ports.max(*n),
                _ => {}
            }
        }
        slots
    }

    pub fn max(self, other: Slots) -> Slots {
        Slots {
            addresses: self.addresses.max(other.addresses),
            node_ports: self.node_ports.max(other.node_ports),
        }
    }
}

/// Declares the table, every set, base and static chain (idempotent `add`s).
pub fn declare(tx: &mut Transaction, ctx: &Context, dnat_sets: &BTreeSet<SetName>, slots: Slots) {
    let fam = ctx.ip();
    tx.line(
        None,
        format!("add table {fam} {TABLE} {{ comment \"rules for kube-proxy\"; }}"),
    );
    for set in static_sets(ctx)
        .into_iter()
        .chain(dnat_sets.iter().copied())
    {
        tx.line(None, format!("add {}", set_declaration(ctx, set)));
    }
    for (name, kind, hook, priority) in BASE_CHAINS {
        tx.line(
            None,
            format!(
                "add chain {fam} {TABLE} {name} {{ type {kind} hook {hook} priority {priority}; }}"
            ),
        );
    }
    for name in STATIC_CHAINS.iter().chain(std::iter::once(&DISPATCH_CHAIN)) {
        tx.line(None, format!("add chain {fam} {TABLE} {name}"));
    }
    declare_slots(tx, ctx, Slots::default(), slots);
}

/// Declares slot maps and chains from `from` (exclusive counts) up to `to`, with their rule.
pub fn declare_slots(tx: &mut Transaction, ctx: &Context, from: Slots, to: Slots) {
    declare_slot_objects(tx, ctx, from, to);
    write_slot_rules(tx, ctx, from, to, false);
}

/// Declares slot maps and chains from `from` up to `to`, without rules.
pub fn declare_slot_objects(tx: &mut Transaction, ctx: &Context, from: Slots, to: Slots) {
    let fam = ctx.ip();
    for i in from.addresses..to.addresses {
        tx.line(
            None,
            format!("add {}", set_declaration(ctx, SetName::Backends(i))),
        );
        tx.line(None, format!("add chain {fam} {TABLE} slot-{i}"));
    }
    for i in from.node_ports..to.node_ports {
        tx.line(
            None,
            format!("add {}", set_declaration(ctx, SetName::NodePortBackends(i))),
        );
        tx.line(None, format!("add chain {fam} {TABLE} nodeport-slot-{i}"));
    }
}

/// Whether `name` is one of the chains every table has (base, static, dispatch, slots),
/// as opposed to the per-service chains of a previous state.
pub fn is_static_chain(name: &str) -> bool {
    let slot = |prefix: &str| {
        name.strip_prefix(prefix)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    BASE_CHAINS.iter().any(|(base, ..)| *base == name)
        || STATIC_CHAINS.contains(&name)
        || name == DISPATCH_CHAIN
        || slot("slot-")
        || slot("nodeport-slot-")
}

/// The sets and maps of the table by name (not affinity sets), to read a kernel listing.
pub fn set_named(name: &str) -> Option<SetName> {
    let number = |prefix: &str| {
        name.strip_prefix(prefix)
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<u32>().ok())
    };
    if let Some(n) = number("dnat-") {
        return Some(SetName::Dnat(n));
    }
    if let Some(n) = number("nodeport-dnat-") {
        return Some(SetName::NodePortDnat(n));
    }
    if let Some(i) = number("backends-") {
        return Some(SetName::Backends(i));
    }
    if let Some(i) = number("nodeport-backends-") {
        return Some(SetName::NodePortBackends(i));
    }
    ALWAYS_SETS
        .into_iter()
        .chain([SetName::NodePortIps])
        .find(|set| set.name() == name)
}

/// The single DNAT rule of each slot chain in the range (flushing first when `flush`).
pub fn write_slot_rules(tx: &mut Transaction, ctx: &Context, from: Slots, to: Slots, flush: bool) {
    let fam = ctx.ip();
    let ip = ctx.ip();
    for i in from.addresses..to.addresses {
        if flush {
            tx.line(None, format!("flush chain {fam} {TABLE} slot-{i}"));
        }
        tx.line(None, format!("add rule {fam} {TABLE} slot-{i} dnat {ip} addr . port to {ip} daddr . meta l4proto . th dport map @backends-{i}"));
    }
    for i in from.node_ports..to.node_ports {
        if flush {
            tx.line(None, format!("flush chain {fam} {TABLE} nodeport-slot-{i}"));
        }
        tx.line(None, format!("add rule {fam} {TABLE} nodeport-slot-{i} dnat {ip} addr . port to meta l4proto . th dport map @nodeport-backends-{i}"));
    }
}

/// The slot maps (for flushing on a full sync).
pub fn slot_sets(slots: Slots) -> impl Iterator<Item = SetName> {
    (0..slots.addresses)
        .map(SetName::Backends)
        .chain((0..slots.node_ports).map(SetName::NodePortBackends))
}

/// `set|map NAME { ... }` prefixed with the family and table, for `add`.
pub fn set_declaration(ctx: &Context, set: SetName) -> String {
    let decl = set.declaration(ctx.family);
    let (kind, rest) = decl
        .split_once(' ')
        .expect("declarations start with set or map");
    format!("{kind} {} {TABLE} {rest}", ctx.ip())
}

fn write_chain_rules(tx: &mut Transaction, fam: &str, name: &str, rules: Vec<String>) {
    tx.line(None, format!("flush chain {fam} {TABLE} {name}"));
    for rule in rules {
        tx.line(None, format!("add rule {fam} {TABLE} {name} {rule}"));
    }
}

/// Flushes and rewrites every base and static chain (not the dispatch chain).
pub fn write_static_rules(tx: &mut Transaction, ctx: &Context) {
    write_base_rules(tx, ctx);
    write_static_chain_rules(tx, ctx);
}

/// Flushes and rewrites the base chains: their rules are the only way traffic enters the
/// table, so a table built in several transactions gets them in the last one.
pub fn write_base_rules(tx: &mut Transaction, ctx: &Context) {
    let fam = ctx.ip();
    let chain = |tx: &mut Transaction, name: &str, rules: Vec<String>| {
        write_chain_rules(tx, fam, name, rules)
    };
    chain(
        tx,
        "filter-prerouting-pre-dnat",
        vec!["ct state new jump firewall-check".into()],
    );
    chain(
        tx,
        "filter-output-pre-dnat",
        vec!["ct state new jump firewall-check".into()],
    );
    chain(
        tx,
        "filter-input",
        vec![
            "ct state new jump nodeport-endpoints-check".into(),
            "ct state new jump service-endpoints-check".into(),
        ],
    );
    chain(
        tx,
        "filter-forward",
        vec![
            "ct state new jump service-endpoints-check".into(),
            "ct state new jump cluster-ips-check".into(),
        ],
    );
    chain(
        tx,
        "filter-output",
        vec![
            "ct state new jump service-endpoints-check".into(),
            "ct state new jump cluster-ips-check".into(),
        ],
    );
    chain(tx, "nat-prerouting", vec!["jump services".into()]);
    chain(tx, "nat-output", vec!["jump services".into()]);
    chain(tx, "nat-postrouting", vec!["jump masquerading".into()]);
}

/// Flushes and rewrites the static regular chains.
pub fn write_static_chain_rules(tx: &mut Transaction, ctx: &Context) {
    let fam = ctx.ip();
    let ip = ctx.ip();
    let mark = ctx.mark_text();
    let np = ctx.nodeport_match();
    let frontend = format!("{ip} daddr . meta l4proto . th dport");
    let chain = |tx: &mut Transaction, name: &str, rules: Vec<String>| {
        write_chain_rules(tx, fam, name, rules)
    };
    let mut services = Vec::new();
    if ctx.masquerade_all {
        services.push(format!("{ip} daddr @cluster-ips meta mark set meta mark or {mark} comment \"masquerade all clusterIP traffic\""));
    } else if let Some(not_local) = ctx.local_match(true) {
        services.push(format!(
            "{ip} daddr @cluster-ips {not_local} meta mark set meta mark or {mark} comment \"masquerade clusterIP traffic from outside cluster\""
        ));
    }
    services.push(format!("{frontend} @external-masquerade meta mark set meta mark or {mark} comment \"masquerade external traffic\""));
    services.push(format!("{np} meta l4proto . th dport @nodeport-masquerade meta mark set meta mark or {mark} comment \"masquerade NodePort traffic\""));
    services.push(format!("{frontend} vmap @service-ips"));
    services.push(format!(
        "{np} meta l4proto . th dport vmap @service-nodeports"
    ));
    services.push(format!("jump {DISPATCH_CHAIN}"));
    chain(tx, "services", services);

    chain(
        tx,
        "masquerading",
        vec![
            format!("meta mark and {mark} != 0 meta mark set meta mark xor {mark} masquerade fully-random"),
            format!("ct status dnat {ip} saddr . {ip} daddr . meta l4proto . th dport @hairpin-connections masquerade fully-random"),
        ],
    );
    let mut cluster_ips_check = vec![format!(
        "{ip} daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
    )];
    if !ctx.service_cidrs.is_empty() {
        // Only once the ServiceCIDRs are known: an address in them that no Service holds (a
        // deleted Service's, another proxy's) goes nowhere rather than out of the node.
        let cidrs: Vec<String> = ctx.service_cidrs.iter().map(|c| c.to_string()).collect();
        cluster_ips_check.push(format!(
            "{ip} daddr {{ {} }} drop comment \"Drop traffic to unallocated ClusterIPs\"",
            cidrs.join(", ")
        ));
    }
    chain(tx, "cluster-ips-check", cluster_ips_check);
    chain(
        tx,
        "service-endpoints-check",
        vec![
            format!("{frontend} @no-endpoint-reject reject"),
            format!("{frontend} @no-endpoint-drop drop"),
        ],
    );
    chain(
        tx,
        "nodeport-endpoints-check",
        vec![
            format!("{np} meta l4proto . th dport @nodeport-no-endpoint-reject reject"),
            format!("{np} meta l4proto . th dport @nodeport-no-endpoint-drop drop"),
        ],
    );
    chain(
        tx,
        "firewall-check",
        vec![format!("{frontend} @firewall-ips {frontend} . {ip} saddr != @firewall-allow drop comment \"loadBalancerSourceRanges\"")],
    );
}

/// Rewrites the dispatch chain: per endpoint count N in use, one rule that picks one of the
/// first N slots uniformly (`numgen random mod N`) for frontends in `dnat-N`.
pub fn write_dispatch(tx: &mut Transaction, ctx: &Context, dnat_sets: &BTreeSet<SetName>) {
    let fam = ctx.ip();
    let ip = ctx.ip();
    let np = ctx.nodeport_match();
    tx.line(None, format!("flush chain {fam} {TABLE} {DISPATCH_CHAIN}"));
    for set in dnat_sets {
        let (n, matcher, set_name, slot) = match set {
            SetName::Dnat(n) => (
                *n,
                format!("{ip} daddr . meta l4proto . th dport"),
                format!("dnat-{n}"),
                "slot",
            ),
            SetName::NodePortDnat(n) => (
                *n,
                format!("{np} meta l4proto . th dport"),
                format!("nodeport-dnat-{n}"),
                "nodeport-slot",
            ),
            _ => continue,
        };
        let targets: Vec<String> = (0..n).map(|i| format!("{i} : goto {slot}-{i}")).collect();
        tx.line(
            None,
            format!("add rule {fam} {TABLE} {DISPATCH_CHAIN} {matcher} @{set_name} numgen random mod {n} vmap {{ {} }}", targets.join(", ")),
        );
    }
}
