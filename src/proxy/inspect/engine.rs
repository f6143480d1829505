//! The inspect engine: one accepted agent stream whose destination the decision said to
//! inspect, from the TLS handshake to the last request.
//!
//! Owns terminating the agent's TLS with a minted leaf (ALPN `h2` or `http/1.1`), checking
//! every request against the agent's `[[http]]` rules (403 with the reason on refusal),
//! forwarding it over TLS that is always verified (the OS store, or the host's own CA file;
//! a certificate error is a 502 and an `upstream_tls` log line), streaming bodies both ways,
//! passing WebSocket upgrades, and one log line per request. The caller (the connection
//! lifecycle) has already identified the agent, decided, resolved and checked the
//! addresses, and owns the connection's record; [`serve`] returns what it needs for it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::ca::{CaError, CacheLimits, CertificateAuthority, LeafCache};
use crate::config::InspectSettings;
use crate::policy::http::HttpVerdict;
use crate::policy::path::normalize;
use crate::policy::{DomainName, Policy};
use crate::telemetry::Telemetry;

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Most upstream connections one inspected agent connection may hold (HTTP/1.1 upstreams
/// serve one request at a time; an HTTP/2 agent may send many at once).
const MAX_UPSTREAM_CONNECTIONS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("{path}: {source}")]
    Roots {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no certificate could be read")]
    NoRoots { path: std::path::PathBuf },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("agent TLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error("the hello names `{0:?}`, not the inspected name")]
    SniMismatch(Option<String>),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("cut")]
    Cancelled,
}

/// TLS client configurations for upstreams: ALPN `h2`+`http/1.1` or `http/1.1` only, for
/// the OS store and for each host with its own CA file.
struct Trust {
    default: [Arc<rustls::ClientConfig>; 2],
    per_host: HashMap<String, [Arc<rustls::ClientConfig>; 2]>,
}

fn client_configs(
    roots: rustls::RootCertStore,
) -> Result<[Arc<rustls::ClientConfig>; 2], InspectError> {
    let roots = Arc::new(roots);
    let make = |alpn: &[&[u8]]| -> Result<Arc<rustls::ClientConfig>, InspectError> {
        let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(c))
    };
    Ok([make(&[b"h2", b"http/1.1"])?, make(&[b"http/1.1"])?])
}

fn read_roots(path: &std::path::Path) -> Result<rustls::RootCertStore, InspectError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let text = std::fs::read(path).map_err(|source| InspectError::Roots {
        path: path.to_path_buf(),
        source,
    })?;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_slice_iter(&text).filter_map(Result::ok);
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(InspectError::NoRoots {
            path: path.to_path_buf(),
        });
    }
    Ok(roots)
}

/// What inspect mode needs for every connection: the leaf cache and the upstream trust.
pub struct Inspector {
    leaves: LeafCache,
    trust: Trust,
    log_query: bool,
}

impl std::fmt::Debug for Inspector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inspector").finish_non_exhaustive()
    }
}

impl Inspector {
    pub fn new(ca: CertificateAuthority, settings: &InspectSettings) -> Result<Self, InspectError> {
        let default = client_configs(read_roots(&settings.upstream_roots)?)?;
        let mut per_host = HashMap::new();
        for (host, file) in &settings.upstream_ca_files {
            per_host.insert(host.clone(), client_configs(read_roots(file)?)?);
        }
        Ok(Self {
            leaves: LeafCache::new(
                Arc::new(ca),
                CacheLimits::default(),
                vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            ),
            trust: Trust { default, per_host },
            log_query: settings.log_query,
        })
    }

    /// The CA of `state_dir/ca` and the `[inspect]` settings; `Ok(None)` when there is no
    /// CA (inspected destinations then fail closed).
    pub fn load(
        state_dir: &std::path::Path,
        settings: &InspectSettings,
    ) -> Result<Option<Self>, InspectError> {
        let dir = state_dir.join(super::ca::CA_DIR);
        if !dir.join(super::ca::CA_CERT_FILE).exists() {
            return Ok(None);
        }
        Ok(Some(Self::new(
            CertificateAuthority::load(&dir)?,
            settings,
        )?))
    }

    fn client_config(&self, host: &str, h2: bool) -> Arc<rustls::ClientConfig> {
        let set = self.trust.per_host.get(host).unwrap_or(&self.trust.default);
        set[usize::from(!h2)].clone()
    }
}

/// Where the engine reads the policy in force.
pub type PolicySource = Arc<dyn Fn() -> Arc<Policy> + Send + Sync>;

/// One inspected connection, as the lifecycle decided it.
pub struct Session {
    pub agent: Arc<str>,
    /// The live policy: each request is judged by the `[[http]]` rules in force when it
    /// arrives (a reload applies to open connections).
    pub policy: PolicySource,
    pub name: DomainName,
    pub port: u16,
    /// Resolved and checked by the caller.
    pub addrs: Vec<IpAddr>,
    pub connect_timeout: Duration,
    /// The agent's TLS handshake must be done within this.
    pub handshake_timeout: Duration,
    /// No byte either way for this long ends the connection, as for a tunnel.
    pub idle_timeout: Duration,
    pub cancel: CancellationToken,
    pub telemetry: Telemetry,
}

/// Bytes moved over an inspected connection, for the connection's record.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub bytes_from_agent: AtomicU64,
    pub bytes_to_agent: AtomicU64,
}

/// Terminate the agent's TLS and serve its requests until it closes, the session is
/// cancelled, or the handshake fails (never a fallback to passthrough).
pub async fn serve<S>(
    inspector: Arc<Inspector>,
    io: S,
    session: Session,
    counters: Arc<Counters>,
) -> Result<(), InspectError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cancel = session.cancel.clone();
    tokio::select! {
        r = serve_inner(inspector, io, session, counters) => r,
        () = cancel.cancelled() => Err(InspectError::Cancelled),
    }
}

async fn serve_inner<S>(
    inspector: Arc<Inspector>,
    io: S,
    session: Session,
    counters: Arc<Counters>,
) -> Result<(), InspectError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let idle_timeout = session.idle_timeout;
    let handshake_deadline = tokio::time::Instant::now() + session.handshake_timeout;
    let timed_out = || InspectError::Handshake(std::io::ErrorKind::TimedOut.into());
    let (io, last_active) = Activity::new(io);
    let start = tokio::time::timeout_at(
        handshake_deadline,
        tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io),
    )
    .await
    .map_err(|_| timed_out())?
    .map_err(InspectError::Handshake)?;
    // The leaf is for the decided name only: a hello naming anything else is refused.
    let sni = start.client_hello().server_name().map(str::to_owned);
    if sni
        .as_deref()
        .and_then(|s| DomainName::parse(s).ok())
        .as_ref()
        != Some(&session.name)
    {
        return Err(InspectError::SniMismatch(sni));
    }
    let config = inspector
        .leaves
        .server_config(&session.name, time::OffsetDateTime::now_utc())?;
    let tls = tokio::time::timeout_at(handshake_deadline, start.into_stream(config))
        .await
        .map_err(|_| timed_out())?
        .map_err(InspectError::Handshake)?;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let ctx = Arc::new(Ctx {
        inspector,
        session,
        counters,
        upstreams: Mutex::default(),
        upgrades: Mutex::default(),
        h2,
    });
    let relays = ctx.clone();
    let io = TokioIo::new(tls);
    let service = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, std::convert::Infallible>(ctx.handle(req).await) }
    });
    let served = async {
        if h2 {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(io, service)
                .await?;
        } else {
            hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(io, service)
                .with_upgrades()
                .await?;
        }
        // An upgraded connection (WebSocket) lives on in its relay: the connection ends
        // with it, so its record counts its bytes.
        loop {
            let next = relays
                .upgrades
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop();
            match next {
                Some(relay) => {
                    let _ = relay.await;
                }
                None => return Ok::<(), hyper::Error>(()),
            }
        }
    };
    tokio::select! {
        r = served => r?,
        // Idling out is a normal end, as for a tunnel.
        () = last_active.idle_for(idle_timeout) => {}
    }
    Ok(())
}

/// When a stream last moved a byte, either way.
struct LastActive {
    epoch: tokio::time::Instant,
    /// Milliseconds since `epoch`.
    at: AtomicU64,
}

impl LastActive {
    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.at.store(ms, Ordering::Relaxed);
    }

    /// Resolves once no byte has moved for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let last = self.epoch + Duration::from_millis(self.at.load(Ordering::Relaxed));
            let deadline = last + limit;
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// The agent's stream, noting each byte moved in [`LastActive`].
struct Activity<S> {
    io: S,
    last: Arc<LastActive>,
}

impl<S> Activity<S> {
    fn new(io: S) -> (Self, Arc<LastActive>) {
        let last = Arc::new(LastActive {
            epoch: tokio::time::Instant::now(),
            at: AtomicU64::new(0),
        });
        (
            Self {
                io,
                last: last.clone(),
            },
            last,
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Activity<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.last.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Activity<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.last.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<ProxyBody>),
    H2(hyper::client::conn::http2::SendRequest<ProxyBody>),
}

impl Sender {
    fn is_ready(&self) -> bool {
        match self {
            Self::H1(s) => s.is_ready(),
            Self::H2(s) => s.is_ready(),
        }
    }
    fn is_closed(&self) -> bool {
        match self {
            Self::H1(s) => s.is_closed(),
            Self::H2(s) => s.is_closed(),
        }
    }
}

struct Ctx {
    inspector: Arc<Inspector>,
    session: Session,
    counters: Arc<Counters>,
    /// Upstream connections of this agent connection.
    upstreams: Mutex<Vec<Sender>>,
    /// Relays of upgraded (WebSocket) requests, awaited before the connection ends.
    upgrades: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The agent speaks HTTP/2.
    h2: bool,
}

/// Why a request did not reach the upstream.
#[derive(Debug)]
enum UpstreamError {
    Tls(String),
    Connect(&'static str),
    Http(hyper::Error),
    Busy,
}

/// Headers that belong to one hop (RFC 9110 §7.6.1), and proxy credentials.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Remove the hop-by-hop headers, those `Connection` names included; keep `Upgrade` (and
/// `Connection: upgrade`) only when `upgrade` says so.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| *n != header::UPGRADE)
        .collect();
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(n);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

fn text_response(status: StatusCode, reason: &str, text: String) -> Response<ProxyBody> {
    let mut resp = Response::new(
        http_body_util::Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(reason) {
        resp.headers_mut().insert("x-portcullis-reason", v);
    }
    resp
}

/// The request's own idea of its host: `:authority` (HTTP/2, absolute form) or `Host`.
fn request_host(req: &Request<Incoming>) -> Option<(String, Option<u16>)> {
    let authority = match req.uri().authority() {
        Some(a) => a.as_str().to_owned(),
        None => req.headers().get(header::HOST)?.to_str().ok()?.to_owned(),
    };
    // Inspected destinations are names: no brackets to mind.
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h.to_owned(), Some(p.parse().ok()?)),
        None => (authority, None),
    };
    Some((host.trim_end_matches('.').to_ascii_lowercase(), port))
}

/// What one request's log line says.
struct RequestLog {
    method: String,
    path: String,
    query: Option<String>,
    rule: Option<Arc<str>>,
    reason: Option<&'static str>,
}

impl Ctx {
    fn log(&self, l: &RequestLog, status: u16, bytes_in: u64, bytes_out: u64) {
        use serde_json::Value;
        let mut fields: Vec<(&str, Value)> = vec![
            ("agent.name", Value::from(&*self.session.agent)),
            (
                "destination.domain",
                Value::from(self.session.name.as_str()),
            ),
            ("destination.port", Value::from(self.session.port)),
            ("http.request.method", Value::from(l.method.as_str())),
            ("url.path", Value::from(l.path.as_str())),
            ("http.response.status_code", Value::from(status)),
            ("source.bytes", Value::from(bytes_in)),
            ("destination.bytes", Value::from(bytes_out)),
            ("portcullis.inspected", Value::from(true)),
            (
                "event.action",
                Value::from(if l.reason.is_some() { "deny" } else { "allow" }),
            ),
        ];
        if let Some(r) = &l.rule {
            fields.push(("rule.name", Value::from(&**r)));
        }
        if let Some(r) = l.reason {
            fields.push(("event.reason", Value::from(r)));
        }
        if let Some(q) = &l.query {
            fields.push(("url.query", Value::from(q.as_str())));
        }
        self.session.telemetry.event("http", &fields);
    }

    fn refuse(
        &self,
        mut l: RequestLog,
        status: StatusCode,
        reason: &'static str,
        detail: String,
    ) -> Response<ProxyBody> {
        l.reason = Some(reason);
        self.log(&l, status.as_u16(), 0, 0);
        text_response(status, reason, format!("portcullis: {detail}\n"))
    }

    async fn handle(self: Arc<Self>, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let method = req.method().as_str().to_owned();
        let raw_path = req.uri().path().to_owned();
        let query = req.uri().query().map(str::to_owned);
        let mut l = RequestLog {
            method: method.clone(),
            path: raw_path.clone(),
            query: query.clone().filter(|_| self.inspector.log_query),
            rule: None,
            reason: None,
        };
        // The request must be for the name the TLS was terminated for.
        match request_host(&req) {
            Some((host, port))
                if host == self.session.name.as_str()
                    && port.is_none_or(|p| p == self.session.port) => {}
            _ => {
                return self.refuse(
                    l,
                    StatusCode::MISDIRECTED_REQUEST,
                    "host_mismatch",
                    format!("this connection serves {} only", self.session.name),
                );
            }
        }
        if req.method() == http::Method::CONNECT {
            return self.refuse(
                l,
                StatusCode::FORBIDDEN,
                "connect_in_inspected",
                "no CONNECT inside an inspected connection".into(),
            );
        }
        let path = match normalize(&raw_path) {
            Ok(p) => p,
            Err(e) => {
                return self.refuse(
                    l,
                    StatusCode::FORBIDDEN,
                    "ambiguous_path",
                    format!("refused: ambiguous path ({e})"),
                );
            }
        };
        l.path = path.as_str().to_owned();
        let policy = (self.session.policy)();
        let verdict = match policy
            .agent_by_name(&self.session.agent)
            .and_then(|id| policy.agent(id))
        {
            Some(a) => a.http.check(&self.session.name, &method, &path),
            None => HttpVerdict::NotAllowed,
        };
        l.rule = verdict.rule().cloned();
        match &verdict {
            HttpVerdict::DeniedByRule(r) => {
                return self.refuse(
                    l,
                    StatusCode::FORBIDDEN,
                    "http_denied",
                    format!("refused: {method} {path} is denied by {r}"),
                );
            }
            HttpVerdict::NotAllowed => {
                return self.refuse(
                    l,
                    StatusCode::FORBIDDEN,
                    "http_not_allowed",
                    format!(
                        "refused: no [[http]] rule allows {method} {path} on {}",
                        self.session.name
                    ),
                );
            }
            HttpVerdict::NoRules | HttpVerdict::Allow(_) => {}
        }

        let upgrade = !self.h2 && is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let sent = Arc::new(AtomicU64::new(0));
        let body = Counted {
            inner: body,
            bytes: sent.clone(),
            on_end: None,
        }
        .boxed();
        let trailers_wanted = parts
            .headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
        strip_hop_by_hop(&mut parts.headers, upgrade);
        let (sender, new) = match self.sender(upgrade).await {
            Ok(s) => s,
            Err(e) => return self.upstream_failed(l, e),
        };
        let path_and_query = match &query {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        let authority = if self.session.port == 443 {
            self.session.name.to_string()
        } else {
            format!("{}:{}", self.session.name, self.session.port)
        };
        let result = match sender {
            Sender::H1(mut s) => {
                parts.version = Version::HTTP_11;
                parts.uri = match Uri::try_from(path_and_query) {
                    Ok(u) => u,
                    Err(_) => {
                        return self.refuse(
                            l,
                            StatusCode::FORBIDDEN,
                            "ambiguous_path",
                            "refused: bad request target".into(),
                        );
                    }
                };
                if let Ok(v) = HeaderValue::from_str(&authority) {
                    parts.headers.insert(header::HOST, v);
                }
                let r = s.send_request(Request::from_parts(parts, body)).await;
                self.keep(Sender::H1(s), new, upgrade);
                r
            }
            Sender::H2(mut s) => {
                parts.version = Version::HTTP_2;
                parts.uri = match Uri::try_from(format!("https://{authority}{path_and_query}")) {
                    Ok(u) => u,
                    Err(_) => {
                        return self.refuse(
                            l,
                            StatusCode::FORBIDDEN,
                            "ambiguous_path",
                            "refused: bad request target".into(),
                        );
                    }
                };
                parts.headers.remove(header::HOST);
                // The one `TE` HTTP/2 allows, which gRPC needs end to end (RFC 9113 §8.2.2).
                if trailers_wanted {
                    parts
                        .headers
                        .insert(header::TE, HeaderValue::from_static("trailers"));
                }
                let r = s.send_request(Request::from_parts(parts, body)).await;
                self.keep(Sender::H2(s), new, upgrade);
                r
            }
        };
        let mut resp = match result {
            Ok(r) => r,
            Err(e) => return self.upstream_failed(l, UpstreamError::Http(e)),
        };
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let status = resp.status();
        if status == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let ctx = self.clone();
            let relay = tokio::spawn(async move {
                if let (Ok(a), Ok(u)) = (client_upgrade.await, upstream_upgrade.await) {
                    // Counted as the bytes move: an abrupt end still leaves its count.
                    let mut a = Counting {
                        io: TokioIo::new(a),
                        counters: ctx.counters.clone(),
                    };
                    let mut u = TokioIo::new(u);
                    let cancel = ctx.session.cancel.clone();
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut a, &mut u) => {}
                        () = cancel.cancelled() => {}
                    }
                }
            });
            self.upgrades
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(relay);
            self.log(&l, 101, 0, 0);
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers, true);
            return Response::from_parts(parts, body.boxed());
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        let ctx = self.clone();
        let body = Counted {
            inner: body,
            bytes: Arc::new(AtomicU64::new(0)),
            on_end: Some(Box::new(move |received: u64| {
                let sent = sent.load(Ordering::Relaxed);
                ctx.counters
                    .bytes_from_agent
                    .fetch_add(sent, Ordering::Relaxed);
                ctx.counters
                    .bytes_to_agent
                    .fetch_add(received, Ordering::Relaxed);
                ctx.log(&l, status.as_u16(), sent, received);
            })),
        };
        Response::from_parts(parts, body.boxed())
    }

    fn upstream_failed(&self, l: RequestLog, e: UpstreamError) -> Response<ProxyBody> {
        match e {
            UpstreamError::Tls(detail) => self.refuse(
                l,
                StatusCode::BAD_GATEWAY,
                "upstream_tls",
                format!("the upstream's certificate was refused: {detail}"),
            ),
            UpstreamError::Connect(reason) => self.refuse(
                l,
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                format!("upstream unreachable ({reason})"),
            ),
            UpstreamError::Http(e) => self.refuse(
                l,
                StatusCode::BAD_GATEWAY,
                "upstream_http",
                format!("upstream: {e}"),
            ),
            UpstreamError::Busy => self.refuse(
                l,
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_busy",
                "too many upstream connections for this connection".into(),
            ),
        }
    }

    /// Put an HTTP/1.1 connection back once its request is sent (it is ready again when
    /// the response body has ended); a new HTTP/2 connection joins the pool once; a
    /// connection that carried an upgrade is never reused.
    fn keep(&self, s: Sender, new: bool, upgrade: bool) {
        if upgrade || s.is_closed() || (matches!(s, Sender::H2(_)) && !new) {
            return;
        }
        let mut pool = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < MAX_UPSTREAM_CONNECTIONS {
            pool.push(s);
        }
    }

    /// A ready upstream connection: an idle one, or a new one. An upgrade always gets a
    /// new HTTP/1.1 connection of its own (it leaves the pool for good).
    async fn sender(&self, upgrade: bool) -> Result<(Sender, bool), UpstreamError> {
        if !upgrade {
            let mut pool = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
            pool.retain(|s| !s.is_closed());
            if let Some(i) = pool.iter().position(Sender::is_ready) {
                // An HTTP/2 connection serves many requests at once: it stays in the pool.
                return Ok((
                    match &pool[i] {
                        Sender::H2(s) => Sender::H2(s.clone()),
                        Sender::H1(_) => pool.swap_remove(i),
                    },
                    false,
                ));
            }
            if pool.len() >= MAX_UPSTREAM_CONNECTIONS {
                return Err(UpstreamError::Busy);
            }
        }
        Ok((self.connect(self.h2 && !upgrade).await?, true))
    }

    async fn connect(&self, offer_h2: bool) -> Result<Sender, UpstreamError> {
        let up = crate::proxy::upstream::dial(
            &self.session.addrs,
            self.session.port,
            self.session.connect_timeout,
            &[],
        )
        .await
        .map_err(|f| UpstreamError::Connect(f.reason.as_str()))?;
        // Requests and handshake messages are small writes back to back: no Nagle delay.
        let _ = up.stream.set_nodelay(true);
        let config = self
            .inspector
            .client_config(self.session.name.as_str(), offer_h2);
        let name = ServerName::try_from(self.session.name.as_str().to_owned())
            .map_err(|_| UpstreamError::Connect("bad_name"))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, up.stream)
            .await
            .map_err(|e| UpstreamError::Tls(e.to_string()))?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(tls);
        let cancel = self.session.cancel.clone();
        if h2 {
            let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(UpstreamError::Http)?;
            tokio::spawn(async move {
                tokio::select! { _ = conn => {}, () = cancel.cancelled() => {} }
            });
            Ok(Sender::H2(s))
        } else {
            let (s, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(UpstreamError::Http)?;
            tokio::spawn(async move {
                tokio::select! { _ = conn.with_upgrades() => {}, () = cancel.cancelled() => {} }
            });
            Ok(Sender::H1(s))
        }
    }
}

/// A stream whose first bytes were already read: a transparent listener peeks the hello
/// to decide, then hands [`serve`] the socket wrapped in this, and the TLS acceptor reads
/// the hello again. Writes go straight through.
pub struct Replay<S> {
    prefix: Bytes,
    io: S,
}

impl<S> Replay<S> {
    pub fn new(prefix: impl Into<Bytes>, io: S) -> Self {
        Self {
            prefix: prefix.into(),
            io,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The agent's side of an upgraded connection: bytes read are the agent's, bytes written
/// go to it.
struct Counting<S> {
    io: S,
    counters: Arc<Counters>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counting<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.counters
            .bytes_from_agent
            .fetch_add(n, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counting<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.counters
                .bytes_to_agent
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

type OnEnd = Box<dyn FnOnce(u64) + Send + Sync>;

/// A body passed through frame by frame (no buffering), its data bytes counted; `on_end`
/// runs once with the count when the body ends or is dropped.
struct Counted {
    inner: Incoming,
    bytes: Arc<AtomicU64>,
    on_end: Option<OnEnd>,
}

impl Counted {
    fn finish(&mut self) {
        if let Some(f) = self.on_end.take() {
            f(self.bytes.load(Ordering::Relaxed));
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
            }
            Poll::Ready(None) => self.finish(),
            _ => {}
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replay_gives_back_the_peeked_bytes_first() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut far, near) = tokio::io::duplex(64);
        let mut r = Replay::new(Bytes::from_static(b"hello "), near);
        far.write_all(b"world").await.unwrap();
        drop(far);
        let mut small = [0u8; 4];
        r.read_exact(&mut small).await.unwrap();
        assert_eq!(&small, b"hell");
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"o world");
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        let mut plain = h.clone();
        strip_hop_by_hop(&mut plain, false);
        assert_eq!(plain.len(), 1, "{plain:?}");
        assert!(plain.contains_key("x-kept"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
        assert!(!h.contains_key("x-secret") && !h.contains_key(header::PROXY_AUTHORIZATION));
    }
}
