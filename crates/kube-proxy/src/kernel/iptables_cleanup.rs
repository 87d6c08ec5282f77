//! Removal of what upstream kube-proxy's iptables and ipvs modes leave in iptables, and ipvs
//! mode's `kube-ipvs0` interface (reference §4.7), for `--cleanup` and when the proxy takes over a node in nftables mode.
//!
//! From `iptables-save` output, [`cleanup_script`] computes one `iptables-restore --noflush`
//! script per backend and family: delete the jumps from other chains into kube-proxy's
//! chains, flush those chains, delete them. Applied in one restore, so it is atomic. On the
//! nf_tables backend a large cluster's chains go in stages instead ([`cleanup_scripts`]):
//! `iptables-nft-restore` is superlinear in the chains of one input (30k chains: 18.7 s in
//! one input, 1.7 s in six). The first input removes the jumps, so no traffic reaches our
//! chains after it; the rest only frees them (every flush before any delete). Chains
//! shared with kubelet (`KUBE-MARK-MASQ`, `KUBE-MARK-DROP`, filter `KUBE-FIREWALL`, the
//! kubelet canary) are left alone, as upstream leaves them.

use std::io::Write;
use std::process::{Command, Stdio};

use tracing::{debug, info, warn};

/// Which modes' chains a cleanup removes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leftovers {
    /// Every mode's (`--cleanup`, nftables mode taking over).
    All,
    /// iptables and ipvs mode's (userspace mode taking over).
    IptablesAndIpvs,
    /// userspace mode's (iptables or ipvs mode taking over).
    Userspace,
}

impl Leftovers {
    fn removes(self, table: &str, chain: &str) -> bool {
        let userspace = kube_proxy_userspace::rules::CHAINS
            .iter()
            .any(|(t, c)| *t == table && *c == chain);
        match self {
            Leftovers::All => userspace || is_kube_proxy_chain(table, chain),
            Leftovers::IptablesAndIpvs => is_kube_proxy_chain(table, chain),
            Leftovers::Userspace => userspace,
        }
    }
}

/// Whether `chain` of `table` is one of upstream kube-proxy's (iptables or ipvs mode).
pub fn is_kube_proxy_chain(table: &str, chain: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "KUBE-SVC-",
        "KUBE-SVL-",
        "KUBE-SEP-",
        "KUBE-FW-",
        "KUBE-EXT-",
        "KUBE-XLB-",
    ];
    match table {
        "nat" => {
            matches!(
                chain,
                "KUBE-SERVICES"
                    | "KUBE-NODEPORTS"
                    | "KUBE-POSTROUTING"
                    | "KUBE-PROXY-CANARY"
                    | "KUBE-LOAD-BALANCER"
                    | "KUBE-NODE-PORT"
            ) || PREFIXES.iter().any(|p| chain.starts_with(p))
        }
        "filter" => matches!(
            chain,
            "KUBE-SERVICES"
                | "KUBE-EXTERNAL-SERVICES"
                | "KUBE-FORWARD"
                | "KUBE-NODEPORTS"
                | "KUBE-NODE-PORT"
                | "KUBE-PROXY-FIREWALL"
                | "KUBE-PROXY-CANARY"
                | "KUBE-SOURCE-RANGES-FIREWALL"
                | "KUBE-IPVS-FILTER"
                | "KUBE-IPVS-OUT-FILTER"
        ),
        "mangle" => chain == "KUBE-PROXY-CANARY",
        _ => false,
    }
}

/// The `iptables-restore --noflush` script removing kube-proxy's chains found in `saved`
/// (`iptables-save` output), or `None` if there are none.
pub fn cleanup_script(saved: &str) -> Option<String> {
    cleanup_script_of(saved, Leftovers::IptablesAndIpvs)
}

/// [`cleanup_script`] for the chains of `which` modes.
pub fn cleanup_script_of(saved: &str, which: Leftovers) -> Option<String> {
    let mut script = String::new();
    let mut table = String::new();
    let mut chains: Vec<String> = Vec::new();
    let mut jumps: Vec<String> = Vec::new();
    let mut found = false;
    for line in saved.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = name.trim().to_string();
            chains.clear();
            jumps.clear();
        } else if let Some(rest) = line.strip_prefix(':') {
            let chain = rest.split_whitespace().next().unwrap_or("");
            if which.removes(&table, chain) {
                chains.push(chain.to_string());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or("");
            let target = rule
                .split_whitespace()
                .skip_while(|w| *w != "-j" && *w != "-g")
                .nth(1)
                .unwrap_or("");
            if !which.removes(&table, chain) && which.removes(&table, target) {
                jumps.push(format!("-D {rule}"));
            }
        } else if line.trim() == "COMMIT" && !(chains.is_empty() && jumps.is_empty()) {
            found = true;
            script.push_str(&format!("*{table}\n"));
            for jump in &jumps {
                script.push_str(jump);
                script.push('\n');
            }
            // Flush all first: kube-proxy's chains jump into each other.
            for chain in &chains {
                script.push_str(&format!("-F {chain}\n"));
            }
            for chain in &chains {
                script.push_str(&format!("-X {chain}\n"));
            }
            script.push_str("COMMIT\n");
        }
    }
    found.then_some(script)
}

/// [`cleanup_script`] in inputs of at most `batch` chain operations each: the jumps and the
/// first flushes, the other flushes, then the deletions (a chain is deleted only once no
/// chain refers to it). One input when everything fits.
pub fn cleanup_scripts(saved: &str, batch: usize, which: Leftovers) -> Vec<String> {
    let Some(whole) = cleanup_script_of(saved, which) else {
        return Vec::new();
    };
    let operations = whole.lines().filter(|l| l.starts_with("-F ")).count();
    if operations <= batch {
        return vec![whole];
    }
    /// One table's lines of the one-input script, by operation.
    #[derive(Default)]
    struct Table {
        name: String,
        jumps: Vec<String>,
        flushes: Vec<String>,
        deletes: Vec<String>,
    }
    let mut tables: Vec<Table> = Vec::new();
    for line in whole.lines() {
        if let Some(name) = line.strip_prefix('*') {
            tables.push(Table {
                name: name.to_string(),
                ..Default::default()
            });
        } else if let Some(table) = tables.last_mut() {
            match line.get(..3) {
                Some("-D ") => table.jumps.push(line.to_string()),
                Some("-F ") => table.flushes.push(line.to_string()),
                Some("-X ") => table.deletes.push(line.to_string()),
                _ => {}
            }
        }
    }
    let input = |table: &str, lines: &[String]| {
        let mut text = format!("*{table}\n");
        for line in lines {
            text.push_str(line);
            text.push('\n');
        }
        text.push_str("COMMIT\n");
        text
    };
    let mut inputs = Vec::new();
    // First: every jump into our chains goes, with the first flushes.
    let mut first = String::new();
    for table in &tables {
        let mut lines = table.jumps.clone();
        lines.extend(table.flushes.iter().take(batch).cloned());
        if !lines.is_empty() {
            first.push_str(&input(&table.name, &lines));
        }
    }
    inputs.push(first);
    for table in &tables {
        for chunk in table.flushes.get(batch..).unwrap_or_default().chunks(batch) {
            inputs.push(input(&table.name, chunk));
        }
    }
    for table in &tables {
        for chunk in table.deletes.chunks(batch) {
            inputs.push(input(&table.name, chunk));
        }
    }
    inputs
}

/// Chain operations per input on the nf_tables backend (see [`cleanup_scripts`]).
const NFT_BACKEND_BATCH: usize = 5000;

/// The iptables backends with state in this network namespace: (save, restore) commands.
fn backends() -> Vec<(&'static str, &'static str)> {
    let mut found = Vec::new();
    let installed = |cmd: &str| {
        Command::new(cmd)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    for (save, restore, legacy_tables) in [
        ("iptables-nft-save", "iptables-nft-restore", None),
        ("ip6tables-nft-save", "ip6tables-nft-restore", None),
        (
            "iptables-legacy-save",
            "iptables-legacy-restore",
            Some("/proc/net/ip_tables_names"),
        ),
        (
            "ip6tables-legacy-save",
            "ip6tables-legacy-restore",
            Some("/proc/net/ip6_tables_names"),
        ),
    ] {
        // Looking at the legacy backend when it has no table would load its kernel module
        // and create empty tables: only look when it is in use.
        if let Some(names) = legacy_tables {
            if std::fs::read_to_string(names).map_or(true, |t| t.trim().is_empty()) {
                continue;
            }
        }
        if installed(save) {
            found.push((save, restore));
        }
    }
    found
}

/// Removes the iptables chains of `which` modes from every backend in use (and, with iptables
/// and ipvs mode's, ipvs mode's interface). Returns false if something could not be removed
/// (logged with the command and its error).
pub fn remove_leftovers(which: Leftovers) -> bool {
    let mut ok = which == Leftovers::Userspace || remove_ipvs_interface();
    for (save, restore) in backends() {
        let saved = match Command::new(save).output() {
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
            Ok(out) => {
                debug!(command = save, error = %String::from_utf8_lossy(&out.stderr).trim(), "Cannot list iptables rules");
                continue;
            }
            Err(_) => continue,
        };
        let batch = match restore.contains("-nft-") {
            true => NFT_BACKEND_BATCH,
            false => usize::MAX,
        };
        let scripts = cleanup_scripts(&saved, batch, which);
        if scripts.is_empty() {
            continue;
        }
        let started = std::time::Instant::now();
        let mut failed = false;
        for script in &scripts {
            let applied = Command::new(restore)
                .arg("--noflush")
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .and_then(|mut child| {
                    if let Some(mut stdin) = child.stdin.take() {
                        stdin.write_all(script.as_bytes())?;
                    }
                    child.wait_with_output()
                });
            match applied {
                Ok(out) if out.status.success() => {}
                Ok(out) => {
                    failed = true;
                    warn!(command = restore, error = %String::from_utf8_lossy(&out.stderr).trim(), "Cannot remove kube-proxy's iptables chains");
                    break;
                }
                Err(e) => {
                    failed = true;
                    warn!(command = restore, error = %e, "Cannot run iptables-restore");
                    break;
                }
            }
        }
        if failed {
            ok = false;
        } else {
            info!(command = restore, inputs = scripts.len(), elapsed = ?started.elapsed(), "Removed kube-proxy's iptables chains");
        }
    }
    ok
}

/// Deletes the dummy interface upstream's ipvs mode binds service IPs to, if present.
fn remove_ipvs_interface() -> bool {
    // Asked of this network namespace (/sys may show another one's interfaces).
    if nix::net::if_::if_nametoindex("kube-ipvs0").is_err() {
        return true;
    }
    match Command::new("ip")
        .args(["link", "delete", "kube-ipvs0"])
        .status()
    {
        Ok(status) if status.success() => {
            info!("Removed ipvs mode's interface kube-ipvs0");
            true
        }
        other => {
            warn!(result = ?other, "Cannot remove ipvs mode's interface kube-ipvs0");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables)
*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-PROXY-CANARY - [0:0]
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
-A INPUT -j KUBE-FIREWALL
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABC - [0:0]
:KUBE-SEP-DEF - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-SERVICES -d 198.19.0.10/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-ABC
-A KUBE-SVC-ABC -j KUBE-SEP-DEF
-A KUBE-SEP-DEF -p tcp -m tcp -j DNAT --to-destination 198.18.1.2:8080
COMMIT
"#;

    /// In stages: the jumps first, every flush before any delete, no input over the batch.
    #[test]
    fn large_cleanups_are_staged_with_the_jumps_first() {
        let mut saved = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n");
        for i in 0..10 {
            saved.push_str(&format!(":KUBE-SEP-{i} - [0:0]\n"));
        }
        saved.push_str("-A PREROUTING -j KUBE-SERVICES\n-A KUBE-SERVICES -j KUBE-SEP-9\nCOMMIT\n");
        assert_eq!(
            cleanup_scripts(&saved, 100, Leftovers::IptablesAndIpvs),
            vec![cleanup_script(&saved).unwrap()]
        );
        let staged = cleanup_scripts(&saved, 4, Leftovers::IptablesAndIpvs);
        assert!(
            staged[0].starts_with("*nat\n-D PREROUTING -j KUBE-SERVICES\n-F KUBE-SERVICES\n"),
            "{staged:?}"
        );
        let all: Vec<&str> = staged
            .iter()
            .flat_map(|s| s.lines())
            .filter(|l| l.starts_with('-'))
            .collect();
        let first_delete = all.iter().position(|l| l.starts_with("-X")).unwrap();
        assert!(all[first_delete..].iter().all(|l| l.starts_with("-X")));
        assert_eq!(all.iter().filter(|l| l.starts_with("-F")).count(), 11);
        assert_eq!(all.iter().filter(|l| l.starts_with("-X")).count(), 11);
        for input in &staged {
            assert!(
                input
                    .lines()
                    .filter(|l| l.starts_with("-F") || l.starts_with("-X"))
                    .count()
                    <= 4,
                "{input}"
            );
        }
    }

    #[test]
    fn removes_kube_proxy_chains_and_their_jumps_only() {
        let script = cleanup_script(SAVED).unwrap();
        assert_eq!(
            script,
            "*mangle\n-F KUBE-PROXY-CANARY\n-X KUBE-PROXY-CANARY\nCOMMIT\n\
             *filter\n\
             -D INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -D FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
             -F KUBE-SERVICES\n-F KUBE-FORWARD\n-X KUBE-SERVICES\n-X KUBE-FORWARD\nCOMMIT\n\
             *nat\n\
             -D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -F KUBE-SERVICES\n-F KUBE-SVC-ABC\n-F KUBE-SEP-DEF\n\
             -X KUBE-SERVICES\n-X KUBE-SVC-ABC\n-X KUBE-SEP-DEF\nCOMMIT\n"
        );
        assert_eq!(
            cleanup_script("*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-MARK-MASQ - [0:0]\nCOMMIT\n"),
            None
        );
    }
}
