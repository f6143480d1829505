//! Bounded accept: a global cap on live connections and a per-source cap, so one noisy
//! source cannot take every slot (THREATS E18–E19). Acquiring never waits: over the cap, the
//! connection is refused at once and the accept loop moves on.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The caps shared by every listener.
#[derive(Debug)]
pub struct ConnectionCaps {
    max_total: usize,
    max_per_source: usize,
    state: Mutex<CapsState>,
}

#[derive(Debug, Default)]
struct CapsState {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// A held slot; released on drop (also when a connection task panics and unwinds).
#[derive(Debug)]
pub struct ConnectionSlot {
    caps: Arc<ConnectionCaps>,
    source: IpAddr,
}

impl ConnectionCaps {
    pub fn new(max_total: usize, max_per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_source,
            state: Mutex::default(),
        })
    }

    /// Take a slot for `source`, or `None` when a cap is reached.
    pub fn try_acquire(self: &Arc<Self>, source: IpAddr) -> Option<ConnectionSlot> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.total >= self.max_total {
            return None;
        }
        let n = st.per_source.entry(source).or_insert(0);
        if *n >= self.max_per_source {
            return None;
        }
        *n += 1;
        st.total += 1;
        Some(ConnectionSlot {
            caps: self.clone(),
            source,
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
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn caps_bound_total_and_per_source_and_release_on_drop() {
        let caps = ConnectionCaps::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = caps.try_acquire(a).unwrap();
        let _s2 = caps.try_acquire(a).unwrap();
        assert!(caps.try_acquire(a).is_none(), "per-source cap");
        let _s3 = caps.try_acquire(b).unwrap();
        assert!(caps.try_acquire(b).is_none(), "total cap");
        drop(s1);
        assert!(caps.try_acquire(a).is_some());
    }
}
