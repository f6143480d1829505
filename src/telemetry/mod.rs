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

/// The shared handle the data path records through.
#[derive(Clone)]
pub struct Telemetry {
    log: Option<std::sync::mpsc::SyncSender<LogItem>>,
    counters: Arc<Counters>,
    pub metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Counters {
    log_dropped: AtomicU64,
    records: AtomicU64,
}

impl Telemetry {
    /// Telemetry that writes log lines through `writer`'s queue.
    pub fn new(writer: &LogWriter) -> Self {
        Self {
            log: Some(writer.sender()),
            counters: Arc::default(),
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// Telemetry with no log sink (tools such as `explain`).
    pub fn disabled() -> Self {
        Self {
            log: None,
            counters: Arc::default(),
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// Record one finished connection: metrics and the log line both come from `record`,
    /// here and nowhere else. Never blocks.
    pub fn record(&self, record: ConnectionRecord) {
        self.counters.records.fetch_add(1, Ordering::Relaxed);
        self.metrics.observe(&record);
        if let Some(tx) = &self.log
            && tx.try_send(LogItem::Record(record)).is_err()
        {
            self.counters.log_dropped.fetch_add(1, Ordering::Relaxed);
            self.metrics.log_dropped.inc();
        }
    }

    /// Log one control-plane event (kill switch, admin) as a JSON line beside the connection
    /// records: `@timestamp`, `event.category` and `fields` (null fields left out), keys in
    /// sorted order. Never blocks; a full queue drops and counts it like a record.
    pub fn event(&self, category: &str, fields: &[(&str, serde_json::Value)]) {
        let Some(tx) = &self.log else { return };
        let mut stamp = [0u8; 64];
        let mut object = serde_json::Map::new();
        object.insert(
            "@timestamp".into(),
            record::rfc3339(std::time::SystemTime::now(), &mut stamp).into(),
        );
        object.insert("event.category".into(), category.into());
        for (k, v) in fields {
            if !v.is_null() {
                object.insert((*k).to_owned(), v.clone());
            }
        }
        let line = serde_json::Value::Object(object).to_string();
        if tx.try_send(LogItem::Line(line)).is_err() {
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
