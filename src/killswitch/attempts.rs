//! Revive attempts are scarce: failed TOTP checks are counted per sender (the webhook key
//! that signed the request, or the local control socket) and for the whole gateway, and a few
//! failures lock revive for a back-off that grows from minutes to a day. While locked, revive
//! is refused even with the right code, and nothing is counted: a locked gateway tells an
//! attacker nothing about its guesses. A successful revive clears its sender's count and the
//! global one; an operator on the gateway clears everything.
//!
//! Failures are never forgotten by waiting: only a success or an operator's clear resets a
//! count. Waiting out a lock buys exactly one more guess and a longer lock.
//!
//! Must not: read the clock (callers inject `now`, unix seconds), do I/O, or panic on any
//! input. The kill switch persists [`Attempts`] with the kill state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Failures one sender may make before its first lock.
pub const SENDER_ALLOWANCE: u32 = 5;
/// Failures all senders together may make before revive is locked for everyone.
pub const GLOBAL_ALLOWANCE: u32 = 10;
/// The lock earned by the allowance's last failure, then by each failure after it (seconds):
/// 5 minutes, 15 minutes, an hour, 4 hours, then a day each time.
pub const LOCKS: [i64; 5] = [300, 900, 3_600, 14_400, 86_400];
/// Senders remembered at most (keys are configured, so a handful; this only bounds a file
/// someone edited by hand).
const MAX_SENDERS: usize = 256;

/// One counter: failures since the last success or clear, and the lock they earned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Counter {
    pub failures: u32,
    pub locked_until: Option<i64>,
}

impl Counter {
    fn locked(&self, now: i64) -> Option<i64> {
        self.locked_until.filter(|until| *until > now)
    }

    fn fail(&mut self, allowance: u32, now: i64) {
        self.failures = self.failures.saturating_add(1);
        if let Some(beyond) = self.failures.checked_sub(allowance) {
            let i = usize::try_from(beyond).map_or(LOCKS.len() - 1, |b| b.min(LOCKS.len() - 1));
            let lock = LOCKS.get(i).copied().unwrap_or(86_400);
            self.locked_until = Some(now.saturating_add(lock));
        }
    }
}

/// Every sender's counter and the global one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attempts {
    pub global: Counter,
    pub senders: BTreeMap<String, Counter>,
}

impl Attempts {
    /// When revive opens again for `sender`, if it is locked at `now`.
    pub fn locked_until(&self, sender: &str, now: i64) -> Option<i64> {
        let own = self.senders.get(sender).and_then(|c| c.locked(now));
        match (own, self.global.locked(now)) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Count a failed TOTP check by `sender`; returns the lock it is now under, if any.
    pub fn failed(&mut self, sender: &str, now: i64) -> Option<i64> {
        if !self.senders.contains_key(sender) && self.senders.len() >= MAX_SENDERS {
            // Unreachable with configured keys; the global counter still counts.
            self.global.fail(GLOBAL_ALLOWANCE, now);
            return self.locked_until(sender, now);
        }
        self.senders
            .entry(sender.to_owned())
            .or_default()
            .fail(SENDER_ALLOWANCE, now);
        self.global.fail(GLOBAL_ALLOWANCE, now);
        self.locked_until(sender, now)
    }

    /// A revive by `sender` passed: its count and the global one start over. Other senders'
    /// counts and locks stay.
    pub fn succeeded(&mut self, sender: &str) {
        self.senders.remove(sender);
        self.global = Counter::default();
    }

    /// An operator on the gateway clears every count and lock.
    pub fn clear(&mut self) {
        *self = Attempts::default();
    }

    /// Locks in force at `now`: the global one and each sender's.
    pub fn locks(&self, now: i64) -> (Option<i64>, BTreeMap<&str, i64>) {
        let senders = self
            .senders
            .iter()
            .filter_map(|(s, c)| c.locked(now).map(|u| (s.as_str(), u)))
            .collect();
        (self.global.locked(now), senders)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T: i64 = 1_800_000_000;

    #[test]
    fn five_failures_lock_the_sender_for_five_minutes() {
        let mut a = Attempts::default();
        for i in 0..4 {
            assert_eq!(a.failed("key:a", T + i), None, "failure {i}");
            assert_eq!(a.locked_until("key:a", T + i), None);
        }
        assert_eq!(a.failed("key:a", T + 4), Some(T + 4 + 300));
        assert_eq!(a.locked_until("key:a", T + 5), Some(T + 304));
        assert_eq!(a.locked_until("key:a", T + 303), Some(T + 304));
        assert_eq!(a.locked_until("key:a", T + 304), None);
        // Another sender is not locked by a's failures.
        assert_eq!(a.locked_until("key:b", T + 5), None);
    }

    #[test]
    fn each_failure_after_a_lock_earns_a_longer_one_up_to_a_day() {
        let mut a = Attempts::default();
        let mut now = T;
        for _ in 0..SENDER_ALLOWANCE {
            a.failed("key:a", now);
        }
        let mut locks = vec![a.locked_until("key:a", now).unwrap() - now];
        for _ in 0..6 {
            now = a.locked_until("key:a", now).unwrap();
            assert_eq!(a.locked_until("key:a", now), None, "the lock ran out");
            let until = a.failed("key:a", now).unwrap();
            locks.push(until - now);
        }
        assert_eq!(locks, [300, 900, 3_600, 14_400, 86_400, 86_400, 86_400]);
    }

    #[test]
    fn waiting_forgets_nothing() {
        let mut a = Attempts::default();
        for i in 0..4 {
            a.failed("key:a", T + i);
        }
        // A year later, the fifth failure still locks.
        assert!(a.failed("key:a", T + 365 * 86_400).is_some());
    }

    #[test]
    fn the_global_count_locks_every_sender() {
        let mut a = Attempts::default();
        // Ten senders, one failure each: none is locked on its own, all are together.
        for i in 0..GLOBAL_ALLOWANCE {
            let locked = a.failed(&format!("key:{i}"), T);
            if i + 1 < GLOBAL_ALLOWANCE {
                assert_eq!(locked, None);
            } else {
                assert_eq!(locked, Some(T + 300));
            }
        }
        assert_eq!(a.locked_until("local", T + 1), Some(T + 300));
        let (global, senders) = a.locks(T + 1);
        assert_eq!(global, Some(T + 300));
        assert!(senders.is_empty());
    }

    #[test]
    fn success_resets_its_sender_and_the_global_count_only() {
        let mut a = Attempts::default();
        for _ in 0..SENDER_ALLOWANCE {
            a.failed("key:attacker", T);
        }
        a.failed("key:person", T);
        a.succeeded("key:person");
        assert_eq!(a.global, Counter::default());
        assert!(!a.senders.contains_key("key:person"));
        assert_eq!(a.locked_until("key:attacker", T + 1), Some(T + 300));
        a.clear();
        assert_eq!(a.locked_until("key:attacker", T + 1), None);
        assert_eq!(a, Attempts::default());
    }

    /// The arithmetic the threat model quotes: how many guesses one sender gets in a span.
    #[test]
    fn guesses_a_single_sender_gets_over_ten_minutes_and_a_year() {
        fn guesses_within(span: i64) -> u32 {
            let mut a = Attempts::default();
            let mut now = T;
            let mut n = 0;
            while now < T + span {
                match a.locked_until("key:a", now) {
                    Some(until) => now = until,
                    None => {
                        a.failed("key:a", now);
                        n += 1;
                    }
                }
            }
            n
        }
        assert_eq!(guesses_within(600), 6);
        let year = guesses_within(365 * 86_400);
        assert!((370..=375).contains(&year), "{year}");
    }

    proptest! {
        /// Whatever the order and timing of failures, a sender never gets more than its
        /// allowance of failures before it is locked, and a lock never shortens.
        #[test]
        fn never_more_than_the_allowance_unlocked(
            steps in proptest::collection::vec((0u8..3, 0i64..100_000), 1..200),
        ) {
            let mut a = Attempts::default();
            let mut now = T;
            let mut unlocked_failures = 0u32;
            for (sender, dt) in steps {
                now += dt;
                let s = format!("key:{sender}");
                let before = a.locked_until(&s, now);
                if before.is_none() {
                    let after = a.failed(&s, now);
                    if after.is_none() {
                        unlocked_failures += 1;
                    }
                }
                prop_assert!(unlocked_failures < GLOBAL_ALLOWANCE);
            }
        }
    }
}
