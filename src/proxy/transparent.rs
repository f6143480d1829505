//! The transparent listener: connections nftables diverted from the agents' TCP 80/443.
//!
//! Only target detection lives here: the original destination (redirect or tproxy), the
//! agent by source, then the TLS ClientHello's SNI (port 443) or each request's `Host`
//! (port 80), peeked under a deadline and a cap. The rest is the lifecycle
//! (`proxy::session`): we resolve the *name* ourselves and dial that address, never the
//! agent's original destination (docs/threat-model.md, "Original destination"; a mismatch
//! is logged), replay the peeked bytes unchanged, relay. Anything malformed, missing or
//! ambiguous closes the connection (docs/threat-model.md, "Protocol confusion"). A
//! well-formed ClientHello refused by policy gets a TLS `access_denied` alert before the
//! close (`alert`). Port 80 connections are served request by request (hyper), the first
//! one included: a refused request gets its HTTP refusal (`403` and `X-Portcullis-Reason`
//! for a policy denial) and the connection is closed; so is a later request naming another
//! host. Nothing of a refused request reaches an upstream. The same per-request serving
//! carries plain HTTP inside an explicit `CONNECT` tunnel.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::limits::Refusal;
use crate::policy::{AgentId, Host, Policy, Reason, Target};
use crate::proxy::alert::{HelloAlert, refuses_hello};
use crate::proxy::forward::{ForwardTo, ProxyBody, forward, limited};
use crate::proxy::http_head::{HeadParse, parse_request_head};
use crate::proxy::peek::read_client_hello;
use crate::proxy::relay::RelayCounters;
use crate::proxy::session::{self, Attempt, Authorized, relay_tunnel};
use crate::proxy::target::{domain_of, parse_authority};
use crate::proxy::{ConnectionSlot, ProxyContext};
use crate::telemetry::{ConnectionRecord, Mode};

/// Serve one transparent listener until shutdown.
pub async fn serve(ctx: Arc<ProxyContext>, listener: TcpListener) {
    // The connection's future and its relay's are two allocations, each small enough for
    // glibc's fast path (`boxed_small`).
    crate::proxy::accept_loop(
        ctx,
        listener,
        Mode::Transparent,
        |ctx, stream, peer, slot| crate::proxy::boxed_small(handle(ctx, stream, peer, slot)),
    )
    .await;
}

/// What the original destination port says the agent must speak.
enum Expect {
    Tls,
    Http,
}

/// One diverted connection, to its end and its record: the target is what the ClientHello
/// names (port 443) or what each request's `Host` names (port 80); the lifecycle
/// (`session`) does the rest. A plain `fn` returning an `async move` block, not an `async
/// fn`, which would store its arguments twice in the state every idle tunnel keeps (see
/// src/proxy/relay.rs).
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice in the state of every idle tunnel"
)]
fn handle(
    ctx: Arc<ProxyContext>,
    mut stream: TcpStream,
    peer: SocketAddr,
    slot: ConnectionSlot,
) -> impl Future<Output = ()> + Send + 'static {
    async move {
        let policy = ctx.policy.load_full();
        let agent = policy.agent_by_source(peer.ip());
        let mut att = Attempt::begin(&ctx, Mode::Transparent, peer, &policy, agent);
        let counters = RelayCounters::default();
        let outcome = async {
            let original = (ctx.original_destination)(&stream, ctx.settings.interception)
                .map_err(|_| Reason::Malformed)?;
            att.rec().original_destination = Some(original);
            att.rec().destination_port = Some(original.port());
            if agent.is_none() {
                return Err(Reason::UnknownAgent);
            }
            att.check_kill()?;
            let settings = &ctx.settings;
            let expect = if settings.transparent_tls_ports.contains(&original.port()) {
                Expect::Tls
            } else if settings.transparent_http_ports.contains(&original.port()) {
                Expect::Http
            } else {
                return Err(Reason::Malformed);
            };
            let deadline = tokio::time::Instant::now() + settings.handshake_timeout;
            let mut peeked = Vec::new();
            let mut held = ctx.handshake.account();
            match expect {
                Expect::Tls => {
                    // Boxed phases (hello, checks and dial): their state is freed before the
                    // relay, so it does not weigh on every idle tunnel. What the hello tells
                    // is kept; the hello itself is not.
                    let (target, alert) = {
                        let hello = Box::pin(att.until_cancelled(read_client_hello(
                            &mut stream,
                            &mut peeked,
                            &mut held,
                            deadline,
                        )))
                        .await;
                        counters
                            .from_agent
                            .store(peeked.len() as u64, Ordering::Relaxed);
                        let hello = hello?;
                        // A parsed hello: a refusal from here to the dial may get the alert.
                        let alert = HelloAlert::for_hello(&hello);
                        let rec = att.rec();
                        rec.ech = hello.ech;
                        rec.server_name = hello.server_name;
                        match hello_target((&policy, agent), hello.ech, original, rec) {
                            Ok(target) => (target, alert),
                            Err(reason) => {
                                return Err(refuse_hello(&ctx, stream, alert, reason));
                            }
                        }
                    };
                    // The checks and the dial in a boxed phase; the relay, with what it alone
                    // needs (the admission, the registration, the upstream), in the tunnel's
                    // second allocation.
                    let relay = {
                        let opened = Box::pin(async {
                            let mut authorized =
                                session::authorize(&mut att, &policy, target, Some(original))
                                    .await
                                    .map_err(|r| r.reason)?;
                            let up = authorized.dial(&mut att, &peeked).await?;
                            Ok::<_, Reason>((authorized.into_live(), up.stream))
                        })
                        .await;
                        let (live, up) = match opened {
                            Ok(opened) => opened,
                            Err(reason) => return Err(refuse_hello(&ctx, stream, alert, reason)),
                        };
                        let (att, stream, counters) = (&att, &stream, &counters);
                        crate::proxy::boxed_small(async move {
                            relay_tunnel(att, &live, (stream, &up), counters).await
                        })
                    };
                    // The peeked bytes were replayed as the connection opened: freed now,
                    // and what the hello held of the shared budget goes back with them.
                    drop(std::mem::take(&mut peeked));
                    drop(held);
                    relay.await.map(|()| Handover::Done)
                }
                Expect::Http => {
                    let target = Box::pin(att.until_cancelled(read_http_target(
                        &mut stream,
                        &mut peeked,
                        &mut held,
                        deadline,
                        original.port(),
                        settings.max_request_head_bytes,
                    )))
                    .await;
                    counters
                        .from_agent
                        .store(peeked.len() as u64, Ordering::Relaxed);
                    let target = target?;
                    // Hand over to per-request serving; each request, the first included, is
                    // decided and recorded on its own: a refused one gets its HTTP refusal.
                    let conn = HttpConnection {
                        peer,
                        agent: att.agent_name(),
                        by_source: true,
                        first: target,
                        original: Some(original),
                        mode: Mode::Transparent,
                        cancel: att.cancel_token().clone(),
                        first_request: std::sync::Mutex::new(None),
                        served: std::sync::atomic::AtomicBool::new(false),
                    };
                    // The head's bytes are bounded by `max_request_head_bytes` from here.
                    drop(held);
                    let served =
                        Box::pin(serve_http(ctx.clone(), Rewind::new(peeked, stream), conn)).await;
                    if served {
                        Ok(Handover::Http)
                    } else {
                        // hyper refused the first head our peek accepted: recorded here.
                        Err(Reason::Malformed)
                    }
                }
            }
        }
        .await;
        drop(slot);
        match outcome {
            Ok(Handover::Http) => att.hand_over(),
            Ok(Handover::Done) => att.count(&counters),
            Err(reason) => {
                att.fail(reason);
                att.count(&counters);
            }
        }
    }
}

enum Handover {
    /// The connection was relayed and ended; its attempt writes the record.
    Done,
    /// Port 80: requests were served and recorded one by one.
    Http,
}

/// What the parsed hello must pass before any name is resolved: ECH (if the agent denies
/// it) and an SNI that is a host name. The target it names.
fn hello_target(
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
fn refuse_hello(
    ctx: &ProxyContext,
    stream: TcpStream,
    alert: HelloAlert,
    reason: Reason,
) -> Reason {
    if refuses_hello(reason) {
        alert.write_and_linger(stream, &ctx.shutdown);
    }
    reason
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

/// What every request on one plain-HTTP connection is checked against: a transparent
/// port-80 connection, or a `CONNECT` tunnel that carries plain HTTP.
pub(crate) struct HttpConnection {
    pub(crate) peer: SocketAddr,
    /// Whose connection it is, by name: each request finds the agent again in the policy
    /// of its time (an `AgentId` is a position, which a reload may give to another agent).
    pub(crate) agent: Arc<str>,
    /// Identified by its source address (not by credentials): each request's source must
    /// still belong to that agent.
    pub(crate) by_source: bool,
    /// The target every request must name: the first request's (transparent), or the
    /// `CONNECT` authority.
    pub(crate) first: Target,
    /// Where a transparent connection was sent (`None` inside a `CONNECT` tunnel).
    pub(crate) original: Option<SocketAddr>,
    pub(crate) mode: Mode,
    /// Kill switch (agent or all), revocation and shutdown: ends the connection.
    pub(crate) cancel: tokio_util::sync::CancellationToken,
    /// Inside a `CONNECT` tunnel: the tunnel's own attempt, already decided, admitted and
    /// resolved, which the first request uses (one decision, one token, one record).
    pub(crate) first_request: std::sync::Mutex<Option<(Attempt, Authorized)>>,
    /// A request reached the checks.
    pub(crate) served: std::sync::atomic::AtomicBool,
}

impl HttpConnection {
    /// The connection's agent in `policy`: `None` (refused as an unknown agent) once a
    /// reload removed it, or gave its source to another agent.
    fn agent_in(&self, policy: &Policy) -> Option<AgentId> {
        let agent = policy.agent_by_name(&self.agent)?;
        if self.by_source && policy.agent_by_source(self.peer.ip()) != Some(agent) {
            return None;
        }
        Some(agent)
    }
}

/// Serve a plain-HTTP connection request by request. Every request must name the same host
/// as the first; each is checked and forwarded to our own resolution of that host.
/// Returns whether any request reached the checks: a connection hyper refused before its
/// first request (a head it would not parse) is the caller's to record. A `CONNECT`'s own
/// attempt that no request used is ended `malformed`.
pub(crate) async fn serve_http<IO>(ctx: Arc<ProxyContext>, io: IO, conn: HttpConnection) -> bool
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cancel = conn.cancel.clone();
    let conn = Arc::new(conn);
    let kept = conn.clone();
    let svc_ctx = ctx.clone();
    let service = service_fn(move |req| {
        let ctx = svc_ctx.clone();
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(http_request(ctx, req, &conn).await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.settings.handshake_timeout)
        .max_buf_size(ctx.settings.max_request_head_bytes.max(8192))
        .serve_connection(TokioIo::new(io), service);
    tokio::select! {
        _ = served => {}
        () = cancel.cancelled() => {}
    }
    let unused = kept
        .first_request
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some((mut att, authorized)) = unused {
        let reason = if cancel.is_cancelled() {
            att.cancelled_reason(authorized.revoked())
        } else {
            Reason::Malformed
        };
        att.fail(reason);
    }
    kept.served.load(std::sync::atomic::Ordering::Relaxed)
}

/// One request on a plain-HTTP connection: the target is what its `Host` names, which must
/// be the connection's; the lifecycle does the rest.
async fn http_request(
    ctx: Arc<ProxyContext>,
    req: Request<Incoming>,
    conn: &HttpConnection,
) -> Response<ProxyBody> {
    conn.served
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let policy = ctx.policy.load_full();
    let first_request = conn
        .first_request
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    let (mut att, pre) = match first_request {
        Some((att, authorized)) => (att, Some(authorized)),
        None => (
            Attempt::begin(&ctx, conn.mode, conn.peer, &policy, conn.agent_in(&policy)),
            None,
        ),
    };
    let rec = att.rec();
    rec.original_destination = conn.original;
    rec.http_method = Some(req.method().as_str().to_owned());
    rec.destination_port = Some(conn.first.port);
    // Every refusal, the first request's too, is the same: status, reason header, close
    // (a later request would have to name the same refused host).
    let deny = |mut att: Attempt, refused: Refusal| {
        att.fail(refused.reason);
        let mut response = limited(refused);
        response.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
        response
    };
    let refused = |reason| Refusal {
        reason,
        retry_after: None,
    };
    if let Err(reason) = att.check_kill() {
        return deny(att, refused(reason));
    }
    let first = &conn.first;
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    let (Some(host), None) = (hosts.next(), hosts.next()) else {
        return deny(att, refused(Reason::Malformed));
    };
    let target = match host
        .to_str()
        .map_err(|_| Reason::Malformed)
        .and_then(|h| parse_authority(h.trim(), Some(first.port)))
    {
        Ok(t) => t,
        Err(r) => return deny(att, refused(r)),
    };
    att.rec().destination_domain = domain_of(&target);
    if target != *first {
        // A request to another host on the same connection: refuse and close.
        return deny(att, refused(Reason::Malformed));
    }
    if let Some(authority) = req.uri().authority()
        && parse_authority(authority.as_str(), Some(first.port))
            .ok()
            .as_ref()
            != Some(first)
    {
        return deny(att, refused(Reason::Malformed));
    }
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    att.rec().url = Some(format!(
        "http://{}{}",
        host.to_str().unwrap_or_default(),
        path
    ));
    let mut authorized = match pre {
        Some(authorized) => authorized,
        None => match session::authorize(&mut att, &policy, target, conn.original).await {
            Ok(a) => a,
            Err(r) => return deny(att, r),
        },
    };
    drop(policy);
    let upstream = match authorized.dial(&mut att, &[]).await {
        Ok(u) => u,
        Err(reason) => return deny(att, refused(reason)),
    };
    let authority = match (&first.host, first.port) {
        (h, 80) => h.to_string(),
        (h, p) => format!("{h}:{p}"),
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

/// An IO that first yields bytes already read from `inner`, then reads `inner`.
pub(crate) struct Rewind<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Rewind<S> {
    pub(crate) fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
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

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
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
