//! The DNS forwarder end to end, in network namespaces (root; CI runs it as root): an agent
//! whose only route is a gateway running the portcullis binary behind the ruleset it
//! renders, a recording "public resolver" on the internet side, and the recording upstream
//! portcullis forwards to. docs/threat-model.md, "DNS
//! tunnelling", proven from the resolvers' side.
//!
//! The agent's questions are asked by `tests/e2e/client.py dns` (one A question over UDP or
//! TCP, 2 s timeout). The negatives are checked by construction: before any ruleset exists
//! the same client, in the same namespace, reaches the public resolver and gets its answer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::netns::*;

/// The resolver an agent might name instead of the gateway (8.8.8.8 in real life): a
/// recording server on the internet side, reachable through the gateway's forwarding.
const PUBLIC_RESOLVER: &str = ATTACKER;
/// What the public resolver answers for every name it knows: if an agent ever gets this
/// address, its question went past the gateway.
const PUBLIC_ANSWER: &str = "203.0.113.99";
/// What the upstream portcullis forwards to answers for allowed names.
const UPSTREAM_ANSWER: &str = INTERNET;

fn client_py() -> String {
    format!("{}/tests/e2e/client.py", env!("CARGO_MANIFEST_DIR"))
}

/// One A question from the agent namespace: `NOERROR 1.2.3.4`, `NXDOMAIN`, `timeout`, ...
async fn ask(topo: &Topology, server: &str, transport: &str, name: &str) -> String {
    let o = run(in_ns(
        &topo.agent_ns,
        &format!("python3 {} dns {server} 53 {transport} {name}", client_py()),
    ))
    .await;
    assert!(
        o.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout(&o)
}

/// Serve DNS on the gateway's agent-side address, port 53 (so the ruleset redirects and
/// admits agent port 53 to it).
fn with_dns_listener(cfg: &Path) {
    let text = std::fs::read_to_string(cfg).unwrap();
    let text = text.replacen(
        "[listen]\n",
        &format!("[listen]\ndns = [\"{GW_AGENT_SIDE}:53\"]\n"),
        1,
    );
    assert!(text.contains("dns = ["), "the config has no [listen] table");
    std::fs::write(cfg, text).unwrap();
}

fn public_table() -> Vec<(&'static str, &'static str)> {
    [
        "direct.wild.test",
        "a.wild.test",
        "b.wild.test",
        "allowed.test",
        "x7f3k2q9.evil.test",
    ]
    .into_iter()
    .map(|n| (n, PUBLIC_ANSWER))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_dns_goes_only_through_the_filtering_forwarder() {
    let topo = Topology::new();
    let dir = tempfile::tempdir().unwrap();
    let ip = |a: &str| -> SocketAddr { format!("{a}:53").parse().unwrap() };
    let public = dns_server(ip(PUBLIC_RESOLVER), &public_table()).await;
    let upstream = dns_server(
        ip(INTERNET),
        &[
            ("allowed.test", UPSTREAM_ANSWER),
            ("b.wild.test", UPSTREAM_ANSWER),
            ("x7f3k2q9.evil.test", UPSTREAM_ANSWER),
        ],
    )
    .await;
    let bin = env!("CARGO_BIN_EXE_portcullis");

    // Control, no ruleset yet: the gateway forwards, so the agent reaches the public
    // resolver over UDP and TCP and gets its answer. Everything below that sees no answer
    // or another answer therefore sees the ruleset at work, not a broken topology.
    for transport in ["udp", "tcp"] {
        assert_eq!(
            ask(&topo, PUBLIC_RESOLVER, transport, "direct.wild.test").await,
            format!("NOERROR {PUBLIC_ANSWER}"),
            "control over {transport}: the agent cannot reach the public resolver at all"
        );
    }
    assert_eq!(public.names().len(), 2, "{:?}", public.names());

    // 1. The ruleset without a DNS listener: agent DNS to any resolver is dropped. No
    //    answer within the client's 2 s, and not one question reached the public resolver.
    let cfg = write_config(
        dir.path(),
        &topo,
        &format!("\"{GW_AGENT_SIDE}:15001\""),
        "redirect",
        false,
    );
    let gw = start_gateway(&topo, bin, &cfg, dir.path()).await;
    for transport in ["udp", "tcp"] {
        assert_eq!(
            ask(&topo, PUBLIC_RESOLVER, transport, "a.wild.test").await,
            "timeout",
            "{transport}: DNS to another resolver went through"
        );
        assert_eq!(
            ask(&topo, GW_AGENT_SIDE, transport, "a.wild.test").await,
            "timeout",
            "{transport}: the gateway answered port 53 with no DNS listener configured"
        );
    }
    assert!(
        !public.names().contains(&"a.wild.test.".to_owned()),
        "the public resolver received {:?}",
        public.names()
    );
    assert!(upstream.names().is_empty(), "{:?}", upstream.names());
    drop(gw);

    // 2. With portcullis' DNS listener on 10.66.0.1:53.
    with_dns_listener(&cfg);
    let gw = start_gateway(&topo, bin, &cfg, dir.path()).await;
    for transport in ["udp", "tcp"] {
        // The gateway resolver: an allowed name is answered with the upstream's records...
        assert_eq!(
            ask(&topo, GW_AGENT_SIDE, transport, "allowed.test").await,
            format!("NOERROR {UPSTREAM_ANSWER}"),
            "{transport}: allowed name; log: {:#?}",
            gw.lines()
        );
        // ... a denied one (a tunnelling-style label) is refused (NXDOMAIN, the default)
        // without going upstream.
        assert_eq!(
            ask(&topo, GW_AGENT_SIDE, transport, "x7f3k2q9.evil.test").await,
            "NXDOMAIN",
            "{transport}: denied name"
        );
        // Naming another resolver changes nothing: the ruleset hands the question to
        // portcullis (the answer is the upstream's, not the public resolver's), and the
        // policy applies just the same.
        assert_eq!(
            ask(&topo, PUBLIC_RESOLVER, transport, "b.wild.test").await,
            format!("NOERROR {UPSTREAM_ANSWER}"),
            "{transport}: DNS named to another resolver was not answered by portcullis"
        );
        assert_eq!(
            ask(&topo, PUBLIC_RESOLVER, transport, "x7f3k2q9.evil.test").await,
            "NXDOMAIN",
            "{transport}: denied name asked of another resolver"
        );
    }
    let up = upstream.names();
    assert!(up.contains(&"allowed.test.".to_owned()), "{up:?}");
    assert!(up.contains(&"b.wild.test.".to_owned()), "{up:?}");
    assert!(
        !up.iter().any(|n| n.contains("evil.test")),
        "a denied name went upstream: {up:?}"
    );
    assert_eq!(
        public.names(),
        vec!["direct.wild.test.".to_owned(); 2],
        "after the ruleset, the public resolver must have seen only the control questions"
    );
    // Refused questions are always logged (4 of them: 2 transports × 2 resolvers named).
    let logged = gw.settled_lines().await;
    let refused = logged
        .iter()
        .filter(|l| {
            l["portcullis.mode"] == "dns"
                && l["dns.question.name"] == "x7f3k2q9.evil.test"
                && l["event.reason"] == "not_allowed"
                && l["dns.response_code"] == "NXDOMAIN"
        })
        .count();
    assert_eq!(refused, 4, "log: {logged:#?}");
}
