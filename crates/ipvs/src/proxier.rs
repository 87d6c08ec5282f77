//! The ipvs dataplane: per family, the desired state from the plan diffed against what was
//! applied (or, in a full sync, against what the kernel has), applied as one `ipset restore`,
//! one `iptables-restore` when the rules changed, one `ipvsadm --restore` and one address
//! change on `kube-ipvs0`, in that order (what matches a frontend is in place before it
//! receives traffic). IPVS has no transactions: a failed step leaves the family's state
//! unknown and the next sync is full (it re-reads the kernel), as upstream recovers.
//!
//! Graceful termination (upstream's): a TCP real server that is no longer wanted gets weight
//! 0, so no new connection goes to it, and is deleted once it has no connection left (or
//! after `graceful_bound`); UDP and SCTP real servers are deleted at once. An endpoint that
//! comes back while draining gets its weight back.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use kube_proxy_iptables::proxier::{saved_jump, RestoreError, Restorer};
use kube_proxy_model::context::{FamilyContext, ProxyPolicy};
use kube_proxy_model::dataplane::{
    Dataplane, SyncError, SyncErrorKind, SyncInput, SyncReport, TableRules,
};
use kube_proxy_model::{IpFamily, Protocol};

use crate::desired::{self, Desired, Scheduling, VirtualAddress};
use crate::ipvsadm::{self, Commands, KernelService, KernelTable};
use crate::names::Set;
use crate::rules::{self, Rules};

/// Why a kernel step failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KernelError(pub String);

/// The tools of ipvs mode (the binary runs ipvsadm, ipset and ip; tests use the fake).
pub trait IpvsKernel: Send {
    /// `ipvsadm --save -n`: every virtual server and real server.
    fn ipvs_save(&mut self) -> Result<String, KernelError>;
    /// `ipvsadm --restore`: runs the commands in order, stopping at the first failure.
    fn ipvs_restore(&mut self, commands: &str) -> Result<(), KernelError>;
    /// The active plus inactive connections of every real server (`ipvsadm -Ln`'s counts).
    fn connections(&mut self) -> Result<BTreeMap<(VirtualAddress, SocketAddr), u64>, KernelError>;
    /// `ipset save`.
    fn ipset_save(&mut self) -> Result<String, KernelError>;
    /// `ipset restore`.
    fn ipset_restore(&mut self, input: &str) -> Result<(), KernelError>;
    /// The addresses of `family` on `kube-ipvs0`, creating the interface when missing.
    fn bound_addresses(&mut self, family: IpFamily) -> Result<Vec<IpAddr>, KernelError>;
    /// Adds and removes addresses on `kube-ipvs0`.
    fn change_addresses(&mut self, add: &[IpAddr], remove: &[IpAddr]) -> Result<(), KernelError>;
}

/// Settings of ipvs mode.
#[derive(Clone, Debug)]
pub struct IpvsConfig {
    pub policy: ProxyPolicy,
    pub scheduling: Scheduling,
    /// `ipvs.excludeCIDRs`: virtual servers there are never deleted.
    pub exclude_cidrs: Vec<IpNet>,
    /// How long a draining real server may keep connections before it is deleted anyway.
    pub graceful_bound: Duration,
}

impl Default for IpvsConfig {
    fn default() -> Self {
        IpvsConfig {
            policy: ProxyPolicy::default(),
            scheduling: Scheduling::new(""),
            exclude_cidrs: Vec::new(),
            graceful_bound: Duration::from_secs(15 * 60),
        }
    }
}

/// What one family has in the kernel, as far as we know.
#[derive(Clone, Debug)]
struct Applied {
    ctx: FamilyContext,
    services: KernelTable,
    bound: BTreeSet<IpAddr>,
    sets: BTreeMap<Set, BTreeSet<String>>,
    rules: Rules,
}

pub type Clock = Box<dyn Fn() -> Instant + Send>;

type Prefetched = (Instant, KernelTable, BTreeMap<Set, BTreeSet<String>>);

pub struct IpvsProxier<K: IpvsKernel, R: Restorer> {
    config: IpvsConfig,
    kernel: K,
    iptables: R,
    clock: Clock,
    applied: BTreeMap<IpFamily, Applied>,
    /// Real servers draining with weight 0, since when.
    draining: BTreeMap<(VirtualAddress, SocketAddr), Instant>,
    /// What a full sync read of the other family, and when (see `read_kernel`).
    prefetched: BTreeMap<IpFamily, Prefetched>,
    warnings: Vec<String>,
}

/// Whether a removed real server of this protocol drains first (upstream: TCP only).
fn drains(protocol: Protocol) -> bool {
    protocol == Protocol::Tcp
}

impl<K: IpvsKernel, R: Restorer> IpvsProxier<K, R> {
    pub fn new(config: IpvsConfig, kernel: K, iptables: R, clock: Clock) -> Self {
        IpvsProxier {
            config,
            kernel,
            iptables,
            clock,
            applied: BTreeMap::new(),
            draining: BTreeMap::new(),
            prefetched: BTreeMap::new(),
            warnings: Vec::new(),
        }
    }

    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    pub fn kernel_mut(&mut self) -> &mut K {
        &mut self.kernel
    }

    pub fn iptables(&self) -> &R {
        &self.iptables
    }

    /// Real servers currently draining.
    pub fn draining(&self) -> usize {
        self.draining.len()
    }

    fn excluded(&self, ip: &IpAddr) -> bool {
        self.config.exclude_cidrs.iter().any(|c| c.contains(ip))
    }

    fn sync_family(&mut self, input: &SyncInput<'_>) -> Result<SyncReport, String> {
        let family = input.family;
        let v6 = family == IpFamily::V6;
        let ctx = FamilyContext::resolve(&self.config.policy, family, input.node)
            .with_service_cidrs(input.service_cidrs);
        let node_addresses: Vec<IpAddr> = input
            .node
            .local_addresses
            .iter()
            .filter(|ip| IpFamily::of(ip) == family)
            .copied()
            .collect();
        let want = desired::desired(input.plan, &ctx, &node_addresses, &self.config.scheduling);
        let previous = self.applied.remove(&family);
        let full = input.full || previous.as_ref().is_none_or(|a| a.ctx != ctx);
        let now = (self.clock)();
        let mut transactions = 0;

        // What the kernel has: read it in a full sync, else trust what we applied.
        let (current, bound, sets, old_rules) = match previous {
            Some(applied) if !full => (
                applied.services,
                applied.bound,
                applied.sets,
                Some(applied.rules),
            ),
            _ => {
                let (table, sets) = self.read_kernel(family, now)?;
                let bound: BTreeSet<IpAddr> = self
                    .kernel
                    .bound_addresses(family)
                    .map_err(|e| format!("listing the addresses of kube-ipvs0: {e}"))?
                    .into_iter()
                    .collect();
                (table, bound, sets, None)
            }
        };

        // 1. ipsets first: the rules that match them are in place before the servers.
        let (ipset_input, set_changes) =
            crate::ipset::restore_input(family, &sets, &want.sets, full);
        if full || set_changes > 0 {
            self.kernel
                .ipset_restore(&ipset_input)
                .map_err(|e| format!("ipset restore: {e}"))?;
            transactions += 1;
        }

        // 2. iptables, when the rules changed (or in a full sync): before the servers, so a
        //    new frontend's first packets are already masqueraded as planned.
        let new_rules = rules::rules(&want, &ctx);
        let mut rules_written = (0, 0);
        if full || old_rules.as_ref() != Some(&new_rules) {
            let saved = self
                .iptables
                .save(family)
                .map_err(|e| format!("iptables-save: {e}"))?;
            let text = rules::restore_input(&new_rules, &|table, chain, target| {
                saved_jump(&saved, table, chain, target)
            });
            self.iptables
                .restore(family, &text)
                .map_err(|e: RestoreError| format!("iptables-restore: {e}"))?;
            transactions += 1;
            rules_written = (new_rules.filter.len(), new_rules.nat.len());
        }

        // 3. Virtual and real servers: additions and changes, then removals.
        let (commands, next) = self.diff_services(&current, &want, now, v6);
        if !commands.is_empty() {
            self.kernel
                .ipvs_restore(&commands.text)
                .map_err(|e| format!("ipvsadm --restore: {e}"))?;
            transactions += 1;
        }

        // 4. Addresses on kube-ipvs0 (the kernel accepts the frontend's packets from here on).
        let add: Vec<IpAddr> = want.bound.difference(&bound).copied().collect();
        let remove: Vec<IpAddr> = bound.difference(&want.bound).copied().collect();
        if !add.is_empty() || !remove.is_empty() {
            self.kernel
                .change_addresses(&add, &remove)
                .map_err(|e| format!("changing the addresses of kube-ipvs0: {e}"))?;
            transactions += 1;
        }

        // The other family's part of this sync's read stays valid however long this sync
        // took (it writes nothing of that family): its second counts from now.
        let other = match family {
            IpFamily::V4 => IpFamily::V6,
            IpFamily::V6 => IpFamily::V4,
        };
        if let Some(entry) = self.prefetched.get_mut(&other) {
            if entry.0 == now {
                entry.0 = (self.clock)();
            }
        }
        let statements = set_changes + commands.count + add.len() + remove.len();
        let report = SyncReport {
            service_ports: input.plan.services.len(),
            changed: input.changed.len(),
            full,
            statements,
            transactions,
            rules: vec![
                TableRules {
                    table: "filter",
                    written: rules_written.0,
                    total: new_rules.filter.len(),
                },
                TableRules {
                    table: "nat",
                    written: rules_written.1,
                    total: new_rules.nat.len(),
                },
            ],
        };
        self.applied.insert(
            family,
            Applied {
                ctx,
                services: next,
                bound: want.bound,
                sets: want.sets,
                rules: new_rules,
            },
        );
        Ok(report)
    }

    /// The family's virtual servers and set entries as the kernel has them. The tools list
    /// both families at once, so the other family's part is kept for its full sync that
    /// follows in the same pass (within a second of this sync's end; nothing of ours writes
    /// it meanwhile), which halves what a full sync of both families reads.
    fn read_kernel(
        &mut self,
        family: IpFamily,
        now: Instant,
    ) -> Result<(KernelTable, BTreeMap<Set, BTreeSet<String>>), String> {
        if let Some((at, table, sets)) = self.prefetched.remove(&family) {
            if now.saturating_duration_since(at) < Duration::from_secs(1) {
                return Ok((table, sets));
            }
        }
        let saved = self
            .kernel
            .ipvs_save()
            .map_err(|e| format!("ipvsadm --save: {e}"))?;
        let sets_text = self
            .kernel
            .ipset_save()
            .map_err(|e| format!("ipset save: {e}"))?;
        let (mut mine, mut theirs) = (KernelTable::new(), KernelTable::new());
        for (address, service) in ipvsadm::parse_save(&saved) {
            match IpFamily::of(&address.ip) == family {
                true => mine.insert(address, service),
                false => theirs.insert(address, service),
            };
        }
        let other = match family {
            IpFamily::V4 => IpFamily::V6,
            IpFamily::V6 => IpFamily::V4,
        };
        self.prefetched.insert(
            other,
            (now, theirs, crate::ipset::parse_save(&sets_text, other)),
        );
        Ok((mine, crate::ipset::parse_save(&sets_text, family)))
    }

    /// The commands turning `current` into `want`, and the table the kernel then has.
    fn diff_services(
        &mut self,
        current: &KernelTable,
        want: &Desired,
        now: Instant,
        v6: bool,
    ) -> (Commands, KernelTable) {
        let mut adds = Commands::default();
        let mut removals = Commands::default();
        let mut next = KernelTable::new();
        for (address, server) in &want.services {
            let mut reals: BTreeMap<SocketAddr, u32> = BTreeMap::new();
            match current.get(address) {
                None => {
                    adds.add_service(address, &server.settings);
                    for real in &server.reals {
                        adds.add_real(address, real, 1);
                        reals.insert(*real, 1);
                    }
                }
                Some(have) => {
                    if have.settings != server.settings {
                        adds.edit_service(address, &server.settings);
                    }
                    for real in &server.reals {
                        match have.reals.get(real) {
                            None => adds.add_real(address, real, 1),
                            Some(1) => {}
                            Some(_) => adds.set_weight(address, real, 1),
                        }
                        self.draining.remove(&(*address, *real));
                        reals.insert(*real, 1);
                    }
                    for (real, weight) in &have.reals {
                        if server.reals.contains(real) {
                            continue;
                        }
                        if !drains(address.protocol) {
                            removals.delete_real(address, real);
                            continue;
                        }
                        if *weight != 0 {
                            removals.set_weight(address, real, 0);
                        }
                        self.draining.entry((*address, *real)).or_insert(now);
                        reals.insert(*real, 0);
                    }
                }
            }
            next.insert(
                *address,
                KernelService {
                    settings: server.settings.clone(),
                    reals,
                },
            );
        }
        for address in current.keys() {
            if want.services.contains_key(address) || self.excluded(&address.ip) {
                continue;
            }
            removals.delete_service(address);
            self.draining.retain(|(vs, _), _| vs != address);
        }
        // Draining real servers whose connections are gone (or that drained long enough).
        let candidates: Vec<(VirtualAddress, SocketAddr)> = self
            .draining
            .keys()
            .filter(|(vs, _)| next.contains_key(vs) && vs.ip.is_ipv6() == v6)
            .copied()
            .collect();
        if !candidates.is_empty() {
            let connections = match self.kernel.connections() {
                Ok(counts) => counts,
                Err(e) => {
                    self.warnings.push(format!(
                        "cannot read IPVS connection counts ({e}); draining real servers stay until the next sync"
                    ));
                    BTreeMap::new()
                }
            };
            for key in candidates {
                let since = self.draining[&key];
                let idle = connections.get(&key).is_some_and(|n| *n == 0);
                let gone = !connections.is_empty() && !connections.contains_key(&key);
                if idle || gone || now.duration_since(since) >= self.config.graceful_bound {
                    // One the kernel no longer lists needs no command.
                    if !gone {
                        removals.delete_real(&key.0, &key.1);
                    }
                    self.draining.remove(&key);
                    if let Some(service) = next.get_mut(&key.0) {
                        service.reals.remove(&key.1);
                    }
                }
            }
        }
        adds.text.push_str(&removals.text);
        adds.count += removals.count;
        (adds, next)
    }
}

impl<K: IpvsKernel, R: Restorer> Dataplane for IpvsProxier<K, R> {
    fn name(&self) -> &'static str {
        "ipvs"
    }

    fn sync(&mut self, input: SyncInput<'_>) -> Result<SyncReport, SyncError> {
        self.sync_family(&input).map_err(|message| {
            // The kernel may hold part of it: read everything again next time.
            self.applied.remove(&input.family);
            SyncError {
                family: input.family,
                message,
                kind: SyncErrorKind::Retry,
                partial: !input.full,
            }
        })
    }

    fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }
}
