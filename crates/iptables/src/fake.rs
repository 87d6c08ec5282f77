//! An in-memory `iptables-restore --noflush` / `iptables-save`: applies an input to a copy
//! of the tables and keeps it only when every line succeeded, failing where the tools fail
//! (a rule in a chain that does not exist, a jump to a missing chain, deleting a rule that is
//! not there, or a chain that is not empty or still a jump target). Tests use it to check, without root, that a series of
//! partial syncs leaves the same rules as one full sync.

use std::collections::BTreeMap;

use kube_proxy_model::IpFamily;

use crate::proxier::{RestoreError, Restorer};

/// Tables of one family: table -> chain -> rules (the text after `-A <chain> `).
pub type Tables = BTreeMap<String, BTreeMap<String, Vec<String>>>;

#[derive(Clone, Debug, Default)]
pub struct FakeIptables {
    pub families: BTreeMap<IpFamily, Tables>,
    pub restores: usize,
    pub last: String,
}

impl Restorer for FakeIptables {
    fn restore(&mut self, family: IpFamily, input: &str) -> Result<(), RestoreError> {
        let mut tables = self.families.get(&family).cloned().unwrap_or_default();
        let mut table: Option<String> = None;
        for (index, line) in input.lines().enumerate() {
            let fail = |e: &str| RestoreError::Rejected(format!("line {} failed: {e}", index + 1));
            if let Some(name) = line.strip_prefix('*') {
                table = Some(name.to_string());
                tables.entry(name.to_string()).or_default();
                continue;
            }
            if line == "COMMIT" {
                table = None;
                continue;
            }
            let chains = tables
                .get_mut(table.as_deref().ok_or_else(|| fail("no table"))?)
                .unwrap();
            if let Some(declaration) = line.strip_prefix(':') {
                let name = declaration.split_whitespace().next().unwrap_or("");
                chains.insert(name.to_string(), Vec::new());
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let (chain, rule) = rest.split_once(' ').ok_or_else(|| fail("empty rule"))?;
                if let Some(target) = jump_target(rule) {
                    if target.starts_with("KUBE-") && !chains.contains_key(target) {
                        return Err(fail(&format!("no chain {target}")));
                    }
                }
                chains
                    .get_mut(chain)
                    .ok_or_else(|| fail(&format!("no chain {chain}")))?
                    .push(rule.to_string());
            } else if let Some(rest) = line.strip_prefix("-I ") {
                let mut words = rest.splitn(3, ' ');
                let (chain, position, rule) = (
                    words.next().unwrap_or(""),
                    words.next().unwrap_or(""),
                    words.next().ok_or_else(|| fail("empty rule"))?,
                );
                let position: usize = position.parse().map_err(|_| fail("bad position"))?;
                let builtin = ["INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"];
                if builtin.contains(&chain) {
                    chains.entry(chain.to_string()).or_default();
                }
                let rules = chains
                    .get_mut(chain)
                    .ok_or_else(|| fail(&format!("no chain {chain}")))?;
                if position == 0 || position > rules.len() + 1 {
                    return Err(fail("bad position"));
                }
                rules.insert(position - 1, rule.to_string());
            } else if let Some(rest) = line.strip_prefix("-D ") {
                let (chain, rule) = rest.split_once(' ').ok_or_else(|| fail("empty rule"))?;
                let rules = chains
                    .get_mut(chain)
                    .ok_or_else(|| fail(&format!("no chain {chain}")))?;
                let at = rules
                    .iter()
                    .position(|r| r == rule)
                    .ok_or_else(|| fail("no such rule"))?;
                rules.remove(at);
            } else if let Some(chain) = line.strip_prefix("-X ") {
                match chains.get(chain) {
                    None => return Err(fail(&format!("no chain {chain}"))),
                    Some(rules) if !rules.is_empty() => return Err(fail("chain not empty")),
                    _ => {}
                }
                let referenced = chains
                    .values()
                    .flatten()
                    .any(|r| jump_target(r) == Some(chain));
                if referenced {
                    return Err(fail(&format!("chain {chain} is a jump target")));
                }
                chains.remove(chain);
            } else {
                return Err(fail(&format!("unsupported {line:?}")));
            }
        }
        self.families.insert(family, tables);
        self.restores += 1;
        self.last = input.to_string();
        Ok(())
    }

    fn save(&mut self, family: IpFamily) -> Result<String, RestoreError> {
        let mut out = String::new();
        for (table, chains) in self.families.get(&family).into_iter().flatten() {
            out.push_str(&format!("*{table}\n"));
            for chain in chains.keys() {
                out.push_str(&format!(":{chain} - [0:0]\n"));
            }
            for (chain, rules) in chains {
                for rule in rules {
                    out.push_str(&format!("-A {chain} {rule}\n"));
                }
            }
            out.push_str("COMMIT\n");
        }
        Ok(out)
    }

    fn chain_rules(
        &mut self,
        family: IpFamily,
        table: &str,
        chain: &str,
    ) -> Result<Option<usize>, RestoreError> {
        Ok(self
            .families
            .get(&family)
            .and_then(|tables| tables.get(table))
            .and_then(|chains| chains.get(chain))
            .map(|rules| rules.len()))
    }
}

/// The chain a rule jumps to (`-j X`), if any.
fn jump_target(rule: &str) -> Option<&str> {
    let words: Vec<&str> = rule.split_whitespace().collect();
    words.windows(2).rev().find(|w| w[0] == "-j").map(|w| w[1])
}
