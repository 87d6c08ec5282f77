//! The proxy's view of the cluster: converted Services, EndpointSlices and its Node, plus what
//! changed since the last checkout. One owner (the event loop) mutates it; it does no I/O.
//!
//! Updates that do not change anything kube-proxy uses (a status write, a label the proxy does
//! not read, an identical relist) are discarded here, so they never trigger a sync. Relists
//! ("replace everything") are diffed against what is stored.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;

use crate::endpoints::{convert_slice, slice_key, ConvertedSlice, SliceInfo};
use crate::names::NamespacedName;
use crate::node::NodeInfo;
use crate::service::{
    convert_service, service_key, ConvertedService, Ignored, ServiceError, ServicePort,
};

/// What applying one object did; the caller logs the interesting ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Changed,
    /// Applied, but parts of the object were unusable and skipped (named in the message).
    ChangedWithWarnings(String),
    Unchanged,
    /// Not handled by kube-proxy (headless, ExternalName, FQDN, another proxy's).
    Ignored(String),
    /// Invalid: skipped (and anything stored under its key removed). Carries the reason.
    Invalid(String),
}

/// Which kinds have been listed completely at least once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Synced {
    pub services: bool,
    pub endpoint_slices: bool,
    pub node: bool,
}

/// What changed since the last checkout.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Services whose definition or endpoints changed.
    pub services: BTreeSet<NamespacedName>,
    /// Something every Service depends on changed (the node's zone or IPs): replan all.
    pub full: bool,
    /// The ServiceCIDRs changed: no plan changes, but the dataplane's rules for unallocated
    /// ClusterIPs do.
    pub service_cidrs: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && !self.full && !self.service_cidrs
    }
    /// Folds `other` into `self` (used to keep changes of a failed sync for the retry).
    pub fn merge(&mut self, other: Changes) {
        self.services.extend(other.services);
        self.full |= other.full;
        self.service_cidrs |= other.service_cidrs;
    }
}

/// Counters of pending changes, for metrics and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChangeCounts {
    pub service_changes: u64,
    pub endpoint_slice_changes: u64,
}

#[derive(Debug, Default)]
pub struct ClusterState {
    node_name: String,
    services: HashMap<NamespacedName, Vec<Arc<ServicePort>>>,
    /// Slices of each Service, sorted by name (most Services have one or two; a Vec costs a
    /// fraction of a map per Service).
    slices: HashMap<NamespacedName, Vec<SliceInfo>>,
    /// Shared copies of repeated strings (namespaces, port and node names, zones).
    interner: HashSet<Arc<str>>,
    node: Option<NodeInfo>,
    /// `spec.cidrs` of each ServiceCIDR object, by name; upstream uses their union.
    service_cidrs: BTreeMap<String, Vec<IpNet>>,
    pending: Changes,
    counts: ChangeCounts,
    synced: Synced,
    /// Keys seen by a streamed (re)list in progress.
    listing_services: Option<HashSet<NamespacedName>>,
    listing_slices: Option<HashSet<(NamespacedName, Arc<str>)>>,
}

fn object_label(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    match &meta.name {
        Some(name) => format!(
            "{}/{}",
            meta.namespace.as_deref().unwrap_or("default"),
            name
        ),
        None => "<unnamed>".into(),
    }
}

impl ClusterState {
    pub fn new(node_name: impl Into<String>) -> Self {
        ClusterState {
            node_name: node_name.into(),
            ..Default::default()
        }
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }
    pub fn node(&self) -> Option<&NodeInfo> {
        self.node.as_ref()
    }
    pub fn synced(&self) -> Synced {
        self.synced
    }
    /// Both Services and EndpointSlices have been listed: syncing may start.
    pub fn ready_to_sync(&self) -> bool {
        self.synced.services && self.synced.endpoint_slices
    }
    pub fn service_count(&self) -> usize {
        self.services.len()
    }
    pub fn endpoint_slice_count(&self) -> usize {
        self.slices.values().map(Vec::len).sum()
    }
    pub fn service_names(&self) -> impl Iterator<Item = &NamespacedName> {
        self.services.keys()
    }
    pub fn service_ports(&self, service: &NamespacedName) -> &[Arc<ServicePort>] {
        self.services.get(service).map(Vec::as_slice).unwrap_or(&[])
    }
    pub fn slices_of(&self, service: &NamespacedName) -> impl Iterator<Item = &SliceInfo> {
        self.slices.get(service).into_iter().flatten()
    }

    /// Changes since the last checkout; the state starts accumulating anew.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.pending)
    }
    /// Whether anything is waiting for a sync.
    pub fn has_pending_changes(&self) -> bool {
        !self.pending.is_empty()
    }
    /// Totals of accepted changes (monotonic), for the `*_changes_total` metrics.
    pub fn change_counts(&self) -> ChangeCounts {
        self.counts
    }
    /// Marks everything for replanning (periodic full sync, dataplane failure).
    pub fn mark_full(&mut self) {
        self.pending.full = true;
    }

    // ---- Services ----

    pub fn apply_service(&mut self, service: &Service) -> Outcome {
        let Some(key) = service_key(service) else {
            return Outcome::Invalid(ServiceError::MissingName.to_string());
        };
        match convert_service(service) {
            Ok(ConvertedService::Ports { ports, warnings }) => {
                let outcome = self.store_service(key, ports);
                if outcome == Outcome::Changed && !warnings.is_empty() {
                    return Outcome::ChangedWithWarnings(warnings.join("; "));
                }
                outcome
            }
            Ok(ConvertedService::Ignored(reason)) => {
                self.delete_service(&key);
                Outcome::Ignored(match reason {
                    Ignored::Headless => "headless Service".into(),
                    Ignored::ExternalName => "ExternalName Service".into(),
                    Ignored::OtherProxy(p) => format!("handled by service proxy {p:?}"),
                })
            }
            Err(error) => {
                self.delete_service(&key);
                Outcome::Invalid(error.to_string())
            }
        }
    }

    /// One shared copy of a string.
    fn intern(&mut self, s: &Arc<str>) -> Arc<str> {
        if let Some(existing) = self.interner.get(s) {
            return existing.clone();
        }
        self.interner.insert(s.clone());
        s.clone()
    }

    fn intern_name(&mut self, name: &NamespacedName) -> NamespacedName {
        NamespacedName {
            namespace: self.intern(&name.namespace),
            name: self.intern(&name.name),
        }
    }

    fn intern_slice(&mut self, mut info: SliceInfo) -> SliceInfo {
        info.service = self.intern_name(&info.service);
        for port in &mut info.ports {
            port.name = self.intern(&port.name);
        }
        for ep in &mut info.endpoints {
            if let Some(node) = &ep.node_name {
                ep.node_name = Some(self.intern(node));
            }
        }
        info
    }

    /// Drops interned strings nothing uses any more (after a relist).
    fn compact_interner(&mut self) {
        self.interner.retain(|s| Arc::strong_count(s) > 1);
    }

    fn store_service(&mut self, key: NamespacedName, ports: Vec<Arc<ServicePort>>) -> Outcome {
        let key = self.intern_name(&key);
        let ports: Vec<Arc<ServicePort>> = ports
            .into_iter()
            .map(|mut port| {
                if let Some(p) = Arc::get_mut(&mut port) {
                    p.name.service = key.clone();
                    p.name.port = self.intern(&p.name.port);
                }
                port
            })
            .collect();
        if self.services.get(&key) == Some(&ports) {
            return Outcome::Unchanged;
        }
        self.services.insert(key.clone(), ports);
        self.mark_service(key, false);
        Outcome::Changed
    }

    pub fn delete_service(&mut self, key: &NamespacedName) -> Outcome {
        if self.services.remove(key).is_some() {
            self.mark_service(key.clone(), false);
            Outcome::Changed
        } else {
            Outcome::Unchanged
        }
    }

    /// A complete list of Services (initial list or relist): stores them, removes the
    /// missing ones, and marks Services synced. Returns each object's outcome.
    pub fn replace_services<'a>(
        &mut self,
        services: impl IntoIterator<Item = &'a Service>,
    ) -> Vec<(String, Outcome)> {
        self.begin_service_list();
        let outcomes = services
            .into_iter()
            .map(|service| {
                (
                    object_label(&service.metadata),
                    self.listed_service(service),
                )
            })
            .collect();
        self.finish_service_list();
        outcomes
    }

    /// Starts a streamed (re)list of Services: objects follow through [`Self::listed_service`]
    /// and [`Self::finish_service_list`] removes those not seen. Streaming keeps only converted
    /// objects in memory, never the whole raw list.
    pub fn begin_service_list(&mut self) {
        self.listing_services = Some(Default::default());
    }

    pub fn listed_service(&mut self, service: &Service) -> Outcome {
        if let (Some(seen), Some(key)) = (self.listing_services.as_mut(), service_key(service)) {
            seen.insert(key);
        }
        self.apply_service(service)
    }

    pub fn finish_service_list(&mut self) {
        let seen = self.listing_services.take().unwrap_or_default();
        let stale: Vec<NamespacedName> = self
            .services
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for key in stale {
            self.delete_service(&key);
        }
        self.synced.services = true;
        self.compact_interner();
    }

    // ---- EndpointSlices ----

    pub fn apply_slice(&mut self, slice: &EndpointSlice) -> Outcome {
        match convert_slice(slice) {
            Ok(ConvertedSlice::Slice {
                slice: info,
                warnings,
            }) => {
                let info = self.intern_slice(info);
                let service = info.service.clone();
                let entry = self.slices.entry(service.clone()).or_default();
                match entry.binary_search_by(|s| s.name.cmp(&info.name)) {
                    Ok(i) if entry[i] == info => return Outcome::Unchanged,
                    Ok(i) => entry[i] = info,
                    Err(i) => entry.insert(i, info),
                }
                self.mark_service(service, true);
                if warnings.is_empty() {
                    Outcome::Changed
                } else {
                    Outcome::ChangedWithWarnings(warnings.join("; "))
                }
            }
            Ok(ConvertedSlice::Ignored(reason)) => {
                if let Some((service, name)) = slice_key(slice) {
                    self.delete_slice(&service, &name);
                }
                Outcome::Ignored(reason.into())
            }
            Err(error) => {
                if let Some((service, name)) = slice_key(slice) {
                    self.delete_slice(&service, &name);
                }
                Outcome::Invalid(error.to_string())
            }
        }
    }

    pub fn delete_slice(&mut self, service: &NamespacedName, name: &str) -> Outcome {
        let Some(entry) = self.slices.get_mut(service) else {
            return Outcome::Unchanged;
        };
        let Ok(index) = entry.binary_search_by(|s| (*s.name).cmp(name)) else {
            return Outcome::Unchanged;
        };
        entry.remove(index);
        if entry.is_empty() {
            self.slices.remove(service);
        }
        self.mark_service(service.clone(), true);
        Outcome::Changed
    }

    /// Deletes a slice given the object (its service label names the owner).
    pub fn delete_slice_object(&mut self, slice: &EndpointSlice) -> Outcome {
        match slice_key(slice) {
            Some((service, name)) => self.delete_slice(&service, &name),
            None => Outcome::Unchanged,
        }
    }

    /// A complete list of EndpointSlices (initial list or relist).
    pub fn replace_slices<'a>(
        &mut self,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
    ) -> Vec<(String, Outcome)> {
        self.begin_slice_list();
        let outcomes = slices
            .into_iter()
            .map(|slice| (object_label(&slice.metadata), self.listed_slice(slice)))
            .collect();
        self.finish_slice_list();
        outcomes
    }

    /// Streamed (re)list of EndpointSlices, as for Services.
    pub fn begin_slice_list(&mut self) {
        self.listing_slices = Some(Default::default());
    }

    pub fn listed_slice(&mut self, slice: &EndpointSlice) -> Outcome {
        if let (Some(seen), Some(key)) = (self.listing_slices.as_mut(), slice_key(slice)) {
            seen.insert(key);
        }
        self.apply_slice(slice)
    }

    pub fn finish_slice_list(&mut self) {
        let seen = self.listing_slices.take().unwrap_or_default();
        let stale: Vec<(NamespacedName, Arc<str>)> = self
            .slices
            .iter()
            .flat_map(|(svc, v)| v.iter().map(move |s| (svc.clone(), s.name.clone())))
            .filter(|k| !seen.contains(k))
            .collect();
        for (service, name) in stale {
            self.delete_slice(&service, &name);
        }
        self.synced.endpoint_slices = true;
        self.compact_interner();
    }

    // ---- Node ----

    /// Sets (or with `None`, forgets) this proxy's Node. A change of what routing depends on
    /// (zone label, node IPs) replans everything; eligibility changes only matter to health.
    pub fn set_node(&mut self, node: Option<&Node>) -> Outcome {
        let info = node.map(NodeInfo::from_api);
        self.synced.node = true;
        if self.node == info {
            return Outcome::Unchanged;
        }
        let routing = |n: &Option<NodeInfo>| {
            n.as_ref()
                .map(|n| (n.zone.clone(), n.addresses.clone(), n.pod_cidrs.clone()))
        };
        if routing(&self.node) != routing(&info) {
            self.pending.full = true;
        }
        self.node = info;
        Outcome::Changed
    }

    /// The union of every ServiceCIDR's ranges of `family`, sorted (what upstream's nftables
    /// mode drops traffic to, outside allocated ClusterIPs). Empty until ServiceCIDRs are known.
    pub fn service_cidrs(&self, family: crate::IpFamily) -> Vec<IpNet> {
        let mut cidrs: Vec<IpNet> = self
            .service_cidrs
            .values()
            .flatten()
            .filter(|c| crate::IpFamily::of_net(c) == family)
            .copied()
            .collect();
        cidrs.sort();
        cidrs.dedup();
        cidrs
    }

    /// Adds or updates one ServiceCIDR. Unparsable ranges are skipped and named.
    pub fn apply_service_cidr(&mut self, object: &ServiceCIDR) -> Outcome {
        let Some(name) = object.metadata.name.clone() else {
            return Outcome::Invalid("ServiceCIDR without a name".into());
        };
        let mut cidrs = Vec::new();
        let mut bad = Vec::new();
        for text in object
            .spec
            .as_ref()
            .and_then(|s| s.cidrs.as_ref())
            .into_iter()
            .flatten()
        {
            match text.trim().parse::<IpNet>() {
                Ok(net) => cidrs.push(net.trunc()),
                Err(_) => bad.push(text.clone()),
            }
        }
        let before = self.union_of_service_cidrs();
        self.service_cidrs.insert(name, cidrs);
        let changed = self.note_service_cidrs(before);
        match (bad.is_empty(), changed) {
            (false, _) => {
                Outcome::ChangedWithWarnings(format!("spec.cidrs: invalid CIDRs {bad:?} ignored"))
            }
            (true, true) => Outcome::Changed,
            (true, false) => Outcome::Unchanged,
        }
    }

    pub fn delete_service_cidr(&mut self, object: &ServiceCIDR) {
        if let Some(name) = &object.metadata.name {
            let before = self.union_of_service_cidrs();
            self.service_cidrs.remove(name);
            self.note_service_cidrs(before);
        }
    }

    /// Replaces every ServiceCIDR (a complete list); returns each object's outcome.
    pub fn replace_service_cidrs<'a>(
        &mut self,
        objects: impl Iterator<Item = &'a ServiceCIDR>,
    ) -> Vec<(String, Outcome)> {
        let before = self.union_of_service_cidrs();
        let pending = self.pending.service_cidrs;
        self.service_cidrs.clear();
        let outcomes = objects
            .map(|o| {
                let name = o
                    .metadata
                    .name
                    .clone()
                    .unwrap_or_else(|| "<unnamed>".into());
                (name, self.apply_service_cidr(o))
            })
            .collect();
        // Only the difference of the whole list counts, not the steps in between.
        self.pending.service_cidrs = pending;
        self.note_service_cidrs(before);
        outcomes
    }

    fn union_of_service_cidrs(&self) -> BTreeSet<IpNet> {
        self.service_cidrs.values().flatten().copied().collect()
    }

    /// Marks the ServiceCIDRs changed if their union differs from `before`.
    fn note_service_cidrs(&mut self, before: BTreeSet<IpNet>) -> bool {
        let changed = before != self.union_of_service_cidrs();
        self.pending.service_cidrs |= changed;
        changed
    }

    fn mark_service(&mut self, key: NamespacedName, endpoints: bool) {
        if endpoints {
            self.counts.endpoint_slice_changes += 1;
        } else {
            self.counts.service_changes += 1;
        }
        self.pending.services.insert(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service_cidr(name: &str, cidrs: &[&str]) -> ServiceCIDR {
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"cidrs": cidrs}}))
            .unwrap()
    }

    #[test]
    fn service_cidrs_are_the_union_per_family_and_changes_are_noticed() {
        let mut state = ClusterState::new("node-a");
        assert!(state.service_cidrs(crate::IpFamily::V4).is_empty());
        let default = service_cidr("kubernetes", &["198.19.0.0/16", "2001:db8:19::/112"]);
        assert_eq!(state.apply_service_cidr(&default), Outcome::Changed);
        // Host bits are cleared, as nft needs a network address.
        let extra = service_cidr("extra", &["198.19.255.1/24", "bogus"]);
        assert!(matches!(
            state.apply_service_cidr(&extra),
            Outcome::ChangedWithWarnings(w) if w.contains("bogus")
        ));
        assert_eq!(
            state.service_cidrs(crate::IpFamily::V4),
            vec![
                "198.19.0.0/16".parse::<IpNet>().unwrap(),
                "198.19.255.0/24".parse().unwrap()
            ]
        );
        assert_eq!(
            state.service_cidrs(crate::IpFamily::V6),
            vec!["2001:db8:19::/112".parse::<IpNet>().unwrap()]
        );
        assert!(state.take_changes().service_cidrs);
        // A relist with the same content changes nothing.
        state.replace_service_cidrs([&extra, &default].into_iter());
        assert!(!state.has_pending_changes());
        state.delete_service_cidr(&extra);
        assert!(state.take_changes().service_cidrs);
        assert_eq!(state.service_cidrs(crate::IpFamily::V4).len(), 1);
    }

    fn service(name: &str, ip: &str) -> Service {
        serde_json::from_value(
            json!({"metadata": {"namespace": "ns", "name": name, "resourceVersion": "1"},
            "spec": {"clusterIP": ip, "ports": [{"name": "p", "port": 80}]}}),
        )
        .unwrap()
    }

    fn slice(name: &str, svc: &str, ip: &str) -> EndpointSlice {
        serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": name, "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4", "ports": [{"name": "p", "port": 8080}], "endpoints": [{"addresses": [ip]}]}))
        .unwrap()
    }

    #[test]
    fn no_op_updates_are_discarded() {
        let mut state = ClusterState::new("node-a");
        assert_eq!(
            state.apply_service(&service("a", "198.19.0.1")),
            Outcome::Changed
        );
        state.take_changes();
        let mut same = service("a", "198.19.0.1");
        same.metadata.resource_version = Some("2".into());
        same.metadata.annotations = Some([("x".to_string(), "y".to_string())].into());
        assert_eq!(state.apply_service(&same), Outcome::Unchanged);
        assert!(!state.has_pending_changes());
    }

    #[test]
    fn relist_removes_missing_objects_and_marks_synced() {
        let mut state = ClusterState::new("node-a");
        state.apply_service(&service("a", "198.19.0.1"));
        state.apply_service(&service("b", "198.19.0.2"));
        state.apply_slice(&slice("a-1", "a", "198.18.0.1"));
        state.take_changes();
        assert!(!state.ready_to_sync());
        state.replace_services([&service("a", "198.19.0.1")]);
        state.replace_slices(std::iter::empty());
        assert!(state.ready_to_sync());
        let changes = state.take_changes();
        let names: Vec<String> = changes.services.iter().map(|n| n.to_string()).collect();
        assert_eq!(names, vec!["ns/a", "ns/b"], "b deleted, a lost its slice");
        assert_eq!(state.service_count(), 1);
        assert_eq!(state.endpoint_slice_count(), 0);
    }

    #[test]
    fn invalid_object_is_skipped_and_replaces_nothing_else() {
        let mut state = ClusterState::new("node-a");
        state.apply_service(&service("good", "198.19.0.1"));
        state.apply_service(&service("bad", "198.19.0.2"));
        let outcome = state.apply_service(&service("bad", "not-an-ip"));
        assert!(
            matches!(outcome, Outcome::Invalid(ref m) if m.contains("spec.clusterIPs[0]")),
            "{outcome:?}"
        );
        assert_eq!(
            state
                .service_ports(&NamespacedName::new("ns", "good"))
                .len(),
            1
        );
        assert!(state
            .service_ports(&NamespacedName::new("ns", "bad"))
            .is_empty());
    }

    #[test]
    fn node_zone_change_requests_full_replan_but_taint_does_not() {
        let mut state = ClusterState::new("node-a");
        let node = |zone: &str, tainted: bool| -> Node {
            let taints = if tainted {
                json!([{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}])
            } else {
                json!([])
            };
            serde_json::from_value(json!({"metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": zone}}, "spec": {"taints": taints}})).unwrap()
        };
        state.set_node(Some(&node("z1", false)));
        assert!(state.take_changes().full);
        assert_eq!(state.set_node(Some(&node("z1", true))), Outcome::Changed);
        assert!(!state.take_changes().full);
        state.set_node(Some(&node("z2", true)));
        assert!(state.take_changes().full);
    }
}
