//! Process metrics read from `/proc/self` at scrape time (Linux): CPU seconds, resident
//! memory, open and maximum file descriptors, start time. Names follow the Prometheus
//! client conventions (`process_*`, unprefixed) so standard dashboards work.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

/// Linux reports CPU times in USER_HZ ticks, 100 per second on every mainstream arch.
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug)]
pub struct ProcessCollector;

struct Sample {
    cpu_seconds: f64,
    rss_bytes: i64,
    open_fds: i64,
    max_fds: i64,
}

fn sample() -> Option<Sample> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the `(comm)`, which may itself contain spaces.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let rss_kb: i64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as i64;
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(-1);
    Some(Sample {
        cpu_seconds: (utime + stime) / TICKS_PER_SECOND,
        rss_bytes: rss_kb * 1024,
        open_fds,
        max_fds,
    })
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = sample() else { return Ok(()) };
        // The registry prefixes its own metrics; these keep the conventional names.
        let cpu = ConstCounter::new(s.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu",
            "User and system CPU time",
            Some(&Unit::Seconds),
            cpu.metric_type(),
        )?)?;
        let rss = ConstGauge::new(s.rss_bytes);
        rss.encode(encoder.encode_descriptor(
            "process_resident_memory",
            "Resident memory size",
            Some(&Unit::Bytes),
            rss.metric_type(),
        )?)?;
        let open = ConstGauge::new(s.open_fds);
        open.encode(encoder.encode_descriptor(
            "process_open_fds",
            "Open file descriptors",
            None,
            open.metric_type(),
        )?)?;
        let max = ConstGauge::new(s.max_fds);
        max.encode(encoder.encode_descriptor(
            "process_max_fds",
            "Maximum open file descriptors",
            None,
            max.metric_type(),
        )?)?;
        Ok(())
    }
}
