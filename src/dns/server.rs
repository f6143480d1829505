//! The DNS listeners: UDP and TCP on the same address and port (`listen.dns`).
//!
//! UDP: a few threads (one per core, at most 4) sleep in a blocking `recvfrom` on the same
//! socket and answer refusals and cache hits inline, like dnsmasq's single loop: no task,
//! no runtime wake-up per packet (on loopback that wake-up cost more than the answer).
//! Questions that need the upstream go to the tokio runtime. A read timeout lets the
//! threads see `stop_accepting`. TCP: RFC 1035 §4.2.2 two-byte length framing, queries
//! answered in order, an idle deadline between queries, a read deadline within one, a size
//! cap, and the gateway's connection caps.
//!
//! Must not decide anything (that is `query`) and must not wait without a deadline.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::query::{Forwarder, Step, Transport};
use crate::dns::DnsContext as Shared;
use crate::proxy::{ConnectionSlot, accept_loop};
use crate::telemetry::Mode;

/// Largest query accepted over TCP; real queries are well under 512 bytes.
const MAX_TCP_QUERY: usize = 4096;
/// Receive buffer for UDP: anything longer is cut and then fails to parse (FORMERR).
const UDP_RECV_BUF: usize = 4096;
/// How often a UDP receive thread looks at `stop_accepting` when no packet comes.
const UDP_STOP_POLL: Duration = Duration::from_millis(200);
/// A UDP send only blocks on a full send buffer; past this the reply is dropped (the
/// client retries, as after any UDP loss) rather than stalling every other client.
const UDP_SEND_DEADLINE: Duration = Duration::from_millis(100);
/// UDP receive threads per socket, at most.
const MAX_UDP_THREADS: usize = 4;
/// Writing a reply to a TCP client that does not read.
const TCP_WRITE_DEADLINE: Duration = Duration::from_secs(5);

/// A bound DNS address: a UDP socket and a TCP listener on the same port.
pub struct DnsListener {
    udp: UdpSocket,
    tcp: TcpListener,
}

impl DnsListener {
    /// Bind UDP first, then TCP on the port UDP got (so port 0 yields one port for both).
    pub async fn bind(addr: SocketAddr) -> io::Result<Self> {
        let mut last = None;
        // With port 0 the TCP port may already be taken; a few fresh UDP ports fix that.
        for _ in 0..8 {
            let udp = UdpSocket::bind(addr)?;
            udp.set_read_timeout(Some(UDP_STOP_POLL))?;
            udp.set_write_timeout(Some(UDP_SEND_DEADLINE))?;
            let bound = udp.local_addr()?;
            match TcpListener::bind(bound).await {
                Ok(tcp) => return Ok(Self { udp, tcp }),
                Err(e) if addr.port() == 0 && e.kind() == io::ErrorKind::AddrInUse => {
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no common UDP/TCP port")))
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }
}

/// Serve `listener` until `stop_accepting`. Must be called within the tokio runtime.
pub fn spawn(shared: Arc<Shared>, forwarder: Arc<Forwarder>, listener: DnsListener) {
    let DnsListener { udp, tcp } = listener;
    let udp = Arc::new(udp);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_UDP_THREADS);
    for _ in 0..threads {
        // A weak handle: if the gateway is dropped without `shutdown` (a panicking test),
        // the threads still end, instead of holding the runtime's drop forever.
        let (weak, forwarder, udp) = (Arc::downgrade(&shared), forwarder.clone(), udp.clone());
        let runtime = tokio::runtime::Handle::current();
        shared
            .shutdown
            .tracker()
            .spawn_blocking(move || serve_udp(&weak, &forwarder, &udp, &runtime));
    }
    // The proxies' accept loop: the same caps (a flood of idle TCP DNS clients cannot
    // starve them), `overloaded` records and accept back-off.
    shared.shutdown.spawn(accept_loop(
        shared.clone(),
        tcp,
        Mode::Dns,
        move |shared, stream, peer, slot| {
            Box::pin(serve_tcp_connection(
                shared,
                forwarder.clone(),
                stream,
                peer,
                slot,
            ))
        },
    ));
}

fn serve_udp(
    weak: &Weak<Shared>,
    forwarder: &Arc<Forwarder>,
    socket: &Arc<UdpSocket>,
    runtime: &tokio::runtime::Handle,
) {
    let mut buf = vec![0u8; UDP_RECV_BUF];
    loop {
        match weak.upgrade() {
            Some(shared) if !shared.shutdown.is_stopping() => {}
            _ => return,
        }
        let (n, peer) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue; // the stop poll
            }
            Err(e) => {
                tracing::debug!(error = %e, "dns udp receive failed");
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let Some(shared) = weak.upgrade() else {
            return;
        };
        let packet = buf.get(..n).unwrap_or_default();
        // A bug in handling one query must not end this receive thread (and, one by one,
        // UDP DNS): the panic is caught here, that query goes unanswered, the loop goes on.
        let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            forwarder.prepare(&shared, peer, packet, Transport::Udp)
        }));
        let Ok(step) = step else {
            tracing::error!(%peer, "dns query handling panicked; query dropped, forwarder carries on");
            continue;
        };
        match step {
            Step::Ignore => {}
            Step::Reply(reply) => send_udp(socket, &reply, peer),
            Step::Resolve(pending) => {
                let (shared, forwarder, socket) =
                    (shared.clone(), forwarder.clone(), socket.clone());
                let tracker = shared.shutdown.tracker().clone();
                runtime.spawn(tracker.track_future(async move {
                    let reply = forwarder.resolve(&shared, pending).await;
                    // The socket is blocking (see above): send off the async workers.
                    let _ =
                        tokio::task::spawn_blocking(move || send_udp(&socket, &reply, peer)).await;
                }));
            }
        }
    }
}

fn send_udp(socket: &UdpSocket, reply: &[u8], peer: SocketAddr) {
    if reply.is_empty() {
        return;
    }
    if let Err(e) = socket.send_to(reply, peer) {
        tracing::debug!(error = %e, %peer, "dns udp send failed");
    }
}

async fn serve_tcp_connection(
    shared: Arc<Shared>,
    forwarder: Arc<Forwarder>,
    mut stream: TcpStream,
    peer: SocketAddr,
    _slot: ConnectionSlot,
) {
    let idle = shared.tcp_idle;
    let within_query = shared.handshake_timeout;
    let mut buf = vec![0u8; MAX_TCP_QUERY];
    loop {
        let mut len = [0u8; 2];
        let got = tokio::select! {
            () = shared.shutdown.stopping() => return,
            r = tokio::time::timeout(idle, stream.read_exact(&mut len)) => r,
        };
        if !matches!(got, Ok(Ok(_))) {
            return; // idle deadline, EOF or error
        }
        let n = usize::from(u16::from_be_bytes(len));
        let Some(query) = buf.get_mut(..n).filter(|_| n >= 12) else {
            return; // shorter than a header, or over the cap: not a client we serve
        };
        if !matches!(
            tokio::time::timeout(within_query, stream.read_exact(query)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let reply = match forwarder.prepare(&shared, peer, query, Transport::Tcp) {
            Step::Ignore => continue,
            Step::Reply(r) => r,
            Step::Resolve(pending) => forwarder.resolve(&shared, pending).await,
        };
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            return;
        };
        if reply.is_empty() {
            return;
        }
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&reply_len.to_be_bytes());
        framed.extend_from_slice(&reply);
        if !matches!(
            tokio::time::timeout(TCP_WRITE_DEADLINE, stream.write_all(&framed)).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
}
