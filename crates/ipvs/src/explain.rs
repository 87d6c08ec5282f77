//! The kernel objects that carry one service port's traffic for one frontend in ipvs mode,
//! for `kube-proxy explain`: its virtual servers (one per NodePort address for a NodePort)
//! with their real servers, its ipset entries and its address on `kube-ipvs0`.

use std::net::IpAddr;

use kube_proxy_model::context::FamilyContext;
use kube_proxy_model::{FamilyPlan, Frontend};

use crate::desired::{self, ip_port, Scheduling};
use crate::ipvsadm::Commands;
use crate::names::Set;

/// One object, as the tools print it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Object {
    /// A virtual server and its real servers, as `ipvsadm --save -n` lines.
    VirtualServer { service: String, reals: Vec<String> },
    /// An entry of an ipset (`ipset test <set> <entry>`).
    SetEntry { set: String, entry: String },
    /// An address on kube-ipvs0.
    Address { address: IpAddr },
}

/// The objects of `port` (a service port name) for `frontend`.
pub fn objects(
    plan: &FamilyPlan,
    ctx: &FamilyContext,
    node_addresses: &[IpAddr],
    scheduling: &Scheduling,
    port: &str,
    frontend: &Frontend,
) -> Vec<Object> {
    let want = desired::desired(plan, ctx, node_addresses, scheduling);
    let mut out = Vec::new();
    for (address, server) in &want.services {
        if server.owner.to_string() != port {
            continue;
        }
        let matches = match frontend {
            Frontend::Address(ip, proto, p) => {
                address.ip == *ip && address.protocol == *proto && address.port == *p
            }
            Frontend::NodePort(proto, p) => address.protocol == *proto && address.port == *p,
        };
        if !matches {
            continue;
        }
        let mut service = Commands::default();
        service.add_service(address, &server.settings);
        let mut reals = Commands::default();
        for real in &server.reals {
            reals.add_real(address, real, 1);
        }
        out.push(Object::VirtualServer {
            service: service.text.trim_end().to_string(),
            reals: reals.text.lines().map(str::to_string).collect(),
        });
    }
    let keys: Vec<String> = match frontend {
        Frontend::Address(ip, proto, p) => vec![ip_port(*ip, *proto, *p)],
        Frontend::NodePort(_, p) => vec![p.to_string()],
    };
    for (set, entries) in &want.sets {
        if *set == Set::IpvsIps || *set == Set::LoopBack {
            continue;
        }
        for entry in entries {
            let related = keys
                .iter()
                .any(|k| entry == k || entry.starts_with(&format!("{k},")))
                || matches!(frontend, Frontend::NodePort(proto, p)
                if entry.ends_with(&format!(",{}:{p}", proto.lower())));
            if related {
                out.push(Object::SetEntry {
                    set: set.name(ctx.family),
                    entry: entry.clone(),
                });
            }
        }
    }
    if let Frontend::Address(ip, ..) = frontend {
        if want.bound.contains(ip) {
            out.push(Object::Address { address: *ip });
        }
    }
    out
}
