//! RFC 6238 TOTP (SHA-1, 6 digits, 30-second steps, ±1 step skew) for the revive endpoint,
//! via the `totp-rs` crate, plus a guard refusing reuse of an accepted code (RFC 6238 §5.2).
//!
//! Must not: read the clock (callers inject `now`), do I/O, print the secret, or panic on
//! any input.

use std::fmt;

use totp_rs::{Algorithm, Builder, Secret, Totp};

/// Code length; RFC 6238's common default and what authenticator apps show.
pub const DIGITS: usize = 6;
/// Step length in seconds (RFC 6238 default).
pub const STEP_SECS: u64 = 30;
/// Steps accepted either side of the current one, for clock skew (RFC 6238 §5.2 suggests 1).
pub const SKEW_STEPS: u16 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TotpError {
    #[error("TOTP secret is not valid base32")]
    BadBase32,
    #[error("TOTP secret must be at least 16 bytes (RFC 4226 §4)")]
    TooShort,
    #[error("TOTP secret rejected: {0}")]
    Invalid(String),
}

/// A TOTP shared secret, ready to generate and check codes. Debug never shows it.
#[derive(Clone)]
pub struct TotpSecret(Totp);

impl fmt::Debug for TotpSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TotpSecret(<redacted>)")
    }
}

impl TotpSecret {
    /// Parse a base32 secret as authenticator apps show it: case, spaces, dashes and
    /// trailing `=` padding are tolerated because people copy it by hand.
    pub fn from_base32(s: &str) -> Result<Self, TotpError> {
        let cleaned: String = s
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '-')
            .collect::<String>()
            .trim_end_matches('=')
            .to_ascii_uppercase();
        if cleaned.is_empty() {
            return Err(TotpError::BadBase32);
        }
        let bytes = Secret::try_from_base32(&cleaned)
            .map_err(|_| TotpError::BadBase32)?
            .as_bytes()
            .to_vec();
        Self::from_bytes(bytes)
    }

    /// A raw secret of at least 16 bytes.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, TotpError> {
        Builder::new()
            .with_algorithm(Algorithm::SHA1)
            .with_digits(DIGITS as u8)
            .with_skew(SKEW_STEPS)
            .with_step_duration(STEP_SECS)
            .with_secret(bytes)
            .build()
            .map(TotpSecret)
            .map_err(|e| match e {
                totp_rs::TotpError::SecretTooShort { .. } => TotpError::TooShort,
                other => TotpError::Invalid(other.to_string()),
            })
    }

    /// The time step a well-formed `code` matches at `now` (±[`SKEW_STEPS`]), if any.
    pub(crate) fn matching_step(&self, code: &str, now: u64) -> Option<u64> {
        // The crate computes `step * 30` for the step after `now`; near u64::MAX that
        // overflows, and no real clock gets there, so refuse instead.
        if now > u64::MAX - 2 * STEP_SECS {
            return None;
        }
        // Checked here too (the crate also checks) so the rule is visible and stays put.
        if code.len() != DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        self.0.check(code, now)
    }
}

/// Accept the code for the current step and ±1 step (clock skew). `now` injected (unix seconds).
///
/// Does not stop reuse within the window; the revive path should use [`TotpGuard`].
pub fn verify_code(secret: &TotpSecret, code: &str, now: u64) -> bool {
    secret.matching_step(code, now).is_some()
}

/// The code for the step containing `now` (for the CLI and tests).
pub fn code_at(secret: &TotpSecret, now: u64) -> String {
    secret.0.generate(now).to_string()
}

/// Refuse reuse of a code already accepted (RFC 6238 §5.2): remembers the last accepted
/// time step and accepts only later steps, so a code cannot be replayed within its window
/// and an older (but still in-skew) code cannot follow a newer one.
///
/// The kill switch persists [`TotpGuard::last_step`] with the kill state, so a code used
/// before a restart is refused after it too.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TotpGuard {
    last_step: Option<u64>,
}

impl TotpGuard {
    pub fn new() -> Self {
        Self::default()
    }

    /// A guard that already used `last_step` (read back from the state file).
    pub fn with_last_step(last_step: Option<u64>) -> Self {
        Self { last_step }
    }

    /// The last step accepted, to persist.
    pub fn last_step(&self) -> Option<u64> {
        self.last_step
    }

    pub fn accept(&mut self, secret: &TotpSecret, code: &str, now: u64) -> bool {
        let Some(step) = secret.matching_step(code, now) else {
            return false;
        };
        if self.last_step.is_some_and(|last| step <= last) {
            return false;
        }
        self.last_step = Some(step);
        true
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// RFC 6238 Appendix B SHA-1 seed, ASCII "12345678901234567890".
    const RFC_SEED: &[u8] = b"12345678901234567890";
    const RFC_SEED_B32: &str = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ";

    /// Appendix B SHA-1 rows (time, 8-digit TOTP); our codes are the last 6 digits.
    const RFC_VECTORS: &[(u64, &str)] = &[
        (59, "94287082"),
        (1111111109, "07081804"),
        (1111111111, "14050471"),
        (1234567890, "89005924"),
        (2000000000, "69279037"),
        (20000000000, "65353130"),
    ];

    fn rfc() -> TotpSecret {
        TotpSecret::from_bytes(RFC_SEED.to_vec()).unwrap()
    }

    #[test]
    fn rfc6238_appendix_b_sha1_last_six_digits() {
        let s = rfc();
        for (t, code8) in RFC_VECTORS {
            let want = &code8[2..];
            assert_eq!(code_at(&s, *t), want, "t={t}");
            assert!(verify_code(&s, want, *t), "t={t}");
        }
    }

    #[test]
    fn base32_parsing() {
        let s = TotpSecret::from_base32(RFC_SEED_B32).unwrap();
        assert_eq!(code_at(&s, 59), "287082");
        let messy = TotpSecret::from_base32("gezd gnbv-gy3t qojq gezd gnbv gy3t qojq==\n").unwrap();
        assert_eq!(code_at(&messy, 59), "287082");
        assert_eq!(
            TotpSecret::from_base32("not base32!").unwrap_err(),
            TotpError::BadBase32
        );
        assert_eq!(
            TotpSecret::from_base32("").unwrap_err(),
            TotpError::BadBase32
        );
        // 10 bytes: below the RFC 4226 minimum.
        assert_eq!(
            TotpSecret::from_base32("GEZDGNBVGY3TQOJQ").unwrap_err(),
            TotpError::TooShort
        );
    }

    #[test]
    fn debug_redacts() {
        assert_eq!(format!("{:?}", rfc()), "TotpSecret(<redacted>)");
    }

    #[test]
    fn wrong_code_refused() {
        let s = rfc();
        let good = code_at(&s, 59);
        let bad = if good == "000000" { "000001" } else { "000000" };
        assert!(!verify_code(&s, bad, 59));
    }

    #[test]
    fn skew_one_step_accepted_two_refused() {
        let s = rfc();
        let now = 1_700_000_000;
        assert!(verify_code(&s, &code_at(&s, now - STEP_SECS), now));
        assert!(verify_code(&s, &code_at(&s, now + STEP_SECS), now));
        let stale = code_at(&s, now - 2 * STEP_SECS);
        let early = code_at(&s, now + 2 * STEP_SECS);
        // Guard against a chance collision with an in-window code making the test vacuous.
        let window: Vec<String> = (0..3)
            .map(|i| code_at(&s, now - STEP_SECS + i * STEP_SECS))
            .collect();
        assert!(!window.contains(&stale) && !window.contains(&early));
        assert!(!verify_code(&s, &stale, now), "stale code accepted");
        assert!(!verify_code(&s, &early, now), "future code accepted");
    }

    #[test]
    fn malformed_codes_refused() {
        let s = rfc();
        let good = code_at(&s, 59);
        for code in [
            "",
            "28708",
            "2870820",
            "94287082",
            "28708a",
            "+87082",
            " 287082",
            "287082 ",
            "２８７０８２",
            &format!("{good}\n"),
        ] {
            assert!(!verify_code(&s, code, 59), "{code:?}");
        }
        assert!(verify_code(&s, &good, 59));
    }

    #[test]
    fn extreme_times_do_not_panic() {
        let s = rfc();
        let _ = code_at(&s, u64::MAX);
        assert!(!verify_code(&s, "000000", u64::MAX));
        assert!(!verify_code(&s, &code_at(&s, 0), u64::MAX));
        assert!(verify_code(&s, &code_at(&s, 0), 0));
    }

    #[test]
    fn guard_refuses_same_code_twice() {
        let s = rfc();
        let now = 1_700_000_000;
        let code = code_at(&s, now);
        let mut g = TotpGuard::new();
        assert!(g.accept(&s, &code, now));
        assert!(!g.accept(&s, &code, now), "same code accepted twice");
        assert!(!g.accept(&s, &code, now + 1));
    }

    #[test]
    fn guard_refuses_older_step_after_newer() {
        let s = rfc();
        let now = 1_700_000_000;
        let mut g = TotpGuard::new();
        assert!(g.accept(&s, &code_at(&s, now), now));
        assert!(!g.accept(&s, &code_at(&s, now - STEP_SECS), now));
        // The next step's code is fine.
        assert!(g.accept(&s, &code_at(&s, now + STEP_SECS), now + STEP_SECS));
    }

    #[test]
    fn guard_refuses_wrong_code_without_consuming() {
        let s = rfc();
        let now = 1_700_000_000;
        let mut g = TotpGuard::new();
        assert!(!g.accept(&s, "abcdef", now));
        assert!(g.accept(&s, &code_at(&s, now), now));
    }

    #[test]
    fn guard_read_back_refuses_what_it_used_before() {
        let s = rfc();
        let now = 1_700_000_000;
        let code = code_at(&s, now);
        let mut before = TotpGuard::new();
        assert!(before.accept(&s, &code, now));
        let mut after = TotpGuard::with_last_step(before.last_step());
        assert!(
            !after.accept(&s, &code, now + 5),
            "replayed across a restart"
        );
        assert!(after.accept(&s, &code_at(&s, now + STEP_SECS), now + STEP_SECS));
    }
}
