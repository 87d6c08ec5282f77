//! Warnings about objects and dataplane problems without log storms.
//!
//! An invalid object is warned about once, with its namespace/name and reason, and again only
//! if its reason changes or it becomes valid and then invalid again: a relist of 10k invalid
//! objects logs nothing new. Warnings are also rate-limited (a burst of 20, then one per
//! second); those held back are counted per kind and summarised every 10 s with an example,
//! so an operator always learns how many objects were skipped. Dataplane warnings (e.g. a
//! frontend two Services claim) repeat at most once an hour.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use kube_proxy_model::Outcome;
use tracing::{trace, warn};

const BURST: f64 = 20.0;
const PER_SECOND: f64 = 1.0;
const SUMMARY_EVERY: Duration = Duration::from_secs(10);
const REPEAT_DATAPLANE_WARNING_AFTER: Duration = Duration::from_secs(3600);
/// Bound on remembered objects and warnings (beyond it, old entries are forgotten and may be
/// warned about again).
const REMEMBERED: usize = 200_000;

/// What was held back since the last summary, per kind.
#[derive(Debug, Default)]
struct Held {
    count: u64,
    example: String,
}

#[derive(Debug)]
pub struct ObjectLog {
    /// (kind, namespace/name) → the reason last warned about.
    warned: HashMap<(&'static str, String), String>,
    /// Dataplane warnings → when last logged.
    dataplane: HashMap<String, Instant>,
    tokens: f64,
    refilled: Instant,
    held: BTreeMap<&'static str, Held>,
    last_summary: Instant,
}

impl ObjectLog {
    pub fn new(now: Instant) -> Self {
        ObjectLog {
            warned: HashMap::new(),
            dataplane: HashMap::new(),
            tokens: BURST,
            refilled: now,
            held: BTreeMap::new(),
            last_summary: now,
        }
    }

    fn take_token(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * PER_SECOND).min(BURST);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Logs what applying object `name` of `kind` came to; returns whether it was warned
    /// about now.
    pub fn outcome(
        &mut self,
        kind: &'static str,
        name: &str,
        outcome: Outcome,
        now: Instant,
    ) -> bool {
        let (reason, message) = match outcome {
            Outcome::Invalid(reason) => (reason, "Skipping invalid object"),
            Outcome::ChangedWithWarnings(reason) => (reason, "Object applied, with parts ignored"),
            Outcome::Ignored(reason) => {
                trace!(kind, object = name, reason = %reason, "Object not handled by kube-proxy");
                self.forget(kind, name);
                return false;
            }
            Outcome::Changed => {
                trace!(kind, object = name, "Object changed");
                self.forget(kind, name);
                return false;
            }
            Outcome::Unchanged => return false,
        };
        let key = (kind, name.to_string());
        if self.warned.get(&key) == Some(&reason) {
            return false;
        }
        if self.warned.len() >= REMEMBERED {
            self.warned.clear();
        }
        let warned_now = self.take_token(now);
        if warned_now {
            warn!(kind, object = name, reason = %reason, "{message}");
        } else {
            let held = self.held.entry(kind).or_default();
            held.count += 1;
            if held.example.is_empty() {
                held.example = format!("{name}: {reason}");
            }
        }
        self.warned.insert(key, reason);
        self.summarize(now);
        warned_now
    }

    /// The object is gone (deleted): warn again if it comes back invalid.
    pub fn forget(&mut self, kind: &'static str, name: &str) {
        if !self.warned.is_empty() {
            self.warned.remove(&(kind, name.to_string()));
        }
    }

    /// Logs a dataplane warning unless the same one was logged within the hour.
    pub fn dataplane_warning(&mut self, text: String, now: Instant) {
        if let Some(at) = self.dataplane.get(&text) {
            if now.saturating_duration_since(*at) < REPEAT_DATAPLANE_WARNING_AFTER {
                return;
            }
        }
        if self.dataplane.len() >= REMEMBERED {
            self.dataplane.clear();
        }
        if self.take_token(now) {
            warn!("{text}");
        } else {
            let held = self.held.entry("dataplane warning").or_default();
            held.count += 1;
            if held.example.is_empty() {
                held.example = text.clone();
            }
        }
        self.dataplane.insert(text, now);
    }

    /// Every 10 s, how many warnings were held back, per kind, with an example.
    pub fn summarize(&mut self, now: Instant) {
        if self.held.is_empty() || now.saturating_duration_since(self.last_summary) < SUMMARY_EVERY
        {
            return;
        }
        self.last_summary = now;
        for (kind, held) in std::mem::take(&mut self.held) {
            warn!(
                kind,
                count = held.count,
                example = %held.example,
                "More invalid objects or problems were skipped without a warning each (rate limit); each is logged once"
            );
        }
    }

    /// When the next summary is due, if anything was held back.
    pub fn next_summary(&self) -> Option<Instant> {
        (!self.held.is_empty()).then(|| self.last_summary + SUMMARY_EVERY)
    }

    /// Warnings held back and not yet summarised.
    pub fn held_back(&self) -> u64 {
        self.held.values().map(|h| h.count).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_invalid_object_is_warned_once_and_storms_are_summarised() {
        let start = Instant::now();
        let mut log = ObjectLog::new(start);
        let invalid = |i: usize| Outcome::Invalid(format!("reason {}", i % 3));
        let mut warned = 0;
        for i in 0..10_000 {
            warned += usize::from(log.outcome("Service", &format!("ns/s{i}"), invalid(i), start));
        }
        assert_eq!(warned, 20, "a burst, then nothing");
        assert_eq!(log.held_back(), 9_980);
        // A relist of the same objects: nothing new, nothing held.
        for i in 0..10_000 {
            assert!(!log.outcome("Service", &format!("ns/s{i}"), invalid(i), start));
        }
        assert_eq!(log.held_back(), 9_980);
        // The summary comes after 10 s and empties the count.
        log.summarize(start + Duration::from_secs(11));
        assert_eq!(log.held_back(), 0);
        // A new reason is news; a fixed object that breaks again is news again.
        let later = start + Duration::from_secs(60);
        assert!(log.outcome("Service", "ns/s1", Outcome::Invalid("other".into()), later));
        assert!(!log.outcome("Service", "ns/s2", Outcome::Changed, later));
        assert!(log.outcome("Service", "ns/s2", invalid(2), later));
        log.forget("Service", "ns/s3");
        assert!(log.outcome("Service", "ns/s3", invalid(3), later));
    }

    #[test]
    fn dataplane_warnings_repeat_at_most_hourly() {
        let start = Instant::now();
        let mut log = ObjectLog::new(start);
        log.dataplane_warning("conflict".into(), start);
        assert!(log.dataplane.contains_key("conflict"));
        let at = log.dataplane["conflict"];
        log.dataplane_warning("conflict".into(), start + Duration::from_secs(60));
        assert_eq!(
            log.dataplane["conflict"], at,
            "not repeated within the hour"
        );
        log.dataplane_warning("conflict".into(), start + Duration::from_secs(3700));
        assert_ne!(log.dataplane["conflict"], at);
    }
}
