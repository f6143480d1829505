//! Agents cannot claim each other's addresses, end to end in network namespaces (root; CI
//! runs it as root): two agents on one segment (a bridge in the gateway namespace), the
//! portcullis binary behind the ruleset it renders, and the recording upstream resolver the
//! forwarder asks. Agent A sends raw UDP DNS queries carrying agent B's source address
//! (IPv4 and IPv6) for names only B may resolve.
//!
//! The control comes first, in the same test: with B's source not bound to its interface
//! and MAC, the spoofed queries reach the upstream, are logged as B's, and drain B's DNS
//! rate limit. With the binding, not one reaches the upstream or the log, B's own queries
//! are answered during the flood, and that still holds once A is killed; killed, A's MAC is
//! cut off from an address no agent claims too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;

use common::netns::*;

const AGENT_B_IP: &str = "10.66.0.12";
const AGENT_A_IP6: &str = "fd66::11";
const AGENT_B_IP6: &str = "fd66::12";
const GW_AGENT_SIDE6: &str = "fd66::1";
/// In the agents' subnet, claimed by no agent.
const UNCLAIMED: &str = "10.66.0.77";
const MAC_A: &str = "02:00:00:00:00:11";
const MAC_B: &str = "02:00:00:00:00:12";
/// B's legitimate question, answered by the upstream.
const B_NAME: &str = "legit.b-only.test";
/// A's own question, answered by the upstream while A is alive.
const A_NAME: &str = "a-only.test";
/// Spoofed questions per flood, and how long the flood lasts.
const FLOOD: usize = 300;
const FLOOD_SECS: f64 = 1.5;
/// B's own questions during a flood, 350 ms apart: under its 5/s limit on their own.
const ASKS: usize = 4;

/// Sends `n` DNS A questions for `<prefix><i>.b-only.test` as raw IPv4 or IPv6 UDP
/// datagrams with a forged source address, spread over `secs`; prints how many were sent.
/// IPv6 needs the UDP checksum (over the pseudo-header); IPv4 may leave it zero.
const SPOOF_PY: &str = r#"
import socket, struct, sys, time
src, dst, prefix, n, secs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
v6 = ":" in src
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
def checksum(data):
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xffff) + (total >> 16)
    return (~total & 0xffff) or 0xffff
sent = 0
for i in range(n):
    name = "%s%d.b-only.test" % (prefix, i)
    qname = b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0"
    dns = struct.pack("!HHHHHH", (i + 1) & 0xffff, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)
    sport, length = 20000 + i % 20000, 8 + len(dns)
    if v6:
        s6, d6 = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
        pseudo = s6 + d6 + struct.pack("!IxxxB", length, 17)
        sum_ = checksum(pseudo + struct.pack("!HHHH", sport, 53, length, 0) + dns)
        udp = struct.pack("!HHHH", sport, 53, length, sum_) + dns
        packet = struct.pack("!IHBB", 6 << 28, length, 17, 64) + s6 + d6 + udp
        s.sendto(packet, (dst, 0, 0, 0))
    else:
        udp = struct.pack("!HHHH", sport, 53, length, 0) + dns
        packet = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, i & 0xffff, 0, 64, 17, 0,
                             socket.inet_aton(src), socket.inet_aton(dst)) + udp
        s.sendto(packet, (dst, 0))
    sent += 1
    time.sleep(secs / n)
print(sent)
"#;

fn client_py() -> String {
    format!("{}/tests/e2e/client.py", env!("CARGO_MANIFEST_DIR"))
}

/// Agent B's namespace, attached to the gateway's agent segment; removed on drop.
struct AgentB {
    ns: String,
}

impl Drop for AgentB {
    fn drop(&mut self) {
        let _ = sh_status(&format!(
            "ip netns pids {b} | xargs -r kill -9; ip netns del {b}",
            b = self.ns
        ));
    }
}

/// Turns the topology's agent link into a segment: a bridge in the gateway namespace
/// (holding the gateway's agent-side address) with agent A's veth and a second agent's.
/// Returns agent B and the bridge's name.
fn second_agent_on_a_bridge(topo: &Topology) -> (AgentB, String) {
    let id = std::process::id() % 100_000;
    let g = &topo.gw_ns;
    let ga = &topo.gw_agent_if;
    let br = format!("pclbr{id}");
    let b = AgentB {
        ns: format!("pcl-agentb-{id}"),
    };
    let (bi, bg) = (format!("pclb{id}"), format!("pclc{id}"));
    sh(&format!(
        "set -e
        ip -n {g} addr flush dev {ga}
        ip -n {g} link add {br} type bridge
        ip -n {g} link set {ga} master {br}
        ip -n {g} addr add {GW_AGENT_SIDE}/24 dev {br}
        ip -n {g} -6 addr add {GW_AGENT_SIDE6}/64 dev {br} nodad
        ip -n {g} link set {br} up
        ip netns add {bns}
        ip link add {bi} type veth peer name {bg}
        ip link set {bi} netns {bns}; ip link set {bg} netns {g}
        ip -n {g} link set {bg} master {br}; ip -n {g} link set {bg} up
        ip -n {bns} link set lo up
        ip -n {bns} link set {bi} address {MAC_B}
        ip -n {bns} addr add {AGENT_B_IP}/24 dev {bi}
        ip -n {bns} -6 addr add {AGENT_B_IP6}/64 dev {bi} nodad
        ip -n {bns} link set {bi} up
        ip -n {bns} route add default via {GW_AGENT_SIDE}
        ip -n {a} link set pcla{id} address {MAC_A}",
        bns = b.ns,
        a = topo.agent_ns,
    ));
    (b, br)
}

/// The rules: A may resolve only `a-only.test`, B only `*.b-only.test`; with `bound`, each
/// source is bound to the bridge and its agent's MAC.
fn write_rules(dir: &Path, bridge: &str, bound: bool) {
    let agents = dir.join("rules/agents");
    let _ = std::fs::remove_file(agents.join("coder-1.toml"));
    for (name, ip, ip6, mac, allow) in [
        ("a", AGENT_IP, AGENT_A_IP6, MAC_A, "a-only.test"),
        ("b", AGENT_B_IP, AGENT_B_IP6, MAC_B, "*.b-only.test"),
    ] {
        let source = if bound {
            format!(
                "{{ net = \"{ip}/32\", interface = \"{bridge}\", mac = \"{mac}\" }}, \
                 {{ net = \"{ip6}/128\", interface = \"{bridge}\", mac = \"{mac}\" }}"
            )
        } else {
            format!("\"{ip}/32\", \"{ip6}/128\"")
        };
        std::fs::write(
            agents.join(format!("{name}.toml")),
            // The test internet is TEST-NET-3, a documentation range: allow answers into it.
            format!(
                "name = \"{name}\"\nsources = [{source}]\nallow = [\"{allow}\"]\n\
                 allow_cidrs = [\"203.0.113.0/24\"]\n"
            ),
        )
        .unwrap();
    }
}

/// The namespace gateway's config: DNS on the agent-side addresses (IPv4 and IPv6, agent
/// IPv6 intercepted), the bridge as the agent interface, and a small DNS rate limit (5 q/s,
/// burst 10) that a flood drains at once.
fn write_gateway_config(dir: &Path, topo: &Topology, bridge: &str) -> std::path::PathBuf {
    let cfg = write_config(
        dir,
        topo,
        &format!("\"{GW_AGENT_SIDE}:15001\""),
        "redirect",
        true,
    );
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text
        .replacen(
            "[listen]\n",
            &format!("[listen]\ndns = [\"{GW_AGENT_SIDE}:53\", \"[{GW_AGENT_SIDE6}]:53\"]\n"),
            1,
        )
        .replacen(
            &format!("agent_interfaces = [\"{}\"]", topo.gw_agent_if),
            &format!("agent_interfaces = [\"{bridge}\"]"),
            1,
        );
    assert!(text.contains(&format!("agent_interfaces = [\"{bridge}\"]")));
    std::fs::write(&cfg, text + "[dns]\nqueries_per_second = 5\n").unwrap();
    cfg
}

/// One A question over UDP from a namespace: `NOERROR 1.2.3.4`, `REFUSED`, `timeout`, ...
async fn ask(ns: &str, name: &str) -> String {
    let o = run(in_ns(
        ns,
        &format!("python3 {} dns {GW_AGENT_SIDE} 53 udp {name}", client_py()),
    ))
    .await;
    assert!(
        o.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout(&o)
}

/// Agent A sends `n` questions `<prefix><i>.b-only.test` from the forged source `src`, over
/// `secs`, to the gateway's agent-side address of the same family.
async fn spoof(topo: &Topology, src: &str, prefix: &str, n: usize, secs: f64) {
    let dst = if src.contains(':') {
        GW_AGENT_SIDE6
    } else {
        GW_AGENT_SIDE
    };
    let sent = run(in_ns(
        &topo.agent_ns,
        &format!(
            "python3 -c '{}' {src} {dst} {prefix} {n} {secs}",
            SPOOF_PY.replace('\'', "'\\''")
        ),
    ))
    .await;
    assert_eq!(
        stdout(&sent),
        n.to_string(),
        "spoofing failed: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
}

/// Agent A floods spoofed questions as B (names `<prefix><i>.b-only.test`) while B asks
/// its own question four times across the flood's 1.5 s (the flood's process may start late
/// on a busy machine); returns B's answers.
async fn flood_while_b_asks(topo: &Topology, b: &AgentB, prefix: &str) -> Vec<String> {
    let flood = spoof(topo, AGENT_B_IP, prefix, FLOOD, FLOOD_SECS);
    let asks = async {
        let mut answers = Vec::new();
        for _ in 0..ASKS {
            tokio::time::sleep(std::time::Duration::from_millis(350)).await;
            answers.push(ask(&b.ns, B_NAME).await);
        }
        answers
    };
    tokio::join!(flood, asks).1
}

/// Log lines that name a spoofed question of this flood.
fn spoof_lines(lines: &[serde_json::Value], prefix: &str) -> Vec<serde_json::Value> {
    lines
        .iter()
        .filter(|l| {
            l["dns.question.name"]
                .as_str()
                .is_some_and(|n| n.starts_with(prefix))
        })
        .cloned()
        .collect()
}

fn upstream_saw(upstream: &DnsLog, prefix: &str) -> usize {
    upstream
        .names()
        .iter()
        .filter(|n| n.starts_with(prefix))
        .count()
}

fn spoofed_dropped(topo: &Topology) -> u64 {
    let out = topo.gw("nft list counter inet portcullis spoofed_dropped");
    let text = stdout(&out);
    let after = text
        .split("packets ")
        .nth(1)
        .unwrap_or_else(|| panic!("no counter: {text}"));
    after.split_whitespace().next().unwrap().parse().unwrap()
}

/// `{"op":"kill","agent":"a"}` over the gateway's control socket.
fn kill_over_control_socket(dir: &Path, agent: &str) {
    let path = dir.join("state/control.sock");
    let mut stream = std::os::unix::net::UnixStream::connect(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .unwrap();
    writeln!(
        stream,
        "{}",
        serde_json::json!({ "op": "kill", "agent": agent, "reason": "spoofing test" })
    )
    .unwrap();
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).unwrap();
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["status"], 200, "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_source_dns_never_reaches_upstream_with_a_binding() {
    let topo = Topology::new();
    let (b, bridge) = second_agent_on_a_bridge(&topo);
    let dir = tempfile::tempdir().unwrap();
    let upstream_addr: SocketAddr = format!("{INTERNET}:53").parse().unwrap();
    let upstream = dns_server(upstream_addr, &[(B_NAME, INTERNET), (A_NAME, INTERNET)]).await;
    let bin = env!("CARGO_BIN_EXE_portcullis");
    let cfg = write_gateway_config(dir.path(), &topo, &bridge);
    let answered = format!("NOERROR {INTERNET}");

    // 1. Control, sources not bound: the spoof works. Its questions reach the upstream and
    //    the log as B's, and they drain B's rate limit: B is refused during the flood.
    write_rules(dir.path(), &bridge, false);
    let gw = start_gateway(&topo, bin, &cfg, dir.path()).await;
    assert_eq!(ask(&b.ns, B_NAME).await, answered, "B before any flood");
    // IPv6 first, while B's bucket still has tokens.
    spoof(&topo, AGENT_B_IP6, "six-control", 5, 0.1).await;
    assert!(
        eventually(std::time::Duration::from_secs(2), || upstream_saw(
            &upstream,
            "six-control"
        ) > 0)
        .await,
        "control: no spoofed IPv6 question reached the upstream: {:?}",
        upstream.names()
    );
    let answers = flood_while_b_asks(&topo, &b, "control").await;
    assert!(
        upstream_saw(&upstream, "control") > 0,
        "control: no spoofed question reached the upstream, the test proves nothing: {:?}",
        upstream.names()
    );
    let logged = spoof_lines(&gw.settled_lines().await, "control");
    assert!(
        logged.iter().any(|l| l["agent.name"] == "b"),
        "control: no spoofed question was logged as B's: {logged:#?}"
    );
    assert!(
        answers.iter().any(|a| a == "REFUSED"),
        "control: A's flood did not drain B's limit: {answers:?}"
    );
    let control_lines = gw.settled_lines().await.len();
    drop(gw);

    // 2. Sources bound to the bridge and each agent's MAC.
    write_rules(dir.path(), &bridge, true);
    let gw = start_gateway(&topo, bin, &cfg, dir.path()).await;
    let printed = run(in_ns(
        &topo.gw_ns,
        "nft list chain inet portcullis source_guard",
    ))
    .await;
    assert!(printed.status.success(), "no source_guard chain applied");
    assert_eq!(ask(&b.ns, B_NAME).await, answered, "B, bound");
    assert_eq!(ask(&topo.agent_ns, A_NAME).await, answered, "A, bound");
    let answers = flood_while_b_asks(&topo, &b, "bound").await;
    assert_eq!(
        answers,
        vec![answered.clone(); ASKS],
        "B's own questions during A's spoofed flood"
    );
    assert_eq!(
        upstream_saw(&upstream, "bound"),
        0,
        "{:?}",
        upstream.names()
    );
    spoof(&topo, AGENT_B_IP6, "six-bound", 5, 0.1).await;
    assert!(
        spoofed_dropped(&topo) >= FLOOD as u64 + 5,
        "the guard did not count the floods"
    );

    // From an address nobody claims, A is an unknown agent: refused, and logged.
    spoof(&topo, UNCLAIMED, "unclaimed-alive", 5, 0.1).await;
    let logged = spoof_lines(&gw.settled_lines().await, "unclaimed-alive");
    assert!(
        !logged.is_empty() && logged.iter().all(|l| l["agent.name"] == "unknown"),
        "{logged:#?}"
    );

    // 3. A killed over the control socket: its own question goes unanswered, its spoofed
    //    ones still reach nothing, B is still answered, and A's MAC is cut off whatever
    //    address it takes.
    kill_over_control_socket(dir.path(), "a");
    assert_eq!(ask(&topo.agent_ns, A_NAME).await, "timeout", "A, killed");
    let macs = topo.gw("nft list set inet portcullis kill_macs");
    assert!(stdout(&macs).contains(MAC_A), "{}", stdout(&macs));
    spoof(&topo, UNCLAIMED, "unclaimed-killed", 5, 0.1).await;
    let before = spoofed_dropped(&topo);
    spoof(&topo, AGENT_B_IP6, "six-killed", 5, 0.1).await;
    let answers = flood_while_b_asks(&topo, &b, "killed").await;
    assert_eq!(
        answers,
        vec![answered.clone(); ASKS],
        "B's own questions during the killed A's spoofed flood"
    );
    assert_eq!(
        upstream_saw(&upstream, "killed"),
        0,
        "{:?}",
        upstream.names()
    );
    assert!(spoofed_dropped(&topo) >= before + FLOOD as u64 + 5);
    for prefix in ["six-bound", "six-killed"] {
        assert_eq!(upstream_saw(&upstream, prefix), 0, "{:?}", upstream.names());
    }

    // The log file is the control phase's, continued.
    let logged = gw.settled_lines().await.split_off(control_lines);
    for prefix in [
        "bound",
        "killed",
        "six-bound",
        "six-killed",
        "unclaimed-killed",
    ] {
        assert_eq!(
            spoof_lines(&logged, prefix),
            Vec::<serde_json::Value>::new(),
            "a spoofed question of the {prefix} flood was logged"
        );
    }
    assert!(
        !logged
            .iter()
            .any(|l| l["agent.name"] == "b" && l["event.reason"] == "rate_limited"),
        "B was rate limited with the binding: {logged:#?}"
    );
}
