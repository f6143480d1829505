//! The inspect CA: an ECDSA P-256 certificate authority that can only sign for the names the
//! operator chose to inspect, and the leaves it mints per SNI.
//!
//! Owns `state_dir/ca/` (`ca.pem`, `ca.key`), the X.509 name constraints written into the CA
//! (DNS subtrees permitted, every IP address excluded, path length 0), and [`LeafCache`]:
//! short-lived leaves minted on demand, one key pair for all of them, cached in memory under a
//! count and a byte bound. A leaf for a name outside the constraints is never minted; and if
//! the key leaked, clients that check name constraints (OpenSSL, webpki) still refuse a leaf
//! forged for any other name. docs/inspect.md explains what the constraints guarantee.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    NameConstraints, PKCS_ECDSA_P256_SHA256, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

use crate::policy::DomainName;

/// The CA certificate's file in the CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA key's file in the CA directory (mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// The CA directory under `state_dir`.
pub const CA_DIR: &str = "ca";

/// How long a CA made by `ca init` is valid.
const CA_LIFETIME: Duration = Duration::days(5 * 365);
/// A leaf's whole validity, back-dating included: never more than a day.
pub const LEAF_LIFETIME: Duration = Duration::hours(24);
/// How far a leaf is back-dated, for agents whose clock is a little behind.
const LEAF_BACKDATE: Duration = Duration::hours(1);
/// A cached leaf is re-minted once it has less than this left.
const LEAF_RENEW_BEFORE: Duration = Duration::hours(1);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{0} already exists: a CA is created once (remove the directory to start over; agents must then trust the new certificate)"
    )]
    Exists(PathBuf),
    #[error(
        "{path} is readable by group or others (mode {mode:o}): run `chmod 600 {path}` (the key can sign for every inspected name)"
    )]
    KeyReadable { path: PathBuf, mode: u32 },
    #[error("nothing to permit: no agent has `inspect` patterns and no --permit was given")]
    NoPermits,
    #[error("`{0}` is not a domain name to permit")]
    BadPermit(String),
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("cannot read the CA certificate: {0}")]
    Parse(String),
    #[error("`{0}` is outside the CA's name constraints")]
    OutsideConstraints(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// The DNS subtree a name constraint must permit for a rules pattern: its base name (`*.x`,
/// `.x` and `x` all need the subtree `x`; a DNS name constraint cannot exclude the apex).
pub fn subtree_of(pattern: &crate::policy::DomainPattern) -> DomainName {
    pattern.base.clone()
}

/// True when `name` is in the DNS subtree `base` (RFC 5280 §4.2.1.10: `base` with zero or
/// more labels added on the left).
pub fn in_subtree(name: &str, base: &str) -> bool {
    name == base
        || name
            .strip_suffix(base)
            .is_some_and(|head| head.ends_with('.'))
}

/// The subtrees with every name covered by another one dropped, sorted.
fn minimal_subtrees(names: impl IntoIterator<Item = DomainName>) -> Vec<String> {
    let mut all: Vec<String> = names.into_iter().map(|n| n.as_str().to_owned()).collect();
    all.sort();
    all.dedup();
    let covered = |n: &String| all.iter().any(|b| b != n && in_subtree(n, b));
    let kept: Vec<String> = all.iter().filter(|n| !covered(n)).cloned().collect();
    kept
}

/// What `ca init` made or `ca show` found: the certificate and what it may sign.
#[derive(Debug, Clone)]
pub struct CaSummary {
    pub cert_pem: String,
    /// DNS subtrees the CA may sign for.
    pub permitted: Vec<String>,
    pub not_after: OffsetDateTime,
}

/// Create the CA in `dir` (`state_dir/ca`), permitting exactly the DNS subtrees of `names`.
/// Refuses to overwrite an existing CA.
pub fn init(
    dir: &Path,
    names: impl IntoIterator<Item = DomainName>,
    now: OffsetDateTime,
) -> Result<CaSummary, CaError> {
    let permitted = minimal_subtrees(names);
    if permitted.is_empty() {
        return Err(CaError::NoPermits);
    }
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(CaError::Exists(p.clone()));
        }
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CaError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "portcullis inspect CA");
    dn.push(DnType::OrganizationName, "portcullis");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - Duration::hours(1);
    params.not_after = now + CA_LIFETIME;
    params.serial_number = Some(random_serial()?);
    params.name_constraints = Some(NameConstraints {
        permitted_subtrees: permitted
            .iter()
            .map(|n| GeneralSubtree::DnsName(n.clone()))
            .collect(),
        // No leaf for an address: a DNS-only permit leaves IP SANs unconstrained otherwise.
        excluded_subtrees: vec![
            GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
            GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
        ],
    });
    let cert = params.self_signed(&key)?;

    // The key first, created 0600 and never overwritten; then the certificate.
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(io(&key_path))?;
    f.write_all(key.serialize_pem().as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io(&key_path))?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&cert_path)
        .map_err(io(&cert_path))?;
    f.write_all(cert.pem().as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io(&cert_path))?;
    Ok(CaSummary {
        cert_pem: cert.pem(),
        permitted,
        not_after: params.not_after,
    })
}

/// Read the CA certificate of `dir` and the subtrees it permits (no key needed).
pub fn show(dir: &Path) -> Result<CaSummary, CaError> {
    let path = dir.join(CA_CERT_FILE);
    let cert_pem = std::fs::read_to_string(&path).map_err(|source| CaError::Io {
        path: path.clone(),
        source,
    })?;
    let (permitted, not_after) = read_constraints(&cert_pem)?;
    Ok(CaSummary {
        cert_pem,
        permitted,
        not_after,
    })
}

/// The permitted DNS subtrees and the end of validity of a PEM CA certificate.
fn read_constraints(cert_pem: &str) -> Result<(Vec<String>, OffsetDateTime), CaError> {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| CaError::Parse(e.to_string()))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| CaError::Parse(e.to_string()))?;
    let mut permitted = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::NameConstraints(nc) = ext.parsed_extension() {
            for sub in nc.permitted_subtrees.iter().flatten() {
                if let GeneralName::DNSName(n) = sub.base {
                    permitted.push(n.to_ascii_lowercase());
                }
            }
        }
    }
    Ok((permitted, cert.validity().not_after.to_datetime()))
}

fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| CaError::Tls(rustls::Error::FailedToGetRandomBytes))?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// The loaded CA: its issuer, its certificate and constraints, and the one leaf key.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    permitted: Vec<String>,
    leaf_key: KeyPair,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("permitted", &self.permitted)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Load `dir/ca.pem` and `dir/ca.key`; a key readable by group or others is refused.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CaError::Io { path, source }
        };
        let key_file = File::open(&key_path).map_err(io(&key_path))?;
        let mode = key_file
            .metadata()
            .map_err(io(&key_path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(CaError::KeyReadable {
                path: key_path,
                mode: mode & 0o777,
            });
        }
        let key_pem = std::io::read_to_string(key_file).map_err(io(&key_path))?;
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        Self::from_pem(&cert_pem, &key_pem)
    }

    /// The CA from its certificate and key in PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem)?;
        let (permitted, _) = read_constraints(cert_pem)?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|e| CaError::Parse(e.to_string()))?;
        let cert_der = CertificateDer::from(pem.contents.clone());
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(Self {
            issuer,
            cert_der,
            permitted,
            leaf_key: KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?,
        })
    }

    /// The DNS subtrees the CA may sign for.
    pub fn permitted(&self) -> &[String] {
        &self.permitted
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// True when a leaf for `name` is inside the CA's name constraints.
    pub fn permits(&self, name: &str) -> bool {
        self.permitted.iter().any(|b| in_subtree(name, b))
    }

    /// Mint a leaf for `name`, valid from an hour ago for [`LEAF_LIFETIME`] in all.
    pub fn mint(&self, name: &DomainName, now: OffsetDateTime) -> Result<Leaf, CaError> {
        if !self.permits(name.as_str()) {
            return Err(CaError::OutsideConstraints(name.to_string()));
        }
        self.mint_unchecked(name.as_str(), now)
    }

    /// Mint without the constraint check: what a stolen key could do (tests forge with it).
    #[doc(hidden)]
    pub fn mint_unchecked(&self, name: &str, now: OffsetDateTime) -> Result<Leaf, CaError> {
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - LEAF_BACKDATE;
        params.not_after = params.not_before + LEAF_LIFETIME;
        params.serial_number = Some(random_serial()?);
        let cert = params.signed_by(&self.leaf_key, &self.issuer)?;
        Ok(Leaf {
            chain: vec![cert.der().clone(), self.cert_der.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.serialize_der())),
            not_after: params.not_after,
        })
    }
}

/// A minted leaf: the chain (leaf, CA) and the shared leaf key.
pub struct Leaf {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_after: OffsetDateTime,
}

impl Leaf {
    pub fn pem(&self) -> String {
        self.chain
            .iter()
            .map(|c| pem_of("CERTIFICATE", c.as_ref()))
            .collect()
    }
}

/// PEM text of one DER object.
pub fn pem_of(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Bounds of the leaf cache.
#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    pub max_entries: usize,
    pub max_bytes: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self {
            max_entries: 1024,
            max_bytes: 4 << 20,
        }
    }
}

struct Cached {
    config: Arc<rustls::ServerConfig>,
    not_after: OffsetDateTime,
    bytes: usize,
}

#[derive(Default)]
struct CacheState {
    map: HashMap<Box<str>, Cached>,
    /// Insertion order, oldest first: what is evicted when a bound is reached.
    order: VecDeque<Box<str>>,
    bytes: usize,
}

/// TLS server configurations with a minted leaf, per name, bounded by count and bytes.
pub struct LeafCache {
    ca: Arc<CertificateAuthority>,
    limits: CacheLimits,
    alpn: Vec<Vec<u8>>,
    state: Mutex<CacheState>,
}

impl LeafCache {
    pub fn new(ca: Arc<CertificateAuthority>, limits: CacheLimits, alpn: Vec<Vec<u8>>) -> Self {
        Self {
            ca,
            limits,
            alpn,
            state: Mutex::default(),
        }
    }

    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// The server configuration for `name`: cached while its leaf has more than an hour
    /// left, minted otherwise.
    pub fn server_config(
        &self,
        name: &DomainName,
        now: OffsetDateTime,
    ) -> Result<Arc<rustls::ServerConfig>, CaError> {
        if let Some(c) = self.lock().map.get(name.as_str())
            && c.not_after - LEAF_RENEW_BEFORE > now
        {
            return Ok(c.config.clone());
        }
        let leaf = self.ca.mint(name, now)?;
        let bytes = name.as_str().len()
            + leaf.chain.iter().map(|c| c.len()).sum::<usize>()
            + leaf.key.secret_der().len();
        let not_after = leaf.not_after;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(leaf.chain, leaf.key)?;
        config.alpn_protocols = self.alpn.clone();
        let config = Arc::new(config);
        let mut st = self.lock();
        if let Some(old) = st.map.remove(name.as_str()) {
            st.bytes -= old.bytes;
            st.order.retain(|n| &**n != name.as_str());
        }
        while !st.order.is_empty()
            && (st.map.len() + 1 > self.limits.max_entries
                || st.bytes + bytes > self.limits.max_bytes)
        {
            if let Some(oldest) = st.order.pop_front()
                && let Some(old) = st.map.remove(&oldest)
            {
                st.bytes -= old.bytes;
            }
        }
        if bytes <= self.limits.max_bytes && self.limits.max_entries > 0 {
            let key: Box<str> = name.as_str().into();
            st.order.push_back(key.clone());
            st.bytes += bytes;
            st.map.insert(
                key,
                Cached {
                    config: config.clone(),
                    not_after,
                    bytes,
                },
            );
        }
        Ok(config)
    }

    /// Entries and bytes held (for tests and metrics).
    pub fn usage(&self) -> (usize, usize) {
        let st = self.lock();
        (st.map.len(), st.bytes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn name(s: &str) -> DomainName {
        DomainName::parse(s).unwrap()
    }

    #[test]
    fn subtrees() {
        assert!(in_subtree("api.github.com", "github.com"));
        assert!(in_subtree("github.com", "github.com"));
        assert!(!in_subtree("evilgithub.com", "github.com"));
        assert!(!in_subtree("github.com.evil.test", "github.com"));
        assert_eq!(
            minimal_subtrees([
                name("api.github.com"),
                name("github.com"),
                name("openai.com")
            ]),
            ["github.com", "openai.com"]
        );
    }

    #[test]
    fn init_writes_a_private_key_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let now = OffsetDateTime::now_utc();
        let s = init(&ca_dir, [name("api.github.com"), name("openai.com")], now).unwrap();
        assert_eq!(s.permitted, ["api.github.com", "openai.com"]);
        let mode = std::fs::metadata(ca_dir.join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            init(&ca_dir, [name("x.test")], now),
            Err(CaError::Exists(_))
        ));
        assert!(matches!(
            init(&dir.path().join("other"), [], now),
            Err(CaError::NoPermits)
        ));
        let shown = show(&ca_dir).unwrap();
        assert_eq!(shown.permitted, s.permitted);
        assert_eq!(shown.cert_pem, s.cert_pem);
        // Loads while private; refused once group or others may read the key.
        let ca = CertificateAuthority::load(&ca_dir).unwrap();
        assert!(ca.permits("api.github.com") && ca.permits("chat.openai.com"));
        assert!(!ca.permits("github.com") && !ca.permits("example.org"));
        for bad in [0o640, 0o604] {
            std::fs::set_permissions(
                ca_dir.join(CA_KEY_FILE),
                std::fs::Permissions::from_mode(bad),
            )
            .unwrap();
            assert!(matches!(
                CertificateAuthority::load(&ca_dir),
                Err(CaError::KeyReadable { .. })
            ));
        }
    }

    #[test]
    fn mint_refuses_names_outside_the_constraints_and_caches_within_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        init(dir.path(), [name("inspected.test")], now).unwrap();
        let ca = Arc::new(CertificateAuthority::load(dir.path()).unwrap());
        assert!(matches!(
            ca.mint(&name("example.org"), now),
            Err(CaError::OutsideConstraints(_))
        ));
        let leaf = ca.mint(&name("a.inspected.test"), now).unwrap();
        assert!(leaf.not_after - (now - LEAF_BACKDATE) <= LEAF_LIFETIME);
        let cache = LeafCache::new(
            ca.clone(),
            CacheLimits {
                max_entries: 3,
                max_bytes: 1 << 20,
            },
            vec![],
        );
        let first = cache.server_config(&name("a.inspected.test"), now).unwrap();
        let again = cache.server_config(&name("a.inspected.test"), now).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        // Near the end of its life, the leaf is minted anew.
        let later = cache
            .server_config(&name("a.inspected.test"), now + Duration::hours(23))
            .unwrap();
        assert!(!Arc::ptr_eq(&first, &later));
        for i in 0..10 {
            cache
                .server_config(&name(&format!("n{i}.inspected.test")), now)
                .unwrap();
        }
        let (entries, bytes) = cache.usage();
        assert_eq!(entries, 3);
        // A byte bound smaller than three leaves holds fewer.
        let small = LeafCache::new(
            ca,
            CacheLimits {
                max_entries: 100,
                max_bytes: bytes * 2 / 3 + 40,
            },
            vec![],
        );
        for i in 0..10 {
            small
                .server_config(&name(&format!("n{i}.inspected.test")), now)
                .unwrap();
        }
        let (entries, held) = small.usage();
        assert!(
            entries == 2 && held <= bytes * 2 / 3 + 40,
            "{entries} {held}"
        );
    }
}
