//! The application: start-up, the listeners' contexts, reloads (`reload`) and the shutdown
//! sequence.
//!
//! Owns start-up order (policy loaded before any listener opens: until then nothing passes),
//! the live policy handle, and hands each listener a narrow context of its own
//! (`ProxyContext`, `DnsContext`, `AdminContext`); the stop sequence is `Shutdown`: stop
//! accepting, drain, then cut live tunnels.

mod reload;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::future::Future;

use arc_swap::ArcSwap;

use crate::admin::{AdminContext, LastReload, ReloadError};
use crate::config::Config;
use crate::dns::DnsContext;
use crate::killswitch::{self, KillSwitch};
use crate::policy::Policy;
use crate::proxy::upstream::Resolve;
use crate::proxy::{ConnectionCaps, ProxyContext, ProxySettings};
use crate::shutdown::Shutdown;
use crate::telemetry::{LogWriter, LogWriterError, Telemetry};

/// The application's own state: the configuration, the proxy's context (which holds the
/// live policy and the services every listener shares), and the reload's bookkeeping. The
/// listeners get narrow contexts made from it, never this.
pub struct App {
    config: Config,
    proxy: Arc<ProxyContext>,
    reload_lock: tokio::sync::Mutex<()>,
    last_reload: std::sync::Mutex<LastReload>,
}

impl App {
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn proxy(&self) -> &ProxyContext {
        &self.proxy
    }

    pub(crate) fn reload_lock(&self) -> &tokio::sync::Mutex<()> {
        &self.reload_lock
    }

    pub(crate) fn set_last_reload(&self, last: LastReload) {
        *self
            .last_reload
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = last;
    }
}

/// The admin API's handle on the application: reloads.
struct Reloader(Arc<App>);

impl crate::admin::Control for Reloader {
    fn reload(
        &self,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<u64, ReloadError>> + Send + 'static>> {
        let app = self.0.clone();
        Box::pin(async move { reload::reload(&app).await })
    }

    fn last_reload(&self) -> LastReload {
        self.0
            .last_reload
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }
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
    KillSwitch(#[from] killswitch::SecretFileError),
    #[error(
        "cluster: peers are configured, so kill_switch.webhook_secret_files must name a key (nodes sign their calls to each other with it) and listen.admin must be set (peers call it)"
    )]
    ClusterWithoutKey,
    #[error("limits: {0}")]
    Limits(#[from] crate::limits::budget::BudgetError),
    #[error("inspect: {0}")]
    Inspect(#[from] crate::proxy::inspect::engine::InspectError),
    #[error("agents inspect TLS ({0}) but there is no inspect CA: run `portcullis ca init`")]
    NoInspectCa(String),
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
    app: Arc<App>,
    pub explicit_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub transparent_addrs: Vec<SocketAddr>,
    /// Bound DNS forwarder addresses (UDP and TCP on each).
    pub dns_addrs: Vec<SocketAddr>,
    /// What the DNS listeners share (when any is configured).
    dns: Option<Arc<DnsContext>>,
    log: Option<LogWriter>,
}

/// Bind every configured listener and start serving with `policy`.
pub async fn start(
    config: Config,
    policy: Policy,
    resolver: Arc<dyn Resolve>,
) -> Result<Running, StartError> {
    start_with(
        config,
        policy,
        resolver,
        crate::proxy::kernel_original_destination(),
    )
    .await
}

/// [`start`] with the original-destination lookup injected (tests of transparent mode that
/// run without root).
pub async fn start_with(
    config: Config,
    policy: Policy,
    resolver: Arc<dyn Resolve>,
    original_destination: crate::proxy::OriginalDestination,
) -> Result<Running, StartError> {
    // Fail closed: the kill state is read before any listener opens.
    let shutdown = Shutdown::new();
    let keys = killswitch::read_keys(&config.kill_switch.webhook_secret_files)?;
    let totp = killswitch::read_totp(config.kill_switch.totp_secret_file.as_deref())?;
    if config.cluster.enabled() && (keys.is_empty() || config.listen.admin.is_none()) {
        return Err(StartError::ClusterWithoutKey);
    }
    let metrics_token = match &config.admin.metrics_token_file {
        Some(f) => Some(read_token(f)?),
        None => None,
    };
    let log = LogWriter::start(&config.log.destination, config.log.queue)?;
    let telemetry = Telemetry::new(&log);
    let nft = config.manages_nftables().then(crate::nft::Nft::default);
    let kill = KillSwitch::load(
        &config.state_dir,
        keys,
        totp,
        nft,
        shutdown.cut_token(),
        telemetry.clone(),
        crate::admin::unix_now(),
    );
    let limiter = crate::limits::Limiter::load(&config.state_dir, config.budgets.reset_hour_utc)?;
    // The CA is read (and its key's mode checked) whenever it exists; agents that inspect
    // need it.
    let inspector =
        crate::proxy::inspect::engine::Inspector::load(&config.state_dir, &config.inspect)?
            .map(Arc::new);
    if inspector.is_none()
        && let Some((_, a)) = policy.agents().find(|(_, a)| !a.inspect.is_empty())
    {
        return Err(StartError::NoInspectCa(a.name.to_string()));
    }
    // One accept queue length for every TCP listener; `config` checked that it fits.
    let backlog = i32::try_from(config.listen.backlog).unwrap_or(i32::MAX);
    let bind = |what, addr| {
        crate::sys::listen_tcp(addr, backlog).map_err(|source| StartError::Bind {
            what,
            addr,
            source,
        })
    };
    let explicit = match config.listen.explicit {
        Some(a) => Some(bind("explicit", a)?),
        None => None,
    };
    let mut transparent = Vec::new();
    let tproxy = config.transparent.interception == crate::sys::Interception::Tproxy;
    for addr in &config.listen.transparent {
        let l = crate::sys::bind_listener(*addr, tproxy, backlog).map_err(|source| {
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
    for addr in &config.listen.dns {
        let l = crate::dns::DnsListener::bind(*addr, backlog)
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
    let admin = match config.listen.admin {
        Some(a) => Some(bind("admin", a)?),
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
    let caps = ConnectionCaps::new(crate::proxy::CapLimits {
        total: config.caps.max_connections,
        per_source: config.caps.max_connections_per_source,
        per_agent: config.caps.max_connections_per_agent,
        unknown: config.caps.max_connections_unknown,
    });
    let generation = policy.generation();
    let proxy = Arc::new(ProxyContext {
        policy: Arc::new(ArcSwap::from_pointee(policy)),
        killswitch: Arc::new(kill),
        limiter,
        telemetry,
        resolver,
        tunnels: Arc::default(),
        caps,
        handshake: crate::proxy::peek::HandshakeBudget::new(config.caps.max_handshake_bytes),
        auth: crate::proxy::auth::Authenticator::new(config.auth.clone()),
        settings: ProxySettings {
            interception: config.transparent.interception,
            transparent_tls_ports: config.transparent.tls_ports.clone(),
            transparent_http_ports: config.transparent.http_ports.clone(),
            resolver_timeout: config.resolver.timeout,
            handshake_timeout: config.timeouts.handshake,
            connect_timeout: config.timeouts.connect,
            idle_timeout: config.timeouts.idle,
            max_request_head_bytes: config.caps.max_request_head_bytes,
        },
        shutdown: shutdown.clone(),
        inspector,
        original_destination,
    });
    let app = Arc::new(App {
        proxy: proxy.clone(),
        reload_lock: tokio::sync::Mutex::new(()),
        last_reload: std::sync::Mutex::new(LastReload {
            ok: true,
            generation,
            error: None,
            revoked: 0,
        }),
        config,
    });
    let config = &app.config;
    for scope in proxy.killswitch.engaged_scopes() {
        proxy.telemetry.metrics.set_kill_switch(&scope, true);
    }
    if config.manages_nftables() {
        // The packet layer must agree with the state we came up with (killed stays killed).
        let policy = proxy.policy.load_full();
        let nft = proxy
            .killswitch
            .resync_nft(&policy, &config.nftables.agent_networks)
            .await;
        if nft != "ok" {
            tracing::error!(%nft, "kill sets not synchronised with the kill state");
        }
    }
    // A cluster node refuses every agent until it has synced with its peers (src/cluster/).
    proxy.killswitch.hold(config.cluster.enabled());
    // The rules watch is registered before any listener serves (see reload::watch).
    let watcher = reload::watch(app.clone(), Duration::from_millis(200));
    shutdown.spawn(watcher);
    let explicit_addr = explicit.as_ref().and_then(|l| l.local_addr().ok());
    let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
    let transparent_addrs = transparent
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    for l in transparent {
        shutdown.spawn(crate::proxy::transparent::serve(proxy.clone(), l));
    }
    let dns_addrs = dns.iter().filter_map(|l| l.local_addr().ok()).collect();
    let mut dns_context = None;
    if let Some(forwarder) = dns_forwarder {
        let ctx = Arc::new(DnsContext {
            policy: proxy.policy.clone(),
            killswitch: proxy.killswitch.clone(),
            telemetry: proxy.telemetry.clone(),
            caps: proxy.caps.clone(),
            shutdown: shutdown.clone(),
            handshake_timeout: config.timeouts.handshake,
            tcp_idle: config.dns.tcp_idle,
        });
        for l in dns {
            crate::dns::spawn(ctx.clone(), forwarder.clone(), l);
        }
        dns_context = Some(ctx);
    }
    if let Some(l) = explicit {
        shutdown.spawn(crate::proxy::explicit::serve(proxy.clone(), l));
    }
    shutdown.spawn(reload::on_sighup(app.clone()));
    shutdown.spawn(persist_budgets(proxy.clone()));
    shutdown.spawn(log_summaries(proxy.clone()));
    let cluster = crate::cluster::Cluster::load(
        &config.cluster,
        &config.state_dir,
        crate::cluster::Handles {
            killswitch: proxy.killswitch.clone(),
            policy: proxy.policy.clone(),
            telemetry: proxy.telemetry.clone(),
            nft_agent_networks: config.nftables.agent_networks.clone(),
            shutdown: shutdown.clone(),
        },
    )
    .map(Arc::new);
    if let Some(c) = &cluster {
        crate::cluster::start(c);
    }
    if admin.is_some() || control.is_some() {
        let ctx = Arc::new(AdminContext {
            policy: proxy.policy.clone(),
            killswitch: proxy.killswitch.clone(),
            telemetry: proxy.telemetry.clone(),
            caps: proxy.caps.clone(),
            tunnels: proxy.tunnels.clone(),
            settings: config.admin.clone(),
            nft_agent_networks: config.nftables.agent_networks.clone(),
            shutdown: shutdown.clone(),
            control: Arc::new(Reloader(app.clone())),
            cluster,
        });
        if let Some(l) = admin {
            shutdown.spawn(crate::admin::serve(ctx.clone(), l, metrics_token));
        }
        if let Some(l) = control {
            shutdown.spawn(crate::admin::local::serve(ctx, l));
        }
    }
    Ok(Running {
        app,
        explicit_addr,
        admin_addr,
        transparent_addrs,
        dns_addrs,
        dns: dns_context,
        log: Some(log),
    })
}

impl Running {
    /// The generation of the policy now serving.
    pub fn policy_generation(&self) -> u64 {
        self.app.proxy().policy.load().generation()
    }

    /// What the DNS listeners share, for driving a `dns::Forwarder` directly (the fuzz
    /// target); `None` without a `listen.dns` address.
    pub fn dns_context(&self) -> Option<Arc<DnsContext>> {
        self.dns.clone()
    }

    /// Connections holding a slot now (every listener's).
    pub fn connections_in_use(&self) -> usize {
        self.app.proxy().caps.in_use()
    }

    /// Stop accepting, let live connections drain for up to `drain`, cut the rest, flush
    /// the log.
    pub async fn shutdown(mut self, drain: Duration) {
        let s = self.app.proxy();
        let stop = &s.shutdown;
        stop.stop_accepting();
        if tokio::time::timeout(drain, stop.wait()).await.is_err() {
            stop.cut();
            let _ = tokio::time::timeout(Duration::from_secs(2), stop.wait()).await;
        }
        stop.cut();
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
async fn persist_budgets(shared: Arc<ProxyContext>) {
    loop {
        let stop = tokio::select! {
            () = shared.shutdown.stopping() => true,
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
async fn log_summaries(shared: Arc<ProxyContext>) {
    loop {
        let stop = tokio::select! {
            () = shared.shutdown.stopping() => true,
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
