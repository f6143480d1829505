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

use crate::gateway::Shared;
use crate::limits::{Admission, Refusal};
use crate::policy::Reason;
use crate::proxy::relay::RelayCounters;
use crate::proxy::upstream::Upstream;
use crate::telemetry::ConnectionRecord;

pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Header naming the deny reason on every refusal.
pub const REASON_HEADER: &str = "x-portcullis-reason";

/// Forward one plain-HTTP request over a fresh upstream connection; the record is written
/// when the response body ends (or is dropped).
/// Where a checked plain-HTTP request goes: the dialled upstream, the `Host` it must carry
/// (the authority that was checked) and the origin-form target.
pub struct ForwardTo {
    pub upstream: Upstream,
    pub authority: String,
    pub path: String,
    /// The request's token, taken before its kill check: cut by a kill of the agent or of
    /// all, and by shutdown.
    pub cut: tokio_util::sync::CancellationToken,
}

pub async fn forward(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    to: ForwardTo,
    rec: ConnectionRecord,
    started: Instant,
    admission: Admission,
) -> Response<ProxyBody> {
    let ForwardTo {
        upstream,
        authority,
        path,
        cut,
    } = to;
    let counters = Arc::new(RelayCounters::default());
    let finish = RecordOnDrop {
        rec: Some(rec),
        admission,
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
    let shaping = finish.admission.shaping.clone();
    let body = Counted {
        inner: body,
        counters: counters.clone(),
        upstream_direction: true,
        finish: None,
        meter: Meter::new(shaping.clone()),
    };
    let Ok(out) = out.body(body) else {
        return finish.fail(Reason::Malformed);
    };
    let io = TokioIo::new(upstream.stream);
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(io).await else {
        return finish.fail(Reason::UpstreamFailed);
    };
    // Killed since the decision: nothing of the request leaves.
    if cut.is_cancelled() {
        let agent = finish.rec.as_ref().map_or("", |r| &r.agent).to_owned();
        let reason = super::explicit::cancelled_reason(&shared, &agent, false);
        return finish.fail(reason);
    }
    // Cut by the kill switch (of this agent or all) and by shutdown, the cut first.
    shared.tracker.spawn(async move {
        tokio::select! {
            biased;
            () = cut.cancelled() => {}
            _ = conn => {}
        }
    });
    let response =
        match tokio::time::timeout(shared.config.timeouts.idle, sender.send_request(out)).await {
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
        meter: Meter::new(shaping),
    };
    Response::from_parts(parts, body.boxed())
}

/// Emits the record of a forwarded request exactly once, when dropped.
struct RecordOnDrop {
    rec: Option<ConnectionRecord>,
    /// Holds the agent's concurrency slot for the request; charges its budget at the end.
    admission: Admission,
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
            // The bodies charged the budget as their bytes moved (`Meter`).
            if rec.reason.is_none()
                && self
                    .admission
                    .shaping
                    .budget
                    .as_ref()
                    .is_some_and(|b| b.tripped())
            {
                rec.reason = Some(Reason::BudgetExceeded);
            }
            self.shared.telemetry.record(rec);
        }
    }
}

/// Largest piece of a body moved at once under a limit: the budget's overshoot bound, and a
/// bandwidth slice's upper end (the relay's chunk for budgeted tunnels is the same).
const METER_CHUNK: usize = 64 * 1024;

/// The relay's rules for a plain-HTTP body: its bytes are shaped to the agent's `bandwidth`
/// and charged to its daily budget as they move, in pieces of at most [`METER_CHUNK`]; a
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
                let limited = self.shaping.bandwidth.is_some() || self.shaping.budget.is_some();
                let want = if limited {
                    data.len().min(METER_CHUNK)
                } else {
                    data.len()
                };
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
            if let Some(budget) = &self.shaping.budget
                && !budget.charge(piece.len() as u64)
            {
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
    finish: Option<RecordOnDrop>,
    meter: Meter,
}

impl Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
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
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
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
    if status_for(reason) == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
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
