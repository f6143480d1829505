//! What happened, told once: every connection ends in one [`ConnectionRecord`], and the log
//! line (and, later, the metrics) are derived from it here, in one place.
//!
//! Must never block the data path: [`Telemetry::record`] hands the record to a bounded queue
//! and counts what does not fit.

mod json;
mod log;
pub mod metrics;
mod process;
mod record;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use log::LogItem;
pub use log::{LogWriter, LogWriterError};
pub use metrics::{Metrics, TunnelGauge};
pub use record::{ConnectionRecord, Mode};

/// A log line of its own (not a connection record): `@timestamp` now, then `fields`, null
/// ones left out, as one JSON object (keys in sorted order).
fn stamped_line<'a>(fields: impl IntoIterator<Item = (&'a str, serde_json::Value)>) -> String {
    let mut stamp = [0u8; 64];
    let mut object = serde_json::Map::new();
    object.insert(
        "@timestamp".into(),
        record::rfc3339(std::time::SystemTime::now(), &mut stamp).into(),
    );
    for (k, v) in fields {
        if !v.is_null() {
            object.insert(k.to_owned(), v);
        }
    }
    serde_json::Value::Object(object).to_string()
}

/// One agent's share of the log queue is its size divided by this.
const LOG_SHARE_DIVISOR: usize = 8;
/// The smallest share, for tiny queues.
const MIN_LOG_SHARE: usize = 16;

/// The shared handle the data path records through.
#[derive(Clone)]
pub struct Telemetry {
    log: Option<std::sync::mpsc::SyncSender<LogItem>>,
    /// Lines one agent may have in the log queue at once while the queue is over half full
    /// (its fair share); beyond it its lines are summarised, so one agent's flood cannot
    /// crowd out another's denials.
    share: usize,
    /// Half the queue: below it every agent's lines are queued whatever its share.
    half: usize,
    /// Lines in the queue now (the writer lowers it).
    queued: Arc<std::sync::atomic::AtomicUsize>,
    counters: Arc<Counters>,
    pub metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Counters {
    log_dropped: AtomicU64,
    records: AtomicU64,
    /// Refusal lines of the control plane (one per refused admin request) and what was
    /// held back of them: a flood of the management port gets its own share of the log,
    /// summarised beyond it, and cannot crowd out the agents' lines.
    refusals: std::sync::Mutex<RefusalShare>,
}

/// The control plane's share of the log: [`REFUSALS_PER_SECOND`] lines a second, a burst of
/// [`REFUSAL_BURST`]; beyond it, counts by reason for the next summary.
#[derive(Default)]
struct RefusalShare {
    tokens: f64,
    last: Option<std::time::Instant>,
    held: std::collections::BTreeMap<&'static str, u64>,
}

const REFUSALS_PER_SECOND: f64 = 50.0;
const REFUSAL_BURST: f64 = 200.0;

impl Telemetry {
    /// Telemetry that writes log lines through `writer`'s queue.
    pub fn new(writer: &LogWriter) -> Self {
        Self {
            log: Some(writer.sender()),
            share: (writer.capacity() / LOG_SHARE_DIVISOR).max(MIN_LOG_SHARE),
            half: writer.capacity() / 2,
            queued: writer.queued(),
            counters: Arc::default(),
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// Telemetry with no log sink (tools such as `explain`).
    pub fn disabled() -> Self {
        Self {
            log: None,
            share: usize::MAX,
            half: usize::MAX,
            queued: Arc::default(),
            counters: Arc::default(),
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// Record one finished connection: metrics and the log line both come from `record`,
    /// here and nowhere else. Never blocks.
    pub fn record(&self, record: ConnectionRecord) {
        self.counters.records.fetch_add(1, Ordering::Relaxed);
        let agent = self.metrics.agent(&record.agent);
        self.metrics.observe_for(&agent, &record);
        let Some(tx) = &self.log else { return };
        if agent.log_queued.load(Ordering::Relaxed) >= self.share
            && self.queued.load(Ordering::Relaxed) >= self.half
        {
            agent.hold(record.mode, record.reason);
            return;
        }
        agent.log_queued.fetch_add(1, Ordering::Relaxed);
        self.queued.fetch_add(1, Ordering::Relaxed);
        if tx.try_send(LogItem::Record(record, agent.clone())).is_err() {
            agent.log_queued.fetch_sub(1, Ordering::Relaxed);
            self.queued.fetch_sub(1, Ordering::Relaxed);
            agent.lost();
            self.counters.log_dropped.fetch_add(1, Ordering::Relaxed);
            self.metrics.log_dropped.inc();
        }
    }

    /// Write one summary line per (agent, mode, reason) for the lines the agents' shares held
    /// back since the last call: `portcullis.summarized` says how many. Called every second.
    pub fn flush_summaries(&self) {
        let Some(tx) = &self.log else { return };
        let held = std::mem::take(
            &mut self
                .counters
                .refusals
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .held,
        );
        for (reason, n) in held {
            let line = stamped_line([
                ("event.category", "kill_switch".into()),
                ("event.kind", "summary".into()),
                ("event.action", "deny".into()),
                ("event.reason", reason.into()),
                ("portcullis.summarized", n.into()),
            ]);
            self.send_line(tx, line);
        }
        for agent in self.metrics.agents() {
            for ((mode, reason), n) in agent.take_held() {
                let action = if reason.is_some() { "deny" } else { "allow" };
                let line = stamped_line([
                    ("event.kind", "summary".into()),
                    ("event.action", action.into()),
                    (
                        "event.reason",
                        reason.map(crate::policy::Reason::as_str).into(),
                    ),
                    ("agent.name", agent.name().into()),
                    ("portcullis.mode", mode.as_str().into()),
                    ("portcullis.summarized", n.into()),
                ]);
                self.send_line(tx, line);
            }
        }
    }

    /// Log one control-plane event (kill switch, admin) as a JSON line beside the connection
    /// records: `@timestamp`, `event.category` and `fields` (null fields left out), keys in
    /// sorted order. Never blocks; a full queue drops and counts it like a record.
    pub fn event(&self, category: &str, fields: &[(&str, serde_json::Value)]) {
        let Some(tx) = &self.log else { return };
        let line = stamped_line(
            std::iter::once(("event.category", category.into()))
                .chain(fields.iter().map(|(k, v)| (*k, v.clone()))),
        );
        self.send_line(tx, line);
    }

    /// [`Telemetry::event`] for one refused control-plane request with `reason`, within the
    /// control plane's share of the log; beyond it the refusal is counted for the next
    /// summary line (every refusal is counted in the metrics regardless).
    pub fn refusal_event(&self, reason: &'static str, fields: &[(&str, serde_json::Value)]) {
        let now = std::time::Instant::now();
        {
            let mut share = self
                .counters
                .refusals
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let elapsed = share.last.map_or(REFUSAL_BURST / REFUSALS_PER_SECOND, |l| {
                now.saturating_duration_since(l).as_secs_f64()
            });
            share.tokens = (share.tokens + elapsed * REFUSALS_PER_SECOND).min(REFUSAL_BURST);
            share.last = Some(now);
            if share.tokens < 1.0 {
                *share.held.entry(reason).or_insert(0) += 1;
                return;
            }
            share.tokens -= 1.0;
        }
        self.event("kill_switch", fields);
    }

    fn send_line(&self, tx: &std::sync::mpsc::SyncSender<LogItem>, line: String) {
        self.queued.fetch_add(1, Ordering::Relaxed);
        if tx.try_send(LogItem::Line(line)).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.counters.log_dropped.fetch_add(1, Ordering::Relaxed);
            self.metrics.log_dropped.inc();
        }
    }

    /// Log lines dropped because the queue was full.
    pub fn log_dropped(&self) -> u64 {
        self.counters.log_dropped.load(Ordering::Relaxed)
    }

    /// Connections recorded since start.
    pub fn records(&self) -> u64 {
        self.counters.records.load(Ordering::Relaxed)
    }
}
