//! A gateway pair (or more) that never fails open (docs/cluster.md).
//!
//! Kill state is shared by relaying the **original signed request** (headers and body
//! unchanged) to every peer: each peer verifies it with its own keys and its own TOTP
//! secret, applies it idempotently and persists it. Nothing a node says unsigned is ever
//! acted on. Three paths carry the same signed events:
//!
//! - **push**: after a node accepted a kill or revive, a queue per peer relays it, retrying
//!   with a bounded back-off until the peer answers;
//! - **confirm**: a revive over the network reopens a node only after every peer answered
//!   it (a partitioned node refuses revives it cannot confirm; the control socket on the
//!   gateway is the operator's override);
//! - **pull**: at start-up, and every `sync_interval` after, a node asks each peer (a signed
//!   call) for the signed events it applied, and applies those it does not know. Until the
//!   first pull answered from every peer, or `sync_timeout` passed, every agent is refused;
//!   then, if a peer could not be asked and had newer events than this node when last
//!   asked, the node starts killed (fail closed).
//!
//! Owns the event store (`store`) and the peer client (`client`); `[cluster]` is read by
//! `config`.
//! Must not: decide anything about the kill itself (the kill switch does, from the signed
//! request), or hold the kill switch's locks.

pub mod client;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;

pub use crate::config::{ClusterSettings, Peer};
use crate::killswitch::peer::{Effect, SignedCode};
use crate::killswitch::webhook::{self, SignedRequest};
use crate::killswitch::{self, Accepted, KillError, KillSwitch, Scope, Sender, Signed};
use crate::policy::Policy;
use crate::shutdown::Shutdown;
use crate::telemetry::Telemetry;

/// The node's own handles: what every function here is given.
type Shared = Cluster;
use store::{Action, SignedEvent, Store};

/// Informational header on relayed requests: which node relayed it (never trusted).
pub const RELAYED_BY: &str = "portcullis-relayed-by";
/// How long one relay attempt may take.
const CALL_DEADLINE: Duration = Duration::from_secs(5);
/// Relay back-off: first wait, and the longest.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A pulled event refused here is not tried again for this long.
const REFUSED_RETRY_SECS: i64 = 60;
/// Refused ids remembered at most.
const MAX_REFUSED: usize = 1_024;
/// While holding agents at start-up, peers are asked this often.
const STARTUP_POLL: Duration = Duration::from_millis(200);

/// What a node knows of one peer, for `status` and the metrics.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct PeerView {
    node: Option<String>,
    reachable: bool,
    last_answer_unix: Option<i64>,
    last_error: Option<String>,
    /// The peer's own status (kills, revive locks) as it last answered: shown, never acted on.
    view: Option<serde_json::Value>,
}

/// Why a relayed or pulled event was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Kill(#[from] KillError),
    #[error("the event's body is not base64")]
    Body,
    #[error("the cluster task failed")]
    Task,
}

/// The outcome of applying a signed event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Already applied here (same id): nothing done.
    Known,
    Applied,
    NoEffect,
}

pub struct Cluster {
    settings: ClusterSettings,
    killswitch: Arc<KillSwitch>,
    policy: Arc<arc_swap::ArcSwap<Policy>>,
    telemetry: Telemetry,
    /// The agents' networks, for the nftables kill sets.
    nft_agent_networks: Vec<ipnet::IpNet>,
    shutdown: Shutdown,
    path: PathBuf,
    /// Applied events; the lock is held across verify → apply → record, so a push and a
    /// pull of the same event never both act.
    store: tokio::sync::Mutex<Store>,
    /// The store could not be read at start (treated as knowing nothing).
    store_unreadable: bool,
    queues: Vec<mpsc::Sender<SignedEvent>>,
    receivers: Mutex<Vec<mpsc::Receiver<SignedEvent>>>,
    pending: Vec<AtomicUsize>,
    peers: Mutex<BTreeMap<String, PeerView>>,
    refused: Mutex<HashMap<String, i64>>,
    /// Nanoseconds since the epoch when this process loaded the cluster: ids stay unique
    /// across restarts.
    epoch: u128,
    seq: AtomicU64,
}

/// What a cluster node works with, from the gateway.
pub struct Handles {
    pub killswitch: Arc<KillSwitch>,
    pub policy: Arc<arc_swap::ArcSwap<Policy>>,
    pub telemetry: Telemetry,
    pub nft_agent_networks: Vec<ipnet::IpNet>,
    pub shutdown: Shutdown,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.settings.node)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// `None` when no peers are configured.
    pub fn load(
        settings: &ClusterSettings,
        state_dir: &std::path::Path,
        handles: Handles,
    ) -> Option<Self> {
        if !settings.enabled() {
            return None;
        }
        let path = state_dir.join(store::FILE);
        let (store, store_unreadable) = match store::load(&path) {
            Ok(s) => (s, false),
            Err(why) => {
                tracing::error!(path = %path.display(), %why, "cluster event store unreadable: starting from the peers' events");
                (Store::default(), true)
            }
        };
        let (queues, receivers): (Vec<_>, Vec<_>) = settings
            .peers
            .iter()
            .map(|_| mpsc::channel(settings.forward_queue))
            .unzip();
        let peers = settings
            .peers
            .iter()
            .map(|p| (p.url.clone(), PeerView::default()))
            .collect();
        let Handles {
            killswitch,
            policy,
            telemetry,
            nft_agent_networks,
            shutdown,
        } = handles;
        Some(Cluster {
            settings: settings.clone(),
            killswitch,
            policy,
            telemetry,
            nft_agent_networks,
            shutdown,
            path,
            store: tokio::sync::Mutex::new(store),
            store_unreadable,
            queues,
            receivers: Mutex::new(receivers),
            pending: settings.peers.iter().map(|_| AtomicUsize::new(0)).collect(),
            peers: Mutex::new(peers),
            refused: Mutex::new(HashMap::new()),
            epoch: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
            seq: AtomicU64::new(0),
        })
    }

    fn save(&self, store: &Store) {
        if let Err(e) = store::save(&self.path, store) {
            tracing::error!(error = %e, "cluster event store NOT written");
        }
    }

    fn view(&self, url: &str, f: impl FnOnce(&mut PeerView)) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = peers.get_mut(url) {
            f(v);
        }
    }

    /// A request id no restart repeats (the peer's replay guard would refuse it): node,
    /// what, the clock in nanoseconds at first use, a counter.
    fn fresh_id(&self, what: &str) -> String {
        format!(
            "{}-{what}-{}-{}",
            self.settings.node,
            self.epoch,
            self.seq.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn refused_recently(&self, id: &str, now: i64) -> bool {
        let r = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        r.get(id).is_some_and(|until| *until > now)
    }

    fn remember_refused(&self, id: &str, now: i64) {
        let mut r = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        r.retain(|_, until| *until > now);
        if r.len() < MAX_REFUSED {
            r.insert(id.to_owned(), now + REFUSED_RETRY_SECS);
        }
    }
}

/// The clock in unix seconds, as webhook timestamps carry it.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Start the cluster's tasks: hold every agent until the first sync, relay queues, the
/// periodic pull. Call before any listener serves agents.
pub fn start(shared: &Arc<Shared>) {
    let c = shared;
    shared.killswitch.hold(true);
    shared.telemetry.metrics.set_cluster_synced(false);
    // Series that alerts and dashboards query exist from the start.
    for p in &c.settings.peers {
        shared.telemetry.metrics.set_cluster_peer_up(&p.url, false);
        shared.telemetry.metrics.set_cluster_pending(&p.url, 0);
    }
    let receivers = std::mem::take(&mut *c.receivers.lock().unwrap_or_else(|p| p.into_inner()));
    for (i, rx) in receivers.into_iter().enumerate() {
        shared.shutdown.spawn(relay(shared.clone(), i, rx));
    }
    shared.shutdown.spawn(pull_loop(shared.clone()));
}

/// The body of a relayed request, its headers, and where it came from.
fn signed<'a>(event: &'a SignedEvent, body: &'a [u8], source: Option<IpAddr>) -> Signed<'a> {
    Signed {
        request: SignedRequest {
            id: &event.id,
            timestamp: &event.timestamp,
            signature_header: &event.signature,
            body,
        },
        source,
    }
}

/// Apply a signed event a peer relayed or answered: verified with our keys (and, for a
/// revive, our TOTP secret at the request's own time), applied, remembered. Idempotent.
pub(crate) async fn apply(
    shared: &Arc<Shared>,
    event: &SignedEvent,
    source: Option<IpAddr>,
    now: i64,
) -> Result<Outcome, ApplyError> {
    let c = shared;
    let mut store = c.store.lock().await;
    if store.knows(&event.id) {
        return Ok(Outcome::Known);
    }
    let body = event.body_bytes().ok_or(ApplyError::Body)?;
    let ks = &shared.killswitch;
    let action = event.action.as_str();
    // A kill only closes, so one relayed days late still applies; a revive is accepted
    // only within the webhook window, like a direct one (a captured revive cannot be
    // delivered to a node that missed it long after).
    let max_age = match event.action {
        Action::Kill => c.settings.max_event_age_secs,
        Action::Revive => webhook::TOLERANCE_SECS.min(c.settings.max_event_age_secs),
    };
    let (sender, ts) = ks.verify_relayed(action, &signed(event, &body, source), now, max_age)?;
    let request: killswitch::Request =
        serde_json::from_slice(&body).map_err(|e| KillError::BadRequest(format!("body: {e}")))?;
    let policy = shared.policy.load_full();
    let scope = KillSwitch::parse_scope(&request, &policy)?;
    let nets = &shared.nft_agent_networks;
    let by = Accepted {
        sender: &sender,
        id: Some((event.id.as_str(), ts)),
        source,
    };
    let outcome = match event.action {
        Action::Kill => {
            let reason = request.reason.unwrap_or_default();
            // Dated by the signed time, so a revive signed later lifts it on every node.
            ks.kill(scope, reason, by, ts, &policy, nets).await;
            Outcome::Applied
        }
        Action::Revive => {
            let code = request.totp.unwrap_or_default();
            let code = SignedCode {
                code: &code,
                signed_at: ts,
            };
            match ks
                .revive_relayed(scope, code, by, now, &policy, nets)
                .await?
            {
                Effect::Applied => Outcome::Applied,
                Effect::NoEffect => Outcome::NoEffect,
            }
        }
    };
    ks.remember_relayed(&event.id, ts, now);
    store.record(event.clone(), now, c.settings.max_event_age_secs);
    let snapshot = store.clone();
    drop(store);
    let c2 = c.clone();
    let _ = tokio::task::spawn_blocking(move || c2.save(&snapshot)).await;
    shared.telemetry.event(
        "kill_switch",
        &[
            ("event.action", "relayed".into()),
            ("portcullis.kill_switch.request", action.into()),
            ("portcullis.kill_switch.sender", sender.as_str().into()),
            ("portcullis.cluster.outcome", format!("{outcome:?}").into()),
            ("source.ip", source.map(|ip| ip.to_string()).into()),
        ],
    );
    Ok(outcome)
}

/// `POST /v1/cluster/kill` and `/v1/cluster/revive`: a peer relays a signed request.
/// Runs in a task of its own (a vanishing peer never stops it half-way).
pub(crate) async fn relayed(
    shared: &Arc<Shared>,
    event: SignedEvent,
    source: Option<IpAddr>,
) -> Result<Outcome, ApplyError> {
    let s = shared.clone();
    let task = shared.shutdown.spawn(async move {
        let now = unix_now();
        apply(&s, &event, source, now).await
    });
    task.await.unwrap_or(Err(ApplyError::Task))
}

/// `POST /v1/cluster/sync` (signed like a kill): this node's applied events, and its view
/// (shown by the asking node, never acted on).
pub(crate) async fn sync_answer(
    shared: &Arc<Shared>,
    request: &Signed<'_>,
) -> Result<serde_json::Value, KillError> {
    let now = unix_now();
    shared.killswitch.authenticate("sync", request, now)?;
    let events = shared.store.lock().await.events.clone();
    Ok(json!({
        "node": shared.settings.node,
        "events": events,
        "view": shared.killswitch.status(now).await,
        "synced": !shared.killswitch.held(),
    }))
}

/// A kill or revive this node accepted directly: remember it and relay it to every peer
/// (unless `delivered`: a revive already confirmed by every peer).
pub(crate) async fn accepted(shared: &Arc<Shared>, event: SignedEvent, delivered: bool) {
    let c = shared;
    let now = unix_now();
    {
        let mut store = c.store.lock().await;
        store.record(event.clone(), now, c.settings.max_event_age_secs);
        let snapshot = store.clone();
        drop(store);
        let c2 = c.clone();
        let _ = tokio::task::spawn_blocking(move || c2.save(&snapshot)).await;
    }
    if delivered {
        return;
    }
    for (i, q) in c.queues.iter().enumerate() {
        let url = &c.settings.peers[i].url;
        match q.try_send(event.clone()) {
            Ok(()) => {
                let n = c.pending[i].fetch_add(1, Ordering::Relaxed) + 1;
                shared.telemetry.metrics.set_cluster_pending(url, n);
            }
            Err(_) => {
                // The pull carries it: the peer asks for our events every sync interval.
                tracing::error!(peer = %url, id = %event.id, "relay queue full: the peer gets this request at its next sync");
            }
        }
    }
}

/// A request made on the control socket: signed with this node's first webhook key so
/// peers can verify it, then remembered and relayed. Without a key it stays here (logged).
pub(crate) async fn originate(shared: &Arc<Shared>, action: Action, body: serde_json::Value) {
    let c = shared;
    let now = unix_now();
    let body = body.to_string();
    let id = c.fresh_id("local");
    let Some(signature) = shared.killswitch.sign_local(&id, now, body.as_bytes()) else {
        tracing::error!(
            "no webhook key: a {} made on the control socket stays on this node",
            action.as_str()
        );
        return;
    };
    let event = SignedEvent::new(action, &id, &now.to_string(), &signature, body.as_bytes());
    accepted(shared, event, false).await;
}

/// Before a revive over the network reopens this node: relay it to every peer at once and
/// wait for every answer. `Err` names the peers that did not answer (unreachable, timed
/// out, or a server error): then nothing reopens here. A peer that answered with a refusal
/// (locked, wrong code) does not block: this node judges the request itself next.
pub(crate) async fn confirm(shared: &Arc<Shared>, event: &SignedEvent) -> Result<(), String> {
    let c = shared;
    let calls = c.settings.peers.iter().map(|p| {
        let c = c.clone();
        let event = event.clone();
        let p = p.clone();
        async move {
            let answer = post_event(&c, &p, &event, c.settings.confirm_timeout).await;
            (p.url, answer)
        }
    });
    let answers = futures_join_all(calls).await;
    let missing: Vec<String> = answers
        .into_iter()
        .filter_map(|(url, a)| match a {
            Ok(a) if a.status < 500 => None,
            Ok(a) => Some(format!("{url} (HTTP {})", a.status)),
            Err(e) => Some(format!("{url} ({e})")),
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "revive not confirmed by every peer: {}; nothing reopened on this node (on the gateway, `portcullis revive` through the control socket does not wait for peers)",
            missing.join(", ")
        ))
    }
}

/// Run futures concurrently and collect their outputs in order (no extra dependency).
async fn futures_join_all<F, T>(futs: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

async fn post_event(
    c: &Cluster,
    peer: &Peer,
    event: &SignedEvent,
    deadline: Duration,
) -> Result<client::Answer, client::CallError> {
    let body = event.body_bytes().unwrap_or_default();
    let path = format!("/v1/cluster/{}", event.action.as_str());
    let headers = [
        ("webhook-id", event.id.as_str()),
        ("webhook-timestamp", event.timestamp.as_str()),
        ("webhook-signature", event.signature.as_str()),
        (RELAYED_BY, c.settings.node.as_str()),
    ];
    client::post(peer.addr, &path, &headers, &body, deadline).await
}

/// One peer's relay queue: each request is sent until the peer answers it (bounded
/// back-off); a refusal (4xx) is final (logged; the peer's own pull tries again later).
async fn relay(shared: Arc<Shared>, index: usize, mut rx: mpsc::Receiver<SignedEvent>) {
    let c = shared.clone();
    let peer = c.settings.peers[index].clone();
    loop {
        let event = tokio::select! {
            () = shared.shutdown.stopping() => return,
            e = rx.recv() => match e { Some(e) => e, None => return },
        };
        let mut backoff = BACKOFF_FIRST;
        loop {
            match post_event(&c, &peer, &event, CALL_DEADLINE).await {
                Ok(a) if a.status < 300 => break,
                Ok(a) if a.status < 500 => {
                    tracing::error!(peer = %peer.url, id = %event.id, status = a.status, answer = %String::from_utf8_lossy(&a.body).trim(), "peer refused a relayed request");
                    break;
                }
                other => {
                    let why = match other {
                        Ok(a) => format!("HTTP {}", a.status),
                        Err(e) => e.to_string(),
                    };
                    let age = unix_now().saturating_sub(event.signed_at());
                    if age > c.settings.max_event_age_secs {
                        tracing::error!(peer = %peer.url, id = %event.id, "gave up relaying a request older than the age bound");
                        break;
                    }
                    tracing::debug!(peer = %peer.url, %why, ?backoff, "relay failed, retrying");
                    tokio::select! {
                        () = shared.shutdown.stopping() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        let n = c.pending[index]
            .fetch_sub(1, Ordering::Relaxed)
            .saturating_sub(1);
        shared.telemetry.metrics.set_cluster_pending(&peer.url, n);
    }
}

/// What a peer's sync answer holds.
#[derive(serde::Deserialize)]
struct SyncAnswer {
    node: String,
    events: Vec<SignedEvent>,
    view: serde_json::Value,
}

/// Ask one peer for its events (a signed call) and apply those not known here. Returns the
/// newest signed time among the peer's events that verified here.
async fn pull(shared: &Arc<Shared>, c: &Arc<Cluster>, peer: &Peer) -> Result<i64, String> {
    let now = unix_now();
    let body = json!({ "node": c.settings.node }).to_string();
    let id = c.fresh_id("sync");
    let signature = shared
        .killswitch
        .sign_local(&id, now, body.as_bytes())
        .ok_or("no webhook key to sign the sync with")?;
    let ts = now.to_string();
    let headers = [
        ("webhook-id", id.as_str()),
        ("webhook-timestamp", ts.as_str()),
        ("webhook-signature", signature.as_str()),
        (RELAYED_BY, c.settings.node.as_str()),
    ];
    let answer = client::post(
        peer.addr,
        "/v1/cluster/sync",
        &headers,
        body.as_bytes(),
        CALL_DEADLINE,
    )
    .await
    .map_err(|e| e.to_string())?;
    if answer.status != 200 {
        return Err(format!(
            "HTTP {}: {}",
            answer.status,
            String::from_utf8_lossy(&answer.body).trim()
        ));
    }
    let mut parsed: SyncAnswer =
        serde_json::from_slice(&answer.body).map_err(|e| format!("sync answer: {e}"))?;
    parsed.events.sort_by_key(SignedEvent::signed_at);
    let mut newest = 0;
    for event in &parsed.events {
        if c.refused_recently(&event.id, now) {
            continue;
        }
        match apply(shared, event, Some(peer.addr.ip()), now).await {
            Ok(_) => newest = newest.max(event.signed_at()),
            Err(e) => {
                tracing::warn!(peer = %peer.url, id = %event.id, error = %e, "an event the peer holds was not applied here");
                c.remember_refused(&event.id, now);
            }
        }
    }
    c.view(&peer.url, |v| {
        v.node = Some(parsed.node.clone());
        v.view = Some(parsed.view.clone());
    });
    Ok(newest)
}

/// Pull from every peer now, then every `sync_interval`; release the start-up hold once
/// every peer answered or `sync_timeout` passed (starting killed if that rule says so).
async fn pull_loop(shared: Arc<Shared>) {
    let c = shared.clone();
    let started = tokio::time::Instant::now();
    let mut answered = vec![false; c.settings.peers.len()];
    loop {
        for (i, peer) in c.settings.peers.iter().enumerate() {
            let now = unix_now();
            let result = pull(&shared, &c, peer).await;
            let up = result.is_ok();
            shared.telemetry.metrics.set_cluster_peer_up(&peer.url, up);
            match result {
                Ok(newest) => {
                    answered[i] = true;
                    c.view(&peer.url, |v| {
                        v.reachable = true;
                        v.last_answer_unix = Some(now);
                        v.last_error = None;
                    });
                    let mut store = c.store.lock().await;
                    let known = store.peers_latest.get(&peer.url).copied().unwrap_or(0);
                    if newest > known {
                        store.peers_latest.insert(peer.url.clone(), newest);
                        let snapshot = store.clone();
                        drop(store);
                        let c2 = c.clone();
                        let _ = tokio::task::spawn_blocking(move || c2.save(&snapshot)).await;
                    }
                }
                Err(e) => {
                    c.view(&peer.url, |v| {
                        v.reachable = false;
                        v.last_error = Some(e.clone());
                    });
                }
            }
        }
        if shared.killswitch.held() {
            let all = answered.iter().all(|a| *a);
            if all || started.elapsed() >= c.settings.sync_timeout {
                release(&shared, &c, &answered).await;
            }
        }
        let wait = if shared.killswitch.held() {
            STARTUP_POLL
        } else {
            c.settings.sync_interval
        };
        tokio::select! {
            () = shared.shutdown.stopping() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// End the start-up hold. If a peer never answered and, when last asked, held events newer
/// than any this node applied (or this node's store was unreadable), start killed first.
async fn release(shared: &Arc<Shared>, c: &Arc<Cluster>, answered: &[bool]) {
    let store = c.store.lock().await;
    let own = store.latest();
    let behind: Vec<String> = c
        .settings
        .peers
        .iter()
        .zip(answered)
        .filter(|(_, a)| !**a)
        .filter(|(p, _)| {
            c.store_unreadable || store.peers_latest.get(&p.url).copied().unwrap_or(0) > own
        })
        .map(|(p, _)| p.url.clone())
        .collect();
    drop(store);
    let unanswered: Vec<&str> = c
        .settings
        .peers
        .iter()
        .zip(answered)
        .filter(|(_, a)| !**a)
        .map(|(p, _)| p.url.as_str())
        .collect();
    if !behind.is_empty() {
        let now = unix_now();
        let policy = shared.policy.load_full();
        let local = Sender::local();
        let why = if c.store_unreadable {
            "this node's event store was unreadable"
        } else {
            "they knew newer events than this node"
        };
        let reason = format!(
            "cluster: start-up sync timed out; peers {} unreachable and {why}",
            behind.join(", ")
        );
        tracing::error!(%reason, "starting KILLED (fail closed)");
        shared
            .killswitch
            .kill(
                Scope::All,
                reason,
                Accepted {
                    sender: &local,
                    id: None,
                    source: None,
                },
                now,
                &policy,
                &shared.nft_agent_networks,
            )
            .await;
    }
    shared.killswitch.hold(false);
    shared.telemetry.metrics.set_cluster_synced(true);
    if unanswered.is_empty() {
        tracing::info!("cluster: synced with every peer; serving");
    } else {
        tracing::warn!(peers = ?unanswered, "cluster: start-up sync timed out; serving with what this node knows");
    }
    shared.telemetry.event(
        "kill_switch",
        &[
            ("event.action", "cluster_synced".into()),
            ("portcullis.cluster.unanswered", unanswered.join(",").into()),
            (
                "portcullis.cluster.started_killed",
                (!behind.is_empty()).into(),
            ),
        ],
    );
}

/// Add `cluster` (this node, and every peer's view as it last answered) to a status answer.
pub(crate) fn status_into(shared: &Shared, status: &mut serde_json::Value) {
    let c = shared;
    let peers = c.peers.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let peers: serde_json::Map<String, serde_json::Value> = c
        .settings
        .peers
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut value = peers
                .get(&p.url)
                .and_then(|v| serde_json::to_value(v).ok())
                .unwrap_or_default();
            value["relay_pending"] = c.pending[i].load(Ordering::Relaxed).into();
            (p.url.clone(), value)
        })
        .collect();
    if let Some(obj) = status.as_object_mut() {
        obj.insert(
            "cluster".into(),
            json!({
                "node": c.settings.node,
                "synced": !shared.killswitch.held(),
                "peers": peers,
            }),
        );
    }
}
