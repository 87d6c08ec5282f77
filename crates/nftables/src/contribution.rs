//! What one service port contributes to the ruleset: set/map elements, and — only for
//! Services that need per-connection logic (ClientIP affinity, externalTrafficPolicy Local) —
//! chains and affinity sets named as upstream names them.
//!
//! Every decision comes from the plan; this module only translates it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use kube_proxy_model::plan::{EndpointSet, ServicePortPlan, Target};
use kube_proxy_model::{Endpoint, Frontend};

use crate::context::Context;
use crate::elements::{quote, Key, SetName, Value};
use crate::names;

/// A chain owned by one service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainDef {
    pub name: Arc<str>,
    pub rules: Vec<String>,
}

/// A dynamic set remembering ClientIP affinity for one endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AffinitySet {
    pub name: Arc<str>,
    pub timeout_seconds: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contribution {
    pub elements: Vec<(SetName, Key, Value)>,
    pub chains: Vec<ChainDef>,
    pub affinity_sets: Vec<AffinitySet>,
}

/// Whether a port needs per-service chains.
pub fn needs_chains(plan: &ServicePortPlan) -> bool {
    plan.port.session_affinity_timeout.is_some()
        || plan.external.as_ref().is_some_and(|e| e.policy_local)
}

/// The frontend an element is for, if it is for one.
fn frontend_of(key: &Key) -> Option<Frontend> {
    match key {
        Key::Frontend(ip, proto, port) | Key::Allow(ip, proto, port, _) => {
            Some(Frontend::Address(*ip, *proto, *port))
        }
        Key::NodePort(proto, port) => Some(Frontend::NodePort(*proto, *port)),
        Key::Addr(_) | Key::Hairpin(..) => None,
    }
}

/// What `plan` contributes, without the elements of frontends the plan gave to another port.
pub fn contribute(plan: &ServicePortPlan, ctx: &Context) -> Contribution {
    let mut c = contribute_all(plan, ctx);
    if !plan.refused.is_empty() {
        c.elements
            .retain(|(_, key, _)| frontend_of(key).is_none_or(|f| plan.serves(&f)));
    }
    c
}

fn contribute_all(plan: &ServicePortPlan, ctx: &Context) -> Contribution {
    let mut c = Contribution::default();
    let port = &plan.port;
    let proto = port.protocol;
    let cluster_frontend = Key::Frontend(port.cluster_ip, proto, port.port);
    c.elements
        .push((SetName::ClusterIps, Key::Addr(port.cluster_ip), Value::None));

    let external_frontends: Vec<Key> = port
        .external_ips
        .iter()
        .chain(port.load_balancer_vips.iter())
        .map(|ip| Key::Frontend(*ip, proto, port.port))
        .collect();
    let node_port = port.node_port.map(|np| Key::NodePort(proto, np.get()));

    if needs_chains(plan) {
        let chains = SpecialChains::new(plan);
        // ClusterIP traffic.
        match plan.internal {
            Target::Endpoints(set) => {
                let chain = chains.chain_for(set);
                c.elements
                    .push((SetName::ServiceIps, cluster_frontend, Value::Goto(chain)));
            }
            other => push_verdict(&mut c, other, cluster_frontend, false),
        }
        // External traffic goes through the external chain whenever the Service has
        // endpoints anywhere (so pods and the node can short-circuit); outside clients that
        // fall through it un-DNATed meet the DROP/REJECT sets.
        if let Some(ext) = &plan.external {
            if plan.has_endpoints {
                let goto = Value::Goto(chains.external.clone());
                for f in &external_frontends {
                    c.elements
                        .push((SetName::ServiceIps, f.clone(), goto.clone()));
                }
                if let Some(np) = &node_port {
                    c.elements
                        .push((SetName::ServiceNodePorts, np.clone(), goto.clone()));
                }
            }
            if !matches!(ext.from_outside, Target::Endpoints(_)) {
                for f in &external_frontends {
                    push_verdict(&mut c, ext.from_outside, f.clone(), false);
                }
                if let Some(np) = &node_port {
                    push_verdict(&mut c, ext.from_outside, np.clone(), true);
                }
            }
        }
        chains.render(plan, ctx, &mut c);
    } else {
        match plan.internal {
            Target::Endpoints(set) => push_dnat(
                &mut c,
                &cluster_frontend,
                plan.endpoints_for(Target::Endpoints(set)),
            ),
            other => push_verdict(&mut c, other, cluster_frontend, false),
        }
        if let Some(ext) = &plan.external {
            match ext.from_outside {
                Target::Endpoints(set) => {
                    let eps = plan.endpoints_for(Target::Endpoints(set));
                    for f in &external_frontends {
                        c.elements
                            .push((SetName::ExternalMasquerade, f.clone(), Value::None));
                        push_dnat(&mut c, f, eps);
                    }
                    if let Some(np) = &node_port {
                        c.elements
                            .push((SetName::NodePortMasquerade, np.clone(), Value::None));
                        push_dnat(&mut c, np, eps);
                    }
                }
                other => {
                    for f in &external_frontends {
                        push_verdict(&mut c, other, f.clone(), false);
                    }
                    if let Some(np) = &node_port {
                        push_verdict(&mut c, other, np.clone(), true);
                    }
                }
            }
        }
    }

    // loadBalancerSourceRanges: only load-balancer IPs are filtered.
    if !port.load_balancer_source_ranges.is_empty() {
        let node_ip_in_range = ctx.lb_ips_allowed_as_sources(&port.load_balancer_source_ranges);
        for vip in &port.load_balancer_vips {
            c.elements.push((
                SetName::FirewallIps,
                Key::Frontend(*vip, proto, port.port),
                Value::None,
            ));
            for range in &port.load_balancer_source_ranges {
                c.elements.push((
                    SetName::FirewallAllow,
                    Key::Allow(*vip, proto, port.port, *range),
                    Value::None,
                ));
            }
            // LBs that route traffic back to the node with the LB IP as source.
            if node_ip_in_range {
                for source in &port.load_balancer_vips {
                    let host = ipnet::IpNet::from(*source);
                    c.elements.push((
                        SetName::FirewallAllow,
                        Key::Allow(*vip, proto, port.port, host),
                        Value::None,
                    ));
                }
            }
        }
    }

    for ep in plan.reachable_endpoints.iter().filter(|e| e.is_local) {
        c.elements.push((
            SetName::HairpinConnections,
            Key::Hairpin(ep.ip, proto, ep.port),
            Value::None,
        ));
    }
    c
}

/// Data-path DNAT of `frontend` (an address frontend or a NodePort) to `endpoints`: membership
/// of `dnat-N` and the i-th endpoint in slot map i.
fn push_dnat(c: &mut Contribution, frontend: &Key, endpoints: &[Arc<Endpoint>]) {
    let n = endpoints.len() as u32;
    let (count_set, slot_set): (SetName, fn(u32) -> SetName) = match frontend {
        Key::Frontend(..) => (SetName::Dnat(n), SetName::Backends),
        Key::NodePort(..) => (SetName::NodePortDnat(n), SetName::NodePortBackends),
        _ => unreachable!("only frontends are DNATed"),
    };
    c.elements.push((count_set, frontend.clone(), Value::None));
    for (i, ep) in endpoints.iter().enumerate() {
        c.elements.push((
            slot_set(i as u32),
            frontend.clone(),
            Value::Endpoint(ep.ip, ep.port),
        ));
    }
}

fn push_verdict(c: &mut Contribution, target: Target, key: Key, node_port: bool) {
    let set = match (target, node_port) {
        (Target::Drop, false) => SetName::NoEndpointDrop,
        (Target::Reject, false) => SetName::NoEndpointReject,
        (Target::Drop, true) => SetName::NodePortNoEndpointDrop,
        (Target::Reject, true) => SetName::NodePortNoEndpointReject,
        (Target::Endpoints(_), _) => return,
    };
    c.elements.push((set, key, Value::None));
}

/// Per-service chains for ports that need them.
struct SpecialChains {
    service: Arc<str>,
    local: Arc<str>,
    external: Arc<str>,
}

impl SpecialChains {
    fn new(plan: &ServicePortPlan) -> Self {
        let name = &plan.port.name;
        SpecialChains {
            service: names::service_chain(name).into(),
            local: names::local_chain(name).into(),
            external: names::external_chain(name).into(),
        }
    }

    fn chain_for(&self, set: EndpointSet) -> Arc<str> {
        match set {
            EndpointSet::Cluster => self.service.clone(),
            EndpointSet::Local => self.local.clone(),
        }
    }

    fn render(&self, plan: &ServicePortPlan, ctx: &Context, c: &mut Contribution) {
        let affinity = plan.port.session_affinity_timeout;
        let mut endpoint_chains_needed: Vec<&Arc<Endpoint>> = Vec::new();
        for (name, endpoints) in [
            (&self.service, &plan.cluster_endpoints),
            (&self.local, &plan.local_endpoints),
        ] {
            if endpoints.is_empty() {
                continue;
            }
            let rules = match affinity {
                None => dnat_cascade(plan, ctx, endpoints),
                Some(_) => {
                    endpoint_chains_needed.extend(endpoints.iter());
                    affinity_rules(plan, ctx, endpoints)
                }
            };
            c.chains.push(ChainDef {
                name: name.clone(),
                rules,
            });
        }
        if let Some(timeout) = affinity {
            let mut seen = std::collections::BTreeSet::new();
            for ep in endpoint_chains_needed {
                if !seen.insert(ep.key()) {
                    continue;
                }
                let set: Arc<str> = names::affinity_set(&plan.port.name, ep.ip, ep.port).into();
                c.affinity_sets.push(AffinitySet {
                    name: set.clone(),
                    timeout_seconds: timeout,
                });
                c.chains.push(ChainDef {
                    name: names::endpoint_chain(&plan.port.name, ep.ip, ep.port).into(),
                    rules: vec![
                        format!("update @{} {{ {} saddr }}", quote(&set), ctx.ip()),
                        dnat_rule(plan, ctx, ep),
                    ],
                });
            }
        }
        if let Some(ext) = &plan.external {
            if !plan.has_endpoints {
                return;
            }
            let mark = ctx.mark_text();
            let service = quote(&self.service);
            let mut rules = Vec::new();
            if ext.policy_local {
                if let Some(pods) = ctx.local_match(false) {
                    rules.push(format!(
                        "{pods} goto {service} comment \"short-circuit pod traffic\""
                    ));
                }
                rules.push(format!("fib saddr type local meta mark set meta mark or {mark} comment \"masquerade local traffic\""));
                rules.push(format!(
                    "fib saddr type local goto {service} comment \"short-circuit local traffic\""
                ));
                if !plan.local_endpoints.is_empty() {
                    rules.push(format!("goto {}", quote(&self.local)));
                }
            } else {
                rules.push(format!(
                    "meta mark set meta mark or {mark} comment \"masquerade\""
                ));
                rules.push(format!("goto {service}"));
            }
            c.chains.push(ChainDef {
                name: self.external.clone(),
                rules,
            });
        }
    }
}

fn socket(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

fn dnat_rule(plan: &ServicePortPlan, ctx: &Context, ep: &Endpoint) -> String {
    format!(
        "meta l4proto {} dnat {} to {}",
        plan.port.protocol.lower(),
        ctx.ip(),
        socket(ep.ip, ep.port)
    )
}

/// Uniform choice without anonymous sets: rule i matches with probability 1/(N-i).
fn dnat_cascade(plan: &ServicePortPlan, ctx: &Context, endpoints: &[Arc<Endpoint>]) -> Vec<String> {
    let n = endpoints.len();
    endpoints
        .iter()
        .enumerate()
        .map(|(i, ep)| {
            if i + 1 == n {
                dnat_rule(plan, ctx, ep)
            } else {
                format!(
                    "numgen random mod {} == 0 {}",
                    n - i,
                    dnat_rule(plan, ctx, ep)
                )
            }
        })
        .collect()
}

fn affinity_rules(
    plan: &ServicePortPlan,
    ctx: &Context,
    endpoints: &[Arc<Endpoint>],
) -> Vec<String> {
    let name = &plan.port.name;
    let mut rules: Vec<String> = endpoints
        .iter()
        .map(|ep| {
            format!(
                "{} saddr @{} goto {}",
                ctx.ip(),
                quote(&names::affinity_set(name, ep.ip, ep.port)),
                quote(&names::endpoint_chain(name, ep.ip, ep.port))
            )
        })
        .collect();
    let n = endpoints.len();
    for (i, ep) in endpoints.iter().enumerate() {
        let chain = quote(&names::endpoint_chain(name, ep.ip, ep.port));
        if i + 1 == n {
            rules.push(format!("goto {chain}"));
        } else {
            rules.push(format!("numgen random mod {} == 0 goto {chain}", n - i));
        }
    }
    rules
}
