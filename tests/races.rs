//! Acting in the window between check and use: a kill or a reload that lands while a
//! connection resolves its name or while its agent holds back the ClientHello must still cut
//! it, and nothing may reach the upstream after the kill or reload answered. And a reload
//! that removes the `allow_cidrs` entry a live tunnel's address needed revokes it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use portcullis::proxy::upstream::{BoxFuture, Resolve, ResolveError, StaticResolver};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Resolves from a table, `slow.test` after a delay.
struct Slow(StaticResolver, Duration);

impl Resolve for Slow {
    fn lookup<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<IpAddr>, ResolveError>> {
        Box::pin(async move {
            if name == "slow.test" {
                tokio::time::sleep(self.1).await;
            }
            self.0.lookup(name).await
        })
    }
}

/// A signed kill of `coder-1` with the test gateway's key; returns when it answered.
async fn kill(admin: SocketAddr, id: &str) {
    let body = r#"{"scope":"agent","agent":"coder-1","reason":"race"}"#;
    let h = signed_headers(ADMIN_WHSEC, id, now(), body);
    let (code, resp) = admin_request(admin, "POST", "/v1/kill", &h, body.as_bytes()).await;
    assert_eq!(code, 200, "{resp}");
}

/// Explicit proxy: the agent's CONNECT resolves slowly; the kill lands meanwhile. Before,
/// the tunnel got a fresh token after the kill and relayed, logged `allow`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_a_slow_resolution_refuses_the_connect() {
    let up = silent_upstream().await;
    let port = up.addr.port();
    let agent = format!(
        "name = \"coder-1\"\nsources = [\"127.0.0.0/8\"]\nallow = [\"slow.test:{port}\"]\nallow_cidrs = [\"127.0.0.1/32:{port}\"]\n"
    );
    let resolver = Slow(
        StaticResolver::new().with("slow.test", &["127.0.0.1".parse().unwrap()]),
        Duration::from_millis(800),
    );
    let gw = gateway(&[("coder-1", &agent)], &[], resolver).await;
    let proxy = gw.proxy;
    let connect = tokio::spawn(async move { open_tunnel(proxy, "slow.test", port).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill(gw.admin, "kill_during_resolve").await;
    let outcome = connect.await.unwrap();
    let head = outcome.expect_err("a tunnel opened after the kill answered");
    assert!(
        head.contains("403") && head.contains("kill_switch"),
        "{head}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        up.seen.connections(),
        0,
        "the upstream was reached after the kill"
    );
    gw.stop().await;
}

/// A reload that removes the `allow_cidrs` entry a live tunnel's address needed revokes it
/// (before, reloads re-checked names only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_allow_cidrs_entry_revokes_the_live_tunnel() {
    let up = silent_upstream().await;
    let port = up.addr.port();
    let rules = |cidrs: &str| {
        format!(
            "name = \"coder-1\"\nsources = [\"127.0.0.0/8\"]\nallow = [\"allowed.test:{port}\"]\nallow_cidrs = [{cidrs}]\n"
        )
    };
    let gw = gateway(
        &[("coder-1", &rules(&format!("\"127.0.0.1/32:{port}\"")))],
        &[],
        localhost_resolver(&["allowed.test"]),
    )
    .await;
    let mut tunnel = open_tunnel(gw.proxy, "allowed.test", port).await.unwrap();
    std::fs::write(gw.dir.path().join("rules/agents/coder-1.toml"), rules("")).unwrap();
    let (code, body) = signed_reload(gw.admin).await;
    assert_eq!(code, 200, "{body}");
    let mut b = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(2), tunnel.read(&mut b)).await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "the tunnel outlived the allow_cidrs entry: {closed:?}"
    );
    let lines = gw.log_lines(1).await;
    assert!(
        lines.iter().any(|l| l["event.reason"] == "policy_revoked"),
        "{lines:?}"
    );
    gw.stop().await;
}

/// The transparent listener on loopback (interception `tproxy`: the original destination is
/// the socket's local address, as the load benchmark runs it), with the upstream for
/// `allowed.test` on 127.0.0.2 at the same port. Needs root (IP_TRANSPARENT).
async fn transparent_gateway(upstream_port: u16) -> (TestGateway, SocketAddr) {
    netns_root_check();
    let listen: SocketAddr = format!("127.0.0.1:{upstream_port}").parse().unwrap();
    let agent = format!(
        "name = \"coder-1\"\nsources = [\"127.0.0.1/32\"]\nallow = [\"allowed.test:{upstream_port}\"]\nallow_cidrs = [\"127.0.0.2/32:{upstream_port}\"]\n"
    );
    let resolver = StaticResolver::new().with("allowed.test", &["127.0.0.2".parse().unwrap()]);
    let gw = gateway_with(&[("coder-1", &agent)], &[], resolver, |c, _| {
        c.transparent_listen = vec![listen];
        c.interception = portcullis::sys::Interception::Tproxy;
        c.transparent_tls_ports = vec![upstream_port];
        c.transparent_http_ports = vec![];
        c.handshake_timeout = Duration::from_secs(10);
    })
    .await;
    (gw, listen)
}

fn netns_root_check() {
    let uid = std::process::Command::new("id").arg("-u").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "the transparent listener needs IP_TRANSPARENT: run as root (CI does)"
    );
}

/// Transparent TLS: the agent connects, holds its ClientHello back (up to the handshake
/// deadline, its choice), the kill lands, then it sends the hello. Before, the connection
/// took its token after the hello and relayed for as long as it liked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_while_the_hello_is_held_back_cuts_the_connection() {
    let up = silent_upstream_on("127.0.0.2:0".parse().unwrap()).await;
    let (gw, listen) = transparent_gateway(up.addr.port()).await;
    let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill(gw.admin, "kill_during_hello").await;
    let _ = s.write_all(&client_hello("allowed.test")).await;
    let mut b = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await;
    assert!(
        matches!(r, Ok(Ok(0) | Err(_))),
        "still open after the kill: {r:?}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        up.seen.connections(),
        0,
        "the upstream was reached after the kill"
    );
    let lines = gw.log_lines(1).await;
    assert!(
        lines.iter().any(|l| l["event.reason"] == "kill_switch"),
        "{lines:?}"
    );
    gw.stop().await;
}

/// Transparent TLS: the agent holds its hello back across a reload that removes the name;
/// the hello is then judged by the live policy, and nothing reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_while_the_hello_is_held_back_revokes_it() {
    let up = silent_upstream_on("127.0.0.2:0".parse().unwrap()).await;
    let port = up.addr.port();
    let (gw, listen) = transparent_gateway(port).await;
    // Allowed before the reload: the path works.
    let mut ok = tokio::net::TcpStream::connect(listen).await.unwrap();
    ok.write_all(&client_hello("allowed.test")).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while up.seen.connections() == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        up.seen.connections(),
        1,
        "the allowed hello never reached the upstream"
    );
    drop(ok);
    let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(
        gw.dir.path().join("rules/agents/coder-1.toml"),
        "name = \"coder-1\"\nsources = [\"127.0.0.1/32\"]\nallow = [\"other.test\"]\n",
    )
    .unwrap();
    let (code, body) = signed_reload(gw.admin).await;
    assert_eq!(code, 200, "{body}");
    let _ = s.write_all(&client_hello("allowed.test")).await;
    let mut b = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await;
    assert!(
        !matches!(r, Ok(Ok(n)) if n > 0 && b[0] != 0x15),
        "relayed after the reload: {r:?}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        up.seen.connections(),
        1,
        "the upstream was reached after the reload"
    );
    gw.stop().await;
}

/// Limits come after the decision in transparent mode too: hellos for names the agent may not
/// reach spend none of its connection tokens (before, each denied SNI spent one, and was
/// logged `rate_limited` once they ran out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_transparent_hello_spends_no_token() {
    netns_root_check();
    let up = silent_upstream_on("127.0.0.2:0".parse().unwrap()).await;
    let port = up.addr.port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let agent = format!(
        "name = \"coder-1\"\nsources = [\"127.0.0.1/32\"]\nallow = [\"allowed.test:{port}\"]\nallow_cidrs = [\"127.0.0.2/32:{port}\"]\n[limits]\nnew_connections_per_second = 1\nburst = 1\n"
    );
    let resolver = StaticResolver::new().with("allowed.test", &["127.0.0.2".parse().unwrap()]);
    let gw = gateway_with(&[("coder-1", &agent)], &[], resolver, |c, _| {
        c.transparent_listen = vec![listen];
        c.interception = portcullis::sys::Interception::Tproxy;
        c.transparent_tls_ports = vec![port];
        c.transparent_http_ports = vec![];
    })
    .await;
    for _ in 0..5 {
        let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
        s.write_all(&client_hello("denied.test")).await.unwrap();
        let mut b = [0u8; 16];
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await;
    }
    let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
    s.write_all(&client_hello("allowed.test")).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while up.seen.connections() == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        up.seen.connections(),
        1,
        "the allowed hello found its token spent"
    );
    let lines = gw.log_lines(5).await;
    let reasons: Vec<_> = lines.iter().map(|l| l["event.reason"].clone()).collect();
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["event.reason"] == "not_allowed")
            .count(),
        5,
        "{reasons:?}"
    );
    drop(s);
    gw.stop().await;
}

/// Answers every name with 127.0.0.1 and counts the lookups it was asked for.
#[derive(Clone, Default)]
struct Counting(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Resolve for Counting {
    fn lookup<'a>(&'a self, _name: &'a str) -> BoxFuture<'a, Result<Vec<IpAddr>, ResolveError>> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Box::pin(async { Ok(vec!["127.0.0.1".parse().unwrap()]) })
    }
}

/// DNS exfiltration through the proxy's resolver: the explicit proxy resolved before it took
/// the agent's limits, so an agent limited to 1 new connection/s put 4,000 names of its
/// choosing on the upstream DNS in 4.8 s. Now the limits come first: a refused CONNECT
/// resolves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_at_one_connection_a_second_cannot_make_the_gateway_resolve_more() {
    let up = silent_upstream().await;
    let port = up.addr.port();
    let agent = format!(
        "name = \"coder-1\"\nsources = [\"127.0.0.0/8\"]\nallow = [\".exfil.test:{port}\"]\nallow_cidrs = [\"127.0.0.1/32:{port}\"]\n[limits]\nnew_connections_per_second = 1\nburst = 1\n"
    );
    let lookups = Counting::default();
    let gw = gateway(&[("coder-1", &agent)], &[], lookups.clone()).await;
    let started = std::time::Instant::now();
    let (mut ok, mut limited) = (0, 0);
    for i in 0..200 {
        let name = format!("c{i:04}x{:x}.exfil.test", i * 7919);
        match open_tunnel(gw.proxy, &name, port).await {
            Ok(_) => ok += 1,
            Err(head) if head.contains("429") => limited += 1,
            Err(head) => panic!("unexpected answer: {head}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let resolved = lookups.0.load(std::sync::atomic::Ordering::Relaxed);
    // The burst, then one a second (and one for a second boundary crossed).
    let allowed = 1 + elapsed.ceil() as usize + 1;
    assert!(
        limited > 150,
        "the rate limit did not hold: {ok} ok, {limited} limited"
    );
    assert!(
        resolved <= allowed,
        "{resolved} names resolved in {elapsed:.1} s for an agent at 1 connection/s ({ok} admitted)"
    );
    assert_eq!(resolved, ok, "only admitted connections resolve");
    gw.stop().await;
}

/// A reload that changes the limits a live tunnel is shaped by (its bandwidth, its daily
/// budget) revokes it: the agent reopens under the new limits instead of keeping the old
/// ones for as long as the tunnel lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_the_tunnels_limits_revokes_it() {
    let up = silent_upstream().await;
    let port = up.addr.port();
    let rules = |limits: &str| {
        format!(
            "name = \"coder-1\"\nsources = [\"127.0.0.0/8\"]\nallow = [\"allowed.test:{port}\"]\nallow_cidrs = [\"127.0.0.1/32:{port}\"]\n[limits]\n{limits}\n"
        )
    };
    let gw = gateway(
        &[("coder-1", &rules("bandwidth = \"10 MiB/s\""))],
        &[],
        localhost_resolver(&["allowed.test"]),
    )
    .await;
    let mut unchanged = open_tunnel(gw.proxy, "allowed.test", port).await.unwrap();
    // A reload that leaves the limits as they were revokes nothing.
    let (code, body) = signed_reload(gw.admin).await;
    assert_eq!(code, 200, "{body}");
    let mut b = [0u8; 16];
    let still = tokio::time::timeout(Duration::from_millis(500), unchanged.read(&mut b)).await;
    assert!(
        still.is_err(),
        "an unchanged reload cut the tunnel: {still:?}"
    );
    std::fs::write(
        gw.dir.path().join("rules/agents/coder-1.toml"),
        rules("bandwidth = \"10 KiB/s\""),
    )
    .unwrap();
    let (code, body) = signed_reload(gw.admin).await;
    assert_eq!(code, 200, "{body}");
    let closed = tokio::time::timeout(Duration::from_secs(2), unchanged.read(&mut b)).await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "the tunnel kept its old bandwidth past the reload: {closed:?}"
    );
    let lines = gw.log_lines(1).await;
    assert!(
        lines.iter().any(|l| l["event.reason"] == "policy_revoked"),
        "{lines:?}"
    );
    gw.stop().await;
}
