//! Policy reload (DESIGN §3): build a whole new `Policy`, validate, swap atomically, then
//! re-check every live tunnel against the new generation and close those it no longer allows
//! (`policy_revoked`). On any error the running policy stays; the error is logged, counted
//! and shown by `/healthz`.
//!
//! Triggers: the rules directory is watched (debounced; rename-into-place and symlink swaps
//! are directory events too), SIGHUP, and `POST /v1/reload`. Reloads run one at a time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::gateway::Shared;
use crate::hash::RuleKeyMap;
use crate::policy::{Policy, Target};

/// What the last reload did, for `/healthz`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LastReload {
    pub ok: bool,
    pub generation: u64,
    pub error: Option<String>,
    pub revoked: usize,
}

/// Live tunnels, so a new policy can be checked against each of them.
#[derive(Debug, Default)]
pub struct Tunnels {
    next: AtomicU64,
    live: Mutex<RuleKeyMap<u64, TunnelEntry>>,
}

#[derive(Debug)]
struct TunnelEntry {
    agent: Arc<str>,
    target: Target,
    /// The addresses the decision checked (the dialled one, once known).
    addrs: Vec<std::net::IpAddr>,
    cancel: CancellationToken,
    revoked: Arc<AtomicBool>,
}

/// Would `policy` still allow `agent`'s tunnel to `target` at `addrs`: the name rules and
/// every address check (`allow_cidrs`, or `resolve_cidrs` for a name's addresses) the
/// decision relied on.
pub fn still_allowed(
    policy: &Policy,
    agent: &str,
    target: &Target,
    addrs: &[std::net::IpAddr],
) -> bool {
    let agent = policy.agent_by_name(agent);
    let origin = match target.host {
        crate::policy::Host::Ip(_) => crate::policy::AddressOrigin::Literal,
        crate::policy::Host::Name(_) => crate::policy::AddressOrigin::Resolved,
    };
    policy.evaluate(agent, target).is_allow()
        && addrs.iter().all(|ip| {
            policy
                .check_address(agent, *ip, target.port, origin)
                .is_ok()
        })
}

/// Registration of one live tunnel; removed on drop.
#[derive(Debug)]
pub struct TunnelRegistration {
    tunnels: Arc<Tunnels>,
    id: u64,
    revoked: Arc<AtomicBool>,
}

impl TunnelRegistration {
    /// True when a reload cancelled this tunnel.
    pub fn revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }
}

impl Drop for TunnelRegistration {
    fn drop(&mut self) {
        self.tunnels.lock_live().remove(&self.id);
    }
}

impl Tunnels {
    /// The live map, even after a panic elsewhere poisoned the lock: skipping it would let
    /// a tunnel escape revocation (fail open); every update to it is a single insert/remove.
    fn lock_live(&self) -> std::sync::MutexGuard<'_, RuleKeyMap<u64, TunnelEntry>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Register a tunnel of `agent` to `target` at `addrs`, cancelled through `cancel` if
    /// revoked. The caller then checks the live policy once ([`still_allowed`]): a reload
    /// that swapped the policy between the decision and this registration is caught there,
    /// every later one by [`Tunnels::revoke_disallowed`].
    pub fn register(
        self: &Arc<Self>,
        agent: Arc<str>,
        target: Target,
        addrs: Vec<std::net::IpAddr>,
        cancel: CancellationToken,
    ) -> TunnelRegistration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let revoked = Arc::new(AtomicBool::new(false));
        self.lock_live().insert(
            id,
            TunnelEntry {
                agent,
                target,
                addrs,
                cancel,
                revoked: revoked.clone(),
            },
        );
        TunnelRegistration {
            tunnels: self.clone(),
            id,
            revoked,
        }
    }

    /// Cancel every tunnel `policy` no longer allows (agent gone, target denied, or an
    /// address no longer covered by `allow_cidrs`). Returns how many were revoked. The lock
    /// is held only to collect, never across I/O.
    pub fn revoke_disallowed(&self, policy: &Policy) -> usize {
        let live = self.lock_live();
        let mut n = 0;
        for entry in live.values() {
            if !still_allowed(policy, &entry.agent, &entry.target, &entry.addrs) {
                entry.revoked.store(true, Ordering::Release);
                entry.cancel.cancel();
                n += 1;
            }
        }
        n
    }

    pub fn len(&self) -> usize {
        self.lock_live().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reload the rules now. Returns the new generation, or the errors (old policy kept).
pub async fn reload(shared: &Shared) -> Result<u64, String> {
    let _one_at_a_time = shared.reload_lock.lock().await;
    let next = shared.policy.load().generation() + 1;
    let dir = shared.config.rules_dir.clone();
    let ports = shared.config.default_ports.clone();
    // Compiling 100k rules takes ~0.2 s: off the async workers.
    let built = tokio::task::spawn_blocking(move || Policy::load(&dir, &ports, next)).await;
    let metrics = &shared.telemetry.metrics;
    match built {
        Ok(Ok(policy)) => {
            let policy = Arc::new(policy);
            shared.policy.store(policy.clone());
            metrics
                .policy_generation
                .set(i64::try_from(next).unwrap_or(i64::MAX));
            metrics.reload(true);
            let revoked = shared.tunnels.revoke_disallowed(&policy);
            if shared.config.manages_nftables() {
                // An agent's sources or bindings may have changed: the kill sets follow.
                let nft = shared
                    .killswitch
                    .resync_nft(&policy, &shared.config.nftables.agent_networks)
                    .await;
                if nft != "ok" {
                    tracing::error!(%nft, "kill sets not synchronised after the reload");
                }
            }
            tracing::info!(generation = next, revoked, "policy reloaded");
            for w in policy.warnings() {
                tracing::warn!("rules: {w}");
            }
            store_last(
                shared,
                LastReload {
                    ok: true,
                    generation: next,
                    error: None,
                    revoked,
                },
            );
            Ok(next)
        }
        Ok(Err(errors)) => {
            metrics.reload(false);
            let error = errors.to_string();
            tracing::error!(%error, "policy reload failed; keeping generation {}", next - 1);
            store_last(
                shared,
                LastReload {
                    ok: false,
                    generation: next - 1,
                    error: Some(error.clone()),
                    revoked: 0,
                },
            );
            Err(error)
        }
        Err(e) => {
            metrics.reload(false);
            Err(e.to_string())
        }
    }
}

fn store_last(shared: &Shared, last: LastReload) {
    if let Ok(mut l) = shared.last_reload.lock() {
        *l = last;
    }
}

/// Reload on SIGHUP until shutdown.
pub async fn on_sighup(shared: Arc<Shared>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        loop {
            tokio::select! {
                () = shared.stop_accepting.cancelled() => return,
                got = hup.recv() => {
                    if got.is_none() {
                        return;
                    }
                    let _ = reload(&shared).await;
                }
            }
        }
    }
}

/// Watch the rules directory and reload after changes settle (debounced).
/// Whether a watcher event can change what the rules say. Opening, reading and closing a
/// file unwritten are not changes: the reload itself reads every file, and counting those
/// reads would make the watcher reload forever, once per debounce period.
fn is_change(kind: &notify_debouncer_full::notify::EventKind) -> bool {
    use notify_debouncer_full::notify::EventKind;
    match kind {
        // A write is already a Modify event; its close would only split one edit into two
        // reloads when the two land in different debounce windows.
        EventKind::Access(_) => false,
        EventKind::Any | EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
        EventKind::Other => true,
    }
}

/// Watch the rules directory and reload on changes (debounced). The watch is registered
/// now, before this returns (so before the listeners serve): a change made as soon as the
/// gateway is up is never missed. The returned future runs the reloads until shutdown.
pub fn watch(shared: Arc<Shared>, debounce: Duration) -> impl Future<Output = ()> + Send {
    use notify_debouncer_full::notify::RecursiveMode;
    use notify_debouncer_full::{DebounceEventResult, new_debouncer};
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let debouncer = new_debouncer(debounce, None, move |res: DebounceEventResult| {
        if matches!(res, Ok(ref events) if events.iter().any(|e| is_change(&e.event.kind))) {
            // A full channel already holds a pending reload: coalesce.
            let _ = tx.try_send(());
        }
    })
    .and_then(|mut d| {
        d.watch(&shared.config.rules_dir, RecursiveMode::Recursive)
            .map(|()| d)
    });
    if let Err(e) = &debouncer {
        tracing::error!(error = %e, "cannot watch the rules directory; SIGHUP and /v1/reload still work");
    }
    async move {
        let Ok(_debouncer) = debouncer else { return };
        loop {
            tokio::select! {
                () = shared.stop_accepting.cancelled() => return,
                got = rx.recv() => {
                    if got.is_none() {
                        return;
                    }
                    let _ = reload(&shared).await;
                }
            }
        }
    }
}
