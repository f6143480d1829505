//! The admin API, on the management address only (127.0.0.1 by default): `/healthz`,
//! `/metrics`, and the kill switch (`/v1/kill`, `/v1/revive`, `/v1/status`).
//!
//! Must never be reachable from the agent network: that is a deployment rule (bind address,
//! nftables), stated in the README. Request bodies are bounded in size and time.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::gateway::Shared;
use crate::killswitch::webhook::SignedRequest;
use crate::killswitch::{self, KillError, KillSwitch, Scope};

/// Largest admin request body.
const MAX_BODY: usize = 64 * 1024;

pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            () = shared.stop_accepting.cancelled() => return,
            r = listener.accept() => r,
        };
        let Ok((stream, _peer)) = accepted else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let svc_shared = shared.clone();
        shared.tracker.spawn(async move {
            let service = service_fn(move |req| {
                let shared = svc_shared.clone();
                async move { Ok::<_, Infallible>(route(&shared, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn route(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method().clone(), req.uri().path()) {
        (Method::GET, "/healthz") => {
            let policy = shared.policy.load();
            let body = serde_json::json!({
                "status": "ok",
                "policy_generation": policy.generation(),
                "agents": policy.agents().count(),
                "connections": shared.caps.in_use(),
                "log_dropped": shared.telemetry.log_dropped(),
                "kill_switch_engaged": shared.killswitch.any_engaged(),
                "live_tunnels": shared.tunnels.len(),
                "last_reload": shared.last_reload.lock().map(|l| l.clone()).unwrap_or_default(),
            });
            json(StatusCode::OK, body)
        }
        (Method::GET, "/metrics") => {
            let mut r = Response::new(Full::new(Bytes::from(shared.telemetry.metrics.encode())));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        (Method::POST, "/v1/reload") => match crate::reload::reload(shared).await {
            Ok(generation) => json(
                StatusCode::OK,
                serde_json::json!({ "generation": generation }),
            ),
            Err(e) => json(
                StatusCode::UNPROCESSABLE_ENTITY,
                serde_json::json!({ "error": e }),
            ),
        },
        (Method::GET, "/v1/status") => json(StatusCode::OK, shared.killswitch.status()),
        (Method::POST, "/v1/kill") => kill_or_revive(shared, req, false).await,
        (Method::POST, "/v1/revive") => kill_or_revive(shared, req, true).await,
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not found"}),
        ),
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// Signature first (401), then the body (400), then the action.
async fn kill_or_revive(
    shared: &Shared,
    req: Request<Incoming>,
    revive: bool,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match tokio::time::timeout(
        Duration::from_secs(5),
        Limited::new(body, MAX_BODY).collect(),
    )
    .await
    {
        Ok(Ok(b)) => b.to_bytes(),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "body unreadable, too large or too slow",
            );
        }
    };
    let now = unix_now();
    let signed = SignedRequest {
        id: header(&parts.headers, "webhook-id"),
        timestamp: header(&parts.headers, "webhook-timestamp"),
        signature_header: header(&parts.headers, "webhook-signature"),
        body: &body,
    };
    let ks = &shared.killswitch;
    if let Err(e) = ks.authenticate(&signed, now) {
        let status = match e {
            KillError::NotConfigured => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        };
        tracing::warn!(error = %e, revive, "kill switch request refused");
        return error(status, &e.to_string());
    }
    let request: killswitch::Request = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("body: {e}")),
    };
    let policy = shared.policy.load_full();
    let scope = match KillSwitch::parse_scope(&request, &policy) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let nets = &shared.config.nft_agent_networks;
    let metrics = &shared.telemetry.metrics;
    if revive {
        let code = request.totp.as_deref().unwrap_or("");
        return match ks.revive(scope.clone(), code, now, &policy, nets).await {
            Ok(report) => {
                tracing::warn!(scope = scope.label(), "kill switch revived");
                if scope == Scope::All {
                    for (_, a) in policy.agents() {
                        metrics.set_kill_switch(&a.name, false);
                    }
                }
                metrics.set_kill_switch(scope.label(), false);
                json(
                    StatusCode::OK,
                    serde_json::to_value(report).unwrap_or_default(),
                )
            }
            Err(KillError::BadTotp) => error(
                StatusCode::UNAUTHORIZED,
                "a valid TOTP code is required to revive",
            ),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        };
    }
    let live: i64 = match &scope {
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
    };
    let reason = request.reason.unwrap_or_default();
    let mut report = ks
        .kill(
            scope.clone(),
            reason,
            signed.id.to_owned(),
            now,
            &policy,
            nets,
        )
        .await;
    report.tunnels_cut = live;
    metrics.set_kill_switch(scope.label(), true);
    tracing::warn!(scope = scope.label(), tunnels = live, state_written = report.state_written, nft = %report.nft, "KILL SWITCH ENGAGED");
    let status = if report.state_written {
        StatusCode::OK
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    json(status, serde_json::to_value(report).unwrap_or_default())
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
