//! When to sync: upstream's bounded-frequency runner, with time passed in.
//!
//! Guarantees, for the nftables and iptables modes (upstream's per-mode semantics):
//! * two syncs never start less than `min_sync_period` apart;
//! * a change after a quiet period syncs at once — it does not wait for the rate limit. A
//!   change that may have a companion (a new or changed Service, whose EndpointSlice usually
//!   follows within milliseconds) waits a `settle` window of a few milliseconds so that both
//!   land in one transaction; a change of the endpoints of a known Service has none to wait
//!   for and syncs without it (`request_now`);
//! * a sync runs at least every `sync_period` even without changes (it repairs drift and
//!   retries), and a full resync at least every `full_sync_period` (one hour);
//! * a failed sync is retried with exponential backoff, from `min_sync_period` (at least
//!   one second) doubling up to `sync_period`.

use std::time::{Duration, Instant};

/// What kind of sync is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncKind {
    /// Apply what changed.
    Partial,
    /// Rewrite everything (periodic, or after a failure).
    Full,
}

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub min_sync_period: Duration,
    pub sync_period: Duration,
    pub full_sync_period: Duration,
    pub settle: Duration,
}

impl SchedulerConfig {
    pub fn new(min_sync_period: Duration, sync_period: Duration) -> Self {
        SchedulerConfig {
            min_sync_period,
            sync_period,
            full_sync_period: Duration::from_secs(3600),
            settle: Duration::from_millis(20).min(min_sync_period.max(Duration::from_millis(1))),
        }
    }
}

#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    /// Start of the last sync attempt.
    last_start: Option<Instant>,
    /// Start of the last successful full sync.
    last_full: Option<Instant>,
    /// A change is waiting; since when.
    requested_at: Option<Instant>,
    /// The waiting change needs no settle window.
    immediate: bool,
    /// After a failure: when to retry, and the current backoff.
    retry_at: Option<Instant>,
    backoff: Duration,
    force_full: bool,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        Scheduler {
            config,
            last_start: None,
            last_full: None,
            requested_at: None,
            immediate: false,
            retry_at: None,
            backoff: Duration::ZERO,
            force_full: true, // the first sync is always full
        }
    }

    /// A change was queued; it may have a companion, so it waits the settle window.
    pub fn request(&mut self, now: Instant) {
        self.requested_at.get_or_insert(now);
    }

    /// A change was queued that has no companion to wait for (the endpoints of a known
    /// Service): sync without the settle window, still within the rate limit.
    pub fn request_now(&mut self, now: Instant) {
        self.requested_at.get_or_insert(now);
        self.immediate = true;
    }

    /// The next sync must rewrite everything.
    pub fn request_full(&mut self, now: Instant) {
        self.force_full = true;
        self.request(now);
    }

    /// When the next sync is due (the event loop sleeps until then).
    pub fn next_due(&self, now: Instant) -> Instant {
        let mut due = match self.last_start {
            None => now + self.config.sync_period,
            Some(last) => last + self.config.sync_period,
        };
        if let Some(last_full) = self.last_full {
            due = due.min(last_full + self.config.full_sync_period);
        }
        if let Some(requested) = self.requested_at {
            let settled = if self.immediate {
                requested
            } else {
                requested + self.config.settle
            };
            let rate_limited = self
                .last_start
                .map_or(settled, |last| last + self.config.min_sync_period);
            due = due.min(settled.max(rate_limited));
        }
        if let Some(retry) = self.retry_at {
            due = due.min(retry);
        }
        due
    }

    /// Whether a sync should start now, and which kind.
    pub fn due(&self, now: Instant) -> Option<SyncKind> {
        if now < self.next_due(now) {
            return None;
        }
        let full = self.force_full
            || self
                .last_full
                .is_none_or(|last| now >= last + self.config.full_sync_period);
        Some(if full {
            SyncKind::Full
        } else {
            SyncKind::Partial
        })
    }

    /// A sync of `kind` starts now; pending requests are consumed by it.
    pub fn started(&mut self, now: Instant) {
        self.last_start = Some(now);
        self.requested_at = None;
        self.immediate = false;
        self.retry_at = None;
    }

    /// The sync started at `started` finished.
    pub fn finished(&mut self, started: Instant, kind: SyncKind, ok: bool) {
        if ok {
            self.backoff = Duration::ZERO;
            if kind == SyncKind::Full {
                self.force_full = false;
                self.last_full = Some(started);
            }
        } else {
            let floor = self.config.min_sync_period.max(Duration::from_secs(1));
            self.backoff = if self.backoff.is_zero() {
                floor
            } else {
                (self.backoff * 2).min(self.config.sync_period.max(floor))
            };
            self.retry_at = Some(started + self.backoff);
            self.force_full = true;
        }
    }

    pub fn current_backoff(&self) -> Duration {
        self.backoff
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduler() -> (Scheduler, Instant) {
        let config = SchedulerConfig::new(Duration::from_secs(1), Duration::from_secs(30));
        (Scheduler::new(config), Instant::now())
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn first_sync_is_full_and_waits_only_for_settle() {
        let (mut s, t0) = scheduler();
        assert_eq!(s.due(t0), None);
        s.request(t0);
        assert_eq!(s.next_due(t0), t0 + 20 * MS);
        assert_eq!(s.due(t0 + 20 * MS), Some(SyncKind::Full));
    }

    /// A scheduler whose first (full) sync ran at t0, and an instant 10 s later.
    fn after_first_sync() -> (Scheduler, Instant) {
        let (mut s, t0) = scheduler();
        s.request(t0);
        s.started(t0);
        s.finished(t0, SyncKind::Full, true);
        (s, t0 + Duration::from_secs(10))
    }

    #[test]
    fn lone_change_after_quiet_period_is_not_rate_limited() {
        let (mut s, later) = after_first_sync();
        s.request(later);
        assert_eq!(s.next_due(later), later + 20 * MS);
        assert_eq!(s.due(later + 20 * MS), Some(SyncKind::Partial));
    }

    #[test]
    fn endpoint_change_of_a_known_service_skips_the_settle_window_not_the_rate_limit() {
        let (mut s, later) = after_first_sync();
        s.request(later);
        s.request_now(later + 2 * MS);
        assert_eq!(s.due(later + 2 * MS), Some(SyncKind::Partial));
        s.started(later + 2 * MS);
        s.finished(later + 2 * MS, SyncKind::Partial, true);
        // The next one, even immediate, waits min_sync_period after the last start.
        s.request_now(later + 10 * MS);
        assert_eq!(s.next_due(later + 10 * MS), later + 1002 * MS);
        // And a later settle-type request after it is due at the same time, not later.
        s.request(later + 20 * MS);
        assert_eq!(s.next_due(later + 20 * MS), later + 1002 * MS);
    }

    #[test]
    fn bursts_are_rate_limited_and_coalesced() {
        let (mut s, t0) = scheduler();
        s.request(t0);
        s.started(t0 + 20 * MS);
        s.finished(t0 + 20 * MS, SyncKind::Full, true);
        for i in 0..50 {
            s.request(t0 + (100 + i) * MS);
        }
        let due = s.next_due(t0 + 200 * MS);
        assert_eq!(
            due,
            t0 + 1020 * MS,
            "one sync, min_sync_period after the last"
        );
        assert_eq!(s.due(t0 + 1019 * MS), None);
        assert_eq!(s.due(t0 + 1020 * MS), Some(SyncKind::Partial));
    }

    #[test]
    fn periodic_sync_and_hourly_full_sync() {
        let (mut s, t0) = scheduler();
        s.request(t0);
        s.started(t0);
        s.finished(t0, SyncKind::Full, true);
        assert_eq!(s.next_due(t0 + MS), t0 + Duration::from_secs(30));
        assert_eq!(s.due(t0 + Duration::from_secs(30)), Some(SyncKind::Partial));
        let mut t = t0;
        while t < t0 + Duration::from_secs(3600) {
            t += Duration::from_secs(30);
            if t >= t0 + Duration::from_secs(3600) {
                break;
            }
            s.started(t);
            s.finished(t, SyncKind::Partial, true);
        }
        assert_eq!(s.due(t0 + Duration::from_secs(3600)), Some(SyncKind::Full));
    }

    #[test]
    fn failures_back_off_exponentially_and_force_full() {
        let (mut s, t0) = scheduler();
        s.request(t0);
        s.started(t0);
        s.finished(t0, SyncKind::Full, false);
        assert_eq!(s.next_due(t0), t0 + Duration::from_secs(1));
        assert_eq!(s.due(t0 + Duration::from_secs(1)), Some(SyncKind::Full));
        let t1 = t0 + Duration::from_secs(1);
        s.started(t1);
        s.finished(t1, SyncKind::Full, false);
        assert_eq!(s.current_backoff(), Duration::from_secs(2));
        let mut t = t1;
        for _ in 0..10 {
            s.started(t);
            s.finished(t, SyncKind::Full, false);
            t += s.current_backoff();
        }
        assert_eq!(
            s.current_backoff(),
            Duration::from_secs(30),
            "capped at sync_period"
        );
        s.started(t);
        s.finished(t, SyncKind::Full, true);
        assert_eq!(s.current_backoff(), Duration::ZERO);
    }

    #[test]
    fn zero_min_sync_period_syncs_immediately() {
        let config = SchedulerConfig::new(Duration::ZERO, Duration::from_secs(30));
        let mut s = Scheduler::new(config);
        let t0 = Instant::now();
        s.request(t0);
        assert!(s.next_due(t0) <= t0 + MS);
    }
}
