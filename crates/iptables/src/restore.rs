//! A full `iptables-restore --noflush` input for one family: the static chains with their
//! rules, every service port's rules, the last rule of `KUBE-SERVICES`, and the deletion of
//! chains no port needs any more. Declaring a chain (`:NAME - [0:0]`) empties it, so the
//! input replaces exactly the chains it names and nothing else in the tables.

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

/// An input and the chains each service port has after it.
#[derive(Clone, Debug, Default)]
pub struct Rendered {
    pub text: String,
    pub chains: BTreeMap<ServicePortName, Vec<String>>,
    /// Rules (`-A` lines) the input writes to the filter table (all of ours there).
    pub filter_rules: usize,
    /// Rules the input writes to the nat table.
    pub nat_rules: usize,
    /// Our nat rules after it is applied: written, plus those of unchanged ports' chains.
    pub nat_rules_total: usize,
}

/// Upstream's canary chain, in mangle, nat and filter: created by a full sync; gone means
/// someone deleted our chains (`iptables -X`, `nft flush ruleset`), so everything is rewritten.
pub const KUBE_PROXY_CANARY: &str = "KUBE-PROXY-CANARY";
/// The tables holding a canary.
pub const CANARY_TABLES: [&str; 3] = ["mangle", "nat", "filter"];

/// The whole input for a full sync. `existing`: the nat chains the kernel has now (from
/// `iptables-save`); the per-service-port ones no port needs are deleted.
pub fn render_full(plan: &FamilyPlan, ctx: &FamilyContext, existing: &BTreeSet<String>) -> String {
    render(plan, ctx, Rewrite::All, existing, Style::default()).text
}

/// An input that rewrites the static chains (they hold every port's dispatch and filter
/// rules), the chains of the ports `rewrite` names, and deletes those of `candidates` that no
/// port needs any more (other chains, and chains of others, are never touched).
pub fn render(
    plan: &FamilyPlan,
    ctx: &FamilyContext,
    rewrite: Rewrite<'_>,
    candidates: &BTreeSet<String>,
    style: Style,
) -> Rendered {
    let mark = format!("{:#x}/{:#x}", ctx.mark, ctx.mark);
    let mut filter_rules: Vec<String> = vec![
        format!("-A {KUBE_FORWARD} -m conntrack --ctstate INVALID -j DROP"),
        format!("-A {KUBE_FORWARD} -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark} -j ACCEPT"),
        format!("-A {KUBE_FORWARD} -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"),
    ];
    let mut nat_chains: Vec<String> = NAT_CHAINS.iter().map(|c| c.to_string()).collect();
    let mut nat_rules: Vec<String> = vec![
        format!("-A {KUBE_POSTROUTING} -m mark ! --mark {mark} -j RETURN"),
        format!("-A {KUBE_POSTROUTING} -j MARK --xor-mark {:#x}", ctx.mark),
        format!("-A {KUBE_POSTROUTING} -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"),
        format!("-A {KUBE_MARK_MASQ} -j MARK --or-mark {:#x}", ctx.mark),
    ];
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    let mut chains = BTreeMap::new();
    let mut skipped_nat_rules = 0;
    for (name, port_plan) in &plan.services {
        let rules = service::render_in(port_plan, ctx, style);
        let write_chains = match rewrite {
            Rewrite::All => true,
            Rewrite::Ports(ports) => ports.contains(name),
        };
        filter_rules.extend(rules.filter.iter().map(|(c, r)| format!("-A {c} {r}")));
        for (chain, rule) in &rules.nat {
            if write_chains || !is_service_port_chain(chain) {
                nat_rules.push(format!("-A {chain} {rule}"));
            } else {
                skipped_nat_rules += 1;
            }
        }
        for chain in &rules.chains {
            if wanted.insert(chain.clone()) && write_chains {
                nat_chains.push(chain.clone());
            }
        }
        chains.insert(name.clone(), rules.chains);
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
            nat_rules.push(format!(
                "-A {KUBE_SERVICES} {comment} -m addrtype --dst-type LOCAL{not_loopback} -j {KUBE_NODEPORTS}"
            ));
        }
        NodePortDestinations::Addresses(ips) => {
            for ip in ips.iter().filter(|ip| !ip.is_loopback()) {
                nat_rules.push(format!(
                    "-A {KUBE_SERVICES} {comment} -d {ip} -j {KUBE_NODEPORTS}"
                ));
            }
        }
    }
    let stale: Vec<&String> = candidates
        .iter()
        .filter(|c| is_service_port_chain(c) && !wanted.contains(*c))
        .collect();

    let mut out = String::new();
    let filter_count = filter_rules.len() + usize::from(ctx.localhost_nodeports);
    let nat_count = nat_rules.len();
    out.push_str("*filter\n");
    for chain in FILTER_CHAINS {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    if ctx.localhost_nodeports {
        // Upstream's guard for route_localnet: nothing from outside reaches 127.0.0.0/8
        // unless it was DNATed there by a NodePort rule.
        let _ = writeln!(out, ":{KUBE_FIREWALL} - [0:0]");
        let _ = writeln!(out, "-A {KUBE_FIREWALL} -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP");
    }
    for rule in filter_rules {
        let _ = writeln!(out, "{rule}");
    }
    out.push_str("COMMIT\n*nat\n");
    for chain in nat_chains
        .iter()
        .map(String::as_str)
        .chain(stale.iter().map(|c| c.as_str()))
    {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for rule in nat_rules {
        let _ = writeln!(out, "{rule}");
    }
    for chain in stale {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    Rendered {
        text: out,
        chains,
        filter_rules: filter_count,
        nat_rules: nat_count,
        nat_rules_total: nat_count + skipped_nat_rules,
    }
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

/// `input` made a full sync's: the canary chains declared in each table (with a `mangle`
/// section of their own), and `-I <chain> 1 <rule>` for each jump of [`JUMPS`] that
/// `present(table, chain, target)` does not find, at the end of its table (after the chains
/// it jumps to exist).
pub fn for_full_sync(input: &str, present: impl Fn(&str, &str, &str) -> bool) -> String {
    let mut out = String::with_capacity(input.len() + 2048);
    let _ = writeln!(out, "*mangle\n:{KUBE_PROXY_CANARY} - [0:0]\nCOMMIT");
    let mut table = "";
    for line in input.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = if name == "filter" { "filter" } else { "nat" };
            let _ = writeln!(out, "{line}\n:{KUBE_PROXY_CANARY} - [0:0]");
            continue;
        }
        if line == "COMMIT" {
            let firewall = input.contains(&format!(":{KUBE_FIREWALL} - [0:0]"));
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
        let _ = writeln!(out, "{line}");
    }
    out
}

/// What a rejected input's message points at: `line N failed` of `input`, the line, and the
/// service port it belongs to (by its chain in `chains`, or the port named in its comment),
/// so the log says which Service broke the sync.
pub fn describe_failure(
    input: &str,
    message: &str,
    chains: &BTreeMap<ServicePortName, Vec<String>>,
) -> Option<String> {
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
            chains
                .iter()
                .find(|(_, own)| own.iter().any(|c| c == chain))
                .map(|(name, _)| name.to_string())
        })
        .or_else(|| {
            let comment = line.split("--comment ").nth(1)?.trim_start_matches('"');
            let name = comment.split([' ', '"']).next()?;
            chains
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
:KUBE-SVC-CDGGSHYLG3RE2FKL - [0:0]
";
        assert!(text.starts_with(expected_head), "{text}");
        let expected_tail = "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS
-X KUBE-SEP-GONE0000000000000
COMMIT
";
        assert!(text.ends_with(expected_tail), "{text}");
        assert!(
            text.contains(":KUBE-SEP-GONE0000000000000 - [0:0]\n"),
            "declared before its deletion"
        );
        assert!(
            !text.contains("KUBE-MARK-DROP"),
            "chains of others are not touched"
        );
        assert!(text.contains("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n"));
    }
}
