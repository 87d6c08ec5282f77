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

use ipnet::IpNet;
use kube_proxy_model::{Protocol, ServicePortName};

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

/// What a rule does with the traffic it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// To the listener's port on the address the packet came in on.
    Redirect(u16),
    /// To the listener at this address.
    Dnat(SocketAddr),
    /// Accepts new connections (the INPUT exception of NodePorts' listener ports).
    AcceptNew,
}

/// One redirect rule, decided here and rendered by each redirect path ([`Rule::iptables`],
/// [`crate::nft`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Upstream's chain name (the nftables path has a chain of the same role).
    pub chain: &'static str,
    /// The comment: the service port.
    pub name: ServicePortName,
    pub protocol: Protocol,
    /// The frontend address (none: every local address, a NodePort).
    pub dest: Option<IpAddr>,
    pub dport: u16,
    /// One of the load balancer's `loadBalancerSourceRanges`.
    pub source: Option<IpNet>,
    /// Only traffic that did not come in through a bridge port (upstream's
    /// `-m physdev ! --physdev-is-in`).
    pub not_bridged: bool,
    /// Only traffic to a local address (`-m addrtype --dst-type LOCAL`).
    pub dst_local: bool,
    pub action: Action,
}

fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => format!("{v6}/128"),
    }
}

impl Rule {
    /// The rule as upstream wrote it: the rest of its `-A <chain>` line
    /// (`iptablesCommonPortalArgs` and the target).
    pub fn iptables(&self) -> String {
        self.iptables_text(None)
    }

    /// [`Rule::iptables`] with `<listener port>` where the listener's port goes (for
    /// `explain`, which runs apart from the proxy: ports are chosen at run time).
    pub fn iptables_without_port(&self) -> String {
        self.iptables_text(Some("<listener port>"))
    }

    fn iptables_text(&self, listener: Option<&str>) -> String {
        let protocol = self.protocol.lower();
        let mut args = format!(
            "-m comment --comment \"{}\" -p {protocol} -m {protocol} --dport {}",
            self.name, self.dport
        );
        if let Some(ip) = self.dest {
            let _ = write!(args, " -d {}", host(ip));
        }
        if self.not_bridged {
            args.push_str(" -m physdev ! --physdev-is-in");
        }
        if self.dst_local {
            args.push_str(" -m addrtype --dst-type LOCAL");
        }
        if let Some(range) = self.source {
            let _ = write!(args, " -s {range}");
        }
        let port = |port: u16| listener.map_or_else(|| port.to_string(), str::to_string);
        match self.action {
            Action::Redirect(to) => {
                let _ = write!(args, " -j REDIRECT --to-ports {}", port(to));
            }
            Action::Dnat(SocketAddr::V4(to)) => {
                let _ = write!(
                    args,
                    " -j DNAT --to-destination {}:{}",
                    to.ip(),
                    port(to.port())
                );
            }
            Action::Dnat(SocketAddr::V6(to)) => {
                let _ = write!(
                    args,
                    " -j DNAT --to-destination [{}]:{}",
                    to.ip(),
                    port(to.port())
                );
            }
            Action::AcceptNew => args.push_str(" -m state --state NEW -j ACCEPT"),
        }
        args
    }
}

/// The rules of every listener, in order.
pub fn rules(redirects: &[Redirect<'_>], addressing: Addressing) -> Vec<Rule> {
    let mut out = Vec::new();
    for r in redirects {
        let container = match addressing.listen_ip {
            None => Action::Redirect(r.proxy_port),
            Some(ip) => Action::Dnat(SocketAddr::new(ip, r.proxy_port)),
        };
        let host = addressing
            .listen_ip
            .or(addressing.host_ip)
            .map(|ip| Action::Dnat(SocketAddr::new(ip, r.proxy_port)));
        let rule = |chain, dest, dport, action| Rule {
            chain,
            name: r.name.clone(),
            protocol: r.spec.protocol,
            dest,
            dport,
            source: None,
            not_bridged: false,
            dst_local: false,
            action,
        };
        // A portal's pair: traffic from pods and outside, and the node's own (when there is
        // a node address to send it to).
        let pair = |out: &mut Vec<Rule>, container_chain, host_chain, template: Rule| {
            if let Some(host) = host {
                out.push(Rule {
                    chain: container_chain,
                    action: container,
                    ..template.clone()
                });
                out.push(Rule {
                    chain: host_chain,
                    action: host,
                    ..template
                });
            } else {
                out.push(Rule {
                    chain: container_chain,
                    action: container,
                    ..template
                });
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
                    let template = rule(PORTALS_CONTAINER, Some(ip), port, container);
                    let ranges = &r.spec.source_ranges;
                    if load_balancer && !ranges.is_empty() {
                        // Only the allowed sources are proxied.
                        for range in ranges {
                            let template = Rule {
                                source: Some(*range),
                                ..template.clone()
                            };
                            pair(&mut out, PORTALS_CONTAINER, PORTALS_HOST, template);
                        }
                    } else {
                        pair(&mut out, PORTALS_CONTAINER, PORTALS_HOST, template);
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
                    out.push(Rule {
                        not_bridged: true,
                        ..rule(PORTALS_CONTAINER, Some(ip), port, container)
                    });
                    let template = Rule {
                        dst_local: true,
                        ..rule(PORTALS_CONTAINER, Some(ip), port, container)
                    };
                    pair(&mut out, PORTALS_CONTAINER, PORTALS_HOST, template);
                }
                Portal::NodePort(node_port) => {
                    let template = rule(NODEPORT_CONTAINER, None, node_port, container);
                    pair(&mut out, NODEPORT_CONTAINER, NODEPORT_HOST, template);
                    out.push(rule(
                        NODEPORT_NON_LOCAL,
                        None,
                        r.proxy_port,
                        Action::AcceptNew,
                    ));
                }
            }
        }
    }
    out
}

/// The restore input: our chains declared (emptied) and refilled, and the jumps that
/// `has_jump(table, from, to)` says are missing.
pub fn restore_input(rules: &[&Rule], has_jump: &dyn Fn(&str, &str, &str) -> bool) -> String {
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
        for rule in rules {
            if table_of(rule.chain) == table {
                let _ = writeln!(text, "-A {} {}", rule.chain, rule.iptables());
            }
        }
        text.push_str("COMMIT\n");
    }
    text
}

/// The table of one of our chains.
pub fn table_of(chain: &str) -> &'static str {
    CHAINS
        .iter()
        .find(|(_, c)| *c == chain)
        .map_or("nat", |(t, _)| t)
}
