//! The nftables path, for nodes without iptables: the rules of [`crate::rules`] in a table
//! of our own per family, `kube-proxy-userspace`, rewritten whole in one transaction per sync
//! (`flush table` and the rules, applied atomically by nft).
//!
//! Upstream's chains by role, as base chains: `portals-container` (prerouting) and
//! `portals-host` (output) before any other destination NAT (priority -105; dstnat is -100),
//! `nodeports-container` and `nodeports-host` after it (-95: NodePorts last, as upstream's
//! jumps appended to PREROUTING/OUTPUT). Numbers, because nft accepts the `dstnat` name only
//! at the prerouting hook. Two of upstream's rule parts have no nftables form and are left
//! out: `-m physdev ! --physdev-is-in` (an external IP's portal redirects bridged traffic
//! too, as the kernel modes do) and the filter `KUBE-NODEPORT-NON-LOCAL` accept (an accept
//! in one table cannot overrule a drop in another: a default-deny INPUT must allow the
//! listener ports itself).

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use kube_proxy_model::IpFamily;
use kube_proxy_nftables::Runner;

use super::{Change, Redirects, Written};
use crate::rules::{
    Action, Rule, NODEPORT_CONTAINER, NODEPORT_HOST, PORTALS_CONTAINER, PORTALS_HOST,
};

/// Our table's name (in families `ip` and `ip6`).
pub const TABLE: &str = "kube-proxy-userspace";

/// (upstream's chain, our chain, hook, priority).
const CHAINS: [(&str, &str, &str, &str); 4] = [
    (PORTALS_CONTAINER, "portals-container", "prerouting", "-105"),
    (PORTALS_HOST, "portals-host", "output", "-105"),
    (
        NODEPORT_CONTAINER,
        "nodeports-container",
        "prerouting",
        "-95",
    ),
    (NODEPORT_HOST, "nodeports-host", "output", "-95"),
];

/// nft's limit on a comment's length, in bytes.
const COMMENT_MAX: usize = 128;

pub fn family_name(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}

/// `rule` as an nft statement, `None` for rules without an nftables form.
pub fn statement(rule: &Rule) -> Option<String> {
    let chain = CHAINS.iter().find(|c| c.0 == rule.chain)?.1;
    let protocol = rule.protocol.lower();
    let mut text = String::new();
    if let Some(source) = rule.source {
        let _ = write!(text, "{} saddr {source} ", address_family(source.addr()));
    }
    if let Some(dest) = rule.dest {
        let _ = write!(text, "{} daddr {dest} ", address_family(dest));
    }
    if rule.dst_local {
        text.push_str("fib daddr type local ");
    }
    let _ = write!(text, "{protocol} dport {} ", rule.dport);
    match rule.action {
        Action::Redirect(port) => {
            let _ = write!(text, "redirect to :{port}");
        }
        Action::Dnat(SocketAddr::V4(to)) => {
            let _ = write!(text, "dnat to {}:{}", to.ip(), to.port());
        }
        Action::Dnat(SocketAddr::V6(to)) => {
            let _ = write!(text, "dnat to [{}]:{}", to.ip(), to.port());
        }
        Action::AcceptNew => return None,
    }
    let _ = write!(text, " comment \"{}\"", comment(&rule.name.to_string()));
    Some(format!("{chain} {text}"))
}

fn address_family(ip: IpAddr) -> &'static str {
    match ip {
        IpAddr::V4(_) => "ip",
        IpAddr::V6(_) => "ip6",
    }
}

/// `name` cut to nft's comment limit (on a character boundary).
fn comment(name: &str) -> &str {
    if name.len() <= COMMENT_MAX {
        return name;
    }
    let mut end = COMMENT_MAX;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// The transaction that makes our table of `family` hold exactly `rules`.
pub fn script(family: IpFamily, rules: &[&Rule]) -> (String, usize) {
    let family = family_name(family);
    let mut text = format!("add table {family} {TABLE}\nflush table {family} {TABLE}\n");
    for (_, chain, hook, priority) in CHAINS {
        let _ = writeln!(
            text,
            "add chain {family} {TABLE} {chain} {{ type nat hook {hook} priority {priority}; }}"
        );
    }
    let mut written = 0;
    for statement in rules.iter().filter_map(|r| statement(r)) {
        let _ = writeln!(text, "add rule {family} {TABLE} {statement}");
        written += 1;
    }
    (text, written)
}

/// Reads our table of a family back (`nft list table`); `Ok(None)` when it does not exist.
pub type ListTable = Box<dyn FnMut(IpFamily) -> Result<Option<String>, String> + Send>;

/// The nftables path over a [`Runner`] (`nft -f -` in the binary), reading its table back
/// with `list` to find what someone else changed.
pub struct NftRedirects<N: Runner> {
    pub runner: N,
    list: ListTable,
}

impl<N: Runner> NftRedirects<N> {
    pub fn new(runner: N, list: ListTable) -> Self {
        NftRedirects { runner, list }
    }
}

/// The rules of each chain in an `nft list table` text: (chain, rules).
pub fn listed_rules(listing: &str) -> Vec<(String, usize)> {
    let mut chains: Vec<(String, usize)> = Vec::new();
    for line in listing.lines().map(str::trim) {
        if let Some(name) = line
            .strip_prefix("chain ")
            .and_then(|rest| rest.strip_suffix(" {"))
        {
            chains.push((name.to_string(), 0));
        } else if line.is_empty() || line == "}" || line.starts_with("type ") {
            continue;
        } else if let Some((_, rules)) = chains.last_mut() {
            *rules += 1;
        }
    }
    chains
}

impl<N: Runner> Redirects for NftRedirects<N> {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn apply(&mut self, family: IpFamily, change: &Change<'_>) -> Result<Written, String> {
        if !change.full && change.removed.is_empty() && change.added.is_empty() {
            return Ok(Written::default());
        }
        let (text, rules) = script(family, change.all);
        self.runner
            .apply(&text)
            .map_err(|e| format!("nft: {}", e.to_string().trim()))?;
        Ok(Written {
            rules,
            transactions: 1,
        })
    }

    /// Our table exists with its four chains, each holding as many rules as we wrote.
    fn verify(&mut self, family: IpFamily, applied: &[&Rule]) -> Result<Option<String>, String> {
        let name = family_name(family);
        let Some(listing) = (self.list)(family)? else {
            return Ok(Some(format!(
                "table {name} {TABLE} is gone: someone else deleted it"
            )));
        };
        let listed = listed_rules(&listing);
        for (upstream, chain, _, _) in CHAINS {
            let want = applied
                .iter()
                .filter(|r| r.chain == upstream && statement(r).is_some())
                .count();
            let found = listed.iter().find(|(c, _)| c == chain).map(|(_, n)| *n);
            if found != Some(want) {
                return Ok(Some(format!(
                    "chain {chain} of table {name} {TABLE} holds {} rules instead of {want}: someone else changed it",
                    found.map_or("no chain and no".to_string(), |n| n.to_string())
                )));
            }
        }
        Ok(None)
    }
}
