//! `portcullis.toml`: the process configuration (docs/configuration.md).
//!
//! Owns the raw serde struct (unknown keys are errors, every key has a default, so the
//! built-in default config is the empty file) and its compilation into [`Config`]. Relative
//! paths are resolved against the config file's directory (the working directory for the
//! built-in default). Rules are not read here: see `policy`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::policy::rules::{SourceError, SourceFile};
use crate::sys::Interception;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    rules_dir: PathBuf,
    state_dir: PathBuf,
    default_ports: Vec<u16>,
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
    cluster: RawCluster,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            rules_dir: PathBuf::from("rules"),
            state_dir: PathBuf::from("state"),
            default_ports: vec![80, 443],
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
            cluster: RawCluster::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawListen {
    explicit: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    /// Where nftables sends the agents' TCP 80/443 (none by default).
    transparent: Vec<SocketAddr>,
    /// DNS forwarder, UDP and TCP on each address (none by default).
    dns: Vec<SocketAddr>,
}

impl Default for RawListen {
    fn default() -> Self {
        Self {
            explicit: Some(SocketAddr::from(([127, 0, 0, 1], 3128))),
            admin: Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
            transparent: Vec::new(),
            dns: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTransparent {
    /// "redirect" (nftables NAT redirect, SO_ORIGINAL_DST) or "tproxy".
    interception: String,
    /// Original destination ports whose first bytes must be a TLS ClientHello.
    tls_ports: Vec<u16>,
    /// Original destination ports whose first bytes must be an HTTP/1.x request head.
    http_ports: Vec<u16>,
}

impl Default for RawTransparent {
    fn default() -> Self {
        Self {
            interception: "redirect".into(),
            tls_ports: vec![443],
            http_ports: vec![80],
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawNftables {
    /// Interfaces the agents' traffic arrives on (e.g. "vlan66").
    agent_interfaces: Vec<String>,
    /// Agent networks; empty means every agent's `sources` from the rules.
    agent_networks: Vec<String>,
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
    reset_hour_utc: u8,
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
    destination: String,
    /// Lines buffered between the data path and the writer; beyond it lines are dropped
    /// and counted, never waited for.
    queue: usize,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            destination: "stdout".into(),
            queue: 65_536,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawResolver {
    /// Upstream DNS servers as `ip` or `ip:port`; empty means the system's resolv.conf.
    upstreams: Vec<String>,
    timeout_ms: u64,
}

impl Default for RawResolver {
    fn default() -> Self {
        Self {
            upstreams: Vec::new(),
            timeout_ms: 2_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTimeouts {
    /// Agent must send its request head / ClientHello within this.
    handshake_ms: u64,
    connect_ms: u64,
    idle_secs: u64,
    /// On SIGTERM, how long live connections may drain before they are cut.
    drain_secs: u64,
}

impl Default for RawTimeouts {
    fn default() -> Self {
        Self {
            handshake_ms: 5_000,
            connect_ms: 5_000,
            idle_secs: 300,
            drain_secs: 10,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawCaps {
    max_connections: usize,
    max_connections_per_source: usize,
    /// One agent's share of `max_connections` (all its source addresses together).
    max_connections_per_agent: usize,
    /// Connections from addresses that are no agent's source, together (Basic-auth agents
    /// connecting from elsewhere count here).
    max_connections_unknown: usize,
    max_request_head_bytes: usize,
    /// Bytes all connections together may hold in hellos and request heads not yet
    /// complete, beyond 4 KiB each.
    max_handshake_bytes: usize,
}

impl Default for RawCaps {
    fn default() -> Self {
        Self {
            max_connections: 16_384,
            max_connections_per_source: 1_024,
            max_connections_per_agent: 4_096,
            max_connections_unknown: 512,
            max_request_head_bytes: 16 * 1024,
            max_handshake_bytes: 64 * 1024 * 1024,
        }
    }
}

/// `[admin]`: the management API's own bounds, and the local control socket.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    /// Connections the admin listener holds at once; beyond it new ones are closed at once.
    max_connections: usize,
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
            max_connections: 64,
            header_timeout_ms: 5_000,
            body_timeout_ms: 5_000,
            connection_timeout_ms: 30_000,
            metrics_token_file: None,
            control_socket: PathBuf::from("control.sock"),
        }
    }
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

// --- [auth]: proxy Basic-auth verification and guessing back-off (src/proxy/auth.rs) ---

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAuth {
    /// Failed attempts a source gets before its back-off starts.
    free_failures: u32,
    /// The first back-off; each further failure doubles it, up to `backoff_max_ms`.
    backoff_initial_ms: u64,
    backoff_max_ms: u64,
    /// A source's failures are forgotten this long after its last one.
    forget_after_secs: u64,
    /// Sources tracked at once (a fixed table: a flood of sources evicts, never grows it).
    tracked_sources: usize,
    /// A verified (username, password) is trusted again for this long without verifying.
    cache_secs: u64,
    /// Verified credentials kept at most.
    cache_entries: usize,
    /// argon2id verifications run at once (each on a blocking thread); beyond, 407 at once.
    max_concurrent_verifications: usize,
}

impl Default for RawAuth {
    fn default() -> Self {
        Self {
            free_failures: 5,
            backoff_initial_ms: 1_000,
            backoff_max_ms: 60_000,
            forget_after_secs: 900,
            tracked_sources: 4_096,
            cache_secs: 300,
            cache_entries: 1_024,
            max_concurrent_verifications: 2,
        }
    }
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
        auth_settings(RawAuth::default())
    }
}

fn auth_settings(raw: RawAuth) -> AuthSettings {
    AuthSettings {
        free_failures: raw.free_failures,
        backoff_initial: Duration::from_millis(raw.backoff_initial_ms),
        backoff_max: Duration::from_millis(raw.backoff_max_ms),
        forget_after: Duration::from_secs(raw.forget_after_secs),
        tracked_sources: raw.tracked_sources,
        cache_ttl: Duration::from_secs(raw.cache_secs),
        cache_entries: raw.cache_entries,
        max_concurrent_verifications: raw.max_concurrent_verifications,
    }
}

fn compile_auth(
    raw: RawAuth,
    key_error: impl Fn(&str, String) -> SourceError,
) -> Result<AuthSettings, SourceError> {
    for (key, v) in [
        ("auth.free_failures", u64::from(raw.free_failures)),
        ("auth.backoff_initial_ms", raw.backoff_initial_ms),
        ("auth.backoff_max_ms", raw.backoff_max_ms),
        ("auth.forget_after_secs", raw.forget_after_secs),
        ("auth.tracked_sources", raw.tracked_sources as u64),
        ("auth.cache_entries", raw.cache_entries as u64),
        (
            "auth.max_concurrent_verifications",
            raw.max_concurrent_verifications as u64,
        ),
    ] {
        if v == 0 {
            return Err(key_error(key, "must be greater than 0".into()));
        }
    }
    if raw.backoff_initial_ms > raw.backoff_max_ms {
        return Err(key_error(
            "auth.backoff_initial_ms",
            "must not exceed auth.backoff_max_ms".into(),
        ));
    }
    if raw.forget_after_secs.saturating_mul(1000) < raw.backoff_max_ms {
        return Err(key_error(
            "auth.forget_after_secs",
            "must be at least auth.backoff_max_ms: a source would be forgotten during its back-off"
                .into(),
        ));
    }
    Ok(auth_settings(raw))
}

// --- [dns]: the filtering DNS forwarder (src/dns/) ---

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDns {
    /// What a name the agent may not reach gets: "refused" or "nxdomain".
    refuse_with: String,
    /// Query types answered for allowed names; every other type is refused.
    allowed_types: Vec<String>,
    /// Per-agent queries per second; bursts of twice this are absorbed.
    queries_per_second: u32,
    /// Cached answers live at most this long, whatever their TTL says.
    max_ttl_secs: u32,
    /// (name, type) pairs kept in the response cache; 0 disables it.
    cache_entries: usize,
    /// Bytes the response cache may hold (estimated); no answer over an eighth of it.
    cache_bytes: usize,
    /// A TCP connection with no query for this long is closed.
    tcp_idle_secs: u64,
}

impl Default for RawDns {
    fn default() -> Self {
        Self {
            // Same client behaviour as REFUSED, half the queries, and an error no
            // client calls temporary (docs/dns.md has the measurements).
            refuse_with: "nxdomain".into(),
            allowed_types: ["A", "AAAA", "CNAME", "HTTPS", "SVCB"]
                .map(String::from)
                .to_vec(),
            queries_per_second: 100,
            max_ttl_secs: 300,
            cache_entries: 10_000,
            cache_bytes: 8 * 1024 * 1024,
            tcp_idle_secs: 10,
        }
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

fn compile_dns(
    raw: RawDns,
    key_error: impl Fn(&str, String) -> SourceError,
) -> Result<DnsSettings, SourceError> {
    let refuse_with_nxdomain = match raw.refuse_with.as_str() {
        "refused" => false,
        "nxdomain" => true,
        other => {
            return Err(key_error(
                "dns.refuse_with",
                format!("`{other}`: expected \"refused\" or \"nxdomain\""),
            ));
        }
    };
    let mut allowed_types = Vec::new();
    for t in &raw.allowed_types {
        let code = crate::dns::record_type_code(t)
            .map_err(|m| key_error("dns.allowed_types", format!("`{t}`: {m}")))?;
        allowed_types.push(code);
    }
    for (key, v) in [
        ("dns.queries_per_second", u64::from(raw.queries_per_second)),
        ("dns.max_ttl_secs", u64::from(raw.max_ttl_secs)),
        ("dns.tcp_idle_secs", raw.tcp_idle_secs),
    ] {
        if v == 0 {
            return Err(key_error(key, "must be greater than 0".into()));
        }
    }
    Ok(DnsSettings {
        refuse_with_nxdomain,
        allowed_types,
        queries_per_second: raw.queries_per_second,
        max_ttl: Duration::from_secs(u64::from(raw.max_ttl_secs)),
        cache_entries: raw.cache_entries,
        cache_bytes: raw.cache_bytes,
        tcp_idle: Duration::from_secs(raw.tcp_idle_secs),
    })
}

// --- end [dns] ---

/// Where connection log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogDestination {
    Stdout,
    File(PathBuf),
}

/// The validated process configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: Option<PathBuf>,
    pub rules_dir: PathBuf,
    pub state_dir: PathBuf,
    pub default_ports: Vec<u16>,
    pub explicit_listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub transparent_listen: Vec<SocketAddr>,
    pub interception: Interception,
    pub transparent_tls_ports: Vec<u16>,
    pub transparent_http_ports: Vec<u16>,
    pub nft_agent_interfaces: Vec<String>,
    pub nft_agent_networks: Vec<ipnet::IpNet>,
    pub nft_ipv6: bool,
    pub nft_tproxy_mark: u32,
    pub budget_reset_hour_utc: u8,
    pub webhook_secret_files: Vec<PathBuf>,
    pub totp_secret_file: Option<PathBuf>,
    pub log_destination: LogDestination,
    pub log_queue: usize,
    pub resolver_upstreams: Vec<SocketAddr>,
    pub resolver_timeout: Duration,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_source: usize,
    pub max_connections_per_agent: usize,
    pub max_connections_unknown: usize,
    pub max_request_head_bytes: usize,
    pub max_handshake_bytes: usize,
    /// `listen.dns`: DNS forwarder addresses (UDP and TCP each).
    pub dns_listen: Vec<SocketAddr>,
    pub dns: DnsSettings,
    pub admin: AdminSettings,
    pub auth: AuthSettings,
    /// `[cluster]`: this node and its peers (src/cluster/, docs/cluster.md).
    pub cluster: ClusterSettings,
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
        !self.nft_agent_interfaces.is_empty() || !self.nft_agent_networks.is_empty()
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
        compile(RawConfig::default(), &file, Path::new("."))
            .expect("built-in default config is valid")
    }

    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Self, SourceError> {
        let text = std::fs::read_to_string(path).map_err(|e| SourceError {
            file: path.to_path_buf(),
            line: 0,
            key: String::new(),
            message: e.to_string(),
        })?;
        Self::from_source(&SourceFile {
            path: path.to_path_buf(),
            text,
        })
    }

    pub fn from_source(file: &SourceFile) -> Result<Self, SourceError> {
        let raw: RawConfig = file.parse()?;
        let base = file
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut cfg = compile(raw, file, base)?;
        cfg.source = Some(file.path.clone());
        Ok(cfg)
    }
}

fn compile(raw: RawConfig, file: &SourceFile, base: &Path) -> Result<Config, SourceError> {
    let key_error = |key: &str, message: String| {
        let offset = file
            .text
            .find(key.rsplit('.').next().unwrap_or(key))
            .unwrap_or(0);
        file.error_at(offset, key, message)
    };
    let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
    if raw.default_ports.is_empty() || raw.default_ports.contains(&0) {
        return Err(key_error(
            "default_ports",
            "must list at least one port, none of them 0".into(),
        ));
    }
    let mut upstreams = Vec::new();
    for u in &raw.resolver.upstreams {
        let addr = u
            .parse::<SocketAddr>()
            .or_else(|_| u.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
            .map_err(|_| {
                key_error(
                    "resolver.upstreams",
                    format!("`{u}` is not an ip or ip:port"),
                )
            })?;
        upstreams.push(addr);
    }
    for (key, v) in [
        ("timeouts.handshake_ms", raw.timeouts.handshake_ms),
        ("timeouts.connect_ms", raw.timeouts.connect_ms),
        ("timeouts.idle_secs", raw.timeouts.idle_secs),
        ("resolver.timeout_ms", raw.resolver.timeout_ms),
        ("caps.max_connections", raw.caps.max_connections as u64),
        (
            "caps.max_connections_per_source",
            raw.caps.max_connections_per_source as u64,
        ),
        (
            "caps.max_connections_per_agent",
            raw.caps.max_connections_per_agent as u64,
        ),
        (
            "caps.max_connections_unknown",
            raw.caps.max_connections_unknown as u64,
        ),
        (
            "caps.max_request_head_bytes",
            raw.caps.max_request_head_bytes as u64,
        ),
        ("log.queue", raw.log.queue as u64),
    ] {
        if v == 0 {
            return Err(key_error(key, "must be greater than 0".into()));
        }
    }
    let interception = match raw.transparent.interception.as_str() {
        "redirect" => Interception::Redirect,
        "tproxy" => Interception::Tproxy,
        other => {
            return Err(key_error(
                "transparent.interception",
                format!("`{other}`: expected \"redirect\" or \"tproxy\""),
            ));
        }
    };
    let t = &raw.transparent;
    if t.tls_ports
        .iter()
        .any(|p| t.http_ports.contains(p) || *p == 0)
        || t.http_ports.contains(&0)
    {
        return Err(key_error(
            "transparent.tls_ports",
            "a port is TLS or HTTP, not both, and never 0".into(),
        ));
    }
    if raw.budgets.reset_hour_utc > 23 {
        return Err(key_error(
            "budgets.reset_hour_utc",
            "must be an hour, 0 to 23".into(),
        ));
    }
    let mut nft_agent_networks = Vec::new();
    for n in &raw.nftables.agent_networks {
        let net = n
            .parse::<ipnet::IpNet>()
            .map_err(|_| key_error("nftables.agent_networks", format!("`{n}` is not a CIDR")))?;
        nft_agent_networks.push(net);
    }
    let log_destination = match raw.log.destination.as_str() {
        "stdout" | "-" => LogDestination::Stdout,
        "" => {
            return Err(key_error(
                "log.destination",
                "must be \"stdout\" or a path".into(),
            ));
        }
        p => LogDestination::File(resolve(PathBuf::from(p))),
    };
    let dns = compile_dns(raw.dns, key_error)?;
    let auth = compile_auth(raw.auth, key_error)?;
    let a = raw.admin;
    if a.max_connections == 0 {
        return Err(key_error(
            "admin.max_connections",
            "must be at least 1".into(),
        ));
    }
    let admin = AdminSettings {
        max_connections: a.max_connections,
        header_timeout: Duration::from_millis(a.header_timeout_ms.max(1)),
        body_timeout: Duration::from_millis(a.body_timeout_ms.max(1)),
        connection_timeout: Duration::from_millis(a.connection_timeout_ms.max(1)),
        metrics_token_file: a.metrics_token_file.map(&resolve),
        control_socket: (!a.control_socket.as_os_str().is_empty()).then_some(a.control_socket),
    };
    let cluster = compile_cluster(raw.cluster).map_err(|e| key_error(e.key(), e.to_string()))?;
    Ok(Config {
        source: None,
        rules_dir: resolve(raw.rules_dir),
        state_dir: resolve(raw.state_dir),
        default_ports: raw.default_ports,
        explicit_listen: raw.listen.explicit,
        admin_listen: raw.listen.admin,
        transparent_listen: raw.listen.transparent,
        interception,
        transparent_tls_ports: raw.transparent.tls_ports,
        transparent_http_ports: raw.transparent.http_ports,
        nft_agent_interfaces: raw.nftables.agent_interfaces,
        nft_agent_networks,
        nft_ipv6: raw.nftables.ipv6,
        nft_tproxy_mark: raw.nftables.tproxy_mark,
        budget_reset_hour_utc: raw.budgets.reset_hour_utc,
        webhook_secret_files: raw
            .kill_switch
            .webhook_secret_files
            .into_iter()
            .map(&resolve)
            .collect(),
        totp_secret_file: raw.kill_switch.totp_secret_file.map(&resolve),
        log_destination,
        log_queue: raw.log.queue,
        resolver_upstreams: upstreams,
        resolver_timeout: Duration::from_millis(raw.resolver.timeout_ms),
        handshake_timeout: Duration::from_millis(raw.timeouts.handshake_ms),
        connect_timeout: Duration::from_millis(raw.timeouts.connect_ms),
        idle_timeout: Duration::from_secs(raw.timeouts.idle_secs),
        drain_timeout: Duration::from_secs(raw.timeouts.drain_secs),
        max_connections: raw.caps.max_connections,
        max_connections_per_source: raw.caps.max_connections_per_source,
        max_connections_per_agent: raw.caps.max_connections_per_agent,
        max_connections_unknown: raw.caps.max_connections_unknown,
        max_request_head_bytes: raw.caps.max_request_head_bytes,
        max_handshake_bytes: raw.caps.max_handshake_bytes,
        dns_listen: raw.listen.dns,
        dns,
        admin,
        auth,
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, SourceError> {
        Config::from_source(&SourceFile {
            path: PathBuf::from("/etc/portcullis/portcullis.toml"),
            text: text.into(),
        })
    }

    #[test]
    fn builtin_default_serves_explicit_and_admin_on_loopback() {
        let c = Config::builtin();
        assert_eq!(c.explicit_listen, Some("127.0.0.1:3128".parse().unwrap()));
        assert_eq!(c.admin_listen, Some("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(c.rules_dir, PathBuf::from("./rules"));
        assert_eq!(c.default_ports, vec![80, 443]);
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = parse("rules_dir = \"r\"\n[timeouts]\nidle_sec = 3\n").unwrap_err();
        assert_eq!(e.line, 3);
        assert_eq!(e.key, "idle_sec");
        assert!(
            e.to_string()
                .starts_with("/etc/portcullis/portcullis.toml:3: key `idle_sec`"),
            "{e}"
        );
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let c = parse("rules_dir = \"rules\"\n").unwrap();
        assert_eq!(c.rules_dir, PathBuf::from("/etc/portcullis/rules"));
    }

    #[test]
    fn zero_values_are_rejected() {
        let e = parse("[timeouts]\nconnect_ms = 0\n").unwrap_err();
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
            ("[auth]\nforget_after_secs = 10\n", "auth.forget_after_secs"),
            ("[auth]\nguesses = 10\n", "guesses"),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.key, key, "{text}");
            assert_eq!(e.line, 2, "{text}");
        }
    }

    #[test]
    fn dns_section_is_validated() {
        let c = parse("[listen]\ndns = [\"10.66.0.1:53\"]\n").unwrap();
        assert_eq!(c.dns_listen, vec!["10.66.0.1:53".parse().unwrap()]);
        assert_eq!(c.dns.allowed_types, vec![1, 28, 5, 65, 64]);
        assert!(
            c.dns.refuse_with_nxdomain,
            "NXDOMAIN by default (docs/dns.md)"
        );
        let c = parse("[dns]\nrefuse_with = \"refused\"\n").unwrap();
        assert!(!c.dns.refuse_with_nxdomain);
        let e = parse("[dns]\nallowed_types = [\"A\", \"ANY\"]\n").unwrap_err();
        assert_eq!(e.key, "dns.allowed_types");
        let e = parse("[dns]\nrefuse_with = \"drop\"\n").unwrap_err();
        assert_eq!(e.key, "dns.refuse_with");
    }

    #[test]
    fn shipped_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/portcullis.toml");
        Config::load(&path).unwrap();
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
