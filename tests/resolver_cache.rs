//! The proxy's resolver reuses answers within their TTL: a burst of connections to one
//! name costs one upstream question per record type, not one per connection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::netns::dns_server;
use hickory_proto::rr::RecordType;
use portcullis::proxy::upstream::{DnsResolver, Resolve};

/// An address on `ip` whose port is free for both TCP and UDP (the test server binds both);
/// each test uses its own loopback address, so they cannot collide.
fn free_addr(ip: &str) -> std::net::SocketAddr {
    for _ in 0..50 {
        let tcp = std::net::TcpListener::bind((ip, 0)).unwrap();
        let addr = tcp.local_addr().unwrap();
        if std::net::UdpSocket::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no port free for both TCP and UDP on {ip}");
}

#[tokio::test]
async fn answers_are_cached_for_their_ttl() {
    let addr = free_addr("127.0.0.1");
    let log = dns_server(addr, &[("cached.test", "192.0.2.7")]).await;
    let resolver = DnsResolver::new(&[addr], Duration::from_secs(2)).unwrap();
    for _ in 0..20 {
        let got = resolver.lookup("cached.test").await.unwrap();
        assert_eq!(got, vec!["192.0.2.7".parse::<std::net::IpAddr>().unwrap()]);
    }
    let asked = log.0.lock().unwrap().clone();
    let a = asked.iter().filter(|(_, t)| *t == RecordType::A).count();
    assert_eq!(a, 1, "A asked {a} times for 20 lookups: {asked:?}");
    // A name with an IPv4 address costs no AAAA question at all.
    let aaaa = asked.iter().filter(|(_, t)| *t == RecordType::AAAA).count();
    assert_eq!(aaaa, 0, "AAAA asked {aaaa} times: {asked:?}");
}

/// An IPv6-only name is still found (AAAA after an empty A), and the empty A answer (no
/// SOA) is reused for a while instead of asked again per connection.
#[tokio::test]
async fn ipv6_only_names_resolve_and_empty_answers_are_reused() {
    let addr = free_addr("127.0.0.3");
    let log = dns_server(addr, &[("v6only.test", "2001:db8::7")]).await;
    let resolver = DnsResolver::new(&[addr], Duration::from_secs(2)).unwrap();
    for _ in 0..10 {
        let got = resolver.lookup("v6only.test").await.unwrap();
        assert_eq!(
            got,
            vec!["2001:db8::7".parse::<std::net::IpAddr>().unwrap()]
        );
    }
    let asked = log.0.lock().unwrap().clone();
    let a = asked.iter().filter(|(_, t)| *t == RecordType::A).count();
    assert!(a <= 1, "empty A asked {a} times for 10 lookups: {asked:?}");
}
