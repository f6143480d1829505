//! Network-namespace topology for end-to-end tests (root only):
//!
//! ```text
//!  agent ns  10.66.0.11/24, fd66::11/64 ── gw ns 10.66.0.1, fd66::1 | 203.0.113.1, fd99::1 ── root ns ("internet")
//!                                                                      203.0.113.10 (+ .66 "attacker"), fd99::10
//! ```
//! The agent's only route is the gateway. The gateway forwards (ip_forward=1) so that only
//! the ruleset stands between the agent and the internet. 203.0.113.0/24 is TEST-NET-3 and
//! fd99::/64 a ULA: traffic never leaves this machine. Everything is removed on drop.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};

pub const GW_AGENT_SIDE: &str = "10.66.0.1";
pub const AGENT_IP: &str = "10.66.0.11";
pub const INTERNET: &str = "203.0.113.10";
pub const ATTACKER: &str = "203.0.113.66";
pub const INTERNET6: &str = "fd99::10";

pub fn require_root() {
    let uid = Command::new("id").arg("-u").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "this test builds network namespaces and needs root: run `bash tests/run.sh` as root (CI does)"
    );
}

/// Run a shell command with a time bound; panic with its output on failure.
pub fn sh(cmd: &str) -> Output {
    let out = sh_status(cmd);
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run a shell command with a time bound (60 s), returning its output whatever the status.
pub fn sh_status(cmd: &str) -> Output {
    Command::new("timeout")
        .args(["60", "sh", "-c", cmd])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

pub struct Topology {
    pub agent_ns: String,
    pub gw_ns: String,
    pub gw_agent_if: String,
    root_if: String,
    /// Held for the topology's life: every topology puts the same addresses and routes in
    /// the root namespace, so two test processes must not build theirs at the same time.
    _lock: std::fs::File,
}

impl Topology {
    pub fn new() -> Self {
        require_root();
        let lock = std::fs::File::create("/tmp/portcullis-netns-tests.lock")
            .expect("create the namespace test lock");
        lock.lock().expect("take the namespace test lock");
        let id = std::process::id() % 100_000;
        let t = Topology {
            _lock: lock,
            agent_ns: format!("pcl-agent-{id}"),
            gw_ns: format!("pcl-gw-{id}"),
            gw_agent_if: format!("pclg{id}"),
            root_if: format!("pclr{id}"),
        };
        let (a, g, ga, r) = (&t.agent_ns, &t.gw_ns, &t.gw_agent_if, &t.root_if);
        let ai = format!("pcla{id}");
        let gi = format!("pcli{id}");
        sh(&format!(
            "set -e
            ip netns add {a}; ip netns add {g}
            ip link add {ai} type veth peer name {ga}
            ip link set {ai} netns {a}; ip link set {ga} netns {g}
            ip link add {gi} type veth peer name {r}
            ip link set {gi} netns {g}
            ip -n {a} link set lo up; ip -n {g} link set lo up
            ip -n {a} addr add {AGENT_IP}/24 dev {ai}; ip -n {a} -6 addr add fd66::11/64 dev {ai} nodad
            ip -n {a} link set {ai} up
            ip -n {a} route add default via {GW_AGENT_SIDE}; ip -n {a} -6 route add default via fd66::1
            ip -n {g} addr add {GW_AGENT_SIDE}/24 dev {ga}; ip -n {g} -6 addr add fd66::1/64 dev {ga} nodad
            ip -n {g} addr add 203.0.113.1/24 dev {gi}; ip -n {g} -6 addr add fd99::1/64 dev {gi} nodad
            ip -n {g} link set {ga} up; ip -n {g} link set {gi} up
            ip netns exec {g} sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
            ip addr add {INTERNET}/24 dev {r}; ip addr add {ATTACKER}/24 dev {r}; ip -6 addr add {INTERNET6}/64 dev {r} nodad
            ip link set {r} up
            ip route add 10.66.0.0/24 via 203.0.113.1 dev {r}; ip -6 route add fd66::/64 via fd99::1 dev {r}"
        ));
        t
    }

    /// A shell command inside the agent namespace.
    pub fn agent(&self, cmd: &str) -> Output {
        sh_status(&format!(
            "ip netns exec {} sh -c '{}'",
            self.agent_ns,
            cmd.replace('\'', "'\\''")
        ))
    }

    /// A shell command inside the gateway namespace.
    pub fn gw(&self, cmd: &str) -> Output {
        sh_status(&format!(
            "ip netns exec {} sh -c '{}'",
            self.gw_ns,
            cmd.replace('\'', "'\\''")
        ))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = sh_status(&format!(
            "ip netns pids {g} | xargs -r kill -9; ip netns pids {a} | xargs -r kill -9;
             ip netns del {a}; ip netns del {g}; ip link del {r} 2>/dev/null; true",
            a = self.agent_ns,
            g = self.gw_ns,
            r = self.root_if
        ));
    }
}

/// A recording DNS server (UDP and TCP on the same port) with a fixed table of A records;
/// every query it receives is remembered, so a test can prove what never reached it.
#[derive(Clone, Default)]
pub struct DnsLog(pub Arc<Mutex<Vec<(String, RecordType)>>>);

impl DnsLog {
    pub fn names(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }
}

type DnsTable = Arc<Vec<(String, std::net::IpAddr)>>;

pub async fn dns_server(addr: SocketAddr, table: &[(&str, &str)]) -> DnsLog {
    let socket = tokio::net::UdpSocket::bind(addr).await.unwrap();
    let tcp = tokio::net::TcpListener::bind(addr).await.unwrap();
    let table: DnsTable = Arc::new(
        table
            .iter()
            .map(|(n, ip)| (format!("{}.", n.to_ascii_lowercase()), ip.parse().unwrap()))
            .collect(),
    );
    let log = DnsLog::default();
    let (l, t) = (log.clone(), table.clone());
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                return;
            };
            if let Some(bytes) = dns_reply(&buf[..n], &t, &l) {
                let _ = socket.send_to(&bytes, from).await;
            }
        }
    });
    let l = log.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = tcp.accept().await {
            let (l, t) = (l.clone(), table.clone());
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut len = [0u8; 2];
                while stream.read_exact(&mut len).await.is_ok() {
                    let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if stream.read_exact(&mut query).await.is_err() {
                        return;
                    }
                    let Some(bytes) = dns_reply(&query, &t, &l) else {
                        return;
                    };
                    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&bytes);
                    if stream.write_all(&framed).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    log
}

/// An empty response to `query`: its id, opcode and RD flag, RA set, no answers yet.
pub fn response_to(query: &Message) -> Message {
    let mut resp = Message::new(
        query.metadata.id,
        MessageType::Response,
        query.metadata.op_code,
    );
    resp.metadata.recursion_desired = query.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp
}

/// The recording server's answer to one query: A records from `table`, else NXDOMAIN.
fn dns_reply(packet: &[u8], table: &DnsTable, log: &DnsLog) -> Option<Vec<u8>> {
    let query = Message::from_vec(packet).ok()?;
    let mut resp = response_to(&query);
    let mut found = false;
    for q in &query.queries {
        let name = q.name().to_ascii().to_ascii_lowercase();
        log.0.lock().unwrap().push((name.clone(), q.query_type()));
        resp.queries.push(q.clone());
        if let Some((_, ip)) = table.iter().find(|(n, _)| *n == name) {
            found = true;
            match (q.query_type(), ip) {
                (RecordType::A, std::net::IpAddr::V4(v4)) => {
                    resp.answers
                        .push(Record::from_rdata(q.name().clone(), 30, RData::A(A(*v4))))
                }
                (RecordType::AAAA, std::net::IpAddr::V6(v6)) => resp.answers.push(
                    Record::from_rdata(q.name().clone(), 30, RData::AAAA(AAAA(*v6))),
                ),
                _ => {}
            }
        }
    }
    if !found {
        resp.metadata.response_code = ResponseCode::NXDomain;
    }
    resp.to_vec().ok()
}

/// Counts UDP datagrams received on `addr`.
pub async fn udp_recorder(addr: SocketAddr) -> Arc<Mutex<usize>> {
    let socket = tokio::net::UdpSocket::bind(addr).await.unwrap();
    let count = Arc::new(Mutex::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while socket.recv_from(&mut buf).await.is_ok() {
            *c.lock().unwrap() += 1;
        }
    });
    count
}

/// Poll `f` until it is true or `within` passes.
pub async fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn run(cmd: String) -> Output {
    tokio::task::spawn_blocking(move || sh_status(&cmd))
        .await
        .unwrap()
}

pub fn in_ns(ns: &str, cmd: &str) -> String {
    format!("ip netns exec {ns} sh -c '{}'", cmd.replace('\'', "'\\''"))
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

pub struct NsGateway {
    pub child: Child,
    pub log: std::path::PathBuf,
}

impl Drop for NsGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NsGateway {
    pub fn lines(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        super::whole_lines(&text)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The log's lines once it has stopped growing: no new line for 200 ms, at most 5 s.
    /// The writer batches lines (10 ms windows), so a line can land a little after the
    /// connection it records has ended: count lines only once they have settled.
    pub async fn settled_lines(&self) -> Vec<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut last = self.lines().len();
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = self.lines();
            if now.len() == last || tokio::time::Instant::now() >= deadline {
                return now;
            }
            last = now.len();
        }
    }

    pub async fn line_where(&self, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(l) = self.lines().into_iter().rev().find(|l| pred(l)) {
                return l;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no such log line in {:#?}",
                self.lines()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
pub const TOTP: &str = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP";

/// Write rules and a config for the namespace gateway: `transparent` listeners, the
/// interception mode, and whether agent IPv6 is intercepted.
pub fn write_config(
    dir: &std::path::Path,
    topo: &Topology,
    transparent: &str,
    interception: &str,
    ipv6: bool,
) -> std::path::PathBuf {
    let rules = dir.join("rules");
    std::fs::create_dir_all(rules.join("agents")).unwrap();
    std::fs::write(
        rules.join("agents/coder-1.toml"),
        format!(
            "name = \"coder-1\"\nsources = [\"{AGENT_IP}/32\", \"fd66::11/128\"]\n\
             allow = [\"allowed.test\", \"*.wild.test\"]\n\
             # the test internet lives in TEST-NET-3, a documentation range: allow it explicitly\n\
             allow_cidrs = [\"203.0.113.0/24\"]\n"
        ),
    )
    .unwrap();
    std::fs::write(dir.join("webhook.secret"), format!("{WHSEC}\n")).unwrap();
    std::fs::write(dir.join("totp.secret"), format!("{TOTP}\n")).unwrap();
    let cfg = dir.join("portcullis.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"rules_dir = "rules"
state_dir = "state"
[listen]
explicit = "{GW_AGENT_SIDE}:3128"
admin = "127.0.0.1:9090"
transparent = [{transparent}]
[resolver]
upstreams = ["{INTERNET}:53"]
[log]
destination = "{log}"
[timeouts]
handshake_ms = 2000
[transparent]
interception = "{interception}"
[nftables]
agent_interfaces = ["{ifname}"]
agent_networks = ["10.66.0.0/24", "fd66::/64"]
ipv6 = {ipv6}
[kill_switch]
webhook_secret_files = ["webhook.secret"]
totp_secret_file = "totp.secret"
"#,
            log = dir.join("connections.log").display(),
            ifname = topo.gw_agent_if,
        ),
    )
    .unwrap();
    cfg
}

/// Apply the ruleset in the gateway namespace, start `bin … run` there and wait for
/// `/healthz` (bounded).
pub async fn start_gateway(
    topo: &Topology,
    bin: &str,
    cfg: &std::path::Path,
    dir: &std::path::Path,
) -> NsGateway {
    let applied = run(in_ns(
        &topo.gw_ns,
        &format!("{bin} --config {} apply-ruleset", cfg.display()),
    ))
    .await;
    assert!(
        applied.status.success(),
        "apply-ruleset: {}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let child = Command::new("ip")
        .args(["netns", "exec", &topo.gw_ns, "sh", "-c"])
        .arg(format!(
            "ulimit -n $(ulimit -Hn); exec {bin} --config {} run",
            cfg.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let gw = NsGateway {
        child,
        log: dir.join("connections.log"),
    };
    let mut up = false;
    for _ in 0..100 {
        if run(in_ns(&topo.gw_ns, "curl -sf http://127.0.0.1:9090/healthz"))
            .await
            .status
            .success()
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "portcullis did not come up in the gateway namespace");
    gw
}
