//! `[cluster]`: this node's name and its peers' admin addresses (docs/cluster.md).
//!
//! Peers are `http://<ip>:<port>` on the management network: plain HTTP, no names to
//! resolve. Every message between nodes carries its own signature (the webhook keys), so
//! the transport adds no trust; the choice is written down in docs/cluster.md.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

/// The raw `[cluster]` table (every key has a default; no peers = no cluster).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawCluster {
    node: String,
    peers: Vec<String>,
    sync_timeout_ms: u64,
    sync_interval_ms: u64,
    confirm_timeout_ms: u64,
    forward_queue: usize,
    max_event_age_secs: u64,
}

impl Default for RawCluster {
    fn default() -> Self {
        Self {
            node: String::new(),
            peers: Vec::new(),
            sync_timeout_ms: 10_000,
            sync_interval_ms: 2_000,
            confirm_timeout_ms: 3_000,
            forward_queue: 256,
            max_event_age_secs: 7 * 24 * 3600,
        }
    }
}

/// One peer: its admin listener on the management network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// As configured (`http://192.168.1.3:9090`): the peer's name in status and metrics.
    pub url: String,
    pub addr: SocketAddr,
}

/// The validated `[cluster]` section.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// This node's name (`a`), shown to peers and in status.
    pub node: String,
    pub peers: Vec<Peer>,
    /// At start-up, agents are refused until every peer answered or this passed.
    pub sync_timeout: Duration,
    /// How often a node asks its peers for their signed events.
    pub sync_interval: Duration,
    /// How long a network revive waits for every peer's answer before it is refused.
    pub confirm_timeout: Duration,
    /// Requests waiting to be relayed, per peer; beyond, the sync carries them.
    pub forward_queue: usize,
    /// A relayed request older than this is refused.
    pub max_event_age_secs: i64,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        // The raw defaults are valid by construction (checked by a unit test).
        compile(RawCluster::default()).unwrap_or(ClusterSettings {
            node: String::new(),
            peers: Vec::new(),
            sync_timeout: Duration::from_secs(10),
            sync_interval: Duration::from_secs(2),
            confirm_timeout: Duration::from_secs(3),
            forward_queue: 256,
            max_event_age_secs: 7 * 24 * 3600,
        })
    }
}

impl ClusterSettings {
    /// A cluster is configured when there is at least one peer.
    pub fn enabled(&self) -> bool {
        !self.peers.is_empty()
    }
}

/// What is wrong with a `[cluster]` key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SettingsError {
    #[error(
        "`{0}` is not http://<ip>:<port> (peers are addressed by IP on the management network; https is not supported, see docs/cluster.md)"
    )]
    BadPeer(String),
    #[error("peers are configured but `node` is empty: name this node (1 to 32 of a-z, 0-9, -)")]
    NoNodeName,
    #[error("`{0}` is not a node name (1 to 32 of a-z, 0-9, -)")]
    BadNodeName(String),
    #[error("`{0}` is listed twice")]
    DuplicatePeer(String),
    #[error("{0} must be at least 1")]
    Zero(&'static str),
}

impl SettingsError {
    /// The config key at fault.
    pub(crate) fn key(&self) -> &'static str {
        match self {
            SettingsError::BadPeer(_) | SettingsError::DuplicatePeer(_) => "cluster.peers",
            SettingsError::NoNodeName | SettingsError::BadNodeName(_) => "cluster.node",
            SettingsError::Zero(k) => k,
        }
    }
}

pub(crate) fn compile(raw: RawCluster) -> Result<ClusterSettings, SettingsError> {
    let mut peers: Vec<Peer> = Vec::new();
    for url in &raw.peers {
        let addr = url
            .strip_prefix("http://")
            .map(|rest| rest.trim_end_matches('/'))
            .and_then(|hostport| hostport.parse::<SocketAddr>().ok())
            .ok_or_else(|| SettingsError::BadPeer(url.clone()))?;
        if peers.iter().any(|p| p.addr == addr) {
            return Err(SettingsError::DuplicatePeer(url.clone()));
        }
        peers.push(Peer {
            url: url.clone(),
            addr,
        });
    }
    let name_ok = |n: &str| {
        (1..=32).contains(&n.len())
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if !raw.node.is_empty() && !name_ok(&raw.node) {
        return Err(SettingsError::BadNodeName(raw.node));
    }
    if !peers.is_empty() && raw.node.is_empty() {
        return Err(SettingsError::NoNodeName);
    }
    for (key, v) in [
        ("cluster.sync_interval_ms", raw.sync_interval_ms),
        ("cluster.confirm_timeout_ms", raw.confirm_timeout_ms),
        ("cluster.forward_queue", raw.forward_queue as u64),
        ("cluster.max_event_age_secs", raw.max_event_age_secs),
    ] {
        if v == 0 {
            return Err(SettingsError::Zero(key));
        }
    }
    Ok(ClusterSettings {
        node: raw.node,
        peers,
        sync_timeout: Duration::from_millis(raw.sync_timeout_ms),
        sync_interval: Duration::from_millis(raw.sync_interval_ms),
        confirm_timeout: Duration::from_millis(raw.confirm_timeout_ms),
        forward_queue: raw.forward_queue,
        max_event_age_secs: i64::try_from(raw.max_event_age_secs).unwrap_or(i64::MAX),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn raw(node: &str, peers: &[&str]) -> RawCluster {
        RawCluster {
            node: node.into(),
            peers: peers.iter().map(|p| (*p).to_owned()).collect(),
            ..RawCluster::default()
        }
    }

    #[test]
    fn defaults_are_valid_and_off() {
        let s = compile(RawCluster::default()).unwrap();
        assert!(!s.enabled());
        assert_eq!(s.sync_timeout, Duration::from_secs(10));
    }

    #[test]
    fn peers_are_plain_http_by_address() {
        let s = compile(raw(
            "a",
            &["http://192.168.1.3:9090", "http://[fd00::3]:9090/"],
        ))
        .unwrap();
        assert!(s.enabled());
        assert_eq!(s.peers[0].addr, "192.168.1.3:9090".parse().unwrap());
        assert_eq!(s.peers[1].addr, "[fd00::3]:9090".parse().unwrap());
        for bad in [
            "https://192.168.1.3:9090",
            "http://gw-b.example:9090",
            "192.168.1.3:9090",
            "http://192.168.1.3",
        ] {
            assert_eq!(
                compile(raw("a", &[bad])).unwrap_err(),
                SettingsError::BadPeer(bad.into())
            );
        }
        assert_eq!(
            compile(raw("", &["http://192.168.1.3:9090"])).unwrap_err(),
            SettingsError::NoNodeName
        );
        assert!(matches!(
            compile(raw("A b", &[])).unwrap_err(),
            SettingsError::BadNodeName(_)
        ));
        assert!(matches!(
            compile(raw(
                "a",
                &["http://192.168.1.3:9090", "http://192.168.1.3:9090/"]
            ))
            .unwrap_err(),
            SettingsError::DuplicatePeer(_)
        ));
    }
}
