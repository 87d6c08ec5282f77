//! The single owner of mutable state: applies source events to the cluster state, decides
//! when to sync (via the scheduler), updates the per-family plans and hands them, with what
//! changed since the last successful sync, to the dataplane.
//!
//! It never syncs before both Services and EndpointSlices have been listed once, so on a
//! restart the rules already in the kernel keep serving until fresh state replaces them.
//! Changes of a failed sync are kept and retried, with a full rewrite.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Instant, SystemTime};

use std::sync::Arc;

use kube_proxy_model::state::{ChangeCounts, ClusterState, Outcome};
use kube_proxy_model::{FamilyPlan, IpFamily, PlanContext, Protocol, ServicePortName};
use tokio::sync::mpsc;
use tracing::{debug, error, info, trace, warn};

use crate::source::{ObjectEvent, SourceEvent};
use crate::sync::dataplane::{Dataplane, NodeView, SyncInput};
use crate::sync::object_log::ObjectLog;
use crate::sync::scheduler::{Scheduler, SchedulerConfig, SyncKind};
use crate::sync::sync_status::SharedSyncStatus;
use crate::telemetry::metrics::{family_labels, unix_seconds, Metrics, NoLocalEndpoints};
use kube_proxy_model::dataplane::SyncErrorKind;

/// What a family still has to program: changes since its last successful sync.
#[derive(Debug, Default)]
struct Pending {
    changed: BTreeSet<ServicePortName>,
    full: bool,
}

/// Where node addresses come from: the `bindAddress` override and the host's interfaces.
pub struct NodeAddressing {
    /// `bindAddress` when not unspecified: overrides the Node's primary IP (as upstream).
    pub bind_address: Option<std::net::IpAddr>,
    /// Returns this host's interface addresses of a family (I/O, injected for tests).
    pub local_addresses: Box<dyn Fn(IpFamily) -> Vec<std::net::IpAddr> + Send>,
}

impl Default for NodeAddressing {
    fn default() -> Self {
        NodeAddressing {
            bind_address: None,
            local_addresses: Box::new(|_| Vec::new()),
        }
    }
}

pub struct EventLoop {
    state: ClusterState,
    addressing: NodeAddressing,
    plans: BTreeMap<IpFamily, FamilyPlan>,
    pending: BTreeMap<IpFamily, Pending>,
    scheduler: Scheduler,
    dataplane: Box<dyn Dataplane>,
    status: SharedSyncStatus,
    ctx: PlanContext,
    syncs: u64,
    announced_ready: bool,
    /// Return from `run` after the first sync in which every family succeeded (`--once`).
    exit_after_first_sync: bool,
    all_ok_once: bool,
    /// The dataplane's output was closed by its reader (`--dry-run | head`): stop.
    output_closed: bool,
    /// Whether the Node list in progress contained this proxy's Node.
    node_listed: bool,
    /// ServiceCIDRs of a list in progress (a handful: kept whole, applied at its end).
    listing_cidrs: Vec<k8s_openapi::api::networking::v1::ServiceCIDR>,
    /// Waiting for the Node before the first sync: the requirement and when waiting began.
    node_wait: Option<(NodeWait, Instant)>,
    /// "Waiting for the Node" was logged.
    node_wait_logged: bool,
    metrics: Arc<Metrics>,
    /// Change totals already added to the `*_changes_total` counters.
    counts_reported: ChangeCounts,
    /// Change totals when the last sync checked changes out (for `*_changes_pending`).
    counts_at_checkout: ChangeCounts,
    /// EndpointSlice change-trigger times not yet programmed, per family (network
    /// programming latency).
    trigger_times: BTreeMap<IpFamily, Vec<SystemTime>>,
    /// Service ports counted in `kubeproxy_sync_proxy_rules_no_local_endpoints_total`.
    no_local: BTreeMap<IpFamily, NoLocalEndpoints>,
    /// Deletes stale UDP conntrack entries of a family after a sync that changed UDP ports.
    conntrack_cleanup: Option<ConntrackCleanup>,
    /// Health-check node ports of eTP-Local load balancers.
    health_checks: Option<crate::servers::service_health::HealthCheckServers>,
    /// Run once, after the first sync in which every family was programmed.
    after_first_sync: Option<Box<dyn FnOnce() + Send>>,
    /// Warnings about invalid objects and dataplane problems, each once, rate-limited.
    object_log: ObjectLog,
    /// Trigger times older than this are from before the proxy started (a relist), not
    /// changes this proxy programs: upstream ignores them too.
    started_at: SystemTime,
}

/// The first sync waits for this proxy's Node, as upstream's NodeManager does: the Node must
/// exist with addresses (and pod CIDRs when local traffic is detected by them), so the first
/// ruleset already has the node's IPs. Past the timeout the process gives up.
#[derive(Clone, Copy, Debug)]
pub struct NodeWait {
    pub need_pod_cidrs: bool,
    pub timeout: std::time::Duration,
}

impl NodeWait {
    /// Upstream's bound: five minutes.
    pub const UPSTREAM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);
}

/// Why the event loop stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("this node's Node object {node:?} {problem} after {waited:?}; check --hostname-override and that the kubelet registered the node")]
    NodeNotReady {
        node: String,
        problem: &'static str,
        waited: std::time::Duration,
    },
}

/// Deletes the stale UDP conntrack entries of a family given the state and this host's
/// addresses of that family (see `crate::kernel::conntrack::reconcile`).
pub type ConntrackCleanup = Box<
    dyn FnMut(
            IpFamily,
            &ClusterState,
            &[std::net::IpAddr],
        ) -> std::io::Result<crate::kernel::conntrack::Reconciled>
        + Send,
>;

/// The annotation the EndpointSlice controller sets to when the change that caused the
/// slice's update happened.
const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Bound on remembered trigger times per family while syncs keep failing.
const MAX_TRIGGER_TIMES: usize = 10_000;

impl EventLoop {
    pub fn new(
        node_name: &str,
        families: &[IpFamily],
        scheduler: SchedulerConfig,
        ctx: PlanContext,
        dataplane: Box<dyn Dataplane>,
        status: SharedSyncStatus,
        addressing: NodeAddressing,
    ) -> Self {
        EventLoop {
            state: ClusterState::new(node_name),
            addressing,
            plans: families
                .iter()
                .map(|f| (*f, FamilyPlan::default()))
                .collect(),
            pending: families
                .iter()
                .map(|f| {
                    (
                        *f,
                        Pending {
                            full: true,
                            ..Default::default()
                        },
                    )
                })
                .collect(),
            scheduler: Scheduler::new(scheduler),
            dataplane,
            status,
            ctx,
            syncs: 0,
            announced_ready: false,
            exit_after_first_sync: false,
            all_ok_once: false,
            output_closed: false,
            node_listed: false,
            node_wait: None,
            node_wait_logged: false,
            listing_cidrs: Vec::new(),
            metrics: Arc::new(Metrics::default()),
            counts_reported: ChangeCounts::default(),
            counts_at_checkout: ChangeCounts::default(),
            trigger_times: BTreeMap::new(),
            started_at: SystemTime::now(),
            conntrack_cleanup: None,
            no_local: BTreeMap::new(),
            health_checks: None,
            after_first_sync: None,
            object_log: ObjectLog::new(Instant::now()),
        }
    }

    /// Runs `task` once the rules of every family have been programmed the first time (e.g.
    /// removing another proxy mode's rules only once ours carry the traffic).
    pub fn after_first_sync(mut self, task: Box<dyn FnOnce() + Send>) -> Self {
        self.after_first_sync = Some(task);
        self
    }

    /// Serves health-check node ports with `servers`, updated after every sync.
    pub fn with_health_checks(
        mut self,
        servers: crate::servers::service_health::HealthCheckServers,
    ) -> Self {
        self.health_checks = Some(servers);
        self
    }

    /// Cleans stale UDP conntrack entries with `cleanup` after syncs.
    pub fn with_conntrack_cleanup(mut self, cleanup: ConntrackCleanup) -> Self {
        self.conntrack_cleanup = Some(cleanup);
        self
    }

    /// Reports into `metrics` (a private set otherwise).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Holds the first sync until this proxy's Node is known with addresses (API mode).
    pub fn wait_for_node(mut self, wait: NodeWait) -> Self {
        self.node_wait = Some((wait, Instant::now()));
        self
    }

    /// Whether syncing may start: both kinds listed and, if required, the Node known. Errs
    /// once the Node wait has timed out.
    fn ready(&mut self, now: Instant) -> Result<bool, LoopError> {
        if !self.state.ready_to_sync() {
            return Ok(false);
        }
        let Some((wait, since)) = self.node_wait else {
            return Ok(true);
        };
        let problem = match self.state.node() {
            None => Some("does not exist"),
            Some(node) if node.addresses.is_empty() => Some("has no addresses"),
            Some(node) if wait.need_pod_cidrs && node.pod_cidrs.is_empty() => {
                Some("has no PodCIDR allocated")
            }
            Some(_) => None,
        };
        let Some(problem) = problem else {
            if self.node_wait_logged {
                info!(node = self.state.node_name(), waited = ?now.duration_since(since), "Node object is ready; starting to sync");
            }
            self.node_wait = None;
            return Ok(true);
        };
        let waited = now.duration_since(since);
        if waited >= wait.timeout {
            return Err(LoopError::NodeNotReady {
                node: self.state.node_name().to_string(),
                problem,
                waited,
            });
        }
        if !self.node_wait_logged {
            self.node_wait_logged = true;
            info!(
                node = self.state.node_name(),
                problem,
                timeout = ?wait.timeout,
                "Waiting for this node's Node object before the first sync"
            );
        }
        Ok(false)
    }

    /// Makes `run` return after the first fully successful sync.
    pub fn exit_after_first_sync(mut self, yes: bool) -> Self {
        self.exit_after_first_sync = yes;
        self
    }

    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    pub fn plan(&self, family: IpFamily) -> Option<&FamilyPlan> {
        self.plans.get(&family)
    }

    pub fn sync_count(&self) -> u64 {
        self.syncs
    }

    /// Runs until every sender is gone (or `--once`, or a closed output); errs if the Node
    /// did not become ready in time.
    pub async fn run(mut self, mut events: mpsc::Receiver<SourceEvent>) -> Result<(), LoopError> {
        {
            // Upstream marks every family updated when the sync loop starts.
            let mut status = self.status.lock().unwrap();
            let now = SystemTime::now();
            for family in self.plans.keys() {
                status.updated(*family, now);
                self.metrics
                    .last_queued_timestamp
                    .get_or_create(&family_labels(*family))
                    .set(unix_seconds(now));
            }
        }
        loop {
            let now = Instant::now();
            let ready = self.ready(now)?;
            if ready {
                if let Some(kind) = self.scheduler.due(now) {
                    self.sync(kind);
                    if self.output_closed {
                        info!("Standard output was closed by its reader; exiting");
                        return Ok(());
                    }
                    if self.exit_after_first_sync && self.all_ok_once {
                        info!("First sync done; exiting as asked (--once)");
                        return Ok(());
                    }
                    continue;
                }
            }
            self.object_log.summarize(now);
            let deadline = match self.node_wait {
                // Wake up to give up waiting for the Node (a Node event wakes up sooner).
                Some((wait, since)) if !ready && self.state.ready_to_sync() => since + wait.timeout,
                _ => self.scheduler.next_due(now),
            };
            // Wake up for the summary of held-back warnings, too.
            let deadline = match self.object_log.next_summary() {
                Some(summary) => deadline.min(summary),
                None => deadline,
            };
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => {
                        self.handle(event);
                        // Drain what is already queued so a burst becomes one sync.
                        while let Ok(event) = events.try_recv() {
                            self.handle(event);
                        }
                    }
                    None => {
                        info!("All sources stopped; the sync loop ends");
                        return Ok(());
                    }
                },
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
        }
    }

    /// Applies one source event to the state and requests a sync if anything changed.
    pub fn handle(&mut self, event: SourceEvent) {
        let node_event = matches!(event, SourceEvent::Node(_));
        // The endpoints of a Service we already know changed: nothing else is coming with
        // it, so the sync need not wait for the settle window (see `scheduler`).
        let endpoints_of_known_service = match &event {
            SourceEvent::EndpointSlices(ObjectEvent::Apply(obj) | ObjectEvent::Delete(obj)) => {
                kube_proxy_model::endpoints::slice_key(obj)
                    .is_some_and(|(service, _)| !self.state.service_ports(&service).is_empty())
            }
            _ => false,
        };
        match event {
            SourceEvent::Services(ObjectEvent::Replace(list)) => {
                let outcomes = self.state.replace_services(list.iter());
                self.log_outcomes("Service", outcomes);
            }
            SourceEvent::Services(ObjectEvent::ListStart) => self.state.begin_service_list(),
            SourceEvent::Services(ObjectEvent::Listed(obj)) => {
                let name = object_name(&obj.metadata);
                let outcome = self.state.listed_service(&obj);
                self.log_outcome("Service", &name, outcome);
            }
            SourceEvent::Services(ObjectEvent::ListDone) => self.state.finish_service_list(),
            SourceEvent::EndpointSlices(ObjectEvent::ListStart) => self.state.begin_slice_list(),
            SourceEvent::EndpointSlices(ObjectEvent::Listed(obj)) => {
                let name = object_name(&obj.metadata);
                let outcome = self.state.listed_slice(&obj);
                self.note_trigger_time(&obj, &outcome);
                self.log_outcome("EndpointSlice", &name, outcome);
            }
            SourceEvent::EndpointSlices(ObjectEvent::ListDone) => self.state.finish_slice_list(),
            SourceEvent::Node(ObjectEvent::ListStart) => self.node_listed = false,
            SourceEvent::Node(ObjectEvent::Listed(obj)) => {
                self.node_listed = true;
                if self.state.set_node(Some(&obj)) == Outcome::Changed {
                    info!(node = self.state.node_name(), "Node object updated");
                }
            }
            SourceEvent::Node(ObjectEvent::ListDone) => {
                if !self.node_listed {
                    self.state.set_node(None);
                    info!(
                        node = self.state.node_name(),
                        "This proxy's Node object is not known (yet)"
                    );
                }
            }
            SourceEvent::Services(ObjectEvent::Apply(obj)) => {
                let name = object_name(&obj.metadata);
                let outcome = self.state.apply_service(&obj);
                self.log_outcome("Service", &name, outcome);
            }
            SourceEvent::Services(ObjectEvent::Delete(obj)) => {
                self.object_log
                    .forget("Service", &object_name(&obj.metadata));
                if let Some(key) = kube_proxy_model::service::service_key(&obj) {
                    self.state.delete_service(&key);
                    trace!(service = %key, "Service deleted");
                }
            }
            SourceEvent::EndpointSlices(ObjectEvent::Replace(list)) => {
                let outcomes = self.state.replace_slices(list.iter());
                self.log_outcomes("EndpointSlice", outcomes);
            }
            SourceEvent::EndpointSlices(ObjectEvent::Apply(obj)) => {
                let name = object_name(&obj.metadata);
                let outcome = self.state.apply_slice(&obj);
                self.note_trigger_time(&obj, &outcome);
                self.log_outcome("EndpointSlice", &name, outcome);
            }
            SourceEvent::EndpointSlices(ObjectEvent::Delete(obj)) => {
                self.object_log
                    .forget("EndpointSlice", &object_name(&obj.metadata));
                self.state.delete_slice_object(&obj);
            }
            SourceEvent::Node(ObjectEvent::Replace(list)) => {
                let outcome = self.state.set_node(list.first());
                if list.is_empty() {
                    info!(
                        node = self.state.node_name(),
                        "This proxy's Node object is not known (yet)"
                    );
                } else if outcome == Outcome::Changed {
                    info!(node = self.state.node_name(), "Node object updated");
                }
            }
            SourceEvent::Node(ObjectEvent::Apply(obj)) => {
                if self.state.set_node(Some(&obj)) == Outcome::Changed {
                    debug!(node = self.state.node_name(), "Node object updated");
                }
            }
            SourceEvent::ServiceCidrs(ObjectEvent::Replace(list)) => {
                self.replace_service_cidrs(list);
            }
            SourceEvent::ServiceCidrs(ObjectEvent::ListStart) => self.listing_cidrs = Vec::new(),
            SourceEvent::ServiceCidrs(ObjectEvent::Listed(obj)) => self.listing_cidrs.push(obj),
            SourceEvent::ServiceCidrs(ObjectEvent::ListDone) => {
                let list = std::mem::take(&mut self.listing_cidrs);
                self.replace_service_cidrs(list);
            }
            SourceEvent::ServiceCidrs(ObjectEvent::Apply(obj)) => {
                let name = obj.metadata.name.clone().unwrap_or_default();
                let outcome = self.state.apply_service_cidr(&obj);
                self.log_outcome("ServiceCIDR", &name, outcome);
            }
            SourceEvent::ServiceCidrs(ObjectEvent::Delete(obj)) => {
                self.state.delete_service_cidr(&obj);
            }
            SourceEvent::Node(ObjectEvent::Delete(_)) => {
                self.state.set_node(None);
                warn!(
                    node = self.state.node_name(),
                    "This proxy's Node object was deleted"
                );
            }
        }
        if node_event {
            // Only Node events change what /healthz reports about the node.
            self.status.lock().unwrap().node =
                self.state
                    .node()
                    .map(|n| crate::sync::sync_status::NodeHealth {
                        deleting: n.deleting,
                        to_be_deleted: n.to_be_deleted,
                    });
        }
        if self.state.ready_to_sync() {
            if !self.announced_ready {
                self.announced_ready = true;
                info!(
                    services = self.state.service_count(),
                    endpoint_slices = self.state.endpoint_slice_count(),
                    "Services and EndpointSlices listed; starting to sync"
                );
                self.scheduler.request_full(Instant::now());
            }
            if self.state.has_pending_changes() {
                if endpoints_of_known_service {
                    self.scheduler.request_now(Instant::now());
                } else {
                    self.scheduler.request(Instant::now());
                }
                let mut status = self.status.lock().unwrap();
                let now = SystemTime::now();
                for family in self.plans.keys() {
                    status.queued(*family, now);
                    self.metrics
                        .last_queued_timestamp
                        .get_or_create(&family_labels(*family))
                        .set(unix_seconds(now));
                }
            }
        }
        self.report_change_counts();
    }

    fn log_outcome(&mut self, kind: &'static str, name: &str, outcome: Outcome) {
        self.object_log.outcome(kind, name, outcome, Instant::now());
    }

    fn log_outcomes(&mut self, kind: &'static str, outcomes: Vec<(String, Outcome)>) {
        let now = Instant::now();
        for (name, outcome) in outcomes {
            self.object_log.outcome(kind, &name, outcome, now);
        }
    }

    /// Replaces every ServiceCIDR (a relist or a re-read directory) and logs the result.
    fn replace_service_cidrs(&mut self, list: Vec<k8s_openapi::api::networking::v1::ServiceCIDR>) {
        let outcomes = self.state.replace_service_cidrs(list.iter());
        self.log_outcomes("ServiceCIDR", outcomes);
        debug!(
            ipv4 = ?self.state.service_cidrs(IpFamily::V4),
            ipv6 = ?self.state.service_cidrs(IpFamily::V6),
            "ServiceCIDRs replaced"
        );
    }

    /// Remembers when the change behind an accepted EndpointSlice update happened.
    fn note_trigger_time(
        &mut self,
        slice: &k8s_openapi::api::discovery::v1::EndpointSlice,
        outcome: &Outcome,
    ) {
        if !matches!(outcome, Outcome::Changed | Outcome::ChangedWithWarnings(_)) {
            return;
        }
        let family = match slice.address_type.as_str() {
            "IPv4" => IpFamily::V4,
            "IPv6" => IpFamily::V6,
            _ => return,
        };
        let Some(time) = slice
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .map(SystemTime::from)
        else {
            return;
        };
        if time <= self.started_at || !self.plans.contains_key(&family) {
            return;
        }
        let times = self.trigger_times.entry(family).or_default();
        if times.len() < MAX_TRIGGER_TIMES {
            times.push(time);
        }
    }

    /// Brings the `*_changes_total` counters and `*_changes_pending` gauges up to date.
    fn report_change_counts(&mut self) {
        let counts = self.state.change_counts();
        let m = &self.metrics;
        m.endpoint_changes_total
            .inc_by(counts.endpoint_slice_changes - self.counts_reported.endpoint_slice_changes);
        m.service_changes_total
            .inc_by(counts.service_changes - self.counts_reported.service_changes);
        self.counts_reported = counts;
        m.endpoint_changes_pending.set(
            (counts.endpoint_slice_changes - self.counts_at_checkout.endpoint_slice_changes) as i64,
        );
        m.service_changes_pending
            .set((counts.service_changes - self.counts_at_checkout.service_changes) as i64);
    }

    /// One sync: replan what changed, then program each family.
    pub fn sync(&mut self, kind: SyncKind) {
        let started = Instant::now();
        self.scheduler.started(started);
        let changes = self.state.take_changes();
        self.counts_at_checkout = self.state.change_counts();
        self.report_change_counts();
        let full = kind == SyncKind::Full;
        let mut all_ok = true;
        let mut views = BTreeMap::new();
        for (family, plan) in self.plans.iter_mut() {
            let plan_started = Instant::now();
            let labels = family_labels(*family);
            let changed = plan.update(
                &self.state,
                *family,
                &changes.services,
                changes.full,
                self.ctx,
            );
            let plan_elapsed = plan_started.elapsed();
            let pending = self.pending.entry(*family).or_default();
            pending.changed.extend(changed);
            pending.full |= full;
            let node = node_view(&self.state, &self.addressing, *family);
            views.insert(*family, node.clone());
            let apply_started = Instant::now();
            let service_cidrs = self.state.service_cidrs(*family);
            let input = SyncInput {
                family: *family,
                plan,
                changed: &pending.changed,
                full: pending.full,
                node: &node,
                service_cidrs: &service_cidrs,
            };
            let result = self.dataplane.sync(input);
            self.metrics.observe_sync(
                *family,
                result.as_ref().map(|r| r.full).unwrap_or(true),
                plan_started.elapsed(),
            );
            match result {
                Ok(report) => {
                    debug!(
                        family = %family,
                        dataplane = self.dataplane.name(),
                        full = report.full,
                        service_ports = report.service_ports,
                        changed = report.changed,
                        statements = report.statements,
                        transactions = report.transactions,
                        plan_elapsed = ?plan_elapsed,
                        apply_elapsed = ?apply_started.elapsed(),
                        "Synced"
                    );
                    // Upstream's ConntrackCleanupRequired: a UDP port changed (endpoints or
                    // frontends), or everything was rewritten.
                    let udp_changed =
                        report.full || pending.changed.iter().any(|n| n.protocol == Protocol::Udp);
                    let no_local = self.no_local.entry(*family).or_default();
                    no_local.update(plan, &pending.changed, pending.full);
                    *pending = Pending::default();
                    let now = SystemTime::now();
                    self.status.lock().unwrap().updated(*family, now);
                    let m = &self.metrics;
                    m.record_rules(*family, &report.rules);
                    m.last_sync_timestamp
                        .get_or_create(&labels)
                        .set(unix_seconds(now));
                    for trigger in self.trigger_times.remove(family).unwrap_or_default() {
                        let latency = now.duration_since(trigger).unwrap_or_default();
                        m.network_programming
                            .get_or_create(&labels)
                            .observe(latency.as_secs_f64());
                    }
                    no_local.report(m, *family);
                    if let (true, Some(cleanup)) = (udp_changed, self.conntrack_cleanup.as_mut()) {
                        let started = Instant::now();
                        match cleanup(*family, &self.state, &node.local_addresses) {
                            Ok(done) => {
                                m.conntrack_deleted_entries
                                    .get_or_create(&labels)
                                    .inc_by(done.deleted as u64);
                            }
                            Err(e) => error!(
                                family = %family,
                                error = %e,
                                "Cannot clean up stale UDP conntrack entries; UDP clients of changed Services may keep using removed endpoints until their entries expire"
                            ),
                        };
                        m.conntrack_reconcile_duration
                            .get_or_create(&labels)
                            .observe(started.elapsed().as_secs_f64());
                    }
                }
                Err(err) if err.kind == SyncErrorKind::OutputClosed => {
                    all_ok = false;
                    self.output_closed = true;
                    break;
                }
                Err(err) => {
                    all_ok = false;
                    self.metrics.record_sync_failure(*family, err.partial);
                    pending.full = true;
                    error!(error = %err, changed = pending.changed.len(), "Sync failed; will retry with a full sync");
                }
            }
        }
        if let Some(servers) = self.health_checks.as_mut() {
            servers.sync(&self.state, &changes.services, full || changes.full, &views);
        }
        let now = Instant::now();
        for warning in self.dataplane.take_warnings() {
            self.object_log.dataplane_warning(warning, now);
        }
        self.object_log.summarize(now);
        self.syncs += 1;
        self.all_ok_once |= all_ok;
        if all_ok {
            if let Some(task) = self.after_first_sync.take() {
                task();
            }
        }
        self.scheduler.finished(started, kind, all_ok);
        if !all_ok {
            debug!(retry_in = ?self.scheduler.current_backoff(), "Sync retry scheduled");
        }
    }
}

/// One family's view of this node: IPs (bindAddress override first), pod CIDRs, addresses.
fn node_view(state: &ClusterState, addressing: &NodeAddressing, family: IpFamily) -> NodeView {
    let of_family = |ip: &std::net::IpAddr| IpFamily::of(ip) == family;
    let mut node_ips: Vec<std::net::IpAddr> = addressing
        .bind_address
        .into_iter()
        .filter(of_family)
        .collect();
    if let Some(node) = state.node() {
        for ip in node.addresses.iter().filter(|ip| of_family(ip)) {
            if !node_ips.contains(ip) {
                node_ips.push(*ip);
            }
        }
    }
    NodeView {
        node_ips,
        pod_cidrs: state
            .node()
            .map(|n| {
                n.pod_cidrs
                    .iter()
                    .filter(|c| IpFamily::of_net(c) == family)
                    .copied()
                    .collect()
            })
            .unwrap_or_default(),
        local_addresses: (addressing.local_addresses)(family),
    }
}

fn object_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("<unnamed>")
    )
}

#[cfg(test)]
mod tests;
