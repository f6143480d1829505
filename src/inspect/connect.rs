//! Inspect mode behind the explicit proxy's `CONNECT`: the small adapter from the
//! connection lifecycle (src/proxy/explicit.rs) to the engine. The lifecycle has identified
//! the agent, decided, resolved and checked the addresses and admitted the connection; this
//! registers the tunnel for reload re-checks, takes the upgraded stream and runs
//! [`engine::serve`], then writes the connection's record.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use super::engine::{self, Counters, InspectError, Session};
use crate::gateway::Shared;
use crate::policy::{DomainName, Reason, Target};
use crate::proxy::ConnectionSlot;
use crate::telemetry::ConnectionRecord;

/// What the lifecycle hands over for one inspected `CONNECT`.
pub(crate) struct Handover {
    pub req: Request<Incoming>,
    pub target: Target,
    pub name: DomainName,
    pub addrs: Vec<std::net::IpAddr>,
    pub cancel: CancellationToken,
    pub rec: ConnectionRecord,
    pub started: Instant,
    pub slot: Arc<ConnectionSlot>,
    /// The agent's admission, held for the connection's life (its concurrency share).
    pub admission: crate::limits::Admission,
}

/// Serve one inspected `CONNECT` after its `200`: to the end, then one connection record.
pub(crate) async fn serve_connect(shared: Arc<Shared>, h: Handover) {
    let Handover {
        req,
        target,
        name,
        addrs,
        cancel,
        mut rec,
        started,
        slot: _slot,
        admission: _admission,
    } = h;
    let agent = rec.agent.clone();
    let registration =
        shared
            .tunnels
            .register(agent.clone(), target.clone(), addrs.clone(), cancel.clone());
    let counters = Arc::new(Counters::default());
    let outcome = async {
        let inspector = shared.inspector.clone().ok_or(Reason::InternalError)?;
        if !crate::reload::still_allowed(&shared.policy.load(), &agent, &target, &addrs) {
            return Err(Reason::PolicyRevoked);
        }
        let upgraded = hyper::upgrade::on(req)
            .await
            .map_err(|_| Reason::Malformed)?;
        let live = shared.clone();
        let session = Session {
            agent: agent.clone(),
            policy: Arc::new(move || live.policy.load_full()),
            name,
            port: target.port,
            addrs,
            connect_timeout: shared.config.connect_timeout,
            handshake_timeout: shared.config.handshake_timeout,
            idle_timeout: shared.config.idle_timeout,
            cancel: cancel.clone(),
            telemetry: shared.telemetry.clone(),
        };
        engine::serve(inspector, TokioIo::new(upgraded), session, counters.clone())
            .await
            .map_err(|e| match e {
                InspectError::SniMismatch(_) => Reason::SniMismatch,
                InspectError::Cancelled => crate::proxy::explicit::cancelled_reason(
                    &shared,
                    &agent,
                    registration.revoked(),
                ),
                InspectError::Handshake(_) | InspectError::Http(_) => Reason::Malformed,
                _ => Reason::InternalError,
            })
    };
    if let Err(reason) = outcome.await {
        rec.reason = Some(reason);
    }
    rec.bytes_from_agent = counters.bytes_from_agent.load(Ordering::Relaxed);
    rec.bytes_to_agent = counters.bytes_to_agent.load(Ordering::Relaxed);
    rec.duration = started.elapsed();
    shared.telemetry.record(rec);
}
