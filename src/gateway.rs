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
    pub policy: ArcSwap<Policy>,
    pub resolver: Arc<dyn Resolve>,
    pub telemetry: Telemetry,
    pub caps: Arc<ConnectionCaps>,
    /// Fired on SIGTERM: listeners stop accepting.
    pub stop_accepting: CancellationToken,
    /// Fired when draining is over: live tunnels close.
    pub cut: CancellationToken,
    pub tracker: TaskTracker,
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
}

/// A started gateway. Drop it only after [`Running::shutdown`].
pub struct Running {
    pub shared: Arc<Shared>,
    pub explicit_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub transparent_addrs: Vec<SocketAddr>,
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
    let secrets =
        killswitch::read_secrets(&config.webhook_secret_files).map_err(StartError::KillSwitch)?;
    let totp = killswitch::read_totp(config.totp_secret_file.as_deref())
        .map_err(StartError::KillSwitch)?;
    let nft = config.manages_nftables().then(crate::nft::Nft::default);
    let kill = KillSwitch::load(&config.state_dir, secrets, totp, nft, &cut);
    let log = LogWriter::start(&config.log_destination, config.log_queue)?;
    let telemetry = Telemetry::new(&log);
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
    let admin = match config.admin_listen {
        Some(a) => Some(bind("admin", a).await?),
        None => None,
    };
    telemetry
        .metrics
        .policy_generation
        .set(policy.generation() as i64);
    let shared = Arc::new(Shared {
        killswitch: kill,
        caps: ConnectionCaps::new(config.max_connections, config.max_connections_per_source),
        config,
        policy: ArcSwap::from_pointee(policy),
        resolver,
        telemetry,
        stop_accepting: CancellationToken::new(),
        cut,
        tracker: TaskTracker::new(),
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
    if let Some(l) = explicit {
        shared
            .tracker
            .spawn(crate::proxy::explicit::serve(shared.clone(), l));
    }
    if let Some(l) = admin {
        shared.tracker.spawn(crate::admin::serve(shared.clone(), l));
    }
    Ok(Running {
        shared,
        explicit_addr,
        admin_addr,
        transparent_addrs,
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
        if let Some(log) = self.log.take() {
            // Other Telemetry clones may still be alive in detached tasks; do not wait on
            // them forever.
            let _ = tokio::task::spawn_blocking(move || log.finish()).await;
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
