//! The state one family should have in ipvs mode, computed from the plan: virtual servers
//! with their real servers, the addresses on `kube-ipvs0`, the ipset entries, and the
//! load-balancer frontends the node itself must not reach. Upstream's `syncProxyRules`,
//! without its side effects.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use kube_proxy_model::context::{FamilyContext, NodePortDestinations};
use kube_proxy_model::{FamilyPlan, Frontend, Protocol, ServicePortName, ServicePortPlan, Target};

use crate::names::Set;

/// Where a virtual server listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VirtualAddress {
    pub ip: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

impl std::fmt::Display for VirtualAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.ip, self.port),
            self.protocol.upper()
        )
    }
}

/// A virtual server's settings (what `ipvsadm -E` changes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSettings {
    pub scheduler: String,
    /// ClientIP affinity: persistence with this timeout in seconds.
    pub persistence: Option<u32>,
    /// Scheduler flags (`mh-port` for `mh`, as upstream's source-hash flag).
    pub flags: Option<String>,
}

/// One virtual server as the plan wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtualServer {
    pub settings: ServiceSettings,
    /// The endpoints, each with weight 1.
    pub reals: BTreeSet<SocketAddr>,
    /// The service port it belongs to (for logs and `explain`).
    pub owner: ServicePortName,
}

/// The desired state of one family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub services: BTreeMap<VirtualAddress, VirtualServer>,
    /// Addresses on `kube-ipvs0`.
    pub bound: BTreeSet<IpAddr>,
    /// Entries of every set (sets without entries are present and empty).
    pub sets: BTreeMap<Set, BTreeSet<String>>,
    /// Load-balancer frontends with source ranges that do not hold the node: the node's own
    /// connections to them are dropped (`KUBE-IPVS-OUT-FILTER`).
    pub lb_no_node_access: BTreeSet<VirtualAddress>,
}

/// Settings of the virtual servers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scheduling {
    /// `ipvs.scheduler` (`rr` when empty).
    pub scheduler: String,
}

impl Scheduling {
    pub fn new(scheduler: &str) -> Scheduling {
        Scheduling {
            scheduler: if scheduler.is_empty() {
                "rr".into()
            } else {
                scheduler.to_string()
            },
        }
    }

    fn settings(&self, plan: &ServicePortPlan) -> ServiceSettings {
        ServiceSettings {
            scheduler: self.scheduler.clone(),
            persistence: plan.port.session_affinity_timeout,
            flags: (self.scheduler == "mh").then(|| "mh-port".to_string()),
        }
    }
}

/// Whether an address may carry NodePorts and be counted as the node's (upstream skips
/// loopback and IPv6 link-local addresses).
fn usable_node_address(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback(),
        IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
    }
}

/// ipset spelling of an address and port (`198.19.0.10,tcp:80`).
pub fn ip_port(ip: IpAddr, protocol: Protocol, port: u16) -> String {
    format!("{ip},{}:{port}", protocol.lower())
}

/// ipset spelling of a network: a host route is printed as its address.
pub fn net_entry(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

/// The state of one family. `node_addresses` are the family's addresses on the node's
/// interfaces other than `kube-ipvs0`.
pub fn desired(
    plan: &FamilyPlan,
    ctx: &FamilyContext,
    node_addresses: &[IpAddr],
    scheduling: &Scheduling,
) -> Desired {
    let mut out = Desired::default();
    for set in Set::ALL {
        out.sets.insert(set, BTreeSet::new());
    }
    let node_set: BTreeSet<IpAddr> = node_addresses.iter().copied().collect();
    let nodeport_ips: Vec<IpAddr> = match &ctx.nodeports {
        NodePortDestinations::AllLocal => node_addresses
            .iter()
            .filter(|ip| usable_node_address(ip))
            .copied()
            .collect(),
        NodePortDestinations::Addresses(ips) => {
            ips.iter().filter(|ip| !ip.is_loopback()).copied().collect()
        }
    };
    for (name, port_plan) in &plan.services {
        add_port(
            &mut out,
            name,
            port_plan,
            ctx,
            &node_set,
            &nodeport_ips,
            scheduling,
        );
    }
    let bound: BTreeSet<String> = out.bound.iter().map(|ip| ip.to_string()).collect();
    out.sets.insert(Set::IpvsIps, bound);
    out
}

fn add_port(
    out: &mut Desired,
    name: &ServicePortName,
    plan: &ServicePortPlan,
    ctx: &FamilyContext,
    node_set: &BTreeSet<IpAddr>,
    nodeport_ips: &[IpAddr],
    scheduling: &Scheduling,
) {
    let port = &plan.port;
    let proto = port.protocol;
    let settings = scheduling.settings(plan);
    let reals = |target: Target| -> BTreeSet<SocketAddr> {
        plan.endpoints_for(target)
            .iter()
            .map(|ep| SocketAddr::new(ep.ip, ep.port))
            .collect()
    };
    let mut entry = |set: Set, text: String| {
        out.sets.entry(set).or_default().insert(text);
    };
    // Hairpin: a local endpoint reaching itself through the Service is masqueraded.
    for ep in plan.reachable_endpoints.iter().filter(|ep| ep.is_local) {
        entry(
            Set::LoopBack,
            format!("{},{}:{},{}", ep.ip, proto.lower(), ep.port, ep.ip),
        );
    }
    let server = |out: &mut Desired, address: VirtualAddress, target: Target| {
        out.services.insert(
            address,
            VirtualServer {
                settings: settings.clone(),
                reals: reals(target),
                owner: name.clone(),
            },
        );
    };
    let external = plan.external.as_ref();
    let external_target = external.map_or(Target::Reject, |e| e.from_outside);
    let local = port.external_traffic_local();
    // An external or load-balancer IP: its server, and the address on kube-ipvs0 unless
    // the node has it on another interface (upstream).
    let external_server = |out: &mut Desired, ip: IpAddr| {
        let address = VirtualAddress {
            ip,
            protocol: proto,
            port: port.port,
        };
        server(out, address, external_target);
        if !node_set.contains(&ip) {
            out.bound.insert(ip);
        }
    };

    if plan.serves(&Frontend::Address(port.cluster_ip, proto, port.port)) {
        let address = VirtualAddress {
            ip: port.cluster_ip,
            protocol: proto,
            port: port.port,
        };
        out.sets.entry(Set::ClusterIp).or_default().insert(ip_port(
            port.cluster_ip,
            proto,
            port.port,
        ));
        server(out, address, plan.internal);
        out.bound.insert(port.cluster_ip);
    }
    for ip in &port.external_ips {
        if !plan.serves(&Frontend::Address(*ip, proto, port.port)) {
            continue;
        }
        let set = if local {
            Set::ExternalIpLocal
        } else {
            Set::ExternalIp
        };
        out.sets
            .entry(set)
            .or_default()
            .insert(ip_port(*ip, proto, port.port));
        external_server(out, *ip);
    }
    for ip in &port.load_balancer_vips {
        if !plan.serves(&Frontend::Address(*ip, proto, port.port)) {
            continue;
        }
        let text = ip_port(*ip, proto, port.port);
        let sets = &mut out.sets;
        sets.entry(Set::LoadBalancer)
            .or_default()
            .insert(text.clone());
        if local {
            sets.entry(Set::LoadBalancerLocal)
                .or_default()
                .insert(text.clone());
        }
        let ranges = &port.load_balancer_source_ranges;
        if !ranges.is_empty() {
            sets.entry(Set::LoadBalancerFw)
                .or_default()
                .insert(text.clone());
            for net in ranges {
                sets.entry(Set::LoadBalancerSourceCidr)
                    .or_default()
                    .insert(format!("{text},{}", net_entry(net)));
            }
            if ctx.lb_ips_allowed_as_sources(ranges) {
                sets.entry(Set::LoadBalancerSourceIp)
                    .or_default()
                    .insert(format!("{text},{ip}"));
            } else {
                out.lb_no_node_access.insert(VirtualAddress {
                    ip: *ip,
                    protocol: proto,
                    port: port.port,
                });
            }
        }
        external_server(out, *ip);
    }
    if let Some(node_port) = port.node_port.map(|p| p.get()) {
        if plan.serves(&Frontend::NodePort(proto, node_port)) && !nodeport_ips.is_empty() {
            let (all, local_set) = match proto {
                Protocol::Tcp => (Set::NodePortTcp, Set::NodePortLocalTcp),
                Protocol::Udp => (Set::NodePortUdp, Set::NodePortLocalUdp),
                Protocol::Sctp => (Set::NodePortSctp, Set::NodePortLocalSctp),
            };
            // SCTP's sets are hash:ip,port (one entry per node address); the others bitmaps.
            let entries: Vec<String> = match proto {
                Protocol::Sctp => nodeport_ips
                    .iter()
                    .map(|ip| ip_port(*ip, proto, node_port))
                    .collect(),
                _ => vec![node_port.to_string()],
            };
            for text in entries {
                if local {
                    out.sets.entry(local_set).or_default().insert(text.clone());
                }
                out.sets.entry(all).or_default().insert(text);
            }
            for ip in nodeport_ips {
                server(
                    out,
                    VirtualAddress {
                        ip: *ip,
                        protocol: proto,
                        port: node_port,
                    },
                    external_target,
                );
            }
        }
    }
    if let Some(hc) = port.health_check_node_port {
        out.sets
            .entry(Set::HealthCheckNodePort)
            .or_default()
            .insert(hc.get().to_string());
    }
}
