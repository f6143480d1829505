//! Policy reload (docs/configuration.md, "Reload"): build a whole new `Policy`, validate, swap
//! atomically, then re-check every live tunnel against the new generation and close those it no
//! longer allows (`policy_revoked`). On any error the running policy stays; the error is logged,
//! counted and shown by `/healthz`.
//!
//! Triggers: the rules directory is watched (debounced; rename-into-place and symlink swaps
//! are directory events too), SIGHUP, and `POST /v1/reload`. Reloads run one at a time.

use std::sync::Arc;
use std::time::Duration;

use crate::admin::{LastReload, ReloadError};
use crate::gateway::App;
use crate::policy::Policy;

/// Reload the rules now. Returns the new generation, or the errors (old policy kept).
pub async fn reload(app: &App) -> Result<u64, ReloadError> {
    let _one_at_a_time = app.reload_lock().lock().await;
    let (config, shared) = (app.config(), app.proxy());
    let next = shared.policy.load().generation() + 1;
    let dir = config.rules_dir.clone();
    let ports = config.default_ports.clone();
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
            if config.manages_nftables() {
                // An agent's sources or bindings may have changed: the kill sets follow.
                let nft = shared
                    .killswitch
                    .resync_nft(&policy, &config.nft_agent_networks)
                    .await;
                if nft != "ok" {
                    tracing::error!(%nft, "kill sets not synchronised after the reload");
                }
            }
            tracing::info!(generation = next, revoked, "policy reloaded");
            for w in policy.warnings() {
                tracing::warn!("rules: {w}");
            }
            app.set_last_reload(LastReload {
                ok: true,
                generation: next,
                error: None,
                revoked,
            });
            Ok(next)
        }
        Ok(Err(errors)) => {
            metrics.reload(false);
            let error = errors.to_string();
            tracing::error!(%error, "policy reload failed; keeping generation {}", next - 1);
            app.set_last_reload(LastReload {
                ok: false,
                generation: next - 1,
                error: Some(error.clone()),
                revoked: 0,
            });
            Err(ReloadError::Rules(error))
        }
        Err(_) => {
            metrics.reload(false);
            Err(ReloadError::Task)
        }
    }
}

/// Reload on SIGHUP until shutdown.
pub async fn on_sighup(app: Arc<App>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        loop {
            tokio::select! {
                () = app.proxy().shutdown.stopping() => return,
                got = hup.recv() => {
                    if got.is_none() {
                        return;
                    }
                    let _ = reload(&app).await;
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
pub fn watch(app: Arc<App>, debounce: Duration) -> impl Future<Output = ()> + Send {
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
        d.watch(&app.config().rules_dir, RecursiveMode::Recursive)
            .map(|()| d)
    });
    if let Err(e) = &debouncer {
        tracing::error!(error = %e, "cannot watch the rules directory; SIGHUP and /v1/reload still work");
    }
    async move {
        let Ok(_debouncer) = debouncer else { return };
        loop {
            tokio::select! {
                () = app.proxy().shutdown.stopping() => return,
                got = rx.recv() => {
                    if got.is_none() {
                        return;
                    }
                    let _ = reload(&app).await;
                }
            }
        }
    }
}
