//! The kill switch: one signed webhook call cuts every route out, for all agents or one, and
//! only a signed call with a current TOTP code reopens them (docs/kill-switch.md).
//!
//! Owns the killed state (durable, fail-closed: unreadable means killed), the cancellation
//! tree that closes live tunnels (all → agent → tunnel), keeping the nftables `kill_sources`
//! sets equal to the state, and everything that guards it: who may ask (`webhook`: Standard
//! Webhooks signatures and a replay guard that never locks a kill out), how often revive may
//! be tried (`attempts`), the TOTP check (`totp`), and the log line and metric of every
//! refused request. The state file (`state`) holds the kill and the revive guard together.
//! Must not decide anything about domains; the data path only asks [`KillSwitch::is_killed`].

pub mod attempts;
pub(crate) mod peer;
pub mod state;
pub mod totp;
pub mod webhook;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use ipnet::IpNet;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::hash::RuleKeyMap;
use crate::nft::Nft;
use crate::policy::{MacAddr, Policy};
use crate::telemetry::Telemetry;
use state::{KillEntry, KillState, Loaded};
use totp::{TotpGuard, TotpSecret};
use webhook::{ReplayGuard, Secret, SignedRequest, WebhookError};

/// File name of the state inside `state_dir`.
pub const STATE_FILE: &str = "killswitch.json";
/// Accepted request ids kept in the state file at most (they leave it as their timestamp
/// leaves the replay window; a flood beyond this forgets the oldest, which only matters for
/// kills, and a replayed kill only closes).
const MAX_DURABLE_IDS: usize = 1_024;

/// What a request asks to cut or reopen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    Agent(String),
}

impl Scope {
    pub fn label(&self) -> &str {
        match self {
            Scope::All => "all",
            Scope::Agent(a) => a,
        }
    }
}

/// The JSON body of `/v1/kill` and `/v1/revive`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub scope: String,
    #[serde(default)]
    pub agent: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    /// Revive only: the current TOTP code.
    #[serde(default)]
    pub totp: Option<String>,
}

/// Who asked: the webhook key that signed the request (`key:<file name>`), or `local` (the
/// control socket, reachable only by root and the service user). Revive attempts are counted
/// per sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sender(Arc<str>);

impl Sender {
    pub fn local() -> Self {
        Sender(Arc::from("local"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A webhook key and the name its sender is known by.
#[derive(Debug, Clone)]
pub struct Key {
    pub sender: Sender,
    pub secret: Secret,
}

/// The signed request as it arrived, with where it came from (for the log).
#[derive(Debug, Clone, Copy)]
pub struct Signed<'a> {
    pub request: SignedRequest<'a>,
    pub source: Option<IpAddr>,
}

/// An authenticated request: who sent it, its id and timestamp (remembered durably once it
/// acted), and where it came from (for the log).
#[derive(Debug, Clone, Copy)]
pub struct Accepted<'a> {
    pub sender: &'a Sender,
    pub id: Option<(&'a str, i64)>,
    pub source: Option<IpAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum KillError {
    #[error("unauthorized: {0}")]
    Unauthorized(#[from] WebhookError),
    #[error("a valid TOTP code is required to revive")]
    BadTotp {
        /// Set when this failure locked revive.
        locked_until: Option<i64>,
    },
    #[error("revive is locked after failed attempts until {until} (unix time)")]
    Locked { until: i64 },
    #[error(
        "revive is not configured: set kill_switch.totp_secret_file (or, on the gateway, stop \
         portcullis and remove the kill state file, killswitch.json in state_dir)"
    )]
    ReviveNotConfigured,
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("the kill switch has no webhook secret configured")]
    NotConfigured,
    #[error("the state could not be written; nothing reopened")]
    NotWritten,
}

/// The state as the data path reads it.
#[derive(Debug, Default)]
struct View {
    state: KillState,
    /// The state file could not be trusted at start: everyone is killed until a revive.
    corrupt: Option<String>,
}

impl View {
    fn is_killed(&self, agent: &str) -> bool {
        self.corrupt.is_some() || self.state.is_killed(agent)
    }
}

/// The authoritative state, changed one operation at a time: a revive's lock check, TOTP
/// check and failure count happen under one lock, so concurrent guesses cannot slip in
/// between the check and the count.
#[derive(Debug, Default)]
struct Ledger {
    state: KillState,
    corrupt: Option<String>,
}

struct Tokens {
    all: CancellationToken,
    agents: RuleKeyMap<String, CancellationToken>,
}

/// What a kill or revive did, returned to the caller as JSON.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub action: &'static str,
    pub scope: String,
    pub state_written: bool,
    pub tunnels_cut: i64,
    pub nft: String,
}

pub struct KillSwitch {
    path: PathBuf,
    view: Arc<ArcSwap<View>>,
    /// nftables syncs run one at a time, each writing the view as it is when it runs: a
    /// slower, older sync never lands after a newer one.
    nft_serial: Arc<Mutex<()>>,
    /// The webhook secrets, and the sender each one names (same order).
    secrets: Vec<Secret>,
    senders: Vec<Sender>,
    totp: Option<TotpSecret>,
    /// Ids seen in the replay window, in memory; seeded from the state file at start.
    replay: Mutex<ReplayGuard>,
    ops: tokio::sync::Mutex<Ledger>,
    tokens: Mutex<Tokens>,
    /// Parent of every tunnel token: the process-wide `cut` (shutdown).
    parent: CancellationToken,
    nft: Option<Nft>,
    /// The last nftables sync's error, for `/healthz`.
    nft_error: Mutex<Option<String>>,
    telemetry: Telemetry,
    /// Every agent refused while a cluster node has not synced with its peers at start-up
    /// (src/cluster/).
    held: AtomicBool,
}

impl std::fmt::Debug for KillSwitch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KillSwitch")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl KillSwitch {
    /// Read the state before anything listens (fail closed: corrupt or unreadable = killed).
    /// `now` (unix seconds) judges which remembered ids are still inside the replay window.
    pub fn load(
        state_dir: &Path,
        keys: Vec<Key>,
        totp: Option<TotpSecret>,
        nft: Option<Nft>,
        parent: &CancellationToken,
        telemetry: Telemetry,
        now: i64,
    ) -> Self {
        let path = state_dir.join(STATE_FILE);
        let ledger = match state::load(&path) {
            Loaded::Fresh => Ledger::default(),
            Loaded::State(state) => Ledger {
                state,
                corrupt: None,
            },
            Loaded::Corrupt(why) => {
                tracing::error!(path = %path.display(), %why, "kill switch state unreadable: every agent is KILLED until a signed revive");
                // Killed in the state itself, not only by the flag: every later write (a
                // failed revive's count, an agent kill, a lock clear) keeps it killed, and only
                // a revive of all with a valid code clears it.
                let state = KillState {
                    all: Some(KillEntry {
                        reason: format!("state file unreadable: {why}"),
                        at_unix: now,
                        by: "local".to_owned(),
                    }),
                    ..KillState::default()
                };
                Ledger {
                    state,
                    corrupt: Some(why),
                }
            }
        };
        let restored = ledger
            .state
            .all
            .iter()
            .map(|e| ("all", e))
            .chain(ledger.state.agents.iter().map(|(a, e)| (a.as_str(), e)));
        for (scope, entry) in restored {
            tracing::warn!(scope, reason = %entry.reason, at_unix = entry.at_unix, "kill switch restored from the state file: KILLED");
            telemetry.event(
                "kill_switch",
                &[
                    ("event.action", "kill_restored".into()),
                    ("portcullis.kill_switch.scope", scope.into()),
                    (
                        "portcullis.kill_switch.reason",
                        entry.reason.as_str().into(),
                    ),
                    ("portcullis.kill_switch.at_unix", entry.at_unix.into()),
                ],
            );
        }
        let mut replay = ReplayGuard::default();
        for (id, ts) in &ledger.state.guard.ids {
            // Out-of-window ids are refused by the window anyway.
            let _ = replay.check_and_remember(id, *ts, now);
        }
        let view = View {
            state: ledger.state.clone(),
            corrupt: ledger.corrupt.clone(),
        };
        let all = parent.child_token();
        let (senders, secrets) = keys.into_iter().map(|k| (k.sender, k.secret)).unzip();
        Self {
            path,
            view: Arc::new(ArcSwap::from_pointee(view)),
            nft_serial: Arc::new(Mutex::new(())),
            secrets,
            senders,
            totp,
            replay: Mutex::new(replay),
            ops: tokio::sync::Mutex::new(ledger),
            tokens: Mutex::new(Tokens {
                all,
                agents: RuleKeyMap::default(),
            }),
            parent: parent.clone(),
            nft,
            nft_error: Mutex::new(None),
            telemetry,
            held: AtomicBool::new(false),
        }
    }

    /// Is `agent` cut off? Called on every new connection and DNS query.
    pub fn is_killed(&self, agent: &str) -> bool {
        self.held.load(Ordering::Relaxed) || self.view.load().is_killed(agent)
    }

    /// True when any scope is engaged (or the state is corrupt).
    pub fn any_engaged(&self) -> bool {
        let v = self.view.load();
        v.corrupt.is_some() || !v.state.is_empty()
    }

    /// A token for one tunnel of `agent`: cancelled by a kill of the agent, of all, or by
    /// shutdown.
    pub fn tunnel_token(&self, agent: &str) -> CancellationToken {
        let mut t = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        // Looked up before `entry`, which would allocate the key for every tunnel.
        if let Some(agent_token) = t.agents.get(agent) {
            return agent_token.child_token();
        }
        let agent_token = t.all.child_token();
        let tunnel = agent_token.child_token();
        t.agents.insert(agent.to_owned(), agent_token);
        tunnel
    }

    /// Check a request's signature, timestamp and id (replay), for `action` (`kill`,
    /// `revive`, `reload`). `now` in unix seconds. Every refusal is logged and counted.
    pub fn authenticate(
        &self,
        action: &'static str,
        req: &Signed<'_>,
        now: i64,
    ) -> Result<Sender, KillError> {
        if self.secrets.is_empty() {
            return Err(KillError::NotConfigured);
        }
        let checked = webhook::verify(&self.secrets, &req.request, now).and_then(|index| {
            let ts: i64 = req
                .request
                .timestamp
                .parse()
                .map_err(|_| WebhookError::BadTimestamp)?;
            self.replay
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .check_and_remember(req.request.id, ts, now)?;
            Ok(index)
        });
        match checked {
            Ok(index) => self
                .senders
                .get(index)
                .cloned()
                .ok_or(KillError::Unauthorized(WebhookError::BadSignature)),
            Err(e) => {
                self.refused(action, e.reason(), None, req.source, None);
                Err(KillError::Unauthorized(e))
            }
        }
    }

    /// One refused request: a log line and the metric.
    fn refused(
        &self,
        action: &str,
        reason: &'static str,
        sender: Option<&Sender>,
        source: Option<IpAddr>,
        locked_until: Option<i64>,
    ) {
        self.telemetry.metrics.kill_switch_auth_failure(reason);
        self.telemetry.refusal_event(
            reason,
            &[
                ("event.action", "deny".into()),
                ("event.reason", reason.into()),
                ("portcullis.kill_switch.request", action.into()),
                (
                    "portcullis.kill_switch.sender",
                    sender.map(Sender::as_str).into(),
                ),
                ("source.ip", source.map(|ip| ip.to_string()).into()),
                ("portcullis.kill_switch.locked_until", locked_until.into()),
            ],
        );
    }

    /// Validate a request body into a scope; an agent scope must name an agent of `policy`.
    pub fn parse_scope(req: &Request, policy: &Policy) -> Result<Scope, KillError> {
        match (req.scope.as_str(), &req.agent) {
            ("all", None) => Ok(Scope::All),
            ("agent", Some(a)) if policy.agent_by_name(a).is_some() => Ok(Scope::Agent(a.clone())),
            ("agent", Some(a)) => Err(KillError::BadRequest(format!("no agent `{a}`"))),
            ("agent", None) => Err(KillError::BadRequest("scope `agent` needs `agent`".into())),
            ("all", Some(_)) => Err(KillError::BadRequest("scope `all` takes no `agent`".into())),
            (other, _) => Err(KillError::BadRequest(format!("unknown scope `{other}`"))),
        }
    }

    /// Engage: new connections refused and live tunnels cut at once → state to disk (fsync)
    /// → nft sets updated (outside the lock: a slow `nft` holds up no other kill). If the
    /// state cannot be written, the kill still holds in memory and the report says so. Never
    /// refused: a kill only ever closes. Callers run it in a task of its own, so a client
    /// that goes away never cancels it half-way.
    pub async fn kill(
        &self,
        scope: Scope,
        reason: String,
        by: Accepted<'_>,
        now: i64,
        policy: &Arc<Policy>,
        nets: &[IpNet],
    ) -> Report {
        let mut ledger = self.ops.lock().await;
        let live = self.live_tunnels(&scope, policy);
        let mut next = ledger.state.clone();
        let entry = KillEntry {
            reason: reason.clone(),
            at_unix: now,
            by: by.sender.as_str().to_owned(),
        };
        match &scope {
            Scope::All => next.all = Some(entry),
            Scope::Agent(a) => {
                next.agents.insert(a.clone(), entry);
            }
        }
        remember_id(&mut next, by.id, now);
        self.view.store(Arc::new(View {
            state: next.clone(),
            corrupt: ledger.corrupt.clone(),
        }));
        self.cut(&scope);
        ledger.state = next.clone();
        // Under the lock: the file's writes follow the ledger's order.
        let state_written = self.write(&next).await;
        drop(ledger);
        let nft = self.sync_nft(policy, nets).await;
        self.telemetry.metrics.set_kill_switch(scope.label(), true);
        tracing::warn!(scope = scope.label(), by = by.sender.as_str(), tunnels = live, state_written, %nft, "KILL SWITCH ENGAGED");
        self.telemetry.event(
            "kill_switch",
            &[
                ("event.action", "kill".into()),
                ("portcullis.kill_switch.scope", scope.label().into()),
                ("portcullis.kill_switch.sender", by.sender.as_str().into()),
                ("portcullis.kill_switch.reason", reason.into()),
                ("portcullis.kill_switch.tunnels_cut", live.into()),
                ("portcullis.kill_switch.state_written", state_written.into()),
            ],
        );
        Report {
            action: "kill",
            scope: scope.label().to_owned(),
            state_written,
            tunnels_cut: live,
            nft,
        }
    }

    /// Tunnels that a kill of `scope` cuts, from the live-tunnel gauges.
    fn live_tunnels(&self, scope: &Scope, policy: &Policy) -> i64 {
        let metrics = &self.telemetry.metrics;
        match scope {
            Scope::All => policy
                .agents()
                .map(|(_, a)| metrics.agent(&a.name).active_tunnels.get())
                .chain(std::iter::once(
                    metrics
                        .agent(crate::policy::UNKNOWN_AGENT)
                        .active_tunnels
                        .get(),
                ))
                .sum(),
            Scope::Agent(a) => metrics.agent(a).active_tunnels.get(),
        }
    }

    /// Reopen `scope` after checking the TOTP code, unless revive is locked for the sender
    /// (then refused whatever the code, and not counted). A wrong code is counted, durably,
    /// and may lock revive. Reviving `all` also clears a corrupt state and every per-agent
    /// kill.
    pub async fn revive(
        &self,
        scope: Scope,
        code: &str,
        by: Accepted<'_>,
        now: i64,
        policy: &Arc<Policy>,
        nets: &[IpNet],
    ) -> Result<Report, KillError> {
        let totp = self.totp.as_ref().ok_or(KillError::ReviveNotConfigured)?;
        let (sender, source) = (by.sender, by.source);
        let mut ledger = self.ops.lock().await;
        if let Some(until) = ledger
            .state
            .guard
            .attempts
            .locked_until(sender.as_str(), now)
        {
            drop(ledger);
            self.refused("revive", "totp_locked", Some(sender), source, Some(until));
            return Err(KillError::Locked { until });
        }
        let mut guard = TotpGuard::with_last_step(ledger.state.guard.totp_last_step);
        let accepted = u64::try_from(now).is_ok_and(|n| guard.accept(totp, code, n));
        if !accepted {
            let mut next = ledger.state.clone();
            let locked_until = next.guard.attempts.failed(sender.as_str(), now);
            // Counted in memory even if the write fails; the write makes it survive a restart.
            let _ = self.write(&next).await;
            ledger.state = next;
            drop(ledger);
            if let Some(until) = locked_until {
                tracing::warn!(
                    sender = sender.as_str(),
                    until,
                    "revive LOCKED after failed TOTP codes"
                );
            }
            self.refused("revive", "totp_invalid", Some(sender), source, locked_until);
            return Err(KillError::BadTotp { locked_until });
        }
        let mut next = ledger.state.clone();
        next.guard.totp_last_step = guard.last_step();
        next.guard.attempts.succeeded(sender.as_str());
        remember_id(&mut next, by.id, now);
        let corrupt = match &scope {
            Scope::All => {
                next.all = None;
                next.agents.clear();
                None
            }
            Scope::Agent(a) => {
                next.agents.remove(a);
                ledger.corrupt.clone()
            }
        };
        if !self.write(&next).await {
            // Never reopen in memory what would come back killed after a restart; the code
            // stays spent.
            ledger.state.guard.totp_last_step = guard.last_step();
            return Err(KillError::NotWritten);
        }
        ledger.state = next.clone();
        ledger.corrupt = corrupt.clone();
        self.view.store(Arc::new(View {
            state: next.clone(),
            corrupt: corrupt.clone(),
        }));
        self.renew_tokens(&scope);
        drop(ledger);
        let nft = self.sync_nft(policy, nets).await;
        let metrics = &self.telemetry.metrics;
        if scope == Scope::All {
            for (_, a) in policy.agents() {
                metrics.set_kill_switch(&a.name, false);
            }
        }
        metrics.set_kill_switch(scope.label(), false);
        tracing::warn!(
            scope = scope.label(),
            by = sender.as_str(),
            "kill switch revived"
        );
        self.telemetry.event(
            "kill_switch",
            &[
                ("event.action", "revive".into()),
                ("portcullis.kill_switch.scope", scope.label().into()),
                ("portcullis.kill_switch.sender", sender.as_str().into()),
            ],
        );
        Ok(Report {
            action: "revive",
            scope: scope.label().to_owned(),
            state_written: true,
            tunnels_cut: 0,
            nft,
        })
    }

    /// An operator on the gateway clears every failed-attempt count and revive lock, and a
    /// used TOTP step that lies ahead of the clock (a revive while the clock ran fast would
    /// otherwise refuse every code until the clock caught up). Returns whether the cleared
    /// state was written.
    pub async fn clear_lockout(&self, now: i64) -> bool {
        let mut ledger = self.ops.lock().await;
        let mut next = ledger.state.clone();
        next.guard.attempts.clear();
        let step_now = u64::try_from(now).unwrap_or(0) / totp::STEP_SECS;
        if next.guard.totp_last_step.is_some_and(|s| s > step_now) {
            // The steps a code may be for now (one either side) open again; none of them
            // was used, or the used step would not lie ahead.
            next.guard.totp_last_step = Some(step_now.saturating_sub(2));
        }
        let written = self.write(&next).await;
        ledger.state = next;
        drop(ledger);
        tracing::warn!("revive lock-out cleared by an operator on the gateway");
        self.telemetry.event(
            "kill_switch",
            &[
                ("event.action", "lockout_cleared".into()),
                ("portcullis.kill_switch.sender", "local".into()),
            ],
        );
        written
    }

    async fn write(&self, state: &KillState) -> bool {
        let path = self.path.clone();
        let state = state.clone();
        let written = tokio::task::spawn_blocking(move || {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            state::store(&path, &state).map_err(std::io::Error::other)
        })
        .await;
        match written {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "kill switch state NOT written");
                false
            }
            Err(_) => false,
        }
    }

    fn cut(&self, scope: &Scope) {
        let mut t = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        match scope {
            Scope::All => t.all.cancel(),
            Scope::Agent(a) => {
                if let Some(tok) = t.agents.remove(a) {
                    tok.cancel();
                }
            }
        }
    }

    /// After a revive, tunnels get fresh, uncancelled parents.
    fn renew_tokens(&self, scope: &Scope) {
        let mut t = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        if *scope == Scope::All && t.all.is_cancelled() {
            t.all = self.parent.child_token();
            t.agents.clear();
        }
    }

    /// The networks the state cuts at the packet layer.
    pub fn killed_nets(&self, policy: &Policy, nets: &[IpNet]) -> Vec<IpNet> {
        let v = self.view.load();
        killed_nets(&v.state, v.corrupt.is_some(), policy, nets)
    }

    /// Bring the nftables kill sets in line with the view as it is when the sync runs.
    async fn sync_nft(&self, policy: &Arc<Policy>, nets: &[IpNet]) -> String {
        let Some(nft) = self.nft.clone() else {
            return "skipped (no nftables configured)".into();
        };
        let (view, serial) = (self.view.clone(), self.nft_serial.clone());
        let (policy, nets) = (policy.clone(), nets.to_vec());
        let synced = tokio::task::spawn_blocking(move || {
            let _one_at_a_time = serial.lock().unwrap_or_else(|p| p.into_inner());
            let v = view.load();
            let corrupt = v.corrupt.is_some();
            let wanted = killed_nets(&v.state, corrupt, &policy, &nets);
            let macs = killed_macs(&v.state, corrupt, &policy);
            nft.sync_killed(&wanted, &macs)
        })
        .await;
        let result = match synced {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("error: {e}")),
            Err(e) => Some(format!("error: {e}")),
        };
        let report = result.clone().unwrap_or_else(|| "ok".into());
        *self.nft_error.lock().unwrap_or_else(|p| p.into_inner()) = result;
        report
    }

    /// Bring the nftables sets in line with the state (at start-up, and after a reload:
    /// an agent's sources or bindings may have changed).
    pub async fn resync_nft(&self, policy: &Arc<Policy>, nets: &[IpNet]) -> String {
        self.sync_nft(policy, nets).await
    }

    /// `GET /v1/status` and the control socket's `status`: what is killed, why and since
    /// when, and whether revive is locked. Never shows request ids or secrets.
    pub async fn status(&self, now: i64) -> serde_json::Value {
        let ledger = self.ops.lock().await;
        let entry = |e: &KillEntry| json!({ "reason": e.reason, "at_unix": e.at_unix, "by": public_sender(&e.by) });
        let agents: serde_json::Map<String, serde_json::Value> = ledger
            .state
            .agents
            .iter()
            .map(|(a, e)| (a.clone(), entry(e)))
            .collect();
        let (global, senders) = ledger.state.guard.attempts.locks(now);
        json!({
            "all": ledger.state.all.as_ref().map(entry),
            "agents": agents,
            "corrupt": ledger.corrupt,
            "configured": !self.secrets.is_empty(),
            "revive_configured": self.totp.is_some(),
            "revive_locked": { "all_senders_until": global, "senders": senders },
        })
    }

    /// Why `/healthz` should say `degraded`, as far as the kill switch knows.
    pub fn health_reasons(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.held.load(Ordering::Relaxed) {
            out.push(
                "cluster: start-up sync with the peers not finished, every agent refused"
                    .to_owned(),
            );
        }
        let v = self.view.load();
        if v.corrupt.is_some() {
            out.push("kill_switch: state unreadable, every agent killed".to_owned());
        } else if v.state.all.is_some() {
            out.push("kill_switch: every agent killed".to_owned());
        }
        if !v.state.agents.is_empty() {
            let names: Vec<&str> = v.state.agents.keys().map(String::as_str).collect();
            out.push(format!("kill_switch: agents killed: {}", names.join(", ")));
        }
        if let Some(e) = self
            .nft_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            out.push(format!("nftables: kill sets not synchronised: {e}"));
        }
        out
    }

    /// Scopes currently engaged, for the metrics gauge.
    pub fn engaged_scopes(&self) -> Vec<String> {
        let v = self.view.load();
        let mut out: Vec<String> = v.state.agents.keys().cloned().collect();
        if v.state.all.is_some() || v.corrupt.is_some() {
            out.push("all".into());
        }
        out
    }
}

/// Older state files recorded the webhook id in `by`; only sender names are shown.
fn public_sender(by: &str) -> &str {
    if by == "local" || by == "cli" || by.starts_with("key:") {
        by
    } else {
        "webhook"
    }
}

/// Add an accepted request's id to the durable guard, dropping ids whose timestamp left the
/// replay window and, beyond [`MAX_DURABLE_IDS`], the oldest.
fn remember_id(state: &mut KillState, id: Option<(&str, i64)>, now: i64) {
    let ids = &mut state.guard.ids;
    let oldest = now.saturating_sub(webhook::TOLERANCE_SECS);
    ids.retain(|_, ts| *ts >= oldest);
    if let Some((id, ts)) = id {
        ids.insert(id.to_owned(), ts);
    }
    while ids.len() > MAX_DURABLE_IDS {
        let Some(first) = ids
            .iter()
            .min_by_key(|(_, ts)| **ts)
            .map(|(id, _)| id.clone())
        else {
            break;
        };
        ids.remove(&first);
    }
}

/// Kill all → every agent network and every agent's sources; kill one → that agent's sources.
pub fn killed_nets(
    state: &KillState,
    corrupt: bool,
    policy: &Policy,
    nets: &[IpNet],
) -> Vec<IpNet> {
    let mut out = Vec::new();
    if state.all.is_some() || corrupt {
        out.extend_from_slice(nets);
        for (_, a) in policy.agents() {
            out.extend(a.sources.iter().copied());
        }
    }
    for name in state.agents.keys() {
        if let Some(a) = policy.agent_by_name(name).and_then(|id| policy.agent(id)) {
            out.extend(a.sources.iter().copied());
        }
    }
    out
}

/// The MACs bound to killed agents' sources, dropped whatever address their frames carry
/// (a killed agent does not come back under an address nobody claims). A MAC also bound
/// to a live agent is left out: killing one agent must not cut off another.
pub(crate) fn killed_macs(state: &KillState, corrupt: bool, policy: &Policy) -> Vec<MacAddr> {
    let killed = |name: &str| state.all.is_some() || corrupt || state.agents.contains_key(name);
    let mut dead = BTreeSet::new();
    let mut live = BTreeSet::new();
    for (_, a) in policy.agents() {
        let macs = a.bindings.iter().filter_map(|b| b.mac);
        if killed(&a.name) {
            dead.extend(macs);
        } else {
            live.extend(macs);
        }
    }
    dead.difference(&live).copied().collect()
}

/// Why a secret file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Webhook {
        path: PathBuf,
        #[source]
        source: webhook::WebhookError,
    },
    #[error("{}: {source}", path.display())]
    Totp {
        path: PathBuf,
        #[source]
        source: totp::TotpError,
    },
    #[error(
        "{}: another webhook secret file has the same name; each key needs its own file name (it names the sender)",
        path.display()
    )]
    DuplicateName { path: PathBuf },
}

/// Read secrets: each file holds one `whsec_…` secret (several files = rotation).
pub fn read_secrets(files: &[PathBuf]) -> Result<Vec<Secret>, SecretFileError> {
    read_keys(files).map(|keys| keys.into_iter().map(|k| k.secret).collect())
}

/// Read the webhook keys, each named `key:<file name>` (the sender revive attempts are
/// counted by).
pub fn read_keys(files: &[PathBuf]) -> Result<Vec<Key>, SecretFileError> {
    // Senders are told apart by file name: two keys under one name would share one
    // attempt count, and one key's guesses would lock the other out.
    let mut names = std::collections::BTreeSet::new();
    for f in files {
        if !names.insert(f.file_name()) {
            return Err(SecretFileError::DuplicateName { path: f.clone() });
        }
    }
    files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f).map_err(|source| SecretFileError::Read {
                path: f.clone(),
                source,
            })?;
            let secret = Secret::parse(&text).map_err(|source| SecretFileError::Webhook {
                path: f.clone(),
                source,
            })?;
            let name = f.file_name().map_or_else(
                || f.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            Ok(Key {
                sender: Sender(Arc::from(format!("key:{name}"))),
                secret,
            })
        })
        .collect()
}

pub fn read_totp(file: Option<&Path>) -> Result<Option<TotpSecret>, SecretFileError> {
    let Some(f) = file else { return Ok(None) };
    let text = std::fs::read_to_string(f).map_err(|source| SecretFileError::Read {
        path: f.to_path_buf(),
        source,
    })?;
    TotpSecret::from_base32(text.trim())
        .map(Some)
        .map_err(|source| SecretFileError::Totp {
            path: f.to_path_buf(),
            source,
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::policy::rules::{RulesSources, SourceFile};

    fn entry() -> KillEntry {
        KillEntry {
            reason: "test".into(),
            at_unix: 0,
            by: "local".into(),
        }
    }

    #[test]
    fn killed_macs_are_the_killed_agents_own() {
        let agent = |name: &str, sources: &str| SourceFile {
            path: format!("rules/agents/{name}.toml").into(),
            text: format!("name = \"{name}\"\nsources = {sources}\n"),
        };
        let sources = RulesSources {
            agents: vec![
                agent(
                    "a",
                    r#"[{ net = "10.66.0.11", mac = "02:00:00:00:00:11" }, { net = "10.66.0.21", mac = "02:00:00:00:00:99" }]"#,
                ),
                agent(
                    "b",
                    r#"[{ net = "10.66.0.12", mac = "02:00:00:00:00:12" }]"#,
                ),
                // C shares A's second MAC (two agents on one host) and has a plain source.
                agent(
                    "c",
                    r#"[{ net = "10.66.0.13", mac = "02:00:00:00:00:99" }, "10.66.0.14"]"#,
                ),
            ],
            lists: Vec::new(),
        };
        let policy = crate::policy::compile(&sources, &[443], 1).unwrap();
        let mac = |s: &str| s.parse::<MacAddr>().unwrap();
        let mut state = KillState::default();
        assert!(killed_macs(&state, false, &policy).is_empty());
        state.agents.insert("a".into(), entry());
        // A's shared MAC stays open while C lives.
        assert_eq!(
            killed_macs(&state, false, &policy),
            [mac("02:00:00:00:00:11")]
        );
        state.agents.insert("c".into(), entry());
        assert_eq!(
            killed_macs(&state, false, &policy),
            [mac("02:00:00:00:00:11"), mac("02:00:00:00:00:99")]
        );
        let all = [
            mac("02:00:00:00:00:11"),
            mac("02:00:00:00:00:12"),
            mac("02:00:00:00:00:99"),
        ];
        assert_eq!(killed_macs(&KillState::default(), true, &policy), all);
        let state = KillState {
            all: Some(entry()),
            ..KillState::default()
        };
        assert_eq!(killed_macs(&state, false, &policy), all);
    }
}
