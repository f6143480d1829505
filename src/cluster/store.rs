//! The signed events a node applied (`state_dir/cluster.json`): the original requests,
//! headers and body unchanged, so a peer can verify each one itself; and, per peer, the
//! newest event time it had when it last answered (the start-up fail-closed rule).
//!
//! Bounded: events older than the age bound leave, and beyond [`MAX_EVENTS`] the oldest.
//! Written atomically (temp file, fsync, rename, fsync dir). An unreadable file is treated
//! as empty and replaced: the kill state itself lives in the kill switch's own file, and
//! the peers' events come back at the next sync.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

/// File name inside `state_dir`.
pub const FILE: &str = "cluster.json";
/// Events kept at most.
pub const MAX_EVENTS: usize = 512;

/// Kill or revive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Kill,
    Revive,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Kill => "kill",
            Action::Revive => "revive",
        }
    }
}

/// One signed request, as it arrived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedEvent {
    pub action: Action,
    /// `webhook-id`
    pub id: String,
    /// `webhook-timestamp`, exactly as signed.
    pub timestamp: String,
    /// `webhook-signature`
    pub signature: String,
    /// The body exactly as signed, base64.
    pub body: String,
}

impl SignedEvent {
    pub fn new(action: Action, id: &str, timestamp: &str, signature: &str, body: &[u8]) -> Self {
        SignedEvent {
            action,
            id: id.to_owned(),
            timestamp: timestamp.to_owned(),
            signature: signature.to_owned(),
            body: B64.encode(body),
        }
    }

    /// The body bytes; `None` when the base64 is broken (then the event is refused).
    pub fn body_bytes(&self) -> Option<Vec<u8>> {
        B64.decode(&self.body).ok()
    }

    /// The signed time, when it is a number (verification judges it properly).
    pub fn signed_at(&self) -> i64 {
        self.timestamp.parse().unwrap_or(0)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Store {
    pub events: Vec<SignedEvent>,
    /// Per peer (its URL): the newest signed time among the events it last sent.
    pub peers_latest: BTreeMap<String, i64>,
}

impl Store {
    pub fn knows(&self, id: &str) -> bool {
        self.events.iter().any(|e| e.id == id)
    }

    /// The newest signed time of an event this node applied (0: none).
    pub fn latest(&self) -> i64 {
        self.events
            .iter()
            .map(SignedEvent::signed_at)
            .max()
            .unwrap_or(0)
    }

    /// Add an applied event; drop those older than `now - max_age`, then the oldest beyond
    /// [`MAX_EVENTS`].
    pub fn record(&mut self, event: SignedEvent, now: i64, max_age: i64) {
        if !self.knows(&event.id) {
            self.events.push(event);
        }
        let oldest = now.saturating_sub(max_age);
        self.events.retain(|e| e.signed_at() >= oldest);
        self.events.sort_by_key(SignedEvent::signed_at);
        let excess = self.events.len().saturating_sub(MAX_EVENTS);
        self.events.drain(..excess);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot serialize the cluster events: {0}")]
    Serialize(#[from] serde_json::Error),
}

/// Read the store; missing or unreadable → empty (logged by the caller).
pub fn load(path: &Path) -> Result<Store, String> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| e.to_string()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Store::default()),
        Err(e) => Err(e.to_string()),
    }
}

/// Write atomically and durably.
pub fn save(path: &Path, store: &Store) -> Result<(), StoreError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let json = serde_json::to_vec(store)?;
    crate::sys::durable::replace(path, Path::new(&tmp), &json).map_err(|e| StoreError::Io {
        op: e.op,
        path: e.path,
        source: e.source,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ev(id: &str, ts: i64) -> SignedEvent {
        SignedEvent::new(Action::Kill, id, &ts.to_string(), "v1,x", b"{}")
    }

    #[test]
    fn record_is_idempotent_and_bounded_by_age_and_count() {
        let mut s = Store::default();
        s.record(ev("a", 100), 100, 50);
        s.record(ev("a", 100), 100, 50);
        assert_eq!(s.events.len(), 1);
        s.record(ev("b", 160), 160, 50);
        assert!(!s.knows("a"), "older than the age bound");
        assert_eq!(s.latest(), 160);
        for i in 0..(MAX_EVENTS + 10) {
            s.record(ev(&format!("n{i}"), 1_000 + i as i64), 2_000, 10_000);
        }
        assert_eq!(s.events.len(), MAX_EVENTS);
        assert!(!s.knows("n0") && s.knows(&format!("n{}", MAX_EVENTS + 9)));
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        assert_eq!(load(&path).unwrap(), Store::default());
        let mut s = Store::default();
        s.record(ev("a", 100), 100, 50);
        s.peers_latest.insert("http://10.0.0.2:9090".into(), 99);
        save(&path, &s).unwrap();
        assert_eq!(load(&path).unwrap(), s);
        assert_eq!(s.events[0].body_bytes().unwrap(), b"{}");
    }
}
