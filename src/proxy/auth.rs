//! Proxy Basic auth for the explicit proxy: who a `Proxy-Authorization` header names, at
//! a bounded cost however many wrong passwords arrive (docs/proxy-auth.md).
//!
//! Order, for one request that carries credentials:
//! 1. the connection's own memo: the same credentials verified earlier on this connection
//!    under the same policy generation are not verified again;
//! 2. the cache of recent successes, keyed by a keyed hash of (username, password): a hit
//!    names the agent without verifying. Only successes are cached, an entry is only good
//!    for the policy generation that verified it and for the agent the username still
//!    belongs to, and it expires;
//! 3. the source's back-off: a source past `free_failures` failed attempts is refused
//!    without verification until its back-off ends (doubling per failure, capped);
//! 4. one verification per (credentials, generation) at a time: requests presenting the
//!    same ones meanwhile wait for its outcome;
//! 5. verification: SHA-256 inline (cheap), argon2id on a blocking thread, at most
//!    `max_concurrent_verifications` at once; beyond that, refused at once.
//!
//! Memory is fixed: the failure table has `tracked_sources` slots (set-associative, keyed
//! hash; a flood of new sources evicts the least-penalised entries, never grows it), the
//! success cache `cache_entries`.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::{OnceCell, Semaphore};

use crate::config::AuthSettings;
use crate::limits::Refusal;
use crate::policy::{AgentId, Policy, Reason, address};

/// (username, password) under the process's random key: what the caches hold instead of
/// the password (a memory dump shows no crackable hash of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CredentialKey([u8; 32]);

/// Who a request's credentials identify, or why they were refused.
pub type AuthResult = Result<AgentId, Refusal>;

/// A verification under way: its outcome once known (`None`: wrong credentials).
type Flight = Arc<OnceCell<Option<AgentId>>>;

/// One connection's memo: the credentials last verified on it, under which generation,
/// and the agent they named.
#[derive(Debug, Default)]
pub struct Session(Mutex<Option<(CredentialKey, u64, AgentId)>>);

/// Shared by every connection of the explicit proxy.
pub struct Authenticator {
    settings: AuthSettings,
    /// HMAC-SHA-256 keyed with 32 random bytes, its key schedule done once: each key
    /// computation clones it.
    mac: Hmac<Sha256>,
    successes: Mutex<SuccessCache>,
    failures: Mutex<FailureTable>,
    verifications: Arc<Semaphore>,
    /// Verifications under way, by (credentials, generation): one entry per request still
    /// in `authenticate` at most, gone when they are answered.
    in_flight: Mutex<HashMap<(CredentialKey, u64), Flight>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    pub fn new(settings: AuthSettings) -> Self {
        Self {
            mac: keyed_mac(),
            successes: Mutex::new(SuccessCache::new(settings.cache_entries)),
            failures: Mutex::new(FailureTable::new(settings.tracked_sources)),
            verifications: Arc::new(Semaphore::new(settings.max_concurrent_verifications)),
            in_flight: Mutex::new(HashMap::new()),
            settings,
        }
    }

    /// The keyed hash of presented credentials (the length of the username first, so no
    /// two (username, password) pairs share an input).
    pub fn credential_key(&self, username: &str, password: &str) -> CredentialKey {
        let mut mac = self.mac.clone();
        mac.update(&(username.len() as u64).to_le_bytes());
        mac.update(username.as_bytes());
        mac.update(password.as_bytes());
        CredentialKey(mac.finalize().into_bytes().into())
    }

    /// The agent these credentials were verified for, if a recent success under this
    /// policy says so: no verification, no back-off consulted (a cached success proves the
    /// password is known already, so it teaches a guesser nothing).
    pub fn cached(
        &self,
        policy: &Policy,
        username: &str,
        key: &CredentialKey,
        now: Instant,
    ) -> Option<AgentId> {
        let agent = lock(&self.successes).get(key, policy.generation(), now)?;
        // The username still belongs to that agent (it does within one generation; checked
        // all the same, so a hit can never name another agent).
        policy
            .credentials_for(username)
            .filter(|(id, _)| *id == agent)
            .map(|(id, _)| id)
    }

    /// Identify the agent behind `username:password` presented by `source`.
    pub async fn authenticate(
        &self,
        policy: &Policy,
        source: IpAddr,
        username: &str,
        password: &str,
        session: &Session,
    ) -> AuthResult {
        let key = self.credential_key(username, password);
        let generation = policy.generation();
        if let Some((k, g, agent)) = *lock(&session.0)
            && k == key
            && g == generation
        {
            return Ok(agent);
        }
        let remember = |agent: AgentId| {
            *lock(&session.0) = Some((key, generation, agent));
            Ok(agent)
        };
        if let Some(agent) = self.cached(policy, username, &key, Instant::now()) {
            return remember(agent);
        }
        // One verification per (credentials, generation) at a time: requests presenting the
        // same ones meanwhile (a client opening its first connections in parallel) wait for
        // its outcome instead of each taking a verification slot, or being refused for want
        // of one. A refused verification (back-off, limit) leaves the outcome open: the next
        // waiter tries under its own source's back-off.
        let source = SourceKey::of(source);
        let flight = Landing {
            auth: self,
            key: (key, generation),
            flight: self.flight((key, generation)),
        };
        let ran = AtomicBool::new(false);
        let outcome = flight
            .flight
            .get_or_try_init(|| {
                ran.store(true, Ordering::Relaxed);
                self.verify(policy, source, username, password, key)
            })
            .await
            .copied();
        drop(flight);
        match outcome {
            Ok(Some(agent)) => remember(agent),
            Ok(None) => {
                if !ran.load(Ordering::Relaxed) {
                    // The same wrong credentials, verified for another request: a failure
                    // of this source too.
                    lock(&self.failures).fail(source, Instant::now(), &self.settings);
                }
                Err(failed())
            }
            Err(refused) => Err(refused),
        }
    }

    /// The verification under way for these credentials, or a new one to run.
    fn flight(&self, key: (CredentialKey, u64)) -> Flight {
        lock(&self.in_flight).entry(key).or_default().clone()
    }

    /// Forget a finished verification (once: the first request back removes it; a later
    /// request for the same credentials verifies again, or hits the cache on a success).
    fn land(&self, key: (CredentialKey, u64), flight: &Flight) {
        let mut in_flight = lock(&self.in_flight);
        if in_flight.get(&key).is_some_and(|f| Arc::ptr_eq(f, flight))
            && (flight.initialized() || Arc::strong_count(flight) <= 2)
        {
            in_flight.remove(&key);
        }
    }

    /// Admit the attempt under the source's back-off, verify, count the outcome, cache a
    /// success. `Ok(None)`: verified and wrong. `Err`: refused without verifying.
    async fn verify(
        &self,
        policy: &Policy,
        source: SourceKey,
        username: &str,
        password: &str,
        key: CredentialKey,
    ) -> Result<Option<AgentId>, Refusal> {
        let mut attempt = self.admit(source, Instant::now())?;
        let Some((agent, credentials)) = policy.credentials_for(username) else {
            attempt.finish(false);
            return Ok(None);
        };
        let ok = if credentials.password.is_costly() {
            let Ok(permit) = self.verifications.clone().try_acquire_owned() else {
                // Not a failure of this source: nothing was verified.
                attempt.withdraw();
                return Err(Refusal {
                    reason: Reason::AuthThrottled,
                    retry_after: Some(Duration::from_secs(1)),
                });
            };
            let check = credentials.password.clone();
            let password = password.as_bytes().to_vec();
            // The permit goes with the work: a client that hangs up does not free it while
            // the thread still computes.
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                check.verify(&password)
            })
            .await
            .unwrap_or(false)
        } else {
            credentials.password.verify(password.as_bytes())
        };
        attempt.finish(ok);
        if !ok {
            return Ok(None);
        }
        lock(&self.successes).put(
            key,
            Verified {
                agent,
                generation: policy.generation(),
                until: Instant::now() + self.settings.cache_ttl,
            },
        );
        Ok(Some(agent))
    }

    /// Count an attempt from `source` in, unless its back-off refuses it.
    fn admit(&self, source: SourceKey, now: Instant) -> Result<Attempt<'_>, Refusal> {
        lock(&self.failures)
            .admit(source, now, &self.settings)
            .map_err(|retry| Refusal {
                reason: Reason::AuthThrottled,
                retry_after: Some(retry),
            })?;
        Ok(Attempt {
            auth: self,
            source,
            done: false,
        })
    }

    /// Sources tracked now (tests and `/healthz`-style checks).
    pub fn tracked_sources(&self) -> usize {
        lock(&self.failures).len()
    }
}

fn failed() -> Refusal {
    Refusal {
        reason: Reason::AuthFailed,
        retry_after: None,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// HMAC-SHA-256 under a fresh random 32-byte key (given as the zero-padded block HMAC
/// makes of it anyway, which is the infallible constructor).
fn keyed_mac() -> Hmac<Sha256> {
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(&random_key());
    <Hmac<Sha256> as hmac::digest::KeyInit>::new(&block.into())
}

/// 32 bytes from the OS; if it has none to give (it always has on Linux), a key from the
/// standard library's per-process random hasher keys: the cache key's job is to be
/// collision-free and not to be a bare hash of the password, which this still gives.
fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    let halves = (
        password_hash::try_generate_salt(),
        password_hash::try_generate_salt(),
    );
    if let (Ok(a), Ok(b)) = halves {
        key[..16].copy_from_slice(&a);
        key[16..].copy_from_slice(&b);
        return key;
    }
    for (i, chunk) in key.chunks_mut(8).enumerate() {
        let v = RandomState::new().hash_one((i, Instant::now()));
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    key
}

/// A request's share in a verification under way: it lands (see [`Authenticator::land`])
/// when the request is answered, or dropped with it when the client hangs up first, so no
/// entry outlives the requests that wait on it.
struct Landing<'a> {
    auth: &'a Authenticator,
    key: (CredentialKey, u64),
    flight: Flight,
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        self.auth.land(self.key, &self.flight);
    }
}

/// An attempt counted in flight for its source, finished as a success or a failure, or
/// withdrawn when nothing was verified (no verification slot). Dropped unfinished — the
/// client hung up while its password was being verified — it counts as a failure: the
/// verification ran all the same, and hanging up must not buy guesses outside the back-off.
struct Attempt<'a> {
    auth: &'a Authenticator,
    source: SourceKey,
    done: bool,
}

impl Attempt<'_> {
    fn finish(&mut self, ok: bool) {
        self.done = true;
        let settings = &self.auth.settings;
        lock(&self.auth.failures).finish(self.source, ok, Instant::now(), settings);
    }

    fn withdraw(&mut self) {
        self.done = true;
        lock(&self.auth.failures).cancel(self.source);
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.finish(false);
        }
    }
}

/// Where guesses are counted: an IPv4 address, or an IPv6 /64 (one host holds a whole
/// /64; counting per address would give it 2^64 fresh starts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SourceKey(IpAddr);

impl SourceKey {
    pub(crate) fn of(ip: IpAddr) -> Self {
        match address::canonical(ip) {
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !u128::from(u64::MAX);
                SourceKey(IpAddr::V6(Ipv6Addr::from(prefix)))
            }
            v4 => SourceKey(v4),
        }
    }
}

/// A verified (username, password): for which agent, under which policy, until when.
#[derive(Debug, Clone, Copy)]
struct Verified {
    agent: AgentId,
    generation: u64,
    until: Instant,
}

/// Recent successes, at most `max`.
struct SuccessCache {
    entries: HashMap<CredentialKey, Verified>,
    max: usize,
}

impl SuccessCache {
    fn new(max: usize) -> Self {
        Self {
            entries: HashMap::new(),
            max: max.max(1),
        }
    }

    fn get(&self, key: &CredentialKey, generation: u64, now: Instant) -> Option<AgentId> {
        self.entries
            .get(key)
            .filter(|v| v.generation == generation && v.until > now)
            .map(|v| v.agent)
    }

    fn put(&mut self, key: CredentialKey, verified: Verified) {
        if self.entries.len() >= self.max && !self.entries.contains_key(&key) {
            let (now, generation) = (Instant::now(), verified.generation);
            self.entries
                .retain(|_, v| v.until > now && v.generation == generation);
            if self.entries.len() >= self.max
                && let Some(oldest) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, v)| v.until)
                    .map(|(k, _)| *k)
            {
                self.entries.remove(&oldest);
            }
        }
        self.entries.insert(key, verified);
    }
}

/// One source's record of failed attempts.
#[derive(Debug, Clone, Copy)]
struct SourceState {
    key: SourceKey,
    failures: u32,
    in_flight: u32,
    blocked_until: Option<Instant>,
    last_seen: Instant,
}

impl SourceState {
    fn fresh(key: SourceKey, now: Instant) -> Self {
        Self {
            key,
            failures: 0,
            in_flight: 0,
            blocked_until: None,
            last_seen: now,
        }
    }

    /// Nothing left to remember: no attempt in flight, and no failure for `forget_after`.
    fn forgotten(&self, now: Instant, settings: &AuthSettings) -> bool {
        self.in_flight == 0
            && self.blocked_until.is_none_or(|b| b <= now)
            && now.saturating_duration_since(self.last_seen) >= settings.forget_after
    }
}

/// Ways per set of the failure table.
const WAYS: usize = 4;

/// A fixed number of slots, in sets of [`WAYS`] chosen by a keyed hash of the source (an
/// agent cannot aim its sources at one set). A new source takes a free or forgotten slot
/// of its set, else the one with the fewest failures: a flood of fresh sources evicts
/// itself before it evicts a source in back-off.
struct FailureTable {
    slots: Vec<Option<SourceState>>,
    hasher: RandomState,
}

impl FailureTable {
    fn new(tracked: usize) -> Self {
        let sets = tracked.div_ceil(WAYS).max(1);
        Self {
            slots: vec![None; sets * WAYS],
            hasher: RandomState::new(),
        }
    }

    fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    fn set(&mut self, key: SourceKey) -> &mut [Option<SourceState>] {
        let sets = self.slots.len() / WAYS;
        let set = (self.hasher.hash_one(key) % sets as u64) as usize;
        let start = set * WAYS;
        self.slots.get_mut(start..start + WAYS).unwrap_or_default()
    }

    fn find(&mut self, key: SourceKey) -> Option<&mut SourceState> {
        self.set(key).iter_mut().flatten().find(|s| s.key == key)
    }

    /// The source's slot, taken (see the type's doc) when it has none.
    fn find_or_insert(
        &mut self,
        key: SourceKey,
        now: Instant,
        settings: &AuthSettings,
    ) -> Option<&mut SourceState> {
        let set = self.set(key);
        let position = set
            .iter()
            .position(|s| s.is_some_and(|s| s.key == key))
            .or_else(|| set.iter().position(Option::is_none))
            .or_else(|| {
                set.iter()
                    .position(|s| s.is_some_and(|s| s.forgotten(now, settings)))
            })
            .or_else(|| {
                set.iter()
                    .enumerate()
                    .min_by_key(|(_, s)| s.map(|s| (s.failures, s.last_seen)))
                    .map(|(i, _)| i)
            })?;
        let slot = set.get_mut(position)?;
        if slot.is_none_or(|s| s.key != key) {
            *slot = Some(SourceState::fresh(key, now));
        }
        slot.as_mut()
    }

    /// Admit an attempt, or say how long until one may be made.
    fn admit(
        &mut self,
        key: SourceKey,
        now: Instant,
        settings: &AuthSettings,
    ) -> Result<(), Duration> {
        let Some(s) = self.find_or_insert(key, now, settings) else {
            return Ok(());
        };
        if s.forgotten(now, settings) {
            *s = SourceState::fresh(key, now);
        }
        if let Some(until) = s.blocked_until.filter(|b| *b > now) {
            return Err(until - now);
        }
        // Attempts still being verified count as failures-to-be: a source cannot run more
        // verifications at once than it has free failures left, and one in back-off.
        let allowed = settings.free_failures.saturating_sub(s.failures).max(1);
        if s.in_flight >= allowed {
            return Err(settings.backoff_initial);
        }
        s.in_flight += 1;
        Ok(())
    }

    fn finish(&mut self, key: SourceKey, ok: bool, now: Instant, settings: &AuthSettings) {
        if ok {
            if let Some(s) = self.find(key) {
                s.in_flight = s.in_flight.saturating_sub(1);
            }
            return;
        }
        // An evicted source comes back with this one failure.
        let Some(s) = self.find_or_insert(key, now, settings) else {
            return;
        };
        s.in_flight = s.in_flight.saturating_sub(1);
        s.failures = s.failures.saturating_add(1);
        s.last_seen = now;
        if s.failures >= settings.free_failures {
            s.blocked_until = Some(now + backoff(s.failures - settings.free_failures, settings));
        }
    }

    /// A failure learnt without an attempt of this source's own (another request's
    /// verification of the same credentials).
    fn fail(&mut self, key: SourceKey, now: Instant, settings: &AuthSettings) {
        let Some(s) = self.find_or_insert(key, now, settings) else {
            return;
        };
        s.failures = s.failures.saturating_add(1);
        s.last_seen = now;
        if s.failures >= settings.free_failures {
            s.blocked_until = Some(now + backoff(s.failures - settings.free_failures, settings));
        }
    }

    fn cancel(&mut self, key: SourceKey) {
        if let Some(s) = self.find(key) {
            s.in_flight = s.in_flight.saturating_sub(1);
        }
    }
}

/// The back-off after the `k`-th failure past the free ones (k = 0 for the last free one):
/// `backoff_initial` × 2^k, at most `backoff_max`.
pub(crate) fn backoff(k: u32, settings: &AuthSettings) -> Duration {
    settings
        .backoff_initial
        .checked_mul(1u32.checked_shl(k).unwrap_or(u32::MAX))
        .unwrap_or(settings.backoff_max)
        .min(settings.backoff_max)
}

/// The most verified attempts a source can make within `window` from its first attempt,
/// with its attempts as fast as the back-off lets them: the free ones at once, then one at
/// the end of each back-off. What docs/proxy-auth.md states and the tests check.
pub fn max_attempts_within(window: Duration, settings: &AuthSettings) -> u64 {
    let mut attempts = u64::from(settings.free_failures);
    let mut at = Duration::ZERO;
    let mut k = 0;
    loop {
        at += backoff(k, settings);
        if at > window {
            return attempts;
        }
        attempts += 1;
        k += 1;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn settings() -> AuthSettings {
        AuthSettings {
            free_failures: 3,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(400),
            forget_after: Duration::from_secs(10),
            tracked_sources: 8,
            cache_ttl: Duration::from_secs(60),
            cache_entries: 2,
            max_concurrent_verifications: 1,
        }
    }

    fn src(s: &str) -> SourceKey {
        SourceKey::of(s.parse().unwrap())
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let s = settings();
        let ms: Vec<u128> = (0..5).map(|k| backoff(k, &s).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 400, 400]);
        assert_eq!(backoff(200, &s), s.backoff_max);
        // 3 at once, then at 100, 300, 700, 1100 ms ...
        assert_eq!(max_attempts_within(Duration::from_millis(99), &s), 3);
        assert_eq!(max_attempts_within(Duration::from_millis(300), &s), 5);
        assert_eq!(max_attempts_within(Duration::from_millis(1100), &s), 7);
        // The defaults: 5 at once, then at 1, 3, 7, 15, 31, 63 s, then one a minute.
        let d = AuthSettings::default();
        assert_eq!(max_attempts_within(Duration::from_secs(60), &d), 10);
        assert_eq!(
            max_attempts_within(Duration::from_secs(3600), &d),
            5 + 6 + 58
        );
    }

    #[test]
    fn a_source_past_its_free_failures_waits_its_backoff() {
        let s = settings();
        let mut t = FailureTable::new(s.tracked_sources);
        let now = Instant::now();
        let a = src("10.0.0.1");
        for _ in 0..3 {
            t.admit(a, now, &s).unwrap();
            t.finish(a, false, now, &s);
        }
        assert_eq!(t.admit(a, now, &s), Err(Duration::from_millis(100)));
        // Another source is not affected; an IPv6 /64 is one source.
        t.admit(src("10.0.0.2"), now, &s).unwrap();
        let later = now + Duration::from_millis(100);
        t.admit(a, later, &s).unwrap();
        t.finish(a, false, later, &s);
        assert_eq!(t.admit(a, later, &s), Err(Duration::from_millis(200)));
        // Forgotten after forget_after without failures.
        let much_later = later + s.forget_after;
        t.admit(a, much_later, &s).unwrap();
        assert_eq!(src("2001:db8:1:2::1"), src("2001:db8:1:2:ffff::9"));
        assert_ne!(src("2001:db8:1:2::1"), src("2001:db8:1:3::1"));
        assert_eq!(src("::ffff:10.0.0.1"), a);
    }

    #[test]
    fn attempts_in_flight_count_against_the_free_failures() {
        let s = settings();
        let mut t = FailureTable::new(s.tracked_sources);
        let now = Instant::now();
        let a = src("10.0.0.1");
        for _ in 0..3 {
            t.admit(a, now, &s).unwrap();
        }
        // Three verifications running: a fourth at once would overshoot the free three.
        assert!(t.admit(a, now, &s).is_err());
        t.cancel(a);
        t.admit(a, now, &s).unwrap();
    }

    /// A client that hangs up while its password is verified is charged a failure: the
    /// verification ran anyway.
    #[tokio::test]
    async fn hanging_up_during_verification_counts_as_a_failure() {
        let auth = Authenticator::new(settings());
        let policy = two_agents_hashed(&slow_phc("pa"), 1);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..3 {
            let session = Session::default();
            let hung_up = tokio::time::timeout(
                Duration::from_micros(1),
                auth.authenticate(&policy, ip, "a", "guess", &session),
            )
            .await;
            assert!(hung_up.is_err(), "verification finished within 1 µs");
            assert!(
                lock(&auth.in_flight).is_empty(),
                "a hung-up request left its entry"
            );
            // The slot stays with the computation until it ends, hang-up or not.
            assert_eq!(auth.verifications.available_permits(), 0);
            while auth.verifications.available_permits() == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let state = lock(&auth.failures)
            .find(SourceKey::of(ip))
            .copied()
            .unwrap();
        assert_eq!((state.failures, state.in_flight), (3, 0));
        let r = auth
            .authenticate(&policy, ip, "a", "pa", &Session::default())
            .await;
        assert_eq!(r.map_err(|e| e.reason), Err(Reason::AuthThrottled));
    }

    /// A flood of fresh sources never grows the table, and evicts itself before it evicts
    /// a source in back-off.
    #[test]
    fn the_table_is_fixed_and_keeps_penalised_sources() {
        let s = settings();
        let mut t = FailureTable::new(s.tracked_sources);
        let now = Instant::now();
        let a = src("10.0.0.1");
        for _ in 0..4 {
            let _ = t.admit(a, now, &s);
            t.finish(a, false, now, &s);
        }
        for i in 0..10_000u32 {
            let k = SourceKey::of(IpAddr::from(std::net::Ipv4Addr::from(0xc000_0200 + i)));
            if t.admit(k, now, &s).is_ok() {
                t.finish(k, false, now, &s);
            }
            assert!(t.len() <= 8);
        }
        assert!(
            t.admit(a, now, &s).is_err(),
            "the flood reset the penalised source"
        );
        // docs/proxy-auth.md: slots of under 100 bytes.
        assert!(std::mem::size_of::<Option<SourceState>>() < 100);
    }

    fn phc(password: &str) -> String {
        use password_hash::CustomizedPasswordHasher;
        let params = argon2::Params::new(64, 1, 1, None).unwrap();
        argon2::Argon2::default()
            .hash_password_with_params(password.as_bytes(), b"a-test-salt", params)
            .unwrap()
            .to_string()
    }

    fn two_agents(a_password: &str, generation: u64) -> Policy {
        two_agents_hashed(&phc(a_password), generation)
    }

    /// Agents `a` (with the PHC string given) and `b` (password `pb`).
    fn two_agents_hashed(a_hash: &str, generation: u64) -> Policy {
        use crate::policy::rules::{RulesSources, SourceFile};
        let agent = |name: &str, hash: &str| SourceFile {
            path: format!("rules/agents/{name}.toml").into(),
            text: format!(
                "name = \"{name}\"\n[credentials]\nusername = \"{name}\"\npassword_hash = \"{hash}\"\n"
            ),
        };
        let sources = RulesSources {
            agents: vec![agent("a", a_hash), agent("b", &phc("pb"))],
            lists: Vec::new(),
        };
        crate::policy::compile(&sources, &[443], generation).unwrap()
    }

    /// Only successes are cached, for the username and password that succeeded: a hit
    /// never takes another password, never names another agent, and a reload (new
    /// generation) verifies again.
    #[tokio::test]
    async fn a_cached_success_never_accepts_another_password_or_agent() {
        let auth = Authenticator::new(AuthSettings {
            free_failures: 100,
            ..settings()
        });
        let policy = two_agents("pa", 1);
        let (a, b) = (
            policy.agent_by_name("a").unwrap(),
            policy.agent_by_name("b").unwrap(),
        );
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let fresh = Session::default;
        assert_eq!(
            auth.authenticate(&policy, ip, "a", "pa", &fresh()).await,
            Ok(a)
        );
        let key = auth.credential_key("a", "pa");
        assert_eq!(auth.cached(&policy, "a", &key, Instant::now()), Some(a));
        for (user, password) in [
            ("a", "pb"),
            ("b", "pa"),
            ("a", "pa "),
            ("a", ""),
            ("a:p", "a"),
        ] {
            let r = auth
                .authenticate(&policy, ip, user, password, &fresh())
                .await;
            assert_eq!(
                r.map_err(|e| e.reason),
                Err(Reason::AuthFailed),
                "{user}:{password}"
            );
        }
        // The key is drawn per process: another authenticator's keys differ.
        let other = Authenticator::new(settings());
        assert_ne!(other.credential_key("a", "pa"), key);
        // The key is per (username, password): "a" + "bpa" is not "ab" + "pa".
        assert_ne!(
            auth.credential_key("a", "bpa"),
            auth.credential_key("ab", "pa")
        );
        // A cached key looked up under another username names nobody.
        assert_eq!(auth.cached(&policy, "b", &key, Instant::now()), None);
        assert_eq!(
            auth.authenticate(&policy, ip, "b", "pb", &fresh()).await,
            Ok(b)
        );
        // A reload that changes a's password: the old one is verified again, and fails.
        let reloaded = two_agents("new", 2);
        assert_eq!(auth.cached(&reloaded, "a", &key, Instant::now()), None);
        let r = auth.authenticate(&reloaded, ip, "a", "pa", &fresh()).await;
        assert_eq!(r.map_err(|e| e.reason), Err(Reason::AuthFailed));
        // A session's memo is per credentials and generation too.
        let session = fresh();
        assert_eq!(
            auth.authenticate(&policy, ip, "a", "pa", &session).await,
            Ok(a)
        );
        let r = auth.authenticate(&policy, ip, "a", "wrong", &session).await;
        assert_eq!(r.map_err(|e| e.reason), Err(Reason::AuthFailed));
        let r = auth.authenticate(&reloaded, ip, "a", "pa", &session).await;
        assert_eq!(r.map_err(|e| e.reason), Err(Reason::AuthFailed));
    }

    /// With every verification slot taken, credentials that need verifying are refused at
    /// once (not queued), without counting as the source's failure; a cached success
    /// still passes.
    #[tokio::test]
    async fn verifications_beyond_the_limit_are_refused_at_once() {
        let auth = Authenticator::new(settings());
        let policy = two_agents("pa", 1);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(
            auth.authenticate(&policy, ip, "b", "pb", &Session::default())
                .await
                .is_ok()
        );
        let held = auth.verifications.clone().try_acquire_owned().unwrap();
        let started = Instant::now();
        for _ in 0..10 {
            let r = auth
                .authenticate(&policy, ip, "a", "pa", &Session::default())
                .await;
            assert_eq!(r.map_err(|e| e.reason), Err(Reason::AuthThrottled));
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(
            auth.authenticate(&policy, ip, "b", "pb", &Session::default())
                .await
                .is_ok()
        );
        drop(held);
        let a = policy.agent_by_name("a").unwrap();
        assert_eq!(
            auth.authenticate(&policy, ip, "a", "pa", &Session::default())
                .await,
            Ok(a)
        );
        // Nothing was counted against the source: its free failures are all there.
        let key = SourceKey::of(ip);
        let state = lock(&auth.failures).find(key).copied().unwrap();
        assert_eq!((state.failures, state.in_flight), (0, 0));
    }

    /// A client opening its first connections in parallel with a cold cache: one
    /// verification for all of them (with a single verification slot, none is refused),
    /// and the same wrong password sent in parallel is one verification too, a failure for
    /// each request.
    #[tokio::test]
    async fn parallel_requests_with_the_same_credentials_share_one_verification() {
        let auth = Arc::new(Authenticator::new(AuthSettings {
            free_failures: 100,
            ..settings()
        }));
        // A costlier hash, so the requests overlap the verification.
        let policy = Arc::new(two_agents_hashed(&slow_phc("pa"), 1));
        let a = policy.agent_by_name("a").unwrap();
        for (password, expected) in [("pa", Ok(a)), ("nope", Err(Reason::AuthFailed))] {
            let mut set = tokio::task::JoinSet::new();
            for i in 0..16u8 {
                let (auth, policy) = (auth.clone(), policy.clone());
                let ip = IpAddr::from([10, 0, 1, i]);
                set.spawn(async move {
                    auth.authenticate(&policy, ip, "a", password, &Session::default())
                        .await
                        .map_err(|e| e.reason)
                });
            }
            let results = set.join_all().await;
            assert!(
                results.iter().all(|r| *r == expected),
                "{password}: {results:?}"
            );
            assert!(lock(&auth.in_flight).is_empty());
        }
    }

    fn slow_phc(password: &str) -> String {
        use password_hash::CustomizedPasswordHasher;
        let params = argon2::Params::new(8 * 1024, 2, 1, None).unwrap();
        argon2::Argon2::default()
            .hash_password_with_params(password.as_bytes(), b"a-test-salt", params)
            .unwrap()
            .to_string()
    }

    #[test]
    fn the_success_cache_is_bounded_and_generation_bound() {
        let mut c = SuccessCache::new(2);
        let now = Instant::now();
        let v = |agent, generation, secs| Verified {
            agent: AgentId(agent),
            generation,
            until: now + Duration::from_secs(secs),
        };
        c.put(CredentialKey([1; 32]), v(0, 1, 60));
        c.put(CredentialKey([2; 32]), v(1, 1, 30));
        c.put(CredentialKey([3; 32]), v(2, 1, 90));
        assert_eq!(c.entries.len(), 2);
        assert_eq!(
            c.get(&CredentialKey([2; 32]), 1, now),
            None,
            "oldest evicted"
        );
        assert_eq!(c.get(&CredentialKey([3; 32]), 1, now), Some(AgentId(2)));
        assert_eq!(c.get(&CredentialKey([3; 32]), 2, now), None, "other policy");
        assert_eq!(
            c.get(&CredentialKey([1; 32]), 1, now + Duration::from_secs(61)),
            None,
            "expired"
        );
    }
}
