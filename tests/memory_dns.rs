//! Memory under adversarial DNS answers: an agent whose allowed wildcard is served by DNS
//! it controls makes every name answer with 3,000 addresses. Both caches (the forwarder's
//! and the proxy's resolver's) are bounded in bytes and keep at most 32 addresses a name, so
//! 300 such names, asked through the forwarder and through the explicit proxy, raise the
//! real binary's RSS by less than `RSS_BOUND` (docs/memory.md). Without the bounds the two
//! caches held every record: hundreds of megabytes for the same 300 names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NAMES: usize = 300;
const RECORDS: u16 = 3_000;
/// The documented bound for this test: `dns.cache_bytes` (8 MiB) + the proxy's name cache
/// for 300 names (< 1 MiB) + the allocator's slack for transient parsing, in a debug build.
const RSS_BOUND: usize = 24 * 1024 * 1024;

fn rss_bytes(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .expect("VmRSS")
        * 1024
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// 3,000 A records in 10.0.0.0/8 (special: the proxy never dials them, so nothing leaves
/// this machine) for any A question.
fn huge_answer(q: &Message) -> Message {
    let question = q.queries[0].clone();
    let mut resp = Message::response(q.metadata.id, q.metadata.op_code);
    resp.metadata.recursion_available = true;
    resp.metadata.recursion_desired = q.metadata.recursion_desired;
    resp.queries.push(question.clone());
    if question.query_type() == RecordType::A {
        for i in 0..RECORDS {
            resp.answers.push(Record::from_rdata(
                question.name().clone(),
                86_400,
                RData::A(A(Ipv4Addr::new(10, 7, (i >> 8) as u8, i as u8))),
            ));
        }
    }
    resp
}

/// [`huge_answer`] on the wire with every owner name a pointer to the question's (16 bytes
/// a record, as a real server sends it): 3,000 records fit one TCP message.
fn compressed_answer(q: &Message) -> Vec<u8> {
    let question = q.queries[0].clone();
    let mut head = Message::response(q.metadata.id, q.metadata.op_code);
    head.metadata.recursion_available = true;
    head.metadata.recursion_desired = q.metadata.recursion_desired;
    head.queries.push(question.clone());
    let mut out = head.to_vec().unwrap();
    if question.query_type() != RecordType::A {
        return out;
    }
    // ANCOUNT is bytes 6..8; the question's name starts at offset 12 (pointer 0xC00C).
    out[6..8].copy_from_slice(&RECORDS.to_be_bytes());
    for i in 0..RECORDS {
        out.extend_from_slice(&[0xC0, 0x0C, 0, 1, 0, 1]);
        out.extend_from_slice(&86_400u32.to_be_bytes());
        out.extend_from_slice(&[0, 4, 10, 7, (i >> 8) as u8, i as u8]);
    }
    out
}

/// The agent's DNS: over UDP only the header and question with TC set (the answer does not
/// fit), over TCP the whole answer.
async fn adversarial_dns() -> SocketAddr {
    // UDP and TCP on one port: a few tries, as the TCP port may be taken.
    let mut bound = None;
    for _ in 0..16 {
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        if let Ok(tcp) = tokio::net::TcpListener::bind(addr).await {
            bound = Some((udp, addr, tcp));
            break;
        }
    }
    let (udp, addr, tcp) = bound.expect("a port free for UDP and TCP");
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            if q.queries.is_empty() {
                continue;
            }
            let mut resp = huge_answer(&q);
            resp.answers.clear();
            resp.metadata.truncation = true;
            let _ = udp.send_to(&resp.to_vec().unwrap(), from).await;
        }
    });
    tokio::spawn(async move {
        while let Ok((mut s, _)) = tcp.accept().await {
            tokio::spawn(async move {
                loop {
                    let mut len = [0u8; 2];
                    if s.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                    if s.read_exact(&mut q).await.is_err() {
                        return;
                    }
                    let Ok(q) = Message::from_vec(&q) else { return };
                    if q.queries.is_empty() {
                        return;
                    }
                    let bytes = compressed_answer(&q);
                    assert!(
                        bytes.len() <= 65_535,
                        "{} bytes do not fit a TCP DNS message",
                        bytes.len()
                    );
                    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&bytes);
                    if s.write_all(&framed).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn ask(server: SocketAddr, name: &str) -> Message {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let mut e = Edns::new();
    e.set_max_payload(1232);
    m.set_edns(e);
    socket.send_to(&m.to_vec().unwrap(), server).await.unwrap();
    let mut buf = [0u8; 65_535];
    let (n, _) = tokio::time::timeout(Duration::from_secs(10), socket.recv_from(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    Message::from_vec(&buf[..n]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_names_of_three_thousand_records_stay_within_the_bound() {
    let upstream = adversarial_dns().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rules/agents")).unwrap();
    std::fs::write(
        dir.path().join("rules/agents/coder-1.toml"),
        "name = \"coder-1\"\nsources = [\"127.0.0.0/8\"]\nallow = [\".adv.test\"]\n",
    )
    .unwrap();
    let (proxy_port, admin_port, dns_port) = (free_port(), free_port(), free_port());
    let cfg = dir.path().join("portcullis.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"rules_dir = "rules"
state_dir = "state"
[listen]
explicit = "127.0.0.1:{proxy_port}"
admin = "127.0.0.1:{admin_port}"
dns = ["127.0.0.1:{dns_port}"]
[log]
destination = "connections.log"
[resolver]
upstreams = ["{upstream}"]
timeout_ms = 5000
[dns]
queries_per_second = 10000
"#
        ),
    )
    .unwrap();
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["--config", cfg.to_str().unwrap(), "run"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    let proxy: SocketAddr = format!("127.0.0.1:{proxy_port}").parse().unwrap();
    let dns: SocketAddr = format!("127.0.0.1:{dns_port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(proxy).await.is_err() {
        assert!(Instant::now() < deadline, "the gateway did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Warm up both paths (runtime, allocator arenas, hickory's TCP machinery).
    for i in 0..20 {
        ask(dns, &format!("warm{i}.adv.test.")).await;
        let _ = open_tunnel(proxy, &format!("warm{i}.adv.test"), 443).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_bytes(pid);
    for i in 0..NAMES {
        let name = format!("n{i}.adv.test");
        let answer = ask(dns, &format!("{name}.")).await;
        assert_eq!(
            answer.metadata.response_code,
            hickory_proto::op::ResponseCode::NoError
        );
        // Every address is private (and so dropped for the agent), but the question was
        // answered: the upstream's whole answer went through the cache.
        assert!(answer.answers.is_empty(), "{answer:?}");
        let refused = open_tunnel(proxy, &name, 443).await.unwrap_err();
        assert!(
            refused.contains("private_address"),
            "{refused}\n{}",
            std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default()
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = rss_bytes(pid);
    let grew = after.saturating_sub(before);
    println!(
        "{NAMES} names x {RECORDS} records: RSS {} KiB -> {} KiB (+{} KiB, bound {} KiB)",
        before / 1024,
        after / 1024,
        grew / 1024,
        RSS_BOUND / 1024
    );
    assert!(child.0.try_wait().unwrap().is_none(), "the gateway died");
    assert!(grew < RSS_BOUND, "RSS grew {grew} B, bound {RSS_BOUND} B");
}
