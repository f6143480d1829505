//! Standard Webhooks signature verification (<https://www.standardwebhooks.com/>) for the
//! admin endpoints (kill, revive, reload): secret parsing, signing, verification with key
//! rotation (which key matched names the sender), and a bounded replay guard that never
//! locks anyone out: when full it forgets the oldest ids.
//!
//! Must not: read the clock (callers inject `now`), do I/O, log or print key material, or
//! panic on any input. Every doubt is answered with an error (fail closed).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::{ConditionallySelectable, ConstantTimeEq};

/// How old a timestamp may be (spec: 5 minutes).
pub const TOLERANCE_SECS: i64 = 300;
/// How far ahead of our clock a timestamp may be. Much less than the spec's 5 minutes: a
/// future-dated id would otherwise sit in the replay guard for up to 10 minutes, and a flood
/// of them could fill it.
pub const FUTURE_SKEW_SECS: i64 = 60;
/// Default bound on remembered ids in [`ReplayGuard`].
pub const DEFAULT_REPLAY_CAP: usize = 100_000;
/// Longest accepted `webhook-id`, in bytes.
pub const MAX_ID_LEN: usize = 256;

const SECRET_PREFIX: &str = "whsec_";
/// Below this a key is guessable; the spec recommends 24..=64 bytes.
const MIN_SECRET_LEN: usize = 16;
/// HMAC-SHA256 output length; anything else can never match.
const MAC_LEN: usize = 32;
/// 18 digits always fit in i64, so parsing cannot overflow.
const MAX_TIMESTAMP_DIGITS: usize = 18;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("missing or empty header {0}")]
    MissingHeader(&'static str),
    #[error("webhook-id must be 1..=256 printable ASCII bytes")]
    BadId,
    #[error("webhook-timestamp is not a non-negative integer")]
    BadTimestamp,
    #[error("webhook-timestamp is too old")]
    Expired,
    #[error("webhook-timestamp is too far in the future")]
    Future,
    #[error("webhook-signature holds no well-formed v1 signature")]
    MalformedSignature,
    #[error("no signature matched")]
    BadSignature,
    #[error("webhook secret is invalid (expected whsec_<base64>, at least 16 bytes)")]
    BadSecret,
    #[error("no webhook secret configured")]
    NoSecrets,
    #[error("webhook-id was already used")]
    Replayed,
}

impl WebhookError {
    /// The log and metric reason: `stale` for the clock, `replay` for a reused id,
    /// `signature_invalid` for everything else (unsigned, malformed or wrongly signed).
    pub fn reason(&self) -> &'static str {
        match self {
            WebhookError::Expired | WebhookError::Future => "stale",
            WebhookError::Replayed => "replay",
            _ => "signature_invalid",
        }
    }
}

/// An HMAC key, held already keyed so signing can never fail later. Debug never shows it.
#[derive(Clone)]
pub struct Secret {
    keyed: HmacSha256,
    len: usize,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes redacted>)", self.len)
    }
}

impl Secret {
    /// Parse `whsec_<base64>`. Like the reference libraries, the prefix is optional and the
    /// rest is always base64; use [`Secret::from_bytes`] for a raw key.
    pub fn parse(text: &str) -> Result<Secret, WebhookError> {
        // Trim because secrets usually come from files or env vars with a trailing newline.
        let text = text.trim();
        let b64 = text.strip_prefix(SECRET_PREFIX).unwrap_or(text);
        let bytes = B64.decode(b64).map_err(|_| WebhookError::BadSecret)?;
        Secret::from_bytes(bytes)
    }

    /// A raw key, at least 16 bytes.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Secret, WebhookError> {
        if bytes.len() < MIN_SECRET_LEN {
            return Err(WebhookError::BadSecret);
        }
        // HMAC accepts any key length, so this never fails in practice; if it did, the key
        // is refused here instead of yielding a predictable MAC later.
        let keyed = HmacSha256::new_from_slice(&bytes).map_err(|_| WebhookError::BadSecret)?;
        Ok(Secret {
            keyed,
            len: bytes.len(),
        })
    }

    fn mac(&self, id: &str, timestamp: &str, body: &[u8]) -> [u8; MAC_LEN] {
        let mut mac = self.keyed.clone();
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.finalize().into_bytes().into()
    }
}

/// The three Standard Webhooks headers plus the raw body. An absent header is passed as "".
#[derive(Debug, Clone, Copy)]
pub struct SignedRequest<'a> {
    pub id: &'a str,
    pub timestamp: &'a str,
    pub signature_header: &'a str,
    pub body: &'a [u8],
}

/// Sign `body` as `v1,<base64>` (for the CLI and tests).
pub fn sign(secret: &Secret, id: &str, timestamp: i64, body: &[u8]) -> String {
    let mac = secret.mac(id, &timestamp.to_string(), body);
    format!("v1,{}", B64.encode(mac))
}

/// Verify against any of `secrets` (rotation). `now` is injected (unix seconds) — no clock inside.
/// Returns the index of the secret that matched: the sender's key.
///
/// Does not check for replays: pair it with [`ReplayGuard::check_and_remember`] after success.
pub fn verify(secrets: &[Secret], req: &SignedRequest, now: i64) -> Result<usize, WebhookError> {
    if secrets.is_empty() {
        return Err(WebhookError::NoSecrets);
    }
    if req.id.is_empty() {
        return Err(WebhookError::MissingHeader("webhook-id"));
    }
    if req.timestamp.is_empty() {
        return Err(WebhookError::MissingHeader("webhook-timestamp"));
    }
    if req.signature_header.trim().is_empty() {
        return Err(WebhookError::MissingHeader("webhook-signature"));
    }
    validate_id(req.id)?;
    let ts = parse_timestamp(req.timestamp)?;
    check_window(ts, now)?;

    // Decode the candidates first so "nothing usable" is told apart from "wrong key".
    let candidates: Vec<Vec<u8>> = req
        .signature_header
        .split(' ')
        .filter_map(|entry| entry.split_once(','))
        // Other versions (e.g. v1a asymmetric) are not ours to check: skip, never fail on them.
        .filter(|(version, _)| *version == "v1")
        .filter_map(|(_, sig)| B64.decode(sig).ok())
        .filter(|sig| sig.len() == MAC_LEN)
        .collect();
    if candidates.is_empty() {
        return Err(WebhookError::MalformedSignature);
    }

    // Sign the timestamp exactly as sent: that string is what the sender's MAC covers.
    let mut matched = subtle::Choice::from(0u8);
    let mut index = 0u64;
    for (i, secret) in secrets.iter().enumerate() {
        let expected = secret.mac(req.id, req.timestamp, req.body);
        let mut this = subtle::Choice::from(0u8);
        for candidate in &candidates {
            // No early exit: timing shows neither which key nor which entry matched.
            this |= expected.ct_eq(candidate.as_slice());
        }
        // The first key that matched names the sender.
        index.conditional_assign(&(i as u64), this & !matched);
        matched |= this;
    }
    if bool::from(matched) {
        usize::try_from(index).map_err(|_| WebhookError::BadSignature)
    } else {
        Err(WebhookError::BadSignature)
    }
}

/// 1..=256 bytes of visible ASCII (0x21..=0x7E): no spaces or controls, which could smuggle
/// separators into logs or the signed content.
fn validate_id(id: &str) -> Result<(), WebhookError> {
    if id.is_empty() || id.len() > MAX_ID_LEN || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(WebhookError::BadId);
    }
    Ok(())
}

/// Decimal digits only: `i64::from_str` would also take `+`/`-`, which the spec never sends.
fn parse_timestamp(text: &str) -> Result<i64, WebhookError> {
    if text.is_empty()
        || text.len() > MAX_TIMESTAMP_DIGITS
        || !text.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(WebhookError::BadTimestamp);
    }
    text.parse().map_err(|_| WebhookError::BadTimestamp)
}

/// Inclusive: [`TOLERANCE_SECS`] back, [`FUTURE_SKEW_SECS`] ahead; saturating so extreme
/// `now` values cannot overflow.
fn check_window(ts: i64, now: i64) -> Result<(), WebhookError> {
    if ts < now.saturating_sub(TOLERANCE_SECS) {
        return Err(WebhookError::Expired);
    }
    if ts > now.saturating_add(FUTURE_SKEW_SECS) {
        return Err(WebhookError::Future);
    }
    Ok(())
}

/// Remembers ids seen within the tolerance window so a replay is refused.
///
/// Bounded: at most `cap` ids, ordered by timestamp. An id is forgotten once its timestamp
/// has left the window (so [`verify`] would refuse it anyway) or, when the guard is full,
/// oldest first. It never refuses a new id for capacity: that would let anyone holding a
/// key lock every later kill out. What forgetting early costs is bounded elsewhere: a kill
/// replayed only closes, and a revive replayed carries a TOTP code whose step was already
/// used (the kill switch remembers it durably).
#[derive(Debug)]
pub struct ReplayGuard {
    cap: usize,
    seen: HashMap<Arc<str>, i64>,
    /// Same ids ordered by timestamp, for cheap eviction from the oldest end.
    by_time: BTreeSet<(i64, Arc<str>)>,
    /// Highest `now` observed: if the clock steps back, ids we already forgot must still be
    /// refused, so the window is judged against this rather than the current `now`.
    high_water: i64,
}

impl Default for ReplayGuard {
    fn default() -> Self {
        Self::new(DEFAULT_REPLAY_CAP)
    }
}

impl ReplayGuard {
    pub fn new(cap: usize) -> Self {
        ReplayGuard {
            cap,
            seen: HashMap::new(),
            by_time: BTreeSet::new(),
            high_water: i64::MIN,
        }
    }

    /// Number of ids currently remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Refuse `id` if seen before (or unusable), otherwise remember it until its `timestamp`
    /// leaves the window. Call only after [`verify`] succeeded, so forged ids cannot fill it.
    pub fn check_and_remember(
        &mut self,
        id: &str,
        timestamp: i64,
        now: i64,
    ) -> Result<(), WebhookError> {
        validate_id(id)?;
        self.high_water = self.high_water.max(now);
        let oldest_live = self.high_water.saturating_sub(TOLERANCE_SECS);
        // Re-check the window here so eviction below is always safe, even if a caller skipped
        // verify: anything evicted is older than anything we would still accept.
        if timestamp < oldest_live {
            return Err(WebhookError::Expired);
        }
        if timestamp > now.saturating_add(FUTURE_SKEW_SECS) {
            return Err(WebhookError::Future);
        }
        self.evict_before(oldest_live);
        if self.seen.contains_key(id) {
            return Err(WebhookError::Replayed);
        }
        while self.seen.len() >= self.cap.max(1) {
            match self.by_time.pop_first() {
                Some((_, oldest)) => {
                    self.seen.remove(&oldest);
                }
                None => break,
            }
        }
        let key: Arc<str> = Arc::from(id);
        self.seen.insert(Arc::clone(&key), timestamp);
        self.by_time.insert((timestamp, key));
        Ok(())
    }

    fn evict_before(&mut self, oldest_live: i64) {
        while let Some((ts, _)) = self.by_time.first() {
            if *ts >= oldest_live {
                break;
            }
            if let Some((_, id)) = self.by_time.pop_first() {
                self.seen.remove(&id);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: i64 = 1614265330;
    const TS_STR: &str = "1614265330";
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn secret() -> Secret {
        Secret::parse(SECRET).unwrap()
    }

    fn other_secret() -> Secret {
        Secret::from_bytes(b"another-secret-that-is-long-enough".to_vec()).unwrap()
    }

    fn req<'a>(id: &'a str, ts: &'a str, sig: &'a str, body: &'a [u8]) -> SignedRequest<'a> {
        SignedRequest {
            id,
            timestamp: ts,
            signature_header: sig,
            body,
        }
    }

    fn good() -> SignedRequest<'static> {
        req(ID, TS_STR, SIG, BODY)
    }

    #[test]
    fn reference_vector_verifies() {
        assert_eq!(verify(&[secret()], &good(), TS), Ok(0));
    }

    #[test]
    fn sign_reproduces_reference_vector() {
        assert_eq!(sign(&secret(), ID, TS, BODY), SIG);
    }

    #[test]
    fn secret_prefix_is_optional_and_input_trimmed() {
        let bare = Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").unwrap();
        assert_eq!(verify(&[bare], &good(), TS), Ok(0));
    }

    #[test]
    fn bad_secrets_rejected() {
        assert_eq!(
            Secret::parse("whsec_not base64!").unwrap_err(),
            WebhookError::BadSecret
        );
        assert_eq!(
            Secret::parse("whsec_").unwrap_err(),
            WebhookError::BadSecret
        );
        // 8 bytes: too short to be a real key.
        assert_eq!(
            Secret::parse("whsec_AAAAAAAAAAA=").unwrap_err(),
            WebhookError::BadSecret
        );
        assert_eq!(
            Secret::from_bytes(vec![1; 15]).unwrap_err(),
            WebhookError::BadSecret
        );
    }

    #[test]
    fn debug_does_not_leak_key() {
        let shown = format!("{:?}", secret());
        assert!(!shown.contains("MfKQ"), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn no_secrets_fails_closed() {
        assert_eq!(verify(&[], &good(), TS), Err(WebhookError::NoSecrets));
    }

    #[test]
    fn wrong_signature() {
        let sig = "v1,Kx6XrCHUF0DhgEfCQkJxr3+rN2O2ouOAk3BcPakOXs0=";
        assert_eq!(
            verify(&[secret()], &req(ID, TS_STR, sig, BODY), TS),
            Err(WebhookError::BadSignature)
        );
    }

    #[test]
    fn wrong_secret() {
        assert_eq!(
            verify(&[other_secret()], &good(), TS),
            Err(WebhookError::BadSignature)
        );
    }

    #[test]
    fn window_edges() {
        assert_eq!(verify(&[secret()], &good(), TS + 300), Ok(0));
        assert_eq!(verify(&[secret()], &good(), TS - 60), Ok(0));
        assert_eq!(
            verify(&[secret()], &good(), TS - 61),
            Err(WebhookError::Future)
        );
        assert_eq!(
            verify(&[secret()], &good(), TS + 301),
            Err(WebhookError::Expired)
        );
        assert_eq!(
            verify(&[secret()], &good(), TS - 301),
            Err(WebhookError::Future)
        );
    }

    #[test]
    fn extreme_now_does_not_overflow() {
        assert_eq!(
            verify(&[secret()], &good(), i64::MAX),
            Err(WebhookError::Expired)
        );
        assert_eq!(
            verify(&[secret()], &good(), i64::MIN),
            Err(WebhookError::Future)
        );
    }

    #[test]
    fn tampered_body() {
        let body = br#"{"test": 2432232315}"#;
        assert_eq!(
            verify(&[secret()], &req(ID, TS_STR, SIG, body), TS),
            Err(WebhookError::BadSignature)
        );
    }

    #[test]
    fn tampered_id() {
        assert_eq!(
            verify(
                &[secret()],
                &req("msg_p5jXN8AQM9LWM0D4loKWxJeK", TS_STR, SIG, BODY),
                TS
            ),
            Err(WebhookError::BadSignature)
        );
    }

    #[test]
    fn tampered_timestamp() {
        let ts = (TS + 1).to_string();
        assert_eq!(
            verify(&[secret()], &req(ID, &ts, SIG, BODY), TS),
            Err(WebhookError::BadSignature)
        );
    }

    #[test]
    fn missing_headers() {
        let s = [secret()];
        assert_eq!(
            verify(&s, &req("", TS_STR, SIG, BODY), TS),
            Err(WebhookError::MissingHeader("webhook-id"))
        );
        assert_eq!(
            verify(&s, &req(ID, "", SIG, BODY), TS),
            Err(WebhookError::MissingHeader("webhook-timestamp"))
        );
        assert_eq!(
            verify(&s, &req(ID, TS_STR, "", BODY), TS),
            Err(WebhookError::MissingHeader("webhook-signature"))
        );
        assert_eq!(
            verify(&s, &req(ID, TS_STR, "   ", BODY), TS),
            Err(WebhookError::MissingHeader("webhook-signature"))
        );
    }

    #[test]
    fn malformed_timestamps() {
        let s = [secret()];
        for ts in [
            "abc",
            "-1614265330",
            "+1614265330",
            " 1614265330",
            "1614265330.0",
            "1e9",
            "9999999999999999999999",
        ] {
            assert_eq!(
                verify(&s, &req(ID, ts, SIG, BODY), TS),
                Err(WebhookError::BadTimestamp),
                "{ts:?}"
            );
        }
    }

    #[test]
    fn malformed_ids() {
        let s = [secret()];
        let long = "a".repeat(MAX_ID_LEN + 1);
        for id in ["msg 1", "msg\n1", "msg\u{e9}", long.as_str()] {
            assert_eq!(
                verify(&s, &req(id, TS_STR, SIG, BODY), TS),
                Err(WebhookError::BadId),
                "{id:?}"
            );
        }
    }

    #[test]
    fn malformed_signature_headers() {
        let s = [secret()];
        for sig in [
            "garbage",
            "v1",
            "v1,",
            "v1,!!!notbase64",
            "v1,AAAA",                                          // decodes, wrong length
            "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",  // other version only
            "v1a,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=", // asymmetric, not ours
            "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",     // no version
        ] {
            assert_eq!(
                verify(&s, &req(ID, TS_STR, sig, BODY), TS),
                Err(WebhookError::MalformedSignature),
                "{sig:?}"
            );
        }
    }

    #[test]
    fn any_of_several_signatures_passes() {
        let s = [secret()];
        let sig = format!("v1,Kx6XrCHUF0DhgEfCQkJxr3+rN2O2ouOAk3BcPakOXs0= v1a,xyz garbage {SIG}");
        assert_eq!(verify(&s, &req(ID, TS_STR, &sig, BODY), TS), Ok(0));
        let sig = format!("{SIG} v1,Kx6XrCHUF0DhgEfCQkJxr3+rN2O2ouOAk3BcPakOXs0=");
        assert_eq!(verify(&s, &req(ID, TS_STR, &sig, BODY), TS), Ok(0));
    }

    #[test]
    fn rotation_second_secret_matches() {
        assert_eq!(verify(&[other_secret(), secret()], &good(), TS), Ok(1));
        assert_eq!(verify(&[secret(), other_secret()], &good(), TS), Ok(0));
        // The same key twice: the first names the sender.
        assert_eq!(
            verify(&[other_secret(), secret(), secret()], &good(), TS),
            Ok(1)
        );
        // And a request signed by the new key passes with the old one listed first.
        let new_sig = sign(&other_secret(), ID, TS, BODY);
        assert_eq!(
            verify(
                &[secret(), other_secret()],
                &req(ID, TS_STR, &new_sig, BODY),
                TS
            ),
            Ok(1)
        );
    }

    #[test]
    fn replay_refused() {
        let mut g = ReplayGuard::new(10);
        assert_eq!(g.check_and_remember(ID, TS, TS), Ok(()));
        assert_eq!(
            g.check_and_remember(ID, TS, TS + 10),
            Err(WebhookError::Replayed)
        );
        // The id is the key: a new timestamp does not make it new.
        assert_eq!(
            g.check_and_remember(ID, TS + 5, TS + 10),
            Err(WebhookError::Replayed)
        );
        assert_eq!(g.check_and_remember("msg_other", TS, TS + 10), Ok(()));
    }

    #[test]
    fn replay_guard_full_forgets_the_oldest_never_refuses() {
        let mut g = ReplayGuard::new(2);
        assert_eq!(g.check_and_remember("a", TS - 10, TS), Ok(()));
        assert_eq!(g.check_and_remember("b", TS, TS), Ok(()));
        assert_eq!(g.check_and_remember("c", TS, TS), Ok(()));
        assert_eq!(g.len(), 2);
        // The newest are still refused as replays; the oldest was forgotten.
        assert_eq!(
            g.check_and_remember("b", TS, TS),
            Err(WebhookError::Replayed)
        );
        assert_eq!(
            g.check_and_remember("c", TS, TS),
            Err(WebhookError::Replayed)
        );
        assert!(!g.seen.contains_key("a"));
    }

    /// The lock-out seen in the field: 100,000 ids dated as far ahead as allowed fill the
    /// guard; a new id is still accepted, at once.
    #[test]
    fn a_flood_of_future_dated_ids_never_locks_out_a_new_one() {
        let mut g = ReplayGuard::default();
        for i in 0..DEFAULT_REPLAY_CAP {
            let id = format!("flood_{i}");
            assert_eq!(g.check_and_remember(&id, TS + FUTURE_SKEW_SECS, TS), Ok(()));
        }
        assert_eq!(g.len(), DEFAULT_REPLAY_CAP);
        assert_eq!(g.check_and_remember("the_kill", TS, TS), Ok(()));
        assert_eq!(
            g.check_and_remember("flood_beyond", TS + 295, TS),
            Err(WebhookError::Future)
        );
        assert_eq!(g.len(), DEFAULT_REPLAY_CAP);
    }

    #[test]
    fn replay_guard_evicts_only_expired_ids() {
        let mut g = ReplayGuard::new(2);
        assert_eq!(g.check_and_remember("a", TS, TS), Ok(()));
        assert_eq!(g.check_and_remember("b", TS + 100, TS + 100), Ok(()));
        // "a" leaves the window at TS + 301; "b" does not.
        assert_eq!(g.check_and_remember("c", TS + 301, TS + 301), Ok(()));
        assert_eq!(g.len(), 2);
        assert_eq!(
            g.check_and_remember("b", TS + 100, TS + 301),
            Err(WebhookError::Replayed)
        );
    }

    #[test]
    fn replay_guard_refuses_out_of_window_and_clock_steps_back() {
        let mut g = ReplayGuard::new(10);
        assert_eq!(
            g.check_and_remember("a", TS + FUTURE_SKEW_SECS + 1, TS),
            Err(WebhookError::Future)
        );
        assert_eq!(g.check_and_remember("a", TS, TS), Ok(()));
        assert_eq!(g.check_and_remember("z", TS + 400, TS + 400), Ok(()));
        assert!(!g.seen.contains_key("a"), "a should be evicted");
        // Clock steps back: "a" was forgotten but must still be refused.
        assert_eq!(
            g.check_and_remember("a", TS, TS),
            Err(WebhookError::Expired)
        );
        assert_eq!(g.check_and_remember("", TS, TS), Err(WebhookError::BadId));

        let mut g = ReplayGuard::new(10);
        assert_eq!(
            g.check_and_remember("a", TS, TS + 301),
            Err(WebhookError::Expired)
        );
    }

    proptest! {
        #[test]
        fn verify_never_panics(
            id in ".{0,300}",
            ts in ".{0,30}",
            sig in ".{0,200}",
            body in proptest::collection::vec(any::<u8>(), 0..256),
            now in any::<i64>(),
        ) {
            let s = [secret()];
            let _ = verify(&s, &req(&id, &ts, &sig, &body), now);
            // Also with a plausible prefix so the signature-parsing path is exercised.
            let sig2 = format!("v1,{sig} {SIG}");
            let _ = verify(&s, &req(ID, TS_STR, &sig2, &body), TS);
            let mut g = ReplayGuard::new(4);
            let _ = g.check_and_remember(&id, now, now);
        }

        #[test]
        fn sign_then_verify_round_trips(
            id in "[!-~]{1,256}",
            ts in 0i64..=4_000_000_000,
            body in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let sig = sign(&secret(), &id, ts, &body);
            let ts_s = ts.to_string();
            prop_assert_eq!(verify(&[secret()], &req(&id, &ts_s, &sig, &body), ts), Ok(0));
        }
    }
}
