//! The I/O edge: each function makes one bounded attempt on real sockets and returns what
//! it saw, undecided ([`super::verdict`] decides). Every wait is under the probe's timeout;
//! replies are capped.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{Instant, timeout, timeout_at};

use super::packets::{DnsReply, dns_query, parse_dns_reply};
use super::verdict::{DnsSeen, End, ProxySeen, TcpSeen, UdpSeen};

/// Read at most this much of any reply: the verdicts need the first bytes only.
const REPLY_CAP: usize = 4096;
/// After the first bytes of a reply, wait this long for the rest of a short answer (an
/// HTTP refusal's head) before deciding.
const REPLY_GRACE: Duration = Duration::from_millis(200);

fn is_unreachable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NetworkUnreachable | io::ErrorKind::HostUnreachable
    ) || matches!(e.raw_os_error(), Some(101 | 113)) // ENETUNREACH, EHOSTUNREACH
}

async fn connect(addr: SocketAddr, within: Duration) -> Result<TcpStream, TcpSeen> {
    match timeout(within, TcpStream::connect(addr)).await {
        Err(_) => Err(TcpSeen::ConnectTimeout),
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => Err(TcpSeen::Refused),
        Ok(Err(e)) if is_unreachable(&e) => Err(TcpSeen::Unreachable(e.to_string())),
        Ok(Err(e)) => Err(TcpSeen::Error(e.to_string())),
    }
}

/// Read what the peer sends until it closes, the cap, a short grace after the first
/// bytes, or `within`.
async fn read_reply(s: &mut TcpStream, within: Duration) -> (Vec<u8>, End) {
    let mut reply = Vec::new();
    let mut buf = [0u8; 2048];
    let mut deadline = Instant::now() + within;
    loop {
        match timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (reply, End::Silent),
            Ok(Ok(0)) => return (reply, End::Eof),
            Ok(Ok(n)) => {
                if reply.is_empty() {
                    deadline = deadline.min(Instant::now() + REPLY_GRACE);
                }
                reply.extend_from_slice(&buf[..n]);
                if reply.len() >= REPLY_CAP {
                    return (reply, End::Silent);
                }
            }
            Ok(Err(_)) => return (reply, End::Reset),
        }
    }
}

/// Connect to `addr`, send `request`, read the reply.
pub async fn tcp(addr: SocketAddr, request: &[u8], within: Duration) -> TcpSeen {
    let mut s = match connect(addr, within).await {
        Ok(s) => s,
        Err(seen) => return seen,
    };
    if s.write_all(request).await.is_err() {
        // The peer reset before the request went out; take whatever it said first.
        let (reply, _) = read_reply(&mut s, Duration::from_millis(50)).await;
        return TcpSeen::Connected {
            reply,
            end: End::Reset,
        };
    }
    let (reply, end) = read_reply(&mut s, within).await;
    TcpSeen::Connected { reply, end }
}

async fn udp_socket(to: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = match to.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(local).await?;
    s.connect(to).await?;
    Ok(s)
}

/// One datagram to `addr`, and the first datagram back.
pub async fn udp(addr: SocketAddr, datagram: &[u8], within: Duration) -> UdpSeen {
    let error = |e: io::Error| {
        if e.kind() == io::ErrorKind::ConnectionRefused {
            UdpSeen::Refused
        } else if is_unreachable(&e) {
            UdpSeen::Unreachable(e.to_string())
        } else {
            UdpSeen::Error(e.to_string())
        }
    };
    let s = match udp_socket(addr).await {
        Ok(s) => s,
        Err(e) => return error(e),
    };
    if let Err(e) = s.send(datagram).await {
        return error(e);
    }
    let mut buf = vec![0u8; 2048];
    match timeout(within, s.recv(&mut buf)).await {
        Err(_) => UdpSeen::NoReply,
        Ok(Ok(n)) => UdpSeen::Reply(buf[..n].to_vec()),
        Ok(Err(e)) => error(e),
    }
}

fn dns_seen(bytes: &[u8], id: u16) -> DnsSeen {
    match parse_dns_reply(bytes, id) {
        Some(r) => DnsSeen::Reply(r),
        None => DnsSeen::Garbage(bytes.len()),
    }
}

/// An A query for `name` to `server` over UDP.
pub async fn dns_udp(server: SocketAddr, name: &str, id: u16, within: Duration) -> DnsSeen {
    let query = match dns_query(id, name) {
        Ok(q) => q,
        Err(e) => return DnsSeen::Error(e),
    };
    match udp(server, &query, within).await {
        UdpSeen::Reply(b) => dns_seen(&b, id),
        UdpSeen::NoReply => DnsSeen::NoReply,
        UdpSeen::Refused => DnsSeen::Refused,
        UdpSeen::Unreachable(e) => DnsSeen::Unreachable(e),
        UdpSeen::Error(e) => DnsSeen::Error(e),
    }
}

/// An A query for `name` to `server` over TCP (RFC 1035 §4.2.2 length prefix).
pub async fn dns_tcp(server: SocketAddr, name: &str, id: u16, within: Duration) -> DnsSeen {
    let query = match dns_query(id, name) {
        Ok(q) => q,
        Err(e) => return DnsSeen::Error(e),
    };
    let deadline = Instant::now() + within;
    let mut s = match connect(server, within).await {
        Ok(s) => s,
        Err(TcpSeen::ConnectTimeout) => return DnsSeen::NoReply,
        Err(TcpSeen::Refused) => return DnsSeen::Refused,
        Err(TcpSeen::Unreachable(e)) => return DnsSeen::Unreachable(e),
        Err(other) => return DnsSeen::Error(format!("{other:?}")),
    };
    let mut framed = u16::try_from(query.len())
        .unwrap_or(u16::MAX)
        .to_be_bytes()
        .to_vec();
    framed.extend_from_slice(&query);
    if s.write_all(&framed).await.is_err() {
        return DnsSeen::Garbage(0);
    }
    let exchange = async {
        let len = s.read_u16().await?;
        let mut body = vec![0u8; usize::from(len)];
        s.read_exact(&mut body).await?;
        Ok::<_, io::Error>(body)
    };
    match timeout_at(deadline + within, exchange).await {
        Err(_) => DnsSeen::NoReply,
        Ok(Ok(body)) => dns_seen(&body, id),
        Ok(Err(_)) => DnsSeen::Garbage(0),
    }
}

/// `CONNECT host:port` through `proxy`; after a 200, send `hello` into the tunnel and read
/// what comes back.
pub async fn proxy_connect(
    proxy: SocketAddr,
    host: &str,
    port: u16,
    hello: &[u8],
    within: Duration,
) -> ProxySeen {
    let mut s = match connect(proxy, within).await {
        Ok(s) => s,
        Err(TcpSeen::ConnectTimeout) => {
            return ProxySeen::Unreachable(format!("{proxy}: no answer to the SYN"));
        }
        Err(TcpSeen::Refused) => {
            return ProxySeen::Unreachable(format!("{proxy}: connection refused"));
        }
        Err(TcpSeen::Unreachable(e) | TcpSeen::Error(e)) => {
            return ProxySeen::Unreachable(format!("{proxy}: {e}"));
        }
        Err(TcpSeen::Connected { .. }) => return ProxySeen::Unreachable(proxy.to_string()),
    };
    if let Err(e) = s
        .write_all(&super::packets::connect_request(host, port))
        .await
    {
        return ProxySeen::NoAnswer(e.to_string());
    }
    // The response head, byte by byte so nothing of the tunnel is consumed.
    let mut head = Vec::new();
    let read_head = async {
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < REPLY_CAP {
            if s.read(&mut byte).await? == 0 {
                break;
            }
            head.push(byte[0]);
        }
        Ok::<_, io::Error>(())
    };
    match timeout(within, read_head).await {
        Err(_) => return ProxySeen::NoAnswer(format!("no response head in {within:?}")),
        Ok(Err(e)) => return ProxySeen::NoAnswer(e.to_string()),
        Ok(Ok(())) => {}
    }
    let Some((status, reason)) = parse_head(&head) else {
        return ProxySeen::NoAnswer(format!(
            "not an HTTP response: {}",
            super::verdict::describe_bytes(&head)
        ));
    };
    let tunnel = if status == 200 {
        match s.write_all(hello).await {
            Ok(()) => Some(read_reply(&mut s, within).await),
            Err(_) => Some((Vec::new(), End::Reset)),
        }
    } else {
        None
    };
    ProxySeen::Answered {
        status,
        reason,
        tunnel,
    }
}

/// Status code and `x-portcullis-reason` of a response head.
fn parse_head(head: &[u8]) -> Option<(u16, Option<String>)> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let status = lines
        .next()?
        .strip_prefix("HTTP/1.")?
        .get(2..)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let reason = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(crate::proxy::forward::REASON_HEADER)
            .then(|| v.trim().to_owned())
    });
    Some((status, reason))
}

/// The addresses of the reply, when it has any.
pub fn addresses(seen: &DnsSeen) -> Vec<IpAddr> {
    match seen {
        DnsSeen::Reply(DnsReply { addresses, .. }) => addresses.clone(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn response_heads() {
        assert_eq!(
            parse_head(b"HTTP/1.1 200 Connection established\r\n\r\n"),
            Some((200, None))
        );
        assert_eq!(
            parse_head(b"HTTP/1.1 403 Forbidden\r\nx-portcullis-reason: not_allowed\r\n\r\n"),
            Some((403, Some("not_allowed".into())))
        );
        assert_eq!(parse_head(b"SSH-2.0-x\r\n"), None);
    }

    /// Real sockets on loopback: a server that speaks first is seen, a closed port refuses.
    #[tokio::test]
    async fn tcp_and_udp_on_loopback() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let _ = s.write_all(b"SSH-2.0-test\r\n").await;
            }
        });
        let t = Duration::from_secs(2);
        match tcp(addr, b"hello", t).await {
            TcpSeen::Connected { reply, .. } => assert_eq!(reply, b"SSH-2.0-test\r\n"),
            other => panic!("{other:?}"),
        }
        // A port nobody listens on: RST.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert_eq!(tcp(closed, b"x", t).await, TcpSeen::Refused);

        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = echo.recv_from(&mut buf).await {
                let _ = echo.send_to(&buf[..n], from).await;
            }
        });
        assert_eq!(
            udp(echo_addr, b"ping", t).await,
            UdpSeen::Reply(b"ping".to_vec())
        );
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        assert_eq!(
            udp(
                silent.local_addr().unwrap(),
                b"ping",
                Duration::from_millis(200)
            )
            .await,
            UdpSeen::NoReply
        );
    }
}
