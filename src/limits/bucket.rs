//! A plain token bucket with an injected clock (used for new connections per
//! second and, inside `bandwidth`, for bytes). Owns only the arithmetic: it
//! must not read the clock, lock, sleep or know about agents.

use std::time::{Duration, Instant};

/// Classic token bucket: refills at `rate_per_sec` up to `burst`, starts full.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. A non-finite or negative rate is treated as 0 (never
    /// refills) and the burst is at least 1, so a single token can always be
    /// taken eventually when the rate is positive.
    pub fn new(rate_per_sec: f64, burst: f64, now: Instant) -> Self {
        let rate_per_sec = if rate_per_sec.is_finite() && rate_per_sec > 0.0 {
            rate_per_sec
        } else {
            0.0
        };
        let burst = if burst.is_finite() {
            burst.max(1.0)
        } else {
            1.0
        };
        Self {
            rate_per_sec,
            burst,
            tokens: burst,
            last: now,
        }
    }

    #[cfg(test)]
    /// Bucket whose burst equals the rate (min 1): the default for
    /// new-connections-per-second limits.
    pub fn per_second(rate_per_sec: f64, now: Instant) -> Self {
        Self::new(rate_per_sec, rate_per_sec, now)
    }

    pub fn rate_per_sec(&self) -> f64 {
        self.rate_per_sec
    }

    pub fn burst(&self) -> f64 {
        self.burst
    }

    /// Tokens that would be available at `now`, without changing state.
    fn projected(&self, now: Instant) -> f64 {
        // saturating: a `now` earlier than `last` (caller clock skew) adds nothing
        // rather than panicking or removing tokens.
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        (self.tokens + elapsed * self.rate_per_sec).min(self.burst)
    }

    fn refill(&mut self, now: Instant) {
        self.tokens = self.projected(now);
        if now > self.last {
            self.last = now;
        }
    }

    /// Refills to `now` and returns the tokens currently available.
    pub fn available(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }

    /// Takes `n` tokens if all of them are available; never takes a part.
    pub fn try_take(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        if n.is_nan() || n < 0.0 {
            return false;
        }
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens unconditionally, going into debt if needed, and
    /// returns how long until the debt is repaid (zero if there was none).
    /// Later callers queue behind the debt, which makes service FIFO.
    pub fn take_with_debt(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        if !n.is_finite() || n <= 0.0 {
            return Duration::ZERO;
        }
        self.tokens -= n;
        if self.tokens >= 0.0 {
            return Duration::ZERO;
        }
        if self.rate_per_sec <= 0.0 {
            return Duration::MAX;
        }
        Duration::try_from_secs_f64(-self.tokens / self.rate_per_sec).unwrap_or(Duration::MAX)
    }

    /// How long until `n` tokens are available (zero if they already are).
    /// Returns `Duration::MAX` when that can never happen (`n` above the burst,
    /// or a zero rate); callers turning this into Retry-After should clamp.
    pub fn wait_time(&self, n: f64, now: Instant) -> Duration {
        let have = self.projected(now);
        if have >= n {
            return Duration::ZERO;
        }
        if n.is_nan() || n > self.burst || self.rate_per_sec <= 0.0 {
            return Duration::MAX;
        }
        // try_from: from_secs_f64 panics on overflow, and no panics are allowed here.
        Duration::try_from_secs_f64((n - have) / self.rate_per_sec).unwrap_or(Duration::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn starts_full_and_drains() {
        let t0 = Instant::now();
        let mut b = TokenBucket::per_second(3.0, t0);
        assert!(b.try_take(1.0, t0));
        assert!(b.try_take(1.0, t0));
        assert!(b.try_take(1.0, t0));
        assert!(!b.try_take(1.0, t0));
    }

    #[test]
    fn refills_at_rate_and_caps_at_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 5.0, t0);
        assert!(b.try_take(5.0, t0));
        assert!(!b.try_take(1.0, t0 + ms(50)));
        assert!(b.try_take(1.0, t0 + ms(100)));
        // a long idle period only refills up to the burst
        assert!((b.available(t0 + Duration::from_secs(100)) - 5.0).abs() < 1e-9);
    }

    #[test]
    fn wait_time_matches_refill() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(4.0, 4.0, t0);
        assert!(b.try_take(4.0, t0));
        assert_eq!(b.wait_time(0.0, t0), Duration::ZERO);
        let w = b.wait_time(2.0, t0);
        assert!((w.as_secs_f64() - 0.5).abs() < 1e-9, "{w:?}");
        assert!(b.try_take(2.0, t0 + w));
    }

    #[test]
    fn impossible_waits_are_max() {
        let t0 = Instant::now();
        let b = TokenBucket::new(1.0, 2.0, t0);
        assert_eq!(b.wait_time(3.0, t0), Duration::MAX);
        let z = TokenBucket::new(0.0, 1.0, t0);
        assert_eq!(z.wait_time(2.0, t0), Duration::MAX);
        let nan = TokenBucket::new(f64::NAN, f64::NAN, t0);
        assert_eq!(nan.burst(), 1.0);
        assert_eq!(nan.rate_per_sec(), 0.0);
    }

    #[test]
    fn debt_queues_callers() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 10.0, t0);
        assert_eq!(b.take_with_debt(10.0, t0), Duration::ZERO);
        assert_eq!(b.take_with_debt(5.0, t0), ms(500));
        // The second debtor waits behind the first.
        assert_eq!(b.take_with_debt(5.0, t0), ms(1000));
        assert!(!b.try_take(1.0, t0 + ms(1000)));
        assert!(b.try_take(1.0, t0 + ms(1100)));
        assert_eq!(b.take_with_debt(0.0, t0), Duration::ZERO);
        let mut z = TokenBucket::new(0.0, 1.0, t0);
        assert_eq!(z.take_with_debt(2.0, t0), Duration::MAX);
    }

    #[test]
    fn min_burst_is_one() {
        let t0 = Instant::now();
        let mut b = TokenBucket::per_second(0.2, t0);
        assert!(b.try_take(1.0, t0));
        assert!(!b.try_take(1.0, t0 + Duration::from_secs(4)));
        assert!(b.try_take(1.0, t0 + Duration::from_secs(5)));
    }

    #[test]
    fn clock_going_backwards_adds_nothing() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::new(1.0, 1.0, t0);
        assert!(b.try_take(1.0, t0));
        assert!(!b.try_take(1.0, t0 - Duration::from_secs(5)));
        assert!(b.try_take(1.0, t0 + Duration::from_secs(1)));
    }

    proptest! {
        #[test]
        fn never_exceeds_burst_plus_rate(
            rate in 0.1f64..1000.0,
            burst in 1.0f64..500.0,
            steps in proptest::collection::vec((0u64..200, 0.0f64..50.0), 1..200),
        ) {
            let t0 = Instant::now();
            let mut b = TokenBucket::new(rate, burst, t0);
            let mut t = t0;
            let mut taken = 0.0;
            for (dt, n) in steps {
                t += Duration::from_millis(dt);
                if b.try_take(n, t) {
                    taken += n;
                }
            }
            let allowed = burst + rate * (t - t0).as_secs_f64();
            prop_assert!(taken <= allowed + 1e-6, "taken {taken} > allowed {allowed}");
        }
    }
}
