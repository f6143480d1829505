//! Per-agent bookkeeping of the DNS forwarder: token buckets per agent name (the cost limit,
//! `dns.queries_per_second` with a burst of twice that, spent by upstream lookups and
//! refusals; and the flood guard, ten times that, spent by every query) and the sampling of
//! allowed-query log lines (the first query for a name per agent per minute).
//!
//! Pure arithmetic on an injected `now`; must not do I/O. State is keyed by agent name,
//! which the rules bound, so it cannot grow with what the agents send (the per-name
//! sampling table is capped separately).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One agent's bucket: `tokens` refill at `rate` per second up to `burst`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Self {
        Self {
            tokens: burst,
            last: now,
        }
    }

    fn take(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A token bucket per agent.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<Arc<str>, Bucket>>,
}

impl RateLimiter {
    /// `per_second`, with a burst of twice that.
    pub fn new(per_second: u32) -> Self {
        Self::with_burst(per_second, 2)
    }

    /// `per_second`, with a burst of `burst_seconds` seconds' worth.
    pub fn with_burst(per_second: u32, burst_seconds: u32) -> Self {
        let rate = f64::from(per_second.max(1));
        Self {
            rate,
            burst: f64::from(burst_seconds.max(1)) * rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// May `agent` ask one more question now?
    pub fn admit(&self, agent: &Arc<str>, now: Instant) -> bool {
        // A poisoned lock means a panic elsewhere (contained to its query). The buckets are
        // plain numbers, each updated whole: keep using them, neither lifting the limit
        // nor refusing all DNS from then on.
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(b) = buckets.get_mut(&**agent) {
            return b.take(self.rate, self.burst, now);
        }
        let mut b = Bucket::full(self.burst, now);
        let admitted = b.take(self.rate, self.burst, now);
        buckets.insert(agent.clone(), b);
        admitted
    }
}

/// How often an allowed name is logged per agent.
pub const SAMPLE_PERIOD: Duration = Duration::from_secs(60);
/// Names remembered per agent; beyond it the table is pruned (then cleared), which at worst
/// logs a name twice within a period.
const SAMPLE_NAMES_PER_AGENT: usize = 50_000;

/// Decides which allowed queries get a log line: the first per (agent, name) per minute.
/// Per agent: when each name was last logged.
type LastLogged = HashMap<Arc<str>, HashMap<Box<str>, Instant>>;

#[derive(Default)]
pub struct Sampler {
    seen: Mutex<LastLogged>,
}

impl Sampler {
    /// True when this allowed query should be logged.
    pub fn should_log(&self, agent: &Arc<str>, name: &str, now: Instant) -> bool {
        let Ok(mut seen) = self.seen.lock() else {
            return true;
        };
        let names = match seen.get_mut(&**agent) {
            Some(n) => n,
            None => seen.entry(agent.clone()).or_default(),
        };
        if let Some(last) = names.get_mut(name) {
            if now.saturating_duration_since(*last) < SAMPLE_PERIOD {
                return false;
            }
            *last = now;
            return true;
        }
        if names.len() >= SAMPLE_NAMES_PER_AGENT {
            names.retain(|_, t| now.saturating_duration_since(*t) < SAMPLE_PERIOD);
            if names.len() >= SAMPLE_NAMES_PER_AGENT {
                names.clear();
            }
        }
        names.insert(name.into(), now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let limiter = RateLimiter::new(10);
        let agent: Arc<str> = Arc::from("coder-1");
        let t0 = Instant::now();
        let admitted = (0..100).filter(|_| limiter.admit(&agent, t0)).count();
        assert_eq!(admitted, 20, "burst is twice the rate");
        assert!(!limiter.admit(&agent, t0 + Duration::from_millis(50)));
        assert!(limiter.admit(&agent, t0 + Duration::from_millis(110)));
        let other: Arc<str> = Arc::from("coder-2");
        assert!(limiter.admit(&other, t0), "buckets are per agent");
    }

    #[test]
    fn sampler_logs_first_query_per_name_per_minute() {
        let s = Sampler::default();
        let a: Arc<str> = Arc::from("coder-1");
        let t0 = Instant::now();
        assert!(s.should_log(&a, "pypi.org", t0));
        assert!(!s.should_log(&a, "pypi.org", t0 + Duration::from_secs(59)));
        assert!(s.should_log(&a, "files.pythonhosted.org", t0));
        assert!(s.should_log(&a, "pypi.org", t0 + Duration::from_secs(61)));
    }
}
