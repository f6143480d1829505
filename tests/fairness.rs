//! One agent cannot starve another: connection caps by agent before source, and (further
//! down) DNS and log fairness. Tried from the agents' seats on loopback, where every
//! 127.0.0.0/8 address is a distinct source.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::from((from, 0)))?;
    s.connect(to).await
}

/// A CONNECT through `proxy` from `from`: Ok once the proxy said 200.
async fn tunnel_from(
    from: [u8; 4],
    proxy: SocketAddr,
    host: &str,
    port: u16,
) -> Result<TcpStream, String> {
    let mut s = connect_from(from, proxy).await.map_err(|e| e.to_string())?;
    let req = format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b).await {
            Ok(1) => head.push(b[0]),
            other => {
                return Err(format!(
                    "{other:?} after {:?}",
                    String::from_utf8_lossy(&head)
                ));
            }
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    if head.starts_with("HTTP/1.1 200") {
        Ok(s)
    } else {
        Err(head)
    }
}

/// Connections the proxy closed at once (refused at accept) among `conns`.
async fn closed_at_once(conns: &mut [TcpStream]) -> usize {
    let mut n = 0;
    for s in conns {
        let mut b = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(30), s.read(&mut b)).await
        {
            n += 1;
        }
    }
    n
}

/// The field report: an agent with 4 addresses from its /24 took all of a 400-connection
/// total and its neighbour was reset; silent connections from addresses of no agent did the
/// same. Now each is held to its share, and the neighbour connects within 1 s, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_at_its_share_and_unknown_floods_leave_room_for_another() {
    let up = silent_upstream().await;
    let port = up.addr.port();
    let rule = |name: &str, sources: &str| {
        format!(
            "name = \"{name}\"\nsources = [{sources}]\nallow = [\"allowed.test:{port}\"]\nallow_cidrs = [\"127.0.0.1/32:{port}\"]\n"
        )
    };
    let greedy = rule("greedy", "\"127.0.2.0/30\"");
    let other = rule("other", "\"127.0.3.1/32\"");
    let gw = gateway_with(
        &[("greedy", &greedy), ("other", &other)],
        &[],
        localhost_resolver(&["allowed.test"]),
        |c, _| {
            c.max_connections = 64;
            c.max_connections_per_source = 32;
            c.max_connections_per_agent = 24;
            c.max_connections_unknown = 8;
            // Silent connections stay for the whole round.
            c.handshake_timeout = Duration::from_secs(30);
        },
    )
    .await;
    for round in 0..5 {
        let mut greedy_conns = Vec::new();
        for i in 0..40u8 {
            greedy_conns.push(connect_from([127, 0, 2, i % 4], gw.proxy).await.unwrap());
        }
        let mut unknown_conns = Vec::new();
        for i in 0..40u8 {
            unknown_conns.push(connect_from([127, 0, 9, 1 + i], gw.proxy).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            closed_at_once(&mut greedy_conns).await,
            40 - 24,
            "round {round}: greedy's share"
        );
        assert_eq!(
            closed_at_once(&mut unknown_conns).await,
            40 - 8,
            "round {round}: unknown bucket"
        );
        let t0 = Instant::now();
        let t = tokio::time::timeout(
            Duration::from_secs(1),
            tunnel_from([127, 0, 3, 1], gw.proxy, "allowed.test", port),
        )
        .await;
        assert!(
            matches!(t, Ok(Ok(_))),
            "round {round}: the neighbour could not connect: {t:?} after {:?}",
            t0.elapsed()
        );
        drop(greedy_conns);
        drop(unknown_conns);
        // Slots are released as the proxy sees the closes.
        let deadline = Instant::now() + Duration::from_secs(5);
        while gw.running.as_ref().unwrap().shared.caps.in_use() > 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    gw.stop().await;
}
