//! Where one packet goes: the plan's decisions read back for a single connection, for
//! `kube-proxy explain`.
//!
//! Given the first packet of a connection (source, destination, port, protocol), this finds
//! the service port whose frontend it hits (or none), tells where the packet comes from as the
//! dataplanes tell it (this node, a local pod by the local-traffic detector, or outside), and
//! reads the decision the plan made for that kind of traffic: the endpoint set and each
//! endpoint's probability, session affinity, masquerading, or DROP/REJECT and why. It decides
//! nothing new; every answer is a lookup in the plan and the family context the dataplanes
//! render, and the packet tests check that it matches what real packets do.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::context::{FamilyContext, LocalTraffic, NodePortDestinations};
use crate::frontends::{frontends_of, Frontend};
use crate::names::{IpFamily, Protocol};
use crate::plan::{EndpointSet, FamilyPlan, ServicePortPlan, Target};

/// The first packet of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub from: IpAddr,
    pub to: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl Packet {
    /// Parses `IP:PORT[/PROTO]` (IPv6 in brackets; TCP when no protocol is given).
    pub fn parse_destination(text: &str) -> Result<(IpAddr, u16, Protocol), String> {
        let (address, protocol) = match text.rsplit_once('/') {
            Some((address, proto)) => {
                let protocol =
                    Protocol::from_api(Some(&proto.to_uppercase())).ok_or_else(|| {
                        format!("{text:?}: unknown protocol {proto:?} (must be tcp, udp or sctp)")
                    })?;
                (address, protocol)
            }
            None => (text, Protocol::Tcp),
        };
        let socket: std::net::SocketAddr = address
            .parse()
            .map_err(|_| format!("{text:?} is not IP:PORT[/PROTO] (IPv6 as [IP]:PORT)"))?;
        Ok((socket.ip().to_canonical(), socket.port(), protocol))
    }

    pub fn family(&self) -> IpFamily {
        IpFamily::of(&self.to)
    }
}

/// Where a packet comes from, as the dataplanes classify it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// This node's own traffic (its source is one of the node's addresses).
    Node,
    /// A pod, as the local-traffic detector tells (`detectLocalMode`).
    LocalPod,
    /// Anything else: another node, an external client, a pod the detector does not match.
    Outside,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Node => "this node",
            Origin::LocalPod => "a local pod",
            Origin::Outside => "outside (neither this node nor a local pod)",
        }
    }
}

/// How a packet was classified, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Classified {
    pub origin: Origin,
    pub reason: String,
}

/// Which frontend of a service port the packet hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FrontendKind {
    ClusterIp,
    ExternalIp,
    LoadBalancerIp,
    NodePort,
}

impl FrontendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FrontendKind::ClusterIp => "ClusterIP",
            FrontendKind::ExternalIp => "external IP",
            FrontendKind::LoadBalancerIp => "load-balancer IP",
            FrontendKind::NodePort => "NodePort",
        }
    }

    pub fn is_external(self) -> bool {
        self != FrontendKind::ClusterIp
    }
}

/// What happens to the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// DNAT to one of `endpoints`.
    Dnat,
    /// Redirected to the proxy's own listener, which connects to one of `endpoints`
    /// (userspace mode).
    Relay,
    /// Dropped silently (the client times out).
    Drop,
    /// Refused: ICMP port unreachable (TCP clients see "connection refused").
    Reject,
    /// No Service rule matches: the packet is routed like any other.
    NotHandled,
}

/// Where a mode's rules differ (upstream's per-mode matrix, §2.4 of the reference): the
/// handling of packets that hit no frontend, and ipvs mode's masquerading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModeRules {
    /// A known ClusterIP on a port no Service has is rejected (nftables mode; ipvs mode's
    /// `KUBE-IPVS-FILTER`).
    pub reject_unknown_cluster_ip_ports: bool,
    /// An address of a ServiceCIDR that no Service holds is dropped (nftables mode, once the
    /// ServiceCIDRs are known).
    pub drop_unallocated_service_ips: bool,
    /// ipvs mode: one virtual server serves every client of a frontend (the plan has no
    /// short-circuit), masquerading follows upstream's ipset rules (external frontends by
    /// their traffic policy alone; without a detector the node's own ClusterIP connections,
    /// which leave from the ClusterIP on kube-ipvs0).
    pub ipvs: bool,
    /// userspace mode: a listener per service port and class of frontend relays to the
    /// plan's endpoints for that class (external frontends: those for outside clients, for
    /// every client), endpoints see the node, a listener without endpoints refuses, sources
    /// outside `loadBalancerSourceRanges` are not redirected, NodePorts are every local
    /// address's, SCTP is not relayed.
    pub userspace: bool,
}

/// One endpoint the packet may be sent to.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ChosenEndpoint {
    pub address: String,
    /// The chance this endpoint is chosen for a new connection, in percent (uniform).
    pub percent: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub local: bool,
    /// Serving but terminating: used only because no ready endpoint is left.
    pub terminating: bool,
}

/// Whether the packet's source is rewritten to the node's address, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Masquerade {
    pub masquerade: bool,
    pub reason: String,
}

/// The whole answer for one packet.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Explanation {
    pub from: IpAddr,
    pub to: String,
    pub family: IpFamily,
    pub origin: Classified,
    /// `namespace/name:port` of the service port hit, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_port: Option<String>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "display_frontend"
    )]
    pub frontend: Option<Frontend>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frontend_kind: Option<FrontendKind>,
    pub verdict: Verdict,
    /// Why the verdict, in a sentence.
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_set: Option<EndpointSet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<ChosenEndpoint>,
    /// ClientIP session affinity: a client returns to its endpoint within this many seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity_timeout_seconds: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub masquerade: Option<Masquerade>,
    /// Another service port claims the same frontend but does not own it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub also_claimed_by: Vec<String>,
    /// The packet is DNATed but the answer cannot come back to the client: ipvs mode's
    /// fallback sends an outside client of an `externalTrafficPolicy: Local` frontend to a
    /// remote endpoint without masquerading, so the reply leaves from the pod's address.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reply_lost: bool,
}

/// A frontend in JSON as it reads in text: `198.19.0.10:80/TCP`, `NodePort 30080/TCP`.
fn display_frontend<S: serde::Serializer>(
    frontend: &Option<Frontend>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match frontend {
        Some(frontend) => serializer.collect_str(frontend),
        None => serializer.serialize_none(),
    }
}

/// What the caller knows about a packet's source besides its address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceHints {
    /// The origin as the operator states it (`--from-kind`): overrides the classification.
    pub assume: Option<Origin>,
    /// The interface this node routes the source address through (an interface-based
    /// local-traffic detector tells pods by the interface their packets arrive on).
    pub interface: Option<String>,
}

/// Where the dataplane sees `from` coming from. `local_addresses` are the node's addresses
/// of the family.
pub fn classify(
    ctx: &FamilyContext,
    local_addresses: &[IpAddr],
    from: IpAddr,
    hints: &SourceHints,
) -> Classified {
    if let Some(origin) = hints.assume {
        return Classified {
            origin,
            reason: "as given (--from-kind)".into(),
        };
    }
    let via = |matches: bool, what: String| match &hints.interface {
        Some(interface) if matches => Some(Classified {
            origin: Origin::LocalPod,
            reason: format!("this node reaches {from} through {interface}, {what}"),
        }),
        Some(interface) => Some(Classified {
            origin: Origin::Outside,
            reason: format!("this node reaches {from} through {interface}, not {what}"),
        }),
        None => None,
    };
    if from.is_loopback() || ctx.node_ips.contains(&from) || local_addresses.contains(&from) {
        return Classified {
            origin: Origin::Node,
            reason: format!("{from} is an address of this node"),
        };
    }
    match &ctx.local {
        Some(LocalTraffic::FromCidrs(cidrs)) => match cidrs.iter().find(|c| c.contains(&from)) {
            Some(cidr) => Classified {
                origin: Origin::LocalPod,
                reason: format!("{from} is in the local-traffic CIDR {cidr}"),
            },
            None => Classified {
                origin: Origin::Outside,
                reason: format!(
                    "{from} is in no local-traffic CIDR ({})",
                    join(cidrs.iter().map(IpNet::to_string))
                ),
            },
        },
        Some(LocalTraffic::FromInterface(name)) => via(
            hints.interface.as_deref() == Some(name.as_str()),
            format!("the pod bridge {name}"),
        )
        .unwrap_or_else(|| Classified {
            origin: Origin::Outside,
            reason: format!("assumed: local pods are told by interface {name:?}, not by address (pass --from-kind pod if it comes from there)"),
        }),
        Some(LocalTraffic::FromInterfacePrefix(prefix)) => via(
            hints
                .interface
                .as_deref()
                .is_some_and(|i| i.starts_with(prefix.as_str())),
            format!("a pod interface ({prefix}*)"),
        )
        .unwrap_or_else(|| Classified {
            origin: Origin::Outside,
            reason: format!("assumed: local pods are told by interfaces {prefix}*, not by address (pass --from-kind pod if it comes from one)"),
        }),
        None => Classified {
            origin: Origin::Outside,
            reason: "no local-traffic detector is configured (no cluster CIDR): pod traffic is not told apart".into(),
        },
    }
}

fn join(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(", ")
}

/// Whether `to` receives NodePort traffic on this node.
fn is_node_port_destination(ctx: &FamilyContext, local_addresses: &[IpAddr], to: IpAddr) -> bool {
    if to.is_loopback() {
        return ctx.localhost_nodeports;
    }
    match &ctx.nodeports {
        NodePortDestinations::AllLocal => {
            local_addresses.contains(&to) || ctx.node_ips.contains(&to)
        }
        NodePortDestinations::Addresses(ips) => ips.contains(&to),
    }
}

/// The service port whose frontend `packet` hits, with the frontend and its kind.
fn find_frontend<'a>(
    plan: &'a FamilyPlan,
    ctx: &FamilyContext,
    local_addresses: &[IpAddr],
    packet: &Packet,
    userspace: bool,
) -> Option<(&'a ServicePortPlan, Frontend, FrontendKind, Vec<String>)> {
    let address = Frontend::Address(packet.to, packet.protocol, packet.port);
    let node_port = Frontend::NodePort(packet.protocol, packet.port);
    // userspace mode's NodePort rules match every local destination (`--dst-type LOCAL`).
    let node_port_destination = match userspace {
        true => {
            packet.to.is_loopback()
                || local_addresses.contains(&packet.to)
                || ctx.node_ips.contains(&packet.to)
        }
        false => is_node_port_destination(ctx, local_addresses, packet.to),
    };
    let mut found = None;
    let mut others = Vec::new();
    for plan in plan.services.values() {
        let port = &plan.port;
        let frontends = frontends_of(port);
        let kind = if frontends.contains(&address) {
            if port.cluster_ip == packet.to {
                Some((address, FrontendKind::ClusterIp))
            } else if port.load_balancer_vips.contains(&packet.to) {
                Some((address, FrontendKind::LoadBalancerIp))
            } else {
                Some((address, FrontendKind::ExternalIp))
            }
        } else if node_port_destination && frontends.contains(&node_port) {
            Some((node_port, FrontendKind::NodePort))
        } else {
            None
        };
        let Some((frontend, kind)) = kind else {
            continue;
        };
        if plan.serves(&frontend) && found.is_none() {
            found = Some((plan.as_ref(), frontend, kind));
        } else {
            others.push(port.name.to_string());
        }
    }
    found.map(|(plan, frontend, kind)| (plan, frontend, kind, others))
}

/// Explains `packet` against one family's plan and context.
pub fn explain(
    plan: &FamilyPlan,
    ctx: &FamilyContext,
    local_addresses: &[IpAddr],
    packet: &Packet,
    hints: &SourceHints,
    unmatched: ModeRules,
) -> Explanation {
    let origin = classify(ctx, local_addresses, packet.from, hints);
    let to = Frontend::Address(packet.to, packet.protocol, packet.port).to_string();
    let mut out = Explanation {
        from: packet.from,
        to,
        family: ctx.family,
        origin,
        service_port: None,
        frontend: None,
        frontend_kind: None,
        verdict: Verdict::NotHandled,
        reason: String::new(),
        endpoint_set: None,
        endpoints: Vec::new(),
        affinity_timeout_seconds: None,
        masquerade: None,
        also_claimed_by: Vec::new(),
        reply_lost: false,
    };
    let Some((port_plan, frontend, kind, others)) =
        find_frontend(plan, ctx, local_addresses, packet, unmatched.userspace)
    else {
        explain_unmatched(plan, ctx, packet, unmatched, &mut out);
        return out;
    };
    let port = &port_plan.port;
    out.service_port = Some(port.name.to_string());
    out.frontend = Some(frontend);
    out.frontend_kind = Some(kind);
    out.also_claimed_by = others;
    if unmatched.userspace {
        explain_userspace(port_plan, kind, packet, &mut out);
        return out;
    }

    // loadBalancerSourceRanges filter new connections to load-balancer IPs before any NAT.
    if kind == FrontendKind::LoadBalancerIp && !port.load_balancer_source_ranges.is_empty() {
        let ranges = &port.load_balancer_source_ranges;
        let lb_source =
            ctx.lb_ips_allowed_as_sources(ranges) && port.load_balancer_vips.contains(&packet.from);
        if !lb_source && !ranges.iter().any(|r| r.contains(&packet.from)) {
            out.verdict = Verdict::Drop;
            out.reason = format!(
                "{} is outside loadBalancerSourceRanges ({})",
                packet.from,
                join(ranges.iter().map(IpNet::to_string))
            );
            return out;
        }
    }

    let origin = out.origin.origin;
    let (target, why) = match (kind, &port_plan.external) {
        (FrontendKind::ClusterIp, _) => (
            port_plan.internal,
            if port.internal_policy_local {
                "internalTrafficPolicy: Local"
            } else {
                "internalTrafficPolicy: Cluster"
            },
        ),
        (_, Some(ext)) if ext.policy_local && unmatched.ipvs => (
            ext.from_outside,
            "externalTrafficPolicy: Local (ipvs mode: one virtual server for every client, the cluster's endpoints when this node has none)",
        ),
        (_, Some(ext)) if ext.policy_local && origin != Origin::Outside && port_plan.has_endpoints => (
            ext.from_pods_and_node,
            "externalTrafficPolicy: Local, but traffic from this node and its pods short-circuits to the cluster endpoints",
        ),
        (_, Some(ext)) if ext.policy_local => (ext.from_outside, "externalTrafficPolicy: Local"),
        (_, Some(ext)) => (ext.from_outside, "externalTrafficPolicy: Cluster"),
        (_, None) => (port_plan.internal, "no external plan"),
    };
    match target {
        Target::Endpoints(set) => {
            let endpoints = port_plan.endpoints_for(target);
            out.verdict = Verdict::Dnat;
            out.endpoint_set = Some(set);
            out.reason = format!(
                "{why}: DNAT to one of {} {} endpoint{}",
                endpoints.len(),
                match set {
                    EndpointSet::Cluster => "cluster",
                    EndpointSet::Local => "local",
                },
                if endpoints.len() == 1 { "" } else { "s" }
            );
            out.endpoints = chosen(endpoints);
            out.affinity_timeout_seconds = port.session_affinity_timeout;
            let decided = match unmatched.ipvs {
                true => ipvs_masquerade(ctx, plan, port_plan, kind, origin, packet),
                false => masquerade(ctx, port_plan, kind, origin, packet),
            };
            out.reply_lost = unmatched.ipvs
                && kind.is_external()
                && origin == Origin::Outside
                && !decided.masquerade
                && set == EndpointSet::Cluster
                && endpoints.iter().any(|ep| !ep.is_local);
            if out.reply_lost {
                out.reason.push_str(
                    "; not masqueraded (externalTrafficPolicy: Local), so a remote endpoint's reply leaves from the pod's address and never reaches the client",
                );
            }
            out.masquerade = Some(decided);
        }
        Target::Drop => {
            out.verdict = Verdict::Drop;
            out.reason = format!(
                "{why} and this node has no local endpoint (endpoints exist on other nodes)"
            );
        }
        Target::Reject => {
            out.verdict = Verdict::Reject;
            out.reason =
                "the Service has no usable endpoint (none ready, none serving-terminating)".into();
        }
    }
    out
}

/// `endpoints`, each as likely as the others for a new connection.
fn chosen(endpoints: &[std::sync::Arc<crate::endpoints::Endpoint>]) -> Vec<ChosenEndpoint> {
    let percent = 100.0 / endpoints.len() as f64;
    endpoints
        .iter()
        .map(|ep| ChosenEndpoint {
            address: std::net::SocketAddr::new(ep.ip, ep.port).to_string(),
            percent: format!("{percent:.2}"),
            node: ep.node_name.as_ref().map(|n| n.to_string()),
            local: ep.is_local,
            terminating: ep.terminating,
        })
        .collect()
}

/// userspace mode's answer for a packet that hit `kind` of `port_plan` (see
/// [`ModeRules::userspace`]).
fn explain_userspace(
    port_plan: &ServicePortPlan,
    kind: FrontendKind,
    packet: &Packet,
    out: &mut Explanation,
) {
    let port = &port_plan.port;
    if port.protocol == Protocol::Sctp {
        out.verdict = Verdict::NotHandled;
        out.reason = "SCTP is not relayed in userspace mode (upstream's never was)".into();
        return;
    }
    let ranges = &port.load_balancer_source_ranges;
    if kind == FrontendKind::LoadBalancerIp
        && !ranges.is_empty()
        && !ranges.iter().any(|r| r.contains(&packet.from))
    {
        out.verdict = Verdict::NotHandled;
        out.reason = format!(
            "{} is outside loadBalancerSourceRanges ({}): not redirected to the relay, routed like any other packet",
            packet.from,
            join(ranges.iter().map(IpNet::to_string))
        );
        return;
    }
    let (target, why) = match (kind, &port_plan.external) {
        (FrontendKind::ClusterIp, _) | (_, None) => (
            port_plan.internal,
            if port.internal_policy_local {
                "the ClusterIP listener, internalTrafficPolicy: Local"
            } else {
                "the ClusterIP listener, internalTrafficPolicy: Cluster"
            },
        ),
        (_, Some(ext)) => (
            ext.from_outside,
            if ext.policy_local {
                "the listener of external frontends (every client alike), externalTrafficPolicy: Local"
            } else {
                "the listener of external frontends, externalTrafficPolicy: Cluster"
            },
        ),
    };
    let Target::Endpoints(set) = target else {
        out.verdict = Verdict::Reject;
        out.reason = match target {
            Target::Drop => format!(
                "{why}: this node has no local endpoint, so the listener has nothing to relay to and refuses"
            ),
            _ => format!("{why}: the Service has no usable endpoint, so the listener refuses"),
        };
        return;
    };
    let endpoints = port_plan.endpoints_for(target);
    out.verdict = Verdict::Relay;
    out.endpoint_set = Some(set);
    out.reason = format!(
        "{why}: redirected to the proxy, which relays to one of {} endpoint{} in turn (round robin; a failed connect moves on to the next)",
        endpoints.len(),
        if endpoints.len() == 1 { "" } else { "s" }
    );
    out.endpoints = chosen(endpoints);
    out.affinity_timeout_seconds = port.session_affinity_timeout;
    out.masquerade = Some(Masquerade {
        masquerade: true,
        reason: "the proxy connects to the endpoint itself: the endpoint sees this node's address, never the client's".into(),
    });
}

/// ipvs mode's masquerade decision (upstream's ipset rules in `KUBE-SERVICES`,
/// `KUBE-NODE-PORT`, `KUBE-LOAD-BALANCER`; hairpin by `KUBE-LOOP-BACK`).
fn ipvs_masquerade(
    ctx: &FamilyContext,
    all: &FamilyPlan,
    plan: &ServicePortPlan,
    kind: FrontendKind,
    origin: Origin,
    packet: &Packet,
) -> Masquerade {
    let (masquerade, reason) = if kind.is_external() {
        match plan.external.as_ref() {
            Some(ext) if ext.policy_local => (
                false,
                "externalTrafficPolicy: Local: the frontend is in a *-LOCAL ipset, never masqueraded",
            ),
            _ => (
                true,
                "externalTrafficPolicy: Cluster: external frontends are masqueraded",
            ),
        }
    } else if ctx.masquerade_all {
        (
            true,
            "masqueradeAll: every ClusterIP connection is masqueraded",
        )
    } else {
        match (&ctx.local, origin) {
            (Some(_), Origin::LocalPod) => (false, "a local pod's ClusterIP traffic keeps its source"),
            (Some(_), _) => (true, "ClusterIP traffic from outside the pod network is masqueraded"),
            // `KUBE-CLUSTER-IP src,dst`: a source that is a ClusterIP with the destination's
            // port, which is how the node's own connections leave (from the ClusterIP on
            // kube-ipvs0).
            (None, _)
                if all.services.values().any(|p| {
                    p.port.cluster_ip == packet.from
                        && p.port.port == packet.port
                        && p.port.protocol == packet.protocol
                }) =>
            {
                (
                    true,
                    "no local-traffic detector: a connection from a ClusterIP (the node's own, leaving from kube-ipvs0) is masqueraded",
                )
            }
            (None, _) => (false, "no local-traffic detector: ClusterIP traffic is not masqueraded"),
        }
    };
    Masquerade {
        masquerade,
        reason: reason.to_string(),
    }
}

/// The masquerade decision for a DNATed packet.
fn masquerade(
    ctx: &FamilyContext,
    plan: &ServicePortPlan,
    kind: FrontendKind,
    origin: Origin,
    packet: &Packet,
) -> Masquerade {
    let hairpin = "; a client that is itself the chosen endpoint (hairpin) is always masqueraded";
    let external = plan.external.as_ref();
    let (masquerade, reason) = if kind.is_external() {
        match external {
            Some(ext) if !ext.policy_local => (
                true,
                "external traffic with externalTrafficPolicy: Cluster is always masqueraded"
                    .to_string(),
            ),
            _ => match origin {
                Origin::Node => (
                    true,
                    "this node's own traffic to an external destination is masqueraded".into(),
                ),
                Origin::LocalPod => (
                    false,
                    "pod traffic keeps its source (externalTrafficPolicy: Local short-circuit)"
                        .into(),
                ),
                Origin::Outside => (
                    false,
                    "externalTrafficPolicy: Local keeps the client's source address".into(),
                ),
            },
        }
    } else if ctx.masquerade_all {
        (
            true,
            "masqueradeAll: every ClusterIP connection is masqueraded".into(),
        )
    } else {
        match (&ctx.local, origin) {
            (None, _) => (
                false,
                "no local-traffic detector: ClusterIP traffic is not masqueraded".into(),
            ),
            (Some(_), Origin::LocalPod) => (
                false,
                "a local pod's ClusterIP traffic keeps its source".into(),
            ),
            (Some(_), _) => (
                true,
                "ClusterIP traffic from outside the pod network is masqueraded".into(),
            ),
        }
    };
    let self_endpoint = plan
        .endpoints_for(match kind {
            FrontendKind::ClusterIp => plan.internal,
            _ => Target::Endpoints(EndpointSet::Cluster),
        })
        .iter()
        .any(|ep| ep.ip == packet.from);
    Masquerade {
        masquerade,
        reason: if self_endpoint && !masquerade {
            format!("{reason}{hairpin}")
        } else {
            reason
        },
    }
}

fn explain_unmatched(
    plan: &FamilyPlan,
    ctx: &FamilyContext,
    packet: &Packet,
    rules: ModeRules,
    out: &mut Explanation,
) {
    let cluster_ip_of = plan
        .services
        .values()
        .find(|p| p.port.cluster_ip == packet.to)
        .map(|p| p.port.name.service.to_string());
    match cluster_ip_of {
        Some(service) if rules.reject_unknown_cluster_ip_ports => {
            out.verdict = Verdict::Reject;
            out.reason = format!(
                "{} is the ClusterIP of {service}, which has no {} port {}: rejected",
                packet.to,
                packet.protocol.upper(),
                packet.port
            );
        }
        Some(service) => {
            out.reason = format!(
                "{} is the ClusterIP of {service}, which has no {} port {}; no rule matches",
                packet.to,
                packet.protocol.upper(),
                packet.port
            );
        }
        None => match ctx.service_cidrs.iter().find(|c| c.contains(&packet.to)) {
            Some(cidr) if rules.drop_unallocated_service_ips => {
                out.verdict = Verdict::Drop;
                out.reason = format!(
                    "{} is in the ServiceCIDR {cidr} but no Service holds it: dropped",
                    packet.to
                );
            }
            _ => {
                out.reason = format!(
                    "{} is no frontend of any Service on this node: kube-proxy does not touch the packet",
                    packet.to
                );
            }
        },
    }
}

#[cfg(test)]
mod tests;
