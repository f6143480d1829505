//! Inspect mode behind the explicit proxy's `CONNECT`: the small adapter from the
//! connection lifecycle (`proxy::session`) to the engine. The lifecycle has identified the
//! agent, decided, admitted, resolved and checked the addresses and registered the
//! connection (reloads and kills reach it through its token); this takes the upgraded
//! stream and runs [`engine::serve`]; the attempt writes the connection's record.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::engine::{self, Counters, InspectError, Session};
use crate::policy::{DomainName, Reason};
use crate::proxy::session::{Attempt, Authorized};
use crate::proxy::{ConnectionSlot, ProxyContext};

/// Serve one inspected `CONNECT` after its `200`, to the end.
pub(crate) async fn serve_connect(
    ctx: Arc<ProxyContext>,
    req: Request<Incoming>,
    name: DomainName,
    (mut att, authorized): (Attempt, Authorized),
    _slot: Arc<ConnectionSlot>,
) {
    let counters = Arc::new(Counters::default());
    let outcome = async {
        let inspector = ctx.inspector.clone().ok_or(Reason::InternalError)?;
        let upgraded = hyper::upgrade::on(req)
            .await
            .map_err(|_| Reason::Malformed)?;
        let live = ctx.clone();
        let session = Session {
            agent: att.agent_name(),
            policy: Arc::new(move || live.policy.load_full()),
            name,
            port: authorized.target.port,
            addrs: authorized.addrs().to_vec(),
            connect_timeout: ctx.settings.connect_timeout,
            handshake_timeout: ctx.settings.handshake_timeout,
            idle_timeout: ctx.settings.idle_timeout,
            cancel: att.cancel_token().clone(),
            telemetry: ctx.telemetry.clone(),
        };
        engine::serve(inspector, TokioIo::new(upgraded), session, counters.clone())
            .await
            .map_err(|e| match e {
                InspectError::SniMismatch(_) => Reason::SniMismatch,
                InspectError::Cancelled => att.cancelled_reason(authorized.revoked()),
                InspectError::Handshake(_) | InspectError::Http(_) => Reason::Malformed,
                _ => Reason::InternalError,
            })
    }
    .await;
    if let Err(reason) = outcome {
        att.fail(reason);
    }
    let rec = att.rec();
    rec.bytes_from_agent = counters.bytes_from_agent.load(Ordering::Relaxed);
    rec.bytes_to_agent = counters.bytes_to_agent.load(Ordering::Relaxed);
}
