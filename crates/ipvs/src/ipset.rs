//! ipsets in `ipset restore`'s words: `create … -exist` for every set of the family (with
//! upstream's parameters, so sets upstream created are taken over as they are), `add`/`del`
//! lines for the entries that differ, and the parser of `ipset save`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use kube_proxy_model::IpFamily;

use crate::names::Set;

/// The `create` line of a set, as upstream creates it.
pub fn create_line(set: Set, family: IpFamily) -> String {
    let name = set.name(family);
    match set.kind() {
        "bitmap:port" => format!("create {name} bitmap:port range 0-65535 -exist"),
        kind => {
            let inet = match family {
                IpFamily::V4 => "inet",
                IpFamily::V6 => "inet6",
            };
            format!("create {name} {kind} family {inet} hashsize 1024 maxelem 65536 -exist")
        }
    }
}

/// The input that turns `current` into `desired` for one family (creating every set).
/// Returns the text and the number of entries added or removed.
pub fn restore_input(
    family: IpFamily,
    current: &BTreeMap<Set, BTreeSet<String>>,
    desired: &BTreeMap<Set, BTreeSet<String>>,
    create: bool,
) -> (String, usize) {
    let mut text = String::new();
    let mut changes = 0;
    if create {
        for set in Set::ALL {
            text.push_str(&create_line(set, family));
            text.push('\n');
        }
    }
    let empty = BTreeSet::new();
    for set in Set::ALL {
        let name = set.name(family);
        let have = current.get(&set).unwrap_or(&empty);
        let want = desired.get(&set).unwrap_or(&empty);
        for entry in have.difference(want) {
            let _ = writeln!(text, "del {name} {entry} -exist");
            changes += 1;
        }
        for entry in want.difference(have) {
            let _ = writeln!(text, "add {name} {entry} -exist");
            changes += 1;
        }
    }
    (text, changes)
}

/// The entries of our sets of `family` in an `ipset save` text.
pub fn parse_save(text: &str, family: IpFamily) -> BTreeMap<Set, BTreeSet<String>> {
    let by_name: BTreeMap<String, Set> = Set::ALL.iter().map(|s| (s.name(family), *s)).collect();
    let mut out: BTreeMap<Set, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("create"), Some(name), _) => {
                if let Some(set) = by_name.get(name) {
                    out.entry(*set).or_default();
                }
            }
            (Some("add"), Some(name), Some(entry)) => {
                if let Some(set) = by_name.get(name) {
                    out.entry(*set).or_default().insert(entry.to_string());
                }
            }
            _ => {}
        }
    }
    out
}
