//! When to sync: upstream's bounded-frequency runner, with time passed in.
//!
//! Guarantees, for the nftables and iptables modes (upstream's per-mode semantics):
//! * two syncs never start less than `min_sync_period` apart;
//! * a change after a quiet period syncs at once (after a `settle` window of a few
//!   milliseconds, so that a Service and its EndpointSlice written together land in one
//!   transaction) — it does not wait for the rate limit;
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
            retry_at: None,
            backoff: Duration::ZERO,
            force_full: true, // the first sync is always full
        }
    }

    /// A change was queued.
    pub fn request(&mut self, now: Instant) {
        self.requested_at.get_or_insert(now);
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
            let settled = requested + self.config.settle;
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

    #[test]
    fn lone_change_after_quiet_period_is_not_rate_limited() {
        let (mut s, t0) = scheduler();
        s.request(t0);
        s.started(t0);
        s.finished(t0, SyncKind::Full, true);
        let later = t0 + Duration::from_secs(10);
        s.request(later);
        assert_eq!(s.next_due(later), later + 20 * MS);
        assert_eq!(s.due(later + 20 * MS), Some(SyncKind::Partial));
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
