//! The data path: listeners, target detection, upstream dialling and relaying.
//!
//! Owns the accept loops and per-connection tasks. Decisions are delegated to
//! [`crate::policy::Policy`]; every connection ends in exactly one
//! [`crate::telemetry::ConnectionRecord`]. Must not read rules files or block on the log.

pub(crate) mod alert;
pub mod auth;
mod caps;
pub mod explicit;
pub mod forward;
pub mod http_head;
pub mod inspect;
pub mod peek;
pub mod relay;
mod session;
pub mod sni;
pub mod target;
pub mod transparent;
pub mod tunnels;
pub mod upstream;

pub use caps::{CapLimits, ConnectionCaps, ConnectionSlot};

use std::any::Any;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};

use crate::killswitch::KillSwitch;
use crate::limits::Limiter;
use crate::policy::{Policy, Reason};
use crate::shutdown::Shutdown;
use crate::sys::Interception;
use crate::telemetry::{ConnectionRecord, Mode, Telemetry};

/// What the proxy's listeners and connections use, and nothing else: handed out by the
/// application, which keeps reload and admin state to itself.
pub struct ProxyContext {
    /// The live policy; a reload swaps it.
    pub policy: Arc<ArcSwap<Policy>>,
    pub killswitch: Arc<KillSwitch>,
    /// Per-agent limits: rate, concurrency, bandwidth, daily budget.
    pub limiter: Arc<Limiter>,
    pub telemetry: Telemetry,
    pub resolver: Arc<dyn upstream::Resolve>,
    /// Live tunnels, re-checked after every reload.
    pub tunnels: Arc<tunnels::Tunnels>,
    pub caps: Arc<ConnectionCaps>,
    /// Bytes held in hellos and request heads not yet complete, all connections together.
    pub handshake: Arc<peek::HandshakeBudget>,
    /// Proxy Basic auth: recent successes, per-source back-off, the verification limit.
    pub auth: auth::Authenticator,
    pub settings: ProxySettings,
    pub shutdown: Shutdown,
    /// Inspect mode: the CA's leaves and the upstream trust; `None` without a CA (inspected
    /// destinations are then refused).
    pub inspector: Option<Arc<inspect::engine::Inspector>>,
    /// Where a diverted connection was headed: the kernel's answer (`sys`) in service,
    /// injected in tests so transparent mode's logic runs without root.
    pub original_destination: OriginalDestination,
}

/// How the transparent listener learns a connection's original destination.
pub type OriginalDestination =
    Arc<dyn Fn(&TcpStream, Interception) -> std::io::Result<SocketAddr> + Send + Sync>;

/// The kernel's original destination (`SO_ORIGINAL_DST`, or the local address under
/// tproxy).
pub fn kernel_original_destination() -> OriginalDestination {
    Arc::new(crate::sys::original_destination)
}

/// The configuration the data path reads.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub interception: Interception,
    pub transparent_tls_ports: Vec<u16>,
    pub transparent_http_ports: Vec<u16>,
    pub resolver_timeout: Duration,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_request_head_bytes: usize,
}

/// What an accept loop needs of its listener's context: the policy (to know whose a source
/// is), the caps, the log, the stop sequence.
pub trait Listening: Send + Sync + 'static {
    fn policy(&self) -> &ArcSwap<Policy>;
    fn caps(&self) -> &Arc<ConnectionCaps>;
    fn telemetry(&self) -> &Telemetry;
    fn shutdown(&self) -> &Shutdown;
}

impl Listening for ProxyContext {
    fn policy(&self) -> &ArcSwap<Policy> {
        &self.policy
    }
    fn caps(&self) -> &Arc<ConnectionCaps> {
        &self.caps
    }
    fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }
    fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }
}

/// The accept loop of every TCP listener: bounded by the global and per-source caps (over
/// them a connection is refused at once and recorded as `overloaded`), never stalls on one
/// client, backs off on accept errors (EMFILE), stops when the shutdown begins.
pub(crate) async fn accept_loop<C, F, Fut>(ctx: Arc<C>, listener: TcpListener, mode: Mode, serve: F)
where
    C: Listening,
    F: Fn(Arc<C>, TcpStream, SocketAddr, ConnectionSlot) -> Pin<Box<Fut>>,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut nodelay = Nodelay::on_listener(&listener);
    loop {
        let accepted = tokio::select! {
            () = ctx.shutdown().stopping() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Identify first (a map lookup), so one agent's connections, however many
                // addresses it uses, count against its own share before the total.
                let policy = ctx.policy().load();
                let agent = policy.agent_by_source(peer.ip());
                let owner = agent.and_then(|id| policy.agent(id)).map(|a| &a.name);
                let Some(slot) = ctx.caps().try_acquire(owner, peer.ip()) else {
                    let mut rec = ConnectionRecord::begin(
                        mode,
                        peer,
                        policy.agent_name(agent),
                        policy.generation(),
                    );
                    rec.reason = Some(Reason::Overloaded);
                    ctx.telemetry().record(rec);
                    continue;
                };
                drop(policy);
                nodelay.set(&stream);
                spawn_supervised(&ctx, mode, peer, serve(ctx.clone(), stream, peer, slot));
            }
            Err(e) => {
                tracing::warn!(error = %e, mode = mode.as_str(), "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// `TCP_NODELAY` on every accepted connection (a relay must not hold back small writes).
/// Linux copies it from the listener to the connections it accepts, which saves a syscall
/// per connection; the first connection shows whether that held, and if not (another
/// kernel, or the listener refused it) each connection gets it set.
struct Nodelay {
    /// `None` until the first connection; then whether connections inherit it.
    inherited: Option<bool>,
}

impl Nodelay {
    fn on_listener(listener: &TcpListener) -> Self {
        let _ = socket2::SockRef::from(listener).set_tcp_nodelay(true);
        Self { inherited: None }
    }

    fn set(&mut self, stream: &TcpStream) {
        let inherited = *self
            .inherited
            .get_or_insert_with(|| stream.nodelay().unwrap_or(false));
        if !inherited {
            let _ = stream.set_nodelay(true);
        }
    }
}

/// Spawn one connection's task so that a panic in it (a bug) ends that connection only: the
/// panic is caught at the task's edge, the connection's sockets and slots are released by
/// their destructors, a record with reason `internal_error` is written, and the process
/// carries on serving everyone else. Never use `panic = "abort"` in a profile that ships.
///
/// Catching is sound here because nothing the dead task shared is left half-updated in a
/// way others trust: shared state sits behind atomics or mutexes whose users take the value
/// even when poisoned, and the panicked future is dropped, never polled again.
///
/// `fut` comes boxed (by [`boxed_small`] where it is small enough): the box is the
/// connection's own allocation, and the task holds only the pointer. Captured unboxed, the
/// connection's future would be stored twice (in the task's state and in a box), per idle
/// tunnel.
pub(crate) fn spawn_supervised<C, Fut>(
    ctx: &Arc<C>,
    mode: Mode,
    peer: SocketAddr,
    fut: Pin<Box<Fut>>,
) where
    C: Listening,
    Fut: Future<Output = ()> + Send + 'static,
{
    let ctx2 = ctx.clone();
    let fut = CatchUnwind(fut);
    ctx.shutdown().spawn(async move {
        let started = Instant::now();
        if let Err(panic) = fut.await {
            let what = panic_message(panic.as_ref());
            tracing::error!(mode = mode.as_str(), %peer, panic = what, "connection task panicked; connection closed, gateway carries on");
            let policy = ctx2.policy().load();
            let agent = policy.agent_by_source(peer.ip());
            let mut rec =
                ConnectionRecord::begin(mode, peer, policy.agent_name(agent), policy.generation());
            rec.reason = Some(Reason::InternalError);
            rec.duration = started.elapsed();
            ctx2.telemetry().record(rec);
        }
    });
}

/// The largest future a connection keeps in one heap allocation, in bytes. glibc's malloc
/// serves requests up to this size from its per-thread cache and small bins; a larger one
/// takes the large-request path, which first merges every free fast-bin chunk
/// (`malloc_consolidate`). With the whole tunnel in one 1,640-byte future that cost 1.3k
/// instructions per tunnel (callgrind, 5,000 tunnels); the relay is boxed on its own since.
/// (That edge is glibc's, the default build's allocator; the shipped build's jemalloc has
/// none at this size, and there the bound only keeps each tunnel's state small.)
pub(crate) const SMALL_ALLOC: usize = 1008;

/// `fut` pinned in its own heap allocation, which the compiler checks is at most
/// [`SMALL_ALLOC`] bytes: a future that grows past it fails the build, not the benchmark.
pub(crate) fn boxed_small<F: Future>(fut: F) -> Pin<Box<F>> {
    const {
        assert!(
            std::mem::size_of::<F>() <= SMALL_ALLOC,
            "a per-connection future outgrew SMALL_ALLOC: box one of its phases"
        )
    };
    Box::pin(fut)
}

/// The payload of a panic as text (`panic!` with a literal or a formatted message).
fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-text panic payload)")
}

/// A future that turns a panic while polling `F` into `Err(payload)`.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    async fn accept_one(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        (client, accepted)
    }

    /// Accepted connections get TCP_NODELAY: inherited from the listener where the kernel
    /// copies it (Linux), set one by one where it does not.
    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut nodelay = Nodelay::on_listener(&listener);
        for _ in 0..2 {
            let (_client, accepted) = accept_one(&listener).await;
            nodelay.set(&accepted);
            assert!(accepted.nodelay().unwrap());
        }
        assert_eq!(
            nodelay.inherited,
            Some(true),
            "Linux copies it from the listener"
        );

        // A listener without it (as if the kernel did not copy it): set per connection.
        let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut nodelay = Nodelay { inherited: None };
        for _ in 0..2 {
            let (_client, accepted) = accept_one(&plain).await;
            assert!(!accepted.nodelay().unwrap());
            nodelay.set(&accepted);
            assert!(accepted.nodelay().unwrap());
        }
        assert_eq!(nodelay.inherited, Some(false));
    }
}
