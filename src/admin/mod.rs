//! The admin API, on the management address only (127.0.0.1 by default): `/healthz`,
//! `/metrics`, the kill switch (`/v1/kill`, `/v1/revive`, `/v1/status`) and `/v1/reload`;
//! and the local control socket (`local`), which the `portcullis` commands on the gateway use.
//!
//! Must never be reachable from the agent network: that is a deployment rule (bind address,
//! nftables), stated in docs/kill-switch.md. Everything that changes state is signed like a
//! kill; connections are capped and every connection has deadlines (`[admin]`).

pub mod local;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::killswitch::webhook::SignedRequest;
use crate::killswitch::{self, Accepted, KillError, KillSwitch, Signed};

/// What the admin API and the control socket use. `shared` by name in the handlers.
pub struct AdminContext {
    pub policy: Arc<arc_swap::ArcSwap<crate::policy::Policy>>,
    pub killswitch: Arc<KillSwitch>,
    pub telemetry: crate::telemetry::Telemetry,
    pub caps: Arc<crate::proxy::ConnectionCaps>,
    pub tunnels: Arc<crate::proxy::tunnels::Tunnels>,
    pub settings: crate::config::AdminSettings,
    /// The agents' networks, for the nftables kill sets.
    pub nft_agent_networks: Vec<ipnet::IpNet>,
    pub shutdown: crate::shutdown::Shutdown,
    /// What only the application can do: reload the rules.
    pub control: Arc<dyn Control>,
    /// The peers kill state is shared with (`[cluster]`), if any.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

type Shared = AdminContext;

/// The application's side of the admin API: the rules reload (which touches the policy,
/// the live tunnels, the kill sets) and what the last one did.
pub trait Control: Send + Sync + 'static {
    /// Reload the rules now: the new generation, or why the running one stays.
    fn reload(&self) -> Pin<Box<dyn Future<Output = Result<u64, ReloadError>> + Send + 'static>>;
    fn last_reload(&self) -> LastReload;
}

/// What the last reload did, for `/healthz`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LastReload {
    pub ok: bool,
    pub generation: u64,
    pub error: Option<String>,
    pub revoked: usize,
}

/// Why a reload left the running policy in place.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReloadError {
    /// The rules do not compile: every error, with its file and line.
    #[error("{0}")]
    Rules(String),
    #[error("the reload task failed")]
    Task,
}

/// Largest admin request body.
const MAX_BODY: usize = 64 * 1024;
/// `/healthz` says `degraded` while log lines were dropped this recently.
const LOG_DROP_WINDOW: Duration = Duration::from_secs(60);

/// What the admin handlers share: the gateway, the optional `/metrics` token and the
/// log-drop watch behind `/healthz`.
struct Admin {
    shared: Arc<Shared>,
    metrics_token: Option<Arc<[u8]>>,
    drops: DropWatch,
}

/// Notices when the log-drop counter last grew.
#[derive(Default)]
struct DropWatch {
    seen: Mutex<(u64, Option<Instant>)>,
}

impl DropWatch {
    /// True when `dropped` grew within [`LOG_DROP_WINDOW`] of `now` (as far as the calls
    /// to this can tell: a first call that sees drops counts them as recent).
    fn recent(&self, dropped: u64, now: Instant) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if dropped > seen.0 {
            *seen = (dropped, Some(now));
        }
        seen.1
            .is_some_and(|at| now.saturating_duration_since(at) < LOG_DROP_WINDOW)
    }
}

pub async fn serve(shared: Arc<Shared>, listener: TcpListener, metrics_token: Option<Arc<[u8]>>) {
    let settings = shared.settings.clone();
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let admin = Arc::new(Admin {
        shared: shared.clone(),
        metrics_token,
        drops: DropWatch::default(),
    });
    loop {
        let accepted = tokio::select! {
            () = shared.shutdown.stopping() => return,
            r = listener.accept() => r,
        };
        let Ok((stream, peer)) = accepted else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        // At the cap the connection is closed at once: it holds nothing, and the kill
        // switch has the local control socket besides.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let admin = admin.clone();
        let settings = settings.clone();
        shared.shutdown.spawn(async move {
            let _slot = slot;
            let svc_admin = admin.clone();
            let service = service_fn(move |req| {
                let admin = svc_admin.clone();
                async move { Ok::<_, Infallible>(route(&admin, req, peer).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(settings.header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(settings.connection_timeout, conn).await;
        });
    }
}

async fn route(admin: &Admin, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
    let shared = &admin.shared;
    match (req.method().clone(), req.uri().path()) {
        (Method::GET, "/healthz") => json(StatusCode::OK, health(admin)),
        (Method::GET, "/metrics") => {
            if let Some(token) = &admin.metrics_token
                && !bearer_matches(req.headers(), token)
            {
                let mut r = error(StatusCode::UNAUTHORIZED, "a bearer token is required");
                r.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer"),
                );
                return r;
            }
            let mut r = Response::new(Full::new(Bytes::from(shared.telemetry.metrics.encode())));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        (Method::POST, "/v1/reload") => {
            let signed_body = match signed_body(admin, req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let now = unix_now();
            let signed = signed_body.signed(peer);
            if let Err(e) = shared.killswitch.authenticate("reload", &signed, now) {
                return kill_error(&e);
            }
            // In a task of its own, like a kill: a vanishing client never stops it half-way.
            let task = shared.shutdown.spawn(shared.control.reload());
            reload_response(task.await.unwrap_or(Err(ReloadError::Task)))
        }
        (Method::GET, "/v1/status") => {
            let mut status = shared.killswitch.status(unix_now()).await;
            if let Some(c) = &shared.cluster {
                crate::cluster::status_into(c, &mut status);
            }
            json(StatusCode::OK, status)
        }
        (Method::POST, path) if path.starts_with("/v1/cluster/") => {
            cluster_route(admin, req, peer).await
        }
        (Method::POST, "/v1/kill") => kill_or_revive(admin, req, peer, false).await,
        (Method::POST, "/v1/revive") => kill_or_revive(admin, req, peer, true).await,
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not found"}),
        ),
    }
}

/// `/healthz`: `ok`, or `degraded` with the reasons. The HTTP status is 200 either way
/// while the process serves: a killed gateway is doing its job, and must not hand its
/// address to an unkilled peer (docs/kill-switch.md).
fn health(admin: &Admin) -> serde_json::Value {
    let shared = &admin.shared;
    let policy = shared.policy.load();
    let mut reasons = shared.killswitch.health_reasons();
    let last_reload = shared.control.last_reload();
    if !last_reload.ok {
        reasons.push(format!(
            "reload: the last reload failed; generation {} still serves",
            last_reload.generation
        ));
    }
    let dropped = shared.telemetry.log_dropped();
    if admin.drops.recent(dropped, Instant::now()) {
        reasons.push("log: lines were dropped in the last minute".to_owned());
    }
    serde_json::json!({
        "status": if reasons.is_empty() { "ok" } else { "degraded" },
        "reasons": reasons,
        "policy_generation": policy.generation(),
        "agents": policy.agents().count(),
        "connections": shared.caps.in_use(),
        "log_dropped": dropped,
        "kill_switch_engaged": shared.killswitch.any_engaged(),
        "live_tunnels": shared.tunnels.len(),
        "last_reload": last_reload,
    })
}

fn bearer_matches(headers: &HeaderMap, token: &[u8]) -> bool {
    let Some(given) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    bool::from(given.ct_eq(token))
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// A request's body and Standard Webhooks headers, read within the body deadline.
struct SignedBody {
    id: String,
    timestamp: String,
    signature: String,
    body: Bytes,
}

impl SignedBody {
    fn signed(&self, peer: SocketAddr) -> Signed<'_> {
        Signed {
            request: SignedRequest {
                id: &self.id,
                timestamp: &self.timestamp,
                signature_header: &self.signature,
                body: &self.body,
            },
            source: Some(peer.ip()),
        }
    }

    /// The request as the cluster stores and relays it (headers and body unchanged).
    fn event(&self, action: crate::cluster::store::Action) -> crate::cluster::store::SignedEvent {
        crate::cluster::store::SignedEvent::new(
            action,
            &self.id,
            &self.timestamp,
            &self.signature,
            &self.body,
        )
    }

    /// The id and timestamp, remembered once the request acted.
    fn accepted<'a>(&'a self, sender: &'a killswitch::Sender, peer: SocketAddr) -> Accepted<'a> {
        Accepted {
            sender,
            id: self.timestamp.parse().ok().map(|ts| (self.id.as_str(), ts)),
            source: Some(peer.ip()),
        }
    }
}

async fn signed_body(
    admin: &Admin,
    req: Request<Incoming>,
) -> Result<SignedBody, Response<Full<Bytes>>> {
    let (parts, body) = req.into_parts();
    let deadline = admin.shared.settings.body_timeout;
    let body = match tokio::time::timeout(deadline, Limited::new(body, MAX_BODY).collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        _ => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "body unreadable, too large or too slow",
            ));
        }
    };
    let h = &parts.headers;
    let signed = SignedBody {
        id: header(h, "webhook-id").to_owned(),
        timestamp: header(h, "webhook-timestamp").to_owned(),
        signature: header(h, "webhook-signature").to_owned(),
        body,
    };
    Ok(signed)
}

/// `/v1/cluster/{kill,revive,sync}`: what peers send each other, every call signed
/// (src/cluster/, docs/cluster.md).
async fn cluster_route(
    admin: &Admin,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    use crate::cluster::store::Action;
    let path = req.uri().path().to_owned();
    let signed_body = match signed_body(admin, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Some(cluster) = &admin.shared.cluster else {
        return error(StatusCode::NOT_FOUND, "this node has no [cluster] peers");
    };
    let action = match path.as_str() {
        "/v1/cluster/kill" => Action::Kill,
        "/v1/cluster/revive" => Action::Revive,
        "/v1/cluster/sync" => {
            return match crate::cluster::sync_answer(cluster, &signed_body.signed(peer)).await {
                Ok(body) => json(StatusCode::OK, body),
                Err(e) => kill_error(&e),
            };
        }
        _ => return error(StatusCode::NOT_FOUND, "not found"),
    };
    let event = signed_body.event(action);
    match crate::cluster::relayed(cluster, event, Some(peer.ip())).await {
        Ok(outcome) => json(StatusCode::OK, serde_json::json!({ "outcome": outcome })),
        Err(crate::cluster::ApplyError::Kill(e)) => kill_error(&e),
        Err(e @ crate::cluster::ApplyError::Body) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(e @ crate::cluster::ApplyError::Task) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
        }
    }
}

/// Signature first (401), then the body (400), then the action.
async fn kill_or_revive(
    admin: &Admin,
    req: Request<Incoming>,
    peer: SocketAddr,
    revive: bool,
) -> Response<Full<Bytes>> {
    let shared = &admin.shared;
    let signed_body = match signed_body(admin, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let now = unix_now();
    let ks = &shared.killswitch;
    let action = if revive { "revive" } else { "kill" };
    let sender = match ks.authenticate(action, &signed_body.signed(peer), now) {
        Ok(s) => s,
        Err(e) => return kill_error(&e),
    };
    let request: killswitch::Request = match serde_json::from_slice(&signed_body.body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("body: {e}")),
    };
    let policy = shared.policy.load_full();
    let scope = match KillSwitch::parse_scope(&request, &policy) {
        Ok(s) => s,
        Err(e) => return kill_error(&e),
    };
    let event = signed_body.event(if revive {
        crate::cluster::store::Action::Revive
    } else {
        crate::cluster::store::Action::Kill
    });
    // A revive over the network reopens nothing until every peer answered it.
    if revive
        && let Some(c) = &shared.cluster
        && let Err(why) = crate::cluster::confirm(c, &event).await
    {
        return error(StatusCode::SERVICE_UNAVAILABLE, &why);
    }
    // In a task of its own: a client that goes away (or the connection's deadline) drops
    // only the answer, never a kill or revive half-way.
    let shared2 = admin.shared.clone();
    let task = shared.shutdown.spawn(async move {
        let ks = &shared2.killswitch;
        let nets = &shared2.nft_agent_networks;
        let by = signed_body.accepted(&sender, peer);
        let done = if revive {
            let code = request.totp.unwrap_or_default();
            ks.revive(scope, &code, by, now, &policy, nets).await
        } else {
            let reason = request.reason.unwrap_or_default();
            Ok(ks.kill(scope, reason, by, now, &policy, nets).await)
        };
        if done.is_ok() {
            // Remembered and relayed to every peer (a revive was delivered by `confirm`).
            if let Some(c) = &shared2.cluster {
                crate::cluster::accepted(c, event, revive).await;
            }
        }
        done
    });
    match task.await {
        Ok(Ok(report)) => {
            let status = if report.state_written {
                StatusCode::OK
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            json(status, serde_json::to_value(report).unwrap_or_default())
        }
        Ok(Err(e)) => kill_error(&e),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the kill switch task failed",
        ),
    }
}

/// The HTTP answer for a kill-switch error (shared with the control socket's codes).
fn kill_error(e: &KillError) -> Response<Full<Bytes>> {
    let (status, body) = kill_error_parts(e);
    let mut r = json(status, body);
    if let KillError::Locked { until } = e {
        let wait = until.saturating_sub(unix_now()).max(1);
        if let Ok(v) = http::HeaderValue::from_str(&wait.to_string()) {
            r.headers_mut().insert(http::header::RETRY_AFTER, v);
        }
    }
    r
}

pub(crate) fn kill_error_parts(e: &KillError) -> (StatusCode, serde_json::Value) {
    let status = match e {
        KillError::NotConfigured | KillError::ReviveNotConfigured => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        KillError::Unauthorized(_) | KillError::BadTotp { .. } => StatusCode::UNAUTHORIZED,
        KillError::Locked { .. } => StatusCode::TOO_MANY_REQUESTS,
        KillError::BadRequest(_) => StatusCode::BAD_REQUEST,
        KillError::NotWritten => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut body = serde_json::json!({ "error": e.to_string() });
    match e {
        KillError::BadTotp {
            locked_until: Some(until),
        }
        | KillError::Locked { until } => {
            body["locked_until"] = (*until).into();
        }
        _ => {}
    }
    (status, body)
}

fn reload_response(result: Result<u64, ReloadError>) -> Response<Full<Bytes>> {
    match result {
        Ok(generation) => json(
            StatusCode::OK,
            serde_json::json!({ "generation": generation }),
        ),
        Err(e) => json(
            StatusCode::UNPROCESSABLE_ENTITY,
            serde_json::json!({ "error": e.to_string() }),
        ),
    }
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(status, serde_json::json!({ "error": message }))
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string() + "\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_recent_for_a_minute_after_the_count_grew() {
        let w = DropWatch::default();
        let t = Instant::now();
        assert!(!w.recent(0, t));
        assert!(w.recent(3, t));
        assert!(w.recent(3, t + Duration::from_secs(59)));
        assert!(!w.recent(3, t + Duration::from_secs(61)));
        assert!(w.recent(4, t + Duration::from_secs(62)));
    }

    #[test]
    fn bearer_token_must_match_exactly() {
        let mut h = HeaderMap::new();
        assert!(!bearer_matches(&h, b"s3cret"));
        for (value, ok) in [
            ("Bearer s3cret", true),
            ("Bearer s3cre", false),
            ("Bearer s3cret2", false),
            ("bearer s3cret", false),
            ("Basic s3cret", false),
        ] {
            h.insert(
                http::header::AUTHORIZATION,
                http::HeaderValue::from_static(value),
            );
            assert_eq!(bearer_matches(&h, b"s3cret"), ok, "{value}");
        }
    }
}
