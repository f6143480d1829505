//! The transparent listener: connections nftables diverted from the agents' TCP 80/443.
//!
//! Phases: original destination (redirect or tproxy) → identify by source → peek the TLS
//! ClientHello (SNI) or HTTP request head (Host) under a deadline and a cap → evaluate →
//! resolve the *name* ourselves and dial that address, never the agent's original
//! destination (THREATS A1; a mismatch is logged) → replay the peeked bytes unchanged →
//! relay. Anything malformed, missing or ambiguous closes the connection (THREATS C8–C12).
//! A well-formed ClientHello refused by policy gets a TLS `access_denied` alert before the
//! close (`alert`). Port 80 connections are served request by request (hyper), the first
//! one included: a refused request gets its HTTP refusal (`403` and `X-Portcullis-Reason`
//! for a policy denial) and the connection is closed; so is a later request naming another
//! host. Nothing of a refused request reaches an upstream.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::gateway::Shared;
use crate::policy::{AgentId, Host, Policy, Reason, Target};
use crate::proxy::ConnectionSlot;
use crate::proxy::alert::{HelloAlert, refuses_hello};
use crate::proxy::forward::{ForwardTo, ProxyBody, forward, refusal};
use crate::proxy::http_head::{HeadParse, parse_request_head};
use crate::proxy::peek::read_client_hello;
use crate::proxy::relay::{RelayCounters, relay};
use crate::proxy::target::{domain_of, parse_authority};
use crate::proxy::upstream;
use crate::sys::{self, Interception};
use crate::telemetry::{ConnectionRecord, Mode, TunnelGauge};

/// Serve one transparent listener until shutdown.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    // The connection's future and its relay's are two allocations, each small enough for
    // glibc's fast path (`boxed_small`).
    crate::proxy::accept_loop(
        shared,
        listener,
        Mode::Transparent,
        |shared, stream, peer, slot| crate::proxy::boxed_small(handle(shared, stream, peer, slot)),
    )
    .await;
}

/// What the original destination port says the agent must speak.
enum Expect {
    Tls,
    Http,
}

/// One diverted connection, to its end and its record. A plain `fn` returning an `async
/// move` block, not an `async fn`, which would store its arguments twice in the state every
/// idle tunnel keeps (see src/proxy/relay.rs).
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice in the state of every idle tunnel"
)]
fn handle(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
    slot: ConnectionSlot,
) -> impl Future<Output = ()> + Send + 'static {
    async move {
        let started = Instant::now();
        let policy = shared.policy.load_full();
        let agent = policy.agent_by_source(peer.ip());
        let mut rec = ConnectionRecord::begin(
            Mode::Transparent,
            peer,
            policy.agent_name(agent),
            policy.generation(),
        );
        let counters = RelayCounters::default();
        // Taken before the kill check: a kill from here on cancels it, in every phase (the
        // hello the agent may hold back for the whole handshake deadline included).
        let cancel = shared.killswitch.tunnel_token(&rec.agent);
        let who = rec.agent.clone();
        let outcome = async {
            let original =
                sys::original_destination(&stream, shared.config.transparent.interception)
                    .map_err(|_| Reason::Malformed)?;
            rec.original_destination = Some(original);
            rec.destination_port = Some(original.port());
            if agent.is_none() {
                return Err(Reason::UnknownAgent);
            }
            if shared.killswitch.is_killed(&rec.agent) {
                return Err(Reason::KillSwitch);
            }
            let cfg = &shared.config;
            let expect = if cfg.transparent.tls_ports.contains(&original.port()) {
                Expect::Tls
            } else if cfg.transparent.http_ports.contains(&original.port()) {
                Expect::Http
            } else {
                return Err(Reason::Malformed);
            };
            let deadline = tokio::time::Instant::now() + cfg.timeouts.handshake;
            let mut peeked = Vec::new();
            let mut held = shared.handshake.account();
            match expect {
                Expect::Tls => {
                    // Boxed phases (hello, dial, HTTP): their state is freed before the
                    // relay, so it does not weigh on every idle tunnel. What the hello tells
                    // is kept; the hello itself is not.
                    let (target, alert) = {
                        let hello = Box::pin(until_cancelled(
                            (&shared, &who, &cancel),
                            read_client_hello(&mut stream, &mut peeked, &mut held, deadline),
                        ))
                        .await;
                        counters
                            .from_agent
                            .store(peeked.len() as u64, Ordering::Relaxed);
                        let hello = hello?;
                        // A parsed hello: a refusal from here to the dial may get the alert.
                        let alert = HelloAlert::for_hello(&hello);
                        rec.ech = hello.ech;
                        rec.server_name = hello.server_name;
                        match check_hello((&policy, agent), hello.ech, original, &mut rec) {
                            Ok(target) => (target, alert),
                            Err(reason) => {
                                return Err(refuse_hello(&shared, stream, alert, reason));
                            }
                        }
                    };
                    // The peeked bytes are replayed as the connection opens, then freed:
                    // an idle tunnel keeps no bytes.
                    let (dialled, admission) = match Box::pin(until_cancelled(
                        (&shared, &who, &cancel),
                        check_and_dial(
                            &shared, &policy, agent, &target, original, &peeked, &mut rec,
                        ),
                    ))
                    .await
                    {
                        Ok(dialled) => dialled,
                        Err(reason) => return Err(refuse_hello(&shared, stream, alert, reason)),
                    };
                    let (up, up_addr) = (dialled.stream, dialled.addr.ip());
                    drop(std::mem::take(&mut peeked));
                    // What the hello held of the shared budget goes back with it.
                    drop(held);
                    let _active = TunnelGauge::open(shared.telemetry.metrics.agent(&rec.agent));
                    tunnel(
                        &shared,
                        (&stream, &up),
                        &counters,
                        (&rec.agent, &target, up_addr),
                        &cancel,
                        &admission.shaping,
                    )
                    .await
                }
                Expect::Http => {
                    let target = Box::pin(until_cancelled(
                        (&shared, &who, &cancel),
                        read_http_target(
                            &mut stream,
                            &mut peeked,
                            &mut held,
                            deadline,
                            original.port(),
                            cfg.caps.max_request_head_bytes,
                        ),
                    ))
                    .await;
                    counters
                        .from_agent
                        .store(peeked.len() as u64, Ordering::Relaxed);
                    let target = target?;
                    // Hand over to per-request serving; each request, the first included, is
                    // decided and recorded on its own: a refused one gets its HTTP refusal.
                    let conn = HttpConnection {
                        peer,
                        agent,
                        first: target,
                        original,
                        cancel: cancel.clone(),
                    };
                    // The head's bytes are bounded by `max_request_head_bytes` from here.
                    drop(held);
                    Box::pin(serve_http(shared.clone(), stream, peeked, conn)).await;
                    Ok(Handover::Http)
                }
            }
        }
        .await;
        drop(slot);
        let reason = match outcome {
            Ok(Handover::Http) => return,
            Ok(Handover::Done) => None,
            Err(r) => Some(r),
        };
        rec.reason = reason;
        rec.bytes_from_agent = counters.from_agent.load(Ordering::Relaxed);
        rec.bytes_to_agent = counters.to_agent.load(Ordering::Relaxed);
        rec.duration = started.elapsed();
        shared.telemetry.record(rec);
    }
}

/// `phase`, unless the connection's token is cancelled first (a kill of the agent or of
/// all, or shutdown): then it ends at once with the reason. Boxed by its callers with the
/// phase inside, so the wait adds nothing to the state an idle tunnel keeps.
async fn until_cancelled<T>(
    (shared, agent, cancel): (&Shared, &str, &tokio_util::sync::CancellationToken),
    phase: impl Future<Output = Result<T, Reason>>,
) -> Result<T, Reason> {
    tokio::select! {
        biased;
        r = phase => r,
        () = cancel.cancelled() => Err(crate::proxy::explicit::cancelled_reason(shared, agent, false)),
    }
}

enum Handover {
    /// The connection was relayed and ended; the caller writes its record.
    Done,
    /// Port 80: requests were served and recorded one by one.
    Http,
}

/// What the parsed hello must pass before any name is resolved: ECH (if the agent denies
/// it) and an SNI that is a host name. The target it names.
fn check_hello(
    (policy, agent): (&Policy, Option<AgentId>),
    ech: bool,
    original: SocketAddr,
    rec: &mut ConnectionRecord,
) -> Result<Target, Reason> {
    if ech
        && agent
            .and_then(|id| policy.agent(id))
            .is_some_and(|a| a.deny_ech)
    {
        return Err(Reason::EchDenied);
    }
    // Never fall back to the original destination: no SNI, no connection.
    let sni = rec.server_name.as_deref().ok_or(Reason::NoSni)?;
    let name = crate::policy::DomainName::parse(sni).map_err(|_| Reason::Malformed)?;
    let target = Target {
        host: Host::Name(name),
        port: original.port(),
    };
    Ok(target)
}

/// A refusal after a parsed ClientHello (deny path only): the TLS `access_denied` alert
/// when the reason calls for one ([`refuses_hello`]), written at once (7 bytes into a send
/// buffer nothing was written to), the write half shut, and the connection handed to a
/// short drain ([`HelloAlert::write_and_linger`]) so that its close does not reset the
/// alert away. Otherwise the connection closes when dropped here.
fn refuse_hello(shared: &Shared, stream: TcpStream, alert: HelloAlert, reason: Reason) -> Reason {
    if refuses_hello(reason) {
        alert.write_and_linger(stream, &shared.tracker);
    }
    reason
}

/// The agent's limits for one more connection (transparent mode closes on refusal; there
/// is no response to put a `Retry-After` in).
fn admit(
    shared: &Shared,
    policy: &Policy,
    agent: Option<AgentId>,
    name: &Arc<str>,
) -> Result<crate::limits::Admission, Reason> {
    match agent.and_then(|id| policy.agent(id)) {
        Some(a) => shared
            .limiter
            .admit(name, &a.limits, Instant::now())
            .map_err(|r| r.reason),
        None => Ok(crate::limits::Admission::default()),
    }
}

/// Decide, then take the agent's limits (a denied attempt spends nothing), resolve the name
/// ourselves, check the addresses, dial one of them. The upstream and the admission.
async fn check_and_dial(
    shared: &Shared,
    policy: &Policy,
    agent: Option<AgentId>,
    target: &Target,
    original: SocketAddr,
    first: &[u8],
    rec: &mut ConnectionRecord,
) -> Result<(upstream::Upstream, crate::limits::Admission), Reason> {
    rec.destination_domain = domain_of(target);
    if let Some(reason) = super::decide(shared, policy, agent, target, rec) {
        return Err(reason);
    }
    let admission = admit(shared, policy, agent, &rec.agent)?;
    let cfg = &shared.config;
    let addrs = upstream::resolve_checked(
        policy,
        agent,
        target,
        shared.resolver.as_ref(),
        cfg.resolver.timeout,
    )
    .await
    .map_err(|f| {
        rec.destination_ip = f.addr;
        f.reason
    })?;
    let original_ip = crate::policy::address::canonical(original.ip());
    if !addrs
        .iter()
        .any(|a| crate::policy::address::canonical(*a) == original_ip)
    {
        // THREATS A1: the agent aimed elsewhere than the name resolves to; we dial the name.
        rec.destination_mismatch = true;
    }
    // The connection may have waited (the hello, the resolution) on a policy a reload has
    // since replaced: nothing is sent upstream that the live policy would not allow.
    let live = shared.policy.load();
    if live.generation() != policy.generation()
        && !crate::reload::still_allowed(&live, &rec.agent, target, &addrs)
    {
        return Err(Reason::PolicyRevoked);
    }
    drop(live);
    let up = upstream::dial(&addrs, target.port, cfg.timeouts.connect, first)
        .await
        .map_err(|f| {
            rec.destination_ip = f.addr;
            f.reason
        })?;
    rec.destination_ip = Some(up.addr.ip());
    Ok((up, admission))
}

/// Relay a dialled tunnel, registered for revocation and the kill switch, to its end.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice in the state of every idle tunnel"
)]
fn tunnel<'a>(
    shared: &'a Shared,
    (agent_io, up): (&'a TcpStream, &'a TcpStream),
    counters: &'a RelayCounters,
    (agent, target, addr): (&'a Arc<str>, &'a Target, std::net::IpAddr),
    cancel: &'a tokio_util::sync::CancellationToken,
    shaping: &'a crate::limits::Shaping,
) -> impl Future<Output = Result<Handover, Reason>> + 'a {
    // The registration and the relay share the tunnel's one allocation.
    crate::proxy::boxed_small(async move {
        let registration =
            shared
                .tunnels
                .register(agent.clone(), target.clone(), vec![addr], cancel.clone());
        // Decided on the policy of the connection's start: a reload since then that no longer
        // allows it revokes it here (later reloads find it registered).
        if !crate::reload::still_allowed(&shared.policy.load(), agent, target, &[addr]) {
            return Err(Reason::PolicyRevoked);
        }
        let idle = shared.config.timeouts.idle;
        let end = relay(agent_io, up, idle, cancel, counters, shaping).await;
        crate::proxy::explicit::relay_outcome(shared, agent, end, &registration)
            .map(|()| Handover::Done)
    })
}

/// Read the first HTTP request head and return the target its Host names. The Host port,
/// if any, must equal the original destination port.
async fn read_http_target(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    held: &mut crate::proxy::peek::Held,
    deadline: tokio::time::Instant,
    port: u16,
    cap: usize,
) -> Result<Target, Reason> {
    loop {
        match parse_request_head(buf) {
            HeadParse::Done(head) => {
                let target = parse_authority(&head.host, Some(port))?;
                if target.port != port {
                    return Err(Reason::Malformed);
                }
                return Ok(target);
            }
            HeadParse::Reject(r) => {
                tracing::debug!(reject = ?r, "http head rejected");
                return Err(Reason::Malformed);
            }
            HeadParse::NeedMore => {}
        }
        if buf.len() >= cap {
            return Err(Reason::Malformed);
        }
        // As before, one read may take the head past `cap` by less than a read's size.
        crate::proxy::peek::read_more(stream, buf, usize::MAX, held, deadline).await?;
    }
}

/// What every request on one port-80 connection is checked against.
struct HttpConnection {
    peer: SocketAddr,
    agent: Option<AgentId>,
    /// The target of the first request: every later one must name the same.
    first: Target,
    original: SocketAddr,
    /// Kill switch (agent or all) and shutdown.
    cancel: tokio_util::sync::CancellationToken,
}

/// Serve a port-80 connection request by request. Every request must name the same host as
/// the first; each is checked and forwarded to our own resolution of that host.
async fn serve_http(shared: Arc<Shared>, stream: TcpStream, peeked: Vec<u8>, conn: HttpConnection) {
    let io = Rewind {
        prefix: peeked,
        pos: 0,
        inner: stream,
    };
    let cancel = conn.cancel.clone();
    let conn = Arc::new(conn);
    let svc_shared = shared.clone();
    let service = service_fn(move |req| {
        let shared = svc_shared.clone();
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(http_request(shared, req, &conn).await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.config.timeouts.handshake)
        .max_buf_size(shared.config.caps.max_request_head_bytes.max(8192))
        .serve_connection(TokioIo::new(io), service);
    tokio::select! {
        _ = served => {}
        () = cancel.cancelled() => {}
    }
}

async fn http_request(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    conn: &HttpConnection,
) -> Response<ProxyBody> {
    let HttpConnection {
        peer,
        agent,
        ref first,
        original,
        ref cancel,
    } = *conn;
    let cut = cancel.clone();
    let started = Instant::now();
    let policy = shared.policy.load_full();
    let mut rec = ConnectionRecord::begin(
        Mode::Transparent,
        peer,
        policy.agent_name(agent),
        policy.generation(),
    );
    rec.original_destination = Some(original);
    rec.http_method = Some(req.method().as_str().to_owned());
    rec.destination_port = Some(first.port);
    // Every refusal, the first request's too, is the same: status, reason header, close
    // (a later request would have to name the same refused host).
    let deny = |mut rec: ConnectionRecord, reason: Reason| {
        rec.reason = Some(reason);
        rec.duration = started.elapsed();
        shared.telemetry.record(rec);
        let mut response = refusal(reason);
        response.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
        response
    };
    if shared.killswitch.is_killed(&rec.agent) {
        return deny(rec, Reason::KillSwitch);
    }
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    let (Some(host), None) = (hosts.next(), hosts.next()) else {
        return deny(rec, Reason::Malformed);
    };
    let target = match host
        .to_str()
        .map_err(|_| Reason::Malformed)
        .and_then(|h| parse_authority(h.trim(), Some(first.port)))
    {
        Ok(t) => t,
        Err(r) => return deny(rec, r),
    };
    rec.destination_domain = domain_of(&target);
    if target != *first {
        // A second request to another host on the same connection: refuse and close.
        return deny(rec, Reason::Malformed);
    }
    if let Some(authority) = req.uri().authority()
        && parse_authority(authority.as_str(), Some(first.port))
            .ok()
            .as_ref()
            != Some(first)
    {
        return deny(rec, Reason::Malformed);
    }
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    rec.url = Some(format!(
        "http://{}{}",
        host.to_str().unwrap_or_default(),
        path
    ));
    let mut rec_for_dial = rec;
    let who = rec_for_dial.agent.clone();
    let (up, admission) = match until_cancelled(
        (&shared, &who, &cut),
        check_and_dial(
            &shared,
            &policy,
            agent,
            &target,
            original,
            &[],
            &mut rec_for_dial,
        ),
    )
    .await
    {
        Ok(dialled) => dialled,
        Err(reason) => return deny(rec_for_dial, reason),
    };
    let authority = match (&target.host, target.port) {
        (h, 80) => h.to_string(),
        (h, p) => format!("{h}:{p}"),
    };
    forward(
        shared.clone(),
        req,
        ForwardTo {
            upstream: up,
            authority,
            path,
            cut,
        },
        rec_for_dial,
        started,
        admission,
    )
    .await
}

/// An IO that first yields bytes already read from `inner`, then reads `inner`.
struct Rewind {
    prefix: Vec<u8>,
    pos: usize,
    inner: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(rest) = self.prefix.get(self.pos..).filter(|r| !r.is_empty()) {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(rest.get(..n).unwrap_or_default());
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The interception mode's listener: `IP_TRANSPARENT` for tproxy.
pub fn bind(addr: SocketAddr, interception: Interception) -> io::Result<TcpListener> {
    sys::bind_listener(addr, interception == Interception::Tproxy, 4096)
}
