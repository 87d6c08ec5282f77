//! Upstream's userspace redirect rules (v1.25 `iptablesInit`, `openOnePortal`,
//! `openNodePort`), written as one `iptables-restore --noflush` input per family that
//! declares (and so empties) our five chains, inserts the jumps the node lacks and appends
//! every portal's rules: traffic to a frontend reaches its listener, atomically.
//!
//! - nat `KUBE-PORTALS-CONTAINER` (first in PREROUTING): traffic from pods and outside,
//!   `REDIRECT` to the listener's port (`DNAT` to `bindAddress` when the proxy listens on
//!   one address).
//! - nat `KUBE-PORTALS-HOST` (first in OUTPUT): the node's own traffic, `DNAT` to the node's
//!   IP (REDIRECT of local traffic goes to loopback, whose answers come from another
//!   address: upstream's finding).
//! - nat `KUBE-NODEPORT-CONTAINER` / `KUBE-NODEPORT-HOST` (last in PREROUTING / OUTPUT, for
//!   local destinations): NodePorts, after every portal so a load balancer's traffic that
//!   a cloud routes locally is not taken for a NodePort.
//! - filter `KUBE-NODEPORT-NON-LOCAL` (first in INPUT): accepts new connections to the
//!   listener ports of NodePorts under a default-deny INPUT policy.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use kube_proxy_model::ServicePortName;

use crate::desired::{ListenerSpec, Portal};

pub const PORTALS_CONTAINER: &str = "KUBE-PORTALS-CONTAINER";
pub const PORTALS_HOST: &str = "KUBE-PORTALS-HOST";
pub const NODEPORT_CONTAINER: &str = "KUBE-NODEPORT-CONTAINER";
pub const NODEPORT_HOST: &str = "KUBE-NODEPORT-HOST";
pub const NODEPORT_NON_LOCAL: &str = "KUBE-NODEPORT-NON-LOCAL";

/// Every chain of userspace mode: (table, chain).
pub const CHAINS: [(&str, &str); 5] = [
    ("nat", PORTALS_CONTAINER),
    ("nat", PORTALS_HOST),
    ("nat", NODEPORT_CONTAINER),
    ("nat", NODEPORT_HOST),
    ("filter", NODEPORT_NON_LOCAL),
];

/// A jump from a built-in chain: (table, from, to, the rest of the rule, first in the chain).
pub const JUMPS: [(&str, &str, &str, &str, bool); 5] = [
    (
        "nat",
        "PREROUTING",
        PORTALS_CONTAINER,
        "-m comment --comment \"handle ClusterIPs; NOTE: this must be before the NodePort rules\"",
        true,
    ),
    (
        "nat",
        "OUTPUT",
        PORTALS_HOST,
        "-m comment --comment \"handle ClusterIPs; NOTE: this must be before the NodePort rules\"",
        true,
    ),
    (
        "nat",
        "PREROUTING",
        NODEPORT_CONTAINER,
        "-m addrtype --dst-type LOCAL -m comment --comment \"handle service NodePorts; NOTE: this must be the last rule in the chain\"",
        false,
    ),
    (
        "nat",
        "OUTPUT",
        NODEPORT_HOST,
        "-m addrtype --dst-type LOCAL -m comment --comment \"handle service NodePorts; NOTE: this must be the last rule in the chain\"",
        false,
    ),
    (
        "filter",
        "INPUT",
        NODEPORT_NON_LOCAL,
        "-m comment --comment \"Ensure that non-local NodePort traffic can flow\"",
        true,
    ),
];

/// How the rules reach the listeners of one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addressing {
    /// `bindAddress` when the listeners are bound to it (not the unspecified address).
    pub listen_ip: Option<IpAddr>,
    /// The node's IP the node's own traffic is DNATed to (the primary node IP); `None` (no
    /// node IP of the family): the node's own traffic is not redirected.
    pub host_ip: Option<IpAddr>,
}

/// A listener with its port, as the rules see it.
pub struct Redirect<'a> {
    pub name: &'a ServicePortName,
    pub spec: &'a ListenerSpec,
    pub proxy_port: u16,
}

fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => format!("{v6}/128"),
    }
}

/// Upstream's `iptablesCommonPortalArgs`.
fn common(
    name: &ServicePortName,
    protocol: &str,
    dest: Option<IpAddr>,
    port: u16,
    physdev: bool,
    dst_local: bool,
) -> String {
    let mut args =
        format!("-m comment --comment \"{name}\" -p {protocol} -m {protocol} --dport {port}");
    if let Some(ip) = dest {
        let _ = write!(args, " -d {}", host(ip));
    }
    if physdev {
        args.push_str(" -m physdev ! --physdev-is-in");
    }
    if dst_local {
        args.push_str(" -m addrtype --dst-type LOCAL");
    }
    args
}

/// The rules of every listener: (chain, rest of the `-A` line), in order.
pub fn rules(redirects: &[Redirect<'_>], addressing: Addressing) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    for r in redirects {
        let protocol = r.spec.protocol.lower();
        let container_target = match addressing.listen_ip {
            None => format!("-j REDIRECT --to-ports {}", r.proxy_port),
            Some(ip) => format!(
                "-j DNAT --to-destination {}",
                SocketAddr::new(ip, r.proxy_port)
            ),
        };
        let host_target = addressing.listen_ip.or(addressing.host_ip).map(|ip| {
            format!(
                "-j DNAT --to-destination {}",
                SocketAddr::new(ip, r.proxy_port)
            )
        });
        let host_rule = |out: &mut Vec<(&'static str, String)>, chain, args: &str| {
            if let Some(target) = &host_target {
                out.push((chain, format!("{args} {target}")));
            }
        };
        for portal in &r.spec.portals {
            match *portal {
                Portal::Address {
                    ip,
                    port,
                    external: false,
                    load_balancer,
                } => {
                    let args = common(r.name, protocol, Some(ip), port, false, false);
                    let ranges = &r.spec.source_ranges;
                    if load_balancer && !ranges.is_empty() {
                        // Only the allowed sources are proxied.
                        for range in ranges {
                            let args = format!("{args} -s {range}");
                            out.push((PORTALS_CONTAINER, format!("{args} {container_target}")));
                            host_rule(&mut out, PORTALS_HOST, &args);
                        }
                    } else {
                        out.push((PORTALS_CONTAINER, format!("{args} {container_target}")));
                        host_rule(&mut out, PORTALS_HOST, &args);
                    }
                }
                Portal::Address {
                    ip,
                    port,
                    external: true,
                    ..
                } => {
                    // Traffic that is not bridged (from outside), and traffic to an external
                    // IP this node holds, from pods or from the node itself.
                    let args = common(r.name, protocol, Some(ip), port, true, false);
                    out.push((PORTALS_CONTAINER, format!("{args} {container_target}")));
                    let args = common(r.name, protocol, Some(ip), port, false, true);
                    out.push((PORTALS_CONTAINER, format!("{args} {container_target}")));
                    host_rule(&mut out, PORTALS_HOST, &args);
                }
                Portal::NodePort(node_port) => {
                    let args = common(r.name, protocol, None, node_port, false, false);
                    out.push((NODEPORT_CONTAINER, format!("{args} {container_target}")));
                    host_rule(&mut out, NODEPORT_HOST, &args);
                    let args = common(r.name, protocol, None, r.proxy_port, false, false);
                    out.push((
                        NODEPORT_NON_LOCAL,
                        format!("{args} -m state --state NEW -j ACCEPT"),
                    ));
                }
            }
        }
    }
    out
}

/// The restore input: our chains declared (emptied) and refilled, and the jumps that
/// `has_jump(table, from, to)` says are missing.
pub fn restore_input(
    rules: &[(&'static str, String)],
    has_jump: &dyn Fn(&str, &str, &str) -> bool,
) -> String {
    let mut text = String::new();
    for table in ["filter", "nat"] {
        let _ = writeln!(text, "*{table}");
        for (t, chain) in CHAINS {
            if t == table {
                let _ = writeln!(text, ":{chain} - [0:0]");
            }
        }
        for (t, from, to, args, first) in JUMPS {
            if t == table && !has_jump(table, from, to) {
                if first {
                    let _ = writeln!(text, "-I {from} 1 {args} -j {to}");
                } else {
                    let _ = writeln!(text, "-A {from} {args} -j {to}");
                }
            }
        }
        for (chain, rule) in rules {
            let in_table = CHAINS.iter().any(|(t, c)| *t == table && c == chain);
            if in_table {
                let _ = writeln!(text, "-A {chain} {rule}");
            }
        }
        text.push_str("COMMIT\n");
    }
    text
}
