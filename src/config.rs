//! `portcullis.toml`: the process configuration (docs/configuration.md; every key in
//! deploy/portcullis.toml).
//!
//! Owns the raw serde structs (unknown keys are errors, every key has a default) and their
//! compilation into [`Config`], one
//! section struct per table of the file. Every value the file sets keeps its position
//! ([`At`]), so each error is reported at the line that caused it, and every error of a
//! file is reported, not only the first. Relative paths are resolved against the config
//! file's directory (the working directory for the built-in default). Rules are not read
//! here: see `policy`.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::{Deref, Range};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use hickory_proto::rr::RecordType;
use serde::{Deserialize, Deserializer};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::policy::rules::{SourceError, SourceFile};
use crate::sys::Interception;

// --- the file as written ---

/// A value and where the file set it; `span` is `None` for a default the file left out.
#[derive(Debug, Clone, PartialEq, Eq)]
struct At<T> {
    value: T,
    span: Option<Range<usize>>,
}

impl<T> At<T> {
    fn default_value(value: T) -> Self {
        Self { value, span: None }
    }
}

impl<T: Default> Default for At<T> {
    fn default() -> Self {
        Self::default_value(T::default())
    }
}

impl<T> Deref for At<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for At<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Spanned::<T>::deserialize(d)?;
        let span = s.span();
        Ok(Self {
            value: s.into_inner(),
            span: Some(span),
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    rules_dir: At<PathBuf>,
    state_dir: At<PathBuf>,
    default_ports: At<Vec<u16>>,
    listen: RawListen,
    transparent: RawTransparent,
    nftables: RawNftables,
    kill_switch: RawKillSwitch,
    budgets: RawBudgets,
    log: RawLog,
    resolver: RawResolver,
    timeouts: RawTimeouts,
    caps: RawCaps,
    dns: RawDns,
    admin: RawAdmin,
    auth: RawAuth,
    inspect: RawInspect,
    cluster: RawCluster,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            rules_dir: At::default_value(PathBuf::from("rules")),
            state_dir: At::default_value(PathBuf::from("state")),
            default_ports: At::default_value(vec![80, 443]),
            listen: RawListen::default(),
            transparent: RawTransparent::default(),
            nftables: RawNftables::default(),
            kill_switch: RawKillSwitch::default(),
            budgets: RawBudgets::default(),
            log: RawLog::default(),
            resolver: RawResolver::default(),
            timeouts: RawTimeouts::default(),
            caps: RawCaps::default(),
            dns: RawDns::default(),
            admin: RawAdmin::default(),
            auth: RawAuth::default(),
            inspect: RawInspect::default(),
            cluster: RawCluster::default(),
        }
    }
}

/// The explicit proxy of the built-in default config (a config file has none unless it
/// names one).
const BUILTIN_EXPLICIT: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 3128);

/// `[inspect]`: how inspected connections reach their upstreams (docs/inspect.md).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawInspect {
    /// The PEM bundle upstream certificates are verified against (the OS store).
    upstream_roots: PathBuf,
    /// Per-host CA files (internal services): for that host, this CA alone is trusted.
    upstream_ca_files: std::collections::BTreeMap<String, PathBuf>,
    /// Log the query string of inspected requests (off: it may carry secrets).
    log_query: bool,
}

impl Default for RawInspect {
    fn default() -> Self {
        Self {
            upstream_roots: PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
            upstream_ca_files: std::collections::BTreeMap::new(),
            log_query: false,
        }
    }
}

/// `[inspect]`, compiled: paths resolved, host names lower-case.
#[derive(Debug, Clone)]
pub struct InspectSettings {
    pub upstream_roots: PathBuf,
    pub upstream_ca_files: Vec<(String, PathBuf)>,
    pub log_query: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawListen {
    /// Off unless the file names an address: a gateway opens no port it was not asked for.
    explicit: Listener,
    admin: Listener,
    /// Where nftables sends the agents' TCP 80/443 (none by default).
    transparent: Vec<SocketAddr>,
    /// DNS forwarder, UDP and TCP on each address (none by default).
    dns: Vec<SocketAddr>,
    /// The accept queue of every TCP listener.
    backlog: At<u32>,
}

impl Default for RawListen {
    fn default() -> Self {
        Self {
            explicit: Listener(None),
            admin: Listener(Some(SocketAddr::from(([127, 0, 0, 1], 9090)))),
            transparent: Vec::new(),
            dns: Vec::new(),
            backlog: At::default_value(4096),
        }
    }
}

/// A listener address, or off: `""` or `false`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Listener(Option<SocketAddr>);

impl<'de> Deserialize<'de> for Listener {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Listener;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an address \"ip:port\", or \"\" or false for off")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Listener, E> {
                if v {
                    Err(E::custom(
                        "`true` names no address: give \"ip:port\" (or false for off)",
                    ))
                } else {
                    Ok(Listener(None))
                }
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Listener, E> {
                if v.is_empty() {
                    return Ok(Listener(None));
                }
                v.parse()
                    .map(|a| Listener(Some(a)))
                    .map_err(|_| E::custom(format!("`{v}` is not an address \"ip:port\"")))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `transparent.interception` as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawInterception {
    /// nftables NAT redirect; the original destination comes from SO_ORIGINAL_DST.
    Redirect,
    /// nftables TPROXY; the socket's local address is the original destination.
    Tproxy,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTransparent {
    interception: RawInterception,
    /// Original destination ports whose first bytes must be a TLS ClientHello.
    tls_ports: At<Vec<u16>>,
    /// Original destination ports whose first bytes must be an HTTP/1.x request head.
    http_ports: At<Vec<u16>>,
}

impl Default for RawTransparent {
    fn default() -> Self {
        Self {
            interception: RawInterception::Redirect,
            tls_ports: At::default_value(vec![443]),
            http_ports: At::default_value(vec![80]),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawNftables {
    /// Interfaces the agents' traffic arrives on (e.g. "vlan66").
    agent_interfaces: Vec<String>,
    /// Agent networks; empty means every agent's `sources` from the rules.
    agent_networks: Vec<At<String>>,
    /// Intercept agents' IPv6 like IPv4 (true) or drop it all (false).
    ipv6: bool,
    /// fwmark for TPROXY's policy routing.
    tproxy_mark: u32,
}

impl Default for RawNftables {
    fn default() -> Self {
        Self {
            agent_interfaces: Vec::new(),
            agent_networks: Vec::new(),
            ipv6: false,
            tproxy_mark: 1,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawBudgets {
    /// Hour (UTC, 0-23) at which daily byte budgets start over.
    reset_hour_utc: At<u8>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawKillSwitch {
    /// Files holding one Standard Webhooks secret each (`whsec_…`); several = rotation.
    webhook_secret_files: Vec<PathBuf>,
    /// File holding the base32 TOTP secret that `/v1/revive` requires.
    totp_secret_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    /// `"stdout"` or a file path (appended to).
    destination: At<String>,
    /// The service's own log (tracing, on stderr): lines for people or JSON objects.
    format: LogFormat,
    /// Lines buffered between the data path and the writer; beyond it lines are dropped
    /// and counted, never waited for.
    queue: At<usize>,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            destination: At::default_value("stdout".into()),
            format: LogFormat::Text,
            queue: At::default_value(65_536),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawResolver {
    /// Upstream DNS servers as `ip` or `ip:port`; empty means the system's resolv.conf.
    upstreams: Vec<At<String>>,
    timeout_ms: At<u64>,
}

impl Default for RawResolver {
    fn default() -> Self {
        Self {
            upstreams: Vec::new(),
            timeout_ms: At::default_value(2_000),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTimeouts {
    /// Agent must send its request head / ClientHello within this.
    handshake_ms: At<u64>,
    connect_ms: At<u64>,
    idle_secs: At<u64>,
    /// On SIGTERM, how long live connections may drain before they are cut.
    drain_secs: u64,
}

impl Default for RawTimeouts {
    fn default() -> Self {
        Self {
            handshake_ms: At::default_value(5_000),
            connect_ms: At::default_value(5_000),
            idle_secs: At::default_value(300),
            drain_secs: 10,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawCaps {
    max_connections: At<usize>,
    max_connections_per_source: At<usize>,
    /// One agent's share of `max_connections` (all its source addresses together).
    max_connections_per_agent: At<usize>,
    /// Connections from addresses that are no agent's source, together (Basic-auth agents
    /// connecting from elsewhere count here).
    max_connections_unknown: At<usize>,
    max_request_head_bytes: At<usize>,
    /// Bytes all connections together may hold in hellos and request heads not yet
    /// complete, beyond 4 KiB each.
    max_handshake_bytes: usize,
}

impl Default for RawCaps {
    fn default() -> Self {
        Self {
            max_connections: At::default_value(16_384),
            max_connections_per_source: At::default_value(1_024),
            max_connections_per_agent: At::default_value(4_096),
            max_connections_unknown: At::default_value(512),
            max_request_head_bytes: At::default_value(16 * 1024),
            max_handshake_bytes: 64 * 1024 * 1024,
        }
    }
}

/// `[admin]`: the management API's own bounds, and the local control socket.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    /// Connections the admin listener holds at once; beyond it new ones are closed at once.
    max_connections: At<usize>,
    /// A request head must arrive within this.
    header_timeout_ms: u64,
    /// A request body must arrive within this.
    body_timeout_ms: u64,
    /// No admin connection lives longer than this, keep-alive or not.
    connection_timeout_ms: u64,
    /// When set, `GET /metrics` needs `Authorization: Bearer <the file's content>`.
    metrics_token_file: Option<PathBuf>,
    /// The local control socket (`portcullis kill`, `revive`, `status`, `unlock-revive`,
    /// `reload` on the gateway itself), relative to `state_dir`; "" turns it off.
    control_socket: PathBuf,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            max_connections: At::default_value(64),
            header_timeout_ms: 5_000,
            body_timeout_ms: 5_000,
            connection_timeout_ms: 30_000,
            metrics_token_file: None,
            control_socket: PathBuf::from("control.sock"),
        }
    }
}

/// `[auth]`: proxy Basic-auth verification and guessing back-off (src/proxy/auth.rs).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAuth {
    /// Failed attempts a source gets before its back-off starts.
    free_failures: At<u32>,
    /// The first back-off; each further failure doubles it, up to `backoff_max_ms`.
    backoff_initial_ms: At<u64>,
    backoff_max_ms: At<u64>,
    /// A source's failures are forgotten this long after its last one.
    forget_after_secs: At<u64>,
    /// Sources tracked at once (a fixed table: a flood of sources evicts, never grows it).
    tracked_sources: At<usize>,
    /// A verified (username, password) is trusted again for this long without verifying.
    cache_secs: u64,
    /// Verified credentials kept at most.
    cache_entries: At<usize>,
    /// argon2id verifications run at once (each on a blocking thread); beyond, 407 at once.
    max_concurrent_verifications: At<usize>,
}

impl Default for RawAuth {
    fn default() -> Self {
        Self {
            free_failures: At::default_value(5),
            backoff_initial_ms: At::default_value(1_000),
            backoff_max_ms: At::default_value(60_000),
            forget_after_secs: At::default_value(900),
            tracked_sources: At::default_value(4_096),
            cache_secs: 300,
            cache_entries: At::default_value(1_024),
            max_concurrent_verifications: At::default_value(2),
        }
    }
}

/// `dns.refuse_with` as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RefuseWith {
    Refused,
    Nxdomain,
}

/// `[dns]`: the filtering DNS forwarder (src/dns/).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDns {
    /// What a name the agent may not reach gets.
    refuse_with: RefuseWith,
    /// Query types answered for allowed names; every other type is refused.
    allowed_types: Vec<At<String>>,
    /// Per-agent queries per second; bursts of twice this are absorbed.
    queries_per_second: At<u32>,
    /// Cached answers live at most this long, whatever their TTL says.
    max_ttl_secs: At<u32>,
    /// (name, type) pairs kept in the response cache; 0 disables it.
    cache_entries: usize,
    /// Bytes the response cache may hold (estimated); no answer over an eighth of it.
    cache_bytes: usize,
    /// A TCP connection with no query for this long is closed.
    tcp_idle_secs: At<u64>,
}

impl Default for RawDns {
    fn default() -> Self {
        Self {
            // Same client behaviour as REFUSED, half the queries, and an error no
            // client calls temporary (docs/dns.md has the measurements).
            refuse_with: RefuseWith::Nxdomain,
            allowed_types: ["A", "AAAA", "CNAME", "HTTPS", "SVCB"]
                .map(|t| At::default_value(t.to_owned()))
                .to_vec(),
            queries_per_second: At::default_value(100),
            max_ttl_secs: At::default_value(300),
            cache_entries: 10_000,
            cache_bytes: 8 * 1024 * 1024,
            tcp_idle_secs: At::default_value(10),
        }
    }
}

// --- the compiled sections ---

/// `[listen]`: the sockets the gateway serves.
#[derive(Debug, Clone)]
pub struct ListenSettings {
    /// The accept queue of every TCP listener.
    pub backlog: u32,
    /// The explicit proxy; `None` when off.
    pub explicit: Option<SocketAddr>,
    /// The admin API; `None` when off.
    pub admin: Option<SocketAddr>,
    /// Where nftables sends the agents' intercepted TCP.
    pub transparent: Vec<SocketAddr>,
    /// DNS forwarder addresses (UDP and TCP each).
    pub dns: Vec<SocketAddr>,
}

/// `[transparent]`: how intercepted connections arrive and what they must start with.
#[derive(Debug, Clone)]
pub struct TransparentSettings {
    pub interception: Interception,
    pub tls_ports: Vec<u16>,
    pub http_ports: Vec<u16>,
}

/// `[nftables]`: the ruleset the gateway renders and keeps its kill sets in.
#[derive(Debug, Clone)]
pub struct NftSettings {
    pub agent_interfaces: Vec<String>,
    pub agent_networks: Vec<ipnet::IpNet>,
    pub ipv6: bool,
    pub tproxy_mark: u32,
}

/// `[budgets]`.
#[derive(Debug, Clone)]
pub struct BudgetSettings {
    pub reset_hour_utc: u8,
}

/// `[kill_switch]`: the secrets the signed kill and the TOTP revive are checked against.
#[derive(Debug, Clone)]
pub struct KillSwitchSettings {
    pub webhook_secret_files: Vec<PathBuf>,
    pub totp_secret_file: Option<PathBuf>,
}

/// Where connection log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogDestination {
    Stdout,
    File(PathBuf),
}

/// `log.format`: how the service's own log (startup, warnings, errors; not the
/// connection log) is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line per event for people; coloured only on a terminal.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`: the connection log, and the format of the service's own log.
#[derive(Debug, Clone)]
pub struct LogSettings {
    pub destination: LogDestination,
    pub format: LogFormat,
    pub queue: usize,
}

/// `[resolver]`: the upstream DNS the proxy resolves names with.
#[derive(Debug, Clone)]
pub struct ResolverSettings {
    /// Empty: the system's resolv.conf.
    pub upstreams: Vec<SocketAddr>,
    pub timeout: Duration,
}

/// `[timeouts]`.
#[derive(Debug, Clone)]
pub struct Timeouts {
    /// The agent's request head or ClientHello must arrive within this.
    pub handshake: Duration,
    pub connect: Duration,
    pub idle: Duration,
    /// On SIGTERM, how long live connections may drain before they are cut.
    pub drain: Duration,
}

/// `[caps]`: connection and memory bounds of the proxy listeners.
#[derive(Debug, Clone)]
pub struct Caps {
    pub max_connections: usize,
    pub max_connections_per_source: usize,
    pub max_connections_per_agent: usize,
    pub max_connections_unknown: usize,
    pub max_request_head_bytes: usize,
    pub max_handshake_bytes: usize,
}

/// The admin listener's bounds and the control socket (`[admin]`).
#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub connection_timeout: Duration,
    pub metrics_token_file: Option<PathBuf>,
    /// As configured (relative to `state_dir`), `None` when turned off: use
    /// [`Config::control_socket`].
    pub control_socket: Option<PathBuf>,
}

/// The validated `[auth]` section (docs/proxy-auth.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSettings {
    pub free_failures: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub forget_after: Duration,
    pub tracked_sources: usize,
    pub cache_ttl: Duration,
    pub cache_entries: usize,
    pub max_concurrent_verifications: usize,
}

impl Default for AuthSettings {
    fn default() -> Self {
        auth_settings(&RawAuth::default())
    }
}

fn auth_settings(raw: &RawAuth) -> AuthSettings {
    AuthSettings {
        free_failures: *raw.free_failures,
        backoff_initial: Duration::from_millis(*raw.backoff_initial_ms),
        backoff_max: Duration::from_millis(*raw.backoff_max_ms),
        forget_after: Duration::from_secs(*raw.forget_after_secs),
        tracked_sources: *raw.tracked_sources,
        cache_ttl: Duration::from_secs(raw.cache_secs),
        cache_entries: *raw.cache_entries,
        max_concurrent_verifications: *raw.max_concurrent_verifications,
    }
}

/// The validated `[dns]` section.
#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// Answer NXDOMAIN instead of REFUSED for names the agent may not reach.
    pub refuse_with_nxdomain: bool,
    /// Query type codes answered for allowed names.
    pub allowed_types: Vec<u16>,
    pub queries_per_second: u32,
    pub max_ttl: Duration,
    pub cache_entries: usize,
    pub cache_bytes: usize,
    pub tcp_idle: Duration,
}

/// The validated process configuration: the top-level keys, then one struct per section.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from; `None` for the built-in default.
    pub source: Option<PathBuf>,
    pub rules_dir: PathBuf,
    pub state_dir: PathBuf,
    pub default_ports: Vec<u16>,
    pub listen: ListenSettings,
    pub transparent: TransparentSettings,
    pub nftables: NftSettings,
    pub budgets: BudgetSettings,
    pub kill_switch: KillSwitchSettings,
    pub log: LogSettings,
    pub resolver: ResolverSettings,
    pub timeouts: Timeouts,
    pub caps: Caps,
    pub dns: DnsSettings,
    pub admin: AdminSettings,
    pub auth: AuthSettings,
    pub inspect: InspectSettings,
    /// `[cluster]`: this node and its peers (src/cluster/, docs/cluster.md).
    pub cluster: ClusterSettings,
}

/// Why a config file was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read the config file: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Every error of the file, in line order; never empty.
    #[error("{}", Lines(.0))]
    Invalid(Vec<SourceError>),
}

impl ConfigError {
    /// The located errors (none for a file that could not be read).
    pub fn errors(&self) -> &[SourceError] {
        match self {
            Self::Read { .. } => &[],
            Self::Invalid(errors) => errors,
        }
    }
}

/// Errors one per line.
struct Lines<'a>(&'a [SourceError]);

impl fmt::Display for Lines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl Config {
    /// The local control socket's path (`[admin] control_socket` under `state_dir`), if on.
    pub fn control_socket(&self) -> Option<PathBuf> {
        self.admin
            .control_socket
            .as_ref()
            .map(|p| self.state_dir.join(p))
    }

    /// The gateway manages nftables (kill sets) when the ruleset is configured.
    pub fn manages_nftables(&self) -> bool {
        !self.nftables.agent_interfaces.is_empty() || !self.nftables.agent_networks.is_empty()
    }

    /// The built-in default: explicit proxy on 127.0.0.1:3128, admin on 127.0.0.1:9090,
    /// rules from `./rules`.
    #[expect(
        clippy::expect_used,
        reason = "the defaults are constants, checked by a unit test"
    )]
    pub fn builtin() -> Self {
        let file = SourceFile {
            path: PathBuf::from("<built-in>"),
            text: String::new(),
        };
        let mut raw = RawConfig::default();
        raw.listen.explicit = Listener(Some(BUILTIN_EXPLICIT));
        let mut problems = Problems::new(&file, &DeTable::default());
        compile(raw, &mut problems, Path::new(".")).expect("built-in default config is valid")
    }

    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_source(&SourceFile {
            path: path.to_path_buf(),
            text,
        })
    }

    /// Validate a config file's text: every error, each at its line.
    pub fn from_source(file: &SourceFile) -> Result<Self, ConfigError> {
        let (root, syntax) = DeTable::parse_recoverable(&file.text);
        if !syntax.is_empty() {
            // The parser recovers and goes on; one error per line is what follows from a
            // mistake (the rest of that line is noise).
            let mut errors: Vec<SourceError> = syntax
                .iter()
                .map(|e| {
                    let offset = e.span().map_or(0, |s| s.start);
                    file.error_at(offset, "", e.message().trim_end())
                })
                .collect();
            errors.sort_by_key(|e| e.line);
            errors.dedup_by_key(|e| e.line);
            return Err(ConfigError::Invalid(errors));
        }
        let mut table = root.into_inner();
        let mut problems = Problems::new(file, &table);
        let raw = deserialize_pruning(&mut table, &mut problems);
        let base = file
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let config = raw.and_then(|raw| compile(raw, &mut problems, base));
        match config {
            Some(mut config) if problems.errors.is_empty() => {
                config.source = Some(file.path.clone());
                Ok(config)
            }
            _ => Err(ConfigError::Invalid(sorted(problems.errors))),
        }
    }
}

fn sorted(mut errors: Vec<SourceError>) -> Vec<SourceError> {
    errors.sort_by_key(|e| e.line);
    errors
}

/// Deserialize the document; on each error, note it, remove the key it is about and try
/// again, so that one bad key does not hide the next. `None` only when an error cannot be
/// tied to a key (nothing more can be checked then).
fn deserialize_pruning(table: &mut DeTable<'_>, problems: &mut Problems<'_>) -> Option<RawConfig> {
    // Each round removes one key: the rounds are bounded by the keys in the file.
    loop {
        let root = Spanned::new(0..problems.file.text.len(), DeValue::Table(table.clone()));
        let error = match RawConfig::deserialize(toml::de::ValueDeserializer::from(root)) {
            Ok(raw) => return Some(raw),
            Err(e) => e,
        };
        let offset = error.span().map_or(0, |s| s.start);
        let message = error.message().trim_end().to_owned();
        match error.span().and_then(|_| prune(table, offset, "")) {
            Some(key) => problems
                .errors
                .push(problems.file.error_at(offset, &key, message)),
            None => {
                problems
                    .errors
                    .push(problems.file.error_at(offset, "", message));
                return None;
            }
        }
    }
}

/// Remove the innermost key whose name or value covers `offset`; its dotted path.
fn prune(table: &mut DeTable<'_>, offset: usize, prefix: &str) -> Option<String> {
    let mut hit = None;
    for (key, value) in table.iter_mut() {
        let path = if prefix.is_empty() {
            key.get_ref().to_string()
        } else {
            format!("{prefix}.{}", key.get_ref())
        };
        if let DeValue::Table(inner) = value.get_mut()
            && let Some(found) = prune(inner, offset, &path)
        {
            return Some(found);
        }
        if covers(&key.span(), offset) || covers(&value.span(), offset) {
            hit = Some((key.get_ref().to_string(), path));
            break;
        }
    }
    let (name, path) = hit?;
    table.remove(name.as_str());
    Some(path)
}

fn covers(span: &Range<usize>, offset: usize) -> bool {
    span.contains(&offset) || (span.is_empty() && span.start == offset)
}

/// The errors found so far, and how to place one at a line.
struct Problems<'a> {
    file: &'a SourceFile,
    /// Each section table's position in the file (for errors about a default the file
    /// did not set, placed at the section that made it wrong).
    sections: Vec<(String, Range<usize>)>,
    errors: Vec<SourceError>,
}

impl<'a> Problems<'a> {
    fn new(file: &'a SourceFile, table: &DeTable<'_>) -> Self {
        let sections = table
            .iter()
            .map(|(k, _)| (k.get_ref().to_string(), k.span()))
            .collect();
        Self {
            file,
            sections,
            errors: Vec::new(),
        }
    }

    /// An error about `key` (dotted), at the value when the file set it, else at the section.
    fn at<T>(&mut self, key: &str, value: &At<T>, message: impl Into<String>) {
        let offset = value.span.as_ref().map(|s| s.start).unwrap_or_else(|| {
            let section = key.split('.').next().unwrap_or(key);
            self.sections
                .iter()
                .find(|(name, _)| name == section)
                .map_or(0, |(_, span)| span.start)
        });
        self.errors.push(self.file.error_at(offset, key, message));
    }

    /// `value` must be greater than 0.
    fn positive<T: Default + PartialEq>(&mut self, key: &str, value: &At<T>) {
        if value.value == T::default() {
            self.at(key, value, "must be greater than 0");
        }
    }
}

/// Of two keys that constrain each other, the one the file set (the first if both).
fn set_one<'v, T, U>(a: (&'v str, &'v At<T>), b: (&'v str, &'v At<U>)) -> (&'v str, At<()>) {
    match (&a.1.span, &b.1.span) {
        (None, Some(span)) => (
            b.0,
            At {
                value: (),
                span: Some(span.clone()),
            },
        ),
        (span, _) => (
            a.0,
            At {
                value: (),
                span: span.clone(),
            },
        ),
    }
}

/// Check every value, noting each problem; the config when there were none.
fn compile(raw: RawConfig, p: &mut Problems<'_>, base: &Path) -> Option<Config> {
    let resolve = |path: PathBuf| {
        if path.is_absolute() {
            path
        } else {
            base.join(path)
        }
    };
    if raw.default_ports.is_empty() || raw.default_ports.contains(&0) {
        p.at(
            "default_ports",
            &raw.default_ports,
            "must list at least one port, none of them 0",
        );
    }
    let mut upstreams = Vec::new();
    for u in &raw.resolver.upstreams {
        match u
            .parse::<SocketAddr>()
            .or_else(|_| u.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        {
            Ok(addr) => upstreams.push(addr),
            Err(_) => p.at(
                "resolver.upstreams",
                u,
                format!("`{}` is not an ip or ip:port", u.value),
            ),
        }
    }
    p.positive("timeouts.handshake_ms", &raw.timeouts.handshake_ms);
    p.positive("timeouts.connect_ms", &raw.timeouts.connect_ms);
    p.positive("timeouts.idle_secs", &raw.timeouts.idle_secs);
    p.positive("resolver.timeout_ms", &raw.resolver.timeout_ms);
    let c = &raw.caps;
    p.positive("caps.max_connections", &c.max_connections);
    p.positive(
        "caps.max_connections_per_source",
        &c.max_connections_per_source,
    );
    p.positive(
        "caps.max_connections_per_agent",
        &c.max_connections_per_agent,
    );
    p.positive("caps.max_connections_unknown", &c.max_connections_unknown);
    p.positive("caps.max_request_head_bytes", &c.max_request_head_bytes);
    p.positive("log.queue", &raw.log.queue);
    if *raw.listen.backlog == 0 || i32::try_from(*raw.listen.backlog).is_err() {
        p.at(
            "listen.backlog",
            &raw.listen.backlog,
            "must be between 1 and 2147483647",
        );
    }
    let t = &raw.transparent;
    if t.tls_ports.contains(&0) || t.tls_ports.iter().any(|port| t.http_ports.contains(port)) {
        p.at(
            "transparent.tls_ports",
            &t.tls_ports,
            "a port is TLS or HTTP, not both, and never 0",
        );
    }
    if t.http_ports.contains(&0) {
        p.at("transparent.http_ports", &t.http_ports, "a port is never 0");
    }
    if *raw.budgets.reset_hour_utc > 23 {
        p.at(
            "budgets.reset_hour_utc",
            &raw.budgets.reset_hour_utc,
            "must be an hour, 0 to 23",
        );
    }
    let mut agent_networks = Vec::new();
    for n in &raw.nftables.agent_networks {
        match n.parse::<ipnet::IpNet>() {
            Ok(net) => agent_networks.push(net),
            Err(_) => p.at(
                "nftables.agent_networks",
                n,
                format!("`{}` is not a CIDR", n.value),
            ),
        }
    }
    let destination = match raw.log.destination.as_str() {
        "stdout" | "-" => LogDestination::Stdout,
        "" => {
            p.at(
                "log.destination",
                &raw.log.destination,
                "must be \"stdout\" or a path",
            );
            LogDestination::Stdout
        }
        path => LogDestination::File(resolve(PathBuf::from(path))),
    };
    let dns = compile_dns(&raw.dns, p);
    let auth = compile_auth(&raw.auth, p);
    let a = raw.admin;
    if *a.max_connections == 0 {
        p.at(
            "admin.max_connections",
            &a.max_connections,
            "must be at least 1",
        );
    }
    if !p.errors.is_empty() {
        return None;
    }
    let admin = AdminSettings {
        max_connections: *a.max_connections,
        header_timeout: Duration::from_millis(a.header_timeout_ms.max(1)),
        body_timeout: Duration::from_millis(a.body_timeout_ms.max(1)),
        connection_timeout: Duration::from_millis(a.connection_timeout_ms.max(1)),
        metrics_token_file: a.metrics_token_file.map(resolve),
        control_socket: (!a.control_socket.as_os_str().is_empty()).then_some(a.control_socket),
    };
    let cluster = compile_cluster(raw.cluster).unwrap_or_else(|e| {
        p.at(e.key(), &At::default_value(()), e.to_string());
        ClusterSettings::default()
    });
    Some(Config {
        source: None,
        rules_dir: resolve(raw.rules_dir.value),
        state_dir: resolve(raw.state_dir.value),
        default_ports: raw.default_ports.value,
        listen: ListenSettings {
            backlog: *raw.listen.backlog,
            explicit: raw.listen.explicit.0,
            admin: raw.listen.admin.0,
            transparent: raw.listen.transparent,
            dns: raw.listen.dns,
        },
        transparent: TransparentSettings {
            interception: match raw.transparent.interception {
                RawInterception::Redirect => Interception::Redirect,
                RawInterception::Tproxy => Interception::Tproxy,
            },
            tls_ports: raw.transparent.tls_ports.value,
            http_ports: raw.transparent.http_ports.value,
        },
        nftables: NftSettings {
            agent_interfaces: raw.nftables.agent_interfaces,
            agent_networks,
            ipv6: raw.nftables.ipv6,
            tproxy_mark: raw.nftables.tproxy_mark,
        },
        budgets: BudgetSettings {
            reset_hour_utc: *raw.budgets.reset_hour_utc,
        },
        kill_switch: KillSwitchSettings {
            webhook_secret_files: raw
                .kill_switch
                .webhook_secret_files
                .into_iter()
                .map(resolve)
                .collect(),
            totp_secret_file: raw.kill_switch.totp_secret_file.map(resolve),
        },
        log: LogSettings {
            destination,
            format: raw.log.format,
            queue: *raw.log.queue,
        },
        resolver: ResolverSettings {
            upstreams,
            timeout: Duration::from_millis(*raw.resolver.timeout_ms),
        },
        timeouts: Timeouts {
            handshake: Duration::from_millis(*raw.timeouts.handshake_ms),
            connect: Duration::from_millis(*raw.timeouts.connect_ms),
            idle: Duration::from_secs(*raw.timeouts.idle_secs),
            drain: Duration::from_secs(raw.timeouts.drain_secs),
        },
        caps: Caps {
            max_connections: *raw.caps.max_connections,
            max_connections_per_source: *raw.caps.max_connections_per_source,
            max_connections_per_agent: *raw.caps.max_connections_per_agent,
            max_connections_unknown: *raw.caps.max_connections_unknown,
            max_request_head_bytes: *raw.caps.max_request_head_bytes,
            max_handshake_bytes: raw.caps.max_handshake_bytes,
        },
        dns,
        admin,
        auth,
        inspect: InspectSettings {
            upstream_roots: resolve(raw.inspect.upstream_roots),
            upstream_ca_files: raw
                .inspect
                .upstream_ca_files
                .into_iter()
                .map(|(h, p)| (h.to_ascii_lowercase(), resolve(p)))
                .collect(),
            log_query: raw.inspect.log_query,
        },
        cluster,
    })
}

// --- [cluster]: this node and its peers (src/cluster/, docs/cluster.md) ---
//
// Peers are `http://<ip>:<port>` on the management network: plain HTTP, no names to
// resolve. Every message between nodes carries its own signature (the webhook keys), so the
// transport adds no trust; the choice is written down in docs/cluster.md.

/// The raw `[cluster]` table (every key has a default; no peers = no cluster).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawCluster {
    node: String,
    peers: Vec<String>,
    sync_timeout_ms: u64,
    sync_interval_ms: u64,
    confirm_timeout_ms: u64,
    forward_queue: usize,
    max_event_age_secs: u64,
}

impl Default for RawCluster {
    fn default() -> Self {
        Self {
            node: String::new(),
            peers: Vec::new(),
            sync_timeout_ms: 10_000,
            sync_interval_ms: 2_000,
            confirm_timeout_ms: 3_000,
            forward_queue: 256,
            max_event_age_secs: 7 * 24 * 3600,
        }
    }
}

/// One peer: its admin listener on the management network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// As configured (`http://192.168.1.3:9090`): the peer's name in status and metrics.
    pub url: String,
    pub addr: SocketAddr,
}

/// The validated `[cluster]` section.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// This node's name (`a`), shown to peers and in status.
    pub node: String,
    pub peers: Vec<Peer>,
    /// At start-up, agents are refused until every peer answered or this passed.
    pub sync_timeout: Duration,
    /// How often a node asks its peers for their signed events.
    pub sync_interval: Duration,
    /// How long a network revive waits for every peer's answer before it is refused.
    pub confirm_timeout: Duration,
    /// Requests waiting to be relayed, per peer; beyond, the sync carries them.
    pub forward_queue: usize,
    /// A relayed request older than this is refused.
    pub max_event_age_secs: i64,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        // The raw defaults are valid by construction (checked by a unit test).
        compile_cluster(RawCluster::default()).unwrap_or(ClusterSettings {
            node: String::new(),
            peers: Vec::new(),
            sync_timeout: Duration::from_secs(10),
            sync_interval: Duration::from_secs(2),
            confirm_timeout: Duration::from_secs(3),
            forward_queue: 256,
            max_event_age_secs: 7 * 24 * 3600,
        })
    }
}

impl ClusterSettings {
    /// A cluster is configured when there is at least one peer.
    pub fn enabled(&self) -> bool {
        !self.peers.is_empty()
    }
}

/// What is wrong with a `[cluster]` key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ClusterSettingsError {
    #[error(
        "`{0}` is not http://<ip>:<port> (peers are addressed by IP on the management network; https is not supported, see docs/cluster.md)"
    )]
    BadPeer(String),
    #[error("peers are configured but `node` is empty: name this node (1 to 32 of a-z, 0-9, -)")]
    NoNodeName,
    #[error("`{0}` is not a node name (1 to 32 of a-z, 0-9, -)")]
    BadNodeName(String),
    #[error("`{0}` is listed twice")]
    DuplicatePeer(String),
    #[error("{0} must be at least 1")]
    Zero(&'static str),
}

impl ClusterSettingsError {
    /// The config key at fault.
    pub(crate) fn key(&self) -> &'static str {
        match self {
            ClusterSettingsError::BadPeer(_) | ClusterSettingsError::DuplicatePeer(_) => {
                "cluster.peers"
            }
            ClusterSettingsError::NoNodeName | ClusterSettingsError::BadNodeName(_) => {
                "cluster.node"
            }
            ClusterSettingsError::Zero(k) => k,
        }
    }
}

pub(crate) fn compile_cluster(raw: RawCluster) -> Result<ClusterSettings, ClusterSettingsError> {
    let mut peers: Vec<Peer> = Vec::new();
    for url in &raw.peers {
        let addr = url
            .strip_prefix("http://")
            .map(|rest| rest.trim_end_matches('/'))
            .and_then(|hostport| hostport.parse::<SocketAddr>().ok())
            .ok_or_else(|| ClusterSettingsError::BadPeer(url.clone()))?;
        if peers.iter().any(|p| p.addr == addr) {
            return Err(ClusterSettingsError::DuplicatePeer(url.clone()));
        }
        peers.push(Peer {
            url: url.clone(),
            addr,
        });
    }
    let name_ok = |n: &str| {
        (1..=32).contains(&n.len())
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if !raw.node.is_empty() && !name_ok(&raw.node) {
        return Err(ClusterSettingsError::BadNodeName(raw.node));
    }
    if !peers.is_empty() && raw.node.is_empty() {
        return Err(ClusterSettingsError::NoNodeName);
    }
    for (key, v) in [
        ("cluster.sync_interval_ms", raw.sync_interval_ms),
        ("cluster.confirm_timeout_ms", raw.confirm_timeout_ms),
        ("cluster.forward_queue", raw.forward_queue as u64),
        ("cluster.max_event_age_secs", raw.max_event_age_secs),
    ] {
        if v == 0 {
            return Err(ClusterSettingsError::Zero(key));
        }
    }
    Ok(ClusterSettings {
        node: raw.node,
        peers,
        sync_timeout: Duration::from_millis(raw.sync_timeout_ms),
        sync_interval: Duration::from_millis(raw.sync_interval_ms),
        confirm_timeout: Duration::from_millis(raw.confirm_timeout_ms),
        forward_queue: raw.forward_queue,
        max_event_age_secs: i64::try_from(raw.max_event_age_secs).unwrap_or(i64::MAX),
    })
}

fn compile_auth(raw: &RawAuth, p: &mut Problems<'_>) -> AuthSettings {
    p.positive("auth.free_failures", &raw.free_failures);
    p.positive("auth.backoff_initial_ms", &raw.backoff_initial_ms);
    p.positive("auth.backoff_max_ms", &raw.backoff_max_ms);
    p.positive("auth.forget_after_secs", &raw.forget_after_secs);
    p.positive("auth.tracked_sources", &raw.tracked_sources);
    p.positive("auth.cache_entries", &raw.cache_entries);
    p.positive(
        "auth.max_concurrent_verifications",
        &raw.max_concurrent_verifications,
    );
    if *raw.backoff_initial_ms > *raw.backoff_max_ms {
        let (key, at) = set_one(
            ("auth.backoff_initial_ms", &raw.backoff_initial_ms),
            ("auth.backoff_max_ms", &raw.backoff_max_ms),
        );
        p.at(
            key,
            &at,
            "auth.backoff_initial_ms must not exceed auth.backoff_max_ms",
        );
    }
    if raw.forget_after_secs.saturating_mul(1000) < *raw.backoff_max_ms {
        let (key, at) = set_one(
            ("auth.forget_after_secs", &raw.forget_after_secs),
            ("auth.backoff_max_ms", &raw.backoff_max_ms),
        );
        p.at(
            key,
            &at,
            "auth.forget_after_secs must be at least auth.backoff_max_ms: a source would be \
             forgotten during its back-off",
        );
    }
    auth_settings(raw)
}

fn compile_dns(raw: &RawDns, p: &mut Problems<'_>) -> DnsSettings {
    let mut allowed_types = Vec::new();
    for t in &raw.allowed_types {
        match record_type_code(t) {
            Ok(code) => allowed_types.push(code),
            Err(e) => p.at("dns.allowed_types", t, format!("`{}`: {e}", t.value)),
        }
    }
    p.positive("dns.queries_per_second", &raw.queries_per_second);
    p.positive("dns.max_ttl_secs", &raw.max_ttl_secs);
    p.positive("dns.tcp_idle_secs", &raw.tcp_idle_secs);
    DnsSettings {
        refuse_with_nxdomain: raw.refuse_with == RefuseWith::Nxdomain,
        allowed_types,
        queries_per_second: *raw.queries_per_second,
        max_ttl: Duration::from_secs(u64::from(*raw.max_ttl_secs)),
        cache_entries: raw.cache_entries,
        cache_bytes: raw.cache_bytes,
        tcp_idle: Duration::from_secs(*raw.tcp_idle_secs),
    }
}

/// Why a name in `dns.allowed_types` is not a type that can be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordTypeError {
    #[error("not a DNS record type")]
    Unknown,
    #[error("a meta or unknown type cannot be allowed")]
    NotData,
}

/// The numeric code of a query type named in `dns.allowed_types` (`"AAAA"` → 28).
/// Meta types (ANY, AXFR, IXFR, OPT, …) cannot be allowed: they are not data.
pub fn record_type_code(name: &str) -> Result<u16, RecordTypeError> {
    let t =
        RecordType::from_str(&name.to_ascii_uppercase()).map_err(|_| RecordTypeError::Unknown)?;
    match t {
        RecordType::ANY
        | RecordType::AXFR
        | RecordType::IXFR
        | RecordType::OPT
        | RecordType::TSIG
        | RecordType::SIG
        | RecordType::NULL
        | RecordType::ZERO
        | RecordType::Unknown(_) => Err(RecordTypeError::NotData),
        t => Ok(u16::from(t)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_source(&SourceFile {
            path: PathBuf::from("/etc/portcullis/portcullis.toml"),
            text: text.into(),
        })
    }

    /// (line, key) of every error, in order.
    fn errors(text: &str) -> Vec<(usize, String)> {
        let e = parse(text).unwrap_err();
        e.errors().iter().map(|e| (e.line, e.key.clone())).collect()
    }

    fn one_error(text: &str) -> SourceError {
        let e = parse(text).unwrap_err();
        assert_eq!(e.errors().len(), 1, "{e}");
        e.errors()[0].clone()
    }

    #[test]
    fn builtin_default_serves_explicit_and_admin_on_loopback() {
        let c = Config::builtin();
        assert_eq!(c.listen.explicit, Some("127.0.0.1:3128".parse().unwrap()));
        assert_eq!(c.listen.admin, Some("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(c.rules_dir, PathBuf::from("./rules"));
        assert_eq!(c.default_ports, vec![80, 443]);
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = one_error("rules_dir = \"r\"\n[timeouts]\nidle_sec = 3\n");
        assert_eq!(e.line, 3);
        assert_eq!(e.key, "timeouts.idle_sec");
        assert!(
            e.to_string()
                .starts_with("/etc/portcullis/portcullis.toml:3: key `timeouts.idle_sec`"),
            "{e}"
        );
        let e = one_error("\n\nrule_dir = \"r\"\n");
        assert_eq!((e.line, e.key.as_str()), (3, "rule_dir"));
    }

    #[test]
    fn bad_enum_values_are_located_and_name_the_choices() {
        let e = one_error("[transparent]\n\ninterception = \"nat\"\n");
        assert_eq!((e.line, e.key.as_str()), (3, "transparent.interception"));
        assert!(
            e.message.contains("redirect") && e.message.contains("tproxy"),
            "{e}"
        );
        let e = one_error("[dns]\nallowed_types = [\"A\"]\nrefuse_with = \"drop\"\n");
        assert_eq!((e.line, e.key.as_str()), (3, "dns.refuse_with"));
        assert!(e.message.contains("nxdomain"), "{e}");
    }

    /// The old code found a key's line by searching the text for its name: a key named in
    /// a comment or another section drew the error to the wrong line.
    #[test]
    fn an_error_is_at_the_key_not_at_the_first_mention_of_its_name() {
        let text = "# connect_ms: how long a dial may take\n\
                    [admin]\nheader_timeout_ms = 0\n\
                    [timeouts]\nconnect_ms = 0\n";
        assert_eq!(errors(text), vec![(5, "timeouts.connect_ms".to_owned())]);
        let text = "[caps]\nmax_connections = 10\n[admin]\nmax_connections = 0\n";
        assert_eq!(errors(text), vec![(4, "admin.max_connections".to_owned())]);
    }

    #[test]
    fn every_error_of_a_file_is_reported_at_its_line() {
        let text = "\
rules_dir = \"r\"
default_ports = []
[timeouts]
connect_ms = 0
idle_sec = 3
[transparent]
interception = \"nat\"
[resolver]
upstreams = [
  \"1.1.1.1\",
  \"not-an-ip\",
]
[dns]
refuse_with = \"drop\"
allowed_types = [\"A\", \"ANY\"]
[budgets]
reset_hour_utc = 24
[caps]
max_connections = \"many\"
";
        assert_eq!(
            errors(text),
            [
                (2, "default_ports"),
                (4, "timeouts.connect_ms"),
                (5, "timeouts.idle_sec"),
                (7, "transparent.interception"),
                (11, "resolver.upstreams"),
                (14, "dns.refuse_with"),
                (15, "dns.allowed_types"),
                (17, "budgets.reset_hour_utc"),
                (19, "caps.max_connections"),
            ]
            .map(|(l, k)| (l, k.to_owned()))
        );
        let e = parse(text).unwrap_err().to_string();
        assert_eq!(e.lines().count(), 9, "{e}");
    }

    #[test]
    fn syntax_errors_are_located() {
        let e = one_error("[timeouts]\nconnect_ms = 5\nidle_secs = = 3\n");
        assert_eq!(e.line, 3, "{e}");
        let lines: Vec<usize> = errors("[timeouts\nconnect_ms = 5\nidle_secs = = 3\n")
            .into_iter()
            .map(|(line, _)| line)
            .collect();
        assert_eq!(lines, [1, 3]);
    }

    #[test]
    fn an_unreadable_file_is_not_placed_at_a_line() {
        let e = Config::load(Path::new("/nonexistent/portcullis.toml")).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        let text = e.to_string();
        assert!(
            text.starts_with("/nonexistent/portcullis.toml: cannot read"),
            "{text}"
        );
    }

    /// A file without `listen.explicit` (or with `""`/`false`) opens no explicit proxy;
    /// the built-in default (no file at all) keeps it on.
    #[test]
    fn the_explicit_proxy_is_on_only_when_asked_for() {
        assert_eq!(Config::builtin().listen.explicit, Some(BUILTIN_EXPLICIT));
        for text in [
            "",
            "[listen]\ntransparent = [\"10.66.0.1:15001\"]\n",
            "[listen]\nexplicit = \"\"\n",
            "[listen]\nexplicit = false\n",
        ] {
            let c = parse(text).unwrap();
            assert_eq!(c.listen.explicit, None, "{text:?}");
            assert!(c.listen.admin.is_some(), "{text:?}");
        }
        let c = parse("[listen]\nexplicit = \"10.66.0.1:3128\"\nadmin = false\n").unwrap();
        assert_eq!(c.listen.explicit, Some("10.66.0.1:3128".parse().unwrap()));
        assert_eq!(c.listen.admin, None);
        for (text, key) in [
            ("[listen]\nexplicit = true\n", "listen.explicit"),
            ("[listen]\nexplicit = \"localhost\"\n", "listen.explicit"),
            ("[listen]\nbacklog = 0\n", "listen.backlog"),
        ] {
            let e = one_error(text);
            assert_eq!((e.line, e.key.as_str()), (2, key), "{text}");
        }
    }

    #[test]
    fn log_format_and_backlog() {
        let c = parse("").unwrap();
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.listen.backlog, 4096);
        let c = parse("[log]\nformat = \"json\"\n[listen]\nbacklog = 512\n").unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.listen.backlog, 512);
        let e = one_error("[log]\nformat = \"yaml\"\n");
        assert_eq!((e.line, e.key.as_str()), (2, "log.format"));
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let c = parse("rules_dir = \"rules\"\n").unwrap();
        assert_eq!(c.rules_dir, PathBuf::from("/etc/portcullis/rules"));
    }

    #[test]
    fn zero_values_are_rejected() {
        let e = one_error("[timeouts]\nconnect_ms = 0\n");
        assert_eq!(e.key, "timeouts.connect_ms");
        assert_eq!(e.line, 2);
    }

    #[test]
    fn auth_section_is_validated() {
        assert_eq!(parse("").unwrap().auth, AuthSettings::default());
        let c =
            parse("[auth]\nfree_failures = 3\nbackoff_max_ms = 400\nbackoff_initial_ms = 100\n")
                .unwrap();
        assert_eq!(c.auth.backoff_max, Duration::from_millis(400));
        assert_eq!(c.auth.free_failures, 3);
        for (text, key) in [
            ("[auth]\nfree_failures = 0\n", "auth.free_failures"),
            (
                "[auth]\nmax_concurrent_verifications = 0\n",
                "auth.max_concurrent_verifications",
            ),
            (
                "[auth]\nbackoff_initial_ms = 70000\n",
                "auth.backoff_initial_ms",
            ),
            // The default initial back-off exceeds it: the error is at the key the file set.
            ("[auth]\nbackoff_max_ms = 400\n", "auth.backoff_max_ms"),
            ("[auth]\nforget_after_secs = 10\n", "auth.forget_after_secs"),
            ("[auth]\nguesses = 10\n", "auth.guesses"),
        ] {
            let e = one_error(text);
            assert_eq!(e.key, key, "{text}");
            assert_eq!(e.line, 2, "{text}");
        }
    }

    #[test]
    fn dns_section_is_validated() {
        let c = parse("[listen]\ndns = [\"10.66.0.1:53\"]\n").unwrap();
        assert_eq!(c.listen.dns, vec!["10.66.0.1:53".parse().unwrap()]);
        assert_eq!(c.dns.allowed_types, vec![1, 28, 5, 65, 64]);
        assert!(
            c.dns.refuse_with_nxdomain,
            "NXDOMAIN by default (docs/dns.md)"
        );
        let c = parse("[dns]\nrefuse_with = \"refused\"\n").unwrap();
        assert!(!c.dns.refuse_with_nxdomain);
        let e = one_error("[dns]\nallowed_types = [\"A\", \"ANY\"]\n");
        assert_eq!(e.key, "dns.allowed_types");
        let e = one_error("[dns]\nrefuse_with = \"drop\"\n");
        assert_eq!(e.key, "dns.refuse_with");
    }

    #[test]
    fn shipped_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/portcullis.toml");
        Config::load(&path).unwrap();
    }

    #[test]
    fn record_types_by_name() {
        assert_eq!(record_type_code("aaaa").unwrap(), 28);
        assert_eq!(record_type_code("HTTPS").unwrap(), 65);
        assert_eq!(record_type_code("ANY"), Err(RecordTypeError::NotData));
        assert_eq!(record_type_code("AXFR"), Err(RecordTypeError::NotData));
        assert_eq!(record_type_code("bogus"), Err(RecordTypeError::Unknown));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod cluster_tests {
    use super::*;

    fn raw(node: &str, peers: &[&str]) -> RawCluster {
        RawCluster {
            node: node.into(),
            peers: peers.iter().map(|p| (*p).to_owned()).collect(),
            ..RawCluster::default()
        }
    }

    #[test]
    fn defaults_are_valid_and_off() {
        let s = compile_cluster(RawCluster::default()).unwrap();
        assert!(!s.enabled());
        assert_eq!(s.sync_timeout, Duration::from_secs(10));
    }

    #[test]
    fn peers_are_plain_http_by_address() {
        let s = compile_cluster(raw(
            "a",
            &["http://192.168.1.3:9090", "http://[fd00::3]:9090/"],
        ))
        .unwrap();
        assert!(s.enabled());
        assert_eq!(s.peers[0].addr, "192.168.1.3:9090".parse().unwrap());
        assert_eq!(s.peers[1].addr, "[fd00::3]:9090".parse().unwrap());
        for bad in [
            "https://192.168.1.3:9090",
            "http://gw-b.example:9090",
            "192.168.1.3:9090",
            "http://192.168.1.3",
        ] {
            assert_eq!(
                compile_cluster(raw("a", &[bad])).unwrap_err(),
                ClusterSettingsError::BadPeer(bad.into())
            );
        }
        assert_eq!(
            compile_cluster(raw("", &["http://192.168.1.3:9090"])).unwrap_err(),
            ClusterSettingsError::NoNodeName
        );
        assert!(matches!(
            compile_cluster(raw("A b", &[])).unwrap_err(),
            ClusterSettingsError::BadNodeName(_)
        ));
        assert!(matches!(
            compile_cluster(raw(
                "a",
                &["http://192.168.1.3:9090", "http://192.168.1.3:9090/"]
            ))
            .unwrap_err(),
            ClusterSettingsError::DuplicatePeer(_)
        ));
    }
}
