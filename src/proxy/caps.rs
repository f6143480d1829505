//! Bounded accept: a global cap on live connections, a share per agent (all its source
//! addresses together), one small shared bucket for sources that are no agent's, and a
//! per-source cap inside each. The agent is known before any cap is taken (its source
//! address, a map lookup), so one agent at its share — however many addresses it uses —
//! and any number of unknown sources leave the rest of the total to the other agents.
//! Acquiring never waits: over a cap, the connection is refused at once and the accept loop
//! moves on.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The caps' sizes (`[caps]`).
#[derive(Debug, Clone, Copy)]
pub struct CapLimits {
    pub total: usize,
    pub per_source: usize,
    pub per_agent: usize,
    pub unknown: usize,
}

/// The caps shared by every listener.
#[derive(Debug)]
pub struct ConnectionCaps {
    limits: CapLimits,
    state: Mutex<CapsState>,
}

#[derive(Debug, Default)]
struct CapsState {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
    /// Keyed by agent name: stable across reloads, bounded by the rules.
    per_agent: HashMap<Arc<str>, usize>,
    unknown: usize,
}

/// A held slot; released on drop (also when a connection task panics and unwinds).
#[derive(Debug)]
pub struct ConnectionSlot {
    caps: Arc<ConnectionCaps>,
    source: IpAddr,
    /// `None`: the unknown-sources bucket.
    agent: Option<Arc<str>>,
}

impl ConnectionCaps {
    pub fn new(limits: CapLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            state: Mutex::default(),
        })
    }

    /// Take a slot for `source`, owned by `agent` (`None`: the address is no agent's), or
    /// `None` when a cap is reached.
    pub fn try_acquire(
        self: &Arc<Self>,
        agent: Option<&Arc<str>>,
        source: IpAddr,
    ) -> Option<ConnectionSlot> {
        let l = &self.limits;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.total >= l.total {
            return None;
        }
        let held = match agent {
            Some(a) => st.per_agent.get(&**a).copied().unwrap_or(0),
            None => st.unknown,
        };
        let share = if agent.is_some() {
            l.per_agent
        } else {
            l.unknown
        };
        if held >= share {
            return None;
        }
        let n = st.per_source.entry(source).or_insert(0);
        if *n >= l.per_source {
            return None;
        }
        *n += 1;
        st.total += 1;
        match agent {
            Some(a) => *st.per_agent.entry(a.clone()).or_insert(0) += 1,
            None => st.unknown += 1,
        }
        Some(ConnectionSlot {
            caps: self.clone(),
            source,
            agent: agent.cloned(),
        })
    }

    pub fn in_use(&self) -> usize {
        self.state.lock().map(|s| s.total).unwrap_or(0)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut st = self.caps.state.lock().unwrap_or_else(|p| p.into_inner());
        st.total = st.total.saturating_sub(1);
        if let Some(n) = st.per_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                st.per_source.remove(&self.source);
            }
        }
        match &self.agent {
            Some(a) => {
                if let Some(n) = st.per_agent.get_mut(&**a) {
                    *n -= 1;
                    if *n == 0 {
                        st.per_agent.remove(&**a);
                    }
                }
            }
            None => st.unknown = st.unknown.saturating_sub(1),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn caps(
        total: usize,
        per_source: usize,
        per_agent: usize,
        unknown: usize,
    ) -> Arc<ConnectionCaps> {
        ConnectionCaps::new(CapLimits {
            total,
            per_source,
            per_agent,
            unknown,
        })
    }

    #[test]
    fn caps_bound_total_and_per_source_and_release_on_drop() {
        let caps = caps(3, 2, 10, 10);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = caps.try_acquire(None, a).unwrap();
        let _s2 = caps.try_acquire(None, a).unwrap();
        assert!(caps.try_acquire(None, a).is_none(), "per-source cap");
        let _s3 = caps.try_acquire(None, b).unwrap();
        assert!(caps.try_acquire(None, b).is_none(), "total cap");
        drop(s1);
        assert!(caps.try_acquire(None, a).is_some());
    }

    /// The field report: an agent with 4 addresses took the whole total and its neighbour
    /// was reset; silent connections from addresses of no agent did the same.
    #[test]
    fn one_agent_on_many_addresses_and_unknown_sources_leave_room_for_another() {
        let caps = caps(400, 1_000, 300, 50);
        let greedy: Arc<str> = Arc::from("greedy");
        let other: Arc<str> = Arc::from("other");
        let mut held = Vec::new();
        for i in 0..1_000u32 {
            let ip = IpAddr::from([10, 66, 0, 2 + (i % 4) as u8]);
            if let Some(s) = caps.try_acquire(Some(&greedy), ip) {
                held.push(s);
            }
            let unknown = IpAddr::from([10, 99, (i / 250) as u8, (i % 250) as u8]);
            if let Some(s) = caps.try_acquire(None, unknown) {
                held.push(s);
            }
        }
        assert_eq!(held.len(), 350);
        for i in 0..50u8 {
            let ip = IpAddr::from([10, 66, 1, i]);
            assert!(caps.try_acquire(Some(&other), ip).is_some(), "{i}");
        }
        drop(held);
        assert_eq!(caps.in_use(), 0);
        assert!(caps.state.lock().unwrap().per_agent.is_empty());
    }

    proptest! {
        /// Whatever is acquired and released, the counts never exceed their caps and go
        /// back to zero.
        #[test]
        fn counts_stay_within_caps(ops in proptest::collection::vec((0u8..4, 0u8..6, any::<bool>()), 1..300)) {
            let caps = caps(20, 4, 8, 5);
            let names: Vec<Arc<str>> = (0..3).map(|i| Arc::from(format!("a{i}"))).collect();
            let mut held: Vec<ConnectionSlot> = Vec::new();
            for (who, src, release) in ops {
                if release && !held.is_empty() {
                    held.remove(usize::from(src) % held.len());
                    continue;
                }
                let agent = names.get(usize::from(who));
                if let Some(s) = caps.try_acquire(agent, IpAddr::from([10, 0, who, src])) {
                    held.push(s);
                }
                let st = caps.state.lock().unwrap();
                prop_assert!(st.total <= 20 && st.unknown <= 5);
                prop_assert!(st.per_agent.values().all(|n| *n <= 8));
                prop_assert!(st.per_source.values().all(|n| *n <= 4));
            }
            drop(held);
            prop_assert_eq!(caps.in_use(), 0);
        }
    }
}
