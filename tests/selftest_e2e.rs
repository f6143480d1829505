//! `portcullis selftest` end to end, in network namespaces (root; CI runs it as root): the
//! built binary runs inside the agent namespace and probes an "internet" of servers that
//! answer and record everything (TCP banners on the probe ports, a UDP echo on 443, an
//! outside resolver on UDP+TCP 53 that answers every name).
//!
//! - with the gateway's ruleset applied, every path is reported closed, the allowed name
//!   works, exit 0 — and the servers prove nothing reached them;
//! - with the gateway down behind its ruleset, exit 3 (the gateway does not work);
//! - without the ruleset (plain routing through the gateway), the open paths are reported
//!   OPEN, exit 1 — and the servers prove they were reached: selftest is no rubber stamp.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::netns::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
const PROXY: &str = "10.66.0.1:3128";
const DENIED: &str = "evil.test";
const ALLOWED: &str = "allowed.test";

/// Bytes received per accepted connection.
#[derive(Clone, Default)]
struct Conns(Arc<Mutex<Vec<Vec<u8>>>>);

impl Conns {
    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap().concat()).into_owned()
    }
}

/// A TCP server that speaks first (`banner from ADDR`), then records what it is sent.
async fn banner_server(addr: SocketAddr) -> Conns {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let conns = Conns::default();
    let c = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                let i = {
                    let mut v = c.0.lock().unwrap();
                    v.push(Vec::new());
                    v.len() - 1
                };
                let _ = sock
                    .write_all(format!("banner from {addr}\r\n").as_bytes())
                    .await;
                let mut buf = [0u8; 4096];
                while let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await
                {
                    if n == 0 {
                        break;
                    }
                    c.0.lock().unwrap()[i].extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    conns
}

/// A UDP echo that counts datagrams.
async fn udp_echo(addr: SocketAddr) -> Arc<Mutex<usize>> {
    let socket = tokio::net::UdpSocket::bind(addr).await.unwrap();
    let count = Arc::new(Mutex::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            *c.lock().unwrap() += 1;
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    count
}

/// The reply of a resolver that answers every A question with `ip`.
fn answer_everything(query: &[u8], ip: std::net::Ipv4Addr, log: &DnsLog) -> Option<Vec<u8>> {
    let query = Message::from_vec(query).ok()?;
    let mut resp = response_to(&query);
    resp.metadata.response_code = ResponseCode::NoError;
    for q in &query.queries {
        let name = q.name().to_ascii().to_ascii_lowercase();
        log.0.lock().unwrap().push((name, q.query_type()));
        resp.queries.push(q.clone());
        if q.query_type() == RecordType::A {
            resp.answers
                .push(Record::from_rdata(q.name().clone(), 30, RData::A(A(ip))));
        }
    }
    resp.to_vec().ok()
}

/// An outside resolver on UDP and TCP 53 of `ip`, answering every name with `ip`.
async fn outside_resolver(ip: &str) -> DnsLog {
    let addr: SocketAddr = format!("{ip}:53").parse().unwrap();
    let answer: std::net::Ipv4Addr = ip.parse().unwrap();
    let log = DnsLog::default();
    let udp = tokio::net::UdpSocket::bind(addr).await.unwrap();
    let l = log.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            if let Some(r) = answer_everything(&buf[..n], answer, &l) {
                let _ = udp.send_to(&r, from).await;
            }
        }
    });
    let tcp = tokio::net::TcpListener::bind(addr).await.unwrap();
    let l = log.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = tcp.accept().await {
            let l = l.clone();
            tokio::spawn(async move {
                let Ok(Ok(len)) =
                    tokio::time::timeout(Duration::from_secs(5), sock.read_u16()).await
                else {
                    return;
                };
                let mut q = vec![0u8; usize::from(len)];
                if sock.read_exact(&mut q).await.is_err() {
                    return;
                }
                if let Some(r) = answer_everything(&q, answer, &l) {
                    let mut framed = (r.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&r);
                    let _ = sock.write_all(&framed).await;
                }
            });
        }
    });
    log
}

/// What the probed "internet" recorded.
struct Internet {
    /// ATTACKER TCP 443, 80, 22, 25, 8080.
    attacker_tcp: Vec<(u16, Conns)>,
    attacker_udp443: Arc<Mutex<usize>>,
    v6_tcp443: Conns,
    v6_udp443: Arc<Mutex<usize>>,
    /// The outside resolver on ATTACKER:53.
    outside_dns: DnsLog,
    /// The gateway's own upstream resolver on INTERNET:53.
    upstream_dns: DnsLog,
    /// The allowed name's server, INTERNET:443.
    allowed: Conns,
}

impl Internet {
    async fn start() -> Self {
        let ip = |a: &str, p: u16| -> SocketAddr { format!("{a}:{p}").parse().unwrap() };
        let v6 = |p: u16| -> SocketAddr { format!("[{INTERNET6}]:{p}").parse().unwrap() };
        let mut attacker_tcp = Vec::new();
        for port in [443, 80, 22, 25, 8080] {
            attacker_tcp.push((port, banner_server(ip(ATTACKER, port)).await));
        }
        Internet {
            attacker_tcp,
            attacker_udp443: udp_echo(ip(ATTACKER, 443)).await,
            v6_tcp443: banner_server(v6(443)).await,
            v6_udp443: udp_echo(v6(443)).await,
            outside_dns: outside_resolver(ATTACKER).await,
            upstream_dns: dns_server(ip(INTERNET, 53), &[(ALLOWED, INTERNET), (DENIED, INTERNET)])
                .await,
            allowed: banner_server(ip(INTERNET, 443)).await,
        }
    }

    fn attacker_connections(&self) -> usize {
        self.attacker_tcp
            .iter()
            .map(|(_, c)| c.count())
            .sum::<usize>()
            + self.v6_tcp443.count()
    }

    fn attacker_datagrams(&self) -> usize {
        *self.attacker_udp443.lock().unwrap() + *self.v6_udp443.lock().unwrap()
    }

    fn port(&self, port: u16) -> &Conns {
        &self
            .attacker_tcp
            .iter()
            .find(|(p, _)| *p == port)
            .unwrap()
            .1
    }
}

/// The gateway's config: a DNS listener for the agents, and `allow_cidrs` covering only the
/// allowed name's server, so the probes' target (ATTACKER) is not reachable by policy.
fn config(dir: &std::path::Path, topo: &Topology) -> std::path::PathBuf {
    let cfg = write_config(
        dir,
        topo,
        &format!("\"{GW_AGENT_SIDE}:15001\""),
        "redirect",
        false,
    );
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace(
            "[listen]\n",
            &format!("[listen]\ndns = [\"{GW_AGENT_SIDE}:53\"]\n"),
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("rules/agents/coder-1.toml"),
        format!(
            "name = \"coder-1\"\nsources = [\"{AGENT_IP}/32\", \"fd66::11/128\"]\n\
             allow = [\"{ALLOWED}\"]\nallow_cidrs = [\"{INTERNET}/32\"]\n"
        ),
    )
    .unwrap();
    cfg
}

/// One parsed line of the table.
#[derive(Debug, Clone)]
struct Row {
    path: String,
    tried: String,
    result: String,
    detail: String,
}

struct Report {
    code: i32,
    rows: Vec<Row>,
    text: String,
}

impl Report {
    /// The row for `path` whose TRIED column contains `tried`.
    fn row(&self, path: &str, tried: &str) -> &Row {
        self.rows
            .iter()
            .find(|r| r.path == path && r.tried.contains(tried))
            .unwrap_or_else(|| panic!("no row {path} / {tried} in\n{}", self.text))
    }

    fn assert_row(&self, path: &str, tried: &str, result: &str, detail: &str) {
        let r = self.row(path, tried);
        assert_eq!(r.result, result, "{path} {tried}:\n{}", self.text);
        assert!(
            r.detail.contains(detail),
            "{path} {tried}: detail {:?} lacks {detail:?}\n{}",
            r.detail,
            self.text
        );
    }
}

/// Run `portcullis selftest ARGS` in the agent namespace; parse the table by its header's
/// column offsets.
async fn selftest(topo: &Topology, args: &str) -> Report {
    let started = std::time::Instant::now();
    let out = run(in_ns(
        &topo.agent_ns,
        &format!(
            "{BIN} selftest --allowed-name {ALLOWED} --denied-name {DENIED} \
             --probe-v4 {ATTACKER} --probe-v6 {INTERNET6} --outside-resolver {ATTACKER} \
             --timeout 2s {args}"
        ),
    ))
    .await;
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Every probe runs at once: at most ~3 timeouts (resolve, connect, read), not the sum.
    assert!(
        took < Duration::from_secs(8),
        "selftest took {took:?}:\n{text}"
    );
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_else(|| panic!("no table: {stderr}"));
    let col = |name: &str| header.find(name).unwrap_or_else(|| panic!("{header}"));
    let (tried, result, detail) = (col("TRIED"), col("RESULT"), col("DETAIL"));
    let rows = lines
        .take_while(|l| !l.is_empty())
        .map(|l| Row {
            path: l[..tried].trim().to_owned(),
            tried: l[tried..result].trim().to_owned(),
            result: l[result..detail].trim().to_owned(),
            detail: l[detail..].trim().to_owned(),
        })
        .collect();
    Report {
        code: out.status.code().unwrap_or(-1),
        rows,
        text: format!("{text}{stderr}"),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// With the portcullis ruleset applied and the gateway running: every path closed, the
/// allowed name works, exit 0, in explicit and in transparent mode; nothing reached the
/// probed servers. Then the gateway stops (ruleset still there): exit 3.
#[test]
fn selftest_behind_the_ruleset_reports_every_path_closed() {
    let topo = Topology::new();
    // Dropped before the topology: the servers' sockets close before the next test builds
    // the same addresses.
    let rt = runtime();
    rt.block_on(async {
        let net = Internet::start().await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), &topo);
        let gw = start_gateway(&topo, BIN, &cfg, dir.path()).await;

        let r = selftest(
            &topo,
            &format!("--proxy {PROXY} --resolver {GW_AGENT_SIDE}"),
        )
        .await;
        assert_eq!(r.code, 0, "{}", r.text);
        let a = ATTACKER;
        // Ports 443 and 80 are diverted to the transparent listener, which refuses a hello
        // without SNI with a TLS access_denied alert and a request to an IP literal with
        // its HTTP refusal.
        r.assert_row(
            "direct-ip",
            &format!("{a}:443"),
            "closed",
            "denied by the gateway: TLS alert access_denied",
        );
        r.assert_row(
            "direct-ip",
            &format!("{a}:80"),
            "closed",
            "denied by the gateway: HTTP 403 ip_literal",
        );
        gw.line_where(|l| l["event.reason"] == "no_sni" && l["source.ip"] == AGENT_IP)
            .await;
        for port in [22, 25, 8080] {
            r.assert_row(
                "other-port",
                &format!("{a}:{port}"),
                "closed",
                "no answer to the SYN",
            );
        }
        r.assert_row("quic", &format!("{a}:443"), "closed", "no reply in 2s");
        r.assert_row("ipv6", "tcp [fd99::10]:443", "closed", "");
        r.assert_row("ipv6", "udp [fd99::10]:443", "closed", "");
        // All agent DNS is redirected to the filtering forwarder, which refuses the name
        // and says why (EDE).
        let ede = "NXDOMAIN (EDE 15 Blocked: \"portcullis: not_allowed for coder-1\")";
        r.assert_row("outside-dns", &format!("udp {a}:53"), "closed", ede);
        r.assert_row("outside-dns", &format!("tcp {a}:53"), "closed", ede);
        r.assert_row("dns-exfil", &format!(".{DENIED}"), "closed", ede);
        for doh in ["dns.google", "cloudflare-dns.com"] {
            r.assert_row("doh", doh, "closed", "403 not_allowed");
        }
        r.assert_row("denied-name", DENIED, "closed", "403 not_allowed");
        r.assert_row("gateway-dns", ALLOWED, "ok", INTERNET);
        r.assert_row(
            "allowed-name",
            ALLOWED,
            "ok",
            &format!("banner from {INTERNET}:443"),
        );
        assert!(
            r.text
                .contains("summary: 0 open, 14 closed, 0 inconclusive; gateway checks 2 ok"),
            "{}",
            r.text
        );

        // Transparent mode: the names go to an address as TLS, the interception decides.
        let t = selftest(&topo, &format!("--resolver {GW_AGENT_SIDE}")).await;
        assert_eq!(t.code, 0, "{}", t.text);
        for name in ["dns.google", "cloudflare-dns.com", DENIED] {
            let path = if name == DENIED { "denied-name" } else { "doh" };
            t.assert_row(
                path,
                &format!("SNI {name}"),
                "closed",
                "denied by the gateway: TLS alert access_denied",
            );
        }
        t.assert_row(
            "allowed-name",
            &format!("resolved via {GW_AGENT_SIDE}:53"),
            "ok",
            &format!("banner from {INTERNET}:443"),
        );

        // From the servers' side: nothing of the probes got out, the allowed name did.
        assert_eq!(
            net.attacker_connections(),
            0,
            "a probe reached the attacker"
        );
        assert_eq!(
            net.attacker_datagrams(),
            0,
            "a datagram reached the attacker"
        );
        assert!(
            net.outside_dns.names().is_empty(),
            "the outside resolver was asked {:?}",
            net.outside_dns.names()
        );
        let upstream = net.upstream_dns.names();
        assert!(
            !upstream.iter().any(|n| n.contains(DENIED)),
            "the gateway forwarded a denied name upstream: {upstream:?}"
        );
        assert!(upstream.contains(&format!("{ALLOWED}.")), "{upstream:?}");
        assert!(net.allowed.count() >= 2, "the allowed name was not reached");
        assert!(
            net.allowed.text().contains(ALLOWED),
            "the allowed server did not get the hello with its SNI"
        );

        // The gateway down, its ruleset still applied: nothing works, nothing is open.
        drop(gw);
        let d = selftest(
            &topo,
            &format!("--proxy {PROXY} --resolver {GW_AGENT_SIDE}"),
        )
        .await;
        assert_eq!(d.code, 3, "{}", d.text);
        assert!(d.rows.iter().all(|r| r.result != "OPEN"), "{}", d.text);
        d.assert_row("gateway-dns", ALLOWED, "FAILED", "");
        d.assert_row("allowed-name", ALLOWED, "FAILED", "no proxy");
        assert!(d.text.contains("GATEWAY NOT WORKING"), "{}", d.text);
        assert_eq!(net.attacker_connections(), 0);
    });
    drop(rt);
}

/// Without the ruleset (the gateway routes agent traffic like any router, portcullis still
/// running): selftest reports the open paths and exits 1, and the servers confirm each.
#[test]
fn selftest_without_the_ruleset_reports_the_open_paths() {
    let topo = Topology::new();
    let rt = runtime();
    rt.block_on(async {
        let net = Internet::start().await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), &topo);
        let _gw = start_gateway(&topo, BIN, &cfg, dir.path()).await;
        let removed = run(in_ns(&topo.gw_ns, "nft delete table inet portcullis")).await;
        assert!(removed.status.success(), "{removed:?}");
        // Fresh veths: the gateway's first neighbour discovery towards the internet can take
        // a second or two. Wait (bounded) until the agent's IPv6 is routed at all, so the
        // IPv6 rows below measure the missing ruleset, not a warming link.
        let warm = run(in_ns(
            &topo.agent_ns,
            &format!("for i in 1 2 3 4 5 6 7 8 9 10; do ping -6 -c 1 -W 1 {INTERNET6} >/dev/null && exit 0; done; exit 1"),
        ))
        .await;
        assert!(warm.status.success(), "agent IPv6 never routed through the gateway");

        let r = selftest(
            &topo,
            &format!("--proxy {PROXY} --resolver {GW_AGENT_SIDE}"),
        )
        .await;
        assert_eq!(r.code, 1, "{}", r.text);
        let a = ATTACKER;
        for port in [443, 80] {
            r.assert_row(
                "direct-ip",
                &format!("{a}:{port}"),
                "OPEN",
                &format!("banner from {a}:{port}"),
            );
        }
        for port in [22, 25, 8080] {
            r.assert_row(
                "other-port",
                &format!("{a}:{port}"),
                "OPEN",
                &format!("banner from {a}:{port}"),
            );
            assert!(
                net.port(port).text().contains("GET / HTTP/1.1"),
                "port {port} did not get the probe"
            );
        }
        // The echo returns the probe itself, not a version negotiation: any reply is open.
        r.assert_row("quic", &format!("udp {a}:443"), "OPEN", "1200 bytes");
        r.assert_row(
            "ipv6",
            "tcp [fd99::10]:443",
            "OPEN",
            "banner from [fd99::10]:443",
        );
        r.assert_row("ipv6", "udp [fd99::10]:443", "OPEN", "came back");
        r.assert_row(
            "outside-dns",
            &format!("udp {a}:53"),
            "OPEN",
            &format!("answered {DENIED}: NOERROR"),
        );
        r.assert_row("outside-dns", &format!("tcp {a}:53"), "OPEN", a);
        // The gateway itself still refuses what it is asked.
        r.assert_row("dns-exfil", DENIED, "closed", "NXDOMAIN (EDE 15 Blocked");
        r.assert_row("doh", "dns.google", "closed", "403 not_allowed");
        r.assert_row("denied-name", DENIED, "closed", "403 not_allowed");
        r.assert_row("allowed-name", ALLOWED, "ok", "");
        assert!(r.text.contains("ESCAPE PATHS OPEN"), "{}", r.text);
        assert!(net.port(443).count() >= 1 && net.v6_tcp443.count() >= 1);
        assert!(net.attacker_datagrams() >= 2);
        assert_eq!(
            net.outside_dns
                .names()
                .iter()
                .filter(|n| *n == &format!("{DENIED}."))
                .count(),
            2,
            "UDP and TCP queries reached the outside resolver"
        );

        // An agent that uses an outside resolver, transparently: the exfiltration label
        // is answered (and arrives outside), DoH and the denied name go straight out.
        let t = selftest(&topo, &format!("--resolver {a}")).await;
        assert_eq!(t.code, 1, "{}", t.text);
        let exfil = t.row("dns-exfil", DENIED).clone();
        assert_eq!(exfil.result, "OPEN", "{}", t.text);
        let label = exfil.tried.rsplit(' ').next().unwrap().to_ascii_lowercase();
        assert!(
            net.outside_dns.names().contains(&format!("{label}.")),
            "{label} not seen outside: {:?}",
            net.outside_dns.names()
        );
        t.assert_row(
            "doh",
            "SNI dns.google",
            "OPEN",
            &format!("banner from {a}:443"),
        );
        t.assert_row(
            "denied-name",
            DENIED,
            "OPEN",
            &format!("banner from {a}:443"),
        );
        t.assert_row("gateway-dns", ALLOWED, "ok", a);
    });
    drop(rt);
}
