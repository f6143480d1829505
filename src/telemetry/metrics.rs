//! Prometheus metrics (`prometheus-client`, OpenMetrics text at `/metrics`), docs/observability.md.
//!
//! Labels are bounded: `agent` (from the rules, plus `unknown`), `mode`, `verdict`,
//! `reason`, `direction`, `result`, `scope` — never a domain or an address. Per-agent handles
//! are created once and cached, so recording a connection is a handful of atomic adds, not
//! label lookups by string.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use super::record::{ConnectionRecord, Mode};
use crate::hash::RuleKeyMap;
use crate::policy::Reason;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnLabels {
    agent: String,
    mode: &'static str,
    verdict: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabel {
    agent: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    agent: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DnsLabels {
    agent: String,
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabel {
    scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LogLabels {
    agent: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Why a kill-switch request was refused before it could act (the metric's `reason`).
pub const KILL_SWITCH_AUTH_REASONS: [&str; 5] = [
    "signature_invalid",
    "stale",
    "replay",
    "totp_invalid",
    "totp_locked",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

/// A cluster node's view of its peers (src/cluster/).
struct ClusterMetrics {
    synced: Gauge,
    peer_up: Family<PeerLabel, Gauge>,
    relay_pending: Family<PeerLabel, Gauge>,
}

impl ClusterMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = ClusterMetrics {
            synced: Gauge::default(),
            peer_up: Family::default(),
            relay_pending: Family::default(),
        };
        registry.register(
            "cluster_synced",
            "1 once this cluster node has synced with its peers after start-up (0 while it refuses agents, waiting)",
            m.synced.clone(),
        );
        registry.register(
            "cluster_peer_up",
            "1 while the peer answered this node's last sync call",
            m.peer_up.clone(),
        );
        registry.register(
            "cluster_relay_pending",
            "Signed kill and revive requests waiting to be relayed to the peer",
            m.relay_pending.clone(),
        );
        m
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabel {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

const MODES: [Mode; 3] = [Mode::Explicit, Mode::Transparent, Mode::Dns];

/// `mode`'s place in [`MODES`], for the per-mode handle arrays.
fn mode_slot(mode: Mode) -> usize {
    MODES.iter().position(|x| *x == mode).unwrap_or(0)
}
/// Outcome slots per mode: allow, then one per deny reason.
const OUTCOMES: usize = 1 + Reason::ALL.len();

/// Handles for one agent, created on first use and kept.
pub struct AgentMetrics {
    name: String,
    connections: Family<ConnLabels, Counter>,
    conn_slots: [OnceLock<Counter>; MODES.len() * OUTCOMES],
    pub bytes_from_agent: Counter,
    pub bytes_to_agent: Counter,
    pub active_tunnels: Gauge,
    pub dns_allowed: Counter,
    pub dns_refused: Counter,
    /// This agent's lines in the log queue now: bounded by its fair share.
    pub(crate) log_queued: std::sync::atomic::AtomicUsize,
    /// Lines held back by the share since the last summary, by (mode, reason).
    log_held: std::sync::Mutex<HashMap<(Mode, Option<Reason>), u64>>,
    /// Held back and summarised / lost because the whole queue was full.
    log_summarized: Counter,
    log_lost: Counter,
}

impl AgentMetrics {
    /// A line of this agent's held back by its share of the log queue: counted into the next
    /// summary line.
    pub(crate) fn hold(&self, mode: Mode, reason: Option<Reason>) {
        self.log_summarized.inc();
        let mut held = self.log_held.lock().unwrap_or_else(|p| p.into_inner());
        *held.entry((mode, reason)).or_insert(0) += 1;
    }

    /// Take what was held back since the last call.
    pub(crate) fn take_held(&self) -> Vec<((Mode, Option<Reason>), u64)> {
        let mut held = self.log_held.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = held.drain().collect();
        out.sort_by_key(|((m, r), _)| (m.as_str(), r.map(Reason::as_str)));
        out
    }

    /// A line lost because the whole queue was full.
    pub(crate) fn lost(&self) {
        self.log_lost.inc();
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn connection_counter(&self, mode: Mode, reason: Option<Reason>) -> &Counter {
        let m = mode_slot(mode);
        let r = reason
            .and_then(|r| Reason::ALL.iter().position(|x| *x == r))
            .map_or(0, |i| i + 1);
        let slot = self
            .conn_slots
            .get(m * OUTCOMES + r)
            .unwrap_or(&self.conn_slots[0]);
        slot.get_or_init(|| {
            self.connections
                .get_or_create(&ConnLabels {
                    agent: self.name.clone(),
                    mode: mode.as_str(),
                    verdict: if reason.is_some() { "deny" } else { "allow" },
                    reason: reason.map_or("none", Reason::as_str),
                })
                .clone()
        })
    }
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    connections: Family<ConnLabels, Counter>,
    active_tunnels: Family<AgentLabel, Gauge>,
    bytes: Family<BytesLabels, Counter>,
    dns_queries: Family<DnsLabels, Counter>,
    budget_remaining: Family<AgentLabel, Gauge>,
    budget_limit: Family<AgentLabel, Gauge>,
    connection_duration: Family<ModeLabel, Histogram>,
    pub decision_duration: Histogram,
    pub policy_generation: Gauge,
    policy_reloads: Family<ResultLabel, Counter>,
    policy_reload_failed: Gauge,
    cluster: ClusterMetrics,
    kill_switch: Family<ScopeLabel, Gauge>,
    kill_switch_auth_failures: Family<ReasonLabel, Counter>,
    pub log_dropped: Counter,
    log_dropped_by_agent: Family<LogLabels, Counter>,
    agents: RwLock<RuleKeyMap<String, Arc<AgentMetrics>>>,
    /// `connection_duration`'s handle per mode (by [`mode_slot`]), taken from the family
    /// once: a family lookup hashes the label and takes a lock, on every connection.
    durations: [OnceLock<Histogram>; MODES.len()],
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("portcullis");
        let connections = Family::<ConnLabels, Counter>::default();
        registry.register(
            "connections",
            "Connections by agent, mode, verdict and reason",
            connections.clone(),
        );
        let active_tunnels = Family::<AgentLabel, Gauge>::default();
        registry.register(
            "active_tunnels",
            "Tunnels currently relaying",
            active_tunnels.clone(),
        );
        let bytes = Family::<BytesLabels, Counter>::default();
        registry.register(
            "bytes",
            "Bytes relayed, by agent and direction (from_agent, to_agent)",
            bytes.clone(),
        );
        let dns_queries = Family::<DnsLabels, Counter>::default();
        registry.register(
            "dns_queries",
            "DNS queries by agent and verdict",
            dns_queries.clone(),
        );
        let budget_remaining = Family::<AgentLabel, Gauge>::default();
        registry.register_with_unit(
            "budget_remaining",
            "Daily byte budget left per agent (agents with a budget)",
            Unit::Bytes,
            budget_remaining.clone(),
        );
        let budget_limit = Family::<AgentLabel, Gauge>::default();
        registry.register_with_unit(
            "budget_limit",
            "Daily byte budget per agent (agents with a budget)",
            Unit::Bytes,
            budget_limit.clone(),
        );
        let connection_duration = Family::<ModeLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 4.0, 12))
        });
        registry.register_with_unit(
            "connection_duration",
            "Connection lifetime",
            Unit::Seconds,
            connection_duration.clone(),
        );
        let decision_duration = Histogram::new(exponential_buckets(1e-7, 4.0, 10));
        registry.register_with_unit(
            "decision_duration",
            "Time to evaluate the policy for one target",
            Unit::Seconds,
            decision_duration.clone(),
        );
        let policy_generation = Gauge::default();
        registry.register(
            "policy_generation",
            "Generation of the policy in force",
            policy_generation.clone(),
        );
        let policy_reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "policy_reload",
            "Policy reloads by result",
            policy_reloads.clone(),
        );
        let policy_reload_failed = Gauge::default();
        registry.register(
            "policy_reload_failed",
            "1 while the last policy reload failed (the previous generation still serves)",
            policy_reload_failed.clone(),
        );
        let cluster = ClusterMetrics::register(&mut registry);
        let kill_switch = Family::<ScopeLabel, Gauge>::default();
        registry.register(
            "kill_switch_engaged",
            "1 while the kill switch is engaged for the scope (all, or an agent name)",
            kill_switch.clone(),
        );
        let kill_switch_auth_failures = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "kill_switch_auth_failures",
            "Kill-switch and admin requests refused: bad signature, stale timestamp, replayed id, wrong TOTP code, or revive locked after failures",
            kill_switch_auth_failures.clone(),
        );
        let log_dropped = Counter::default();
        registry.register(
            "log_dropped",
            "Connection log lines dropped because the queue was full",
            log_dropped.clone(),
        );
        let log_dropped_by_agent = Family::<LogLabels, Counter>::default();
        registry.register(
            "log_dropped_by_agent",
            "Connection log lines not written one by one, by agent: summarized (held back by the agent's share of the log queue and counted in a summary line) or lost (the whole queue was full)",
            log_dropped_by_agent.clone(),
        );
        let build_info = Family::<VersionLabel, Gauge>::default();
        build_info
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "Build information", build_info);
        registry.register_collector(Box::new(super::process::ProcessCollector));
        // Series that alerts and dashboards query exist from the start, at zero.
        for result in ["success", "failure"] {
            policy_reloads
                .get_or_create(&ResultLabel { result })
                .inc_by(0);
        }
        kill_switch
            .get_or_create(&ScopeLabel {
                scope: "all".into(),
            })
            .set(0);
        for reason in KILL_SWITCH_AUTH_REASONS {
            kill_switch_auth_failures
                .get_or_create(&ReasonLabel { reason })
                .inc_by(0);
        }
        Self {
            registry,
            connections,
            active_tunnels,
            bytes,
            dns_queries,
            budget_remaining,
            budget_limit,
            connection_duration,
            decision_duration,
            policy_generation,
            policy_reloads,
            policy_reload_failed,
            cluster,
            kill_switch,
            kill_switch_auth_failures,
            log_dropped,
            log_dropped_by_agent,
            agents: RwLock::default(),
            durations: Default::default(),
        }
    }

    /// The cached handles of `agent`; created on first use. The number of agents is bounded
    /// by the rules (plus `unknown`).
    pub fn agent(&self, agent: &str) -> Arc<AgentMetrics> {
        if let Some(m) = self.agents.read().ok().and_then(|a| a.get(agent).cloned()) {
            return m;
        }
        // `get_or_create` returns a read guard on the family: clone each handle in its own
        // statement so no guard is alive when the next call may need the write lock.
        let label = AgentLabel {
            agent: agent.to_owned(),
        };
        let bytes = |direction| {
            self.bytes
                .get_or_create(&BytesLabels {
                    agent: agent.to_owned(),
                    direction,
                })
                .clone()
        };
        let dns = |verdict| {
            self.dns_queries
                .get_or_create(&DnsLabels {
                    agent: agent.to_owned(),
                    verdict,
                })
                .clone()
        };
        let bytes_from_agent = bytes("from_agent");
        let bytes_to_agent = bytes("to_agent");
        let dns_allowed = dns("allow");
        let dns_refused = dns("deny");
        let active_tunnels = self.active_tunnels.get_or_create(&label).clone();
        let log_lines = |kind| {
            self.log_dropped_by_agent
                .get_or_create(&LogLabels {
                    agent: agent.to_owned(),
                    kind,
                })
                .clone()
        };
        let log_summarized = log_lines("summarized");
        let log_lost = log_lines("lost");
        let m = Arc::new(AgentMetrics {
            name: agent.to_owned(),
            connections: self.connections.clone(),
            conn_slots: std::array::from_fn(|_| OnceLock::new()),
            bytes_from_agent,
            bytes_to_agent,
            active_tunnels,
            dns_allowed,
            dns_refused,
            log_queued: std::sync::atomic::AtomicUsize::new(0),
            log_held: std::sync::Mutex::default(),
            log_summarized,
            log_lost,
        });
        if let Ok(mut agents) = self.agents.write() {
            return agents.entry(agent.to_owned()).or_insert(m).clone();
        }
        m
    }

    /// Every agent's handles created so far.
    pub(crate) fn agents(&self) -> Vec<Arc<AgentMetrics>> {
        self.agents
            .read()
            .map(|a| a.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Everything a finished connection changes, derived from its record.
    pub fn observe(&self, rec: &ConnectionRecord) {
        self.observe_for(&self.agent(&rec.agent), rec);
    }

    /// [`Metrics::observe`] with the agent's handles already at hand.
    pub fn observe_for(&self, a: &AgentMetrics, rec: &ConnectionRecord) {
        a.connection_counter(rec.mode, rec.reason).inc();
        a.bytes_from_agent.inc_by(rec.bytes_from_agent);
        a.bytes_to_agent.inc_by(rec.bytes_to_agent);
        let duration = self.durations.get(mode_slot(rec.mode)).map(|d| {
            d.get_or_init(|| {
                let label = ModeLabel {
                    mode: rec.mode.as_str(),
                };
                self.connection_duration.get_or_create(&label).clone()
            })
        });
        if let Some(d) = duration {
            d.observe(rec.duration.as_secs_f64());
        }
    }

    pub fn reload(&self, ok: bool) {
        self.policy_reloads
            .get_or_create(&ResultLabel {
                result: if ok { "success" } else { "failure" },
            })
            .inc();
        self.policy_reload_failed.set(i64::from(!ok));
    }

    pub fn set_cluster_synced(&self, synced: bool) {
        self.cluster.synced.set(i64::from(synced));
    }

    pub fn set_cluster_peer_up(&self, peer: &str, up: bool) {
        self.cluster
            .peer_up
            .get_or_create(&PeerLabel {
                peer: peer.to_owned(),
            })
            .set(i64::from(up));
    }

    pub fn set_cluster_pending(&self, peer: &str, pending: usize) {
        self.cluster
            .relay_pending
            .get_or_create(&PeerLabel {
                peer: peer.to_owned(),
            })
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
    }

    /// Daily budget and what is left of it, for an agent that has one.
    pub fn set_budget(&self, agent: &str, limit: u64, remaining: u64) {
        self.budget_limit
            .get_or_create(&AgentLabel {
                agent: agent.to_owned(),
            })
            .set(i64::try_from(limit).unwrap_or(i64::MAX));
        self.budget_remaining
            .get_or_create(&AgentLabel {
                agent: agent.to_owned(),
            })
            .set(i64::try_from(remaining).unwrap_or(i64::MAX));
    }

    pub fn set_kill_switch(&self, scope: &str, engaged: bool) {
        self.kill_switch
            .get_or_create(&ScopeLabel {
                scope: scope.to_owned(),
            })
            .set(i64::from(engaged));
    }

    /// One refused kill-switch or admin request; `reason` is one of
    /// [`KILL_SWITCH_AUTH_REASONS`].
    pub fn kill_switch_auth_failure(&self, reason: &'static str) {
        self.kill_switch_auth_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Keeps `portcullis_active_tunnels{agent}` raised while alive.
pub struct TunnelGauge(Arc<AgentMetrics>);

impl TunnelGauge {
    pub fn open(agent: Arc<AgentMetrics>) -> Self {
        agent.active_tunnels.inc();
        Self(agent)
    }
}

impl Drop for TunnelGauge {
    fn drop(&mut self) {
        self.0.active_tunnels.dec();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn record(mode: Mode, agent: &str) -> ConnectionRecord {
        let mut r = ConnectionRecord::begin(mode, "10.0.0.1:1".parse().unwrap(), agent.into(), 1);
        r.bytes_from_agent = 10;
        r
    }

    /// Each mode's duration goes to its own series, through the cached handles, and each
    /// agent's bytes to its own counters, through the cheap-hashed map.
    #[test]
    fn records_land_in_their_mode_and_agent_series() {
        let m = Metrics::new();
        for (mode, agent) in [
            (Mode::Transparent, "a"),
            (Mode::Transparent, "b"),
            (Mode::Explicit, "a"),
            (Mode::Transparent, "a"),
        ] {
            m.observe(&record(mode, agent));
        }
        let text = m.encode();
        for line in [
            "portcullis_connection_duration_seconds_count{mode=\"transparent\"} 3",
            "portcullis_connection_duration_seconds_count{mode=\"explicit\"} 1",
            "portcullis_bytes_total{agent=\"a\",direction=\"from_agent\"} 30",
            "portcullis_bytes_total{agent=\"b\",direction=\"from_agent\"} 10",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(!text.contains("mode=\"dns\""), "{text}");
        assert!(Arc::ptr_eq(&m.agent("a"), &m.agent("a")));
    }
}
