//! Proxy credentials as the rules give them: an argon2id PHC string (`password_hash`), or
//! the unsalted SHA-256 of earlier rules files (`password_sha256`, still accepted; `check`
//! warns). Verification is pure but not always cheap: argon2id costs what its parameters
//! say (milliseconds and megabytes), so the explicit proxy runs it off the async workers,
//! a bounded number at a time (`proxy::auth`).

use std::fmt;
use std::sync::Arc;

use argon2::{Argon2, Params};
use password_hash::PasswordVerifier;
use password_hash::phc::PasswordHash;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Proxy credentials: the username, and a way to check a password (never the password).
#[derive(Debug, Clone)]
pub struct Credentials {
    pub username: String,
    pub password: PasswordCheck,
}

/// How a presented password is checked.
#[derive(Clone)]
pub enum PasswordCheck {
    /// `password_sha256`: unsalted, fast, crackable offline from the rules file.
    Sha256([u8; 32]),
    /// `password_hash`: an argon2id PHC string, parsed and checked when the rules compiled.
    Argon2id(Arc<PasswordHash>),
}

impl fmt::Debug for PasswordCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PasswordCheck::Sha256(_) => f.write_str("Sha256(…)"),
            PasswordCheck::Argon2id(h) => write!(f, "Argon2id({})", h.params),
        }
    }
}

impl PasswordCheck {
    /// Whether `password` is the one. Constant time in the password's value for SHA-256
    /// (digest, then a constant-time comparison) and for argon2id (the hash costs the same
    /// for every input; the comparison of outputs is constant-time). An argon2id check
    /// costs what the hash's parameters say: never call it on an async worker.
    pub fn verify(&self, password: &[u8]) -> bool {
        match self {
            PasswordCheck::Sha256(expected) => {
                let digest: [u8; 32] = Sha256::digest(password).into();
                bool::from(digest.ct_eq(expected))
            }
            PasswordCheck::Argon2id(hash) => Argon2::default()
                .verify_password(password, hash.as_ref())
                .is_ok(),
        }
    }

    /// Whether a check costs more than a hash of the password (then it goes to the
    /// blocking pool, under the verification limit).
    pub fn is_costly(&self) -> bool {
        matches!(self, PasswordCheck::Argon2id(_))
    }
}

/// The most memory one verification may take, in KiB (m): 256 MiB. Verifications run a
/// bounded number at a time, so this bounds what they can hold together.
pub(crate) const MAX_M_COST_KIB: u32 = 256 * 1024;
/// The most passes (t) one verification may take.
pub(crate) const MAX_T_COST: u32 = 16;
/// The most lanes (p): the gateway verifies on one thread, p only multiplies the work.
pub(crate) const MAX_P_COST: u32 = 8;
/// OWASP's lowest recommended argon2id cost: m = 19 MiB with t = 2 (or more memory with
/// fewer passes, the same product). Below it, `check` warns.
pub(crate) const RECOMMENDED_M_COST_KIB: u32 = 19 * 1024;
pub(crate) const RECOMMENDED_M_TIMES_T: u64 = 2 * 19 * 1024;

/// Why a `password_hash` is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HashError {
    #[error("not a PHC string ($argon2id$v=19$m=…,t=…,p=…$salt$hash): {0}")]
    NotPhc(String),
    #[error("`{0}`: only argon2id is accepted")]
    Algorithm(String),
    #[error("the PHC string has no salt or no hash")]
    Incomplete,
    #[error("parameters: {0}")]
    Params(String),
    #[error(
        "m={m} KiB, t={t}, p={p} costs more than one verification may (m <= {MAX_M_COST_KIB}, t <= {MAX_T_COST}, p <= {MAX_P_COST})"
    )]
    TooCostly { m: u32, t: u32, p: u32 },
}

/// A parsed `password_hash`, and whether its cost is below the recommended one.
#[derive(Debug)]
pub(crate) struct ParsedHash {
    pub check: PasswordCheck,
    pub weak: Option<String>,
}

/// Parse and check an argon2id PHC string.
pub(crate) fn parse_argon2id(s: &str) -> Result<ParsedHash, HashError> {
    let hash = PasswordHash::new(s.trim()).map_err(|e| HashError::NotPhc(e.to_string()))?;
    if hash.algorithm.as_str() != "argon2id" {
        return Err(HashError::Algorithm(hash.algorithm.as_str().to_owned()));
    }
    if hash.salt.is_none() || hash.hash.is_none() {
        return Err(HashError::Incomplete);
    }
    let params = Params::try_from(&hash).map_err(|e| HashError::Params(e.to_string()))?;
    let (m, t, p) = (params.m_cost(), params.t_cost(), params.p_cost());
    if m > MAX_M_COST_KIB || t > MAX_T_COST || p > MAX_P_COST {
        return Err(HashError::TooCostly { m, t, p });
    }
    let weak = (m < RECOMMENDED_M_COST_KIB || u64::from(m) * u64::from(t) < RECOMMENDED_M_TIMES_T)
        .then(|| {
            format!(
                "argon2id cost m={m} KiB, t={t} is below the recommended m=19456, t=2: cheap to guess offline if the rules leak"
            )
        });
    Ok(ParsedHash {
        check: PasswordCheck::Argon2id(Arc::new(hash)),
        weak,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use password_hash::CustomizedPasswordHasher;

    /// A low-cost argon2id PHC string for `password` (tests only).
    pub(crate) fn cheap_hash(password: &str) -> String {
        let params = Params::new(64, 1, 1, None).unwrap();
        Argon2::default()
            .hash_password_with_params(password.as_bytes(), b"portcullis-salt", params)
            .unwrap()
            .to_string()
    }

    #[test]
    fn argon2id_verifies_the_password_and_nothing_else() {
        let parsed = parse_argon2id(&cheap_hash("s3cret")).unwrap();
        assert!(parsed.check.is_costly());
        assert!(parsed.weak.is_some(), "m=64 is below the recommended cost");
        assert!(parsed.check.verify(b"s3cret"));
        for wrong in ["s3cret ", "S3cret", "", "s3cre", "s3cret\0"] {
            assert!(!parsed.check.verify(wrong.as_bytes()), "{wrong:?}");
        }
    }

    #[test]
    fn sha256_still_verifies() {
        let check = PasswordCheck::Sha256(Sha256::digest(b"s3cret").into());
        assert!(!check.is_costly());
        assert!(check.verify(b"s3cret"));
        assert!(!check.verify(b"s3cret2"));
    }

    #[test]
    fn bad_hashes_are_refused() {
        let good = cheap_hash("x");
        let argon2i = good.replacen("$argon2id$", "$argon2i$", 1);
        assert!(matches!(
            parse_argon2id(&argon2i),
            Err(HashError::Algorithm(a)) if a == "argon2i"
        ));
        assert!(matches!(
            parse_argon2id("5e884898da28047151d0e56f8dc62927"),
            Err(HashError::NotPhc(_))
        ));
        let costly = good.replacen("m=64", "m=1048576", 1);
        assert!(matches!(
            parse_argon2id(&costly),
            Err(HashError::TooCostly { m: 1_048_576, .. })
        ));
        let no_hash = good.rsplit_once('$').unwrap().0.to_owned();
        assert!(parse_argon2id(&no_hash).is_err());
        // The recommended cost passes without a warning.
        let strong = good.replacen("m=64,t=1", "m=19456,t=2", 1);
        assert!(parse_argon2id(&strong).unwrap().weak.is_none());
    }
}
