//! An in-memory `nft`: applies the subset of nft commands this dataplane writes to a copy of
//! its tables and keeps the copy only when every command succeeded, failing where the kernel
//! fails (a missing object, a duplicate element with other data, a `flush set` on a map, a
//! chain or set deleted while something still refers to it), and, when `readable`, lists
//! them as the netlink runner does. Tests use it to check, without root, that a series of
//! partial syncs leaves the same tables as one full sync.

use std::collections::BTreeMap;
use std::net::IpAddr;

use kube_proxy_model::{IpFamily, Protocol};

use crate::elements::{Key, SetName, Value};
use crate::kernel::{Kernel, KernelTable};
use crate::netlink::{self, ElementData};
use crate::proxier::{RunError, Runner};
use crate::skeleton;

/// One table of the fake kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeTable {
    /// Chains and their rules, as written.
    pub chains: BTreeMap<String, Vec<String>>,
    /// Sets and maps: whether it is a map, and its elements (key text -> value text).
    pub sets: BTreeMap<String, FakeSet>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeSet {
    pub map: bool,
    pub elements: BTreeMap<String, String>,
}

/// The fake kernel: tables by family (`ip`, `ip6`).
#[derive(Clone, Debug, Default)]
pub struct FakeNft {
    pub tables: BTreeMap<String, FakeTable>,
    pub transactions: usize,
    /// The last transaction applied.
    pub last: String,
    /// Answer `snapshot` with the tables (as the netlink runner does); otherwise `Unknown`.
    pub readable: bool,
}

impl Runner for FakeNft {
    fn snapshot(&mut self, family: IpFamily) -> Result<Kernel, RunError> {
        if !self.readable {
            return Ok(Kernel::Unknown);
        }
        let fam = match family {
            IpFamily::V4 => "ip",
            IpFamily::V6 => "ip6",
        };
        let Some(table) = self.tables.get(fam) else {
            return Ok(Kernel::Absent);
        };
        let mut listed = KernelTable {
            chains: table.chains.keys().cloned().collect(),
            hooked: table
                .chains
                .get("nat-prerouting")
                .is_some_and(|rules| !rules.is_empty()),
            ..Default::default()
        };
        for (name, set) in &table.sets {
            // Interval and timeout sets are not compared, as with the kernel's listing.
            let elements = skeleton::set_named(name)
                .filter(|s| *s != SetName::FirewallAllow)
                .map(|kind| {
                    set.elements
                        .iter()
                        .map(|(key, value)| {
                            let key = parse_key(kind, key)
                                .unwrap_or_else(|| panic!("unparsable key {key:?} in {name}"));
                            (
                                netlink::key_bytes(&key),
                                ElementData::of(&parse_value(value)),
                            )
                        })
                        .collect()
                });
            listed.sets.insert(name.clone(), elements);
        }
        Ok(Kernel::Present(listed))
    }

    fn apply(&mut self, script: &str) -> Result<(), RunError> {
        let mut next = self.tables.clone();
        for (index, line) in script.lines().enumerate() {
            apply_line(&mut next, line)
                .map_err(|e| RunError::Rejected(format!("fake:{}:0: Error: {e}", index + 1)))?;
        }
        self.tables = next;
        self.transactions += 1;
        self.last = script.to_string();
        Ok(())
    }
}

fn apply_line(tables: &mut BTreeMap<String, FakeTable>, line: &str) -> Result<(), String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let (verb, object, family, name) = match words.as_slice() {
        [verb, object, family, _table, rest @ ..] => {
            (*verb, *object, *family, rest.first().copied())
        }
        _ => return Err(format!("cannot parse {line:?}")),
    };
    if object == "table" {
        match verb {
            "add" => {
                tables.entry(family.to_string()).or_default();
            }
            "delete" => {
                tables
                    .remove(family)
                    .ok_or("No such file or directory (table)")?;
            }
            _ => return Err(format!("unsupported {line:?}")),
        }
        return Ok(());
    }
    let table = tables
        .get_mut(family)
        .ok_or("No such file or directory (no table)")?;
    let name = name.ok_or_else(|| format!("no object name in {line:?}"))?;
    match (verb, object) {
        ("add", "chain") => {
            table.chains.entry(name.to_string()).or_default();
        }
        ("flush", "chain") => table
            .chains
            .get_mut(name)
            .ok_or("No such file or directory (chain)")?
            .clear(),
        ("delete", "chain") => {
            let rules = table
                .chains
                .get(name)
                .ok_or("No such file or directory (chain)")?;
            if !rules.is_empty()
                || referenced(table, &format!("goto {name}"))
                || referenced(table, &format!("jump {name}"))
            {
                return Err(format!("Device or resource busy (chain {name} in use)"));
            }
            table.chains.remove(name);
        }
        ("add", "rule") => {
            let rule = line.splitn(6, ' ').nth(5).ok_or("empty rule")?.to_string();
            for word in rule.split_whitespace() {
                if let Some(set) = word.strip_prefix('@') {
                    if !table.sets.contains_key(set) {
                        return Err(format!("No such file or directory (set {set})"));
                    }
                }
            }
            for target in targets(&rule) {
                if !table.chains.contains_key(target) {
                    return Err(format!("No such file or directory (chain {target})"));
                }
            }
            table
                .chains
                .get_mut(name)
                .ok_or("No such file or directory (chain)")?
                .push(rule);
        }
        ("add", "set" | "map") => {
            let map = object == "map";
            let set = table.sets.entry(name.to_string()).or_insert(FakeSet {
                map,
                elements: BTreeMap::new(),
            });
            if set.map != map {
                return Err("File exists (set and map of one name)".into());
            }
        }
        ("flush", "set" | "map") => {
            let set = table
                .sets
                .get_mut(name)
                .ok_or("No such file or directory (set)")?;
            if set.map != (object == "map") {
                return Err("No such file or directory (wrong set/map keyword)".into());
            }
            set.elements.clear();
        }
        ("delete", "set" | "map") => {
            let set = table
                .sets
                .get(name)
                .ok_or("No such file or directory (set)")?;
            if set.map != (object == "map") {
                return Err("No such file or directory (wrong set/map keyword)".into());
            }
            if referenced(table, &format!("@{name}")) {
                return Err(format!("Device or resource busy (set {name} in use)"));
            }
            table.sets.remove(name);
        }
        ("add" | "delete", "element") => {
            let body = line
                .split_once('{')
                .and_then(|(_, rest)| rest.rsplit_once('}'))
                .map(|(body, _)| body)
                .ok_or("no element list")?;
            let elements: Vec<(String, String)> = body
                .split(", ")
                .map(|e| {
                    let (key, value) = e.split_once(" : ").unwrap_or((e, ""));
                    (key.trim().to_string(), value.trim().to_string())
                })
                .collect();
            // A verdict element needs its chain.
            if verb == "add" {
                for (_, value) in &elements {
                    for target in targets(value) {
                        if !table.chains.contains_key(target) {
                            return Err(format!("No such file or directory (chain {target})"));
                        }
                    }
                }
            }
            let set = table
                .sets
                .get_mut(name)
                .ok_or("No such file or directory (set)")?;
            for (key, value) in elements {
                if verb == "add" {
                    match set.elements.get(&key) {
                        Some(existing) if *existing != value => {
                            return Err(format!("File exists (element {key})"))
                        }
                        _ => {
                            set.elements.insert(key, value);
                        }
                    }
                } else if set.elements.remove(&key).is_none() {
                    return Err(format!("No such file or directory (element {key})"));
                }
            }
        }
        _ => return Err(format!("unsupported {line:?}")),
    }
    Ok(())
}

/// An element key as written (`198.19.0.1 . tcp . 80`), by the layout of its set.
fn parse_key(set: SetName, text: &str) -> Option<Key> {
    let parts: Vec<&str> = text.split(" . ").collect();
    let ip = |s: &str| s.parse::<IpAddr>().ok();
    let proto = |s: &str| match s {
        "tcp" => Some(Protocol::Tcp),
        "udp" => Some(Protocol::Udp),
        "sctp" => Some(Protocol::Sctp),
        _ => None,
    };
    let port = |s: &str| s.parse::<u16>().ok();
    Some(match (set, parts.as_slice()) {
        (SetName::ClusterIps | SetName::NodePortIps, [a]) => Key::Addr(ip(a)?),
        (SetName::HairpinConnections, [a, _, p, n]) => Key::Hairpin(ip(a)?, proto(p)?, port(n)?),
        (_, [a, p, n]) => Key::Frontend(ip(a)?, proto(p)?, port(n)?),
        (_, [p, n]) => Key::NodePort(proto(p)?, port(n)?),
        _ => return None,
    })
}

/// A map element's value as written (`198.18.0.2 . 8080`, `goto chain`, or nothing).
fn parse_value(text: &str) -> Value {
    if let Some(chain) = text.strip_prefix("goto ") {
        return Value::Goto(chain.into());
    }
    match text.split_once(" . ") {
        Some((ip, port)) => Value::Endpoint(ip.parse().unwrap(), port.parse().unwrap()),
        None => Value::None,
    }
}

/// Chains a rule or verdict jumps or goes to.
fn targets(text: &str) -> impl Iterator<Item = &str> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let found: Vec<&str> = words
        .windows(2)
        .filter(|w| w[0] == "goto" || w[0] == "jump")
        .map(|w| w[1].trim_end_matches([',', '}']))
        .collect();
    found.into_iter()
}

/// Whether any rule or element value of `table` mentions `needle` as a word.
fn referenced(table: &FakeTable, needle: &str) -> bool {
    let mentions = |text: &str| {
        text.match_indices(needle).any(|(at, _)| {
            let end = at + needle.len();
            text[end..]
                .chars()
                .next()
                .is_none_or(|c| c == ' ' || c == ',' || c == '}')
        })
    };
    table.chains.values().flatten().any(|r| mentions(r))
        || table
            .sets
            .values()
            .flat_map(|s| s.elements.values())
            .any(|v| mentions(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_transaction_changes_nothing_and_names_its_line() {
        let mut nft = FakeNft::default();
        nft.apply("add table ip kube-proxy\nadd map ip kube-proxy m { type ipv4_addr : ipv4_addr; }\nadd element ip kube-proxy m { 1.2.3.4 : 5.6.7.8 }")
            .unwrap();
        let before = nft.tables.clone();
        let Err(RunError::Rejected(e)) = nft
            .apply("add element ip kube-proxy m { 1.2.3.5 : 5.6.7.8 }\nflush set ip kube-proxy m")
        else {
            panic!("flush set on a map must fail");
        };
        assert!(e.starts_with("fake:2:"), "{e}");
        assert_eq!(nft.tables, before);
        assert!(nft
            .apply("add element ip kube-proxy m { 1.2.3.4 : 9.9.9.9 }")
            .is_err());
        assert!(nft
            .apply("delete element ip kube-proxy m { 1.2.3.9 }")
            .is_err());
        assert!(nft.apply("add rule ip kube-proxy nowhere counter").is_err());
        nft.apply(
            "add chain ip kube-proxy c\nadd chain ip kube-proxy d\nadd rule ip kube-proxy c goto d",
        )
        .unwrap();
        assert!(
            nft.apply("delete chain ip kube-proxy d").is_err(),
            "still referenced"
        );
        nft.apply("flush chain ip kube-proxy c\ndelete chain ip kube-proxy d")
            .unwrap();
    }
}
