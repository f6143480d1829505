//! The DNS forwarder over real sockets (port 0): an in-process gateway with `listen.dns`,
//! a recording upstream DNS server, and hickory-proto messages as the agent's queries.
//! "Never reached the upstream" is proven from the upstream's own log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::rdata::opt::EdnsOption;
use hickory_proto::rr::rdata::svcb::{
    Alpn, EchConfigList, IpHint, SVCB, SvcParamKey, SvcParamValue,
};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, HTTPS, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use portcullis::config::Config;
use portcullis::killswitch::webhook::{Secret, sign};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const AGENT: &str = r#"
name = "coder-1"
sources = ["127.0.0.1/32"]
allow = [".allowed.test", "alias.test", "ech.test", "rebind.test"]
allow_cidrs = ["10.9.9.9/32:8443"]
"#;

const PUBLIC_V4: Ipv4Addr = Ipv4Addr::new(93, 184, 216, 34);

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

fn a(owner: &str, ip: &str) -> Record {
    Record::from_rdata(name(owner), 300, RData::A(A(ip.parse().unwrap())))
}

fn aaaa(owner: &str, ip: &str) -> Record {
    Record::from_rdata(name(owner), 300, RData::AAAA(AAAA(ip.parse().unwrap())))
}

fn cname(owner: &str, target: &str) -> Record {
    Record::from_rdata(name(owner), 300, RData::CNAME(CNAME(name(target))))
}

/// The SOA of the upstream's zone, `test.`: negative answers carry it, `minimum` = TTL.
fn soa(ttl: u32) -> Record {
    Record::from_rdata(
        name("test."),
        ttl,
        RData::SOA(SOA::new(
            name("ns.test."),
            name("hostmaster.test."),
            1,
            3600,
            600,
            86_400,
            ttl,
        )),
    )
}

/// The reply's Extended DNS Errors (RFC 8914, EDNS option 15): info-code and text.
fn ede(m: &Message) -> Vec<(u16, String)> {
    let Some(edns) = &m.edns else {
        return Vec::new();
    };
    edns.options()
        .options
        .iter()
        .filter_map(|(code, option)| match option {
            EdnsOption::Unknown(15, data) if u16::from(*code) == 15 && data.len() >= 2 => Some((
                u16::from_be_bytes([data[0], data[1]]),
                String::from_utf8(data[2..].to_vec()).unwrap(),
            )),
            _ => None,
        })
        .collect()
}

/// The upstream's zone for every test.
fn zone() -> Vec<Record> {
    let mut z = vec![
        a("www.allowed.test.", "93.184.216.34"),
        aaaa("www.allowed.test.", "2606:2800:220:1::1"),
        Record::from_rdata(
            name("www.allowed.test."),
            300,
            RData::TXT(TXT::new(vec!["hello".into()])),
        ),
        cname("alias.test.", "mid.cdn.example."),
        cname("mid.cdn.example.", "edge.cdn.example."),
        a("edge.cdn.example.", "93.184.216.35"),
        a("rebind.test.", "127.0.0.1"),
        a("rebind.test.", "10.1.2.3"),
        a("rebind.test.", "169.254.169.254"),
        a("rebind.test.", "93.184.216.36"),
        aaaa("rebind.test.", "::1"),
        aaaa("rebind.test.", "::ffff:10.0.0.1"),
        a("metadata.allowed.test.", "169.254.169.254"),
        a("covered.allowed.test.", "10.9.9.9"),
        Record::from_rdata(
            name("ech.test."),
            300,
            RData::HTTPS(HTTPS(SVCB::new(
                1,
                name("."),
                vec![
                    (
                        SvcParamKey::Alpn,
                        SvcParamValue::Alpn(Alpn(vec!["h2".into()])),
                    ),
                    (
                        SvcParamKey::Ipv4Hint,
                        SvcParamValue::Ipv4Hint(IpHint(vec![A(Ipv4Addr::LOCALHOST), A(PUBLIC_V4)])),
                    ),
                    (
                        SvcParamKey::EchConfigList,
                        SvcParamValue::EchConfigList(EchConfigList(vec![0xfe, 0x0d, 0, 1, 2])),
                    ),
                ],
            ))),
        ),
    ];
    // Too many addresses for a 512-byte UDP reply.
    for i in 1..=40 {
        z.push(a("big.allowed.test.", &format!("93.184.217.{i}")));
    }
    z
}

/// Every question the upstream received: (lowercase name with trailing dot, type).
#[derive(Clone, Default)]
struct Asked(Arc<Mutex<Vec<(String, RecordType)>>>);

impl Asked {
    fn all(&self) -> Vec<(String, RecordType)> {
        self.0.lock().unwrap().clone()
    }
    fn count(&self, name: &str) -> usize {
        self.all().iter().filter(|(n, _)| n == name).count()
    }
}

/// A recursive-resolver stand-in on UDP: follows CNAME chains within `zone` and returns
/// the whole chain; names in `silent` are recorded and never answered.
async fn upstream(zone: Vec<Record>, silent: &'static [&'static str]) -> (SocketAddr, Asked) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let asked = Asked::default();
    let log = asked.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                return;
            };
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let Some(q) = query.queries.first().cloned() else {
                continue;
            };
            let qname = q.name().to_ascii().to_ascii_lowercase();
            log.0.lock().unwrap().push((qname.clone(), q.query_type()));
            if silent.contains(&qname.as_str()) {
                continue;
            }
            let mut resp = Message::response(query.metadata.id, query.metadata.op_code);
            resp.metadata.recursion_desired = query.metadata.recursion_desired;
            resp.metadata.recursion_available = true;
            resp.queries.push(q.clone());
            if let Some(e) = &query.edns {
                let mut edns = Edns::new();
                edns.set_max_payload(e.max_payload());
                resp.edns = Some(edns);
            }
            let mut owner = q.name().to_lowercase();
            let mut exists = false;
            for _ in 0..8 {
                let here: Vec<&Record> = zone.iter().filter(|r| r.name == owner).collect();
                exists |= !here.is_empty();
                let matching: Vec<Record> = here
                    .iter()
                    .filter(|r| r.record_type() == q.query_type())
                    .map(|r| (*r).clone())
                    .collect();
                if !matching.is_empty() {
                    resp.answers.extend(matching);
                    break;
                }
                match here.iter().find_map(|r| match &r.data {
                    RData::CNAME(c) => Some((*r).clone()).zip(Some(c.0.clone())),
                    _ => None,
                }) {
                    Some((rec, target)) => {
                        resp.answers.push(rec);
                        owner = target;
                    }
                    None => break,
                }
            }
            if !exists {
                resp.metadata.response_code = ResponseCode::NXDomain;
            }
            if resp.answers.is_empty() {
                // A negative answer (NXDOMAIN or NODATA) names its zone's SOA (RFC 2308).
                resp.authorities.push(soa(60));
            }
            if let Ok(bytes) = resp.to_vec() {
                let _ = socket.send_to(&bytes, from).await;
            }
        }
    });
    (addr, asked)
}

struct Dns {
    gw: TestGateway,
    addr: SocketAddr,
    asked: Asked,
}

async fn start(tweak: impl FnOnce(&mut Config, &Path)) -> Dns {
    start_with(AGENT, tweak).await
}

async fn start_with(agent: &str, tweak: impl FnOnce(&mut Config, &Path)) -> Dns {
    let (upstream_addr, asked) = upstream(zone(), &["slow.allowed.test."]).await;
    let gw = gateway_with(
        &[("coder-1", agent)],
        &[],
        localhost_resolver(&[]),
        |c, dir| {
            c.listen.dns = vec!["127.0.0.1:0".parse().unwrap()];
            c.resolver.upstreams = vec![upstream_addr];
            c.resolver.timeout = Duration::from_millis(600);
            c.dns.queries_per_second = 100_000;
            tweak(c, dir);
        },
    )
    .await;
    let addr = gw.running.as_ref().unwrap().dns_addrs[0];
    Dns { gw, addr, asked }
}

fn query(qname: &str, rtype: RecordType, edns: bool) -> Message {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name(qname), rtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m
}

/// One UDP exchange from `from` (an address on loopback).
async fn ask_udp_from(server: SocketAddr, from: IpAddr, m: &Message) -> Message {
    let socket = UdpSocket::bind(SocketAddr::new(from, 0)).await.unwrap();
    socket.send_to(&m.to_vec().unwrap(), server).await.unwrap();
    let mut buf = [0u8; 65_535];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
        .await
        .expect("the forwarder answers within 5 s")
        .unwrap();
    let reply = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(reply.metadata.id, m.metadata.id);
    assert_eq!(reply.metadata.message_type, MessageType::Response);
    reply
}

async fn ask(server: SocketAddr, qname: &str, rtype: RecordType) -> Message {
    ask_udp_from(
        server,
        Ipv4Addr::LOCALHOST.into(),
        &query(qname, rtype, true),
    )
    .await
}

async fn ask_tcp(server: SocketAddr, m: &Message) -> Message {
    let mut s = TcpStream::connect(server).await.unwrap();
    let bytes = m.to_vec().unwrap();
    s.write_all(&(bytes.len() as u16).to_be_bytes())
        .await
        .unwrap();
    s.write_all(&bytes).await.unwrap();
    let mut len = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut len))
        .await
        .unwrap()
        .unwrap();
    let mut reply = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut reply).await.unwrap();
    Message::from_vec(&reply).unwrap()
}

fn addresses(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn allowed_names_resolve_including_cname_chains_over_udp_and_tcp() {
    let d = start(|_, _| {}).await;
    let r = ask(d.addr, "WWW.Allowed.Test.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addresses(&r), vec![IpAddr::V4(PUBLIC_V4)]);
    assert!(r.edns.is_some(), "a query with OPT gets an OPT back");
    let r = ask(d.addr, "www.allowed.test.", RecordType::AAAA).await;
    assert_eq!(
        addresses(&r),
        vec!["2606:2800:220:1::1".parse::<IpAddr>().unwrap()]
    );
    let r = ask_tcp(d.addr, &query("alias.test.", RecordType::A, false)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    let types: Vec<RecordType> = r.answers.iter().map(|r| r.record_type()).collect();
    assert_eq!(
        types,
        vec![RecordType::CNAME, RecordType::CNAME, RecordType::A]
    );
    assert_eq!(
        addresses(&r),
        vec!["93.184.216.35".parse::<IpAddr>().unwrap()]
    );
    // An allowed name that does not exist: the upstream's NXDOMAIN, passed on.
    let r = ask(d.addr, "nope.allowed.test.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    // The first query for a name is logged, with the ECS dns fields.
    let lines = d.gw.log_lines(4).await;
    let www = lines
        .iter()
        .find(|l| l["dns.question.name"] == "www.allowed.test" && l["dns.question.type"] == "A")
        .expect("sampled allow line");
    assert_eq!(www["event.action"], "allow");
    assert_eq!(www["portcullis.mode"], "dns");
    assert_eq!(www["dns.response_code"], "NOERROR");
    assert_eq!(www["agent.name"], "coder-1");
    d.gw.stop().await;
}

#[tokio::test]
async fn a_thousand_random_labels_under_a_denied_domain_never_reach_the_upstream() {
    let d = start(|_, _| {}).await;
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut label = |len: usize| -> String {
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[(seed % 36) as usize])
            })
            .collect()
    };
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = [0u8; 4096];
    for i in 0..1000 {
        let qname = format!("{}.{}.exfil.evil.test.", label(63), label(40));
        let rtype = if i % 2 == 0 {
            RecordType::A
        } else {
            RecordType::AAAA
        };
        let m = query(&qname, rtype, i % 3 == 0);
        socket.send_to(&m.to_vec().unwrap(), d.addr).await.unwrap();
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let r = Message::from_vec(&buf[..n]).unwrap();
        // NXDOMAIN by default, with the EDE when the query offered EDNS.
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain, "{qname}");
        assert!(r.answers.is_empty());
        assert_eq!(ede(&r).len(), usize::from(i % 3 == 0), "{qname}");
    }
    let lines = d.gw.log_lines(1000).await;
    let refused = lines
        .iter()
        .filter(|l| l["event.reason"] == "not_allowed" && l["dns.response_code"] == "NXDOMAIN")
        .count();
    assert_eq!(refused, 1000, "one log line per refused query");
    // The upstream works (an allowed name reaches it) and saw none of the 1,000.
    ask(d.addr, "www.allowed.test.", RecordType::A).await;
    assert_eq!(
        d.asked.all(),
        vec![("www.allowed.test.".into(), RecordType::A)]
    );
    d.gw.stop().await;
}

#[tokio::test]
async fn other_types_are_refused_even_for_allowed_names() {
    let d = start(|_, _| {}).await;
    for rtype in [
        RecordType::TXT,
        RecordType::ANY,
        RecordType::MX,
        RecordType::NULL,
        RecordType::AXFR,
    ] {
        let r = ask(d.addr, "www.allowed.test.", rtype).await;
        assert_eq!(r.metadata.response_code, ResponseCode::Refused, "{rtype}");
    }
    assert!(d.asked.all().is_empty(), "{:?}", d.asked.all());
    let lines = d.gw.log_lines(5).await;
    assert!(
        lines
            .iter()
            .any(|l| l["dns.question.type"] == "TXT" && l["event.reason"] == "not_allowed")
    );
    d.gw.stop().await;
}

#[tokio::test]
async fn refuse_with_refused_and_invalid_names() {
    let d = start(|c, _| c.dns.refuse_with_nxdomain = false).await;
    let r = ask(d.addr, "evil.test.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    assert_eq!(
        ede(&r),
        vec![(15, "portcullis: not_allowed for coder-1".to_owned())]
    );
    // Not a host name (IP literal in disguise): refused whatever refuse_with says.
    let r = ask(d.addr, "127.0.0.1.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    assert_eq!(
        ede(&r),
        vec![(0, "portcullis: malformed for coder-1".to_owned())]
    );
    assert!(d.asked.all().is_empty());
    d.gw.stop().await;
}

/// Every refusal says why in an Extended DNS Error (RFC 8914) when the query offered EDNS,
/// over UDP and TCP: 15 Blocked for the policy's refusals (name, type, every address
/// private), 18 Prohibited for a source that is no agent. The text names the reason and
/// only the asker's own agent name. Without OPT in the query, no OPT in the reply: the
/// rcode alone.
#[tokio::test]
async fn refusals_carry_an_extended_dns_error_when_the_query_has_edns() {
    let d = start(|_, _| {}).await;
    let blocked = |reason: &str| vec![(15, format!("portcullis: {reason} for coder-1"))];

    let r = ask(d.addr, "denied.example.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(ede(&r), blocked("not_allowed"));
    let r = ask_tcp(d.addr, &query("denied.example.", RecordType::AAAA, true)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(ede(&r), blocked("not_allowed"));

    // A type the policy refuses for an allowed name: REFUSED (an NXDOMAIN would deny the
    // name's other types too), blocked.
    let r = ask(d.addr, "www.allowed.test.", RecordType::TXT).await;
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    assert_eq!(ede(&r), blocked("not_allowed"));

    // Every address private: an empty NOERROR, blocked.
    let r = ask(d.addr, "metadata.allowed.test.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty());
    assert_eq!(ede(&r), blocked("private_address"));
    // Some addresses private, some not: an answer, no EDE.
    let r = ask(d.addr, "rebind.test.", RecordType::A).await;
    assert_eq!(addresses(&r).len(), 1);
    assert!(ede(&r).is_empty());

    // A source that is no agent: prohibited, and no agent named.
    let r = ask_udp_from(
        d.addr,
        "127.0.0.2".parse().unwrap(),
        &query("www.allowed.test.", RecordType::A, true),
    )
    .await;
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    assert_eq!(ede(&r), vec![(18, "portcullis: unknown_agent".to_owned())]);

    // No OPT in the query: the same rcode, no OPT (so no EDE) in the reply.
    for m in [
        query("denied.example.", RecordType::A, false),
        query("www.allowed.test.", RecordType::TXT, false),
    ] {
        let r = ask_udp_from(d.addr, Ipv4Addr::LOCALHOST.into(), &m).await;
        assert_ne!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.edns.is_none(), "{:?}", r.edns);
        let r = ask_tcp(d.addr, &m).await;
        assert!(r.edns.is_none(), "{:?}", r.edns);
    }
    // An allowed answer carries no EDE.
    let r = ask(d.addr, "www.allowed.test.", RecordType::A).await;
    assert!(!addresses(&r).is_empty());
    assert!(ede(&r).is_empty());
    assert!(
        !d.asked.all().iter().any(|(n, _)| n.contains("denied")),
        "{:?}",
        d.asked.all()
    );
    d.gw.stop().await;
}

/// NXDOMAIN and NODATA from the upstream keep its SOA in the authority section, so the
/// agent's own cache can keep the negative answer (RFC 2308); from the forwarder's cache
/// its TTL is aged like any record's.
#[tokio::test]
async fn negative_answers_keep_the_upstreams_soa() {
    let d = start(|_, _| {}).await;
    let soa_of = |m: &Message| -> Vec<(String, u32)> {
        m.authorities
            .iter()
            .filter(|r| r.record_type() == RecordType::SOA)
            .map(|r| (r.name.to_ascii(), r.ttl))
            .collect()
    };
    let r = ask(d.addr, "nope.allowed.test.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(soa_of(&r), vec![("test.".to_owned(), 60)]);
    assert!(ede(&r).is_empty(), "the upstream's NXDOMAIN is no refusal");
    // NODATA: the name exists, not with this type.
    let r = ask_tcp(
        d.addr,
        &query("www.allowed.test.", RecordType::HTTPS, false),
    )
    .await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty());
    assert_eq!(soa_of(&r), vec![("test.".to_owned(), 60)]);
    // Again, from the cache, a second later: the SOA's TTL has aged.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = ask(d.addr, "nope.allowed.test.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    let aged = soa_of(&r);
    assert_eq!(aged.len(), 1);
    assert!(aged[0].1 < 60, "{aged:?}");
    assert_eq!(
        d.asked.count("nope.allowed.test."),
        1,
        "{:?}",
        d.asked.all()
    );
    d.gw.stop().await;
}

#[tokio::test]
async fn private_addresses_in_answers_never_reach_the_agent() {
    let d = start(|_, _| {}).await;
    let r = ask(d.addr, "rebind.test.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        addresses(&r),
        vec!["93.184.216.36".parse::<IpAddr>().unwrap()]
    );
    // Only special addresses: an empty NOERROR, and a log line saying why.
    let r = ask(d.addr, "rebind.test.", RecordType::AAAA).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty(), "{:?}", r.answers);
    let r = ask(d.addr, "metadata.allowed.test.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty());
    // Served from the cache: filtered again.
    let r = ask_tcp(
        d.addr,
        &query("metadata.allowed.test.", RecordType::A, false),
    )
    .await;
    assert!(r.answers.is_empty());
    // A special address the agent's allow_cidrs cover is answered.
    let r = ask(d.addr, "covered.allowed.test.", RecordType::A).await;
    assert_eq!(addresses(&r), vec!["10.9.9.9".parse::<IpAddr>().unwrap()]);
    // 4 removals, then the sampled line of the covered name.
    let lines = d.gw.log_lines(5).await;
    let private: Vec<_> = lines
        .iter()
        .filter(|l| l["event.reason"] == "private_address")
        .collect();
    assert_eq!(private.len(), 4, "{lines:?}");
    d.gw.stop().await;
}

#[tokio::test]
async fn https_answers_lose_ech_and_private_hints() {
    let d = start(|_, _| {}).await;
    let r = ask(d.addr, "ech.test.", RecordType::HTTPS).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    let [record] = r.answers.as_slice() else {
        panic!("one HTTPS record expected: {:?}", r.answers)
    };
    let RData::HTTPS(h) = &record.data else {
        panic!("not HTTPS: {record:?}")
    };
    let keys: Vec<SvcParamKey> = h.0.svc_params.iter().map(|(k, _)| *k).collect();
    assert_eq!(keys, vec![SvcParamKey::Alpn, SvcParamKey::Ipv4Hint]);
    let SvcParamValue::Ipv4Hint(hint) = &h.0.svc_params[1].1 else {
        panic!()
    };
    assert_eq!(hint.0, vec![A(PUBLIC_V4)]);
    d.gw.stop().await;
}

#[tokio::test]
async fn unknown_sources_are_refused() {
    let d = start(|_, _| {}).await;
    let m = query("www.allowed.test.", RecordType::A, true);
    let r = ask_udp_from(d.addr, "127.0.0.2".parse().unwrap(), &m).await;
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    assert!(d.asked.all().is_empty());
    let lines = d.gw.log_lines(1).await;
    assert_eq!(lines[0]["event.reason"], "unknown_agent");
    assert_eq!(lines[0]["agent.name"], "unknown");
    d.gw.stop().await;
}

const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[tokio::test]
async fn kill_switch_engaged_refuses_the_agent() {
    let d = start(|c, dir| {
        std::fs::write(dir.join("webhook.secret"), format!("{WHSEC}\n")).unwrap();
        c.kill_switch.webhook_secret_files = vec![dir.join("webhook.secret")];
    })
    .await;
    let r = ask(d.addr, "www.allowed.test.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    let body = r#"{"scope":"agent","agent":"coder-1","reason":"test"}"#;
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let secret = Secret::parse(WHSEC).unwrap();
    let headers = vec![
        ("webhook-id".to_owned(), "msg_dns_1".to_owned()),
        ("webhook-timestamp".to_owned(), ts.to_string()),
        (
            "webhook-signature".to_owned(),
            sign(&secret, "msg_dns_1", ts, body.as_bytes()),
        ),
    ];
    let (code, text) =
        admin_request(d.gw.admin, "POST", "/v1/kill", &headers, body.as_bytes()).await;
    assert_eq!(code, 200, "{text}");
    // Cached or not, nothing is answered now.
    for qname in ["www.allowed.test.", "alias.test."] {
        let r = ask(d.addr, qname, RecordType::A).await;
        assert_eq!(r.metadata.response_code, ResponseCode::Refused, "{qname}");
        assert!(r.answers.is_empty());
    }
    assert_eq!(d.asked.count("alias.test."), 0);
    let lines = d.gw.log_lines(3).await;
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["event.reason"] == "kill_switch")
            .count(),
        2
    );
    d.gw.stop().await;
}

/// The rate limit is spent by upstream lookups (and refusals): distinct names, each a cache
/// miss, are refused past the burst, and never reach the upstream then.
#[tokio::test]
async fn the_rate_limit_refuses_lookups_beyond_the_burst() {
    let d = start(|c, _| c.dns.queries_per_second = 5).await;
    let mut answered = 0;
    let mut limited = 0;
    let t0 = Instant::now();
    for i in 0..40 {
        let r = ask(d.addr, &format!("n{i}.allowed.test."), RecordType::A).await;
        match r.metadata.response_code {
            ResponseCode::NoError | ResponseCode::NXDomain => answered += 1,
            ResponseCode::Refused => limited += 1,
            other => panic!("unexpected {other}"),
        }
    }
    // Burst 10, plus what refilled (5/s) while the loop ran.
    let refilled = (t0.elapsed().as_secs_f64() * 5.0).ceil() as usize;
    assert!(
        (10..=10 + refilled).contains(&answered),
        "answered {answered}, refilled {refilled}"
    );
    assert!(limited >= 20, "limited {limited}");
    assert_eq!(answered + limited, 40);
    assert_eq!(
        d.asked.all().len(),
        answered,
        "a refused lookup reached the upstream"
    );
    let lines = d.gw.log_lines(answered + limited).await;
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["event.reason"] == "rate_limited")
            .count(),
        limited
    );
    d.gw.stop().await;
}

/// Answers from the cache are not limited: the field report lost 49 of 200 parallel
/// downloads of an allowed name to a limit of 100/s. 200 clients at once, A and AAAA each,
/// at that limit: every one answered, and the upstream asked once per type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_parallel_clients_of_one_allowed_name_all_resolve() {
    let d = start(|c, _| c.dns.queries_per_second = 100).await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let server = d.addr;
        tasks.push(tokio::spawn(async move {
            let rtype = if i % 2 == 0 {
                RecordType::A
            } else {
                RecordType::AAAA
            };
            let mut codes = Vec::new();
            for t in [
                rtype,
                if rtype == RecordType::A {
                    RecordType::AAAA
                } else {
                    RecordType::A
                },
            ] {
                let r = ask(server, "www.allowed.test.", t).await;
                codes.push(r.metadata.response_code);
            }
            codes
        }));
    }
    for t in tasks {
        for code in t.await.unwrap() {
            assert_eq!(code, ResponseCode::NoError);
        }
    }
    let asked = d.asked.count("www.allowed.test.");
    assert!(
        asked <= 2,
        "concurrent questions were not shared: {asked} upstream lookups"
    );
    d.gw.stop().await;
}

/// A flood of random names under an allowed wildcard (each one a cache miss, each one a
/// label of the agent's choosing on the upstream): bounded to the rate limit upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_names_under_an_allowed_wildcard_are_bounded_upstream() {
    let d = start(|c, _| c.dns.queries_per_second = 20).await;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..4 {
        let server = d.addr;
        tasks.push(tokio::spawn(async move {
            for i in 0..250 {
                ask(server, &format!("x{w}-{i}.allowed.test."), RecordType::A).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = t0.elapsed().as_secs_f64();
    let upstream = d.asked.all().len();
    let bound = 40 + (secs * 20.0).ceil() as usize;
    assert!(
        upstream <= bound,
        "{upstream} lookups in {secs:.2} s, bound {bound}"
    );
    d.gw.stop().await;
}

#[tokio::test]
async fn the_cache_answers_repeated_questions_with_aged_ttls() {
    let d = start(|c, _| c.dns.max_ttl = Duration::from_secs(120)).await;
    let first = ask(d.addr, "www.allowed.test.", RecordType::A).await;
    assert_eq!(first.answers[0].ttl, 120, "TTL capped at dns.max_ttl_secs");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = ask(d.addr, "www.allowed.test.", RecordType::A).await;
    assert_eq!(addresses(&second), addresses(&first));
    assert!(
        second.answers[0].ttl < 120,
        "aged: {}",
        second.answers[0].ttl
    );
    assert_eq!(d.asked.count("www.allowed.test."), 1, "{:?}", d.asked.all());
    // Another type is another cache entry.
    ask(d.addr, "www.allowed.test.", RecordType::AAAA).await;
    assert_eq!(d.asked.count("www.allowed.test."), 2);
    d.gw.stop().await;
}

#[tokio::test]
async fn an_upstream_timeout_is_servfail_never_a_guess() {
    let d = start(|_, _| {}).await;
    let t0 = Instant::now();
    let r = ask(d.addr, "slow.allowed.test.", RecordType::A).await;
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    assert!(r.answers.is_empty());
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(d.asked.count("slow.allowed.test.") >= 1);
    let lines = d.gw.log_lines(1).await;
    assert_eq!(lines[0]["event.reason"], "resolve_failed");
    assert_eq!(lines[0]["dns.response_code"], "SERVFAIL");
    d.gw.stop().await;
}

#[tokio::test]
async fn big_answers_truncate_over_plain_udp_and_fit_over_tcp() {
    let d = start(|_, _| {}).await;
    let plain = query("big.allowed.test.", RecordType::A, false);
    let r = ask_udp_from(d.addr, Ipv4Addr::LOCALHOST.into(), &plain).await;
    assert!(
        r.metadata.truncation,
        "TC set when over 512 bytes without EDNS"
    );
    assert!(r.answers.is_empty());
    // The upstream has 40; an answer keeps at most 32 addresses (docs/memory.md).
    let r = ask_tcp(d.addr, &plain).await;
    assert!(!r.metadata.truncation, "{r:?}");
    assert_eq!(r.answers.len(), 32);
    // With EDNS (1232 bytes offered) the 32 records fit over UDP.
    let r = ask(d.addr, "big.allowed.test.", RecordType::A).await;
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 32);
    d.gw.stop().await;
}

#[tokio::test]
async fn malformed_messages_get_formerr_and_idle_tcp_is_closed() {
    let d = start(|c, _| c.dns.tcp_idle = Duration::from_millis(500)).await;
    // Two questions in one message.
    let mut two = query("www.allowed.test.", RecordType::A, false);
    two.add_query(Query::query(name("alias.test."), RecordType::A));
    let r = ask_udp_from(d.addr, Ipv4Addr::LOCALHOST.into(), &two).await;
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    // Garbage after a header.
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket
        .send_to(
            &[0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xff],
            d.addr,
        )
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let r = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(r.metadata.id, 0x1234);
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    assert!(d.asked.all().is_empty());
    // A TCP client that says nothing is closed after dns.tcp_idle.
    let mut s = TcpStream::connect(d.addr).await.unwrap();
    let mut byte = [0u8; 1];
    let t0 = Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
        .await
        .expect("closed before 5 s");
    assert!(matches!(read, Ok(0) | Err(_)));
    assert!(t0.elapsed() >= Duration::from_millis(400));
    // A length prefix over the cap closes the connection without reading on.
    let mut s = TcpStream::connect(d.addr).await.unwrap();
    s.write_all(&60_000u16.to_be_bytes()).await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(2), s.read(&mut byte))
        .await
        .expect("closed at once");
    assert!(matches!(read, Ok(0) | Err(_)));
    d.gw.stop().await;
}
