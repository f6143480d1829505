//! Transparent mode's logic without root: the original-destination lookup is injected
//! (`gateway::start_with`), so the listener needs neither nftables nor `IP_TRANSPARENT`. The
//! lifecycle is the same one the root tests drive through real redirects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn read_some(s: &mut TcpStream) -> Vec<u8> {
    let mut back = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut back)).await;
    back
}

/// A denied hello gets the TLS `access_denied` alert, reaches no upstream and spends no
/// token; the allowed one (the agent's single token) is relayed to our own resolution of
/// its name, and the record says the agent aimed elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_mode_runs_without_root_on_an_injected_destination() {
    let up = silent_upstream().await;
    let port = up.addr.port();
    let agent = format!(
        "name = \"coder-1\"\nsources = [\"127.0.0.0/8\"]\nallow = [\"allowed.test:{port}\"]\nallow_cidrs = [\"127.0.0.1/32:{port}\"]\n[limits]\nnew_connections_per_second = 1\nburst = 1\n"
    );
    // The agent "aimed" at an address the name does not resolve to.
    let aimed: SocketAddr = format!("192.0.2.7:{port}").parse().unwrap();
    let gw = gateway_with_lookup(
        &[("coder-1", &agent)],
        &[],
        localhost_resolver(&["allowed.test", "denied.test"]),
        |c, _| {
            c.listen.transparent = vec!["127.0.0.1:0".parse().unwrap()];
            c.transparent.tls_ports = vec![port];
            c.transparent.http_ports = vec![];
        },
        Arc::new(move |_, _| Ok(aimed)),
    )
    .await;
    let listen = gw.running.as_ref().unwrap().transparent_addrs[0];

    for _ in 0..3 {
        let mut s = TcpStream::connect(listen).await.unwrap();
        s.write_all(&client_hello("denied.test")).await.unwrap();
        let back = read_some(&mut s).await;
        assert_eq!(back.first(), Some(&21), "an alert record: {back:?}");
        assert_eq!(back.last(), Some(&49), "access_denied: {back:?}");
    }
    assert_eq!(
        up.seen.connections(),
        0,
        "a denied hello reached the upstream"
    );

    let mut s = TcpStream::connect(listen).await.unwrap();
    s.write_all(&client_hello("allowed.test")).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while up.seen.connections() == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        up.seen.connections(),
        1,
        "the allowed hello was not relayed"
    );
    drop(s);

    let lines = gw.log_lines(4).await;
    let denied: Vec<_> = lines
        .iter()
        .filter(|l| l["destination.domain"] == "denied.test")
        .collect();
    assert_eq!(denied.len(), 3, "{lines:?}");
    assert!(
        denied.iter().all(|l| l["event.reason"] == "not_allowed"),
        "{lines:?}"
    );
    let allowed = lines
        .iter()
        .find(|l| l["destination.domain"] == "allowed.test")
        .expect("the allowed connection's line");
    assert_eq!(allowed["event.action"], "allow", "{allowed}");
    assert_eq!(allowed["portcullis.mode"], "transparent", "{allowed}");
    assert_eq!(allowed["destination.ip"], "127.0.0.1", "{allowed}");
    assert_eq!(
        allowed["portcullis.original_destination.mismatch"], true,
        "we dialled the name, not where the agent aimed: {allowed}"
    );
    gw.stop().await;
}
