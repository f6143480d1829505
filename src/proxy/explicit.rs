//! The explicit forward proxy (HTTP/1.1 on hyper): `CONNECT host:port` tunnels and
//! absolute-form plain-HTTP requests, each request identified, checked and recorded.
//!
//! Phases of one request: identify → parse target → evaluate → resolve/check/dial →
//! respond (403/407/5xx, or 200 + relay, or forwarded response) → one record. A denied
//! request never touches an upstream. In a tunnel, a ClientHello the checks refuse (SNI
//! not the CONNECT host, no SNI, ECH) gets a TLS `access_denied` alert before the close.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use base64::Engine;
use http::header::{self, HeaderMap};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use crate::limits::Refusal;
use crate::policy::{DomainName, Host, Identity, Reason, Target};
use crate::proxy::alert::{HelloAlert, refuses_hello};
use crate::proxy::auth::Session;
use crate::proxy::forward::{ForwardTo, ProxyBody, empty, forward, limited, refusal};
use crate::proxy::peek::{read_client_hello, read_more};
use crate::proxy::relay::{RelayCounters, relay_io};
use crate::proxy::session::{self, Attempt, Authorized, relay_tunnel};
use crate::proxy::sni::ClientHello;
use crate::proxy::target;
use crate::proxy::transparent::{HttpConnection, Rewind, serve_http};
use crate::proxy::upstream::Upstream;
use crate::proxy::{ConnectionSlot, ProxyContext};
use crate::telemetry::{ConnectionRecord, Mode};

/// Serve the explicit proxy on `listener` until shutdown.
pub async fn serve(ctx: Arc<ProxyContext>, listener: TcpListener) {
    crate::proxy::accept_loop(ctx, listener, Mode::Explicit, |ctx, stream, peer, slot| {
        Box::pin(serve_connection(ctx, stream, peer, slot))
    })
    .await;
}

async fn serve_connection(
    ctx: Arc<ProxyContext>,
    stream: TcpStream,
    peer: SocketAddr,
    slot: ConnectionSlot,
) {
    let slot = Arc::new(slot);
    // Credentials verified on this connection are not verified again on it.
    let session = Arc::new(Session::default());
    let svc_ctx = ctx.clone();
    let service = service_fn(move |req| {
        let ctx = svc_ctx.clone();
        let slot = slot.clone();
        let session = session.clone();
        async move { Ok::<_, Infallible>(handle(ctx, peer, req, slot, session).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.settings.handshake_timeout)
        .max_buf_size(ctx.settings.max_request_head_bytes.max(8192))
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = ctx.shutdown.stopping() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                _ = conn.as_mut() => {}
                () = ctx.shutdown.cutting() => {}
            }
        }
    }
}

/// One request on the explicit proxy: identify the agent, find the target (the `CONNECT`
/// authority, or the absolute-form URI), and hand both to the lifecycle.
async fn handle(
    ctx: Arc<ProxyContext>,
    peer: SocketAddr,
    req: Request<Incoming>,
    slot: Arc<ConnectionSlot>,
    session: Arc<Session>,
) -> Response<ProxyBody> {
    let policy = ctx.policy.load_full();
    // Credentials when given (then they alone identify), else the source address.
    let credentials = proxy_basic_credentials(req.headers());
    let by_source = credentials.is_none();
    let identified = match credentials {
        Some((user, password)) => ctx
            .auth
            .authenticate(&policy, peer.ip(), &user, &password, &session)
            .await
            .map(Some),
        None => match policy.identify(peer.ip()) {
            Identity::Agent(id) => Ok(Some(id)),
            Identity::Unknown => Ok(None),
            Identity::NeedsCredentials => Err(Refusal {
                reason: Reason::AuthRequired,
                retry_after: None,
            }),
        },
    };
    let mut att = Attempt::begin(
        &ctx,
        Mode::Explicit,
        peer,
        &policy,
        identified.unwrap_or(None),
    );
    att.rec().http_method = Some(req.method().as_str().to_owned());
    if let Err(refused) = identified {
        att.fail(refused.reason);
        return limited(refused);
    }
    if let Err(reason) = att.check_kill() {
        att.fail(reason);
        return refusal(reason);
    }
    let request = match target::parse_request(req.method(), req.uri(), req.headers()) {
        Ok(r) => r,
        Err(reason) => {
            att.fail(reason);
            return refusal(reason);
        }
    };
    if let target::Request::Forward { .. } = request {
        att.rec().url = Some(req.uri().to_string());
    }
    // Resolved and checked before answering, so an SSRF attempt gets a 403, not a tunnel.
    let mut authorized =
        match session::authorize(&mut att, &policy, request.target().clone(), None).await {
            Ok(a) => a,
            Err(refused) => {
                att.fail(refused.reason);
                return limited(refused);
            }
        };

    // Inspect mode: a CONNECT to a name the agent's `inspect` patterns cover is terminated
    // by `proxy::inspect`, never tunnelled (without a CA it fails closed there).
    if let (target::Request::Connect(_), Host::Name(name)) = (&request, &authorized.target.host)
        && policy.inspects(att.agent(), &authorized.target).is_some()
    {
        let name = name.clone();
        drop(policy);
        let fut =
            super::inspect::connect::serve_connect(ctx.clone(), req, name, (att, authorized), slot);
        super::spawn_supervised(&ctx, Mode::Explicit, peer, Box::pin(fut));
        return empty(StatusCode::OK);
    }
    match request {
        target::Request::Connect(_) => {
            let agent = att.agent().and_then(|id| policy.agent(id));
            let checks = HelloChecks {
                deny_ech: agent.is_some_and(|a| a.deny_ech),
                allow_missing_sni: agent.is_some_and(|a| a.allow_missing_sni),
                by_source,
            };
            drop(policy);
            let fut = tunnel(ctx.clone(), req, (att, authorized), checks, slot);
            super::spawn_supervised(&ctx, Mode::Explicit, peer, Box::pin(fut));
            empty(StatusCode::OK)
        }
        target::Request::Forward {
            authority, path, ..
        } => {
            drop(policy);
            let upstream = match authorized.dial(&mut att, &[]).await {
                Ok(u) => u,
                Err(reason) => {
                    att.fail(reason);
                    return refusal(reason);
                }
            };
            forward(
                ctx.clone(),
                req,
                ForwardTo {
                    upstream,
                    authority,
                    path,
                },
                (att, authorized.into_live()),
            )
            .await
        }
    }
}

/// What a CONNECT tunnel's ClientHello must pass beyond naming the CONNECT host (and how
/// its agent was identified, for plain HTTP inside it).
struct HelloChecks {
    deny_ech: bool,
    allow_missing_sni: bool,
    by_source: bool,
}

/// Check the ClientHello inside the tunnel against the CONNECT host. A CONNECT to an
/// address (allowed by `allow_cidrs`) has no name to compare: a hello without SNI is what
/// clients send there; a hello naming some host is refused. A refusal comes with the alert
/// that may answer it.
fn check_hello(
    checks: &HelloChecks,
    target: &Target,
    hello: ClientHello,
    rec: &mut ConnectionRecord,
) -> Result<(), (Reason, HelloAlert)> {
    let alert = HelloAlert::for_hello(&hello);
    check_names(checks, target, hello, rec).map_err(|reason| (reason, alert))
}

fn check_names(
    checks: &HelloChecks,
    target: &Target,
    hello: ClientHello,
    rec: &mut ConnectionRecord,
) -> Result<(), Reason> {
    rec.ech = hello.ech;
    rec.server_name = hello.server_name;
    if hello.ech && checks.deny_ech {
        return Err(Reason::EchDenied);
    }
    match (&target.host, &rec.server_name) {
        (Host::Ip(_), None) => Ok(()),
        (Host::Name(_), None) if checks.allow_missing_sni => Ok(()),
        (Host::Name(_), None) => Err(Reason::NoSni),
        (Host::Name(name), Some(sni)) => match DomainName::parse(sni) {
            Ok(sni) if sni == *name => Ok(()),
            Ok(_) => Err(Reason::SniMismatch),
            Err(_) => Err(Reason::Malformed),
        },
        (Host::Ip(_), Some(_)) => Err(Reason::SniMismatch),
    }
}

/// A hello [`check_hello`] refused: the TLS `access_denied` alert first when the reason
/// calls for one ([`refuses_hello`]). Deny path only.
async fn refuse_hello<S: AsyncRead + AsyncWrite + Unpin>(
    agent_io: &mut S,
    alert: HelloAlert,
    reason: Reason,
) -> Reason {
    if refuses_hello(reason) {
        alert.send(agent_io).await;
    }
    reason
}

/// After `200 Connection established`: the tunnel's first bytes say what it carries. A TLS
/// ClientHello is read (deadline, cap) and checked, and only then the checked address is
/// dialled, the hello replayed and the bytes relayed. Plain HTTP, to a port served as
/// HTTP, is served request by request like transparent port 80 (each request checked and
/// recorded; the `CONNECT`'s own checks stand for the first). Anything else is refused.
/// The kill switch, a revoking reload and shutdown end the tunnel in every phase.
async fn tunnel(
    ctx: Arc<ProxyContext>,
    req: Request<Incoming>,
    (mut att, mut authorized): (Attempt, Authorized),
    checks: HelloChecks,
    _slot: Arc<ConnectionSlot>,
) {
    let counters = RelayCounters::default();
    let cancel = att.cancel_token().clone();
    let upgraded = tokio::select! {
        r = hyper::upgrade::on(req) => r.map_err(|_| Reason::Malformed),
        () = cancel.cancelled() => Err(att.cancelled_reason(authorized.revoked())),
    };
    let upgraded = match upgraded {
        Ok(u) => u,
        Err(reason) => {
            att.fail(reason);
            return;
        }
    };
    // The bare socket (zero-copy relay) when hyper hands it back, with whatever hyper had
    // already read past the CONNECT head; any other stream takes the copy path.
    let outcome = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let mut agent_io = parts.io.into_inner();
            // A copy of what hyper read ahead, and hyper's read buffer (8 KiB and more,
            // which the `Bytes` keeps alive) released now, not when the tunnel ends.
            let mut peeked = parts.read_buf.to_vec();
            drop(parts.read_buf);
            let deadline = tokio::time::Instant::now() + ctx.settings.handshake_timeout;
            let mut held = ctx.handshake.account();
            if peeked.is_empty() {
                let first = att
                    .until_cancelled(read_more(
                        &mut agent_io,
                        &mut peeked,
                        1,
                        &mut held,
                        deadline,
                    ))
                    .await;
                if let Err(reason) = first {
                    att.fail(reason);
                    return;
                }
            }
            if carries_plain_http(&peeked, &ctx, &authorized.target) {
                drop(held);
                let conn = HttpConnection {
                    peer: att.rec().source,
                    agent: att.agent_name(),
                    by_source: checks.by_source,
                    first: authorized.target.clone(),
                    original: None,
                    mode: Mode::Explicit,
                    cancel: cancel.clone(),
                    first_request: std::sync::Mutex::new(Some((att, authorized))),
                    served: std::sync::atomic::AtomicBool::new(false),
                };
                Box::pin(serve_http(ctx, Rewind::new(peeked, agent_io), conn)).await;
                return;
            }
            drop(held);
            let run = async {
                // Boxed: the hello and dial phase's state is freed before the relay, so it
                // does not weigh on every idle tunnel.
                let up = Box::pin(open_upstream(
                    &ctx,
                    &checks,
                    &mut agent_io,
                    peeked,
                    &counters,
                    (&mut att, &mut authorized),
                ))
                .await?;
                relay_tunnel(&att, &authorized.live, (&agent_io, &up.stream), &counters).await
            };
            tokio::select! {
                r = run => Some(r),
                () = cancel.cancelled() => None,
            }
        }
        Err(upgraded) => {
            let run = async {
                let mut agent_io = TokioIo::new(upgraded);
                let up = Box::pin(open_upstream(
                    &ctx,
                    &checks,
                    &mut agent_io,
                    Vec::new(),
                    &counters,
                    (&mut att, &mut authorized),
                ))
                .await?;
                let end = Box::pin(relay_io(
                    agent_io,
                    up.stream,
                    ctx.settings.idle_timeout,
                    &cancel,
                    &counters,
                    &authorized.live.admission.shaping,
                ))
                .await;
                authorized.live.outcome(&att, end)
            };
            tokio::select! {
                r = run => Some(r),
                () = cancel.cancelled() => None,
            }
        }
    };
    let outcome = outcome.unwrap_or_else(|| Err(att.cancelled_reason(authorized.revoked())));
    if let Err(reason) = outcome {
        att.fail(reason);
    }
    att.count(&counters);
}

/// Does a tunnel that starts with `first` carry plain HTTP: not a TLS handshake record, a
/// request line's first letter, and a port served as HTTP (`transparent.http_ports`, 80 by
/// default). Anything else goes to the ClientHello reader, which refuses what is not TLS.
fn carries_plain_http(first: &[u8], ctx: &ProxyContext, target: &Target) -> bool {
    first.first().is_some_and(u8::is_ascii_uppercase)
        && ctx.settings.transparent_http_ports.contains(&target.port)
}

/// Read the tunnel's ClientHello (deadline, cap; `peeked` may already hold its start),
/// check it against the CONNECT target, dial the checked address and replay the hello.
/// A parsed hello the checks refuse gets the TLS `access_denied` alert before the close.
/// The hello's buffer is gone before the relay starts: an idle tunnel keeps no bytes.
async fn open_upstream<R: AsyncRead + AsyncWrite + Unpin>(
    ctx: &ProxyContext,
    checks: &HelloChecks,
    agent_io: &mut R,
    mut peeked: Vec<u8>,
    counters: &RelayCounters,
    (att, authorized): (&mut Attempt, &mut Authorized),
) -> Result<Upstream, Reason> {
    let deadline = tokio::time::Instant::now() + ctx.settings.handshake_timeout;
    let mut held = ctx.handshake.account();
    let hello = read_client_hello(agent_io, &mut peeked, &mut held, deadline).await;
    counters
        .from_agent
        .store(peeked.len() as u64, Ordering::Relaxed);
    if let Err((reason, alert)) = check_hello(checks, &authorized.target, hello?, att.rec()) {
        // Boxed: the alert's state must not weigh on the allowed path's.
        return Err(Box::pin(refuse_hello(agent_io, alert, reason)).await);
    }
    authorized.dial(att, &peeked).await
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http::HeaderValue;

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
}
