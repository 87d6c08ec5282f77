//! The nftables dataplane: renders the plan as nft transactions for the `kube-proxy` tables
//! (`ip` and `ip6`) and keeps the bookkeeping of what was applied.
//!
//! Pure: it never spawns a process or touches the kernel itself; a [`Runner`] does (the binary
//! provides `nft -f -`, tests provide recorders). The ruleset shape and why it is fast are
//! described in `docs/nftables.md`.

pub mod context;
pub mod contribution;
pub mod elements;
pub mod names;
pub mod proxier;
pub mod skeleton;
pub mod transaction;

pub use context::NftConfig;
pub use proxier::{Clock, NftProxier, RunError, Runner};

/// A runner that records every transaction and applies nothing (tests, `--dry-run`).
#[derive(Debug, Default)]
pub struct RecordingRunner {
    pub scripts: Vec<String>,
    /// When set, the next `apply` fails with this message.
    pub fail_next: Option<String>,
}

impl Runner for RecordingRunner {
    fn apply(&mut self, script: &str) -> Result<(), RunError> {
        if let Some(message) = self.fail_next.take() {
            return Err(RunError::Rejected(message));
        }
        self.scripts.push(script.to_string());
        Ok(())
    }
}

#[cfg(test)]
mod tests;
