//! What our table of one family holds in the kernel, as a runner reads it before a full
//! sync, and the element differences a full sync writes instead of rewriting every element.
//!
//! Why: rewriting 400k elements on every restart and every hourly resync costs seconds, and
//! nft parsing them costs hundreds of MiB in its process; rewriting only what differs from
//! the kernel makes both a few milliseconds when nothing changed, and repairs any drift (an
//! element someone deleted, one left from a previous run) as a side effect.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use kube_proxy_model::IpFamily;

use crate::elements::{Key, SetName, Value};
use crate::netlink::{decode_key, key_bytes, ElementData};

/// The kernel's side, as far as the runner can tell.
#[derive(Clone, Debug, Default)]
pub enum Kernel {
    /// The runner cannot read the kernel (a printer, a recorder): write everything.
    #[default]
    Unknown,
    /// There is no table: build it.
    Absent,
    Present(KernelTable),
}

/// Elements as the kernel holds them: key bytes and data.
pub type KernelElements = Vec<(Vec<u8>, ElementData)>;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelTable {
    pub chains: BTreeSet<String>,
    /// Every set and map by name, with its elements when they can be compared (not for
    /// interval sets and sets with timeouts, which are rewritten or kept).
    pub sets: BTreeMap<String, Option<KernelElements>>,
    /// Whether traffic enters the table: its base chains have their rules (a table whose
    /// staged build was cut short has none, and may be completed in stages too).
    pub hooked: bool,
}

/// What a full sync writes for one set whose kernel elements are known.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SetDiff {
    pub deletes: Vec<Key>,
    pub adds: Vec<(Key, Value)>,
}

/// The commands that turn `kernel` into `wanted`; when some kernel element cannot be read
/// back (written by someone else), every wanted element is handed back: the set is then
/// flushed and rewritten.
pub fn diff(
    set: SetName,
    family: IpFamily,
    kernel: &[(Vec<u8>, ElementData)],
    wanted: Vec<(Key, Value)>,
) -> Result<SetDiff, Vec<(Key, Value)>> {
    let mut wanted_by_key: HashMap<Vec<u8>, (Key, Value)> = HashMap::with_capacity(wanted.len());
    wanted_by_key.extend(
        wanted
            .into_iter()
            .map(|(key, value)| (key_bytes(&key), (key, value))),
    );
    let mut present: HashSet<&[u8]> = HashSet::with_capacity(kernel.len());
    let mut result = SetDiff::default();
    for (bytes, data) in kernel {
        match wanted_by_key.get(bytes) {
            Some((_, value)) if data.holds(value) => {
                present.insert(bytes);
            }
            // Unwanted, or wanted with other data: delete (and add below).
            _ => match decode_key(set, family, bytes) {
                Some(key) => result.deletes.push(key),
                None => return Err(wanted_by_key.into_values().collect()),
            },
        }
    }
    result.adds = wanted_by_key
        .into_iter()
        .filter(|(bytes, _)| !present.contains(bytes.as_slice()))
        .map(|(_, element)| element)
        .collect();
    // Deterministic text (and transactions that are easy to read).
    result.adds.sort_by(|a, b| a.0.cmp(&b.0));
    result.deletes.sort();
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube_proxy_model::Protocol;

    #[test]
    fn only_differences_are_written_and_foreign_bytes_give_up() {
        let frontend =
            |i: u8| Key::Frontend(format!("198.19.0.{i}").parse().unwrap(), Protocol::Tcp, 80);
        let endpoint = |i: u8| Value::Endpoint(format!("198.18.0.{i}").parse().unwrap(), 8080);
        let kernel: Vec<(Vec<u8>, ElementData)> = [(1, 1), (2, 2), (3, 3)]
            .iter()
            .map(|(k, v)| (key_bytes(&frontend(*k)), ElementData::of(&endpoint(*v))))
            .collect();
        // 1 unchanged, 2 moved to another endpoint, 3 gone, 4 new.
        let wanted = vec![
            (frontend(1), endpoint(1)),
            (frontend(2), endpoint(9)),
            (frontend(4), endpoint(4)),
        ];
        let d = diff(SetName::Backends(0), IpFamily::V4, &kernel, wanted.clone()).unwrap();
        assert_eq!(d.adds.len(), 2);
        assert_eq!(d.deletes, vec![frontend(2), frontend(3)]);
        assert_eq!(
            d.adds,
            vec![(frontend(2), endpoint(9)), (frontend(4), endpoint(4))]
        );
        let same = diff(
            SetName::Backends(0),
            IpFamily::V4,
            &kernel[..1],
            vec![(frontend(1), endpoint(1))],
        )
        .unwrap();
        assert_eq!(same, SetDiff::default());
        let mut foreign = kernel.clone();
        foreign.push((vec![1, 2, 3], ElementData::None));
        let Err(back) = diff(SetName::Backends(0), IpFamily::V4, &foreign, wanted) else {
            panic!("foreign bytes cannot be diffed");
        };
        assert_eq!(
            back.len(),
            3,
            "every wanted element comes back to be rewritten"
        );
    }
}
