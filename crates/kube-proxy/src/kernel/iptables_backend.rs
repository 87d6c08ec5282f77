//! Which iptables backend (nf_tables or legacy x_tables) the iptables mode programs.
//!
//! A node has one: kubelet and the CNI plugin already write their rules with it, and rules of
//! the other backend would be evaluated too but invisible to the operator's `iptables`. Like
//! upstream's image (kubernetes-sigs/iptables-wrappers), the backend holding kubelet's
//! `KUBE-IPTABLES-HINT` or `KUBE-KUBELET-CANARY` chain wins; else the one with more rules; nft
//! when neither has any. `KUBE_PROXY_IPTABLES_BACKEND=nft|legacy` overrides the detection.

use std::process::Command;

/// The environment variable that overrides detection.
pub const OVERRIDE_ENV: &str = "KUBE_PROXY_IPTABLES_BACKEND";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-nft`: rules in nf_tables tables named like the xtables ones.
    #[default]
    Nft,
    /// `iptables-legacy`: the x_tables kernel interface.
    Legacy,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }

    /// How many per-service-port chains one `iptables-restore` of a full sync writes, at
    /// most: `iptables-nft-restore`'s time grows faster than linearly with the chains of one
    /// input (10k Services x 2 endpoints, 30k chains: 29 s in one input, 3 s in six of 5k),
    /// while `iptables-legacy-restore` rewrites the whole table per run (one input is best).
    pub fn full_sync_stage_chains(self) -> Option<usize> {
        match self {
            Backend::Nft => Some(5000),
            Backend::Legacy => None,
        }
    }

    /// The tool of this backend: `tool("iptables", "restore")` is `iptables-nft-restore`.
    pub fn tool(self, base: &str, what: &str) -> String {
        match what {
            "" => format!("{base}-{}", self.as_str()),
            _ => format!("{base}-{}-{what}", self.as_str()),
        }
    }
}

/// The backend the operator asked for: `None` for automatic detection.
pub fn from_env() -> Result<Option<Backend>, String> {
    match std::env::var(OVERRIDE_ENV) {
        Err(_) => Ok(None),
        Ok(value) => parse(&value),
    }
}

fn parse(value: &str) -> Result<Option<Backend>, String> {
    match value {
        "" | "auto" => Ok(None),
        "nft" => Ok(Some(Backend::Nft)),
        "legacy" => Ok(Some(Backend::Legacy)),
        other => Err(format!(
            "invalid {OVERRIDE_ENV} {other:?}: allowed values are \"auto\", \"nft\" and \"legacy\""
        )),
    }
}

/// What one backend holds now (from its `*-save` output of both families).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Holdings {
    /// Whether kubelet's hint or canary chain is there.
    pub kubelet_chains: bool,
    /// Number of rules (lines starting with `-`).
    pub rules: usize,
}

impl Holdings {
    pub fn of(saved: &str) -> Holdings {
        Holdings {
            kubelet_chains: saved.lines().any(|l| {
                l.starts_with(":KUBE-IPTABLES-HINT ") || l.starts_with(":KUBE-KUBELET-CANARY ")
            }),
            rules: saved.lines().filter(|l| l.starts_with('-')).count(),
        }
    }
}

/// The wrapper's decision, and why (for the start-up log).
pub fn choose(legacy: Holdings, nft: Holdings) -> (Backend, &'static str) {
    if legacy.kubelet_chains {
        (
            Backend::Legacy,
            "kubelet's chains are in the legacy backend",
        )
    } else if nft.kubelet_chains {
        (
            Backend::Nft,
            "kubelet's chains are in the nf_tables backend",
        )
    } else if legacy.rules > nft.rules {
        (Backend::Legacy, "the legacy backend holds more rules")
    } else if nft.rules > 0 {
        (
            Backend::Nft,
            "the nf_tables backend holds at least as many rules",
        )
    } else {
        (
            Backend::Nft,
            "no rules in either backend: nf_tables, the default",
        )
    }
}

/// Detects the node's backend (or takes the override) and says why.
pub fn select(requested: Option<Backend>) -> (Backend, &'static str) {
    if let Some(backend) = requested {
        return (backend, "set by KUBE_PROXY_IPTABLES_BACKEND");
    }
    choose(holdings(Backend::Legacy), holdings(Backend::Nft))
}

fn holdings(backend: Backend) -> Holdings {
    if backend == Backend::Legacy {
        // Listing an unused legacy backend would load its kernel modules and create empty
        // tables; the kernel names the tables in use.
        let in_use = ["/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"]
            .iter()
            .any(|f| std::fs::read_to_string(f).is_ok_and(|t| !t.trim().is_empty()));
        if !in_use {
            return Holdings::default();
        }
    }
    let mut saved = String::new();
    for base in ["iptables", "ip6tables"] {
        if let Ok(out) = Command::new(backend.tool(base, "save")).output() {
            saved.push_str(&String::from_utf8_lossy(&out.stdout));
        }
    }
    Holdings::of(&saved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_chains_then_rule_counts_decide() {
        let none = Holdings::default();
        let kubelet = Holdings::of("*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n");
        let canary = Holdings::of("*mangle\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n");
        let rules = |n: usize| Holdings {
            kubelet_chains: false,
            rules: n,
        };
        assert!(kubelet.kubelet_chains && canary.kubelet_chains);
        assert_eq!(choose(none, none).0, Backend::Nft);
        assert_eq!(choose(kubelet, canary).0, Backend::Legacy);
        assert_eq!(choose(rules(50), canary).0, Backend::Nft);
        assert_eq!(choose(rules(3), rules(2)).0, Backend::Legacy);
        assert_eq!(choose(rules(2), rules(2)).0, Backend::Nft);
        assert_eq!(
            Holdings::of(
                "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j DROP\n-A INPUT -j ACCEPT\nCOMMIT\n"
            )
            .rules,
            2
        );
    }

    #[test]
    fn override_values() {
        assert_eq!(parse("legacy"), Ok(Some(Backend::Legacy)));
        assert_eq!(parse("nft"), Ok(Some(Backend::Nft)));
        assert_eq!(parse("auto"), Ok(None));
        let err = parse("xtables").unwrap_err();
        assert!(err.contains("KUBE_PROXY_IPTABLES_BACKEND") && err.contains("\"legacy\""));
        assert_eq!(
            Backend::Legacy.tool("ip6tables", "restore"),
            "ip6tables-legacy-restore"
        );
    }
}
