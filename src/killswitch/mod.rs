//! The kill switch (DESIGN §8): one signed webhook call cuts every route out, for all agents
//! or one, and only a signed call with a current TOTP code reopens them.
//!
//! Owns the killed state (durable, fail-closed: unreadable means killed), the cancellation
//! tree that closes live tunnels (all → agent → tunnel), and keeping the nftables
//! `kill_sources` sets equal to the state. The pieces: `webhook` (Standard Webhooks
//! signatures, replay guard), `totp` (RFC 6238), `state` (the file). Must not decide anything
//! about domains; the data path only asks [`KillSwitch::is_killed`].

pub mod state;
pub mod totp;
pub mod webhook;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use ipnet::IpNet;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::hash::RuleKeyMap;
use crate::nft::Nft;
use crate::policy::Policy;
use state::{KillEntry, KillState, Loaded};
use totp::{TotpGuard, TotpSecret};
use webhook::{ReplayGuard, Secret, SignedRequest, WebhookError};

/// File name of the state inside `state_dir`.
pub const STATE_FILE: &str = "killswitch.json";

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

#[derive(Debug, thiserror::Error)]
pub enum KillError {
    #[error("unauthorized: {0}")]
    Unauthorized(#[from] WebhookError),
    #[error("a valid TOTP code is required to revive")]
    BadTotp,
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("the kill switch has no webhook secret configured")]
    NotConfigured,
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
    view: ArcSwap<View>,
    secrets: Vec<Secret>,
    totp: Option<TotpSecret>,
    replay: Mutex<ReplayGuard>,
    totp_guard: Mutex<TotpGuard>,
    tokens: Mutex<Tokens>,
    /// Parent of every tunnel token: the process-wide `cut` (shutdown).
    parent: CancellationToken,
    /// Kill/revive run one at a time.
    ops: tokio::sync::Mutex<()>,
    nft: Option<Nft>,
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
    pub fn load(
        state_dir: &Path,
        secrets: Vec<Secret>,
        totp: Option<TotpSecret>,
        nft: Option<Nft>,
        parent: &CancellationToken,
    ) -> Self {
        let path = state_dir.join(STATE_FILE);
        let view = match state::load(&path) {
            Loaded::Fresh => View::default(),
            Loaded::State(state) => View {
                state,
                corrupt: None,
            },
            Loaded::Corrupt(why) => {
                tracing::error!(path = %path.display(), %why, "kill switch state unreadable: every agent is KILLED until a signed revive");
                View {
                    state: KillState::default(),
                    corrupt: Some(why),
                }
            }
        };
        let all = parent.child_token();
        Self {
            path,
            view: ArcSwap::from_pointee(view),
            secrets,
            totp,
            replay: Mutex::new(ReplayGuard::default()),
            totp_guard: Mutex::new(TotpGuard::new()),
            tokens: Mutex::new(Tokens {
                all,
                agents: RuleKeyMap::default(),
            }),
            parent: parent.clone(),
            ops: tokio::sync::Mutex::new(()),
            nft,
        }
    }

    /// Is `agent` cut off? Called on every new connection and DNS query.
    pub fn is_killed(&self, agent: &str) -> bool {
        self.view.load().is_killed(agent)
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

    /// Check a webhook's signature, timestamp and id (replay). `now` in unix seconds.
    pub fn authenticate(&self, req: &SignedRequest<'_>, now: i64) -> Result<(), KillError> {
        if self.secrets.is_empty() {
            return Err(KillError::NotConfigured);
        }
        webhook::verify(&self.secrets, req, now)?;
        let ts: i64 = req
            .timestamp
            .parse()
            .map_err(|_| WebhookError::BadTimestamp)?;
        self.replay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check_and_remember(req.id, ts, now)?;
        Ok(())
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

    /// Engage: state to disk (fsync) → new connections refused → live tunnels cut → nft
    /// sets updated. If the state cannot be written, the kill still takes effect in memory
    /// and the report says so.
    pub async fn kill(
        &self,
        scope: Scope,
        reason: String,
        by: String,
        now: i64,
        policy: &Policy,
        nets: &[IpNet],
    ) -> Report {
        let _op = self.ops.lock().await;
        let current = self.view.load();
        let mut next = current.state.clone();
        let entry = KillEntry {
            reason,
            at_unix: now,
            by,
        };
        match &scope {
            Scope::All => next.all = Some(entry),
            Scope::Agent(a) => {
                next.agents.insert(a.clone(), entry);
            }
        }
        let state_written = self.write(&next).await;
        self.view.store(Arc::new(View {
            state: next.clone(),
            corrupt: current.corrupt.clone(),
        }));
        self.cut(&scope);
        let nft = self
            .sync_nft(&next, current.corrupt.is_some(), policy, nets)
            .await;
        Report {
            action: "kill",
            scope: scope.label().to_owned(),
            state_written,
            tunnels_cut: 0,
            nft,
        }
    }

    /// Reopen `scope` after checking the TOTP code. Reviving `all` also clears a corrupt
    /// state and every per-agent kill.
    pub async fn revive(
        &self,
        scope: Scope,
        code: &str,
        now: i64,
        policy: &Policy,
        nets: &[IpNet],
    ) -> Result<Report, KillError> {
        let totp = self.totp.as_ref().ok_or(KillError::BadTotp)?;
        if u64::try_from(now).is_err()
            || !self
                .totp_guard
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .accept(totp, code, now.unsigned_abs())
        {
            return Err(KillError::BadTotp);
        }
        let _op = self.ops.lock().await;
        let current = self.view.load();
        let (next, corrupt) = match &scope {
            Scope::All => (KillState::default(), None),
            Scope::Agent(a) => {
                let mut s = current.state.clone();
                s.agents.remove(a);
                (s, current.corrupt.clone())
            }
        };
        let state_written = self.write(&next).await;
        if !state_written {
            // Never reopen in memory what would come back killed after a restart.
            return Err(KillError::BadRequest(
                "the state could not be written; nothing reopened".into(),
            ));
        }
        self.view.store(Arc::new(View {
            state: next.clone(),
            corrupt: corrupt.clone(),
        }));
        self.renew_tokens(&scope);
        let nft = self.sync_nft(&next, corrupt.is_some(), policy, nets).await;
        Ok(Report {
            action: "revive",
            scope: scope.label().to_owned(),
            state_written,
            tunnels_cut: 0,
            nft,
        })
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

    async fn sync_nft(
        &self,
        state: &KillState,
        corrupt: bool,
        policy: &Policy,
        nets: &[IpNet],
    ) -> String {
        let Some(nft) = self.nft.clone() else {
            return "skipped (no nftables configured)".into();
        };
        let wanted = killed_nets(state, corrupt, policy, nets);
        match tokio::task::spawn_blocking(move || nft.sync_killed(&wanted)).await {
            Ok(Ok(())) => "ok".into(),
            Ok(Err(e)) => format!("error: {e}"),
            Err(e) => format!("error: {e}"),
        }
    }

    /// Bring the nftables sets in line with the state (at start-up).
    pub async fn resync_nft(&self, policy: &Policy, nets: &[IpNet]) -> String {
        let v = self.view.load_full();
        self.sync_nft(&v.state, v.corrupt.is_some(), policy, nets)
            .await
    }

    /// `GET /v1/status`.
    pub fn status(&self) -> serde_json::Value {
        let v = self.view.load();
        serde_json::json!({
            "all": v.state.all,
            "agents": v.state.agents,
            "corrupt": v.corrupt,
            "configured": !self.secrets.is_empty(),
            "revive_configured": self.totp.is_some(),
        })
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

/// Read secrets: each file holds one `whsec_…` secret (several files = rotation).
pub fn read_secrets(files: &[PathBuf]) -> Result<Vec<Secret>, String> {
    files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
            Secret::parse(&text).map_err(|e| format!("{}: {e}", f.display()))
        })
        .collect()
}

pub fn read_totp(file: Option<&Path>) -> Result<Option<TotpSecret>, String> {
    let Some(f) = file else { return Ok(None) };
    let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
    TotpSecret::from_base32(text.trim())
        .map(Some)
        .map_err(|e| format!("{}: {e}", f.display()))
}
