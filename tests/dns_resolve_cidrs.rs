//! The DNS forwarder's rebinding filter keeps answers inside the agent's `resolve_cidrs`
//! (what transparent-mode agents resolve through), and still removes every other special
//! address, IPv6 forms that carry an address of the range included (docs/addresses.md).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::net::UdpSocket;

/// An upstream that answers every A/AAAA question from `zone` (owner, address).
async fn upstream(zone: &'static [(&'static str, &'static str)]) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let Some(q) = query.queries.first().cloned() else {
                continue;
            };
            let mut resp = Message::response(query.metadata.id, query.metadata.op_code);
            resp.metadata.recursion_desired = query.metadata.recursion_desired;
            resp.metadata.recursion_available = true;
            resp.queries.push(q.clone());
            let owner = q.name().to_ascii().to_ascii_lowercase();
            for (name, ip) in zone.iter().filter(|(name, _)| *name == owner) {
                let data = match ip.parse::<IpAddr>().unwrap() {
                    IpAddr::V4(v4) if q.query_type() == RecordType::A => RData::A(A(v4)),
                    IpAddr::V6(v6) if q.query_type() == RecordType::AAAA => RData::AAAA(AAAA(v6)),
                    _ => continue,
                };
                resp.answers.push(Record::from_rdata(
                    Name::from_ascii(name).unwrap(),
                    300,
                    data,
                ));
            }
            if let Ok(bytes) = resp.to_vec() {
                let _ = socket.send_to(&bytes, from).await;
            }
        }
    });
    addr
}

/// The addresses answered to `from` (an agent's source on loopback).
async fn ask(server: SocketAddr, from: &str, qname: &str, rtype: RecordType) -> Vec<IpAddr> {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(qname).unwrap(), rtype));
    let socket = UdpSocket::bind((from, 0)).await.unwrap();
    socket.send_to(&m.to_vec().unwrap(), server).await.unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
        .await
        .expect("the forwarder answers within 5 s")
        .unwrap();
    Message::from_vec(&buf[..n])
        .unwrap()
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

const ZONE: &[(&str, &str)] = &[
    ("mirror.corp.test.", "10.1.2.3"),
    ("mirror.corp.test.", "10.1.3.1"),
    ("mirror.corp.test.", "93.184.216.34"),
    ("mirror.corp.test.", "fd00:1::5"),
    ("mirror.corp.test.", "::ffff:0:10.1.2.3"),
    ("mirror.corp.test.", "64:ff9b::10.1.2.3"),
    ("mirror.corp.test.", "2606:2800:220:1::1"),
    ("other.corp.test.", "10.1.2.3"),
];

#[tokio::test]
async fn answers_inside_resolve_cidrs_are_kept_and_other_special_ones_removed() {
    let upstream = upstream(ZONE).await;
    let agents = [
        (
            "coder-1",
            "name = \"coder-1\"\nsources = [\"127.0.0.1/32\"]\nallow = [\"mirror.corp.test\"]\nresolve_cidrs = [\"10.1.2.0/24\", \"fd00:1::/64\"]\n",
        ),
        (
            "coder-2",
            "name = \"coder-2\"\nsources = [\"127.0.0.2/32\"]\nallow = [\"other.corp.test\"]\n",
        ),
    ];
    let gw = gateway_with(&agents, &[], localhost_resolver(&[]), |c, _| {
        c.listen.dns = vec!["127.0.0.1:0".parse().unwrap()];
        c.resolver.upstreams = vec![upstream];
        c.resolver.timeout = Duration::from_millis(600);
    })
    .await;
    let dns = gw.running.as_ref().unwrap().dns_addrs[0];
    let ips = |v: &[&str]| {
        v.iter()
            .map(|s| s.parse().unwrap())
            .collect::<Vec<IpAddr>>()
    };
    assert_eq!(
        ask(dns, "127.0.0.1", "mirror.corp.test.", RecordType::A).await,
        ips(&["10.1.2.3", "93.184.216.34"])
    );
    // The embedded forms of 10.1.2.3 are other (IPv6) destinations: removed.
    assert_eq!(
        ask(dns, "127.0.0.1", "mirror.corp.test.", RecordType::AAAA).await,
        ips(&["fd00:1::5", "2606:2800:220:1::1"])
    );
    // An agent without resolve_cidrs: the same private address is removed.
    assert_eq!(
        ask(dns, "127.0.0.2", "other.corp.test.", RecordType::A).await,
        ips(&[])
    );
    gw.stop().await;
}
