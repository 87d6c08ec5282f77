//! Which host port a listener takes: any free port the kernel picks when `portRange` is empty,
//! else a port of the range that no listener of ours holds (upstream's `PortAllocator`
//! starts at a random port of the range; we start after the last one given, which spreads
//! the same way without a random source and is reproducible in tests).

use std::collections::BTreeSet;

#[derive(Debug, Default)]
pub struct PortAllocator {
    range: Option<(u16, u16)>,
    used: BTreeSet<u16>,
    next: u16,
}

impl PortAllocator {
    pub fn new(range: Option<(u16, u16)>) -> PortAllocator {
        PortAllocator {
            range,
            used: BTreeSet::new(),
            next: range.map_or(0, |r| r.0),
        }
    }

    /// The ports to try, in order: `[0]` (the kernel picks) without a range, else every free
    /// port of the range once, starting after the last one handed out. The caller binds the
    /// first that is free on the host and [`take`](Self::take)s it.
    pub fn candidates(&self) -> Vec<u16> {
        let Some((first, last)) = self.range else {
            return vec![0];
        };
        let after = (self.next..=last).chain(first..self.next);
        after.filter(|p| !self.used.contains(p)).collect()
    }

    /// Marks `port` (bound by the caller) as ours.
    pub fn take(&mut self, port: u16) {
        self.used.insert(port);
        if let Some((first, last)) = self.range {
            self.next = if port >= last { first } else { port + 1 };
        }
    }

    pub fn release(&mut self, port: u16) {
        self.used.remove(&port);
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_range_the_kernel_picks() {
        let ports = PortAllocator::new(None);
        assert_eq!(ports.candidates(), vec![0]);
    }

    #[test]
    fn a_range_is_used_round_and_released_ports_come_back() {
        let mut ports = PortAllocator::new(Some((40000, 40002)));
        assert_eq!(ports.candidates(), vec![40000, 40001, 40002]);
        ports.take(40000);
        ports.take(40001);
        assert_eq!(ports.candidates(), vec![40002]);
        ports.take(40002);
        assert!(ports.candidates().is_empty(), "exhausted");
        ports.release(40001);
        assert_eq!(ports.candidates(), vec![40001]);
        assert_eq!(ports.in_use(), 2);
    }
}
