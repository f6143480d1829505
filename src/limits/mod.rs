//! Per-agent limits (the `[limits]` table of an agent file): new connections per second
//! (token bucket with burst), concurrent tunnels, bandwidth shared by all of an agent's
//! tunnels (both directions, fair between tunnels), and a daily byte budget that survives
//! restarts. Keyed by agent *name*, so the state outlives policy reloads.
//!
//! The pieces are pure and take the clock as an argument (`bucket`, `bandwidth`, `budget`,
//! `concurrency`); this module holds their shared state and answers the data path's two
//! questions: may this connection start ([`Limiter::admit`]), and how must it be shaped
//! ([`Shaping`], applied by the relay).

pub mod bandwidth;
pub mod bucket;
pub mod budget;
pub mod concurrency;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bandwidth::Bandwidth;
use bucket::TokenBucket;
use budget::{Budgets, Snapshot};
use concurrency::{ConcurrencyCaps, Permit};

use crate::policy::{Limits, Policy, Reason};
use crate::telemetry::Metrics;

/// File name of the budget state inside `state_dir`.
pub const BUDGET_FILE: &str = "budgets.json";

/// Why a connection may not start, and when trying again makes sense (`Retry-After`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    pub retry_after: Option<Duration>,
}

/// A connection that may start: it holds its concurrency slot until dropped.
#[derive(Debug, Default)]
pub struct Admission {
    _permit: Option<Permit>,
    pub shaping: Shaping,
}

/// How the relay must shape one tunnel.
#[derive(Debug, Clone, Default)]
pub struct Shaping {
    pub bandwidth: Option<Arc<Bandwidth>>,
    pub budget: Option<BudgetMeter>,
}

/// Largest piece of an agent's bytes moved at once under a limit, by every relay (the
/// splice relay, the copy relay, plain-HTTP bodies both ways): a spent budget is overshot
/// by at most one piece.
pub const PIECE: usize = 64 * 1024;

impl Shaping {
    /// Is any limit on the bytes (bandwidth or budget)?
    pub fn is_limited(&self) -> bool {
        self.bandwidth.is_some() || self.budget.is_some()
    }

    /// How much of `want` bytes one piece may hold: all of it without a limit, at most
    /// [`PIECE`] under one.
    pub fn piece(&self, want: usize) -> usize {
        if self.is_limited() {
            want.min(PIECE)
        } else {
            want
        }
    }

    /// Charge `n` delivered bytes to the daily budget: false once it is spent (the relay
    /// must end).
    pub fn charge(&self, n: usize) -> bool {
        self.budget.as_ref().is_none_or(|b| b.charge(n as u64))
    }

    /// Has the budget run out under this connection?
    pub fn spent(&self) -> bool {
        self.budget.as_ref().is_some_and(BudgetMeter::tripped)
    }
}

/// Charges an agent's daily budget as bytes move; trips once the budget is spent.
#[derive(Debug, Clone)]
pub struct BudgetMeter {
    limiter: Arc<Limiter>,
    agent: Arc<str>,
    limit: u64,
    tripped: Arc<AtomicBool>,
}

impl BudgetMeter {
    /// Charge `bytes`; false once the budget is exceeded (the tunnel must end).
    pub fn charge(&self, bytes: u64) -> bool {
        let now = unix_now();
        let mut b = self
            .limiter
            .budgets
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        b.charge(&self.agent, bytes, now);
        if b.exceeded(&self.agent, self.limit, now) {
            self.tripped.store(true, Ordering::Release);
            return false;
        }
        true
    }

    pub fn tripped(&self) -> bool {
        self.tripped.load(Ordering::Acquire)
    }
}

#[derive(Debug)]
pub struct Limiter {
    rates: Mutex<HashMap<Arc<str>, TokenBucket>>,
    concurrency: ConcurrencyCaps,
    bandwidth: Mutex<HashMap<Arc<str>, Arc<Bandwidth>>>,
    /// Taken by the data path (admission, and every chunk a budgeted tunnel moves): held
    /// only for counting, never across disk I/O.
    budgets: Mutex<Budgets>,
    /// What the file last received: an unchanged snapshot is not written again. Held for a
    /// whole save, so two saves (the periodic one, shutdown's) write in order.
    saved: Mutex<Option<Snapshot>>,
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Limiter {
    /// Load the budget state from `state_dir`. A corrupt or unreadable file must not hand
    /// out a fresh budget: every budgeted agent is exhausted until the next reset.
    pub fn load(state_dir: &Path, reset_hour_utc: u8) -> Result<Arc<Self>, budget::BudgetError> {
        let path = state_dir.join(BUDGET_FILE);
        let budgets = match Budgets::load(&path, reset_hour_utc) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "budget state unreadable: budgets exhausted until the next reset");
                Budgets::exhausted_until_next_period(&path, reset_hour_utc, unix_now())?
            }
        };
        Ok(Arc::new(Self {
            rates: Mutex::default(),
            concurrency: ConcurrencyCaps::new(),
            bandwidth: Mutex::default(),
            budgets: Mutex::new(budgets),
            saved: Mutex::new(None),
        }))
    }

    /// May a new connection of `agent` start under `limits`? Checks, in order: the budget
    /// (a spent budget is not a rate problem), the connection rate, concurrency.
    pub fn admit(
        self: &Arc<Self>,
        agent: &Arc<str>,
        limits: &Limits,
        now: Instant,
    ) -> Result<Admission, Refusal> {
        let now_unix = unix_now();
        let budget = match limits.daily_bytes {
            Some(limit) => {
                let b = self.budgets.lock().unwrap_or_else(PoisonError::into_inner);
                if b.exceeded(agent, limit, now_unix) {
                    let wait = u64::try_from(b.next_reset(now_unix) - now_unix).unwrap_or(0);
                    return Err(Refusal {
                        reason: Reason::BudgetExceeded,
                        retry_after: Some(Duration::from_secs(wait)),
                    });
                }
                Some(BudgetMeter {
                    limiter: self.clone(),
                    agent: agent.clone(),
                    limit,
                    tripped: Arc::default(),
                })
            }
            None => None,
        };
        if let Some(rate) = limits.new_connections_per_second {
            let rate = f64::from(rate.max(1));
            let burst = f64::from(limits.burst.unwrap_or(rate as u32).max(1));
            let mut rates = self.rates.lock().unwrap_or_else(PoisonError::into_inner);
            let bucket = rates
                .entry(agent.clone())
                .or_insert_with(|| TokenBucket::new(rate, burst, now));
            if bucket.rate_per_sec() != rate || bucket.burst() != burst {
                // The rule changed on reload: start a bucket with the new numbers.
                *bucket = TokenBucket::new(rate, burst, now);
            }
            if !bucket.try_take(1.0, now) {
                return Err(Refusal {
                    reason: Reason::RateLimited,
                    retry_after: Some(bucket.wait_time(1.0, now).max(Duration::from_secs(1))),
                });
            }
        }
        let permit = match limits.max_concurrent {
            Some(max) => Some(self.concurrency.try_acquire(agent, max).ok_or(Refusal {
                reason: Reason::RateLimited,
                retry_after: Some(Duration::from_secs(1)),
            })?),
            None => None,
        };
        let bandwidth = limits.bandwidth_bytes_per_second.map(|bps| {
            let mut all = self
                .bandwidth
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let entry = all
                .entry(agent.clone())
                .or_insert_with(|| Arc::new(Bandwidth::new(bps)));
            if entry.bytes_per_sec() != Some(bps) {
                *entry = Arc::new(Bandwidth::new(bps));
            }
            entry.clone()
        });
        Ok(Admission {
            _permit: permit,
            shaping: Shaping { bandwidth, budget },
        })
    }

    /// Persist the budgets (periodically and at shutdown) if they changed since the last
    /// save. The counters are copied under their lock and written without it: a slow disk
    /// (an fsync can take seconds) must not stall the tunnels that charge them, nor, on a
    /// one-thread runtime, the whole data path.
    pub fn save(&self) {
        let mut saved = self.saved.lock().unwrap_or_else(PoisonError::into_inner);
        let snapshot = self
            .budgets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .snapshot();
        if saved.as_ref() == Some(&snapshot) {
            return;
        }
        if let Some(dir) = snapshot.path().parent()
            && let Err(e) = std::fs::create_dir_all(dir)
        {
            tracing::error!(error = %e, "budget state directory not created");
        }
        match snapshot.write() {
            Ok(()) => *saved = Some(snapshot),
            Err(e) => tracing::error!(error = %e, "budget state not saved"),
        }
    }

    /// Refresh the budget gauges for every agent with a budget.
    pub fn publish(&self, policy: &Policy, metrics: &Metrics) {
        let now = unix_now();
        let b = self.budgets.lock().unwrap_or_else(PoisonError::into_inner);
        for (_, a) in policy.agents() {
            if let Some(limit) = a.limits.daily_bytes {
                metrics.set_budget(&a.name, limit, b.remaining(&a.name, limit, now));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_spent_budget_refuses_the_next_connection() {
        let dir = tempfile::tempdir().unwrap();
        // A state directory that does not exist yet, as on a fresh install.
        let dir = dir.path().join("state");
        let limiter = Limiter::load(&dir, 0).unwrap();
        let agent: Arc<str> = Arc::from("coder-1");
        let limits = Limits {
            daily_bytes: Some(1000),
            ..Limits::default()
        };
        let admitted = limiter.admit(&agent, &limits, Instant::now()).unwrap();
        let meter = admitted.shaping.budget.clone().unwrap();
        assert!(meter.charge(600));
        assert!(!meter.charge(600), "the budget did not trip");
        let refused = limiter.admit(&agent, &limits, Instant::now()).unwrap_err();
        assert_eq!(refused.reason, Reason::BudgetExceeded);
        limiter.save();
        let reloaded = Limiter::load(&dir, 0).unwrap();
        assert_eq!(
            reloaded
                .admit(&agent, &limits, Instant::now())
                .unwrap_err()
                .reason,
            Reason::BudgetExceeded
        );
    }

    /// Budgets that did not change are not written again: the file stays the one the
    /// last save renamed into place (same inode) until a tunnel charges something.
    #[test]
    fn unchanged_budgets_are_not_rewritten() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let limiter = Limiter::load(dir.path(), 0).unwrap();
        let file = dir.path().join(BUDGET_FILE);
        let inode = || std::fs::metadata(&file).unwrap().ino();
        limiter.save();
        let first = inode();
        // Checked after each save: a third write could reuse the first file's inode.
        for _ in 0..2 {
            limiter.save();
            assert_eq!(inode(), first, "unchanged budgets were written again");
        }
        let agent: Arc<str> = Arc::from("coder-1");
        let limits = Limits {
            daily_bytes: Some(1000),
            ..Limits::default()
        };
        let admitted = limiter.admit(&agent, &limits, Instant::now()).unwrap();
        assert!(admitted.shaping.budget.unwrap().charge(10));
        limiter.save();
        assert_ne!(inode(), first, "a charge was not saved");
        assert!(
            std::fs::read_to_string(&file)
                .unwrap()
                .contains("\"coder-1\": 10")
        );
    }

    /// A save that waits on the disk does not hold the counters: the data path charges
    /// and admits meanwhile. The temp file is a FIFO, so the save blocks in `open` until
    /// the test reads it; the test looks at the lock only once the saving thread sleeps
    /// there.
    #[test]
    fn a_slow_save_never_holds_the_counters() {
        let dir = tempfile::tempdir().unwrap();
        let limiter = Limiter::load(dir.path(), 0).unwrap();
        let agent: Arc<str> = Arc::from("coder-1");
        let limits = Limits {
            daily_bytes: Some(1_000_000),
            ..Limits::default()
        };
        let meter = limiter
            .admit(&agent, &limits, Instant::now())
            .unwrap()
            .shaping
            .budget
            .unwrap();
        assert!(meter.charge(1234));
        let fifo = dir.path().join(format!(".{BUDGET_FILE}.tmp"));
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());

        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let saver = std::thread::spawn({
            let limiter = limiter.clone();
            move || {
                tid_tx
                    .send(rustix::thread::gettid().as_raw_nonzero().get())
                    .unwrap();
                limiter.save();
            }
        });
        let tid = tid_rx.recv().unwrap();
        let sleeping = || {
            std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('S')))
                .unwrap_or(false)
        };
        let mut waited = 0;
        while !sleeping() && waited < 1000 {
            std::thread::sleep(Duration::from_millis(10));
            waited += 1;
        }
        assert!(sleeping(), "the save never reached the FIFO");
        // The saver is inside the write: the counters must be free.
        let free = limiter.budgets.try_lock().is_ok();
        let charged = free && meter.charge(1);
        // Let the save go on: it reads what it snapshotted (the FIFO cannot be synced, so
        // this save then fails and logs; the next one writes the file).
        let mut written = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::open(&fifo).unwrap(), &mut written)
            .unwrap();
        saver.join().unwrap();
        assert!(free, "the save held the budget counters while writing");
        assert!(charged);
        assert!(written.contains("\"coder-1\": 1234"), "{written}");
    }
}
