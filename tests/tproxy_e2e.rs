//! Transparent mode with TPROXY instead of NAT redirect (root; CI runs it): the listener
//! binds with IP_TRANSPARENT, the original destination is the accepted socket's local
//! address, and agents reach allowed names over IPv4 and IPv6. docs/threat-model.md's
//! "Original destination" holds here too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use common::netns::*;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tproxy_gateway_end_to_end_ipv4_and_ipv6() {
    let topo = Topology::new();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), &["allowed.test"]);
    let ip = |a: &str, p: u16| -> SocketAddr { format!("{a}:{p}").parse().unwrap() };
    let tls = tls_upstream_on(ip(INTERNET, 443), pki.server.clone(), "tls via tproxy").await;
    let attacker = silent_upstream_on(ip(ATTACKER, 443)).await;
    let attacker6 = silent_upstream_on(format!("[{INTERNET6}]:443").parse().unwrap()).await;
    let _dns = dns_server(
        ip(INTERNET, 53),
        &[("allowed.test", INTERNET), ("evil.test", INTERNET)],
    )
    .await;

    // TPROXY delivers to a local socket only with policy routing for the marked packets.
    let routes = run(in_ns(
        &topo.gw_ns,
        "ip rule add fwmark 1 lookup 1 && ip route add local 0.0.0.0/0 dev lo table 1 && \
         ip -6 rule add fwmark 1 lookup 1 && ip -6 route add local ::/0 dev lo table 1",
    ))
    .await;
    assert!(
        routes.status.success(),
        "{}",
        String::from_utf8_lossy(&routes.stderr)
    );
    let cfg = write_config(
        dir.path(),
        &topo,
        "\"0.0.0.0:15001\", \"[::]:15001\"",
        "tproxy",
        true,
    );
    let bin = env!("CARGO_BIN_EXE_portcullis");
    let gw = start_gateway(&topo, bin, &cfg, dir.path()).await;

    let ca = pki.ca_pem.display().to_string();
    let curl = |args: String| {
        run(in_ns(
            &topo.agent_ns,
            &format!("curl -sS --max-time 5 {args}"),
        ))
    };

    let o = curl(format!(
        "--cacert {ca} --resolve allowed.test:443:{INTERNET} https://allowed.test/"
    ))
    .await;
    assert_eq!(
        stdout(&o),
        "tls via tproxy",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let line = gw
        .line_where(|l| {
            l["event.action"] == "allow" && l["portcullis.original_destination.ip"] == INTERNET
        })
        .await;
    assert_eq!(line["portcullis.mode"], "transparent");

    // Original destination, under TPROXY: the agent aims at the attacker; we dial our own resolution.
    let o = curl(format!(
        "--cacert {ca} --resolve allowed.test:443:{ATTACKER} https://allowed.test/"
    ))
    .await;
    assert_eq!(stdout(&o), "tls via tproxy");
    assert_eq!(
        attacker.seen.connections(),
        0,
        "the original destination was dialled"
    );
    gw.line_where(|l| {
        l["portcullis.original_destination.ip"] == ATTACKER
            && l["portcullis.original_destination.mismatch"] == true
    })
    .await;

    // IPv6 agent: intercepted (nftables.ipv6 = true), original destination is the v6
    // address it aimed at, and portcullis dials the name's own (v4) address.
    let o = curl(format!(
        "-6 --cacert {ca} --resolve allowed.test:443:[{INTERNET6}] https://allowed.test/"
    ))
    .await;
    assert_eq!(
        stdout(&o),
        "tls via tproxy",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(attacker6.seen.connections(), 0);
    gw.line_where(|l| {
        l["portcullis.original_destination.ip"] == INTERNET6 && l["source.ip"] == "fd66::11"
    })
    .await;

    // Denied names are still denied, and nothing reaches the internet for them.
    let before = tls.seen.connections();
    assert!(
        !curl(format!(
            "--cacert {ca} --resolve evil.test:443:{INTERNET} https://evil.test/"
        ))
        .await
        .status
        .success()
    );
    assert_eq!(tls.seen.connections(), before);
    drop(gw);
}
