//! The plan of one family as the listeners userspace mode needs.
//!
//! Upstream's userspace proxier had one listener per service port for every frontend and
//! ignored the traffic policies. Here a service port gets up to two listeners, because the
//! plan selects endpoints per kind of traffic: one for its ClusterIP (the plan's `internal`
//! target: internalTrafficPolicy, topology), one for its NodePort, external IPs and
//! load-balancer IPs (the plan's external target for outside clients: externalTrafficPolicy
//! Local reaches only this node's endpoints). A listener whose target has no endpoint
//! (REJECT, or DROP under a Local policy) does not accept: its port is held but not listening,
//! so TCP clients are refused and UDP clients get ICMP port unreachable.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use kube_proxy_model::frontends::Frontend;
use kube_proxy_model::plan::{FamilyPlan, ServicePortPlan, Target};
use kube_proxy_model::{Protocol, ServicePortName};

/// Which frontends of a service port a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// The ClusterIP.
    Cluster,
    /// NodePort, external IPs and load-balancer IPs.
    External,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Cluster => "cluster",
            Class::External => "external",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerKey {
    pub name: ServicePortName,
    pub class: Class,
}

impl std::fmt::Display for ListenerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name, self.class.as_str())
    }
}

/// Where traffic is redirected to a listener from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Portal {
    /// A Service address and port. `external` (an external IP) adds upstream's rules for
    /// traffic to a local address and from the node's bridges' non-bridged ports;
    /// `load_balancer` (a load-balancer IP) is redirected only from the Service's
    /// `loadBalancerSourceRanges`, when it has some.
    Address {
        ip: IpAddr,
        port: u16,
        external: bool,
        load_balancer: bool,
    },
    /// A NodePort on every local address.
    NodePort(u16),
}

/// What one listener does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerSpec {
    /// TCP or UDP (SCTP is not relayed: see [`Listeners::skipped`]).
    pub protocol: Protocol,
    pub portals: Vec<Portal>,
    /// Where connections go; empty: the listener refuses (not listening).
    pub endpoints: Vec<SocketAddr>,
    /// ClientIP affinity timeout.
    pub affinity: Option<Duration>,
    /// `loadBalancerSourceRanges` of the family: the only sources redirected to the
    /// load-balancer portals (others are not proxied and go where the network sends them).
    pub source_ranges: Vec<IpNet>,
}

/// The listeners of one family, and the service ports that cannot have one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listeners {
    pub listeners: BTreeMap<ListenerKey, ListenerSpec>,
    /// Service ports not served, with why (SCTP).
    pub skipped: Vec<(ServicePortName, &'static str)>,
}

/// The listeners `plan` asks for.
pub fn listeners(plan: &FamilyPlan) -> Listeners {
    let mut out = Listeners::default();
    for (name, p) in &plan.services {
        let port = &p.port;
        if port.protocol == Protocol::Sctp {
            out.skipped.push((
                name.clone(),
                "SCTP is not relayed in userspace mode (upstream's never was)",
            ));
            continue;
        }
        let refused = |f: Frontend| p.refused.iter().any(|r| r.frontend == f);
        let affinity = port
            .session_affinity_timeout
            .map(|s| Duration::from_secs(u64::from(s)));
        let address = |ip: IpAddr, external: bool, load_balancer: bool| {
            (!refused(Frontend::Address(ip, port.protocol, port.port))).then_some(Portal::Address {
                ip,
                port: port.port,
                external,
                load_balancer,
            })
        };
        if let Some(portal) = address(port.cluster_ip, false, false) {
            out.listeners.insert(
                ListenerKey {
                    name: name.clone(),
                    class: Class::Cluster,
                },
                ListenerSpec {
                    protocol: port.protocol,
                    portals: vec![portal],
                    endpoints: endpoints(p, p.internal),
                    affinity,
                    source_ranges: Vec::new(),
                },
            );
        }
        let Some(external) = &p.external else {
            continue;
        };
        let mut portals: Vec<Portal> = Vec::new();
        portals.extend(
            port.external_ips
                .iter()
                .filter_map(|ip| address(*ip, true, false)),
        );
        // Load-balancer IPs are portals like the ClusterIP upstream (not "external").
        portals.extend(
            port.load_balancer_vips
                .iter()
                .filter_map(|ip| address(*ip, false, true)),
        );
        if let Some(np) = port.node_port {
            if !refused(Frontend::NodePort(port.protocol, np.get())) {
                portals.push(Portal::NodePort(np.get()));
            }
        }
        if portals.is_empty() {
            continue;
        }
        out.listeners.insert(
            ListenerKey {
                name: name.clone(),
                class: Class::External,
            },
            ListenerSpec {
                protocol: port.protocol,
                portals,
                endpoints: endpoints(p, external.from_outside),
                affinity,
                source_ranges: port.load_balancer_source_ranges.clone(),
            },
        );
    }
    out
}

fn endpoints(p: &ServicePortPlan, target: Target) -> Vec<SocketAddr> {
    p.endpoints_for(target)
        .iter()
        .map(|e| SocketAddr::new(e.ip, e.port))
        .collect()
}
