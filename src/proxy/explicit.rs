//! The explicit forward proxy (HTTP/1.1 on hyper): `CONNECT host:port` tunnels and
//! absolute-form plain-HTTP requests, each request identified, checked and recorded.
//!
//! Phases of one request: identify → parse target → evaluate → resolve/check/dial →
//! respond (403/407/5xx, or 200 + relay, or forwarded response) → one record. A denied
//! request never touches an upstream. In a tunnel, a ClientHello the checks refuse (SNI
//! not the CONNECT host, no SNI, ECH) gets a TLS `access_denied` alert before the close.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use base64::Engine;
use http::header::{self, HeaderMap};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::gateway::Shared;
use crate::policy::{DomainName, Host, Identity, Reason, Target};
use crate::proxy::ConnectionSlot;
use crate::proxy::alert::{HelloAlert, refuses_hello};
use crate::proxy::peek::read_client_hello;
use crate::proxy::relay::{RelayCounters, RelayEnd, relay, relay_io};
use crate::proxy::sni::ClientHello;
use crate::proxy::target::{self, domain_of};
use crate::proxy::upstream;
use crate::reload::TunnelRegistration;
use crate::telemetry::{ConnectionRecord, Mode, TunnelGauge};

use crate::limits::{Admission, Refusal};
use crate::proxy::auth::Session;
use crate::proxy::forward::{ForwardTo, ProxyBody, empty, forward, limited, refusal};

/// Serve the explicit proxy on `listener` until shutdown.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    crate::proxy::accept_loop(
        shared,
        listener,
        Mode::Explicit,
        |shared, stream, peer, slot| Box::pin(serve_connection(shared, stream, peer, slot)),
    )
    .await;
}

async fn serve_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    slot: ConnectionSlot,
) {
    let slot = Arc::new(slot);
    // Credentials verified on this connection are not verified again on it.
    let session = Arc::new(Session::default());
    let svc_shared = shared.clone();
    let service = service_fn(move |req| {
        let shared = svc_shared.clone();
        let slot = slot.clone();
        let session = session.clone();
        async move { Ok::<_, Infallible>(handle(shared, peer, req, slot, session).await) }
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
    session: Arc<Session>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let policy = shared.policy.load_full();
    // Credentials when given (then they alone identify), else the source address.
    let identified = match proxy_basic_credentials(req.headers()) {
        Some((user, password)) => shared
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
    let agent = identified.unwrap_or(None);
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
    if let Err(refused) = identified {
        rec.reason = Some(refused.reason);
        rec.duration = started.elapsed();
        shared.telemetry.record(rec);
        return limited(refused);
    }
    // Taken before the kill check: a kill from here on cancels it, whatever phase the
    // request is in (resolution, the hello wait, the relay).
    let cancel = shared.killswitch.tunnel_token(&rec.agent);
    if shared.killswitch.is_killed(&rec.agent) {
        return deny(rec, Reason::KillSwitch);
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

    if let Some(reason) = super::decide(&shared, &policy, agent, &target, &mut rec) {
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
    if cancel.is_cancelled() {
        // Killed while the name resolved.
        let reason = cancelled_reason(&shared, &rec.agent, false);
        return deny(rec, reason);
    }
    // Limits after the decision (DESIGN §2 step 6): a denied request spends no tokens.
    let admission = match agent.and_then(|id| policy.agent(id)) {
        Some(a) => match shared.limiter.admit(&rec.agent, &a.limits, Instant::now()) {
            Ok(admission) => admission,
            Err(refused) => {
                rec.reason = Some(refused.reason);
                rec.duration = started.elapsed();
                shared.telemetry.record(rec);
                return limited(refused);
            }
        },
        None => Admission::default(),
    };

    // Inspect mode (issue #30), a marked call site until the lifecycle is one session
    // function: a CONNECT to an inspected name is terminated by src/inspect/, never
    // tunnelled (without a CA it fails closed there).
    let inspected = match (&request, &target.host) {
        (target::Request::Connect(_), Host::Name(name))
            if policy.inspects(agent, &target).is_some() =>
        {
            Some(name.clone())
        }
        _ => None,
    };
    if let Some(name) = inspected {
        let peer = rec.source;
        let handover = crate::inspect::connect::Handover {
            req,
            name,
            target,
            addrs,
            cancel,
            rec,
            started,
            slot,
            admission,
        };
        let fut = crate::inspect::connect::serve_connect(shared.clone(), handover);
        super::spawn_supervised(&shared, Mode::Explicit, peer, Box::pin(fut));
        return empty(StatusCode::OK);
    }
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
                admission,
            };
            let peer = rec.source;
            let fut = tunnel(shared.clone(), req, (checks, cancel), rec, started, slot);
            super::spawn_supervised(&shared, Mode::Explicit, peer, Box::pin(fut));
            empty(StatusCode::OK)
        }
        target::Request::Forward {
            authority, path, ..
        } => {
            let dialled = tokio::select! {
                biased;
                () = cancel.cancelled() => None,
                r = upstream::dial(&addrs, target.port, cfg.connect_timeout, &[]) => Some(r),
            };
            let upstream = match dialled {
                Some(Ok(u)) => u,
                Some(Err(f)) => {
                    rec.destination_ip = f.addr;
                    return deny(rec, f.reason);
                }
                None => {
                    // Killed while the connection was being made.
                    let reason = cancelled_reason(&shared, &rec.agent, false);
                    return deny(rec, reason);
                }
            };
            rec.destination_ip = Some(upstream.addr.ip());
            forward(
                shared.clone(),
                req,
                ForwardTo {
                    upstream,
                    authority,
                    path,
                    cut: cancel,
                },
                rec,
                started,
                admission,
            )
            .await
        }
    }
}

/// What a CONNECT tunnel must still verify once the agent speaks.
struct TunnelChecks {
    target: Target,
    addrs: Vec<IpAddr>,
    deny_ech: bool,
    allow_missing_sni: bool,
    admission: Admission,
}

/// Why a relay was cancelled: the kill switch, a reload that revoked it, or shutdown.
pub(crate) fn cancelled_reason(shared: &Shared, agent: &str, revoked: bool) -> Reason {
    if shared.killswitch.is_killed(agent) {
        Reason::KillSwitch
    } else if revoked {
        Reason::PolicyRevoked
    } else {
        Reason::ShuttingDown
    }
}

/// What a relay's end means for the tunnel's record, on both the explicit and the
/// transparent path: a normal end (closed, or idled out), or why it was cut.
pub(crate) fn relay_outcome(
    shared: &Shared,
    agent: &str,
    end: RelayEnd,
    registration: &TunnelRegistration,
) -> Result<(), Reason> {
    match end {
        RelayEnd::Closed | RelayEnd::IdleTimeout => Ok(()),
        RelayEnd::Cancelled => Err(cancelled_reason(shared, agent, registration.revoked())),
        RelayEnd::BudgetExceeded => Err(Reason::BudgetExceeded),
    }
}

/// Check the ClientHello inside the tunnel against the CONNECT host (THREATS A2). A CONNECT
/// to an address (allowed by `allow_cidrs`) has no name to compare: a hello without SNI is
/// what clients send there; a hello naming some host is refused. A refusal comes with the
/// alert that may answer it.
fn check_hello(
    checks: &TunnelChecks,
    hello: ClientHello,
    rec: &mut ConnectionRecord,
) -> Result<(), (Reason, HelloAlert)> {
    let alert = HelloAlert::for_hello(&hello);
    check_names(checks, hello, rec).map_err(|reason| (reason, alert))
}

fn check_names(
    checks: &TunnelChecks,
    hello: ClientHello,
    rec: &mut ConnectionRecord,
) -> Result<(), Reason> {
    rec.ech = hello.ech;
    rec.server_name = hello.server_name;
    if hello.ech && checks.deny_ech {
        return Err(Reason::EchDenied);
    }
    match (&checks.target.host, &rec.server_name) {
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

/// After `200 Connection established`: read the ClientHello (deadline, cap), check it, and
/// only then dial the checked address, replay the hello and relay. The kill switch and
/// shutdown end the tunnel in every phase, the hello wait included.
async fn tunnel(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    (checks, cancel): (TunnelChecks, CancellationToken),
    mut rec: ConnectionRecord,
    started: Instant,
    _slot: Arc<ConnectionSlot>,
) {
    let counters = RelayCounters::default();
    let agent = rec.agent.clone();
    let registration = shared.tunnels.register(
        agent.clone(),
        checks.target.clone(),
        checks.addrs.clone(),
        cancel.clone(),
    );
    let outcome = async {
        // Decided on the policy of the request: a reload since then that no longer allows
        // the tunnel revokes it here (later reloads find it registered).
        if !crate::reload::still_allowed(
            &shared.policy.load(),
            &agent,
            &checks.target,
            &checks.addrs,
        ) {
            return Err(Reason::PolicyRevoked);
        }
        let upgraded = hyper::upgrade::on(req)
            .await
            .map_err(|_| Reason::Malformed)?;
        let idle = shared.config.idle_timeout;
        let shaping = &checks.admission.shaping;
        // The bare socket (zero-copy relay) when hyper hands it back, with whatever hyper
        // had already read past the CONNECT head; any other stream takes the copy path.
        let end = match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => {
                let mut agent_io = parts.io.into_inner();
                // A copy of what hyper read ahead, and hyper's read buffer (8 KiB and more,
                // which the `Bytes` keeps alive) released now, not when the tunnel ends.
                let peeked = parts.read_buf.to_vec();
                drop(parts.read_buf);
                // Boxed: the hello and dial phase's state is freed before the relay, so
                // it does not weigh on every idle tunnel.
                let up = Box::pin(open_upstream(
                    &shared,
                    &checks,
                    &mut agent_io,
                    peeked,
                    &counters,
                    &mut rec,
                ))
                .await?;
                let _active = TunnelGauge::open(shared.telemetry.metrics.agent(&rec.agent));
                relay(&agent_io, &up, idle, &cancel, &counters, shaping).await
            }
            Err(upgraded) => {
                let mut agent_io = TokioIo::new(upgraded);
                let up = Box::pin(open_upstream(
                    &shared,
                    &checks,
                    &mut agent_io,
                    Vec::new(),
                    &counters,
                    &mut rec,
                ))
                .await?;
                let _active = TunnelGauge::open(shared.telemetry.metrics.agent(&rec.agent));
                Box::pin(relay_io(agent_io, up, idle, &cancel, &counters, shaping)).await
            }
        };
        relay_outcome(&shared, &rec.agent, end, &registration)
    };
    let outcome = tokio::select! {
        r = outcome => r,
        () = cancel.cancelled() => Err(cancelled_reason(&shared, &agent, registration.revoked())),
    };
    if let Err(reason) = outcome {
        rec.reason = Some(reason);
    }
    rec.bytes_from_agent = counters.from_agent.load(Ordering::Relaxed);
    rec.bytes_to_agent = counters.to_agent.load(Ordering::Relaxed);
    rec.duration = started.elapsed();
    shared.telemetry.record(rec);
}

/// Read the tunnel's ClientHello (deadline, cap; `peeked` may already hold its start),
/// check it against the CONNECT target, dial the checked address and replay the hello.
/// A parsed hello the checks refuse gets the TLS `access_denied` alert before the close.
/// The hello's buffer is gone before the relay starts: an idle tunnel keeps no bytes.
async fn open_upstream<R: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    checks: &TunnelChecks,
    agent_io: &mut R,
    mut peeked: Vec<u8>,
    counters: &RelayCounters,
    rec: &mut ConnectionRecord,
) -> Result<TcpStream, Reason> {
    let deadline = tokio::time::Instant::now() + shared.config.handshake_timeout;
    let mut held = shared.handshake.account();
    let hello = read_client_hello(agent_io, &mut peeked, &mut held, deadline).await;
    counters
        .from_agent
        .store(peeked.len() as u64, Ordering::Relaxed);
    if let Err((reason, alert)) = check_hello(checks, hello?, rec) {
        // Boxed: the alert's state must not weigh on the allowed path's.
        return Err(Box::pin(refuse_hello(agent_io, alert, reason)).await);
    }
    let up = upstream::dial(
        &checks.addrs,
        checks.target.port,
        shared.config.connect_timeout,
        &peeked,
    )
    .await
    .map_err(|f| f.reason)?;
    rec.destination_ip = Some(up.addr.ip());
    Ok(up.stream)
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
