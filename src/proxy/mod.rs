//! The data path: listeners, target detection, upstream dialling and relaying.
//!
//! Owns the accept loops and per-connection tasks. Decisions are delegated to
//! [`crate::policy::Policy`]; every connection ends in exactly one
//! [`crate::telemetry::ConnectionRecord`]. Must not read rules files or block on the log.

mod caps;
pub mod explicit;
pub mod forward;
pub mod http_head;
pub mod peek;
pub mod relay;
pub mod sni;
pub mod target;
pub mod transparent;
pub mod upstream;

pub use caps::{ConnectionCaps, ConnectionSlot};

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::gateway::Shared;
use crate::policy::Reason;
use crate::telemetry::{ConnectionRecord, Mode};

/// The accept loop of every TCP listener: bounded by the global and per-source caps (over
/// them a connection is refused at once and recorded as `overloaded`), never stalls on one
/// client, backs off on accept errors (EMFILE), stops on `stop_accepting`.
pub(crate) async fn accept_loop<F, Fut>(
    shared: Arc<Shared>,
    listener: TcpListener,
    mode: Mode,
    serve: F,
) where
    F: Fn(Arc<Shared>, TcpStream, SocketAddr, ConnectionSlot) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            () = shared.stop_accepting.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Some(slot) = shared.caps.try_acquire(peer.ip()) else {
                    let policy = shared.policy.load();
                    let agent = policy.agent_by_source(peer.ip());
                    let mut rec = ConnectionRecord::begin(
                        mode,
                        peer,
                        policy.agent_name(agent),
                        policy.generation(),
                    );
                    rec.reason = Some(Reason::Overloaded);
                    shared.telemetry.record(rec);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                shared
                    .tracker
                    .spawn(serve(shared.clone(), stream, peer, slot));
            }
            Err(e) => {
                tracing::warn!(error = %e, mode = mode.as_str(), "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}
