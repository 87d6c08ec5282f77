//! Round robin over a listener's endpoints with ClientIP session affinity: upstream's
//! `LoadBalancerRR` (v1.25 `pkg/proxy/userspace/roundrobin.go`).
//!
//! - Without affinity each new connection (or UDP client) takes the next endpoint.
//! - With affinity a client address keeps the endpoint it was last given while it comes back
//!   within the timeout (each use refreshes it); a failed connect resets it (the retry takes
//!   the next endpoint and the client sticks to that one).
//! - An endpoint change keeps the position in the rotation and the affinity of clients whose
//!   endpoint is still there.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub struct Balancer {
    endpoints: Vec<SocketAddr>,
    next: usize,
    affinity: Option<Affinity>,
    /// Bumped by every endpoint change (UDP flows re-check their endpoint then).
    version: u64,
}

#[derive(Debug)]
struct Affinity {
    timeout: Duration,
    clients: HashMap<IpAddr, Sticky>,
}

#[derive(Clone, Copy, Debug)]
struct Sticky {
    endpoint: SocketAddr,
    last_used: Instant,
}

impl Balancer {
    pub fn new(endpoints: Vec<SocketAddr>, affinity: Option<Duration>) -> Balancer {
        let mut balancer = Balancer::default();
        balancer.update(endpoints, affinity);
        balancer
    }

    /// Replaces the endpoints and the affinity timeout.
    pub fn update(&mut self, endpoints: Vec<SocketAddr>, affinity: Option<Duration>) {
        if endpoints != self.endpoints {
            self.version += 1;
        }
        self.affinity = match (self.affinity.take(), affinity) {
            (Some(mut old), Some(timeout)) if old.timeout == timeout => {
                old.clients.retain(|_, s| endpoints.contains(&s.endpoint));
                Some(old)
            }
            (_, Some(timeout)) => Some(Affinity {
                timeout,
                clients: HashMap::new(),
            }),
            (_, None) => None,
        };
        self.next = if endpoints.is_empty() {
            0
        } else {
            self.next % endpoints.len()
        };
        self.endpoints = endpoints;
    }

    pub fn endpoints(&self) -> &[SocketAddr] {
        &self.endpoints
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// The endpoint for a new connection from `client`; `reset` after a failed connect (the
    /// client's affinity is not followed). `None` when there is no endpoint.
    pub fn next(&mut self, client: IpAddr, reset: bool, now: Instant) -> Option<SocketAddr> {
        if self.endpoints.is_empty() {
            return None;
        }
        if let Some(affinity) = &mut self.affinity {
            if !reset {
                if let Some(sticky) = affinity.clients.get_mut(&client) {
                    if now.saturating_duration_since(sticky.last_used) < affinity.timeout
                        && self.endpoints.contains(&sticky.endpoint)
                    {
                        sticky.last_used = now;
                        return Some(sticky.endpoint);
                    }
                }
            }
        }
        let endpoint = self.endpoints[self.next];
        self.next = (self.next + 1) % self.endpoints.len();
        if let Some(affinity) = &mut self.affinity {
            affinity.clients.insert(
                client,
                Sticky {
                    endpoint,
                    last_used: now,
                },
            );
        }
        Some(endpoint)
    }

    /// Forgets clients whose affinity expired (upstream's `CleanupStaleStickySessions`).
    pub fn expire(&mut self, now: Instant) {
        if let Some(affinity) = &mut self.affinity {
            let timeout = affinity.timeout;
            affinity
                .clients
                .retain(|_, s| now.saturating_duration_since(s.last_used) < timeout);
        }
    }

    /// Clients with an affinity entry (for tests and the state dump).
    pub fn sticky_clients(&self) -> usize {
        self.affinity.as_ref().map_or(0, |a| a.clients.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(last: u8) -> SocketAddr {
        SocketAddr::from(([198, 18, 1, last], 8080))
    }

    fn client(last: u8) -> IpAddr {
        IpAddr::from([203, 0, 113, last])
    }

    #[test]
    fn round_robin_visits_every_endpoint_in_turn() {
        let now = Instant::now();
        let mut b = Balancer::new(vec![ep(1), ep(2), ep(3)], None);
        let picks: Vec<_> = (0..6).map(|_| b.next(client(5), false, now)).collect();
        assert_eq!(
            picks,
            [ep(1), ep(2), ep(3), ep(1), ep(2), ep(3)]
                .map(Some)
                .to_vec()
        );
        assert_eq!(
            Balancer::new(vec![], None).next(client(5), false, now),
            None
        );
    }

    #[test]
    fn affinity_sticks_until_the_timeout_and_a_reset_moves_on() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut b = Balancer::new(vec![ep(1), ep(2), ep(3)], Some(ttl));
        let first = b.next(client(5), false, t0).unwrap();
        let other = b.next(client(6), false, t0).unwrap();
        assert_ne!(first, other, "another client takes the next endpoint");
        for s in 1..5 {
            let later = t0 + Duration::from_secs(s * 5);
            assert_eq!(
                b.next(client(5), false, later),
                Some(first),
                "refreshed by use"
            );
        }
        // A failed connect: the retry takes another endpoint, and the client sticks to it.
        let moved = b
            .next(client(5), true, t0 + Duration::from_secs(21))
            .unwrap();
        assert_ne!(moved, first);
        assert_eq!(
            b.next(client(5), false, t0 + Duration::from_secs(22)),
            Some(moved)
        );
        // Idle past the timeout: a new pick (and expire() forgets it).
        let idle = t0 + Duration::from_secs(40);
        b.expire(idle);
        assert_eq!(b.sticky_clients(), 0);
    }

    #[test]
    fn endpoint_changes_keep_the_affinity_of_remaining_endpoints() {
        let now = Instant::now();
        let ttl = Duration::from_secs(100);
        let mut b = Balancer::new(vec![ep(1), ep(2)], Some(ttl));
        assert_eq!(b.next(client(1), false, now), Some(ep(1)));
        assert_eq!(b.next(client(2), false, now), Some(ep(2)));
        let version = b.version();
        b.update(vec![ep(2), ep(3)], Some(ttl));
        assert_ne!(b.version(), version);
        assert_eq!(b.next(client(2), false, now), Some(ep(2)), "kept");
        assert_ne!(
            b.next(client(1), false, now),
            Some(ep(1)),
            "its endpoint is gone"
        );
        // Same endpoints: no new version; affinity off: no entries.
        let version = b.version();
        b.update(vec![ep(2), ep(3)], None);
        assert_eq!(b.version(), version);
        assert_eq!(b.sticky_clients(), 0);
        b.update(vec![], None);
        assert_eq!(b.next(client(1), false, now), None);
    }
}
