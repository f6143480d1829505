//! Transparent mode end to end, in network namespaces (root; CI runs it as root): an agent
//! whose only route is a gateway running the portcullis binary behind the ruleset it
//! renders, and an "internet" of servers that record every connection and byte.
//! The classes of docs/threat-model.md this mode answers (original destination, SNI, protocol
//! confusion, other paths out, silent clients), each proven from the servers' side.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use std::time::{Duration, Instant};

use common::netns::*;
use common::*;

/// Re-frame a one-record hello as `n` records.
fn split_records(hello: &[u8], n: usize) -> Vec<u8> {
    let payload = &hello[5..];
    let size = payload.len().div_ceil(n);
    let mut out = Vec::new();
    for chunk in payload.chunks(size) {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_gateway_end_to_end() {
    let topo = Topology::new();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), &["allowed.test", "a.wild.test", "evil.test"]);
    let ip = |a: &str, p: u16| -> SocketAddr { format!("{a}:{p}").parse().unwrap() };
    let tls = tls_upstream_on(
        ip(INTERNET, 443),
        pki.server.clone(),
        "tls hello from the internet",
    )
    .await;
    let http = http_upstream_on(ip(INTERNET, 80), "http hello from the internet").await;
    let attacker = silent_upstream_on(ip(ATTACKER, 443)).await;
    let ssh = silent_upstream_on(ip(INTERNET, 22)).await;
    let other_port = silent_upstream_on(ip(INTERNET, 8080)).await;
    let http6 = silent_upstream_on(format!("[{INTERNET6}]:80").parse().unwrap()).await;
    let udp443 = udp_recorder(ip(INTERNET, 443)).await;
    let dns = dns_server(
        ip(INTERNET, 53),
        &[
            ("allowed.test", INTERNET),
            ("a.wild.test", INTERNET),
            ("evil.test", INTERNET),
        ],
    )
    .await;

    let cfg = write_config(
        dir.path(),
        &topo,
        &format!("\"{GW_AGENT_SIDE}:15001\""),
        "redirect",
        false,
    );
    let bin = env!("CARGO_BIN_EXE_portcullis");
    let gw = start_gateway(&topo, bin, &cfg, dir.path()).await;

    let ca = pki.ca_pem.display().to_string();
    let agent = |cmd: String| run(in_ns(&topo.agent_ns, &cmd));
    let curl = |args: String| agent(format!("curl -sS --max-time 5 {args}"));

    // Allowed HTTPS and HTTP through the redirect, bytes verified.
    let o = curl(format!(
        "--cacert {ca} --resolve allowed.test:443:{INTERNET} https://allowed.test/"
    ))
    .await;
    assert_eq!(
        stdout(&o),
        "tls hello from the internet",
        "{} log: {:#?}\n{}",
        String::from_utf8_lossy(&o.stderr),
        gw.lines(),
        debug_dump(&topo).await
    );
    let o = curl(format!(
        "--resolve allowed.test:80:{INTERNET} http://allowed.test/x"
    ))
    .await;
    assert_eq!(
        stdout(&o),
        "http hello from the internet",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(http.seen.text().contains("GET /x HTTP/1.1"));
    assert!(
        dns.names().contains(&"allowed.test.".to_owned()),
        "portcullis resolved through the configured DNS"
    );
    let line = gw
        .line_where(|l| l["url.original"] == "http://allowed.test/x")
        .await;
    assert_eq!(line["portcullis.mode"], "transparent");
    assert_eq!(line["agent.name"], "coder-1");
    let tls_seen = tls.seen.connections();
    assert_eq!(tls_seen, 1);

    // Original destination: allowed SNI, but the agent aimed at the attacker's address: we dial our
    // own resolution of the name; the attacker sees nothing and the mismatch is logged.
    let o = curl(format!(
        "--cacert {ca} --resolve allowed.test:443:{ATTACKER} https://allowed.test/"
    ))
    .await;
    assert_eq!(stdout(&o), "tls hello from the internet");
    assert_eq!(
        attacker.seen.connections(),
        0,
        "the agent's original destination was dialled"
    );
    let line = gw
        .line_where(|l| l["portcullis.original_destination.ip"] == ATTACKER)
        .await;
    assert_eq!(line["portcullis.original_destination.mismatch"], true);
    assert_eq!(line["destination.ip"], INTERNET);
    let tls_seen = tls_seen + 1;
    assert_eq!(tls.seen.connections(), tls_seen);

    // Denied name, and A2 through the explicit proxy: SNI must match the CONNECT host.
    let o = curl(format!(
        "--cacert {ca} --resolve evil.test:443:{INTERNET} https://evil.test/"
    ))
    .await;
    assert!(!o.status.success());
    let o = curl(format!(
        "--cacert {ca} -x http://{GW_AGENT_SIDE}:3128 --connect-to evil.test:443:allowed.test:443 https://evil.test/"
    ))
    .await;
    assert!(!o.status.success(), "SNI smuggled through CONNECT");
    gw.line_where(|l| l["event.reason"] == "sni_mismatch").await;
    gw.line_where(|l| {
        l["event.reason"] == "not_allowed" && l["tls.client.server_name"] == "evil.test"
    })
    .await;

    // Protocol confusion: no SNI (an IP URL), HTTP on 443, TLS on 80, garbage: all denied, nothing
    // reaches the internet, never a fallback to the original destination.
    let o = curl(format!("-k https://{INTERNET}/")).await;
    assert!(!o.status.success());
    gw.line_where(|l| l["event.reason"] == "no_sni").await;
    assert!(
        !curl(format!("http://{INTERNET}:443/"))
            .await
            .status
            .success()
    );
    assert!(
        !curl(format!(
            "-k --resolve allowed.test:80:{INTERNET} https://allowed.test:80/"
        ))
        .await
        .status
        .success()
    );
    let garbage = agent(format!(
        "python3 {} send {INTERNET} 443 {} whole",
        client_py(),
        hex(b"\x16\x03\x01\x00\x05hello")
    ))
    .await;
    assert_eq!(stdout(&garbage), "0");

    // Protocol confusion: a real hello one byte per TCP segment, and split over 300 records, is
    // parsed and replayed to the upstream byte for byte.
    for (label, bytes, mode) in [
        ("bytewise", client_hello("allowed.test"), "bytewise"),
        (
            "300 records",
            split_records(&client_hello("a.wild.test"), 300),
            "whole",
        ),
    ] {
        let before = tls.seen.connections();
        let o = agent(format!(
            "python3 {} send {INTERNET} 443 {} {mode}",
            client_py(),
            hex(&bytes)
        ))
        .await;
        assert!(
            o.status.success(),
            "{label}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            eventually(Duration::from_secs(3), || tls.seen.connections()
                == before + 1)
            .await,
            "{label}: not relayed"
        );
        let received = tls.seen.connection(before);
        assert!(
            received.starts_with(&bytes),
            "{label}: the upstream did not get the hello unchanged"
        );
    }
    let tls_seen = tls.seen.connections();

    // Other paths out: IPv6 and UDP 443 (QUIC) from the agent are dropped by the ruleset.
    assert!(
        !curl(format!("-6 --max-time 2 http://[{INTERNET6}]/"))
            .await
            .status
            .success()
    );
    let _ = agent(format!("python3 {} udp {INTERNET} 443", client_py())).await;
    // Other paths out: other ports, ICMP and forwarding around the proxy are dropped.
    assert!(
        !curl(format!("--max-time 2 http://{INTERNET}:8080/"))
            .await
            .status
            .success()
    );
    assert!(
        !curl(format!("--max-time 2 telnet://{INTERNET}:22"))
            .await
            .status
            .success()
    );
    let ping = agent(format!("ping -c 1 -W 1 {INTERNET}")).await;
    assert!(!ping.status.success(), "ICMP left the cage");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(http6.seen.connections(), 0, "IPv6 left the cage");
    assert_eq!(*udp443.lock().unwrap(), 0, "UDP 443 left the cage");
    assert_eq!(other_port.seen.connections(), 0, "port 8080 left the cage");
    assert_eq!(ssh.seen.connections(), 0, "port 22 left the cage");

    // Slow or silent clients: 1,000 silent connections (one byte, then nothing) do not stop a fresh
    // allowed connection from completing within 1 s.
    let holder = tokio::spawn(run(in_ns(
        &topo.agent_ns,
        &format!(
            "ulimit -n 4096; python3 {} hold {INTERNET} 443 1000 8",
            client_py()
        ),
    )));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    let o = curl(format!(
        "--cacert {ca} --resolve allowed.test:443:{INTERNET} https://allowed.test/"
    ))
    .await;
    let took = started.elapsed();
    assert_eq!(
        stdout(&o),
        "tls hello from the internet",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        took < Duration::from_secs(1),
        "fresh connection took {took:?} under slowloris"
    );
    let held = holder.await.unwrap();
    assert_eq!(
        stdout(&held),
        "1000",
        "the slowloris client could not open its connections"
    );
    assert!(
        eventually(Duration::from_secs(5), || gw
            .lines()
            .iter()
            .filter(|l| l["event.reason"] == "timeout")
            .count()
            >= 1000)
        .await,
        "silent connections were not cut at their deadline"
    );
    assert_eq!(
        tls.seen.connections(),
        tls_seen + 1,
        "a silent connection reached the upstream"
    );

    // The ruleset is idempotent: applying it again works.
    let again = run(in_ns(
        &topo.gw_ns,
        &format!("{bin} --config {} apply-ruleset", cfg.display()),
    ))
    .await;
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // Kill switch, second layer: `portcullis kill` (signed with the local secret) puts the
    // agent's addresses in kill_sources; then even traffic that never reaches the proxy is
    // dropped in the kernel, and nothing of it is logged by portcullis.
    let pc = |args: &str| {
        run(in_ns(
            &topo.gw_ns,
            &format!("{bin} --config {} {args}", cfg.display()),
        ))
    };
    let killed = pc("kill --agent coder-1 --reason e2e").await;
    assert!(
        killed.status.success(),
        "kill: {}{}",
        stdout(&killed),
        String::from_utf8_lossy(&killed.stderr)
    );
    let set = run(in_ns(
        &topo.gw_ns,
        "nft list set inet portcullis kill_sources_v4",
    ))
    .await;
    assert!(
        stdout(&set).contains(AGENT_IP),
        "agent not in kill_sources: {}",
        stdout(&set)
    );
    let lines_before = gw.settled_lines().await.len();
    assert!(
        !curl(format!(
            "--max-time 2 --cacert {ca} --resolve allowed.test:443:{INTERNET} https://allowed.test/"
        ))
        .await
        .status
        .success()
    );
    assert!(
        !curl(format!(
            "--max-time 2 -x http://{GW_AGENT_SIDE}:3128 http://allowed.test/"
        ))
        .await
        .status
        .success()
    );
    assert!(
        !agent(format!("ping -c 1 -W 1 {GW_AGENT_SIDE}"))
            .await
            .status
            .success()
    );
    let counters = run(in_ns(
        &topo.gw_ns,
        "nft list counter inet portcullis killed_dropped",
    ))
    .await;
    assert!(
        !stdout(&counters).contains("packets 0 "),
        "kill set dropped nothing: {}",
        stdout(&counters)
    );
    assert_eq!(
        gw.settled_lines().await.len(),
        lines_before,
        "killed traffic still reached portcullis"
    );
    assert_eq!(tls.seen.connections(), tls_seen + 1);
    // Re-applying the ruleset keeps the agent killed.
    assert!(pc("apply-ruleset").await.status.success());
    let set = run(in_ns(
        &topo.gw_ns,
        "nft list set inet portcullis kill_sources_v4",
    ))
    .await;
    assert!(
        stdout(&set).contains(AGENT_IP),
        "apply-ruleset reopened a killed agent"
    );
    let st = pc("status").await;
    assert!(stdout(&st).contains("coder-1"), "{}", stdout(&st));

    // Revive with the current TOTP code: the set empties and the agent works again.
    let code = portcullis::killswitch::totp::code_at(
        &portcullis::killswitch::totp::TotpSecret::from_base32(TOTP).unwrap(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    );
    let revived = pc(&format!("revive --agent coder-1 --totp {code}")).await;
    assert!(revived.status.success(), "revive: {}", stdout(&revived));
    let set = run(in_ns(
        &topo.gw_ns,
        "nft list set inet portcullis kill_sources_v4",
    ))
    .await;
    assert!(!stdout(&set).contains(AGENT_IP), "{}", stdout(&set));
    let o = curl(format!(
        "--cacert {ca} --resolve allowed.test:443:{INTERNET} https://allowed.test/"
    ))
    .await;
    assert_eq!(stdout(&o), "tls hello from the internet");
    drop(gw);
}

async fn debug_dump(topo: &Topology) -> String {
    let mut out = String::new();
    for (ns, cmd) in [
        (&topo.agent_ns, "ip addr; ip route"),
        (&topo.gw_ns, "ip addr; ip route; ss -ltn; nft list ruleset"),
    ] {
        let o = run(in_ns(ns, cmd)).await;
        out += &format!(
            "--- {ns}: {cmd}\n{}{}\n",
            stdout(&o),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    out
}

fn client_py() -> String {
    format!("{}/tests/e2e/client.py", env!("CARGO_MANIFEST_DIR"))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
