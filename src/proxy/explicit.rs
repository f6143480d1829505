//! The explicit forward proxy (HTTP/1.1 on hyper): `CONNECT host:port` tunnels and
//! absolute-form plain-HTTP requests, each request identified, checked and recorded.
//!
//! Phases of one request: identify → parse target → evaluate → resolve/check/dial →
//! respond (403/407/5xx, or 200 + relay, or forwarded response) → one record. A denied
//! request never touches an upstream.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::gateway::Shared;
use crate::policy::{DomainName, Host, Identity, Reason, Target};
use crate::proxy::ConnectionSlot;
use crate::proxy::peek::read_client_hello;
use crate::proxy::relay::{RelayCounters, RelayEnd, relay};
use crate::proxy::sni::ClientHello;
use crate::proxy::target::{self, domain_of};
use crate::proxy::upstream::{self, Upstream};
use crate::telemetry::{ConnectionRecord, Mode};

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Header naming the deny reason on every refusal.
pub const REASON_HEADER: &str = "x-portcullis-reason";

/// Accept loop: bounded, never stalls on one client, stops on `stop_accepting`.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            () = shared.stop_accepting.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Some(slot) = shared.caps.try_acquire(peer.ip()) else {
                    record_refusal(&shared, peer, Reason::Overloaded);
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                shared
                    .tracker
                    .spawn(serve_connection(shared.clone(), stream, peer, slot));
            }
            Err(e) => {
                // EMFILE/ENFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

fn record_refusal(shared: &Shared, peer: SocketAddr, reason: Reason) {
    let policy = shared.policy.load();
    let agent = policy.agent_by_source(peer.ip());
    let mut rec = ConnectionRecord::begin(
        Mode::Explicit,
        peer,
        policy.agent_name(agent),
        policy.generation(),
    );
    rec.reason = Some(reason);
    shared.telemetry.record(rec);
}

async fn serve_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    slot: ConnectionSlot,
) {
    let slot = Arc::new(slot);
    let svc_shared = shared.clone();
    let service = service_fn(move |req| {
        let shared = svc_shared.clone();
        let slot = slot.clone();
        async move { Ok::<_, Infallible>(handle(shared, peer, req, slot).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.config.handshake_timeout)
        .max_buf_size(shared.config.max_request_head_bytes.max(8192))
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = shared.stop_accepting.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                _ = conn.as_mut() => {}
                () = shared.cut.cancelled() => {}
            }
        }
    }
}

async fn handle(
    shared: Arc<Shared>,
    peer: SocketAddr,
    req: Request<Incoming>,
    slot: Arc<ConnectionSlot>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let policy = shared.policy.load_full();
    let basic = proxy_basic_credentials(req.headers());
    let identity = policy.identify(
        peer.ip(),
        basic.as_ref().map(|(u, p)| (u.as_str(), p.as_str())),
    );
    let agent = match identity {
        Identity::Agent(id) => Some(id),
        Identity::Unknown => None,
        Identity::NeedsCredentials => None,
    };
    let mut rec = ConnectionRecord::begin(
        Mode::Explicit,
        peer,
        policy.agent_name(agent),
        policy.generation(),
    );
    rec.http_method = Some(req.method().as_str().to_owned());
    let deny = |mut rec: ConnectionRecord, reason: Reason| {
        rec.reason = Some(reason);
        rec.duration = started.elapsed();
        shared.telemetry.record(rec);
        refusal(reason)
    };
    if identity == Identity::NeedsCredentials {
        return deny(rec, Reason::AuthRequired);
    }

    let request = match target::parse_request(req.method(), req.uri(), req.headers()) {
        Ok(r) => r,
        Err(reason) => return deny(rec, reason),
    };
    let target = request.target().clone();
    rec.destination_domain = domain_of(&target);
    rec.destination_port = Some(target.port);
    if let target::Request::Forward { .. } = request {
        rec.url = Some(req.uri().to_string());
    }

    let verdict = policy.evaluate(agent, &target);
    rec.rule = verdict.rule.clone();
    if let Some(reason) = verdict.deny_reason() {
        return deny(rec, reason);
    }

    // Resolve and check before answering, so an SSRF attempt gets a 403, not a tunnel.
    let cfg = &shared.config;
    let addrs = match upstream::resolve_checked(
        &policy,
        agent,
        &target,
        shared.resolver.as_ref(),
        cfg.resolver_timeout,
    )
    .await
    {
        Ok(a) => a,
        Err(f) => {
            rec.destination_ip = f.addr;
            return deny(rec, f.reason);
        }
    };

    match request {
        target::Request::Connect(_) => {
            let checks = TunnelChecks {
                target,
                addrs,
                deny_ech: agent
                    .and_then(|id| policy.agent(id))
                    .is_some_and(|a| a.deny_ech),
                allow_missing_sni: agent
                    .and_then(|id| policy.agent(id))
                    .is_some_and(|a| a.allow_missing_sni),
            };
            shared
                .tracker
                .spawn(tunnel(shared.clone(), req, checks, rec, started, slot));
            empty(StatusCode::OK)
        }
        target::Request::Forward {
            authority, path, ..
        } => {
            let upstream = match upstream::dial(&addrs, target.port, cfg.connect_timeout).await {
                Ok(u) => u,
                Err(f) => {
                    rec.destination_ip = f.addr;
                    return deny(rec, f.reason);
                }
            };
            rec.destination_ip = Some(upstream.addr.ip());
            forward(shared.clone(), req, upstream, authority, path, rec, started).await
        }
    }
}

/// What a CONNECT tunnel must still verify once the agent speaks.
struct TunnelChecks {
    target: Target,
    addrs: Vec<IpAddr>,
    deny_ech: bool,
    allow_missing_sni: bool,
}

/// Check the ClientHello inside the tunnel against the CONNECT host (THREATS A2).
fn check_hello(
    checks: &TunnelChecks,
    hello: &ClientHello,
    rec: &mut ConnectionRecord,
) -> Result<(), Reason> {
    rec.ech = hello.ech;
    rec.server_name = hello.server_name.clone();
    if hello.ech && checks.deny_ech {
        return Err(Reason::EchDenied);
    }
    let Some(sni) = &hello.server_name else {
        return if checks.allow_missing_sni {
            Ok(())
        } else {
            Err(Reason::NoSni)
        };
    };
    let sni = DomainName::parse(sni).map_err(|_| Reason::Malformed)?;
    match &checks.target.host {
        Host::Name(name) if *name == sni => Ok(()),
        _ => Err(Reason::SniMismatch),
    }
}

/// After `200 Connection established`: read the ClientHello (deadline, cap), check it, and
/// only then dial the checked address, replay the hello and relay.
async fn tunnel(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    checks: TunnelChecks,
    mut rec: ConnectionRecord,
    started: Instant,
    _slot: Arc<ConnectionSlot>,
) {
    let counters = Arc::new(RelayCounters::default());
    let outcome = async {
        let upgraded = hyper::upgrade::on(req)
            .await
            .map_err(|_| Reason::Malformed)?;
        let mut agent_io = TokioIo::new(upgraded);
        let mut peeked = Vec::new();
        let deadline = tokio::time::Instant::now() + shared.config.handshake_timeout;
        let hello = read_client_hello(&mut agent_io, &mut peeked, deadline).await;
        counters
            .from_agent
            .store(peeked.len() as u64, Ordering::Relaxed);
        check_hello(&checks, &hello?, &mut rec)?;
        let mut up = upstream::dial(
            &checks.addrs,
            checks.target.port,
            shared.config.connect_timeout,
        )
        .await
        .map_err(|f| f.reason)?;
        rec.destination_ip = Some(up.addr.ip());
        up.stream
            .write_all(&peeked)
            .await
            .map_err(|_| Reason::UpstreamFailed)?;
        let end = relay(
            agent_io,
            up.stream,
            shared.config.idle_timeout,
            &shared.cut,
            &counters,
        )
        .await;
        match end {
            RelayEnd::Cancelled => Err(Reason::ShuttingDown),
            RelayEnd::Closed | RelayEnd::IdleTimeout => Ok(()),
        }
    }
    .await;
    if let Err(reason) = outcome {
        rec.reason = Some(reason);
    }
    rec.bytes_from_agent = counters.from_agent.load(Ordering::Relaxed);
    rec.bytes_to_agent = counters.to_agent.load(Ordering::Relaxed);
    rec.duration = started.elapsed();
    shared.telemetry.record(rec);
}

/// Forward one plain-HTTP request over a fresh upstream connection; the record is written
/// when the response body ends (or is dropped).
async fn forward(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    upstream: Upstream,
    authority: String,
    path: String,
    rec: ConnectionRecord,
    started: Instant,
) -> Response<ProxyBody> {
    let counters = Arc::new(RelayCounters::default());
    let finish = RecordOnDrop {
        rec: Some(rec),
        counters: counters.clone(),
        shared: shared.clone(),
        started,
    };
    let (parts, body) = req.into_parts();
    let mut out = Request::builder().method(parts.method).uri(path);
    if let Some(h) = out.headers_mut() {
        copy_end_to_end_headers(&parts.headers, h);
        if let Ok(v) = HeaderValue::from_str(&authority) {
            h.insert(header::HOST, v);
        }
    }
    let body = Counted {
        inner: body,
        counters: counters.clone(),
        upstream_direction: true,
        finish: None,
    };
    let Ok(out) = out.body(body) else {
        return finish.fail(Reason::Malformed);
    };
    let io = TokioIo::new(upstream.stream);
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(io).await else {
        return finish.fail(Reason::UpstreamFailed);
    };
    let cut = shared.cut.clone();
    shared.tracker.spawn(async move {
        tokio::select! {
            _ = conn => {}
            () = cut.cancelled() => {}
        }
    });
    let response =
        match tokio::time::timeout(shared.config.idle_timeout, sender.send_request(out)).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => return finish.fail(Reason::UpstreamFailed),
            Err(_) => return finish.fail(Reason::Timeout),
        };
    let (mut parts, body) = response.into_parts();
    let mut headers = HeaderMap::new();
    copy_end_to_end_headers(&parts.headers, &mut headers);
    parts.headers = headers;
    let body = Counted {
        inner: body,
        counters,
        upstream_direction: false,
        finish: Some(finish),
    };
    Response::from_parts(parts, body.boxed())
}

/// Emits the record of a forwarded request exactly once, when dropped.
struct RecordOnDrop {
    rec: Option<ConnectionRecord>,
    counters: Arc<RelayCounters>,
    shared: Arc<Shared>,
    started: Instant,
}

impl RecordOnDrop {
    fn fail(mut self, reason: Reason) -> Response<ProxyBody> {
        if let Some(rec) = self.rec.as_mut() {
            rec.reason = Some(reason);
        }
        refusal(reason)
    }
}

impl Drop for RecordOnDrop {
    fn drop(&mut self) {
        if let Some(mut rec) = self.rec.take() {
            rec.bytes_from_agent = self.counters.from_agent.load(Ordering::Relaxed);
            rec.bytes_to_agent = self.counters.to_agent.load(Ordering::Relaxed);
            rec.duration = self.started.elapsed();
            self.shared.telemetry.record(rec);
        }
    }
}

/// A body that counts its data bytes into the relay counters.
struct Counted {
    inner: Incoming,
    counters: Arc<RelayCounters>,
    upstream_direction: bool,
    finish: Option<RecordOnDrop>,
}

impl Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let n = data.len() as u64;
            let c = if self.upstream_direction {
                &self.counters.from_agent
            } else {
                &self.counters.to_agent
            };
            c.fetch_add(n, Ordering::Relaxed);
        }
        if let Poll::Ready(None) = &polled {
            // Body complete: write the record now rather than when hyper drops the body.
            self.finish.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and the proxy's own are not forwarded; neither is
/// anything the client listed in `Connection`.
fn copy_end_to_end_headers(from: &HeaderMap, to: &mut HeaderMap) {
    const HOP: [&str; 9] = [
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ];
    let listed: Vec<HeaderName> = from
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for (name, value) in from {
        if name == header::HOST || HOP.contains(&name.as_str()) || listed.contains(name) {
            continue;
        }
        to.append(name.clone(), value.clone());
    }
}

/// `Proxy-Authorization: Basic base64(user:password)`; anything malformed is `None` with a
/// placeholder user, so it fails authentication rather than falling back to the source IP.
fn proxy_basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::PROXY_AUTHORIZATION)?;
    let parsed = value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("basic").then_some(token.trim())
        })
        .and_then(|t| base64::engine::general_purpose::STANDARD.decode(t).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.split_once(':').map(|(u, p)| (u.to_owned(), p.to_owned())));
    Some(parsed.unwrap_or_default())
}

fn status_for(reason: Reason) -> StatusCode {
    match reason {
        Reason::AuthRequired => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
        Reason::Malformed => StatusCode::BAD_REQUEST,
        Reason::RateLimited | Reason::BudgetExceeded => StatusCode::TOO_MANY_REQUESTS,
        Reason::ResolveFailed | Reason::UpstreamFailed => StatusCode::BAD_GATEWAY,
        Reason::Timeout => StatusCode::GATEWAY_TIMEOUT,
        Reason::Overloaded | Reason::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::FORBIDDEN,
    }
}

/// The refusal: a status, a one-line body and the reason header.
pub fn refusal(reason: Reason) -> Response<ProxyBody> {
    let body = format!("portcullis: denied ({reason})\n");
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status_for(reason);
    let h = resp.headers_mut();
    h.insert(REASON_HEADER, HeaderValue::from_static(reason.as_str()));
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if reason == Reason::AuthRequired {
        h.insert(
            header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"portcullis\""),
        );
    }
    if matches!(reason, Reason::Malformed | Reason::AuthRequired) {
        // The connection's framing can no longer be trusted / the client must retry.
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

fn empty(status: StatusCode) -> Response<ProxyBody> {
    let mut r = Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_parse_and_fail_closed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic Y29kZXI6czNjcmV0"),
        );
        assert_eq!(
            proxy_basic_credentials(&h),
            Some(("coder".into(), "s3cret".into()))
        );
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Bearer x"),
        );
        assert_eq!(
            proxy_basic_credentials(&h),
            Some((String::new(), String::new()))
        );
        assert_eq!(proxy_basic_credentials(&HeaderMap::new()), None);
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut from = HeaderMap::new();
        from.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-secret, keep-alive"),
        );
        from.insert("x-secret", HeaderValue::from_static("1"));
        from.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        from.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        let mut to = HeaderMap::new();
        copy_end_to_end_headers(&from, &mut to);
        assert_eq!(to.len(), 1);
        assert!(to.contains_key(header::ACCEPT));
    }
}
