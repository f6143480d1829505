//! Forwarding plain-HTTP requests to a checked upstream address, shared by the explicit
//! proxy (absolute-form) and transparent port 80 (origin-form + Host): hop-by-hop headers
//! stripped, `Host` set to the checked authority, bytes counted, and exactly one record
//! written when the response body ends or is dropped. Also the refusal responses.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;

use crate::limits::Refusal;
use crate::policy::Reason;
use crate::proxy::ProxyContext;
use crate::proxy::relay::RelayCounters;
use crate::proxy::session::{Attempt, Live};
use crate::proxy::upstream::Upstream;

/// Why a body stopped short: the upstream's or the agent's error, or the attempt's cut.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

pub type ProxyBody = BoxBody<Bytes, BodyError>;

/// Header naming the deny reason on every refusal.
pub const REASON_HEADER: &str = "x-portcullis-reason";

/// Where a checked plain-HTTP request goes: the dialled upstream, the `Host` it must carry
/// (the authority that was checked) and the origin-form target.
pub(crate) struct ForwardTo {
    pub(crate) upstream: Upstream,
    pub(crate) authority: String,
    pub(crate) path: String,
}

/// Forward one plain-HTTP request over its fresh upstream connection (the lifecycle's relay
/// step for plain HTTP). The attempt's record is written when the response body ends, or
/// is dropped; the attempt's token (kill switch, revocation, shutdown) cuts the upstream.
pub(crate) async fn forward(
    ctx: Arc<ProxyContext>,
    req: Request<Incoming>,
    to: ForwardTo,
    (att, live): (Attempt, Live),
) -> Response<ProxyBody> {
    let ForwardTo {
        upstream,
        authority,
        path,
    } = to;
    let cut = att.cancel_token().clone();
    let counters = Arc::new(RelayCounters::default());
    let shaping = live.admission.shaping.clone();
    // Shared by both bodies and this function: the record is written, and the agent's
    // permit and registration released, when the last of them is done (an upload that goes
    // on after the response ended stays counted, limited and revocable).
    let finish = Arc::new(RecordOnDrop {
        guard: std::sync::Mutex::new(Guard {
            att,
            live,
            counters: counters.clone(),
        }),
    });
    let (parts, body) = req.into_parts();
    // The request head's bytes count as the agent's, as a tunnel counts every byte, and
    // are charged to its budget like a body's.
    let head = head_len(&parts.method, &parts.uri, &parts.headers);
    counters.from_agent.fetch_add(head, Ordering::Relaxed);
    if !shaping.charge(usize::try_from(head).unwrap_or(usize::MAX)) {
        return finish.fail(Reason::BudgetExceeded);
    }
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
        finish: Some(finish.clone()),
        meter: Meter::new(shaping.clone()),
        cut: Box::pin(cut.clone().cancelled_owned()),
    };
    let Ok(out) = out.body(body) else {
        return finish.fail(Reason::Malformed);
    };
    let io = TokioIo::new(upstream.stream);
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(io).await else {
        return finish.fail(Reason::UpstreamFailed);
    };
    // Killed or revoked since the decision: nothing of the request leaves.
    if cut.is_cancelled() {
        return finish.fail_cut();
    }
    // Cut by the kill switch (of this agent or all), a revoking reload and shutdown, the
    // cut first.
    let conn_cut = cut.clone();
    ctx.shutdown.spawn(async move {
        tokio::select! {
            biased;
            () = conn_cut.cancelled() => {}
            _ = conn => {}
        }
    });
    let response =
        match tokio::time::timeout(ctx.settings.idle_timeout, sender.send_request(out)).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) if cut.is_cancelled() => return finish.fail_cut(),
            Ok(Err(_)) => return finish.fail(Reason::UpstreamFailed),
            Err(_) => return finish.fail(Reason::Timeout),
        };
    let (mut parts, body) = response.into_parts();
    let mut headers = HeaderMap::new();
    copy_end_to_end_headers(&parts.headers, &mut headers);
    parts.headers = headers;
    let head = response_head_len(parts.status, &parts.headers);
    counters.to_agent.fetch_add(head, Ordering::Relaxed);
    if !shaping.charge(usize::try_from(head).unwrap_or(usize::MAX)) {
        return finish.fail(Reason::BudgetExceeded);
    }
    let body = Counted {
        inner: body,
        counters,
        upstream_direction: false,
        finish: Some(finish),
        meter: Meter::new(shaping),
        cut: Box::pin(cut.cancelled_owned()),
    };
    Response::from_parts(parts, body.boxed())
}

/// The bytes of a request head as HTTP/1.1 writes it: request line, headers, blank line.
fn head_len(method: &http::Method, uri: &http::Uri, headers: &HeaderMap) -> u64 {
    let line = method.as_str().len() + 1 + uri.to_string().len() + " HTTP/1.1\r\n".len();
    (line + headers_len(headers) + 2) as u64
}

/// The bytes of a response head as sent to the agent: status line, headers, blank line.
fn response_head_len(status: StatusCode, headers: &HeaderMap) -> u64 {
    let reason = status.canonical_reason().unwrap_or("");
    let line = "HTTP/1.1 000 ".len() + reason.len() + 2;
    (line + headers_len(headers) + 2) as u64
}

fn headers_len(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(n, v)| n.as_str().len() + 2 + v.len() + 2)
        .sum()
}

/// The attempt of a forwarded request, finished exactly once, when the last of its holders
/// (the two bodies, the forwarding itself) lets go: its byte counts, and why it ended short
/// (a spent budget, a cut) if it did.
struct RecordOnDrop {
    guard: std::sync::Mutex<Guard>,
}

struct Guard {
    att: Attempt,
    /// Holds the agent's concurrency slot and the tunnel registration for the request.
    live: Live,
    counters: Arc<RelayCounters>,
}

impl RecordOnDrop {
    fn lock(&self) -> std::sync::MutexGuard<'_, Guard> {
        self.guard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// End the attempt with `reason` (unless it already has one) and answer the refusal.
    fn fail(&self, reason: Reason) -> Response<ProxyBody> {
        let mut g = self.lock();
        let reason = *g.att.rec().reason.get_or_insert(reason);
        refusal(reason)
    }

    /// The attempt's token fired: the kill switch, a revoking reload, or shutdown.
    fn fail_cut(&self) -> Response<ProxyBody> {
        let reason = {
            let g = self.lock();
            g.att.cancelled_reason(g.live.revoked())
        };
        self.fail(reason)
    }
}

impl Drop for RecordOnDrop {
    fn drop(&mut self) {
        let g = self
            .guard
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        g.att.count(&g.counters);
        if g.att.rec().reason.is_none() {
            if g.live.admission.shaping.spent() {
                // The bodies charged the budget as their bytes moved (`Meter`).
                g.att.fail(Reason::BudgetExceeded);
            } else if g.att.cancel_token().is_cancelled() {
                let reason = g.att.cancelled_reason(g.live.revoked());
                g.att.fail(reason);
            }
        }
    }
}

/// The relay's rules for a plain-HTTP body: its bytes are shaped to the agent's `bandwidth`
/// and charged to its daily budget as they move, in pieces of at most [`crate::limits::PIECE`] (as the relay); a
/// spent budget ends the body there (the overshoot is at most one piece).
struct Meter {
    shaping: crate::limits::Shaping,
    /// The body's share of the agent's bandwidth while it flows.
    _share: Option<crate::limits::bandwidth::TunnelHandle>,
    /// Data read from the inner body and not yet passed on.
    pending: Option<Bytes>,
    /// Bytes reserved on credit, to pass on once `wait` has run out.
    granted: usize,
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
    spent: bool,
}

impl Meter {
    fn new(shaping: crate::limits::Shaping) -> Self {
        let share = shaping.bandwidth.as_ref().map(|b| b.open());
        Self {
            shaping,
            _share: share,
            pending: None,
            granted: 0,
            wait: None,
            spent: false,
        }
    }

    /// The next piece of `pending` that may move now, or `Pending` while the bandwidth
    /// reservation is paid off.
    fn next_piece(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        loop {
            if let Some(wait) = self.wait.as_mut() {
                std::task::ready!(wait.as_mut().poll(cx));
                self.wait = None;
            }
            let Some(mut data) = self.pending.take() else {
                return Poll::Ready(None);
            };
            let n = if self.granted > 0 {
                std::mem::take(&mut self.granted)
            } else {
                let want = self.shaping.piece(data.len());
                match &self.shaping.bandwidth {
                    Some(bw) => {
                        let grant = bw.reserve(want, Instant::now());
                        if !grant.wait.is_zero() {
                            self.granted = grant.bytes.max(1);
                            self.wait = Some(Box::pin(tokio::time::sleep(grant.wait)));
                            self.pending = Some(data);
                            continue;
                        }
                        grant.bytes.max(1)
                    }
                    None => want,
                }
            };
            let piece = data.split_to(n.min(data.len()));
            if !data.is_empty() {
                self.pending = Some(data);
            }
            if !self.shaping.charge(piece.len()) {
                self.spent = true;
                self.pending = None;
                return Poll::Ready(None);
            }
            return Poll::Ready(Some(piece));
        }
    }
}

/// A body that counts its data bytes into the relay counters and moves them through its
/// [`Meter`].
struct Counted {
    inner: Incoming,
    counters: Arc<RelayCounters>,
    upstream_direction: bool,
    finish: Option<Arc<RecordOnDrop>>,
    meter: Meter,
    /// The attempt's token: a kill, a revoking reload or shutdown ends the body with an
    /// error at once (never a silently short body), whatever it was waiting for.
    cut: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl Body for Counted {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.cut.as_mut().poll(cx).is_ready() {
            self.finish.take();
            return Poll::Ready(Some(Err(
                "cut by the kill switch, a reload or shutdown".into()
            )));
        }
        loop {
            if self.meter.spent {
                // The budget is spent: the body ends here, short, and the record says why.
                self.finish.take();
                return Poll::Ready(None);
            }
            if self.meter.pending.is_some() {
                match std::task::ready!(self.meter.next_piece(cx)) {
                    Some(piece) => {
                        let n = piece.len() as u64;
                        let c = if self.upstream_direction {
                            &self.counters.from_agent
                        } else {
                            &self.counters.to_agent
                        };
                        c.fetch_add(n, Ordering::Relaxed);
                        return Poll::Ready(Some(Ok(Frame::data(piece))));
                    }
                    None => continue,
                }
            }
            match std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) => self.meter.pending = Some(data),
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                None => {
                    // Body complete: write the record now rather than when hyper drops it.
                    self.finish.take();
                    return Poll::Ready(None);
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.meter.pending.is_none() && self.inner.is_end_stream()
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

pub fn status_for(reason: Reason) -> StatusCode {
    match reason {
        Reason::AuthRequired | Reason::AuthFailed | Reason::AuthThrottled => {
            StatusCode::PROXY_AUTHENTICATION_REQUIRED
        }
        Reason::Malformed => StatusCode::BAD_REQUEST,
        Reason::RateLimited | Reason::BudgetExceeded => StatusCode::TOO_MANY_REQUESTS,
        Reason::ResolveFailed | Reason::UpstreamFailed => StatusCode::BAD_GATEWAY,
        Reason::Timeout => StatusCode::GATEWAY_TIMEOUT,
        Reason::Overloaded | Reason::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::FORBIDDEN,
    }
}

/// A limits refusal: 429 with `Retry-After` (whole seconds, at least 1).
pub fn limited(refused: Refusal) -> Response<ProxyBody> {
    let mut resp = refusal(refused.reason);
    if let Some(after) = refused.retry_after {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    resp
}

/// What an agent (or the person behind it) can do about a refusal, in one line.
fn what_to_do(reason: Reason) -> &'static str {
    match reason {
        Reason::NotAllowed => {
            "no rule of this agent allows this destination; on the gateway, `portcullis explain --agent NAME HOST[:PORT]` shows why, and the agent's rules file is where to allow it"
        }
        Reason::DeniedRule => {
            "a deny rule of this agent matches this destination; `portcullis explain --agent NAME HOST[:PORT]` on the gateway names it"
        }
        Reason::UnknownAgent => {
            "this source address belongs to no agent: add it to an agent's `sources`, or send proxy credentials"
        }
        Reason::AuthRequired => "this agent must send proxy credentials (Proxy-Authorization)",
        Reason::AuthFailed => "the proxy credentials are wrong",
        Reason::AuthThrottled => "too many wrong credentials from this source: wait, then retry",
        Reason::PrivateAddress => {
            "the name resolves to a private or special address; an `allow_cidrs` (or `resolve_cidrs`) rule must cover it"
        }
        Reason::IpLiteral => {
            "IP addresses are allowed only under an `allow_cidrs` rule: use the name"
        }
        Reason::SniMismatch | Reason::NoSni | Reason::EchDenied | Reason::Malformed => {
            "the request was malformed or ambiguous; the gateway's log has the details"
        }
        Reason::RateLimited => {
            "the agent's connection rate or concurrency limit: retry after the Retry-After delay"
        }
        Reason::BudgetExceeded => {
            "the agent's daily byte budget is spent: it resets at the configured hour"
        }
        Reason::KillSwitch => {
            "the gateway's kill switch is engaged: a person with the second factor must revive it"
        }
        Reason::PolicyRevoked => "a rules reload no longer allows this connection",
        Reason::ResolveFailed => "the gateway could not resolve the name",
        Reason::UpstreamFailed | Reason::Timeout => "the destination did not answer the gateway",
        Reason::Overloaded | Reason::ShuttingDown => "the gateway is busy or restarting: retry",
        _ => "see the gateway's log",
    }
}

/// The refusal: a status whose reason phrase names the reason (`403 Forbidden
/// (not_allowed)`, which clients that print only the status line show), a body that says
/// what to do, and the reason header.
pub fn refusal(reason: Reason) -> Response<ProxyBody> {
    let body = format!("portcullis: denied ({reason})\n{}\n", what_to_do(reason));
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    let status = status_for(reason);
    *resp.status_mut() = status;
    let phrase = format!(
        "{} ({reason})",
        status.canonical_reason().unwrap_or("Refused")
    );
    if let Ok(phrase) = hyper::ext::ReasonPhrase::try_from(phrase) {
        resp.extensions_mut().insert(phrase);
    }
    let h = resp.headers_mut();
    h.insert(REASON_HEADER, HeaderValue::from_static(reason.as_str()));
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        h.insert(
            header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"portcullis\""),
        );
    }
    if matches!(
        reason,
        Reason::Malformed | Reason::AuthRequired | Reason::AuthFailed | Reason::AuthThrottled
    ) {
        // The connection's framing can no longer be trusted / the client must retry.
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

pub fn empty(status: StatusCode) -> Response<ProxyBody> {
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
