//! The plan: for each service port of one IP family, kube-proxy's decisions — which endpoint
//! set each kind of traffic uses, and DROP or REJECT where there is none (§9 of the
//! reference). Dataplanes render the plan; they make no policy decision of their own, so
//! nftables and iptables cannot disagree about a packet.
//!
//! The plan is updated per Service: a change to one Service (or its slices) recomputes only
//! that Service's ports, which is what keeps a sync cheap at 50k Services.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::endpoints::{merge_slices, Endpoint};
use crate::frontends::{frontends_of, Claims, Frontend, Refused};
use crate::names::{IpFamily, NamespacedName, ServicePortName};
use crate::service::ServicePort;
use crate::state::ClusterState;
use crate::topology::{categorize_endpoints, NodeTopology, SelectionGates, TopologyMode};

/// Which categorised endpoint list a kind of traffic is sent to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum EndpointSet {
    /// `cluster` endpoints: cluster-wide, topology-filtered.
    Cluster,
    /// `local` endpoints: on this node only.
    Local,
}

/// Where one kind of traffic goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Target {
    /// DNAT to a random endpoint of this set (never empty when chosen).
    Endpoints(EndpointSet),
    /// The Service has usable endpoints, but none for this traffic (a Local policy with no
    /// local endpoint): the packet is dropped.
    Drop,
    /// The Service has no usable endpoint at all: ICMP port unreachable.
    Reject,
}

/// How external traffic (NodePort, externalIPs, load-balancer VIPs) is handled.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ExternalPlan {
    /// `externalTrafficPolicy: Local`.
    pub policy_local: bool,
    /// For clients that are neither local pods nor this node. With eTP Cluster this is the
    /// cluster set, masqueraded; with eTP Local the local set, not masqueraded, or DROP/REJECT.
    pub from_outside: Target,
    /// For local pods (when a local-traffic detector is configured) and for this node: with
    /// eTP Local they short-circuit to the cluster set (the node's own traffic masqueraded);
    /// with eTP Cluster they are handled as outside clients.
    pub from_pods_and_node: Target,
}

/// Decisions for one service port in one family.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ServicePortPlan {
    pub port: Arc<ServicePort>,
    pub cluster_endpoints: Vec<Arc<Endpoint>>,
    pub local_endpoints: Vec<Arc<Endpoint>>,
    /// `cluster ∪ local`: endpoints traffic can reach (conntrack cleanup, hairpin).
    pub reachable_endpoints: Vec<Arc<Endpoint>>,
    /// Any usable endpoint anywhere in the cluster (REJECT versus DROP).
    pub has_endpoints: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topology: Option<TopologyMode>,
    /// ClusterIP traffic (from anywhere).
    pub internal: Target,
    /// `None` when the port has no NodePort, external IP or load-balancer VIP.
    pub external: Option<ExternalPlan>,
    /// Frontends of this port that another service port owns (`frontends`): dataplanes
    /// render none of this port's traffic for them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<Refused>,
}

impl ServicePortPlan {
    /// Decides every kind of traffic for one port from its categorised endpoints.
    pub fn decide(
        port: Arc<ServicePort>,
        endpoints: &[Arc<Endpoint>],
        node: NodeTopology<'_>,
        gates: SelectionGates,
    ) -> ServicePortPlan {
        Self::decide_with(port, endpoints, node, gates, LocalPolicy::Strict)
    }

    /// [`decide`](Self::decide) under a mode's reading of the Local traffic policies.
    pub fn decide_with(
        port: Arc<ServicePort>,
        endpoints: &[Arc<Endpoint>],
        node: NodeTopology<'_>,
        gates: SelectionGates,
        local_policy: LocalPolicy,
    ) -> ServicePortPlan {
        let categorized = categorize_endpoints(endpoints, &port, node, gates);
        if local_policy == LocalPolicy::FallBackToCluster {
            return Self::decide_falling_back(port, categorized);
        }
        let has_endpoints = categorized.has_any;
        let set_or = |set: EndpointSet, list: &[Arc<Endpoint>], otherwise: Target| {
            if list.is_empty() {
                otherwise
            } else {
                Target::Endpoints(set)
            }
        };
        // No usable endpoint anywhere: REJECT; endpoints elsewhere only: DROP.
        let empty = if has_endpoints {
            Target::Drop
        } else {
            Target::Reject
        };
        let internal = if port.internal_policy_local {
            set_or(EndpointSet::Local, &categorized.local, empty)
        } else {
            set_or(EndpointSet::Cluster, &categorized.cluster, Target::Reject)
        };
        let external = port.externally_accessible().then(|| {
            let cluster = set_or(EndpointSet::Cluster, &categorized.cluster, Target::Reject);
            if port.external_traffic_local() {
                ExternalPlan {
                    policy_local: true,
                    from_outside: set_or(EndpointSet::Local, &categorized.local, empty),
                    from_pods_and_node: cluster,
                }
            } else {
                ExternalPlan {
                    policy_local: false,
                    from_outside: cluster,
                    from_pods_and_node: cluster,
                }
            }
        });
        ServicePortPlan {
            cluster_endpoints: categorized.cluster,
            local_endpoints: categorized.local,
            reachable_endpoints: categorized.all_reachable,
            has_endpoints,
            topology: categorized.topology,
            internal,
            external,
            refused: Vec::new(),
            port,
        }
    }

    /// Upstream's ipvs mode: one virtual server per frontend serves every client, so a Local
    /// policy sends everyone (outside clients, pods, the node) to the local endpoints, and
    /// to the cluster endpoints when there is none here (kubernetes#97081: pods keep working;
    /// outside clients' replies then leave from the pod unmasqueraded and are lost). Nothing
    /// is dropped; a port without a reachable endpoint is refused.
    fn decide_falling_back(
        port: Arc<ServicePort>,
        categorized: crate::topology::Categorized,
    ) -> ServicePortPlan {
        let pick = |local: bool| {
            if local && !categorized.local.is_empty() {
                Target::Endpoints(EndpointSet::Local)
            } else if !categorized.cluster.is_empty() {
                Target::Endpoints(EndpointSet::Cluster)
            } else {
                Target::Reject
            }
        };
        let internal = pick(port.internal_policy_local);
        let external = port.externally_accessible().then(|| {
            let target = pick(port.external_traffic_local());
            ExternalPlan {
                policy_local: port.external_traffic_local(),
                from_outside: target,
                from_pods_and_node: target,
            }
        });
        ServicePortPlan {
            cluster_endpoints: categorized.cluster,
            local_endpoints: categorized.local,
            reachable_endpoints: categorized.all_reachable,
            has_endpoints: categorized.has_any,
            topology: categorized.topology,
            internal,
            external,
            refused: Vec::new(),
            port,
        }
    }

    /// Whether this port renders `frontend` (it owns it, or nobody contests it).
    pub fn serves(&self, frontend: &Frontend) -> bool {
        !self.refused.iter().any(|r| r.frontend == *frontend)
    }

    /// The endpoints behind a target (empty for DROP/REJECT).
    pub fn endpoints_for(&self, target: Target) -> &[Arc<Endpoint>] {
        match target {
            Target::Endpoints(EndpointSet::Cluster) => &self.cluster_endpoints,
            Target::Endpoints(EndpointSet::Local) => &self.local_endpoints,
            Target::Drop | Target::Reject => &[],
        }
    }

    /// eTP Local without local endpoints while endpoints exist elsewhere (the
    /// `sync_proxy_rules_no_local_endpoints_total{traffic_policy="external"}` condition).
    pub fn external_without_local_endpoints(&self) -> bool {
        self.has_endpoints
            && self
                .external
                .as_ref()
                .is_some_and(|e| e.policy_local && self.local_endpoints.is_empty())
    }

    /// iTP Local without local endpoints while endpoints exist elsewhere.
    pub fn internal_without_local_endpoints(&self) -> bool {
        self.has_endpoints && self.port.internal_policy_local && self.local_endpoints.is_empty()
    }
}

/// The desired state of one IP family: every service port's plan, in a stable order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FamilyPlan {
    pub services: BTreeMap<ServicePortName, Arc<ServicePortPlan>>,
    /// Who claims each frontend (the owner of a contested one is decided from it).
    claims: Claims,
}

/// Settings the planner needs besides the cluster state.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlanContext {
    pub gates: SelectionGates,
    pub local_policy: LocalPolicy,
}

/// How a mode reads the Local traffic policies when this node has no local endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LocalPolicy {
    /// Drop (iptables and nftables modes; §2.4 of the reference).
    #[default]
    Strict,
    /// Use the cluster endpoints for every client (upstream's ipvs mode).
    FallBackToCluster,
}

impl FamilyPlan {
    /// Recomputes the ports of `services` (all Services when `full`) from `state`, and returns
    /// the names of the ports whose plan was added, changed or removed.
    pub fn update(
        &mut self,
        state: &ClusterState,
        family: IpFamily,
        services: &BTreeSet<NamespacedName>,
        full: bool,
        ctx: PlanContext,
    ) -> BTreeSet<ServicePortName> {
        let mut changed = BTreeSet::new();
        if full {
            let mut fresh = FamilyPlan::default();
            let mut contested = BTreeSet::new();
            for name in state.service_names() {
                contested.extend(fresh.insert_service(state, family, name, ctx));
            }
            fresh.settle_claims(&contested);
            for (name, plan) in &fresh.services {
                if self.services.get(name) != Some(plan) {
                    changed.insert(name.clone());
                }
            }
            for name in self.services.keys() {
                if !fresh.services.contains_key(name) {
                    changed.insert(name.clone());
                }
            }
            *self = fresh;
            return changed;
        }
        // Ports as they were before this update, for every port it may touch.
        let mut before: BTreeMap<ServicePortName, Option<Arc<ServicePortPlan>>> = BTreeMap::new();
        let mut frontends = BTreeSet::new();
        for service in services {
            for (name, plan) in self.remove_service(service) {
                frontends.extend(frontends_of(&plan.port));
                before.insert(name, Some(plan));
            }
            frontends.extend(self.insert_service(state, family, service, ctx));
            for (name, _) in self.ports_of(service) {
                before.entry(name.clone()).or_insert(None);
            }
        }
        // Ports of other Services that claim a frontend whose claimants changed.
        for frontend in &frontends {
            for name in self.claims.claimants(frontend) {
                if !before.contains_key(name) {
                    before.insert(name.clone(), self.services.get(name).cloned());
                }
            }
        }
        self.settle_claims(&frontends);
        for (name, old) in before {
            if self.services.get(&name) != old.as_ref() {
                changed.insert(name);
            }
        }
        changed
    }

    /// Recomputes which frontends each claimant of `frontends` is refused.
    fn settle_claims(&mut self, frontends: &BTreeSet<Frontend>) {
        let claimants: BTreeSet<ServicePortName> = frontends
            .iter()
            .flat_map(|f| self.claims.claimants(f))
            .cloned()
            .collect();
        for name in claimants {
            let Some(plan) = self.services.get_mut(&name) else {
                continue;
            };
            let refused = self.claims.refused(&name, &frontends_of(&plan.port));
            if plan.refused != refused {
                Arc::make_mut(plan).refused = refused;
            }
        }
    }

    fn ports_of<'a>(
        &'a self,
        service: &'a NamespacedName,
    ) -> impl Iterator<Item = (&'a ServicePortName, &'a Arc<ServicePortPlan>)> + 'a {
        self.services
            .range(service_range_start(service)..)
            .take_while(move |(name, _)| &name.service == service)
    }

    /// Removes the ports of `service` and their claims.
    fn remove_service(
        &mut self,
        service: &NamespacedName,
    ) -> BTreeMap<ServicePortName, Arc<ServicePortPlan>> {
        let keys: Vec<ServicePortName> = self.ports_of(service).map(|(k, _)| k.clone()).collect();
        let removed: BTreeMap<ServicePortName, Arc<ServicePortPlan>> = keys
            .into_iter()
            .filter_map(|k| self.services.remove(&k).map(|v| (k, v)))
            .collect();
        for (name, plan) in &removed {
            self.claims.remove(name, &frontends_of(&plan.port));
        }
        removed
    }

    /// Plans the ports of `service` and records their claims; returns their frontends.
    fn insert_service(
        &mut self,
        state: &ClusterState,
        family: IpFamily,
        service: &NamespacedName,
        ctx: PlanContext,
    ) -> Vec<Frontend> {
        let ports: Vec<&Arc<ServicePort>> = state
            .service_ports(service)
            .iter()
            .filter(|p| p.family == family)
            .collect();
        if ports.is_empty() {
            return Vec::new();
        }
        let node_name = state.node_name();
        let endpoints = merge_slices(
            state.slices_of(service).filter(|s| s.family == family),
            node_name,
        );
        let node = NodeTopology {
            node_name,
            zone: state.node().and_then(|n| n.zone.as_deref()),
        };
        let mut all = Vec::new();
        for port in ports {
            let eps = endpoints.get(&port.name).map(Vec::as_slice).unwrap_or(&[]);
            let plan =
                ServicePortPlan::decide_with(port.clone(), eps, node, ctx.gates, ctx.local_policy);
            let frontends = frontends_of(port);
            self.claims.add(&port.name, &frontends);
            all.extend(frontends);
            self.services.insert(port.name.clone(), Arc::new(plan));
        }
        all
    }
}

/// The smallest `ServicePortName` of a Service, to range over its ports.
fn service_range_start(service: &NamespacedName) -> ServicePortName {
    ServicePortName {
        service: service.clone(),
        port: "".into(),
        protocol: crate::names::Protocol::Tcp,
    }
}

#[cfg(test)]
mod tests;
