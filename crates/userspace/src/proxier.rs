//! The userspace dataplane: per family, the plan's listeners are opened (or updated) first,
//! then one transaction of the redirect path ([`crate::redirect`]: iptables or nftables)
//! points the frontends at them, then the listeners no longer wanted are closed. Traffic
//! never meets a rule without its listener, and a failed transaction leaves the old rules
//! with their listeners still open.
//!
//! A full sync (the first, after a failure, periodically) writes every rule; a partial sync
//! hands the redirect path only the rules of the listeners that changed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use kube_proxy_model::dataplane::{
    Dataplane, NodeView, SyncError, SyncInput, SyncReport, TableRules,
};
use kube_proxy_model::{IpFamily, Protocol, ServicePortName};
use tracing::info;

use crate::desired::{self, ListenerKey, ListenerSpec, Portal};
use crate::ports::PortAllocator;
use crate::redirect::{Change, Redirects};
use crate::relay::ListenerControl;
use crate::rules::{self, table_of, Addressing, Redirect, Rule};

#[derive(Clone, Debug)]
pub struct UserspaceConfig {
    /// `bindAddress` when it is one address: listeners bind it and rules DNAT to it.
    pub listen_ip: Option<IpAddr>,
    /// `portRange`.
    pub port_range: Option<(u16, u16)>,
    /// How often a sync first checks that the kernel still holds the rules it wrote (the
    /// sync period: upstream's userspace proxier ensured its chains at every sync).
    pub verify_interval: Duration,
}

impl Default for UserspaceConfig {
    fn default() -> Self {
        UserspaceConfig {
            listen_ip: None,
            port_range: None,
            verify_interval: Duration::from_secs(30),
        }
    }
}

/// One listener as applied: what it serves, its port and its rules.
struct Applied {
    spec: ListenerSpec,
    port: u16,
    rules: Vec<Rule>,
}

struct FamilyState {
    ports: PortAllocator,
    applied: BTreeMap<ListenerKey, Applied>,
    node_ports: BTreeSet<(Protocol, u16)>,
    /// The kernel holds exactly the applied rules (false: unknown, the next sync is full).
    in_sync: bool,
    /// When the kernel was last found holding the applied rules.
    verified: Option<Instant>,
    warned: BTreeSet<ServicePortName>,
}

pub struct UserspaceProxier<L: ListenerControl, D: Redirects> {
    config: UserspaceConfig,
    listeners: L,
    redirects: D,
    families: BTreeMap<IpFamily, FamilyState>,
    warnings: Vec<String>,
}

impl<L: ListenerControl, D: Redirects> UserspaceProxier<L, D> {
    pub fn new(config: UserspaceConfig, listeners: L, redirects: D) -> Self {
        UserspaceProxier {
            config,
            listeners,
            redirects,
            families: BTreeMap::new(),
            warnings: Vec::new(),
        }
    }

    pub fn listeners(&self) -> &L {
        &self.listeners
    }

    pub fn redirects(&self) -> &D {
        &self.redirects
    }

    pub fn redirects_mut(&mut self) -> &mut D {
        &mut self.redirects
    }

    /// The port each listener of `family` has (for tests and the state dump).
    pub fn ports(&self, family: IpFamily) -> BTreeMap<ListenerKey, u16> {
        self.families
            .get(&family)
            .map(|s| s.applied.iter().map(|(k, a)| (k.clone(), a.port)).collect())
            .unwrap_or_default()
    }
}

/// Where the node's own traffic is DNATed: a node IP the host holds, else (a node
/// whose InternalIP is not on an interface, as behind some NATs) the host's first
/// address of the family that is not loopback or link-local, as upstream's
/// `ChooseHostInterface`; else the node IP.
pub fn addressing(listen_ip: Option<IpAddr>, family: IpFamily, node: &NodeView) -> Addressing {
    let listen_ip = listen_ip.filter(|ip| IpFamily::of(ip) == family);
    let of_family = |ip: &&IpAddr| IpFamily::of(ip) == family;
    let usable = |ip: &&IpAddr| {
        !ip.is_loopback()
            && match ip {
                IpAddr::V4(v4) => !v4.is_link_local(),
                IpAddr::V6(v6) => !v6.is_unicast_link_local(),
            }
    };
    let host_ip = node
        .node_ips
        .iter()
        .filter(of_family)
        .find(|ip| node.local_addresses.contains(ip))
        .or_else(|| node.local_addresses.iter().filter(of_family).find(usable))
        .or_else(|| node.node_ips.iter().find(of_family))
        .copied();
    Addressing { listen_ip, host_ip }
}

/// Opens, updates and replaces listeners so that `state` serves `want`; returns the keys no
/// longer wanted (closed after the rules stop pointing at them).
fn open_listeners<L: ListenerControl>(
    listeners: &mut L,
    family: IpFamily,
    state: &mut FamilyState,
    want: &BTreeMap<ListenerKey, ListenerSpec>,
    warnings: &mut Vec<String>,
) -> Vec<(ListenerKey, Applied)> {
    let mut replaced = Vec::new();
    for (key, spec) in want {
        if let Some(applied) = state.applied.get_mut(key) {
            if applied.spec == *spec {
                continue;
            }
            if applied.spec.protocol == spec.protocol {
                match listeners.update(family, key, spec) {
                    Ok(()) => applied.spec = spec.clone(),
                    Err(e) => warnings.push(format!(
                        "cannot update the {family} listener of {key} on port {}: {e}",
                        applied.port
                    )),
                }
                continue;
            }
            // Another protocol: a new listener under the same key; the old one stops now
            // (its rules go with the stale ones').
            if let Some(old) = state.applied.remove(key) {
                listeners.close(family, key);
                replaced.push((key.clone(), old));
            }
        }
        match listeners.open(family, key, spec, &state.ports.candidates()) {
            Ok(port) => {
                state.ports.take(port);
                state.applied.insert(
                    key.clone(),
                    Applied {
                        spec: spec.clone(),
                        port,
                        rules: Vec::new(),
                    },
                );
            }
            Err(e) => warnings.push(format!(
                "cannot open a {family} listener for {key} (its frontends stay unserved; retried at the next sync): {e}"
            )),
        }
    }
    let stale: Vec<ListenerKey> = state
        .applied
        .keys()
        .filter(|k| !want.contains_key(*k))
        .cloned()
        .collect();
    for key in stale {
        if let Some(applied) = state.applied.remove(&key) {
            replaced.push((key, applied));
        }
    }
    replaced
}

impl<L: ListenerControl, D: Redirects> Dataplane for UserspaceProxier<L, D> {
    fn name(&self) -> &'static str {
        "userspace"
    }

    fn sync(&mut self, input: SyncInput<'_>) -> Result<SyncReport, SyncError> {
        let family = input.family;
        let addressing = addressing(self.config.listen_ip, family, input.node);
        let range = self.config.port_range;
        let state = self.families.entry(family).or_insert_with(|| FamilyState {
            ports: PortAllocator::new(range),
            applied: BTreeMap::new(),
            node_ports: BTreeSet::new(),
            in_sync: false,
            verified: None,
            warned: BTreeSet::new(),
        });
        let mut full = input.full || !state.in_sync;
        // Someone else's edit (a flushed chain, a deleted table) is found here and repaired
        // by this sync writing everything.
        let due = state
            .verified
            .is_none_or(|at| at.elapsed() >= self.config.verify_interval);
        if !full && due {
            let applied: Vec<&Rule> = state.applied.values().flat_map(|a| &a.rules).collect();
            match self.redirects.verify(family, &applied) {
                Ok(None) => state.verified = Some(Instant::now()),
                Ok(Some(drift)) => {
                    self.warnings
                        .push(format!("{drift}; rewriting the redirect rules"));
                    full = true;
                }
                Err(e) => {
                    self.warnings.push(format!(
                        "cannot read the {family} redirect rules back ({e}); rewriting them"
                    ));
                    full = true;
                }
            }
        }
        let want = desired::listeners(input.plan);
        for (name, why) in &want.skipped {
            if state.warned.insert(name.clone()) {
                self.warnings.push(format!("{name}: {why}"));
            }
        }

        // 1. Listeners first: every rule written below has its listener.
        let mut stale = open_listeners(
            &mut self.listeners,
            family,
            state,
            &want.listeners,
            &mut self.warnings,
        );
        let node_ports: BTreeSet<(Protocol, u16)> = state
            .applied
            .values()
            .flat_map(|a| {
                a.spec.portals.iter().filter_map(move |p| match p {
                    Portal::NodePort(port) => Some((a.spec.protocol, *port)),
                    Portal::Address { .. } => None,
                })
            })
            .collect();
        for (protocol, port) in node_ports.difference(&state.node_ports) {
            if let Err(e) = self.listeners.claim_node_port(family, *protocol, *port) {
                // Served all the same (the rules redirect it); another program holds it.
                self.warnings.push(format!(
                    "cannot hold {family} NodePort {port}/{}: {e} (is another program listening on it?)",
                    protocol.upper()
                ));
            }
        }

        // 2. The rules, whole or the changed listeners' only.
        let mut new_rules: BTreeMap<ListenerKey, Vec<Rule>> = BTreeMap::new();
        for (key, applied) in &state.applied {
            let redirect = Redirect {
                name: &key.name,
                spec: &applied.spec,
                proxy_port: applied.port,
            };
            let rules = rules::rules(&[redirect], addressing);
            if full || rules != applied.rules {
                new_rules.insert(key.clone(), rules);
            }
        }
        let all: Vec<&Rule> = state
            .applied
            .iter()
            .flat_map(|(k, a)| new_rules.get(k).unwrap_or(&a.rules))
            .collect();
        let removed: Vec<&Rule> = stale
            .iter()
            .map(|(_, a)| &a.rules)
            .chain(
                new_rules
                    .keys()
                    .filter_map(|k| state.applied.get(k))
                    .map(|a| &a.rules),
            )
            .flatten()
            .collect();
        let added: Vec<&Rule> = new_rules.values().flatten().collect();
        let change = Change {
            full,
            all: &all,
            removed: &removed,
            added: &added,
        };
        let written = match self.redirects.apply(family, &change) {
            Ok(written) => written,
            Err(e) => {
                state.in_sync = false;
                // The stale listeners stay open: the kernel may still point at them.
                for (key, applied) in stale.drain(..) {
                    state.applied.entry(key).or_insert(applied);
                }
                return Err(SyncError::retry(family, e));
            }
        };
        state.in_sync = true;
        if full {
            state.verified = Some(Instant::now());
        }
        for (key, rules) in new_rules {
            if let Some(applied) = state.applied.get_mut(&key) {
                applied.rules = rules;
            }
        }

        // 3. What is no longer pointed at goes.
        for (key, applied) in stale {
            if !state.applied.contains_key(&key) {
                self.listeners.close(family, &key);
            }
            state.ports.release(applied.port);
        }
        for (protocol, port) in state.node_ports.difference(&node_ports) {
            self.listeners.release_node_port(family, *protocol, *port);
        }
        state.node_ports = node_ports;
        self.listeners.tidy();

        let total: usize = state.applied.values().map(|a| a.rules.len()).sum();
        if full {
            info!(family = %family, listeners = state.applied.len(), rules = total, redirects = self.redirects.name(), "Userspace listeners and redirect rules in place");
        }
        let count = |table: &str| {
            state
                .applied
                .values()
                .flat_map(|a| &a.rules)
                .filter(|rule| table_of(rule.chain) == table)
                .count()
        };
        Ok(SyncReport {
            service_ports: input.plan.services.len(),
            changed: input.changed.len(),
            full,
            statements: written.rules,
            transactions: written.transactions,
            rules: vec![
                TableRules {
                    table: "filter",
                    written: 0,
                    total: count("filter"),
                },
                TableRules {
                    table: "nat",
                    written: written.rules,
                    total: count("nat"),
                },
            ],
        })
    }

    fn take_warnings(&mut self) -> Vec<String> {
        // The sync loop logs them (rate-limited with the other per-object warnings).
        std::mem::take(&mut self.warnings)
    }
}
