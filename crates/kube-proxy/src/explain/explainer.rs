//! A dataplane that programs nothing: at its first sync of the packet's family it reads the
//! plan it is handed (the same plan, node view and ServiceCIDRs the kernel dataplanes get)
//! back for one packet, and lists the kernel objects the active mode renders for it.

use std::sync::{Arc, Mutex};

use kube_proxy_model::context::{FamilyContext, ProxyPolicy};
use kube_proxy_model::dataplane::{Dataplane, SyncError, SyncInput, SyncReport};
use kube_proxy_model::explain::{
    explain, Explanation, FrontendKind, ModeRules, Packet, SourceHints,
};
use kube_proxy_userspace::desired::Class;

/// The kernel objects of the packet's path, per mode.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(tag = "mode", content = "objects", rename_all = "kebab-case")]
pub enum Objects {
    Nftables(Vec<kube_proxy_nftables::explain::Object>),
    Iptables(Vec<kube_proxy_iptables::explain::Rule>),
    Ipvs(Vec<kube_proxy_ipvs::explain::Object>),
    /// The redirect rules to the listener (its port chosen at run time, left open).
    Userspace(Vec<String>),
}

/// What explain found, before the kernel is checked.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Found {
    pub explanation: Explanation,
    pub kernel_objects: Objects,
}

/// Which mode's rules to read the plan back with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Nftables,
    Iptables,
    Ipvs,
    Userspace,
}

pub struct Explainer {
    pub mode: Mode,
    pub policy: ProxyPolicy,
    /// `bindAddress` (userspace mode's listeners and DNAT targets).
    pub bind_address: Option<std::net::IpAddr>,
    /// ipvs mode's scheduler (the virtual servers' settings).
    pub scheduling: kube_proxy_ipvs::desired::Scheduling,
    pub packet: Packet,
    pub hints: SourceHints,
    pub found: Arc<Mutex<Option<Found>>>,
}

impl Dataplane for Explainer {
    fn name(&self) -> &'static str {
        "explain"
    }

    fn sync(&mut self, input: SyncInput<'_>) -> Result<SyncReport, SyncError> {
        let report = SyncReport {
            service_ports: input.plan.services.len(),
            transactions: 0,
            ..Default::default()
        };
        if input.family != self.packet.family() {
            return Ok(report);
        }
        let ctx = FamilyContext::resolve(&self.policy, input.family, input.node)
            .with_service_cidrs(input.service_cidrs);
        let unmatched = match self.mode {
            Mode::Nftables => ModeRules {
                reject_unknown_cluster_ip_ports: true,
                drop_unallocated_service_ips: true,
                ..Default::default()
            },
            Mode::Iptables => ModeRules::default(),
            Mode::Ipvs => ModeRules {
                reject_unknown_cluster_ip_ports: true,
                ipvs: true,
                ..Default::default()
            },
            Mode::Userspace => ModeRules {
                userspace: true,
                ..Default::default()
            },
        };
        let explanation = explain(
            input.plan,
            &ctx,
            &input.node.local_addresses,
            &self.packet,
            &self.hints,
            unmatched,
        );
        let port_plan = explanation.service_port.as_ref().and_then(|name| {
            input
                .plan
                .services
                .values()
                .find(|p| &p.port.name.to_string() == name)
        });
        let kernel_objects = match (self.mode, port_plan, explanation.frontend) {
            (Mode::Nftables, Some(plan), Some(frontend)) => {
                Objects::Nftables(kube_proxy_nftables::explain::objects(
                    plan,
                    &kube_proxy_nftables::context::Context(ctx),
                    &frontend,
                ))
            }
            (Mode::Iptables, Some(plan), Some(frontend)) => {
                Objects::Iptables(kube_proxy_iptables::explain::rules(plan, &ctx, &frontend))
            }
            (Mode::Ipvs, Some(plan), Some(frontend)) => {
                Objects::Ipvs(kube_proxy_ipvs::explain::objects(
                    input.plan,
                    &ctx,
                    &input.node.local_addresses,
                    &self.scheduling,
                    &plan.port.name.to_string(),
                    &frontend,
                ))
            }
            (Mode::Userspace, Some(plan), Some(frontend)) => {
                Objects::Userspace(kube_proxy_userspace::explain::redirect_rules(
                    input.plan,
                    kube_proxy_userspace::proxier::addressing(
                        self.bind_address,
                        input.family,
                        input.node,
                    ),
                    &plan.port.name.to_string(),
                    match explanation.frontend_kind {
                        Some(FrontendKind::ClusterIp) => Class::Cluster,
                        _ => Class::External,
                    },
                    &frontend,
                ))
            }
            (Mode::Ipvs, ..) => Objects::Ipvs(Vec::new()),
            (Mode::Userspace, ..) => Objects::Userspace(Vec::new()),
            (Mode::Nftables, ..) => Objects::Nftables(Vec::new()),
            (Mode::Iptables, ..) => Objects::Iptables(Vec::new()),
        };
        *self.found.lock().unwrap() = Some(Found {
            explanation,
            kernel_objects,
        });
        Ok(report)
    }
}
