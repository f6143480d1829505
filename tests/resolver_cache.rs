//! The proxy's resolver reuses answers within their TTL: a burst of connections to one
//! name costs one upstream question per record type, not one per connection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::netns::dns_server;
use hickory_proto::rr::RecordType;
use portcullis::proxy::upstream::{DnsResolver, Resolve};

#[tokio::test]
async fn answers_are_cached_for_their_ttl() {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let log = dns_server(addr, &[("cached.test", "192.0.2.7")]).await;
    let resolver = DnsResolver::new(&[addr], Duration::from_secs(2)).unwrap();
    for _ in 0..20 {
        let got = resolver.lookup("cached.test").await.unwrap();
        assert_eq!(got, vec!["192.0.2.7".parse::<std::net::IpAddr>().unwrap()]);
    }
    let asked = log.0.lock().unwrap().clone();
    let a = asked.iter().filter(|(_, t)| *t == RecordType::A).count();
    assert_eq!(a, 1, "A asked {a} times for 20 lookups: {asked:?}");
    // The server has no IPv6 address for the name (an empty answer, no SOA): that too is
    // reused for a while, not asked again per connection.
    let aaaa = asked.iter().filter(|(_, t)| *t == RecordType::AAAA).count();
    assert!(
        aaaa <= 1,
        "AAAA asked {aaaa} times for 20 lookups: {asked:?}"
    );
}
