//! The `kubeproxy_*` metrics (reference §6.2): upstream's names, types, labels, help texts and
//! buckets, registered per proxy mode as upstream's `RegisterMetrics` does, so dashboards and
//! alerts written for kube-proxy keep working.
//!
//! Values are written by the event loop (syncs, queued changes, conntrack cleanup) and the
//! health server (probe counters); the metrics server encodes the registry on each scrape.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use std::collections::{BTreeMap, BTreeSet};

use kube_proxy_config::ProxyMode;
use kube_proxy_model::{FamilyPlan, IpFamily, ServicePortName};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, linear_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FamilyLabels {
    pub ip_family: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub ip_family: &'static str,
    /// `internal` or `external`.
    pub traffic_policy: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabels {
    pub ip_family: &'static str,
    pub table: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: &'static str,
}

type HistogramFamily = Family<FamilyLabels, Histogram, fn() -> Histogram>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// Upstream's sync-duration buckets: 1 ms doubling, 15 buckets (up to ~16 s).
fn sync_duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Upstream's network-programming buckets: 0.25 s, 0.5 s, 1-59 s by 1 s, 60-115 s by 5 s,
/// 120-300 s by 30 s.
fn network_programming_histogram() -> Histogram {
    Histogram::new(
        linear_buckets(0.25, 0.25, 2)
            .chain(linear_buckets(1.0, 1.0, 59))
            .chain(linear_buckets(60.0, 5.0, 12))
            .chain(linear_buckets(120.0, 30.0, 7)),
    )
}

/// Every kube-proxy metric. Families a mode does not register still exist here (and are
/// simply never exported), so callers need no mode checks.
#[derive(Debug)]
pub struct Metrics {
    /// The proxy mode: which metrics are registered and which failure counter counts.
    mode: ProxyMode,
    pub sync_duration: HistogramFamily,
    pub sync_full_duration: HistogramFamily,
    pub sync_partial_duration: HistogramFamily,
    pub last_sync_timestamp: Family<FamilyLabels, FloatGauge>,
    pub last_queued_timestamp: Family<FamilyLabels, FloatGauge>,
    pub network_programming: HistogramFamily,
    pub endpoint_changes_pending: Gauge,
    pub endpoint_changes_total: Counter,
    pub service_changes_pending: Gauge,
    pub service_changes_total: Counter,
    pub no_local_endpoints: Family<PolicyLabels, Gauge>,
    pub nftables_sync_failures: Family<FamilyLabels, Counter>,
    pub nftables_cleanup_failures: Family<FamilyLabels, Counter>,
    pub iptables_restore_failures: Family<FamilyLabels, Counter>,
    pub iptables_partial_restore_failures: Family<FamilyLabels, Counter>,
    pub iptables_rules_last: Family<TableLabels, Gauge>,
    pub iptables_rules_total: Family<TableLabels, Gauge>,
    pub healthz_total: Family<CodeLabels, Counter>,
    pub livez_total: Family<CodeLabels, Counter>,
    pub conntrack_reconcile_duration: HistogramFamily,
    pub conntrack_deleted_entries: Family<FamilyLabels, Counter>,
}

/// For a proxy in upstream's default mode.
impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(ProxyMode::Iptables)
    }
}

impl Metrics {
    pub fn new(mode: ProxyMode) -> Self {
        let histograms = || HistogramFamily::new_with_constructor(sync_duration_histogram);
        Metrics {
            mode,
            sync_duration: histograms(),
            sync_full_duration: histograms(),
            sync_partial_duration: histograms(),
            last_sync_timestamp: Default::default(),
            last_queued_timestamp: Default::default(),
            network_programming: HistogramFamily::new_with_constructor(
                network_programming_histogram,
            ),
            endpoint_changes_pending: Default::default(),
            endpoint_changes_total: Default::default(),
            service_changes_pending: Default::default(),
            service_changes_total: Default::default(),
            no_local_endpoints: Default::default(),
            nftables_sync_failures: Default::default(),
            nftables_cleanup_failures: Default::default(),
            iptables_restore_failures: Default::default(),
            iptables_partial_restore_failures: Default::default(),
            iptables_rules_last: Default::default(),
            iptables_rules_total: Default::default(),
            healthz_total: Default::default(),
            livez_total: Default::default(),
            conntrack_reconcile_duration: histograms(),
            conntrack_deleted_entries: Default::default(),
        }
    }
}

pub fn family_labels(family: IpFamily) -> FamilyLabels {
    FamilyLabels {
        ip_family: family.as_str(),
    }
}

/// Seconds since the Unix epoch, as upstream's timestamp gauges.
pub fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl Metrics {
    /// Creates the label sets of `families` up front, so every series exists (at zero) from
    /// the first scrape: `rate()` and `absent()` alerts see a stable set of series.
    pub fn initialize(&self, families: &[IpFamily]) {
        for family in families {
            let labels = family_labels(*family);
            let _ = self.sync_duration.get_or_create(&labels);
            let _ = self.sync_full_duration.get_or_create(&labels);
            let _ = self.sync_partial_duration.get_or_create(&labels);
            let _ = self.last_sync_timestamp.get_or_create(&labels);
            let _ = self.last_queued_timestamp.get_or_create(&labels);
            let _ = self.network_programming.get_or_create(&labels);
            let _ = self.nftables_sync_failures.get_or_create(&labels);
            let _ = self.nftables_cleanup_failures.get_or_create(&labels);
            let _ = self.iptables_restore_failures.get_or_create(&labels);
            let _ = self
                .iptables_partial_restore_failures
                .get_or_create(&labels);
            let _ = self.conntrack_reconcile_duration.get_or_create(&labels);
            let _ = self.conntrack_deleted_entries.get_or_create(&labels);
            for policy in ["internal", "external"] {
                let _ = self.no_local_endpoints.get_or_create(&PolicyLabels {
                    ip_family: family.as_str(),
                    traffic_policy: policy,
                });
            }
            for table in ["filter", "nat"] {
                let labels = TableLabels {
                    ip_family: family.as_str(),
                    table,
                };
                let _ = self.iptables_rules_last.get_or_create(&labels);
                let _ = self.iptables_rules_total.get_or_create(&labels);
            }
        }
        for code in ["200", "503"] {
            let _ = self.healthz_total.get_or_create(&CodeLabels { code });
            let _ = self.livez_total.get_or_create(&CodeLabels { code });
        }
    }

    /// Registers what upstream registers for the mode under the `kubeproxy_` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("kubeproxy");
        r.register(
            "sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            self.sync_duration.clone(),
        );
        r.register(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            self.last_queued_timestamp.clone(),
        );
        r.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            self.last_sync_timestamp.clone(),
        );
        r.register(
            "sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            self.endpoint_changes_pending.clone(),
        );
        // Counters: the encoder appends `_total`.
        r.register(
            "sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            self.endpoint_changes_total.clone(),
        );
        r.register(
            "sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            self.service_changes_pending.clone(),
        );
        r.register(
            "sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            self.service_changes_total.clone(),
        );
        r.register(
            "proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            self.healthz_total.clone(),
        );
        r.register(
            "proxy_livez",
            "Cumulative proxy livez HTTP status",
            self.livez_total.clone(),
        );
        r.register(
            "network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            self.network_programming.clone(),
        );
        r.register(
            "sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            self.no_local_endpoints.clone(),
        );
        r.register(
            "conntrack_reconciler_sync_duration_seconds",
            "ReconcileConntrackFlowsLatency latency in seconds",
            self.conntrack_reconcile_duration.clone(),
        );
        r.register(
            "conntrack_reconciler_deleted_entries",
            "Cumulative conntrack flows deleted by conntrack reconciler",
            self.conntrack_deleted_entries.clone(),
        );
        match self.mode {
            ProxyMode::Iptables => {
                self.register_full_and_partial(r);
                r.register(
                    "sync_proxy_rules_iptables_restore_failures",
                    "Cumulative proxy iptables restore failures",
                    self.iptables_restore_failures.clone(),
                );
                r.register(
                    "sync_proxy_rules_iptables_partial_restore_failures",
                    "Cumulative proxy iptables partial restore failures",
                    self.iptables_partial_restore_failures.clone(),
                );
                r.register(
                    "sync_proxy_rules_iptables_total",
                    "Total number of iptables rules owned by kube-proxy",
                    self.iptables_rules_total.clone(),
                );
                r.register(
                    "sync_proxy_rules_iptables_last",
                    "Number of iptables rules written by kube-proxy in last sync",
                    self.iptables_rules_last.clone(),
                );
            }
            // userspace mode's own counters are read from the relays (userspace_metrics).
            ProxyMode::Ipvs | ProxyMode::Userspace => {
                r.register(
                    "sync_proxy_rules_iptables_restore_failures",
                    "Cumulative proxy iptables restore failures",
                    self.iptables_restore_failures.clone(),
                );
            }
            ProxyMode::Nftables => {
                self.register_full_and_partial(r);
                r.register(
                    "sync_proxy_rules_nftables_sync_failures",
                    "Cumulative proxy nftables sync failures",
                    self.nftables_sync_failures.clone(),
                );
                r.register(
                    "sync_proxy_rules_nftables_cleanup_failures",
                    "Cumulative proxy nftables cleanup failures",
                    self.nftables_cleanup_failures.clone(),
                );
            }
        }
    }

    fn register_full_and_partial(&self, r: &mut Registry) {
        r.register(
            "sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            self.sync_full_duration.clone(),
        );
        r.register(
            "sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            self.sync_partial_duration.clone(),
        );
    }

    /// Counts a failed sync of `family` in the mode's failure counter.
    /// Records a failed sync of `family` (`partial`: one that wrote only changed ports).
    pub fn record_sync_failure(&self, family: IpFamily, partial: bool) {
        let labels = family_labels(family);
        let counter = match self.mode {
            ProxyMode::Nftables => &self.nftables_sync_failures,
            ProxyMode::Iptables | ProxyMode::Ipvs | ProxyMode::Userspace => {
                &self.iptables_restore_failures
            }
        };
        counter.get_or_create(&labels).inc();
        if partial && self.mode == ProxyMode::Iptables {
            self.iptables_partial_restore_failures
                .get_or_create(&labels)
                .inc();
        }
    }

    /// The rule counts of a successful sync (iptables mode's `…_iptables_last`/`_total`).
    pub fn record_rules(
        &self,
        family: IpFamily,
        rules: &[kube_proxy_model::dataplane::TableRules],
    ) {
        for table in rules {
            let labels = TableLabels {
                ip_family: family.as_str(),
                table: table.table,
            };
            self.iptables_rules_last
                .get_or_create(&labels)
                .set(table.written as i64);
            self.iptables_rules_total
                .get_or_create(&labels)
                .set(table.total as i64);
        }
    }

    /// Records one sync of `family` that took `elapsed`.
    pub fn observe_sync(&self, family: IpFamily, full: bool, elapsed: Duration) {
        let labels = family_labels(family);
        let seconds = elapsed.as_secs_f64();
        self.sync_duration.get_or_create(&labels).observe(seconds);
        let kind = if full {
            &self.sync_full_duration
        } else {
            &self.sync_partial_duration
        };
        kind.get_or_create(&labels).observe(seconds);
    }
}

/// The service ports behind `kubeproxy_sync_proxy_rules_no_local_endpoints_total` of one
/// family: Local policy, endpoints elsewhere, none on this node. Kept up to date from the
/// ports each sync changed, so a sync does not walk every port of a large cluster.
#[derive(Debug, Default)]
pub struct NoLocalEndpoints {
    /// (internal, external) for each port where either holds.
    ports: BTreeMap<ServicePortName, (bool, bool)>,
}

impl NoLocalEndpoints {
    /// Re-evaluates `changed` ports (all of them when `full`) in `plan`.
    pub fn update(&mut self, plan: &FamilyPlan, changed: &BTreeSet<ServicePortName>, full: bool) {
        let flags = |name: &ServicePortName| {
            plan.services.get(name).map(|p| {
                (
                    p.internal_without_local_endpoints(),
                    p.external_without_local_endpoints(),
                )
            })
        };
        let names: Box<dyn Iterator<Item = &ServicePortName>> = if full {
            self.ports.clear();
            Box::new(plan.services.keys())
        } else {
            Box::new(changed.iter())
        };
        for name in names {
            match flags(name) {
                Some(f) if f != (false, false) => {
                    self.ports.insert(name.clone(), f);
                }
                _ => {
                    self.ports.remove(name);
                }
            }
        }
    }

    /// Sets the gauges: Services (not ports) per policy, as upstream counts them.
    pub fn report(&self, metrics: &Metrics, family: IpFamily) {
        let mut internal = BTreeSet::new();
        let mut external = BTreeSet::new();
        for (name, (i, e)) in &self.ports {
            if *i {
                internal.insert(&name.service);
            }
            if *e {
                external.insert(&name.service);
            }
        }
        for (policy, services) in [("internal", internal), ("external", external)] {
            metrics
                .no_local_endpoints
                .get_or_create(&PolicyLabels {
                    ip_family: family.as_str(),
                    traffic_policy: policy,
                })
                .set(services.len() as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_upstreams() {
        let h = network_programming_histogram();
        let mut text = String::new();
        let mut registry = Registry::default();
        registry.register("x", "x", h);
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let les: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split("le=\"").nth(1))
            .map(|l| l.split('"').next().unwrap())
            .collect();
        assert_eq!(les.len(), 2 + 59 + 12 + 7 + 1, "{les:?}");
        assert_eq!(&les[..4], ["0.25", "0.5", "1.0", "2.0"]);
        assert_eq!(les[les.len() - 2], "300.0");
        assert_eq!(les[les.len() - 1], "+Inf");

        let h = sync_duration_histogram();
        let mut text = String::new();
        let mut registry = Registry::default();
        registry.register("y", "y", h);
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("le=\"0.001\""), "{text}");
        assert!(text.contains("le=\"16.384\""), "{text}");
        assert_eq!(text.matches("_bucket{").count(), 16);
    }
}
