//! The redirect paths: how the rules of [`crate::rules`] reach the kernel.
//!
//! - [`iptables`]: upstream's chains through `iptables-restore --noflush` (the default, what
//!   operators read with `iptables -t nat -L`); a change deletes and appends only the rules
//!   of the listeners that changed.
//! - [`nft`]: the same rules as one nftables table of our own, `kube-proxy-userspace`, for
//!   nodes without iptables; every sync rewrites the table in one transaction (it holds a
//!   rule or two per frontend, never the endpoint fan-out of the kernel modes).

pub mod iptables;
pub mod nft;

use kube_proxy_model::IpFamily;

use crate::rules::Rule;

/// What changes between what is applied and what is wanted.
pub struct Change<'a> {
    /// Write everything (the first sync, after a failure, periodically).
    pub full: bool,
    /// Every rule wanted, in order.
    pub all: &'a [&'a Rule],
    /// Rules applied now and no longer wanted (when not `full`).
    pub removed: &'a [&'a Rule],
    /// Rules wanted and not applied yet (when not `full`).
    pub added: &'a [&'a Rule],
}

/// A redirect path.
pub trait Redirects: Send {
    /// What the logs call it: `iptables` or `nftables`.
    fn name(&self) -> &'static str;
    /// Makes the kernel hold the rules `change` describes, atomically: on error nothing
    /// changed.
    fn apply(&mut self, family: IpFamily, change: &Change<'_>) -> Result<Written, String>;
    /// Whether the kernel still holds `applied` (what the last apply left): `Ok(None)` when
    /// it does, else what someone else changed (the next apply then writes everything).
    fn verify(&mut self, family: IpFamily, applied: &[&Rule]) -> Result<Option<String>, String>;
}

/// What one apply wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// Rules written.
    pub rules: usize,
    /// Transactions run (0 or 1).
    pub transactions: usize,
}

/// Which redirect path userspace mode uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Iptables,
    Nftables,
}

/// The environment variable that chooses the redirect path (`auto`, the default: iptables
/// when its commands work, else nftables).
pub const PATH_ENV: &str = "KUBE_PROXY_USERSPACE_REDIRECT";

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Iptables => "iptables",
            Path::Nftables => "nftables",
        }
    }

    /// `None`: choose by what the node has.
    pub fn parse(value: &str) -> Result<Option<Path>, String> {
        match value {
            "" | "auto" => Ok(None),
            "iptables" => Ok(Some(Path::Iptables)),
            "nftables" => Ok(Some(Path::Nftables)),
            other => Err(format!(
                "invalid {PATH_ENV} {other:?}: allowed values are \"auto\", \"iptables\" and \"nftables\""
            )),
        }
    }
}
