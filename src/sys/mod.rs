//! Socket options the transparent listener needs, through socket2's safe API: recovering
//! the original destination of a redirected connection (`SO_ORIGINAL_DST` for nftables
//! `redirect`, the socket's local address for `tproxy`) and binding with `IP_TRANSPARENT`.
//!
//! Also here: `splice` (the zero-copy relay's pipes) and `notify` (systemd's sd_notify).
//!
//! This is the only module that touches raw socket options and file descriptors. It holds
//! no `unsafe` (socket2 wraps the getsockopt calls, rustix pipe2/splice, std the AF_UNIX
//! datagrams); if some ever becomes necessary, it goes here, with its reasons.

pub mod durable;
pub mod notify;
pub mod splice;

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

/// How nftables hands connections to the transparent listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interception {
    /// `redirect to :port` (NAT): the original destination is in conntrack.
    Redirect,
    /// `tproxy to :port`: the socket's local address is the original destination.
    Tproxy,
}

/// Where the agent's packets were addressed before nftables diverted them.
pub fn original_destination(
    stream: &TcpStream,
    interception: Interception,
) -> io::Result<SocketAddr> {
    match interception {
        Interception::Tproxy => stream.local_addr(),
        Interception::Redirect => {
            let sock = SockRef::from(stream);
            let addr = match stream.local_addr()? {
                SocketAddr::V4(_) => sock.original_dst_v4()?,
                SocketAddr::V6(_) => sock.original_dst_v6()?,
            };
            addr.as_socket().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "original destination is not IP")
            })
        }
    }
}

/// Bind a plain TCP listener (explicit proxy, admin API, DNS over TCP) with `backlog`
/// (`listen.backlog`, the same for every listener).
pub fn listen_tcp(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

/// Bind a listening socket; with `transparent`, set `IP_TRANSPARENT` so TPROXY can deliver
/// connections addressed to foreign addresses (needs CAP_NET_ADMIN).
pub fn bind_listener(addr: SocketAddr, transparent: bool, backlog: i32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if transparent {
        match addr {
            SocketAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
            SocketAddr::V6(_) => socket.set_ip_transparent_v6(true)?,
        }
    }
    if addr.is_ipv6() {
        // One family per socket: v4 and v6 listeners are configured separately.
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}
