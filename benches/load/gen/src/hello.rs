//! A TLS 1.3-shaped ClientHello for a given server name, built from scratch: one record,
//! the extensions a modern client sends (SNI, groups, signature algorithms, ALPN, supported
//! versions, PSK modes, an x25519 key share) and padding to 512 handshake bytes, as
//! OpenSSL and curl pad. Every proxy under test only parses it; nobody completes TLS.

fn push_u16(out: &mut Vec<u8>, v: usize) {
    out.extend_from_slice(&u16::try_from(v).unwrap_or(u16::MAX).to_be_bytes());
}

fn push_ext(out: &mut Vec<u8>, ty: u16, data: &[u8]) {
    out.extend_from_slice(&ty.to_be_bytes());
    push_u16(out, data.len());
    out.extend_from_slice(data);
}

/// RFC 8446 §4.1.2 ClientHello in one TLS record (RFC 8446 §5.1).
pub fn client_hello(server_name: &str) -> Vec<u8> {
    let name = server_name.as_bytes();
    let mut ext = Vec::new();
    // server_name (RFC 6066 §3): list length, type host_name (0), name length, name.
    let mut sni = Vec::new();
    push_u16(&mut sni, name.len() + 3);
    sni.push(0);
    push_u16(&mut sni, name.len());
    sni.extend_from_slice(name);
    push_ext(&mut ext, 0x0000, &sni);
    push_ext(&mut ext, 0x000a, &[0, 4, 0x00, 0x1d, 0x00, 0x17]); // supported_groups
    push_ext(&mut ext, 0x000b, &[1, 0]); // ec_point_formats
    push_ext(
        &mut ext,
        0x000d,
        &[0, 8, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01, 0x05, 0x03],
    ); // signature_algorithms
    push_ext(
        &mut ext,
        0x0010,
        &[
            0, 12, 2, b'h', b'2', 8, b'h', b't', b't', b'p', b'/', b'1', b'.', b'1',
        ],
    ); // ALPN
    push_ext(&mut ext, 0x002b, &[4, 0x03, 0x04, 0x03, 0x03]); // supported_versions
    push_ext(&mut ext, 0x002d, &[1, 1]); // psk_key_exchange_modes
    let mut key_share = vec![0, 36, 0x00, 0x1d, 0, 32];
    key_share.extend((0u8..32).map(|i| i.wrapping_mul(7).wrapping_add(3)));
    push_ext(&mut ext, 0x0033, &key_share);

    let mut body = vec![0x03, 0x03]; // legacy_version
    body.extend((0u8..32).map(|i| i.wrapping_mul(13).wrapping_add(1))); // random
    body.push(32); // legacy_session_id (middlebox compatibility mode)
    body.extend((0u8..32).map(|i| i.wrapping_mul(5).wrapping_add(9)));
    let suites: [u16; 6] = [0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc030];
    push_u16(&mut body, suites.len() * 2);
    for s in suites {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // compression: null
    // padding (RFC 7685) so the handshake message is 512 bytes.
    let unpadded = 4 + body.len() + 2 + ext.len();
    if unpadded + 4 < 512 {
        push_ext(&mut ext, 0x0015, &vec![0u8; 512 - unpadded - 4]);
    }
    push_u16(&mut body, ext.len());
    body.extend_from_slice(&ext);

    let mut handshake = vec![0x01]; // client_hello
    let len = u32::try_from(body.len()).unwrap_or(0).to_be_bytes();
    handshake.extend_from_slice(&len[1..]);
    handshake.extend_from_slice(&body);

    let mut record = vec![0x16, 0x03, 0x01]; // handshake, legacy_record_version 1.0
    push_u16(&mut record, handshake.len());
    record.extend_from_slice(&handshake);
    record
}
