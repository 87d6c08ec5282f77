//! The `iptables-restore --noflush` inputs of one family: a full sync's (the static chains with
//! their rules, every service port's chains, the last rule of `KUBE-SERVICES`, the deletion
//! of chains no port needs any more; in stages on the nf_tables backend) and a partial sync's
//! (the changed ports' chains and the changed rules of the static chains). Declaring a chain
//! (`:NAME - [0:0]`) empties it, so an input replaces exactly the chains it names and nothing
//! else in the tables.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use kube_proxy_model::context::{FamilyContext, NodePortDestinations};
use kube_proxy_model::{FamilyPlan, IpFamily, ServicePortName};

use crate::service::{
    self, Style, KUBE_EXTERNAL_SERVICES, KUBE_MARK_MASQ, KUBE_NODEPORTS, KUBE_PROXY_FIREWALL,
    KUBE_SERVICES,
};

pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
/// Shared with kubelet; only with localhost NodePorts.
pub const KUBE_FIREWALL: &str = "KUBE-FIREWALL";

/// Static chains of each table, in upstream's order.
const FILTER_CHAINS: [&str; 5] = [
    KUBE_NODEPORTS,
    KUBE_SERVICES,
    KUBE_EXTERNAL_SERVICES,
    KUBE_FORWARD,
    KUBE_PROXY_FIREWALL,
];
const NAT_CHAINS: [&str; 4] = [
    KUBE_NODEPORTS,
    KUBE_SERVICES,
    KUBE_MARK_MASQ,
    KUBE_POSTROUTING,
];

/// Whether `chain` is one this proxy creates per service port (and may delete).
pub fn is_service_port_chain(chain: &str) -> bool {
    [
        "KUBE-SVC-",
        "KUBE-SVL-",
        "KUBE-EXT-",
        "KUBE-FW-",
        "KUBE-SEP-",
    ]
    .iter()
    .any(|prefix| chain.starts_with(prefix))
}

/// Which per-service-port chains an input writes.
#[derive(Clone, Copy, Debug)]
pub enum Rewrite<'a> {
    /// Every port's chains (a full sync).
    All,
    /// Only these ports' chains; the others stay as they are in the kernel (a partial sync).
    Ports(&'a BTreeSet<ServicePortName>),
}

/// The chains and rules of one service port that an input writes.
#[derive(Clone, Debug, Default)]
pub struct PortChains {
    pub chains: Vec<String>,
    /// The `-A <chain> <rule>` lines, rendered once (a large cluster has millions).
    pub rules: String,
}

/// What one sync writes, before it is spelled as `iptables-restore` inputs.
#[derive(Clone, Debug, Default)]
pub struct Rendered {
    /// The static chains in writing order, each with its whole contents (every port's
    /// dispatch and filter rules are there).
    pub statics: Vec<((&'static str, &'static str), Vec<String>)>,
    /// The ports whose own chains are written (every port in a full sync).
    pub ports: Vec<PortChains>,
    /// Per-service-port chains no port needs any more: deleted.
    pub stale: Vec<String>,
    /// Partial syncs: what changed in each static chain (the changed ports' rules only;
    /// `statics` is then empty).
    pub changes: BTreeMap<(&'static str, &'static str), StaticChange>,
}

/// What one service port puts in the static chains, its own chains and how many rules
/// they hold: kept between syncs, so a partial sync renders only the changed ports.
#[derive(Clone, Debug, Default)]
pub struct PortStatics {
    pub filter: Vec<(&'static str, String)>,
    pub nat: Vec<(&'static str, String)>,
    pub chains: Vec<String>,
    pub own_rules: usize,
}

/// Every port's [`PortStatics`] as last written, and the rule counts of the tables.
#[derive(Clone, Debug, Default)]
pub struct PortCache {
    pub ports: BTreeMap<ServicePortName, PortStatics>,
    /// Our rules in the filter table (all in static chains).
    pub filter_rules: usize,
    /// Our rules in the nat table: the static chains' and every port's own.
    pub nat_rules: usize,
    /// Rules of each static chain, as written.
    pub static_counts: BTreeMap<(&'static str, &'static str), usize>,
}

/// Whether only this proxy writes rules into static chain `(table, chain)` (kubelet shares
/// `KUBE-FIREWALL`, and once created `KUBE-MARK-MASQ` and `KUBE-POSTROUTING`): such a
/// chain's rule count is compared with ours to find foreign edits.
pub fn is_exclusive_static_chain(key: &(&str, &str)) -> bool {
    matches!(
        key,
        (
            "filter",
            KUBE_NODEPORTS
                | KUBE_SERVICES
                | KUBE_EXTERNAL_SERVICES
                | KUBE_FORWARD
                | KUBE_PROXY_FIREWALL
        ) | ("nat", KUBE_NODEPORTS | KUBE_SERVICES)
    )
}

/// Rules that leave and join one static chain in a partial sync.
#[derive(Clone, Debug, Default)]
pub struct StaticChange {
    pub removed: Vec<String>,
    pub added: Vec<String>,
}

/// Upstream's canary chain, in mangle, nat and filter: created by a full sync; gone means
/// someone deleted our chains (`iptables -X`, `nft flush ruleset`), so everything is rewritten.
pub const KUBE_PROXY_CANARY: &str = "KUBE-PROXY-CANARY";
/// The tables holding a canary.
pub const CANARY_TABLES: [&str; 3] = ["mangle", "nat", "filter"];

/// Rules (`-A`/`-I` lines) an input writes to `table`.
pub fn rules_written(input: &str, table: &str) -> usize {
    crate::proxier::table_lines(input, table)
        .filter(|l| l.starts_with("-A ") || l.starts_with("-I "))
        .count()
}

/// The whole input for a full sync. `existing`: the nat chains the kernel has now (from
/// `iptables-save`); the per-service-port ones no port needs are deleted.
pub fn render_full(plan: &FamilyPlan, ctx: &FamilyContext, existing: &BTreeSet<String>) -> String {
    let mut cache = PortCache::default();
    render(
        plan,
        ctx,
        Rewrite::All,
        existing,
        Style::default(),
        &mut cache,
    )
    .full_inputs(None, None)
    .concat()
}

/// What a sync writes: the static chains (they hold every port's dispatch and filter rules),
/// the chains of the ports `rewrite` names, and the deletion of those of `candidates` that
/// no port needs any more (other chains, and chains of others, are never touched). `cache`
/// holds what each port rendered last time: only the ports `rewrite` names are rendered
/// again (all of them, and the cache rebuilt, for [`Rewrite::All`]).
pub fn render(
    plan: &FamilyPlan,
    ctx: &FamilyContext,
    rewrite: Rewrite<'_>,
    candidates: &BTreeSet<String>,
    style: Style,
    cache: &mut PortCache,
) -> Rendered {
    let mark = format!("{:#x}/{:#x}", ctx.mark, ctx.mark);
    let mut statics: Vec<((&'static str, &'static str), Vec<String>)> = Vec::new();
    for chain in FILTER_CHAINS {
        statics.push((("filter", chain), Vec::new()));
    }
    if ctx.localhost_nodeports {
        // Upstream's guard for route_localnet: nothing from outside reaches 127.0.0.0/8
        // unless it was DNATed there by a NodePort rule.
        statics.push((("filter", KUBE_FIREWALL), vec!["-m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP".to_string()]));
    }
    for chain in NAT_CHAINS {
        statics.push((("nat", chain), Vec::new()));
    }
    let index: BTreeMap<(&str, &str), usize> = statics
        .iter()
        .enumerate()
        .map(|(i, (key, _))| (*key, i))
        .collect();
    let mut push = |table: &'static str, chain: &str, rule: String| {
        let i = index[&(table, chain)];
        statics[i].1.push(rule);
    };
    if ctx.drop_invalid {
        let counter = match style.nfacct {
            true => format!(
                " -m nfacct --nfacct-name {}",
                service::INVALID_DROPPED_COUNTER
            ),
            false => String::new(),
        };
        push(
            "filter",
            KUBE_FORWARD,
            format!("-m conntrack --ctstate INVALID{counter} -j DROP"),
        );
    }
    push(
        "filter",
        KUBE_FORWARD,
        format!(
            "-m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark} -j ACCEPT"
        ),
    );
    push("filter", KUBE_FORWARD, "-m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".into());
    push(
        "nat",
        KUBE_POSTROUTING,
        format!("-m mark ! --mark {mark} -j RETURN"),
    );
    push(
        "nat",
        KUBE_POSTROUTING,
        format!("-j MARK --xor-mark {:#x}", ctx.mark),
    );
    push("nat", KUBE_POSTROUTING, "-m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully".into());
    push(
        "nat",
        KUBE_MARK_MASQ,
        format!("-j MARK --or-mark {:#x}", ctx.mark),
    );

    let mut wanted: BTreeSet<String> = BTreeSet::new();
    let mut ports = Vec::new();
    let mut changes: BTreeMap<(&'static str, &'static str), StaticChange> = BTreeMap::new();
    let mut render_port = |name: &ServicePortName, cache: &mut PortCache| {
        let Some(port_plan) = plan.services.get(name) else {
            return;
        };
        let rules = service::render_in(port_plan, ctx, style);
        let mut own = PortChains::default();
        let mut statics = PortStatics {
            filter: rules.filter,
            ..Default::default()
        };
        for (chain, rule) in rules.nat {
            if is_service_port_chain(&chain) {
                statics.own_rules += 1;
                let _ = writeln!(own.rules, "-A {chain} {rule}");
            } else {
                let chain = NAT_CHAINS
                    .iter()
                    .find(|c| **c == chain)
                    .expect("a static nat chain");
                statics.nat.push((chain, rule));
            }
        }
        for chain in &rules.chains {
            if wanted.insert(chain.clone()) {
                own.chains.push(chain.clone());
            }
        }
        statics.chains = rules.chains;
        ports.push(own);
        cache.filter_rules += statics.filter.len();
        cache.nat_rules += statics.nat.len() + statics.own_rules;
        cache.ports.insert(name.clone(), statics);
    };
    match rewrite {
        Rewrite::All => {
            *cache = PortCache::default();
            for name in plan.services.keys() {
                render_port(name, cache);
            }
            for statics in cache.ports.values() {
                for (chain, rule) in &statics.filter {
                    push("filter", chain, rule.clone());
                }
                for (chain, rule) in &statics.nat {
                    push("nat", chain, rule.clone());
                }
            }
        }
        Rewrite::Ports(names) => {
            // Only the changed ports are rendered; of the static chains, only their rules
            // can differ (everything else depends on the context, whose change means a full
            // sync).
            for name in names {
                let old = cache.ports.remove(name).unwrap_or_default();
                cache.filter_rules -= old.filter.len();
                cache.nat_rules -= old.nat.len() + old.own_rules;
                render_port(name, cache);
                let new = cache.ports.get(name).cloned().unwrap_or_default();
                let keyed = |rules: &[(&'static str, String)], table: &'static str| {
                    let mut by_chain: BTreeMap<(&'static str, &'static str), Vec<String>> =
                        BTreeMap::new();
                    for (chain, rule) in rules {
                        by_chain
                            .entry((table, chain))
                            .or_default()
                            .push(rule.clone());
                    }
                    by_chain
                };
                for table in ["filter", "nat"] {
                    let (before, after) = match table {
                        "filter" => (keyed(&old.filter, "filter"), keyed(&new.filter, "filter")),
                        _ => (keyed(&old.nat, "nat"), keyed(&new.nat, "nat")),
                    };
                    let keys: BTreeSet<_> = before.keys().chain(after.keys()).copied().collect();
                    for key in keys {
                        let empty = Vec::new();
                        let (gone, new) = multiset_difference(
                            before.get(&key).unwrap_or(&empty),
                            after.get(&key).unwrap_or(&empty),
                        );
                        if gone.is_empty() && new.is_empty() {
                            continue;
                        }
                        let count = cache.static_counts.entry(key).or_default();
                        *count = (*count + new.len()).saturating_sub(gone.len());
                        let change = changes.entry(key).or_default();
                        change.removed.extend(gone.into_iter().cloned());
                        change.added.extend(new.into_iter().cloned());
                    }
                }
            }
        }
    }
    // Last: NodePorts, for packets addressed to this node.
    let comment =
        "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"";
    match &ctx.nodeports {
        NodePortDestinations::AllLocal => {
            let not_loopback = match ctx.family {
                IpFamily::V4 if ctx.localhost_nodeports => "",
                IpFamily::V4 => " ! -d 127.0.0.0/8",
                IpFamily::V6 => " ! -d ::1/128",
            };
            push(
                "nat",
                KUBE_SERVICES,
                format!("{comment} -m addrtype --dst-type LOCAL{not_loopback} -j {KUBE_NODEPORTS}"),
            );
        }
        NodePortDestinations::Addresses(ips) => {
            for ip in ips.iter().filter(|ip| !ip.is_loopback()) {
                push(
                    "nat",
                    KUBE_SERVICES,
                    format!("{comment} -d {ip} -j {KUBE_NODEPORTS}"),
                );
            }
        }
    }
    let stale: Vec<String> = candidates
        .iter()
        .filter(|c| is_service_port_chain(c) && !wanted.contains(*c))
        .cloned()
        .collect();
    if matches!(rewrite, Rewrite::All) {
        // The static chains' own rules (not of any port).
        let ports_filter: usize = cache.ports.values().map(|p| p.filter.len()).sum();
        let ports_nat: usize = cache.ports.values().map(|p| p.nat.len()).sum();
        let count = |table: &str| -> usize {
            statics
                .iter()
                .filter(|((t, _), _)| *t == table)
                .map(|(_, rules)| rules.len())
                .sum()
        };
        cache.filter_rules += count("filter") - ports_filter;
        cache.nat_rules += count("nat") - ports_nat;
        cache.static_counts = statics
            .iter()
            .map(|(key, rules)| (*key, rules.len()))
            .collect();
    } else {
        statics.clear();
    }
    Rendered {
        statics,
        ports,
        stale,
        changes,
    }
}

impl Rendered {
    /// A full sync's inputs: one that rewrites everything; or, with `stage_chains`, first
    /// the ports' own chains in stages of about that many chains (each port whole in one
    /// stage), then one with the static chains, the deletions of stale chains and nothing
    /// else. Either way traffic only reaches a new port's chains through the last input; an
    /// existing port's chains are rewritten whole in one stage.
    ///
    /// With `jumps` (a full sync of the proxier: whether `(table, chain, target)` already has
    /// its jump), the last input also creates the canary chains and inserts the missing jumps
    /// from the built-in chains. The ports' rendered rules are moved into the inputs (a large
    /// cluster's are hundreds of MB).
    pub fn full_inputs(
        &mut self,
        stage_chains: Option<usize>,
        jumps: Option<JumpPresent<'_>>,
    ) -> Vec<String> {
        let mut inputs = Vec::new();
        let limit = stage_chains.unwrap_or(usize::MAX);
        let total: usize = self.ports.iter().map(|p| p.chains.len()).sum();
        let mut inline = self.ports.len();
        if total > limit {
            let mut start = 0;
            while start < self.ports.len() {
                let mut end = start;
                let mut count = 0;
                while end < self.ports.len() && (count < limit || end == start) {
                    count += self.ports[end].chains.len();
                    end += 1;
                }
                let mut out = String::from("*nat\n");
                if start == 0 {
                    // The ports' chains jump to KUBE-MARK-MASQ: make sure it is there, with
                    // its rule (rewritten in the same transaction, so never empty).
                    let key = ("nat", KUBE_MARK_MASQ);
                    let _ = writeln!(out, ":{KUBE_MARK_MASQ} - [0:0]");
                    for (_, rules) in self.statics.iter().filter(|(k, _)| *k == key) {
                        for rule in rules {
                            let _ = writeln!(out, "-A {KUBE_MARK_MASQ} {rule}");
                        }
                    }
                }
                write_declarations(&mut out, &self.ports[start..end], &[]);
                for port in &mut self.ports[start..end] {
                    out.push_str(&std::mem::take(&mut port.rules));
                }
                out.push_str("COMMIT\n");
                inputs.push(out);
                start = end;
            }
            inline = 0;
        }
        let inline = &mut self.ports[..inline];
        let firewall = self.statics.iter().any(|((_, c), _)| *c == KUBE_FIREWALL);
        let jumps_of = |out: &mut String, table: &str| {
            if let Some(present) = jumps {
                write_missing_jumps(out, table, firewall, present);
            }
        };
        let mut out = String::new();
        if jumps.is_some() {
            let _ = writeln!(out, "*mangle\n:{KUBE_PROXY_CANARY} - [0:0]\nCOMMIT");
        }
        out.push_str("*filter\n");
        if jumps.is_some() {
            let _ = writeln!(out, ":{KUBE_PROXY_CANARY} - [0:0]");
        }
        for ((_, chain), _) in self.statics.iter().filter(|((t, _), _)| *t == "filter") {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        for ((_, chain), rules) in self.statics.iter().filter(|((t, _), _)| *t == "filter") {
            for rule in rules {
                let _ = writeln!(out, "-A {chain} {rule}");
            }
        }
        jumps_of(&mut out, "filter");
        out.push_str("COMMIT\n*nat\n");
        if jumps.is_some() {
            let _ = writeln!(out, ":{KUBE_PROXY_CANARY} - [0:0]");
        }
        for ((_, chain), _) in self.statics.iter().filter(|((t, _), _)| *t == "nat") {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        write_declarations(&mut out, inline, &self.stale);
        for ((_, chain), rules) in self.statics.iter().filter(|((t, _), _)| *t == "nat") {
            for rule in rules {
                let _ = writeln!(out, "-A {chain} {rule}");
            }
        }
        for port in inline.iter_mut() {
            out.push_str(&std::mem::take(&mut port.rules));
        }
        for chain in &self.stale {
            let _ = writeln!(out, "-X {chain}");
        }
        jumps_of(&mut out, "nat");
        out.push_str("COMMIT\n");
        inputs.push(out);
        inputs
    }

    /// A partial sync's input: the ports' own chains, and of each static chain only what
    /// changed since `previous` (`-D` of a rule gone, `-I <chain> 1` of a new one: the
    /// order within a static chain carries no meaning, except that the NodePorts rule stays
    /// last, and new rules go first). `None` when nothing changed at all: no restore needed.
    pub fn partial_input(&self) -> Option<String> {
        let mut out = String::new();
        for table in ["filter", "nat"] {
            let _ = writeln!(out, "*{table}");
            let mut removed = Vec::new();
            let mut added = Vec::new();
            for ((_, chain), change) in self.changes.iter().filter(|((t, _), _)| *t == table) {
                removed.extend(change.removed.iter().map(|r| format!("-D {chain} {r}")));
                added.extend(
                    change
                        .added
                        .iter()
                        .rev()
                        .map(|r| format!("-I {chain} 1 {r}")),
                );
            }
            if table == "nat" {
                write_declarations(&mut out, &self.ports, &self.stale);
            }
            for line in &removed {
                let _ = writeln!(out, "{line}");
            }
            if table == "nat" {
                for port in &self.ports {
                    out.push_str(&port.rules);
                }
            }
            for line in &added {
                let _ = writeln!(out, "{line}");
            }
            if table == "nat" {
                for chain in &self.stale {
                    let _ = writeln!(out, "-X {chain}");
                }
            }
            out.push_str("COMMIT\n");
        }
        (out != "*filter\nCOMMIT\n*nat\nCOMMIT\n").then_some(out)
    }
}

/// The declarations of `ports`' chains and of `stale` (a chain is emptied by its
/// declaration before its deletion), sorted: `iptables-nft-restore` takes twice as long for
/// the same chains in random order.
fn write_declarations(out: &mut String, ports: &[PortChains], stale: &[String]) {
    let mut declared: Vec<&str> = ports
        .iter()
        .flat_map(|p| p.chains.iter().map(String::as_str))
        .chain(stale.iter().map(String::as_str))
        .collect();
    declared.sort_unstable();
    for chain in declared {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
}

/// (in `before` but not `after`, in `after` but not `before`), counting duplicates.
fn multiset_difference<'a>(
    before: &'a [String],
    after: &'a [String],
) -> (Vec<&'a String>, Vec<&'a String>) {
    let mut counts: std::collections::HashMap<&str, isize> = std::collections::HashMap::new();
    for rule in before {
        *counts.entry(rule).or_default() += 1;
    }
    for rule in after {
        *counts.entry(rule).or_default() -= 1;
    }
    let mut gone = Vec::new();
    let mut new = Vec::new();
    for rule in before {
        let count = counts.get_mut(rule.as_str()).unwrap();
        if *count > 0 {
            *count -= 1;
            gone.push(rule);
        }
    }
    for rule in after {
        let count = counts.get_mut(rule.as_str()).unwrap();
        if *count < 0 {
            *count += 1;
            new.push(rule);
        }
    }
    (gone, new)
}

/// The jumps from the built-in chains into ours (table, chain, rule), in upstream's order;
/// each is inserted at the top of its chain, so the last one of a chain ends up first, as
/// upstream's prepending leaves them.
pub const JUMPS: [(&str, &str, &str); 12] = [
    ("filter", "INPUT", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL"),
    ("filter", "INPUT", "-m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS"),
    ("filter", "INPUT", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES"),
    ("filter", "FORWARD", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL"),
    ("filter", "FORWARD", "-m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD"),
    ("filter", "FORWARD", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"),
    ("filter", "FORWARD", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES"),
    ("filter", "OUTPUT", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL"),
    ("filter", "OUTPUT", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"),
    ("nat", "PREROUTING", "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"),
    ("nat", "OUTPUT", "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"),
    ("nat", "POSTROUTING", "-m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING"),
];

/// Whether the kernel has the jump `(table, built-in chain, target)` already.
pub type JumpPresent<'a> = &'a dyn Fn(&str, &str, &str) -> bool;

/// `-I <chain> 1 <rule>` for each jump of [`JUMPS`] into `table` (and, with `firewall`, the
/// jumps to `KUBE-FIREWALL`) that `present(table, chain, target)` does not find; written
/// last in the table's section, after the chains they jump to exist.
fn write_missing_jumps(out: &mut String, table: &str, firewall: bool, present: JumpPresent<'_>) {
    let firewall_jumps = [
        ("filter", "INPUT", "-j KUBE-FIREWALL"),
        ("filter", "OUTPUT", "-j KUBE-FIREWALL"),
    ];
    let extra = firewall_jumps.iter().filter(|_| firewall);
    for (jump_table, chain, rule) in JUMPS.iter().chain(extra) {
        let target = rule.rsplit(' ').next().unwrap_or("");
        if *jump_table == table && !present(table, chain, target) {
            let _ = writeln!(out, "-I {chain} 1 {rule}");
        }
    }
}

/// What a rejected input's message points at: `line N failed` of `input`, the line, and the
/// service port it belongs to (by its chain in `chains`, or the port named in its comment),
/// so the log says which Service broke the sync.
pub fn describe_failure(input: &str, message: &str, cache: &PortCache) -> Option<String> {
    let ports = &cache.ports;
    let number: usize = message
        .split("line ")
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    let line = input.lines().nth(number.checked_sub(1)?)?;
    let chain = line
        .strip_prefix("-A ")
        .or_else(|| line.strip_prefix(':'))
        .or_else(|| line.strip_prefix("-X "))
        .and_then(|rest| rest.split_whitespace().next());
    let owner = chain
        .and_then(|chain| {
            ports
                .iter()
                .find(|(_, port)| port.chains.iter().any(|c| c == chain))
                .map(|(name, _)| name.to_string())
        })
        .or_else(|| {
            let comment = line.split("--comment ").nth(1)?.trim_start_matches('"');
            let name = comment.split([' ', '"']).next()?;
            ports
                .keys()
                .map(ToString::to_string)
                .find(|known| known == name)
        });
    Some(match owner {
        Some(port) => format!("line {number} ({line}) of service port {port}"),
        None => format!("line {number} ({line})"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube_proxy_config::DetectLocal;
    use kube_proxy_model::context::ProxyPolicy;
    use kube_proxy_model::NodeView;

    #[test]
    fn a_full_input_declares_every_chain_and_deletes_only_stale_service_chains() {
        let plan = crate::testing::plan(&[
            serde_json::json!({"kind": "Service", "metadata": {"namespace": "default", "name": "web"},
                "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
            serde_json::json!({"kind": "EndpointSlice", "metadata": {"namespace": "default", "name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
                "endpoints": [{"addresses": ["10.244.1.5"]}]}),
        ]);
        let policy = ProxyPolicy {
            detect_local: DetectLocal::ClusterCidr(vec!["10.244.0.0/16".parse().unwrap()]),
            node_port_addresses: kube_proxy_config::NodePortAddresses::All,
            ..Default::default()
        };
        let ctx = FamilyContext::resolve(&policy, IpFamily::V4, &NodeView::default());
        let existing: BTreeSet<String> = [
            "KUBE-SVC-CDGGSHYLG3RE2FKL",
            "KUBE-SEP-GONE0000000000000",
            "KUBE-MARK-DROP",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let text = render_full(&plan, &ctx, &existing);
        let expected_head = "*filter
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SEP-AFGSLHOD2HFNCBX4 - [0:0]
:KUBE-SEP-GONE0000000000000 - [0:0]
:KUBE-SVC-CDGGSHYLG3RE2FKL - [0:0]
-A KUBE-SERVICES -m comment --comment \"default/web:http cluster IP\" -m tcp -p tcp -d 10.96.0.10 --dport 80 -j KUBE-SVC-CDGGSHYLG3RE2FKL
-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS
";
        assert!(text.starts_with(expected_head), "{text}");
        let expected_tail = "-A KUBE-SEP-AFGSLHOD2HFNCBX4 -m comment --comment default/web:http -m tcp -p tcp -j DNAT --to-destination 10.244.1.5:8080
-X KUBE-SEP-GONE0000000000000
COMMIT
";
        assert!(text.ends_with(expected_tail), "{text}");
        assert!(
            text.contains(":KUBE-SEP-GONE0000000000000 - [0:0]\n"),
            "declared (emptied) before its deletion"
        );
        assert!(
            !text.contains("KUBE-MARK-DROP"),
            "chains of others are not touched"
        );
        assert!(text.contains("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n"));
        // With a liberal conntrack (tcpBeLiberal) there is no INVALID drop, as upstream.
        let liberal = ProxyPolicy {
            drop_invalid: false,
            ..policy.clone()
        };
        let ctx = FamilyContext::resolve(&liberal, IpFamily::V4, &NodeView::default());
        let text = render_full(&plan, &ctx, &existing);
        assert!(!text.contains("INVALID"), "{text}");
        assert!(
            text.contains("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\"")
        );
    }
}
