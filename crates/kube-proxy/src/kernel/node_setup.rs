//! Privileged start-up steps (what `--init-only` does and then exits): the conntrack sysctls
//! of the `conntrack` section and the process's OOM score, as upstream's `server_linux.go`.
//!
//! What to write is decided by a pure planner from the settings, the CPU count and the current
//! values; the writes tolerate what a network namespace or a container cannot change
//! (`nf_conntrack_max` and the hash size are global), logging each.

use std::path::Path;

use kube_proxy_config::ConntrackSettings;
use tracing::{info, warn};

/// Upper bound of `nf_conntrack_max` kube-proxy sets (upstream's cap).
const MAX_CONNTRACK: i64 = 1 << 20;

pub const CONNTRACK_MAX: &str = "net/netfilter/nf_conntrack_max";
pub const HASHSIZE: &str = "/sys/module/nf_conntrack/parameters/hashsize";

/// One value to write, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysctlWrite {
    /// Under /proc/sys, or an absolute path for module parameters.
    pub key: String,
    pub value: i64,
}

/// The writes the conntrack settings call for. `current` returns a key's present value;
/// values already in place are not rewritten, and limits are only ever raised.
pub fn plan_conntrack(
    settings: &ConntrackSettings,
    cpus: usize,
    current: impl Fn(&str) -> Option<i64>,
) -> Vec<SysctlWrite> {
    let mut writes = Vec::new();
    let mut set = |key: &str, value: i64, only_raise: bool| {
        let now = current(key);
        let needed = match now {
            Some(now) if only_raise => now < value,
            Some(now) => now != value,
            None => true,
        };
        if needed {
            writes.push(SysctlWrite {
                key: key.to_string(),
                value,
            });
        }
    };
    if settings.max_per_core > 0 {
        let max = (i64::from(settings.max_per_core) * cpus as i64)
            .max(i64::from(settings.min))
            .min(MAX_CONNTRACK);
        set(CONNTRACK_MAX, max, true);
        // The hash table should have at least a bucket for every 4 entries.
        set(HASHSIZE, max / 4, true);
    }
    let seconds = |d: Option<std::time::Duration>| d.map(|d| d.as_secs() as i64);
    if let Some(v) = seconds(settings.tcp_established_timeout) {
        set(
            "net/netfilter/nf_conntrack_tcp_timeout_established",
            v,
            false,
        );
    }
    if let Some(v) = seconds(settings.tcp_close_wait_timeout) {
        set(
            "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
            v,
            false,
        );
    }
    if settings.tcp_be_liberal {
        set("net/netfilter/nf_conntrack_tcp_be_liberal", 1, false);
    }
    if let Some(v) = seconds(settings.udp_timeout) {
        set("net/netfilter/nf_conntrack_udp_timeout", v, false);
    }
    if let Some(v) = seconds(settings.udp_stream_timeout) {
        set("net/netfilter/nf_conntrack_udp_timeout_stream", v, false);
    }
    writes
}

fn path_of(key: &str) -> std::path::PathBuf {
    if key.starts_with('/') {
        Path::new(key).to_path_buf()
    } else {
        Path::new("/proc/sys").join(key)
    }
}

/// Reads a sysctl (or module parameter) as a number.
pub fn read_value(key: &str) -> Option<i64> {
    std::fs::read_to_string(path_of(key))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Applies the conntrack settings; returns how many writes failed (each is logged; none is
/// fatal, as upstream tolerates read-only /proc/sys in containers).
pub fn apply_conntrack(settings: &ConntrackSettings) -> usize {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if !Path::new("/proc/sys/net/netfilter").exists() {
        // nf_conntrack is loaded on first use of NAT; the nft ruleset loads it.
        let _ = std::process::Command::new("modprobe")
            .arg("nf_conntrack")
            .status();
    }
    let mut failures = 0;
    for write in plan_conntrack(settings, cpus, read_value) {
        match std::fs::write(path_of(&write.key), write.value.to_string()) {
            Ok(()) => info!(key = %write.key, value = write.value, "Set sysctl"),
            Err(e) => {
                failures += 1;
                warn!(key = %write.key, value = write.value, error = %e, "Cannot set sysctl (global ones cannot be changed from a network namespace or read-only /proc/sys); continuing");
            }
        }
    }
    failures
}

/// `net.ipv4.conf.all.route_localnet=1`, for NodePorts on 127.0.0.1 (iptables mode's
/// `localhostNodePorts`); failure is logged, as upstream.
pub fn enable_route_localnet() {
    let key = "/proc/sys/net/ipv4/conf/all/route_localnet";
    match std::fs::write(key, "1") {
        Ok(()) => info!(
            key = "net.ipv4.conf.all.route_localnet",
            value = 1,
            "Set sysctl"
        ),
        Err(e) => {
            warn!(key = "net.ipv4.conf.all.route_localnet", error = %e, "Cannot set sysctl; NodePorts on 127.0.0.1 will not answer")
        }
    }
}

/// Sets this process's OOM score adjustment (`oomScoreAdj`), tolerating failure.
pub fn apply_oom_score_adj(value: i32) {
    match std::fs::write("/proc/self/oom_score_adj", value.to_string()) {
        Ok(()) => info!(value, "Set oom_score_adj"),
        Err(e) => warn!(value, error = %e, "Cannot set oom_score_adj; continuing"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Duration;

    fn settings() -> ConntrackSettings {
        ConntrackSettings {
            max_per_core: 32768,
            min: 131072,
            tcp_established_timeout: Some(Duration::from_secs(86400)),
            tcp_close_wait_timeout: Some(Duration::from_secs(3600)),
            tcp_be_liberal: false,
            udp_timeout: None,
            udp_stream_timeout: None,
        }
    }

    #[test]
    fn upstream_defaults_on_a_two_core_node() {
        let current: HashMap<&str, i64> = [
            (CONNTRACK_MAX, 65536),
            (HASHSIZE, 16384),
            ("net/netfilter/nf_conntrack_tcp_timeout_established", 432000),
            ("net/netfilter/nf_conntrack_tcp_timeout_close_wait", 3600),
        ]
        .into();
        let writes = plan_conntrack(&settings(), 2, |k| current.get(k).copied());
        assert_eq!(
            writes,
            vec![
                SysctlWrite {
                    key: CONNTRACK_MAX.into(),
                    value: 131072
                },
                SysctlWrite {
                    key: HASHSIZE.into(),
                    value: 32768
                },
                SysctlWrite {
                    key: "net/netfilter/nf_conntrack_tcp_timeout_established".into(),
                    value: 86400
                },
            ],
            "min wins over 2 x 32768; close_wait already right"
        );
    }

    #[test]
    fn limits_are_only_raised_and_capped() {
        let writes = plan_conntrack(&settings(), 64, |k| {
            if k == CONNTRACK_MAX {
                Some(2_000_000)
            } else {
                None
            }
        });
        assert!(
            !writes.iter().any(|w| w.key == CONNTRACK_MAX),
            "already larger: left alone"
        );
        let writes = plan_conntrack(&settings(), 64, |_| Some(0));
        assert_eq!(writes[0].value, 1 << 20, "64 x 32768 capped");
    }

    #[test]
    fn zero_means_leave_alone() {
        let mut s = settings();
        s.max_per_core = 0;
        s.tcp_established_timeout = None;
        s.tcp_close_wait_timeout = None;
        s.tcp_be_liberal = true;
        s.udp_timeout = Some(Duration::from_secs(30));
        let writes = plan_conntrack(&s, 2, |_| None);
        let keys: Vec<&str> = writes.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "net/netfilter/nf_conntrack_tcp_be_liberal",
                "net/netfilter/nf_conntrack_udp_timeout"
            ]
        );
    }
}

/// The sysctl writes ipvs mode needs (upstream's NewProxier): connection tracking of IPVS
/// traffic (masquerading needs it), expiring connections to removed real servers and their
/// persistence templates, forwarding, `conn_reuse_mode=0` only on kernels from 4.1 to before
/// 5.9 (later ones fixed the reuse bug, so upstream leaves it), and with `strictARP`
/// `arp_ignore=1`/`arp_announce=2` so the node does not answer ARP for kube-ipvs0's addresses.
pub fn plan_ipvs(strict_arp: bool, kernel: (u32, u32)) -> Vec<SysctlWrite> {
    let mut writes = vec![
        ("net/ipv4/vs/conntrack", 1),
        ("net/ipv4/vs/expire_nodest_conn", 1),
        ("net/ipv4/vs/expire_quiescent_template", 1),
        ("net/ipv4/ip_forward", 1),
    ];
    if ((4, 1)..(5, 9)).contains(&kernel) {
        writes.insert(1, ("net/ipv4/vs/conn_reuse_mode", 0));
    }
    if strict_arp {
        writes.push(("net/ipv4/conf/all/arp_ignore", 1));
        writes.push(("net/ipv4/conf/all/arp_announce", 2));
    }
    writes
        .into_iter()
        .map(|(key, value)| SysctlWrite {
            key: key.to_string(),
            value,
        })
        .collect()
}

/// `major.minor` of a kernel release string (`6.1.0-57-amd64` -> (6, 1)).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Applies [`plan_ipvs`], skipping values already set; failures are logged, as upstream.
pub fn apply_ipvs(strict_arp: bool) -> usize {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let kernel = kernel_version(&release).unwrap_or((0, 0));
    let mut failures = 0;
    for write in plan_ipvs(strict_arp, kernel) {
        if read_value(&write.key) == Some(write.value) {
            continue;
        }
        match std::fs::write(path_of(&write.key), write.value.to_string()) {
            Ok(()) => info!(key = %write.key, value = write.value, "Set sysctl"),
            Err(e) => {
                failures += 1;
                warn!(key = %write.key, value = write.value, error = %e, "Cannot set sysctl; continuing");
            }
        }
    }
    failures
}

#[cfg(test)]
mod ipvs_tests {
    use super::*;

    #[test]
    fn ipvs_sysctls_as_upstream_sets_them() {
        let keys = |w: Vec<SysctlWrite>| -> Vec<String> {
            w.into_iter()
                .map(|w| format!("{}={}", w.key, w.value))
                .collect()
        };
        assert_eq!(
            keys(plan_ipvs(false, (6, 1))),
            [
                "net/ipv4/vs/conntrack=1",
                "net/ipv4/vs/expire_nodest_conn=1",
                "net/ipv4/vs/expire_quiescent_template=1",
                "net/ipv4/ip_forward=1"
            ]
        );
        let old = keys(plan_ipvs(true, (5, 4)));
        assert!(old.contains(&"net/ipv4/vs/conn_reuse_mode=0".to_string()));
        assert!(old.contains(&"net/ipv4/conf/all/arp_ignore=1".to_string()));
        assert!(old.contains(&"net/ipv4/conf/all/arp_announce=2".to_string()));
        assert_eq!(kernel_version("6.1.0-57-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("5.10.0"), Some((5, 10)));
    }
}
