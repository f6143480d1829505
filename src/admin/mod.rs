//! The admin API, on the management address only (127.0.0.1 by default): health now;
//! metrics, reload and the kill switch as they land.
//!
//! Must never be reachable from the agent network: that is a deployment rule (bind address,
//! nftables), stated in the README.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::gateway::Shared;

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
                async move { Ok::<_, Infallible>(route(&shared, &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => {
            let policy = shared.policy.load();
            let body = serde_json::json!({
                "status": "ok",
                "policy_generation": policy.generation(),
                "agents": policy.agents().count(),
                "connections": shared.caps.in_use(),
                "log_dropped": shared.telemetry.log_dropped(),
            });
            json(StatusCode::OK, body.to_string())
        }
        (&Method::GET, "/metrics") => {
            let mut r = Response::new(Full::new(Bytes::from(shared.telemetry.metrics.encode())));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        _ => json(StatusCode::NOT_FOUND, "{\"error\":\"not found\"}".into()),
    }
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body + "\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}
