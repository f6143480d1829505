//! Per-agent cap on concurrent tunnels. Owns the in-use counters and the
//! RAII permits; must not decide what the cap is (config does) nor do I/O.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

type Counts = Arc<Mutex<HashMap<String, u32>>>;

/// Counts open tunnels per agent. Cloning shares the counters.
#[derive(Debug, Clone, Default)]
pub struct ConcurrencyCaps {
    counts: Counts,
}

/// One open tunnel of `agent`; releases its slot when dropped. Owns an `Arc`
/// so it can move into a spawned task with the tunnel.
#[derive(Debug)]
#[must_use = "dropping the permit releases the slot immediately"]
pub struct Permit {
    counts: Counts,
    agent: String,
}

fn lock(counts: &Counts) -> MutexGuard<'_, HashMap<String, u32>> {
    // Poison only means a panic elsewhere; each update is a single integer
    // write, so the map is still consistent and limits must keep working.
    counts.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ConcurrencyCaps {
    pub fn new() -> Self {
        Self::default()
    }

    /// A permit if `agent` has fewer than `max` tunnels open, else `None`.
    /// `max == 0` refuses everything.
    pub fn try_acquire(&self, agent: &str, max: u32) -> Option<Permit> {
        let mut counts = lock(&self.counts);
        let n = counts.get(agent).copied().unwrap_or(0);
        if n >= max {
            return None;
        }
        counts.insert(agent.to_owned(), n + 1);
        Some(Permit {
            counts: Arc::clone(&self.counts),
            agent: agent.to_owned(),
        })
    }

    #[cfg(test)]
    /// Tunnels `agent` currently holds (for metrics and status).
    pub fn in_use(&self, agent: &str) -> u32 {
        lock(&self.counts).get(agent).copied().unwrap_or(0)
    }
}

impl Permit {
    #[cfg(test)]
    pub fn agent(&self) -> &str {
        &self.agent
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts);
        if let Some(n) = counts.get_mut(&self.agent) {
            *n = n.saturating_sub(1);
            // Drop idle entries so the map does not grow with every agent ever seen.
            if *n == 0 {
                counts.remove(&self.agent);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_is_enforced() {
        let caps = ConcurrencyCaps::new();
        let a = caps.try_acquire("a", 2);
        let b = caps.try_acquire("a", 2);
        assert!(a.is_some() && b.is_some());
        assert!(caps.try_acquire("a", 2).is_none());
        assert_eq!(caps.in_use("a"), 2);
        assert!(caps.try_acquire("z", 0).is_none());
    }

    #[test]
    fn release_on_drop() {
        let caps = ConcurrencyCaps::new();
        let p = caps.try_acquire("a", 1);
        assert_eq!(p.as_ref().map(Permit::agent), Some("a"));
        assert!(caps.try_acquire("a", 1).is_none());
        drop(p);
        assert_eq!(caps.in_use("a"), 0);
        assert!(caps.try_acquire("a", 1).is_some());
        assert!(lock(&caps.counts).is_empty(), "idle entries removed");
    }

    #[test]
    fn agents_are_independent() {
        let caps = ConcurrencyCaps::new();
        let _a = caps.try_acquire("a", 1);
        assert!(caps.try_acquire("a", 1).is_none());
        let b = caps.try_acquire("b", 1);
        assert!(b.is_some());
        assert_eq!((caps.in_use("a"), caps.in_use("b")), (1, 1));
    }

    #[test]
    fn shared_across_clones_and_threads() {
        let caps = ConcurrencyCaps::new();
        let got: Vec<Option<Permit>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    let caps = caps.clone();
                    s.spawn(move || caps.try_acquire("a", 3))
                })
                .collect();
            hs.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        assert_eq!(got.iter().filter(|p| p.is_some()).count(), 3);
        drop(got);
        assert_eq!(caps.in_use("a"), 0);
    }
}
