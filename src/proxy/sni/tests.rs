//! Tests of the ClientHello parser: real hellos, every prefix, every reject, proptests.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use super::*;
use proptest::prelude::*;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

const EXT_PADDING: u16 = 21;

// ---- builders -------------------------------------------------------

/// A ClientHello handshake message (header + body) with these extensions.
fn build_hello(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (extension_type, data) in exts {
        block.extend_from_slice(&extension_type.to_be_bytes());
        block.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
        block.extend_from_slice(data);
    }
    let mut body = hello_body_without_extensions();
    body.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
    body.extend_from_slice(&block);
    handshake_message(&body)
}

fn hello_body_without_extensions() -> Vec<u8> {
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[0xab; 32]); // random
    body.push(32);
    body.extend_from_slice(&[0xcd; 32]); // session id
    body.extend_from_slice(&[0x00, 0x04, 0x13, 0x01, 0xc0, 0x2f]);
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    body
}

fn handshake_message(body: &[u8]) -> Vec<u8> {
    let length = u32::try_from(body.len()).unwrap().to_be_bytes();
    let mut message = vec![HANDSHAKE_TYPE_CLIENT_HELLO, length[1], length[2], length[3]];
    message.extend_from_slice(body);
    message
}

fn record(content_type: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![content_type, 0x03, 0x01];
    out.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Wraps the handshake message in records of the given fragment sizes
/// (in order); whatever is left goes into one final record.
fn split_records(hello_handshake: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = hello_handshake;
    for &size in sizes {
        if rest.is_empty() {
            break;
        }
        let (fragment, tail) = rest.split_at(size.clamp(1, rest.len()));
        out.extend_from_slice(&record(CONTENT_TYPE_HANDSHAKE, fragment));
        rest = tail;
    }
    if !rest.is_empty() {
        for fragment in rest.chunks(16384) {
            out.extend_from_slice(&record(CONTENT_TYPE_HANDSHAKE, fragment));
        }
    }
    out
}

/// Exactly `count` records of near-equal size.
fn split_evenly(hello_handshake: &[u8], count: usize) -> Vec<u8> {
    assert!(hello_handshake.len() >= count);
    let base = hello_handshake.len() / count;
    let mut sizes = vec![base; count - 1];
    sizes.push(hello_handshake.len() - base * (count - 1));
    let records = split_records(hello_handshake, &sizes);
    assert_eq!(
        records.len(),
        hello_handshake.len() + RECORD_HEADER_LEN * count
    );
    records
}

fn sni_entries(entries: &[(u8, &[u8])]) -> (u16, Vec<u8>) {
    let mut list = Vec::new();
    for (name_type, name) in entries {
        list.push(*name_type);
        list.extend_from_slice(&u16::try_from(name.len()).unwrap().to_be_bytes());
        list.extend_from_slice(name);
    }
    let mut data = u16::try_from(list.len()).unwrap().to_be_bytes().to_vec();
    data.extend_from_slice(&list);
    (EXT_SERVER_NAME, data)
}

fn sni(name: &[u8]) -> (u16, Vec<u8>) {
    sni_entries(&[(NAME_TYPE_HOST_NAME, name)])
}

fn alpn(protocols: &[&[u8]]) -> (u16, Vec<u8>) {
    let mut list = Vec::new();
    for protocol in protocols {
        list.push(u8::try_from(protocol.len()).unwrap());
        list.extend_from_slice(protocol);
    }
    let mut data = u16::try_from(list.len()).unwrap().to_be_bytes().to_vec();
    data.extend_from_slice(&list);
    (EXT_ALPN, data)
}

fn padding(length: usize) -> (u16, Vec<u8>) {
    (EXT_PADDING, vec![0; length])
}

fn typical_hello() -> Vec<u8> {
    build_hello(&[
        sni(b"allowed.test"),
        alpn(&[b"h2", b"http/1.1"]),
        padding(100),
    ])
}

fn one_record(hello_handshake: &[u8]) -> Vec<u8> {
    split_records(hello_handshake, &[])
}

fn rustls_hello(versions: &[&'static rustls::SupportedProtocolVersion]) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("allowed.test").unwrap();
    let mut connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    while connection.wants_write() {
        connection.write_tls(&mut out).unwrap();
    }
    out
}

fn decode_hex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}

/// Captured with `openssl s_client -servername allowed.test -alpn h2,http/1.1`
/// (OpenSSL 3.0.19); kept as a fixture so the test needs no binary.
fn openssl_fixture_hello() -> Vec<u8> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/openssl_client_hello.hex"
    );
    decode_hex(&std::fs::read_to_string(path).unwrap())
}

fn expect_done(bytes: &[u8]) -> ClientHello {
    match parse_client_hello(bytes) {
        Parse::Done(hello) => hello,
        other => panic!("expected Done, got {other:?}"),
    }
}

fn expect_reject(bytes: &[u8]) -> Reject {
    match parse_client_hello(bytes) {
        Parse::Reject(reject) => reject,
        other => panic!("expected Reject, got {other:?}"),
    }
}

fn assert_every_prefix_needs_more(bytes: &[u8]) {
    for cut in 0..bytes.len() {
        assert_eq!(
            parse_client_hello(&bytes[..cut]),
            Parse::NeedMore,
            "prefix of {cut}/{} bytes",
            bytes.len()
        );
    }
}

fn assert_allowed_test(hello: &ClientHello, total: usize) {
    assert_eq!(hello.server_name.as_deref(), Some("allowed.test"));
    assert_eq!(hello.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
    assert_eq!(hello.consumed, total);
}

// ---- real clients ---------------------------------------------------

#[test]
fn rustls_tls13_only_hello() {
    let bytes = rustls_hello(&[&rustls::version::TLS13]);
    assert_every_prefix_needs_more(&bytes);
    let hello = expect_done(&bytes);
    assert_allowed_test(&hello, bytes.len());
    assert!(!hello.ech);
}

#[test]
fn rustls_tls12_and_tls13_hello() {
    let bytes = rustls_hello(&[&rustls::version::TLS13, &rustls::version::TLS12]);
    assert_every_prefix_needs_more(&bytes);
    assert_allowed_test(&expect_done(&bytes), bytes.len());
}

#[test]
fn rustls_hello_followed_by_more_bytes_reports_consumed() {
    let mut bytes = rustls_hello(&[&rustls::version::TLS13]);
    let hello_len = bytes.len();
    bytes.extend_from_slice(&record(23, b"early data"));
    assert_eq!(expect_done(&bytes).consumed, hello_len);
}

#[test]
fn rustls_hello_refragmented() {
    let bytes = rustls_hello(&[&rustls::version::TLS13]);
    let message = &bytes[RECORD_HEADER_LEN..];
    for count in [2, 3, 10, 100] {
        let records = split_evenly(message, count);
        assert_every_prefix_needs_more(&records);
        assert_allowed_test(&expect_done(&records), records.len());
    }
}

#[test]
fn openssl_fixture_hello_parses() {
    let bytes = openssl_fixture_hello();
    assert_every_prefix_needs_more(&bytes);
    assert_allowed_test(&expect_done(&bytes), bytes.len());
}

/// Captures a fresh hello from the installed `openssl s_client` against
/// a local listener; every wait is bounded.
#[test]
fn openssl_live_hello_parses() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut child = std::process::Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", "allowed.test", "-alpn", "h2,http/1.1"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl s_client must be installed (apt-get install openssl)");
    let deadline = Instant::now() + Duration::from_secs(10);
    listener.set_nonblocking(true).unwrap();
    let accepted = loop {
        match listener.accept() {
            Ok((stream, _)) => break Some(stream),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => break None,
        }
    };
    let mut received = Vec::new();
    let mut outcome = Parse::NeedMore;
    if let Some(mut stream) = accepted {
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut chunk = [0u8; 4096];
        while outcome == Parse::NeedMore && Instant::now() < deadline {
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(count) => received.extend_from_slice(&chunk[..count]),
                Err(_) => {}
            }
            outcome = parse_client_hello(&received);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let Parse::Done(hello) = outcome else {
        panic!(
            "no ClientHello from openssl within 10 s: {outcome:?}, {} bytes",
            received.len()
        );
    };
    assert_allowed_test(&hello, received.len());
}

// ---- built hellos and fragmentation ---------------------------------

#[test]
fn built_hello_every_prefix_then_done() {
    let bytes = one_record(&typical_hello());
    assert_every_prefix_needs_more(&bytes);
    let hello = expect_done(&bytes);
    assert_allowed_test(&hello, bytes.len());
    assert!(!hello.ech);
}

#[test]
fn split_into_many_records_gives_same_result() {
    let message = build_hello(&[
        sni(b"allowed.test"),
        alpn(&[b"h2", b"http/1.1"]),
        padding(400),
    ]);
    for count in [1, 2, 3, 10, 100, 300] {
        let records = split_evenly(&message, count);
        assert_allowed_test(&expect_done(&records), records.len());
    }
    // Prefixes of the worst case stay NeedMore.
    assert_every_prefix_needs_more(&split_evenly(&message, 300));
}

#[test]
fn handshake_header_split_across_records() {
    let message = typical_hello();
    let records = split_records(&message, &[1, 1, 1, 1, 7]);
    assert_every_prefix_needs_more(&records);
    assert_allowed_test(&expect_done(&records), records.len());
}

#[test]
fn more_than_max_records_is_rejected() {
    let message = build_hello(&[sni(b"allowed.test"), padding(400)]);
    let records = split_evenly(&message, MAX_RECORDS + 1);
    assert_eq!(expect_reject(&records), Reject::TooManyRecords);
}

#[test]
fn hello_larger_than_one_record_parses() {
    let message = build_hello(&[sni(b"allowed.test"), padding(40_000), (51, vec![7; 9_000])]);
    assert!(message.len() > 2 * 16384);
    let records = split_records(&message, &[]);
    assert_allowed_test_without_alpn(&expect_done(&records), records.len());
    let records = split_records(&message, &[5000; 20]);
    assert_allowed_test_without_alpn(&expect_done(&records), records.len());
}

fn assert_allowed_test_without_alpn(hello: &ClientHello, total: usize) {
    assert_eq!(hello.server_name.as_deref(), Some("allowed.test"));
    assert!(hello.alpn.is_empty());
    assert_eq!(hello.consumed, total);
}

#[test]
fn handshake_length_over_cap_is_too_large_from_header_alone() {
    let length = u32::try_from(MAX_HELLO_BYTES + 1).unwrap().to_be_bytes();
    let bytes = record(
        CONTENT_TYPE_HANDSHAKE,
        &[HANDSHAKE_TYPE_CLIENT_HELLO, length[1], length[2], length[3]],
    );
    assert_eq!(expect_reject(&bytes), Reject::TooLarge);
    // Exactly at the cap is still acceptable framing.
    let mut at_cap = build_hello(&[sni(b"allowed.test")]);
    let filler = MAX_HELLO_BYTES + HANDSHAKE_HEADER_LEN - at_cap.len() - 4;
    at_cap = build_hello(&[sni(b"allowed.test"), padding(filler)]);
    assert_eq!(at_cap.len(), MAX_HELLO_BYTES + HANDSHAKE_HEADER_LEN);
    let records = split_records(&at_cap, &[]);
    assert_eq!(
        expect_done(&records).server_name.as_deref(),
        Some("allowed.test")
    );
}

// ---- name handling --------------------------------------------------

fn sni_result(name: &[u8]) -> Parse {
    parse_client_hello(&one_record(&build_hello(&[sni(name)])))
}

#[test]
fn uppercase_and_trailing_dot_are_normalised() {
    let Parse::Done(hello) = sni_result(b"Allowed.TEST.") else {
        panic!("expected Done");
    };
    assert_eq!(hello.server_name.as_deref(), Some("allowed.test"));
}

#[test]
fn no_server_name_extension_means_none() {
    let hello = expect_done(&one_record(&build_hello(&[alpn(&[b"h2"])])));
    assert_eq!(hello.server_name, None);
    assert_eq!(hello.alpn, vec![b"h2".to_vec()]);
}

#[test]
fn hello_without_extensions_block_is_accepted() {
    let message = handshake_message(&hello_body_without_extensions());
    let hello = expect_done(&one_record(&message));
    assert_eq!(hello.server_name, None);
}

#[test]
fn name_length_limits() {
    let label63 = [b'a'; 63];
    let label64 = [b'a'; 64];
    assert!(matches!(
        sni_result(&[&label63[..], b".test"].concat()),
        Parse::Done(_)
    ));
    assert_eq!(
        sni_result(&[&label64[..], b".test"].concat()),
        Parse::Reject(Reject::InvalidName)
    );
    // 63+1+63+1+63+1+61 = 253 bytes.
    let name253 = [
        &label63[..],
        b".",
        &label63,
        b".",
        &label63,
        b".",
        &[b'b'; 61],
    ]
    .concat();
    assert_eq!(name253.len(), 253);
    assert!(matches!(sni_result(&name253), Parse::Done(_)));
    assert!(matches!(
        sni_result(&[&name253[..], b"."].concat()),
        Parse::Done(_)
    ));
    let name254 = [&name253[..], b"c"].concat();
    assert_eq!(sni_result(&name254), Parse::Reject(Reject::InvalidName));
}

#[test]
fn invalid_names_are_rejected() {
    let cases: &[(&[u8], Reject)] = &[
        (b"", Reject::EmptyName),
        (b"allowed\0.test", Reject::InvalidName),
        (b"allowed test", Reject::InvalidName),
        (b"allowed.t\xc3\xa9st", Reject::InvalidName),
        (b"127.0.0.1", Reject::InvalidName),
        (b"example.123", Reject::InvalidName),
        (b"::1", Reject::InvalidName),
        (b"[::1]", Reject::InvalidName),
        (b".allowed.test", Reject::InvalidName),
        (b"allowed..test", Reject::InvalidName),
        (b"allowed.test..", Reject::InvalidName),
        (b".", Reject::InvalidName),
        (b"allowed.test/x", Reject::InvalidName),
    ];
    for (name, expected) in cases {
        assert_eq!(
            sni_result(name),
            Parse::Reject(*expected),
            "{:?}",
            String::from_utf8_lossy(name)
        );
    }
    assert!(matches!(sni_result(b"_acme.my-host.test"), Parse::Done(_)));
    assert!(matches!(sni_result(b"1.2.3.example"), Parse::Done(_)));
}

#[test]
fn server_name_structure_rejects() {
    let two_exts = build_hello(&[sni(b"allowed.test"), sni(b"evil.test")]);
    assert_eq!(
        expect_reject(&one_record(&two_exts)),
        Reject::DuplicateServerName
    );

    let two_names = build_hello(&[sni_entries(&[(0, b"allowed.test"), (0, b"evil.test")])]);
    assert_eq!(
        expect_reject(&one_record(&two_names)),
        Reject::MultipleNames
    );

    let other_type_second = build_hello(&[sni_entries(&[(0, b"allowed.test"), (1, b"x")])]);
    assert_eq!(
        expect_reject(&one_record(&other_type_second)),
        Reject::MultipleNames
    );

    let not_host_name = build_hello(&[sni_entries(&[(1, b"allowed.test")])]);
    assert_eq!(
        expect_reject(&one_record(&not_host_name)),
        Reject::InvalidName
    );

    let empty_list = build_hello(&[(EXT_SERVER_NAME, vec![0, 0])]);
    assert_eq!(expect_reject(&one_record(&empty_list)), Reject::Malformed);

    let empty_ext = build_hello(&[(EXT_SERVER_NAME, vec![])]);
    assert_eq!(expect_reject(&one_record(&empty_ext)), Reject::Malformed);

    let (_, mut bad_list_len) = sni(b"allowed.test");
    bad_list_len[1] += 1;
    let bad = build_hello(&[(EXT_SERVER_NAME, bad_list_len)]);
    assert_eq!(expect_reject(&one_record(&bad)), Reject::Malformed);
}

// ---- other extensions ----------------------------------------------

#[test]
fn ech_is_flagged() {
    let message = build_hello(&[
        sni(b"public.test"),
        (EXT_ENCRYPTED_CLIENT_HELLO, vec![0; 40]),
    ]);
    let hello = expect_done(&one_record(&message));
    assert!(hello.ech);
    assert_eq!(hello.server_name.as_deref(), Some("public.test"));
}

#[test]
fn malformed_alpn_and_duplicate_extensions() {
    let empty_protocol = build_hello(&[alpn(&[b"h2", b""])]);
    assert_eq!(
        expect_reject(&one_record(&empty_protocol)),
        Reject::Malformed
    );
    let empty_list = build_hello(&[(EXT_ALPN, vec![0, 0])]);
    assert_eq!(expect_reject(&one_record(&empty_list)), Reject::Malformed);
    let overrun = build_hello(&[(EXT_ALPN, vec![0, 3, 5, b'h', b'2'])]);
    assert_eq!(expect_reject(&one_record(&overrun)), Reject::Malformed);
    let duplicate = build_hello(&[padding(1), padding(2)]);
    assert_eq!(expect_reject(&one_record(&duplicate)), Reject::Malformed);
}

/// Many extensions: the duplicate check holds in the small array and after it spills,
/// for a type first seen on either side of the spill.
#[test]
fn duplicates_among_many_extensions() {
    let many = |n: u16| -> Vec<(u16, Vec<u8>)> { (0..n).map(|i| (1000 + i * 7, vec![])).collect() };
    for n in [
        1,
        FEW_EXTENSIONS as u16 - 1,
        FEW_EXTENSIONS as u16,
        60,
        2000,
    ] {
        let mut exts = many(n);
        exts.push(sni(b"allowed.test"));
        let hello = expect_done(&one_record(&build_hello(&exts)));
        assert_eq!(hello.server_name.as_deref(), Some("allowed.test"), "{n}");

        for again in [0, n / 2, n - 1] {
            let mut exts = many(n);
            exts.push((1000 + again * 7, vec![]));
            let reject = expect_reject(&one_record(&build_hello(&exts)));
            assert_eq!(
                reject,
                Reject::Malformed,
                "{n} extensions, then #{again} again"
            );
        }
        let mut exts = vec![sni(b"allowed.test")];
        exts.extend(many(n));
        exts.push(sni(b"evil.test"));
        let reject = expect_reject(&one_record(&build_hello(&exts)));
        assert_eq!(reject, Reject::DuplicateServerName, "{n}");
    }
}

#[test]
fn malformed_bodies() {
    let good = typical_hello();
    // Extensions block length one too long / one too short.
    let ext_len_offset = HANDSHAKE_HEADER_LEN + hello_body_without_extensions().len();
    for delta in [1i32, -1] {
        let mut message = good.clone();
        let old = u16::from_be_bytes([message[ext_len_offset], message[ext_len_offset + 1]]);
        let new = u16::try_from(i32::from(old) + delta).unwrap().to_be_bytes();
        message[ext_len_offset..ext_len_offset + 2].copy_from_slice(&new);
        assert_eq!(expect_reject(&one_record(&message)), Reject::Malformed);
    }
    // Trailing garbage inside the handshake message.
    let mut body = good[HANDSHAKE_HEADER_LEN..].to_vec();
    body.push(0);
    assert_eq!(
        expect_reject(&one_record(&handshake_message(&body))),
        Reject::Malformed
    );
    // Odd cipher suite length, empty cipher suites, no compression.
    let mut body = hello_body_without_extensions();
    body[2 + 32 + 1 + 32 + 1] = 3;
    assert_eq!(
        expect_reject(&one_record(&handshake_message(&body))),
        Reject::Malformed
    );
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[0; 32]);
    body.extend_from_slice(&[0, 0, 0, 1, 0]);
    assert_eq!(
        expect_reject(&one_record(&handshake_message(&body))),
        Reject::Malformed
    );
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[0; 32]);
    body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 0]);
    assert_eq!(
        expect_reject(&one_record(&handshake_message(&body))),
        Reject::Malformed
    );
    // Session id longer than 32.
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[0; 32]);
    body.push(33);
    body.extend_from_slice(&[0; 33]);
    body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
    assert_eq!(
        expect_reject(&one_record(&handshake_message(&body))),
        Reject::Malformed
    );
    // SSL 3.0 legacy_version inside the hello.
    let mut message = good.clone();
    message[HANDSHAKE_HEADER_LEN + 1] = 0;
    assert_eq!(
        expect_reject(&one_record(&message)),
        Reject::UnsupportedVersion
    );
}

// ---- record layer rejects ------------------------------------------

#[test]
fn record_layer_rejects() {
    let message = typical_hello();
    let good = one_record(&message);

    let sslv2 = [
        0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10,
    ];
    assert_eq!(expect_reject(&sslv2), Reject::Sslv2);
    assert_eq!(expect_reject(&sslv2[..1]), Reject::Sslv2);

    assert_eq!(expect_reject(&record(23, &message)), Reject::NotHandshake);
    assert_eq!(expect_reject(b"GET / HTTP/1.1\r\n"), Reject::NotHandshake);
    assert_eq!(expect_reject(b"G"), Reject::NotHandshake);
    assert_eq!(expect_reject(b"\x00\x01\x02garbage"), Reject::NotHandshake);

    let mut middle_alert = split_records(&message, &[50, 50]);
    middle_alert[RECORD_HEADER_LEN + 50] = 21;
    assert_eq!(expect_reject(&middle_alert), Reject::NotHandshake);

    let mut ssl3 = good.clone();
    ssl3[2] = 0x00;
    assert_eq!(expect_reject(&ssl3), Reject::UnsupportedVersion);
    assert_eq!(expect_reject(&ssl3[..3]), Reject::UnsupportedVersion);
    let mut major2 = good.clone();
    major2[1] = 0x02;
    assert_eq!(expect_reject(&major2), Reject::UnsupportedVersion);
    for minor in 1..=4 {
        let mut version = good.clone();
        version[2] = minor;
        assert!(matches!(parse_client_hello(&version), Parse::Done(_)));
    }

    assert_eq!(expect_reject(&[22, 3, 1, 0, 0]), Reject::Malformed);
    let too_long = u16::try_from(MAX_RECORD_LEN + 1).unwrap().to_be_bytes();
    assert_eq!(
        expect_reject(&[22, 3, 1, too_long[0], too_long[1]]),
        Reject::Malformed
    );

    assert_eq!(
        expect_reject(&record(22, &[2, 0, 0, 4])),
        Reject::NotClientHello
    );
    assert_eq!(expect_reject(&record(22, &[2])), Reject::NotClientHello);

    // The hello's last record claims bytes past the end of the hello.
    let mut overlong = record(22, &[message.clone(), vec![0; 3]].concat());
    assert_eq!(expect_reject(&overlong), Reject::Malformed);
    overlong.truncate(good.len());
    assert_eq!(expect_reject(&overlong), Reject::Malformed);
}

// ---- properties -----------------------------------------------------

proptest! {
    /// The seen-types set says "new" exactly when a set of all types would.
    #[test]
    fn seen_extension_types_match_a_set(types in prop::collection::vec(prop_oneof![any::<u16>(), 0u16..80], 0..300)) {
        let mut seen = SeenExtensionTypes::new();
        let mut reference = std::collections::HashSet::new();
        for t in types {
            prop_assert_eq!(seen.insert(t), reference.insert(t), "type {}", t);
        }
    }


    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = parse_client_hello(&bytes);
    }

    #[test]
    fn random_hello_bodies_never_panic_and_are_prefix_stable(
        body in proptest::collection::vec(any::<u8>(), 0..600),
        cut in any::<prop::sample::Index>(),
    ) {
        let bytes = one_record(&handshake_message(&body));
        let full = parse_client_hello(&bytes);
        let prefix = parse_client_hello(&bytes[..cut.index(bytes.len() + 1)]);
        // A verdict on a prefix is final: more bytes never change it.
        if prefix != Parse::NeedMore {
            prop_assert_eq!(prefix, full);
        }
    }

    #[test]
    fn mutated_hellos_are_prefix_stable(
        position in any::<prop::sample::Index>(),
        value in any::<u8>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = split_records(&typical_hello(), &[3, 40, 9]);
        let at = position.index(bytes.len());
        bytes[at] = value;
        let full = parse_client_hello(&bytes);
        let prefix = parse_client_hello(&bytes[..cut.index(bytes.len() + 1)]);
        if prefix != Parse::NeedMore {
            prop_assert_eq!(prefix, full);
        }
    }

    #[test]
    fn random_split_points_do_not_change_result(
        sizes in proptest::collection::vec(1usize..120, 0..40),
    ) {
        let records = split_records(&typical_hello(), &sizes);
        let hello = expect_done(&records);
        prop_assert_eq!(hello.server_name.as_deref(), Some("allowed.test"));
        prop_assert_eq!(hello.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        prop_assert_eq!(hello.consumed, records.len());
    }
}

/// The first record's version is kept for the alert that may refuse the hello: 0x0301 from
/// most clients, whatever the first record says otherwise (here 0x0303, then 0x0301).
#[test]
fn the_first_records_version_is_reported() {
    let message = build_hello(&[sni(b"allowed.test")]);
    let one = split_records(&message, &[]);
    assert_eq!(expect_done(&one).record_version, 0x0301);
    let mut two = split_records(&message, &[10]);
    two[2] = 0x03;
    assert_eq!(expect_done(&two).record_version, 0x0303);
}
