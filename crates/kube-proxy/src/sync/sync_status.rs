//! The sync health record shared with the health server: per IP family, when the rules were
//! last programmed and since when a change has been waiting (upstream's `ProxyHealthServer`
//! `Updated`/`QueuedUpdate`). Only the event loop writes it; time is passed in.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use kube_proxy_model::IpFamily;

#[derive(Clone, Debug, Default)]
pub struct FamilyStatus {
    pub last_updated: Option<SystemTime>,
    pub oldest_queued: Option<SystemTime>,
}

/// What `/healthz` needs to know about this proxy's Node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeHealth {
    pub deleting: bool,
    pub to_be_deleted: bool,
}

#[derive(Clone, Debug, Default)]
pub struct SyncStatus {
    pub families: BTreeMap<IpFamily, FamilyStatus>,
    /// `None` until the Node object is known.
    pub node: Option<NodeHealth>,
}

pub type SharedSyncStatus = Arc<Mutex<SyncStatus>>;

impl SyncStatus {
    /// A change was queued for `family`; the oldest pending one is what counts.
    pub fn queued(&mut self, family: IpFamily, now: SystemTime) {
        self.families
            .entry(family)
            .or_default()
            .oldest_queued
            .get_or_insert(now);
    }
    /// Rules of `family` were programmed (also called at start of the sync loop, as upstream).
    pub fn updated(&mut self, family: IpFamily, now: SystemTime) {
        let status = self.families.entry(family).or_default();
        status.last_updated = Some(now);
        status.oldest_queued = None;
    }
    /// A family is unhealthy iff a queued change has waited longer than `timeout`.
    pub fn family_healthy(&self, family: IpFamily, now: SystemTime, timeout: Duration) -> bool {
        self.families
            .get(&family)
            .and_then(|s| s.oldest_queued)
            .is_none_or(|queued| now.duration_since(queued).unwrap_or_default() <= timeout)
    }
    pub fn healthy(&self, now: SystemTime, timeout: Duration) -> bool {
        self.families
            .keys()
            .all(|f| self.family_healthy(*f, now, timeout))
    }
    /// Node eligibility (KEP-3836): known, not being deleted, not tainted for deletion by
    /// the cluster autoscaler. Only `/healthz` uses it, so load balancers drain the node.
    pub fn node_eligible(&self) -> bool {
        self.node.is_some_and(|n| !n.deleting && !n.to_be_deleted)
    }

    /// The most recent successful sync of any family.
    pub fn last_updated(&self) -> Option<SystemTime> {
        self.families.values().filter_map(|s| s.last_updated).max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unhealthy_only_when_a_queued_change_waits_too_long() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let timeout = Duration::from_secs(60);
        let mut s = SyncStatus::default();
        assert!(s.healthy(t0, timeout), "startup is healthy");
        s.queued(IpFamily::V4, t0);
        s.queued(IpFamily::V4, t0 + Duration::from_secs(30));
        assert!(s.healthy(t0 + Duration::from_secs(60), timeout));
        assert!(
            !s.healthy(t0 + Duration::from_secs(61), timeout),
            "oldest queued change counts"
        );
        s.updated(IpFamily::V4, t0 + Duration::from_secs(62));
        assert!(
            s.healthy(t0 + Duration::from_secs(500), timeout),
            "idle is healthy"
        );
        assert_eq!(s.last_updated(), Some(t0 + Duration::from_secs(62)));
    }
}
