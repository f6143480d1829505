//! The bytes the probes send, and the parsing of what comes back: a TLS ClientHello (with or
//! without SNI) and the alert that refuses it, a QUIC datagram that forces a Version
//! Negotiation reply, DNS queries (with EDNS, so a refusal can carry an Extended DNS Error)
//! and replies, a plain HTTP request. Pure functions: no sockets, no clock (randomness is passed
//! in), so every builder is checked against the parser the gateway itself uses.

use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};

/// A TLS 1.3 ClientHello (TLS 1.2 compatible) as one record: what a real client sends, so a
/// real server answers it (ServerHello or an alert) and the gateway can parse it. `seed`
/// fills the random, the session id and the key share.
pub fn client_hello(sni: Option<&str>, seed: [u8; 32]) -> Vec<u8> {
    let mut ext = Vec::new();
    if let Some(name) = sni {
        let name = name.as_bytes();
        let mut list = vec![0u8]; // host_name
        push_u16_len(&mut list, name);
        let mut body = Vec::new();
        push_u16_len(&mut body, &list);
        push_ext(&mut ext, 0x0000, &body);
    }
    // supported_groups: x25519, secp256r1, secp384r1
    push_ext(
        &mut ext,
        0x000a,
        &[0, 6, 0x00, 0x1d, 0x00, 0x17, 0x00, 0x18],
    );
    // ec_point_formats: uncompressed
    push_ext(&mut ext, 0x000b, &[1, 0]);
    // signature_algorithms
    let sigs: [u16; 8] = [
        0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601,
    ];
    let mut body = Vec::new();
    push_u16_len(&mut body, &be16s(&sigs));
    push_ext(&mut ext, 0x000d, &body);
    // ALPN: h2, http/1.1
    let mut protos = Vec::new();
    for p in [&b"h2"[..], b"http/1.1"] {
        protos.push(len_u8(p));
        protos.extend_from_slice(p);
    }
    let mut body = Vec::new();
    push_u16_len(&mut body, &protos);
    push_ext(&mut ext, 0x0010, &body);
    // supported_versions: TLS 1.3, 1.2
    push_ext(&mut ext, 0x002b, &[4, 0x03, 0x04, 0x03, 0x03]);
    // psk_key_exchange_modes: psk_dhe_ke
    push_ext(&mut ext, 0x002d, &[1, 1]);
    // key_share: one x25519 share (any 32 bytes are a usable public value for a probe)
    let mut share = vec![0x00, 0x1d];
    push_u16_len(&mut share, &seed);
    let mut body = Vec::new();
    push_u16_len(&mut body, &share);
    push_ext(&mut ext, 0x0033, &body);

    let mut hello = vec![0x03, 0x03];
    hello.extend_from_slice(&seed); // random
    hello.push(32);
    hello.extend_from_slice(&seed); // legacy_session_id (middlebox compatibility)
    let suites: [u16; 9] = [
        0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9, 0xcca8,
    ];
    push_u16_len(&mut hello, &be16s(&suites));
    hello.extend_from_slice(&[1, 0]); // compression: null
    push_u16_len(&mut hello, &ext);

    let mut handshake = vec![0x01];
    let len = u32::try_from(hello.len()).unwrap_or(0).to_be_bytes();
    handshake.extend_from_slice(&len[1..]);
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x01];
    push_u16_len(&mut record, &handshake);
    record
}

fn be16s(values: &[u16]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_be_bytes()).collect()
}

fn len_u8(b: &[u8]) -> u8 {
    u8::try_from(b.len()).unwrap_or(u8::MAX)
}

fn push_u16_len(out: &mut Vec<u8>, body: &[u8]) {
    out.extend_from_slice(&u16::try_from(body.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(body);
}

fn push_ext(out: &mut Vec<u8>, kind: u16, body: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    push_u16_len(out, body);
}

/// A version from the range RFC 9000 §15 reserves to force version negotiation.
pub const QUIC_PROBE_VERSION: u32 = 0x1a2a_3a4a;
/// RFC 9000 §14.1: servers ignore Initial datagrams smaller than this.
pub const QUIC_MIN_DATAGRAM: usize = 1200;

/// A QUIC long-header datagram with a reserved version: any QUIC server must answer it with
/// a Version Negotiation packet (RFC 9000 §6), without keys or a handshake.
pub fn quic_probe(dcid: [u8; 8], scid: [u8; 8]) -> Vec<u8> {
    let mut p = vec![0xc0];
    p.extend_from_slice(&QUIC_PROBE_VERSION.to_be_bytes());
    p.push(8);
    p.extend_from_slice(&dcid);
    p.push(8);
    p.extend_from_slice(&scid);
    p.resize(QUIC_MIN_DATAGRAM, 0);
    p
}

/// Is `reply` a Version Negotiation answering [`quic_probe`]`(dcid, scid)` (its connection
/// ids swapped back, RFC 9000 §17.2.1)?
pub fn is_version_negotiation(reply: &[u8], dcid: [u8; 8], scid: [u8; 8]) -> bool {
    let Some(head) = reply.get(..23) else {
        return false;
    };
    head[0] & 0x80 != 0
        && head[1..5] == [0, 0, 0, 0]
        && head[5] == 8
        && head[6..14] == scid
        && head[14] == 8
        && head[15..23] == dcid
}

/// A recursive query for `name`'s A records, with an OPT record (EDNS, 1232-byte payload):
/// what lets a refusal carry its Extended DNS Error.
pub fn dns_query(id: u16, name: &str) -> Result<Vec<u8>, String> {
    let fqdn = if name.ends_with('.') {
        name.to_owned()
    } else {
        format!("{name}.")
    };
    let qname = Name::from_ascii(&fqdn).map_err(|e| format!("bad name `{name}`: {e}"))?;
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(qname, RecordType::A));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    m.set_edns(edns);
    m.to_vec().map_err(|e| e.to_string())
}

/// What a DNS reply said, as far as the probes care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsReply {
    pub rcode: ResponseCode,
    /// A records in the answer section.
    pub addresses: Vec<IpAddr>,
    /// Answer records of any type.
    pub answers: usize,
    /// The first Extended DNS Error (RFC 8914): info-code and EXTRA-TEXT.
    pub ede: Option<(u16, String)>,
}

/// Parse the reply to the query with `id`; `None` for anything else (wrong id, not a
/// response, garbage).
pub fn parse_dns_reply(bytes: &[u8], id: u16) -> Option<DnsReply> {
    let m = Message::from_vec(bytes).ok()?;
    if m.metadata.id != id || m.metadata.message_type != MessageType::Response {
        return None;
    }
    let addresses = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            hickory_proto::rr::RData::A(a) => Some(IpAddr::V4(a.0)),
            hickory_proto::rr::RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    let ede = m.edns.as_ref().and_then(|e| {
        e.options()
            .options
            .iter()
            .find_map(|(code, option)| crate::dns::ede::decode(*code, option))
    });
    Some(DnsReply {
        rcode: m.metadata.response_code,
        addresses,
        answers: m.answers.len(),
        ede,
    })
}

/// TLS `access_denied` (RFC 8446 §6.2).
pub(crate) const ALERT_ACCESS_DENIED: u8 = 49;

/// If `reply` is exactly one plaintext TLS alert record (content type 21), its level and
/// description: what a gateway that refuses a ClientHello sends before it closes.
pub(crate) fn tls_alert(reply: &[u8]) -> Option<(u8, u8)> {
    match reply {
        [21, 3, _, 0, 2, level, description] => Some((*level, *description)),
        _ => None,
    }
}

/// A plain HTTP/1.1 request naming the address itself as the host: what a client sends
/// to a bare IP, and what a transparent gateway must deny (an IP literal).
pub fn http_request(ip: IpAddr, port: u16) -> Vec<u8> {
    let host = match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    };
    format!(
        "GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: portcullis-selftest\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

/// A `CONNECT` request for `host:port`.
pub fn connect_request(host: &str, port: u16) -> Vec<u8> {
    format!(
        "CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: portcullis-selftest\r\n\r\n"
    )
    .into_bytes()
}

/// A label of `len` lowercase letters and digits (≤ 63) drawn from `seed`: the random part of
/// the DNS exfiltration probe, shaped like an encoded payload.
pub fn random_label(seed: &[u8], len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let len = len.min(63);
    (0..len)
        .map(|i| {
            let b = seed.get(i % seed.len().max(1)).copied().unwrap_or(0);
            let mixed = b.rotate_left(u32::try_from(i / seed.len().max(1)).unwrap_or(0) * 3);
            char::from(ALPHABET[usize::from(mixed) % ALPHABET.len()])
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::proxy::sni::{Parse, parse_client_hello};

    #[test]
    fn the_hello_parses_as_the_gateway_parses_it() {
        let seed = [7u8; 32];
        let Parse::Done(h) = parse_client_hello(&client_hello(Some("dns.google"), seed)) else {
            panic!("not a complete hello");
        };
        assert_eq!(h.server_name.as_deref(), Some("dns.google"));
        assert_eq!(h.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        let bytes = client_hello(None, seed);
        let Parse::Done(h) = parse_client_hello(&bytes) else {
            panic!("not a complete hello");
        };
        assert_eq!(h.server_name, None);
        assert_eq!(h.consumed, bytes.len());
        // Every strict prefix is incomplete, never a verdict on partial bytes.
        for n in 1..bytes.len() {
            assert_eq!(
                parse_client_hello(&bytes[..n]),
                Parse::NeedMore,
                "prefix {n}"
            );
        }
    }

    #[test]
    fn quic_probe_and_version_negotiation() {
        let (d, s) = ([1u8; 8], [2u8; 8]);
        let p = quic_probe(d, s);
        assert_eq!(p.len(), QUIC_MIN_DATAGRAM);
        assert_eq!(p[0] & 0xc0, 0xc0, "long header, fixed bit");
        assert_eq!(p[1..5], QUIC_PROBE_VERSION.to_be_bytes());
        // A server's answer: ids swapped, version 0, then the versions it speaks.
        let mut vn = vec![0x80, 0, 0, 0, 0, 8];
        vn.extend_from_slice(&s);
        vn.push(8);
        vn.extend_from_slice(&d);
        vn.extend_from_slice(&1u32.to_be_bytes());
        assert!(is_version_negotiation(&vn, d, s));
        assert!(!is_version_negotiation(&vn, s, d), "ids not swapped");
        assert!(!is_version_negotiation(&p, d, s), "an echo is not a VN");
        assert!(!is_version_negotiation(&vn[..10], d, s));
    }

    #[test]
    fn dns_round_trip() {
        use hickory_proto::rr::{RData, Record, rdata::A};
        let q = dns_query(0x1234, "allowed.test").unwrap();
        let mut m = Message::from_vec(&q).unwrap();
        assert_eq!(m.queries[0].name().to_ascii(), "allowed.test.");
        assert!(m.metadata.recursion_desired);
        assert_eq!(parse_dns_reply(&q, 0x1234), None, "a query is not a reply");
        m.metadata.message_type = MessageType::Response;
        m.answers.push(Record::from_rdata(
            m.queries[0].name().clone(),
            30,
            RData::A(A(std::net::Ipv4Addr::new(192, 0, 2, 1))),
        ));
        let r = parse_dns_reply(&m.to_vec().unwrap(), 0x1234).unwrap();
        assert_eq!(r.rcode, ResponseCode::NoError);
        assert_eq!(r.addresses, vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(parse_dns_reply(&m.to_vec().unwrap(), 0x4321), None);
        assert!(m.edns.is_some(), "the query offers EDNS");
        assert_eq!(r.ede, None);
        // A refusal with an Extended DNS Error, as the gateway's forwarder sends it.
        m.answers.clear();
        m.metadata.response_code = ResponseCode::NXDomain;
        if let Some(e) = m.edns.as_mut() {
            e.options_mut().insert(crate::dns::ede::option(
                crate::policy::Reason::NotAllowed,
                Some("coder-1"),
            ));
        }
        let r = parse_dns_reply(&m.to_vec().unwrap(), 0x1234).unwrap();
        assert_eq!(r.rcode, ResponseCode::NXDomain);
        assert_eq!(
            r.ede,
            Some((15, "portcullis: not_allowed for coder-1".to_owned()))
        );
        assert_eq!(parse_dns_reply(b"garbage", 0x1234), None);
        assert!(dns_query(1, "bad name with spaces..").is_err());
    }

    #[test]
    fn alerts() {
        assert_eq!(
            tls_alert(&[21, 3, 1, 0, 2, 2, 49]),
            Some((2, ALERT_ACCESS_DENIED))
        );
        assert_eq!(tls_alert(&[21, 3, 3, 0, 2, 1, 0]), Some((1, 0)));
        assert_eq!(tls_alert(&[21, 3, 3, 0, 2, 2]), None, "cut short");
        assert_eq!(
            tls_alert(&[21, 3, 3, 0, 2, 2, 49, 0]),
            None,
            "more than one record"
        );
        assert_eq!(
            tls_alert(&[22, 3, 3, 0, 2, 2, 49]),
            None,
            "a handshake record"
        );
    }

    #[test]
    fn requests_and_labels() {
        let r = String::from_utf8(http_request("2001:db8::1".parse().unwrap(), 80)).unwrap();
        assert!(r.starts_with("GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n"));
        assert!(r.ends_with("\r\n\r\n"));
        let c = String::from_utf8(connect_request("dns.google", 443)).unwrap();
        assert!(c.starts_with("CONNECT dns.google:443 HTTP/1.1\r\nHost: dns.google:443\r\n"));
        let l = random_label(&[1, 2, 3, 200, 99], 50);
        assert_eq!(l.len(), 50);
        assert!(
            l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );
        assert_eq!(random_label(&[9; 8], 100).len(), 63);
        assert_ne!(random_label(&[1; 8], 20), random_label(&[2; 8], 20));
    }
}
