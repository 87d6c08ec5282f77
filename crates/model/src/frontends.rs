//! Frontends — the (address, protocol, port) and (protocol, NodePort) a service port is
//! reached at — and who owns one that several service ports claim.
//!
//! Two Services may name the same external IP and port, or a load-balancer VIP another
//! Service has as its external IP; the kernel can send a frontend to one place only. The
//! owner is decided here, once, from the set of claimants alone (the smallest service port
//! name), so it never depends on the order in which changes arrived: a series of partial
//! syncs and one full sync give the same owner, and every dataplane renders the same choice.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;

use crate::names::{Protocol, ServicePortName};
use crate::service::ServicePort;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Frontend {
    /// ClusterIP, external IP or load-balancer VIP, with the Service's port.
    Address(IpAddr, Protocol, u16),
    /// A NodePort (on every NodePort address of the node).
    NodePort(Protocol, u16),
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Frontend::Address(ip @ IpAddr::V6(_), proto, port) => {
                write!(f, "[{ip}]:{port}/{}", proto.upper())
            }
            Frontend::Address(ip, proto, port) => write!(f, "{ip}:{port}/{}", proto.upper()),
            Frontend::NodePort(proto, port) => write!(f, "NodePort {port}/{}", proto.upper()),
        }
    }
}

/// Every frontend of a service port, without repeats.
pub fn frontends_of(port: &ServicePort) -> Vec<Frontend> {
    let mut all: Vec<Frontend> = std::iter::once(port.cluster_ip)
        .chain(port.external_ips.iter().copied())
        .chain(port.load_balancer_vips.iter().copied())
        .map(|ip| Frontend::Address(ip, port.protocol, port.port))
        .chain(
            port.node_port
                .map(|np| Frontend::NodePort(port.protocol, np.get())),
        )
        .collect();
    all.sort();
    all.dedup();
    all
}

/// Which service ports claim each frontend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Claims {
    by_frontend: HashMap<Frontend, BTreeSet<ServicePortName>>,
}

impl Claims {
    pub fn add(&mut self, name: &ServicePortName, frontends: &[Frontend]) {
        for frontend in frontends {
            self.by_frontend
                .entry(*frontend)
                .or_default()
                .insert(name.clone());
        }
    }

    pub fn remove(&mut self, name: &ServicePortName, frontends: &[Frontend]) {
        for frontend in frontends {
            if let Some(claimants) = self.by_frontend.get_mut(frontend) {
                claimants.remove(name);
                if claimants.is_empty() {
                    self.by_frontend.remove(frontend);
                }
            }
        }
    }

    /// The owner: the smallest claimant.
    pub fn owner(&self, frontend: &Frontend) -> Option<&ServicePortName> {
        self.by_frontend.get(frontend).and_then(|c| c.first())
    }

    /// Every service port claiming `frontend`.
    pub fn claimants(&self, frontend: &Frontend) -> impl Iterator<Item = &ServicePortName> {
        self.by_frontend.get(frontend).into_iter().flatten()
    }

    /// The frontends of `name` that another port owns, with that owner.
    pub fn refused(&self, name: &ServicePortName, frontends: &[Frontend]) -> Vec<Refused> {
        frontends
            .iter()
            .filter_map(|f| {
                let owner = self.owner(f)?;
                (owner != name).then(|| Refused {
                    frontend: *f,
                    owner: owner.to_string(),
                })
            })
            .collect()
    }
}

/// A frontend a service port claims but another owns: dataplanes leave it out for this port.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Refused {
    pub frontend: Frontend,
    /// The owning service port (`namespace/name:port`).
    pub owner: String,
}
