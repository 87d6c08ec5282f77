//! The iptables path: upstream's five chains, one `iptables-restore --noflush` per family.
//! A full sync declares (empties) the chains, refills them and inserts the jumps the node
//! lacks; a partial sync deletes and appends only the changed rules, so a change costs the
//! same at 10 Services as at 10,000.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use kube_proxy_iptables::proxier::{saved_jump, Restorer};
use kube_proxy_model::IpFamily;

use super::{Change, Redirects, Written};
use crate::rules::{restore_input, table_of, Rule, CHAINS, JUMPS};

pub struct IptablesRedirects<R: Restorer> {
    pub restorer: R,
}

impl<R: Restorer> IptablesRedirects<R> {
    pub fn new(restorer: R) -> Self {
        IptablesRedirects { restorer }
    }
}

impl<R: Restorer> Redirects for IptablesRedirects<R> {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn apply(&mut self, family: IpFamily, change: &Change<'_>) -> Result<Written, String> {
        let (text, written) = if change.full {
            let saved = self
                .restorer
                .save(family)
                .map_err(|e| format!("iptables-save: {e}"))?;
            let text = restore_input(change.all, &|table, chain, target| {
                saved_jump(&saved, table, chain, target)
            });
            (text, change.all.len())
        } else {
            let mut lines: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for rule in change.removed {
                lines.entry(table_of(rule.chain)).or_default().push(format!(
                    "-D {} {}",
                    rule.chain,
                    rule.iptables()
                ));
            }
            for rule in change.added {
                lines.entry(table_of(rule.chain)).or_default().push(format!(
                    "-A {} {}",
                    rule.chain,
                    rule.iptables()
                ));
            }
            let mut text = String::new();
            for (table, lines) in &lines {
                let _ = writeln!(text, "*{table}");
                for line in lines {
                    text.push_str(line);
                    text.push('\n');
                }
                text.push_str("COMMIT\n");
            }
            (text, change.added.len())
        };
        if text.is_empty() {
            return Ok(Written::default());
        }
        self.restorer
            .restore(family, &text)
            .map_err(|e| format!("iptables-restore: {e}"))?;
        Ok(Written {
            rules: written,
            transactions: 1,
        })
    }

    /// Each of our chains holds as many rules as we wrote, and every jump to them is there.
    fn verify(&mut self, family: IpFamily, applied: &[&Rule]) -> Result<Option<String>, String> {
        for (table, chain) in CHAINS {
            let want = applied.iter().filter(|r| r.chain == chain).count();
            let found = self
                .restorer
                .chain_rules(family, table, chain)
                .map_err(|e| format!("reading {chain}: {e}"))?;
            if found != Some(want) {
                return Ok(Some(format!(
                    "{chain} in the {family} {table} table holds {} rules instead of {want}: someone else changed it",
                    found.map_or("no chain and no".to_string(), |n| n.to_string())
                )));
            }
        }
        let saved = self
            .restorer
            .save(family)
            .map_err(|e| format!("iptables-save: {e}"))?;
        for (table, from, to, _, _) in JUMPS {
            if !saved_jump(&saved, table, from, to) {
                return Ok(Some(format!(
                    "the jump from {from} to {to} in the {family} {table} table is gone: someone else changed it"
                )));
            }
        }
        Ok(None)
    }
}
