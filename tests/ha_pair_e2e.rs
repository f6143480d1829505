//! A keepalived pair for real, in network namespaces (root; CI runs it as root):
//!
//! ```text
//!  agent ns: bridge 10.77.0.11/24 ──┬── gw A: VIP 10.77.0.1 (when MASTER) ── mgmt 192.168.77.2 ─┐
//!                                   └── gw B: VIP 10.77.0.1 (when MASTER) ── mgmt 192.168.77.3 ─┘
//!  gw A 198.51.100.2, gw B 198.51.100.3 ── net ns: bridge 198.51.100.10 (HTTP origin on :80)
//! ```
//!
//! Each gateway namespace runs the portcullis binary (explicit proxy on the VIP, admin on
//! the management address, the other node as its `[cluster]` peer) and keepalived (the
//! Debian package) speaking unicast VRRP over the management link, with the VIP on the
//! agent side and a `/healthz` track script. The agent only knows the VIP.
//!
//! One test, in order (every wait bounded): failovers measured by an agent's curl loop;
//! kill through A then stop A → still killed on B; kill while B is down, start B → B comes
//! up killed; revive needs signature and TOTP and reaches both; a partitioned node keeps
//! serving what it knew, refuses a revive it cannot confirm, and a kill made during the
//! partition reaches the other node once it heals.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{require_root, sh, sh_status};
use common::{KILL_SWITCH_TOTP, KILL_SWITCH_WHSEC, now, signed_headers};
use portcullis::killswitch::totp::{TotpSecret, code_at};

const VIP: &str = "10.77.0.1";
const AGENT: &str = "10.77.0.11";
const ORIGIN: &str = "198.51.100.10";
/// Failovers measured in CI (the issue asks for p50/max over 10).
const FAILOVERS: usize = 10;
/// The bound the failover must meet.
const FAILOVER_BOUND: Duration = Duration::from_secs(5);

struct Net {
    agent: String,
    origin: String,
    gw: [String; 2],
    _lock: std::fs::File,
}

impl Net {
    fn new() -> Net {
        require_root();
        let lock = std::fs::File::create("/tmp/portcullis-netns-tests.lock").unwrap();
        lock.lock().unwrap();
        let id = std::process::id() % 100_000;
        let net = Net {
            agent: format!("hal-{id}"),
            origin: format!("han-{id}"),
            gw: [format!("haa-{id}"), format!("hab-{id}")],
            _lock: lock,
        };
        let (l, n, a, b) = (&net.agent, &net.origin, &net.gw[0], &net.gw[1]);
        sh(&format!(
            "set -e
            for ns in {l} {n} {a} {b}; do ip netns add $ns; ip -n $ns link set lo up; done
            ip -n {l} link add br0 type bridge; ip -n {l} link set br0 up
            ip -n {l} addr add {AGENT}/24 dev br0
            ip -n {n} link add br0 type bridge; ip -n {n} link set br0 up
            ip -n {n} addr add {ORIGIN}/24 dev br0
            # agent side: lan0 in each gateway, its peer end on the agent bridge
            ip link add hla{id} netns {a} type veth peer name hpa{id} netns {l}
            ip link add hlb{id} netns {b} type veth peer name hpb{id} netns {l}
            ip -n {a} link set hla{id} name lan0; ip -n {b} link set hlb{id} name lan0
            ip -n {l} link set hpa{id} master br0 up; ip -n {l} link set hpb{id} master br0 up
            ip -n {a} link set lan0 up; ip -n {b} link set lan0 up
            # internet side
            ip link add hna{id} netns {a} type veth peer name hqa{id} netns {n}
            ip link add hnb{id} netns {b} type veth peer name hqb{id} netns {n}
            ip -n {a} link set hna{id} name wan0; ip -n {b} link set hnb{id} name wan0
            ip -n {n} link set hqa{id} master br0 up; ip -n {n} link set hqb{id} master br0 up
            ip -n {a} addr add 198.51.100.2/24 dev wan0; ip -n {a} link set wan0 up
            ip -n {b} addr add 198.51.100.3/24 dev wan0; ip -n {b} link set wan0 up
            # management link
            ip link add hma{id} netns {a} type veth peer name hmb{id} netns {b}
            ip -n {a} link set hma{id} name mgmt0; ip -n {b} link set hmb{id} name mgmt0
            ip -n {a} addr add 192.168.77.2/24 dev mgmt0; ip -n {a} link set mgmt0 up
            ip -n {b} addr add 192.168.77.3/24 dev mgmt0; ip -n {b} link set mgmt0 up
            # the BACKUP binds the VIP before it holds it
            ip netns exec {a} sysctl -qw net.ipv4.ip_nonlocal_bind=1
            ip netns exec {b} sysctl -qw net.ipv4.ip_nonlocal_bind=1"
        ));
        net
    }

    fn exec(&self, ns: &str, cmd: &str) -> std::process::Output {
        sh_status(&format!(
            "ip netns exec {ns} sh -c '{}'",
            cmd.replace('\'', "'\\''")
        ))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let all = [&self.agent, &self.origin, &self.gw[0], &self.gw[1]];
        for ns in all {
            let _ = sh_status(&format!("ip netns pids {ns} | xargs -r kill -9"));
        }
        for ns in all {
            let _ = sh_status(&format!("ip netns del {ns}"));
        }
    }
}

/// One gateway node: its directory, config, and the portcullis and keepalived processes.
struct Node {
    ns: String,
    name: &'static str,
    mgmt: &'static str,
    dir: PathBuf,
    portcullis: Option<Child>,
    keepalived: Option<Child>,
}

impl Node {
    fn new(ns: &str, name: &'static str, mgmt: &'static str, peer: &str, root: &Path) -> Node {
        let dir = root.join(name);
        std::fs::create_dir_all(dir.join("rules/agents")).unwrap();
        std::fs::create_dir_all(dir.join("rules/lists")).unwrap();
        std::fs::write(
            dir.join("rules/agents/coder.toml"),
            format!(
                "name = \"coder\"\nsources = [\"10.77.0.0/24\"]\nallow_cidrs = [\"{ORIGIN}/32:80\"]\n"
            ),
        )
        .unwrap();
        std::fs::write(dir.join("webhook.secret"), format!("{KILL_SWITCH_WHSEC}\n")).unwrap();
        std::fs::write(dir.join("totp.secret"), format!("{KILL_SWITCH_TOTP}\n")).unwrap();
        let d = dir.display();
        std::fs::write(
            dir.join("portcullis.toml"),
            format!(
                "rules_dir = \"{d}/rules\"\nstate_dir = \"{d}/state\"\n\
                 [listen]\nexplicit = \"{VIP}:3128\"\nadmin = \"{mgmt}:9090\"\n\
                 [log]\ndestination = \"{d}/connections.log\"\n\
                 [timeouts]\ndrain_secs = 0\n\
                 [kill_switch]\nwebhook_secret_files = [\"{d}/webhook.secret\"]\ntotp_secret_file = \"{d}/totp.secret\"\n\
                 [cluster]\nnode = \"{name}\"\npeers = [\"http://{peer}:9090\"]\nsync_timeout_ms = 3000\nsync_interval_ms = 1000\nconfirm_timeout_ms = 1500\n"
            ),
        )
        .unwrap();
        let priority = if name == "a" { 150 } else { 100 };
        std::fs::write(
            dir.join("keepalived.conf"),
            format!(
                "global_defs {{\n  router_id pcl-{name}\n  script_user root\n  vrrp_garp_master_delay 0\n}}\n\
                 vrrp_script chk_portcullis {{\n  script \"/usr/bin/curl -sf -m 1 -o /dev/null http://{mgmt}:9090/healthz\"\n  interval 1\n  timeout 1\n  fall 1\n  rise 1\n}}\n\
                 vrrp_instance AGENT_GW {{\n  state BACKUP\n  nopreempt\n  priority {priority}\n  interface mgmt0\n  unicast_src_ip {mgmt}\n  unicast_peer {{\n    {peer}\n  }}\n  virtual_router_id 77\n  advert_int 1\n  track_script {{\n    chk_portcullis\n  }}\n  virtual_ipaddress {{\n    {VIP}/24 dev lan0\n  }}\n}}\n"
            ),
        )
        .unwrap();
        Node {
            ns: ns.to_owned(),
            name,
            mgmt,
            dir,
            portcullis: None,
            keepalived: None,
        }
    }

    fn start_portcullis(&mut self) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(env!("CARGO_BIN_EXE_portcullis"))
            .arg("--config")
            .arg(self.dir.join("portcullis.toml"))
            .arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join("stderr.log"))
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        self.portcullis = Some(child);
    }

    /// Stop portcullis as systemd would (SIGTERM) and wait for it, bounded.
    fn stop_portcullis(&mut self) {
        if let Some(mut child) = self.portcullis.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() >= deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn start_keepalived(&mut self) {
        let d = &self.dir;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "keepalived"])
            .args(["--dont-fork", "--log-console", "--vrrp"])
            .arg(format!(
                "--use-file={}",
                d.join("keepalived.conf").display()
            ))
            .arg(format!("--pid={}", d.join("keepalived.pid").display()))
            .arg(format!("--vrrp_pid={}", d.join("vrrp.pid").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("keepalived.log")).unwrap())
            .spawn()
            .unwrap();
        self.keepalived = Some(child);
    }

    /// GET or signed POST to this node's admin API, from inside its namespace.
    fn admin(&self, net: &Net, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut cmd = format!(
            "curl -s -m 5 -o /dev/stdout -w \"\\n%{{http_code}}\" -X {method} http://{}:9090{path}",
            self.mgmt
        );
        if let Some(body) = body {
            let id = format!("e2e-{}-{}", self.name, next_id());
            for (k, v) in signed_headers(KILL_SWITCH_WHSEC, &id, now(), body) {
                cmd += &format!(" -H \"{k}: {v}\"");
            }
            cmd += &format!(" --data-binary '{}'", body.replace('\'', "'\\''"));
        }
        let out = net.exec(&self.ns, &cmd);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    fn status(&self, net: &Net) -> serde_json::Value {
        let (code, body) = self.admin(net, "GET", "/v1/status", None);
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    fn killed(&self, net: &Net) -> bool {
        !self.status(net)["all"].is_null()
    }

    fn synced(&self, net: &Net) -> bool {
        self.admin(net, "GET", "/v1/status", None)
            .1
            .contains("\"synced\":true")
    }

    fn holds_vip(&self, net: &Net) -> bool {
        let out = net.exec(&self.ns, "ip -4 addr show dev lan0");
        String::from_utf8_lossy(&out.stdout).contains(VIP)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for child in [self.portcullis.as_mut(), self.keepalived.as_mut()]
            .into_iter()
            .flatten()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn next_id() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// What the agent gets through the VIP: the HTTP status (0: no answer within 1 s).
fn agent_fetch(net: &Net) -> u16 {
    let out = net.exec(
        &net.agent,
        &format!(
            "curl -s -m 1 -o /dev/null -w %{{http_code}} -x http://{VIP}:3128 http://{ORIGIN}/"
        ),
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn wait_for(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn code(at: i64) -> String {
    code_at(
        &TotpSecret::from_base32(KILL_SWITCH_TOTP).unwrap(),
        at as u64,
    )
}

fn master<'a>(net: &Net, nodes: &'a mut [Node; 2]) -> (&'a mut Node, usize) {
    let i = if nodes[0].holds_vip(net) { 0 } else { 1 };
    (&mut nodes[i], i)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[test]
fn a_keepalived_pair_fails_over_in_seconds_and_never_fails_open() {
    let started = Instant::now();
    let net = Net::new();
    let root = tempfile::tempdir().unwrap();
    // The origin: a tiny HTTP server in the internet namespace.
    std::fs::write(root.path().join("index.html"), "origin\n").unwrap();
    let mut origin = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.origin,
            "python3",
            "-m",
            "http.server",
            "80",
        ])
        .args(["--bind", ORIGIN, "--directory"])
        .arg(root.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut nodes = [
        Node::new(&net.gw[0], "a", "192.168.77.2", "192.168.77.3", root.path()),
        Node::new(&net.gw[1], "b", "192.168.77.3", "192.168.77.2", root.path()),
    ];
    for n in nodes.iter_mut() {
        n.start_portcullis();
    }
    assert!(
        wait_for(Duration::from_secs(15), || nodes
            .iter()
            .all(|n| n.synced(&net))),
        "both nodes up and synced"
    );
    for n in nodes.iter_mut() {
        n.start_keepalived();
    }
    assert!(
        wait_for(Duration::from_secs(15), || agent_fetch(&net) == 200),
        "the agent reaches the origin through the VIP"
    );
    assert!(
        nodes[0].holds_vip(&net) ^ nodes[1].holds_vip(&net),
        "one MASTER"
    );

    // --- Failovers: stop portcullis on the MASTER, time the agent's recovery. ---
    let mut gaps = Vec::new();
    for round in 0..FAILOVERS {
        let (m, i) = master(&net, &mut nodes);
        let stopped = Instant::now();
        m.stop_portcullis();
        let recovered = wait_for(Duration::from_secs(15), || agent_fetch(&net) == 200);
        let gap = stopped.elapsed();
        assert!(recovered, "round {round}: the agent never recovered");
        assert!(
            nodes[1 - i].holds_vip(&net),
            "round {round}: the peer took the VIP"
        );
        gaps.push(gap);
        // Back up, synced, healthy: it stays BACKUP (nopreempt) for the next round.
        nodes[i].start_portcullis();
        assert!(wait_for(Duration::from_secs(15), || nodes[i].synced(&net)));
        // keepalived sees it healthy again (rise 1, interval 1).
        std::thread::sleep(Duration::from_millis(1_500));
    }
    let mut sorted = gaps.clone();
    sorted.sort();
    let (p50, max) = (percentile(&sorted, 0.5), sorted[sorted.len() - 1]);
    eprintln!("failover: {FAILOVERS} rounds, p50 {p50:?}, max {max:?}, all {gaps:?}");
    assert!(
        max <= FAILOVER_BOUND,
        "failover max {max:?} > {FAILOVER_BOUND:?}"
    );

    // --- Kill through the MASTER, then stop it: still killed on the other node. ---
    let (m, i) = master(&net, &mut nodes);
    let (c, body) = m.admin(
        &net,
        "POST",
        "/v1/kill",
        Some(r#"{"scope":"all","reason":"e2e"}"#),
    );
    assert_eq!(c, 200, "{body}");
    assert_eq!(agent_fetch(&net), 403, "killed: the proxy refuses");
    let other = 1 - i;
    assert!(wait_for(Duration::from_secs(5), || nodes[other].killed(&net)));
    nodes[i].stop_portcullis();
    assert!(wait_for(Duration::from_secs(10), || nodes[other].holds_vip(&net)));
    // Refused by the new MASTER, never served.
    for _ in 0..5 {
        assert_eq!(agent_fetch(&net), 403, "the kill survived the failover");
    }

    // --- Kill while a node is down (it is: `i`); start it: it comes up killed. ---
    // Revive first through the up node... it cannot confirm with its peer down: refused.
    let body = format!(r#"{{"scope":"all","totp":"{}"}}"#, code(now()));
    let (c, text) = nodes[other].admin(&net, "POST", "/v1/revive", Some(&body));
    assert_eq!(c, 503, "a revive the down peer cannot confirm: {text}");
    assert!(nodes[other].killed(&net));
    // An agent-scoped kill while `i` is down.
    let (c, text) = nodes[other].admin(
        &net,
        "POST",
        "/v1/kill",
        Some(r#"{"scope":"agent","agent":"coder","reason":"while down"}"#),
    );
    assert_eq!(c, 200, "{text}");
    nodes[i].start_portcullis();
    assert!(wait_for(Duration::from_secs(10), || nodes[i].synced(&net)));
    let s = nodes[i].status(&net);
    assert!(
        !s["all"].is_null() && !s["agents"]["coder"].is_null(),
        "came up killed: {s}"
    );

    // --- Revive: without the code refused on both; with signature and code, both reopen. ---
    let (c, _) = nodes[i].admin(&net, "POST", "/v1/revive", Some(r#"{"scope":"all"}"#));
    assert_eq!(c, 401);
    std::thread::sleep(Duration::from_millis(1_200));
    let body = format!(r#"{{"scope":"all","totp":"{}"}}"#, code(now()));
    let (c, text) = nodes[i].admin(&net, "POST", "/v1/revive", Some(&body));
    assert_eq!(c, 200, "{text}");
    for n in &nodes {
        let s = n.status(&net);
        assert!(
            s["all"].is_null() && s["agents"].as_object().unwrap().is_empty(),
            "{s}"
        );
    }
    assert!(wait_for(Duration::from_secs(5), || agent_fetch(&net) == 200));

    // --- Partition: nothing passes between the nodes (links stay up, as when the switch
    // between them fails; a link going down puts keepalived in FAULT instead). ---
    let (_, i) = master(&net, &mut nodes);
    let partition = |op: &str| {
        sh(&format!(
            "ip -n {} route {op} blackhole 192.168.77.3/32; ip -n {} route {op} blackhole 192.168.77.2/32",
            nodes[0].ns, nodes[1].ns
        ));
    };
    partition("add");
    // Both keep serving what they knew (each believes itself MASTER now: the agent
    // reaches whichever its ARP cache names).
    assert!(wait_for(Duration::from_secs(5), || agent_fetch(&net) == 200));
    // A revive a partitioned node cannot confirm is refused (nothing to reopen here, but
    // the rule does not look at that: it never reopens alone over the network).
    let body = format!(r#"{{"scope":"all","totp":"{}"}}"#, code(now() + 30));
    let (c, text) = nodes[i].admin(&net, "POST", "/v1/revive", Some(&body));
    assert_eq!(c, 503, "{text}");
    // A kill during the partition takes effect here at once and reaches the other node
    // once the link is back (relay retries, or the other node's pull).
    let (c, _) = nodes[i].admin(
        &net,
        "POST",
        "/v1/kill",
        Some(r#"{"scope":"all","reason":"partitioned"}"#),
    );
    assert_eq!(c, 200);
    assert!(nodes[i].killed(&net));
    assert!(!nodes[1 - i].killed(&net), "the partition holds it back");
    partition("del");
    let healed = Instant::now();
    assert!(wait_for(Duration::from_secs(10), || nodes[1 - i].killed(&net)));
    eprintln!(
        "kill made during the partition reached the peer {:?} after it healed",
        healed.elapsed()
    );
    assert!(wait_for(Duration::from_secs(10), || agent_fetch(&net) == 403));

    for n in nodes.iter_mut() {
        n.stop_portcullis();
    }
    let _ = origin.kill();
    let _ = origin.wait();
    eprintln!("ha pair e2e: {:?} wall time", started.elapsed());
}
