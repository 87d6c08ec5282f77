//! The iptables dataplane: renders each sync as `iptables-restore --noflush` input per family
//! and keeps the bookkeeping of what was applied (each service port's chains and its rules in
//! the static chains), so a partial sync writes the changed ports' chains and only the
//! changed rules of the static chains (less than upstream's MinimizeIPTablesRestore, which
//! rewrites the static chains every time).
//!
//! Pure: a [`Restorer`] runs the tools (the binary's, or a fake in tests).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use kube_proxy_model::context::{FamilyContext, ProxyPolicy};
use kube_proxy_model::dataplane::{
    Dataplane, SyncError, SyncErrorKind, SyncInput, SyncReport, TableRules,
};
use kube_proxy_model::{FamilyPlan, IpFamily};

use crate::restore::{self, Rewrite, CANARY_TABLES, KUBE_PROXY_CANARY};
use crate::service::{Style, LARGE_CLUSTER_ENDPOINTS};

/// Why an input was not applied.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The tool rejected the input (nothing was applied); its message names the line.
    #[error("{0}")]
    Rejected(String),
    /// The xtables lock was held too long by someone else: try again soon.
    #[error("{0}")]
    Busy(String),
    /// The tool could not be run (missing binary: the message names the package).
    #[error("{0}")]
    Unavailable(String),
    /// The input was to be printed, and the reader of standard output went away.
    #[error("standard output was closed")]
    OutputClosed,
}

/// Runs `iptables-restore`/`iptables-save` (or `ip6tables-…`) for a family.
pub trait Restorer: Send {
    /// Applies `input` with `--noflush`, atomically per table.
    fn restore(&mut self, family: IpFamily, input: &str) -> Result<(), RestoreError>;
    /// What `iptables-save` prints for the filter and nat tables.
    fn save(&mut self, family: IpFamily) -> Result<String, RestoreError>;
    /// Whether it reads the kernel (a printer does not: nothing to check).
    fn reads_kernel(&self) -> bool {
        true
    }
    /// How many rules `chain` of `table` holds; `None` when the chain does not exist.
    fn chain_rules(
        &mut self,
        family: IpFamily,
        table: &str,
        chain: &str,
    ) -> Result<Option<usize>, RestoreError>;
}

/// The chains of `table` in an `iptables-save` text.
pub fn saved_chains(saved: &str, table: &str) -> BTreeSet<String> {
    table_lines(saved, table)
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The lines of `table`'s section of an `iptables-save` output or a restore input.
pub fn table_lines<'a>(saved: &'a str, table: &str) -> impl Iterator<Item = &'a str> {
    let header = format!("*{table}");
    saved
        .lines()
        .skip_while(move |l| *l != header)
        .skip(1)
        .take_while(|l| *l != "COMMIT")
}

/// Whether `chain` of `table` has a rule jumping to `target`.
pub fn saved_jump(saved: &str, table: &str, chain: &str, target: &str) -> bool {
    let prefix = format!("-A {chain} ");
    let jump = format!("-j {target}");
    table_lines(saved, table)
        .any(|l| l.starts_with(&prefix) && (l.ends_with(&jump) || l.contains(&format!("{jump} "))))
}

#[derive(Default)]
struct FamilyState {
    /// The context of the last successful sync (`None`: nothing applied yet, or the kernel's
    /// state is unknown after a failure; either way the next sync is full).
    ctx: Option<FamilyContext>,
    style: Style,
    /// What each service port has in the kernel (its chains, its rules in the static ones).
    ports: restore::PortCache,
    /// When the canary chains were last found (or created).
    canary_seen: Option<Instant>,
}

pub struct IptablesProxier<R: Restorer> {
    policy: ProxyPolicy,
    runner: R,
    families: BTreeMap<IpFamily, FamilyState>,
    canary_interval: Duration,
    stage_chains: Option<usize>,
    nfacct: bool,
    warnings: Vec<String>,
}

impl<R: Restorer> IptablesProxier<R> {
    pub fn new(policy: ProxyPolicy, runner: R) -> Self {
        IptablesProxier {
            policy,
            runner,
            families: BTreeMap::new(),
            canary_interval: Duration::from_secs(30),
            stage_chains: None,
            nfacct: false,
            warnings: Vec::new(),
        }
    }

    /// Writes a full sync's per-service-port chains in restores of about `chains` chains
    /// each, before the one with the static chains: `iptables-nft-restore`'s time grows
    /// faster than linearly with the chains of one input (10k Services x 2 endpoints: 29 s
    /// in one input, 3 s in six).
    pub fn with_staged_full_syncs(mut self, chains: Option<usize>) -> Self {
        self.stage_chains = chains;
        self
    }

    /// How often a partial sync first checks that the canary chains are still there
    /// (upstream: every `syncPeriod`).
    pub fn with_canary_interval(mut self, interval: Duration) -> Self {
        self.canary_interval = interval;
        self
    }

    /// The nfacct counters exist (the binary created them): rules count packets in them.
    pub fn with_nfacct_counters(mut self, nfacct: bool) -> Self {
        self.nfacct = nfacct;
        self
    }

    pub fn runner(&self) -> &R {
        &self.runner
    }

    pub fn runner_mut(&mut self) -> &mut R {
        &mut self.runner
    }

    /// Whether our chains of `family` are as we wrote them, checked at most every canary
    /// interval (`Ok(None)` when not due or intact): every canary chain exists and the static
    /// chains only we write hold the rules we put there. Else what is wrong.
    fn check_canaries(&mut self, family: IpFamily) -> Result<Option<String>, RestoreError> {
        let state = self.families.entry(family).or_default();
        if !self.runner.reads_kernel()
            || state
                .canary_seen
                .is_some_and(|seen| seen.elapsed() < self.canary_interval)
        {
            return Ok(None);
        }
        for table in CANARY_TABLES {
            if self
                .runner
                .chain_rules(family, table, KUBE_PROXY_CANARY)?
                .is_none()
            {
                return Ok(Some(format!(
                    "{KUBE_PROXY_CANARY} of {family} is gone from {table}: someone deleted kube-proxy's chains"
                )));
            }
        }
        let expected: Vec<((&'static str, &'static str), usize)> = self
            .families
            .entry(family)
            .or_default()
            .ports
            .static_counts
            .iter()
            .filter(|(key, _)| restore::is_exclusive_static_chain(key))
            .map(|(key, count)| (*key, *count))
            .collect();
        for ((table, chain), count) in expected {
            let found = self.runner.chain_rules(family, table, chain)?;
            if found != Some(count) {
                return Ok(Some(format!(
                    "{chain} in the {family} {table} table holds {} rules instead of {count}: someone else changed it",
                    found.map_or("no chain and no".to_string(), |n| n.to_string())
                )));
            }
        }
        self.families.entry(family).or_default().canary_seen = Some(Instant::now());
        Ok(None)
    }
}

/// The rendering style for `plan`: large-cluster mode past the threshold, as upstream counts
/// (every endpoint of every service port).
fn style_for(plan: &FamilyPlan, nfacct: bool) -> Style {
    let endpoints: usize = plan
        .services
        .values()
        .map(|p| p.reachable_endpoints.len())
        .sum();
    Style {
        large_cluster: endpoints > LARGE_CLUSTER_ENDPOINTS,
        nfacct,
    }
}

impl<R: Restorer> Dataplane for IptablesProxier<R> {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn sync(&mut self, input: SyncInput<'_>) -> Result<SyncReport, SyncError> {
        let family = input.family;
        let ctx = FamilyContext::resolve(&self.policy, family, input.node)
            .with_service_cidrs(input.service_cidrs);
        let style = style_for(input.plan, self.nfacct);
        let state = self.families.entry(family).or_default();
        let mut full = input.full || state.ctx.as_ref() != Some(&ctx) || state.style != style;
        let failed = |error: RestoreError, partial: bool| SyncError {
            family,
            kind: match error {
                RestoreError::OutputClosed => SyncErrorKind::OutputClosed,
                _ => SyncErrorKind::Retry,
            },
            message: format!("iptables-restore failed: {error}"),
            partial,
        };
        if !full {
            if let Some(problem) = self.check_canaries(family).map_err(|e| failed(e, true))? {
                self.warnings
                    .push(format!("{problem}; rewriting all of kube-proxy's chains"));
                full = true;
            }
        }
        let mut saved = None;
        let (rewrite, candidates) = if full {
            // Every service-port chain the kernel has is a candidate for deletion.
            let text = self.runner.save(family).map_err(|e| failed(e, false))?;
            let existing = saved_chains(&text, "nat");
            saved = Some(text);
            (Rewrite::All, existing)
        } else {
            // The chains the changed ports had before.
            let state = self.families.entry(family).or_default();
            let previous: BTreeSet<String> = input
                .changed
                .iter()
                .filter_map(|name| state.ports.ports.get(name))
                .flat_map(|port| port.chains.iter())
                .cloned()
                .collect();
            (Rewrite::Ports(input.changed), previous)
        };
        let state = self.families.entry(family).or_default();
        let mut rendered = restore::render(
            input.plan,
            &ctx,
            rewrite,
            &candidates,
            style,
            &mut state.ports,
        );
        let inputs: Vec<String> = match &saved {
            // A full sync also creates the canaries and makes sure the built-in chains
            // jump to ours.
            Some(saved) => rendered.full_inputs(
                self.stage_chains,
                Some(&|table: &str, chain: &str, target: &str| {
                    saved_jump(saved, table, chain, target)
                }),
            ),
            None => rendered.partial_input().into_iter().collect(),
        };
        let state = self.families.entry(family).or_default();
        for text in &inputs {
            if let Err(error) = self.runner.restore(family, text) {
                // The kernel kept what it had (of this input); the next sync rewrites
                // everything.
                let error = match error {
                    RestoreError::Rejected(message) => RestoreError::Rejected(
                        match restore::describe_failure(text, &message, &state.ports) {
                            Some(at) => format!("{message}: {at}"),
                            None => message,
                        },
                    ),
                    other => other,
                };
                *state = FamilyState::default();
                return Err(failed(error, !full));
            }
        }
        state.ctx = Some(ctx);
        state.style = style;
        if full {
            state.canary_seen = Some(Instant::now());
        }
        let written = |table| {
            inputs
                .iter()
                .map(|i| restore::rules_written(i, table))
                .sum()
        };
        let (filter_total, nat_total) = (state.ports.filter_rules, state.ports.nat_rules);
        Ok(SyncReport {
            service_ports: input.plan.services.len(),
            changed: input.changed.len(),
            full,
            statements: inputs.iter().map(|i| i.lines().count()).sum(),
            transactions: inputs.len(),
            rules: vec![
                TableRules {
                    table: "filter",
                    written: written("filter"),
                    total: filter_total,
                },
                TableRules {
                    table: "nat",
                    written: written("nat"),
                    total: nat_total,
                },
            ],
        })
    }

    fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }
}
