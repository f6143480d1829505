//! The running process: shared state, listeners, and the shutdown sequence.
//!
//! Owns start-up order (policy loaded before any listener opens: until then nothing passes),
//! the atomic policy handle, and the cancellation tree: `stop_accepting` ends accept loops;
//! `cut` ends live tunnels once the drain grace period is over.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::killswitch::{self, KillSwitch};
use crate::policy::Policy;
use crate::proxy::ConnectionCaps;
use crate::proxy::upstream::Resolve;
use crate::telemetry::{LogWriter, LogWriterError, Telemetry};

/// State shared by every listener and connection task.
pub struct Shared {
    pub config: Config,
    pub killswitch: KillSwitch,
    /// Per-agent limits: rate, concurrency, bandwidth, daily budget.
    pub limiter: Arc<crate::limits::Limiter>,
    /// Live tunnels, re-checked after every reload.
    pub tunnels: Arc<crate::reload::Tunnels>,
    pub reload_lock: tokio::sync::Mutex<()>,
    pub last_reload: std::sync::Mutex<crate::reload::LastReload>,
    pub policy: ArcSwap<Policy>,
    pub resolver: Arc<dyn Resolve>,
    pub telemetry: Telemetry,
    pub caps: Arc<ConnectionCaps>,
    /// Bytes held in hellos and request heads not yet complete, all connections together.
    pub handshake: Arc<crate::proxy::peek::HandshakeBudget>,
    /// Proxy Basic auth: recent successes, per-source back-off, the verification limit.
    pub auth: crate::proxy::auth::Authenticator,
    /// Fired on SIGTERM: listeners stop accepting.
    pub stop_accepting: CancellationToken,
    /// Fired when draining is over: live tunnels close.
    pub cut: CancellationToken,
    pub tracker: TaskTracker,
    /// The peers kill state is shared with (`[cluster]`), if any.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Log(#[from] LogWriterError),
    #[error("kill switch: {0}")]
    KillSwitch(String),
    #[error(
        "cluster: peers are configured, so kill_switch.webhook_secret_files must name a key (nodes sign their calls to each other with it)"
    )]
    ClusterWithoutKey,
    #[error("limits: {0}")]
    Limits(String),
    #[error("dns forwarder: {0}")]
    Dns(#[from] crate::dns::DnsError),
    #[error("cannot bind the control socket {path}: {source}")]
    ControlSocket {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("admin.metrics_token_file {path}: {why}")]
    MetricsToken {
        path: std::path::PathBuf,
        why: String,
    },
}

/// The `/metrics` bearer token: the file's content, trimmed; at least 16 bytes.
fn read_token(path: &std::path::Path) -> Result<Arc<[u8]>, StartError> {
    let fail = |why: String| StartError::MetricsToken {
        path: path.to_path_buf(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let token = text.trim();
    if token.len() < 16 {
        return Err(fail("the token must be at least 16 characters".into()));
    }
    Ok(Arc::from(token.as_bytes()))
}

/// A started gateway. Drop it only after [`Running::shutdown`].
pub struct Running {
    pub shared: Arc<Shared>,
    pub explicit_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub transparent_addrs: Vec<SocketAddr>,
    /// Bound DNS forwarder addresses (UDP and TCP on each).
    pub dns_addrs: Vec<SocketAddr>,
    log: Option<LogWriter>,
}

/// Bind every configured listener and start serving with `policy`.
pub async fn start(
    config: Config,
    policy: Policy,
    resolver: Arc<dyn Resolve>,
) -> Result<Running, StartError> {
    // Fail closed: the kill state is read before any listener opens.
    let cut = CancellationToken::new();
    let keys =
        killswitch::read_keys(&config.webhook_secret_files).map_err(StartError::KillSwitch)?;
    let totp = killswitch::read_totp(config.totp_secret_file.as_deref())
        .map_err(StartError::KillSwitch)?;
    if config.cluster.enabled() && keys.is_empty() {
        return Err(StartError::ClusterWithoutKey);
    }
    let cluster = crate::cluster::Cluster::load(&config.cluster, &config.state_dir).map(Arc::new);
    let metrics_token = match &config.admin.metrics_token_file {
        Some(f) => Some(read_token(f)?),
        None => None,
    };
    let log = LogWriter::start(&config.log_destination, config.log_queue)?;
    let telemetry = Telemetry::new(&log);
    let nft = config.manages_nftables().then(crate::nft::Nft::default);
    let kill = KillSwitch::load(
        &config.state_dir,
        keys,
        totp,
        nft,
        &cut,
        telemetry.clone(),
        crate::admin::unix_now(),
    );
    let limiter = crate::limits::Limiter::load(&config.state_dir, config.budget_reset_hour_utc)
        .map_err(StartError::Limits)?;
    let bind = |what, addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { what, addr, source })
    };
    let explicit = match config.explicit_listen {
        Some(a) => Some(bind("explicit", a).await?),
        None => None,
    };
    let mut transparent = Vec::new();
    for addr in &config.transparent_listen {
        let l = crate::proxy::transparent::bind(*addr, config.interception).map_err(|source| {
            StartError::Bind {
                what: "transparent",
                addr: *addr,
                source,
            }
        })?;
        transparent.push(l);
    }
    // DNS forwarder (src/dns/): UDP + TCP on each `listen.dns` address.
    let mut dns = Vec::new();
    for addr in &config.dns_listen {
        let l = crate::dns::DnsListener::bind(*addr)
            .await
            .map_err(|source| StartError::Bind {
                what: "dns",
                addr: *addr,
                source,
            })?;
        dns.push(l);
    }
    let dns_forwarder = if dns.is_empty() {
        None
    } else {
        Some(Arc::new(crate::dns::Forwarder::new(&config)?))
    };
    let admin = match config.admin_listen {
        Some(a) => Some(bind("admin", a).await?),
        None => None,
    };
    let control = match config.control_socket() {
        Some(path) => Some(
            crate::admin::local::bind(&path)
                .map_err(|source| StartError::ControlSocket { path, source })?,
        ),
        None => None,
    };
    telemetry
        .metrics
        .policy_generation
        .set(policy.generation() as i64);
    for (_, a) in policy.agents() {
        if let Some(limit) = a.limits.daily_bytes {
            telemetry.metrics.set_budget(&a.name, limit, limit);
        }
    }
    let shared = Arc::new(Shared {
        killswitch: kill,
        limiter,
        tunnels: Arc::default(),
        reload_lock: tokio::sync::Mutex::new(()),
        last_reload: std::sync::Mutex::new(crate::reload::LastReload {
            ok: true,
            generation: policy.generation(),
            error: None,
            revoked: 0,
        }),
        caps: ConnectionCaps::new(crate::proxy::CapLimits {
            total: config.max_connections,
            per_source: config.max_connections_per_source,
            per_agent: config.max_connections_per_agent,
            unknown: config.max_connections_unknown,
        }),
        handshake: crate::proxy::peek::HandshakeBudget::new(config.max_handshake_bytes),
        auth: crate::proxy::auth::Authenticator::new(config.auth.clone()),
        config,
        policy: ArcSwap::from_pointee(policy),
        resolver,
        telemetry,
        stop_accepting: CancellationToken::new(),
        cut,
        tracker: TaskTracker::new(),
        cluster,
    });
    for scope in shared.killswitch.engaged_scopes() {
        shared.telemetry.metrics.set_kill_switch(&scope, true);
    }
    if shared.config.manages_nftables() {
        // The packet layer must agree with the state we came up with (killed stays killed).
        let policy = shared.policy.load_full();
        let nft = shared
            .killswitch
            .resync_nft(&policy, &shared.config.nft_agent_networks)
            .await;
        if nft != "ok" {
            tracing::error!(%nft, "kill sets not synchronised with the kill state");
        }
    }
    // A cluster node refuses every agent until it has synced with its peers (src/cluster/).
    crate::cluster::start(&shared);
    // The rules watch is registered before any listener serves (see reload::watch).
    let watcher = crate::reload::watch(shared.clone(), Duration::from_millis(200));
    shared.tracker.spawn(watcher);
    let explicit_addr = explicit.as_ref().and_then(|l| l.local_addr().ok());
    let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
    let transparent_addrs = transparent
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    for l in transparent {
        shared
            .tracker
            .spawn(crate::proxy::transparent::serve(shared.clone(), l));
    }
    let dns_addrs = dns.iter().filter_map(|l| l.local_addr().ok()).collect();
    if let Some(forwarder) = dns_forwarder {
        for l in dns {
            crate::dns::spawn(shared.clone(), forwarder.clone(), l);
        }
    }
    if let Some(l) = explicit {
        shared
            .tracker
            .spawn(crate::proxy::explicit::serve(shared.clone(), l));
    }
    shared
        .tracker
        .spawn(crate::reload::on_sighup(shared.clone()));
    shared.tracker.spawn(persist_budgets(shared.clone()));
    shared.tracker.spawn(log_summaries(shared.clone()));
    if let Some(l) = admin {
        shared
            .tracker
            .spawn(crate::admin::serve(shared.clone(), l, metrics_token));
    }
    if let Some(l) = control {
        shared
            .tracker
            .spawn(crate::admin::local::serve(shared.clone(), l));
    }
    Ok(Running {
        shared,
        explicit_addr,
        admin_addr,
        transparent_addrs,
        dns_addrs,
        log: Some(log),
    })
}

impl Running {
    /// Stop accepting, let live connections drain for up to `drain`, cut the rest, flush
    /// the log.
    pub async fn shutdown(mut self, drain: Duration) {
        let s = &self.shared;
        s.stop_accepting.cancel();
        s.tracker.close();
        if tokio::time::timeout(drain, s.tracker.wait()).await.is_err() {
            s.cut.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(2), s.tracker.wait()).await;
        }
        s.cut.cancel();
        // Tunnels charged their last bytes as they ended: save the final budgets.
        let limiter = s.limiter.clone();
        let _ = tokio::task::spawn_blocking(move || limiter.save()).await;
        s.telemetry.flush_summaries();
        if let Some(log) = self.log.take() {
            // Other Telemetry clones may still be alive in detached tasks; do not wait on
            // them forever.
            let _ = tokio::task::spawn_blocking(move || log.finish()).await;
        }
    }
}

/// Save the budgets (when they changed) and refresh their gauges every few seconds, and once
/// more at shutdown.
async fn persist_budgets(shared: Arc<Shared>) {
    loop {
        let stop = tokio::select! {
            () = shared.stop_accepting.cancelled() => true,
            () = tokio::time::sleep(Duration::from_secs(5)) => false,
        };
        let s = shared.clone();
        let _ = tokio::task::spawn_blocking(move || {
            s.limiter.save();
            s.limiter.publish(&s.policy.load(), &s.telemetry.metrics);
        })
        .await;
        if stop {
            return;
        }
    }
}

/// Every second, a summary line for what the agents' log shares held back; once more at
/// shutdown.
async fn log_summaries(shared: Arc<Shared>) {
    loop {
        let stop = tokio::select! {
            () = shared.stop_accepting.cancelled() => true,
            () = tokio::time::sleep(Duration::from_secs(1)) => false,
        };
        shared.telemetry.flush_summaries();
        if stop {
            return;
        }
    }
}

/// Wait for SIGTERM or SIGINT.
pub async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
