//! The nftables dataplane: turns each sync's plan and changes into one nft transaction,
//! runs it through a [`Runner`], and remembers what was applied.
//!
//! * First sync of the process (and after any failed transaction): the table is deleted and
//!   rebuilt in the same transaction, so whatever it held (an older version's rules, upstream
//!   kube-proxy's) is replaced atomically. Conntrack entries are untouched, so established
//!   connections keep working.
//! * Later full syncs (hourly, or when node addresses change) flush and rewrite every object
//!   the proxy owns, repairing drift, but keep ClientIP affinity state.
//! * Partial syncs touch only the changed service ports: element diffs, and chains only for
//!   Services that have them. A change that adds no jump or goto is not re-validated by the
//!   kernel, which is what keeps it in the millisecond range at 50k Services.
//! * Chains that became unused are flushed at once and deleted at least a second later
//!   (kernels before 6.2 cannot delete a chain unreferenced in the same transaction).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube_proxy_model::dataplane::{Dataplane, SyncError, SyncErrorKind, SyncInput, SyncReport};
use kube_proxy_model::plan::ServicePortPlan;
use kube_proxy_model::{IpFamily, ServicePortName};

use crate::context::{Context, NftConfig};
use crate::contribution::{contribute, AffinitySet, ChainDef, Contribution};
use crate::elements::{quote, Key, SetName, Value};
use crate::kernel::{self, Kernel, KernelTable};
use crate::skeleton::{self, Slots, TABLE};
use crate::transaction::{ElementCommand, Transaction};
use kube_proxy_model::context::NodePortDestinations;

/// Runs a transaction against the kernel (`nft -f -`), or anything that stands in for it.
pub trait Runner: Send {
    /// Applies `script` atomically; on error nothing was applied.
    fn apply(&mut self, script: &str) -> Result<(), RunError>;

    /// Applies `tx` atomically. A runner that can send element-only transactions as netlink
    /// batches (`Transaction::element_commands`) overrides this; by default it is text.
    /// A rejection names the failing line as nft does (`<source>:LINE:…`).
    fn apply_transaction(&mut self, _family: IpFamily, tx: &Transaction) -> Result<(), RunError> {
        self.apply(tx.text())
    }

    /// Reads what our table of `family` holds, before a full sync; a runner that cannot
    /// read the kernel answers `Kernel::Unknown` and the sync writes everything.
    fn snapshot(&mut self, _family: IpFamily) -> Result<Kernel, RunError> {
        Ok(Kernel::Unknown)
    }
}

/// Why a transaction was not applied.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// nft rejected it; the text is nft's message (with the line it failed at).
    #[error("{0}")]
    Rejected(String),
    /// nft could not be run (missing binary, no permission); the text says what to do.
    #[error("{0}")]
    Unavailable(String),
    /// The transaction was to be printed, and the reader of standard output went away.
    #[error("standard output was closed")]
    OutputClosed,
}

/// Where time comes from (injected so tests control the deferred deletions).
pub type Clock = Box<dyn Fn() -> Instant + Send>;

const STALE_CHAIN_DELAY: Duration = Duration::from_secs(1);

/// What is applied for one family.
#[derive(Default)]
struct FamilyState {
    /// The table was (re)built by this process and the bookkeeping matches the kernel.
    initialized: bool,
    ctx: Option<Context>,
    /// The plan each service port was last rendered from (shared with the planner, so keeping
    /// it costs a pointer); its elements are recomputed from it when the port changes, rather
    /// than stored.
    by_port: HashMap<ServicePortName, Arc<ServicePortPlan>>,
    /// Reference counts of elements several ports may share (ClusterIPs, hairpin entries).
    shared: HashMap<(SetName, Key), u32>,
    /// Users of each `dnat-N`/`nodeport-dnat-N` set, and which of them exist in the kernel.
    dnat_users: BTreeMap<SetName, usize>,
    dnat_created: BTreeSet<SetName>,
    /// Slot maps and chains that exist (never fewer than any `dnat-N` needs).
    slots: Slots,
    chains: HashSet<Arc<str>>,
    affinity_sets: HashSet<Arc<str>>,
    stale_chains: Vec<(Arc<str>, Instant)>,
    /// When the kernel was last compared with the plan (a full sync in place).
    last_verified: Option<Instant>,
}

/// How the kernel's table differed from what this proxy last wrote, found by a full sync in
/// place (the table listed, then only differences written).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Drift {
    /// Elements the kernel lacked, or held without the plan wanting them.
    pub elements: usize,
    /// Sets whose elements could not be read back, rewritten whole.
    pub rewritten_sets: usize,
    /// Per-service chains that were missing.
    pub chains: usize,
    /// The base chains had lost their rules (e.g. `nft flush table`): no traffic entered.
    pub unhooked: bool,
}

impl Drift {
    pub fn is_empty(&self) -> bool {
        *self == Drift::default()
    }
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} elements, {} sets rewritten, {} chains missing{}",
            self.elements,
            self.rewritten_sets,
            self.chains,
            if self.unhooked {
                ", base chains without their rules"
            } else {
                ""
            }
        )
    }
}

pub struct NftProxier<R: Runner> {
    config: NftConfig,
    runner: R,
    clock: Clock,
    families: BTreeMap<IpFamily, FamilyState>,
    /// Warnings of the last sync (conflicting frontends), for the caller to log.
    warnings: Vec<String>,
    /// Failed syncs in a row, per family.
    failures: BTreeMap<IpFamily, u32>,
    /// Compare the kernel with the plan this often when nothing changed (`syncPeriod`).
    verify_every: Option<Duration>,
    /// What the last full sync in place found changed in the kernel, per family.
    drift: BTreeMap<IpFamily, Drift>,
}

impl<R: Runner> NftProxier<R> {
    pub fn new(config: NftConfig, runner: R, clock: Clock) -> Self {
        NftProxier {
            config,
            runner,
            clock,
            families: BTreeMap::new(),
            warnings: Vec::new(),
            failures: BTreeMap::new(),
            verify_every: None,
            drift: BTreeMap::new(),
        }
    }

    /// Every `interval` without changes, a sync lists the table and repairs what differs
    /// from the plan (someone flushed it, deleted an element): the nftables mode's canary.
    pub fn with_verify_interval(mut self, interval: Duration) -> Self {
        self.verify_every = Some(interval);
        self
    }

    /// What the last full sync in place of `family` found changed in the kernel.
    pub fn last_drift(&self, family: IpFamily) -> Option<&Drift> {
        self.drift.get(&family)
    }

    pub fn runner(&self) -> &R {
        &self.runner
    }
    pub fn runner_mut(&mut self) -> &mut R {
        &mut self.runner
    }

    /// Builds and applies the transaction(s) for one sync; returns the number of nft commands,
    /// of transactions, and whether everything was rewritten (asked for, or forced by a new
    /// table or context).
    pub fn sync_family(&mut self, input: SyncInput<'_>) -> Result<(usize, usize, bool), SyncError> {
        let now = (self.clock)();
        let ctx = Context::resolve(&self.config, input.family, input.node)
            .with_service_cidrs(input.service_cidrs);
        let state = self.families.entry(input.family).or_default();
        let verify = !input.full
            && input.changed.is_empty()
            && state.initialized
            && state.ctx.as_ref() == Some(&ctx)
            && self.verify_every.is_some_and(|every| {
                state
                    .last_verified
                    .is_none_or(|at| now.saturating_duration_since(at) >= every)
            });
        let needs_full = input.full || !state.initialized || state.ctx.as_ref() != Some(&ctx);
        let failures = self.failures.get(&input.family).copied().unwrap_or(0);
        let mut warnings = Vec::new();
        // After two failures in a row, stop trusting the kernel's listing: rebuild.
        let force_rebuild = failures >= 2;
        let kernel = if (needs_full || verify) && !force_rebuild {
            self.runner.snapshot(input.family).unwrap_or_else(|error| {
                warnings.push(format!(
                    "cannot read the {} kube-proxy table ({error}); rewriting all of it",
                    input.family
                ));
                Kernel::Unknown
            })
        } else {
            Kernel::Unknown
        };
        // A runner that cannot read the kernel cannot verify it either (it would rewrite
        // everything each period).
        let verify = verify && !matches!(kernel, Kernel::Unknown);
        let full = needs_full || verify;
        let transactions = if full {
            let state = self.families.entry(input.family).or_default();
            state.last_verified = Some(now);
            let mut drift = Drift::default();
            let transactions = full_sync(
                state,
                &ctx,
                input,
                now,
                &mut warnings,
                &kernel,
                force_rebuild,
                self.config.staged_build_above,
                &mut drift,
            );
            // Only a sync without changes tells drift from what it writes for the changes.
            if verify && matches!(kernel, Kernel::Present(_)) && !drift.is_empty() {
                warnings.push(format!(
                    "the {} kube-proxy table differed from what this proxy wrote ({drift}); someone else changed it. Repaired",
                    input.family
                ));
            }
            self.drift.insert(input.family, drift);
            transactions
        } else {
            vec![partial_sync(state, &ctx, input, now, &mut warnings)]
        };
        self.warnings.extend(warnings);
        let state = self.families.entry(input.family).or_default();
        let mut statements = 0;
        let mut applied = 0;
        for tx in transactions.iter().filter(|tx| !tx.is_empty()) {
            if let Err(error) = self.runner.apply_transaction(input.family, tx) {
                // The kernel kept the previous ruleset; the bookkeeping no longer matches it, so
                // the next sync starts over from the kernel's listing.
                *state = FamilyState::default();
                *self.failures.entry(input.family).or_default() += 1;
                let (message, kind) = match error {
                    RunError::Rejected(stderr) => (
                        format!("nft transaction failed at {}", tx.explain(&stderr)),
                        SyncErrorKind::Retry,
                    ),
                    RunError::Unavailable(message) => (message, SyncErrorKind::Retry),
                    RunError::OutputClosed => (
                        "standard output was closed".to_string(),
                        SyncErrorKind::OutputClosed,
                    ),
                };
                return Err(SyncError {
                    family: input.family,
                    message,
                    kind,
                    partial: !full,
                });
            }
            statements += tx.len();
            applied += 1;
        }
        state.ctx = Some(ctx);
        state.initialized = true;
        self.failures.remove(&input.family);
        Ok((statements, applied, full))
    }
}

impl<R: Runner> Dataplane for NftProxier<R> {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn sync(&mut self, input: SyncInput<'_>) -> Result<SyncReport, SyncError> {
        let (statements, transactions, full) = self.sync_family(input)?;
        Ok(SyncReport {
            service_ports: input.plan.services.len(),
            changed: input.changed.len(),
            full,
            statements,
            transactions,
            ..Default::default()
        })
    }

    fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }
}

/// Sets whose elements several service ports may contribute.
fn is_shared(set: SetName) -> bool {
    matches!(set, SetName::ClusterIps | SetName::HairpinConnections)
}

/// A port's contribution, and a warning for each frontend the plan gave to another port.
fn render(plan: &ServicePortPlan, ctx: &Context, warnings: &mut Vec<String>) -> Contribution {
    let name = &plan.port.name;
    for refused in &plan.refused {
        warnings.push(format!(
            "{name}: frontend {} is already used by {}; ignoring it for {name}",
            refused.frontend, refused.owner
        ));
    }
    contribute(plan, ctx)
}

/// Element commands grouped per (set, operation) for one owner: `add element ... { a, b }`.
#[derive(Default)]
struct ElementOps {
    adds: BTreeMap<SetName, Vec<(Key, Value)>>,
    deletes: BTreeMap<SetName, Vec<Key>>,
}

impl ElementOps {
    fn write(
        self,
        fam: &str,
        owner: Option<&Arc<ServicePortName>>,
        deletes: &mut Transaction,
        adds: &mut Transaction,
    ) {
        for (set, keys) in self.deletes {
            let elements = keys.into_iter().map(|key| (key, Value::None)).collect();
            let command = ElementCommand {
                delete: true,
                set,
                elements,
            };
            deletes.element_command(fam, owner, command);
        }
        for (set, elements) in self.adds {
            let command = ElementCommand {
                delete: false,
                set,
                elements,
            };
            adds.element_command(fam, owner, command);
        }
    }
}

/// Records the elements as applied (reference counts, dnat users) and emits the adds the
/// kernel needs (a shared element already present is not added again).
fn account_adds(
    state: &mut FamilyState,
    elements: &[(SetName, Key, Value)],
    mut emit: impl FnMut(SetName, &Key, &Value),
) {
    for (set, key, value) in elements {
        if let SetName::Dnat(_) | SetName::NodePortDnat(_) = set {
            *state.dnat_users.entry(*set).or_default() += 1;
        }
        if is_shared(*set) {
            let count = state.shared.entry((*set, key.clone())).or_default();
            *count += 1;
            if *count > 1 {
                continue;
            }
        }
        emit(*set, key, value);
    }
}

fn account_deletes(
    state: &mut FamilyState,
    elements: &[(SetName, Key, Value)],
    ops: &mut ElementOps,
) {
    for (set, key, _) in elements {
        if let SetName::Dnat(_) | SetName::NodePortDnat(_) = set {
            if let Some(users) = state.dnat_users.get_mut(set) {
                *users = users.saturating_sub(1);
            }
        }
        if is_shared(*set) {
            let entry = (*set, key.clone());
            match state.shared.get_mut(&entry) {
                Some(count) if *count > 1 => {
                    *count -= 1;
                    continue;
                }
                _ => {
                    state.shared.remove(&entry);
                }
            }
        }
        ops.deletes.entry(*set).or_default().push(key.clone());
    }
}

fn write_chain(
    tx: &mut Transaction,
    fam: &str,
    owner: Option<&Arc<ServicePortName>>,
    chain: &ChainDef,
    flush: bool,
) {
    let name = quote(&chain.name);
    if flush {
        tx.line(owner, format!("flush chain {fam} {TABLE} {name}"));
    }
    for rule in &chain.rules {
        tx.line(owner, format!("add rule {fam} {TABLE} {name} {rule}"));
    }
}

fn affinity_declaration(fam: &str, ctx: &Context, set: &AffinitySet) -> String {
    let addr = match ctx.family {
        IpFamily::V4 => "ipv4_addr",
        IpFamily::V6 => "ipv6_addr",
    };
    format!(
        "add set {fam} {TABLE} {} {{ type {addr}; flags dynamic,timeout; timeout {}s; }}",
        quote(&set.name),
        set.timeout_seconds
    )
}

/// Deletes chains that have been unused for at least a second.
fn delete_due_stale_chains(state: &mut FamilyState, fam: &str, now: Instant, tx: &mut Transaction) {
    let (due, keep): (Vec<_>, Vec<_>) = state.stale_chains.drain(..).partition(|(name, since)| {
        now.duration_since(*since) >= STALE_CHAIN_DELAY && !state.chains.contains(name)
    });
    state.stale_chains = keep;
    for (name, _) in due {
        tx.line(None, format!("delete chain {fam} {TABLE} {}", quote(&name)));
    }
}

/// Elements per command in a full sync's text (nft parses a few large commands much faster
/// than many small ones) and per transaction of a staged build.
const ELEMENTS_PER_COMMAND: usize = 1000;
const ELEMENTS_PER_STAGE: usize = 4096;

/// How a full sync meets the kernel.
enum FullMode<'a> {
    /// `add table; delete table;` and everything, in one transaction: the kernel state is
    /// unknown to this process (first sync with a runner that cannot read the kernel, or
    /// after repeated failures).
    Rebuild,
    /// There is no table: create it (in stages when large, hooked in the last one).
    Fresh,
    /// Rewrite the table in place; with the kernel's listing, only differing elements.
    InPlace(Option<&'a KernelTable>),
}

/// Builds the transactions of a full sync (one, or several for a staged build of a large
/// fresh table).
#[allow(clippy::too_many_arguments)]
fn full_sync(
    state: &mut FamilyState,
    ctx: &Context,
    input: SyncInput<'_>,
    now: Instant,
    warnings: &mut Vec<String>,
    kernel: &Kernel,
    force_rebuild: bool,
    staged_above: usize,
    drift: &mut Drift,
) -> Vec<Transaction> {
    let fam = ctx.ip();
    let mode = match kernel {
        _ if force_rebuild => FullMode::Rebuild,
        // A table of the same name that this proxy did not write (upstream kube-proxy's
        // nftables mode, whose chains and sets differ): replace it in one transaction.
        Kernel::Present(table) if !table.chains.contains(skeleton::DISPATCH_CHAIN) => {
            FullMode::Rebuild
        }
        Kernel::Absent => FullMode::Fresh,
        Kernel::Present(table) => FullMode::InPlace(Some(table)),
        Kernel::Unknown if state.initialized => FullMode::InPlace(None),
        Kernel::Unknown => FullMode::Rebuild,
    };
    let in_place = matches!(mode, FullMode::InPlace(_));
    // What exists before this sync: from the kernel's listing when there is one, else from
    // this process's bookkeeping.
    let (old_chains, old_affinity, old_dnat, old_slots, old_nodeport_ips) = match &mode {
        FullMode::InPlace(Some(table)) => {
            let chains: HashSet<Arc<str>> = table
                .chains
                .iter()
                .filter(|c| !skeleton::is_static_chain(c))
                .map(|c| Arc::from(c.as_str()))
                .collect();
            let affinity: HashSet<Arc<str>> = table
                .sets
                .keys()
                .filter(|s| s.starts_with("affinity-"))
                .map(|s| Arc::from(s.as_str()))
                .collect();
            let named: Vec<SetName> = table
                .sets
                .keys()
                .filter_map(|s| skeleton::set_named(s))
                .collect();
            let dnat: BTreeSet<SetName> = named
                .iter()
                .filter(|s| matches!(s, SetName::Dnat(_) | SetName::NodePortDnat(_)))
                .copied()
                .collect();
            let mut slots = Slots::default();
            for set in &named {
                match set {
                    SetName::Backends(i) => slots.addresses = slots.addresses.max(i + 1),
                    SetName::NodePortBackends(i) => slots.node_ports = slots.node_ports.max(i + 1),
                    _ => {}
                }
            }
            let nodeport_ips = table.sets.contains_key(&SetName::NodePortIps.name());
            (chains, affinity, dnat, slots, nodeport_ips)
        }
        FullMode::InPlace(None) => (
            std::mem::take(&mut state.chains),
            std::mem::take(&mut state.affinity_sets),
            std::mem::take(&mut state.dnat_created),
            state.slots,
            state.ctx.as_ref().is_some_and(|c| c.nodeports_restricted()),
        ),
        FullMode::Rebuild | FullMode::Fresh => Default::default(),
    };
    state.chains.clear();
    state.affinity_sets.clear();
    state.dnat_created.clear();
    state.by_port.clear();
    state.shared.clear();
    state.dnat_users.clear();
    if !in_place {
        state.stale_chains.clear();
    }

    // Every port in name order (conflicts resolve deterministically).
    let mut elements: BTreeMap<SetName, Vec<(Key, Value)>> = BTreeMap::new();
    let mut affinity_decls = Transaction::new();
    let mut chain_decls = Transaction::new();
    let mut chain_rules = Transaction::new();
    for (name, plan) in &input.plan.services {
        let c = render(plan, ctx, warnings);
        let owner = Arc::new(name.clone());
        account_adds(state, &c.elements, |set, key, value| {
            elements
                .entry(set)
                .or_default()
                .push((key.clone(), value.clone()))
        });
        for set in &c.affinity_sets {
            if state.affinity_sets.insert(set.name.clone()) {
                affinity_decls.line(Some(&owner), affinity_declaration(fam, ctx, set));
            }
        }
        for chain in &c.chains {
            state.chains.insert(chain.name.clone());
            chain_decls.line(
                Some(&owner),
                format!("add chain {fam} {TABLE} {}", quote(&chain.name)),
            );
            write_chain(&mut chain_rules, fam, Some(&owner), chain, in_place);
        }
        state.by_port.insert(name.clone(), plan.clone());
    }
    if let NodePortDestinations::Addresses(ips) = &ctx.nodeports {
        let set = elements.entry(SetName::NodePortIps).or_default();
        set.extend(ips.iter().map(|ip| (Key::Addr(*ip), Value::None)));
    }
    let dnat_sets: BTreeSet<SetName> = state
        .dnat_users
        .iter()
        .filter(|(_, users)| **users > 0)
        .map(|(s, _)| *s)
        .collect();
    let slots = Slots::needed(&dnat_sets).max(old_slots);

    // Declarations and every rule but the base chains'.
    let mut head = Transaction::new();
    if let FullMode::Rebuild = mode {
        // Replace whatever the table held, atomically.
        head.line(None, format!("add table {fam} {TABLE}"));
        head.line(None, format!("delete table {fam} {TABLE}"));
    }
    skeleton::declare(&mut head, ctx, &dnat_sets, Slots::default());
    skeleton::declare_slot_objects(&mut head, ctx, Slots::default(), slots);
    skeleton::write_slot_rules(&mut head, ctx, Slots::default(), slots, in_place);
    state.slots = slots;
    head.append(affinity_decls);
    head.append(chain_decls);
    skeleton::write_static_chain_rules(&mut head, ctx);
    skeleton::write_dispatch(&mut head, ctx, &dnat_sets);
    head.append(chain_rules);

    // Elements: every one, or the differences from the kernel.
    let sets: Vec<SetName> = skeleton::static_sets(ctx)
        .into_iter()
        .chain(dnat_sets.iter().copied())
        .chain(skeleton::slot_sets(slots))
        .collect();
    let mut deletes: Vec<ElementCommand> = Vec::new();
    let mut adds: Vec<ElementCommand> = Vec::new();
    let mut count = 0;
    for set in sets {
        let wanted = elements.remove(&set).unwrap_or_default();
        let kernel_elements = match &mode {
            FullMode::InPlace(Some(table)) => table.sets.get(&set.name()),
            _ => None,
        };
        let (set_deletes, set_adds) = match kernel_elements {
            // A set the kernel does not have yet: declared above, every element added.
            None if matches!(mode, FullMode::InPlace(Some(_))) => (Vec::new(), wanted),
            None => {
                if in_place {
                    head.line(
                        None,
                        format!("flush {} {fam} {TABLE} {}", set.keyword(), set.name()),
                    );
                }
                (Vec::new(), wanted)
            }
            Some(listed) => {
                let diffed = match listed {
                    Some(listed) => kernel::diff(set, ctx.family, listed, wanted),
                    None => Err(wanted),
                };
                match diffed {
                    Ok(d) => {
                        drift.elements += d.deletes.len() + d.adds.len();
                        (d.deletes, d.adds)
                    }
                    Err(wanted) => {
                        // Sets with timeouts or intervals are not read back: not drift.
                        if listed.is_some() {
                            drift.rewritten_sets += 1;
                        }
                        head.line(
                            None,
                            format!("flush {} {fam} {TABLE} {}", set.keyword(), set.name()),
                        );
                        (Vec::new(), wanted)
                    }
                }
            }
        };
        count += set_adds.len();
        if !set_deletes.is_empty() {
            let elements = set_deletes.into_iter().map(|k| (k, Value::None)).collect();
            deletes.push(ElementCommand {
                delete: true,
                set,
                elements,
            });
        }
        if !set_adds.is_empty() {
            adds.push(ElementCommand {
                delete: false,
                set,
                elements: set_adds,
            });
        }
    }

    let mut base = Transaction::new();
    skeleton::write_base_rules(&mut base, ctx);
    // (Base rules come after every element: see the staged build below.)

    let mut cleanup = Transaction::new();
    if in_place {
        // Objects of the previous state that are no longer wanted.
        for chain in old_chains.iter().filter(|c| !state.chains.contains(*c)) {
            cleanup.line(None, format!("flush chain {fam} {TABLE} {}", quote(chain)));
            if !state.stale_chains.iter().any(|(n, _)| n == chain) {
                state.stale_chains.push((chain.clone(), now));
            }
        }
        for set in old_affinity
            .iter()
            .filter(|s| !state.affinity_sets.contains(*s))
        {
            cleanup.line(None, format!("delete set {fam} {TABLE} {}", quote(set)));
        }
        for set in old_dnat.iter().filter(|s| !dnat_sets.contains(*s)) {
            cleanup.line(
                None,
                format!("delete {} {fam} {TABLE} {}", set.keyword(), set.name()),
            );
        }
        if old_nodeport_ips && !ctx.nodeports_restricted() {
            cleanup.line(None, format!("delete set {fam} {TABLE} nodeport-ips"));
        }
        delete_due_stale_chains(state, fam, now, &mut cleanup);
    }
    state.dnat_created = dnat_sets;

    // Nothing reaches a new table, or one whose staged build was cut short, before the rules
    // of its base chains exist.
    let unhooked = match &mode {
        FullMode::Fresh => true,
        FullMode::InPlace(Some(table)) => !table.hooked,
        _ => false,
    };
    if let FullMode::InPlace(Some(_)) = &mode {
        drift.unhooked = unhooked;
        drift.chains = state
            .chains
            .iter()
            .filter(|c| !old_chains.contains(*c))
            .count();
    }
    if unhooked && count > staged_above {
        // A large table nothing reaches yet: declarations and rules first, elements in
        // transactions of their own, the base chains' rules last. Traffic sees no table or
        // all of it, and no single transaction (nor the nft process reading it) holds every
        // element.
        let mut first = head;
        for command in deletes {
            for chunk in command.elements.chunks(ELEMENTS_PER_COMMAND) {
                first.element_command(
                    fam,
                    None,
                    ElementCommand {
                        delete: true,
                        set: command.set,
                        elements: chunk.to_vec(),
                    },
                );
            }
        }
        let mut stages = vec![first];
        for command in adds {
            for chunk in command.elements.chunks(ELEMENTS_PER_STAGE) {
                let mut tx = Transaction::new();
                tx.element_command(
                    fam,
                    None,
                    ElementCommand {
                        delete: false,
                        set: command.set,
                        elements: chunk.to_vec(),
                    },
                );
                stages.push(tx);
            }
        }
        base.append(cleanup);
        stages.push(base);
        return stages;
    }
    let mut tx = head;
    for command in deletes.into_iter().chain(adds) {
        for chunk in command.elements.chunks(ELEMENTS_PER_COMMAND) {
            tx.element_command(
                fam,
                None,
                ElementCommand {
                    delete: command.delete,
                    set: command.set,
                    elements: chunk.to_vec(),
                },
            );
        }
    }
    tx.append(base);
    tx.append(cleanup);
    vec![tx]
}

fn partial_sync(
    state: &mut FamilyState,
    ctx: &Context,
    input: SyncInput<'_>,
    now: Instant,
    warnings: &mut Vec<String>,
) -> Transaction {
    let fam = ctx.ip();
    let mut declarations = Transaction::new();
    let mut rules = Transaction::new();
    let mut deletes = Transaction::new();
    let mut adds = Transaction::new();
    let mut cleanup = Transaction::new();
    let mut stale_affinity: Vec<Arc<str>> = Vec::new();

    for name in input.changed {
        let owner = Arc::new(name.clone());
        // The context is unchanged between full syncs, so the old plan renders exactly what
        // was applied.
        let old = match state.by_port.remove(name) {
            Some(applied) => contribute(&applied, ctx),
            None => Contribution::default(),
        };
        let new = match input.plan.services.get(name) {
            Some(plan) => {
                state.by_port.insert(name.clone(), plan.clone());
                render(plan, ctx, warnings)
            }
            None => Contribution::default(),
        };

        // Elements: what the old contribution had and the new one lacks, and the reverse.
        let new_elements: HashSet<&(SetName, Key, Value)> = new.elements.iter().collect();
        let old_elements: HashSet<&(SetName, Key, Value)> = old.elements.iter().collect();
        let removed: Vec<(SetName, Key, Value)> = old
            .elements
            .iter()
            .filter(|e| !new_elements.contains(e))
            .cloned()
            .collect();
        let added: Vec<(SetName, Key, Value)> = new
            .elements
            .iter()
            .filter(|e| !old_elements.contains(e))
            .cloned()
            .collect();
        let mut ops = ElementOps::default();
        account_deletes(state, &removed, &mut ops);
        account_adds(state, &added, |set, key, value| {
            ops.adds
                .entry(set)
                .or_default()
                .push((key.clone(), value.clone()))
        });
        ops.write(fam, Some(&owner), &mut deletes, &mut adds);

        // Affinity sets and chains.
        for set in &new.affinity_sets {
            if state.affinity_sets.insert(set.name.clone()) {
                declarations.line(Some(&owner), affinity_declaration(fam, ctx, set));
            }
        }
        let old_chains: HashMap<&Arc<str>, &ChainDef> =
            old.chains.iter().map(|c| (&c.name, c)).collect();
        for chain in &new.chains {
            let exists = state.chains.contains(&chain.name);
            if !exists {
                state.chains.insert(chain.name.clone());
                state.stale_chains.retain(|(n, _)| n != &chain.name);
                declarations.line(
                    Some(&owner),
                    format!("add chain {fam} {TABLE} {}", quote(&chain.name)),
                );
            }
            if exists
                && old_chains
                    .get(&chain.name)
                    .is_some_and(|o| o.rules == chain.rules)
            {
                continue;
            }
            write_chain(&mut rules, fam, Some(&owner), chain, exists);
        }
        let new_chain_names: HashSet<&Arc<str>> = new.chains.iter().map(|c| &c.name).collect();
        for chain in old
            .chains
            .iter()
            .filter(|c| !new_chain_names.contains(&c.name))
        {
            state.chains.remove(&chain.name);
            cleanup.line(
                Some(&owner),
                format!("flush chain {fam} {TABLE} {}", quote(&chain.name)),
            );
            state.stale_chains.push((chain.name.clone(), now));
        }
        let new_sets: HashSet<&Arc<str>> = new.affinity_sets.iter().map(|s| &s.name).collect();
        for set in old
            .affinity_sets
            .iter()
            .filter(|s| !new_sets.contains(&s.name))
        {
            state.affinity_sets.remove(&set.name);
            stale_affinity.push(set.name.clone());
        }
    }

    // New `dnat-N` sets: declare them, any new slots, and rewrite the dispatch rules.
    let wanted: BTreeSet<SetName> = state
        .dnat_users
        .iter()
        .filter(|(_, u)| **u > 0)
        .map(|(s, _)| *s)
        .collect();
    let missing: Vec<SetName> = wanted
        .iter()
        .filter(|s| !state.dnat_created.contains(*s))
        .copied()
        .collect();
    let mut dispatch = Transaction::new();
    if !missing.is_empty() {
        for set in &missing {
            declarations.line(
                None,
                format!("add {}", skeleton::set_declaration(ctx, *set)),
            );
            state.dnat_created.insert(*set);
        }
        // Slot maps are declared with the other declarations (elements are added to them
        // later in this transaction); slot chains and dispatch rules follow.
        let slots = Slots::needed(&state.dnat_created).max(state.slots);
        skeleton::declare_slots(&mut declarations, ctx, state.slots, slots);
        state.slots = slots;
        skeleton::write_dispatch(&mut dispatch, ctx, &state.dnat_created);
    }
    for set in stale_affinity {
        cleanup.line(None, format!("delete set {fam} {TABLE} {}", quote(&set)));
    }
    delete_due_stale_chains(state, fam, now, &mut cleanup);

    let mut tx = declarations;
    tx.append(dispatch);
    tx.append(rules);
    tx.append(deletes);
    tx.append(adds);
    tx.append(cleanup);
    tx
}
