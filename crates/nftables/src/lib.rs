//! The nftables dataplane: renders the plan as nft transactions for the `kube-proxy` tables
//! (`ip` and `ip6`) and keeps the bookkeeping of what was applied.
//!
//! Pure: it never spawns a process or touches the kernel itself; a [`Runner`] does (the binary
//! provides `nft -f -`, tests provide recorders). The ruleset shape and why it is fast are
//! described in `docs/nftables.md`.

pub mod context;
pub mod contribution;
pub mod elements;
pub mod explain;
pub mod fake;
pub mod kernel;
pub mod names;
pub mod netlink;
pub mod proxier;
pub mod skeleton;
pub mod transaction;

pub use context::NftConfig;
pub use kernel::{Kernel, KernelTable};
pub use proxier::{Clock, NftProxier, RunError, Runner};
pub use transaction::{ElementCommand, Transaction};

/// A runner that records every transaction and applies nothing (tests).
///
/// With `kernel` set to `Absent` or `Present`, it also keeps a small model of the table for
/// `snapshot`: chains and sets declared by text, elements sent in data form (element-only
/// transactions, such as the stages of a staged build).
#[derive(Debug, Default)]
pub struct RecordingRunner {
    pub scripts: Vec<String>,
    /// When set, the next `apply` fails with this message.
    pub fail_next: Option<String>,
    pub kernel: Kernel,
}

impl Runner for RecordingRunner {
    fn apply(&mut self, script: &str) -> Result<(), RunError> {
        if let Some(message) = self.fail_next.take() {
            return Err(RunError::Rejected(message));
        }
        self.scripts.push(script.to_string());
        Ok(())
    }

    fn apply_transaction(
        &mut self,
        _family: kube_proxy_model::IpFamily,
        tx: &Transaction,
    ) -> Result<(), RunError> {
        self.apply(tx.text())?;
        if matches!(self.kernel, Kernel::Absent) && tx.text().contains("add table ") {
            self.kernel = Kernel::Present(KernelTable::default());
        }
        let Kernel::Present(table) = &mut self.kernel else {
            return Ok(());
        };
        if let Some(commands) = tx.element_commands() {
            for command in commands {
                let Some(Some(elements)) = table.sets.get_mut(&command.set.name()) else {
                    continue;
                };
                for (key, value) in &command.elements {
                    let bytes = netlink::key_bytes(key);
                    elements.retain(|(k, _)| *k != bytes);
                    if !command.delete {
                        elements.push((bytes, netlink::ElementData::of(value)));
                    }
                }
            }
            return Ok(());
        }
        for line in tx.text().lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["add", "chain", _, _, name, ..] => {
                    table.chains.insert(name.to_string());
                }
                ["add", "rule", _, _, "nat-prerouting", ..] => table.hooked = true,
                ["add", "set" | "map", _, _, name, ..] => {
                    let comparable = !line.contains("interval") && !line.contains("timeout");
                    table
                        .sets
                        .entry(name.to_string())
                        .or_insert_with(|| comparable.then(Vec::new));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn snapshot(&mut self, _family: kube_proxy_model::IpFamily) -> Result<Kernel, RunError> {
        Ok(self.kernel.clone())
    }
}

#[cfg(test)]
mod tests;
