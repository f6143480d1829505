//! Plain HTTP/1.1 request-head parser for the transparent port-80 path: owns
//! finding the end of the first request head and extracting method,
//! request-target and the Host authority, or a precise rejection.
//!
//! It must not do I/O, rewrite bytes, frame bodies, or guess a host: the
//! caller replays the bytes unchanged. It only looks at ONE head. For
//! pipelined requests the caller must find where the next head starts (after
//! this head's body, framed by Content-Length / Transfer-Encoding), re-parse
//! it and check its Host too; `head_len` marks the end of this head only.
//! It is incremental: any prefix of a valid head is `NeedMore`.
// Untrusted bytes: no indexing or panics, even where clippy would allow them.
#![deny(clippy::indexing_slicing, clippy::panic, clippy::expect_used)]

use std::net::Ipv6Addr;

/// Largest request head (request line + headers + final CRLF CRLF).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

const END_OF_HEAD: &[u8] = b"\r\n\r\n";

/// What a complete, acceptable request head tells us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// request-target exactly as sent (origin-form or absolute-form).
    pub target: String,
    /// Host header value (`host[:port]`) as sent, minus surrounding OWS.
    pub host: String,
    /// Bytes up to and including the CRLF CRLF that ends the head.
    pub head_len: usize,
}

/// Outcome of looking at the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadParse {
    Done(RequestHead),
    /// The bytes so far are a valid prefix; read more and call again.
    NeedMore,
    Reject(HeadReject),
}

/// Why the bytes can never become an acceptable request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadReject {
    /// No end of head within [`MAX_HEAD_BYTES`].
    TooLarge,
    Malformed,
    /// LF without the preceding CR (RFC 9112 §2.2 allows servers to reject).
    BareLf,
    /// Header line continued with leading whitespace (RFC 9112 §5.2).
    ObsFold,
    /// No Host header, or an empty one.
    MissingHost,
    DuplicateHost,
    /// absolute-form authority differs from the Host header.
    HostMismatch,
    /// Not HTTP/1.1 or HTTP/1.0.
    UnsupportedVersion,
    /// userinfo (`user@`) in Host or in the request-target authority.
    Userinfo,
}

/// Parses the first request head in `buf` (all bytes received so far).
pub fn parse_request_head(buf: &[u8]) -> HeadParse {
    match find_head_end(buf) {
        Ok(Some(head_len)) => {
            let head = buf.get(..head_len).unwrap_or_default();
            match parse_head(head) {
                Ok(parsed) => HeadParse::Done(parsed),
                Err(reject) => HeadParse::Reject(reject),
            }
        }
        Ok(None) => HeadParse::NeedMore,
        Err(reject) => HeadParse::Reject(reject),
    }
}

/// Finds the length of the head including CRLF CRLF. Rejects stray CR/LF
/// as soon as they are seen; bytes after the head are never inspected.
fn find_head_end(buf: &[u8]) -> Result<Option<usize>, HeadReject> {
    let window = buf.get(..MAX_HEAD_BYTES).unwrap_or(buf);
    let mut previous: Option<u8> = None;
    for (index, &byte) in window.iter().enumerate() {
        match byte {
            // RFC 9112 §2.2: a bare LF may be a smuggling vector; refuse it.
            b'\n' if previous != Some(b'\r') => return Err(HeadReject::BareLf),
            b'\n' => {
                let start = index.saturating_sub(END_OF_HEAD.len() - 1);
                if window.get(start..=index) == Some(END_OF_HEAD) {
                    return Ok(Some(index + 1));
                }
            }
            _ if previous == Some(b'\r') => return Err(HeadReject::Malformed),
            _ => {}
        }
        previous = Some(byte);
    }
    if buf.len() >= MAX_HEAD_BYTES {
        return Err(HeadReject::TooLarge);
    }
    Ok(None)
}

/// Parses a complete head whose lines are known to end in CRLF only.
fn parse_head(head: &[u8]) -> Result<RequestHead, HeadReject> {
    let head_len = head.len();
    let without_end = head
        .strip_suffix(END_OF_HEAD)
        .ok_or(HeadReject::Malformed)?;
    let mut lines = split_crlf(without_end);
    let request_line = lines.next().ok_or(HeadReject::Malformed)?;
    let (method, target) = parse_request_line(request_line)?;

    let mut host: Option<&[u8]> = None;
    for line in lines {
        let (name, value) = parse_field_line(line)?;
        if name.eq_ignore_ascii_case(b"host") && host.replace(value).is_some() {
            return Err(HeadReject::DuplicateHost);
        }
    }
    let host = host.ok_or(HeadReject::MissingHost)?;
    if host.is_empty() {
        // RFC 9112 §3.2 allows an empty Host; we cannot route it.
        return Err(HeadReject::MissingHost);
    }
    let host = std::str::from_utf8(host).map_err(|_| HeadReject::Malformed)?;
    check_authority(host)?;
    check_target(target, host)?;
    Ok(RequestHead {
        method: method.to_owned(),
        target: target.to_owned(),
        host: host.to_owned(),
        head_len,
    })
}

fn split_crlf(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(bytes);
    std::iter::from_fn(move || {
        let current = rest?;
        match current.windows(2).position(|pair| pair == b"\r\n") {
            Some(at) => {
                rest = current.get(at + 2..);
                current.get(..at)
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

/// RFC 9112 §3: `method SP request-target SP HTTP-version`.
fn parse_request_line(line: &[u8]) -> Result<(&str, &str), HeadReject> {
    let mut parts = line.split(|&byte| byte == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadReject::Malformed);
    };
    if !is_token(method) {
        return Err(HeadReject::Malformed);
    }
    if target.is_empty() || !target.iter().all(|byte| (0x21..=0x7e).contains(byte)) {
        return Err(HeadReject::Malformed);
    }
    if version != b"HTTP/1.1" && version != b"HTTP/1.0" {
        return Err(HeadReject::UnsupportedVersion);
    }
    let method = std::str::from_utf8(method).map_err(|_| HeadReject::Malformed)?;
    let target = std::str::from_utf8(target).map_err(|_| HeadReject::Malformed)?;
    Ok((method, target))
}

/// RFC 9112 §5: `field-name ":" OWS field-value OWS`; returns the trimmed
/// value.
fn parse_field_line(line: &[u8]) -> Result<(&[u8], &[u8]), HeadReject> {
    if matches!(line.first(), Some(b' ' | b'\t')) {
        return Err(HeadReject::ObsFold);
    }
    let colon = line
        .iter()
        .position(|&byte| byte == b':')
        .ok_or(HeadReject::Malformed)?;
    let (name, value) = (line.get(..colon), line.get(colon + 1..));
    let (Some(name), Some(value)) = (name, value) else {
        return Err(HeadReject::Malformed);
    };
    // RFC 9112 §5.1: no whitespace between name and colon; a token
    // check covers it.
    if !is_token(name) {
        return Err(HeadReject::Malformed);
    }
    let value = value.trim_ascii_start();
    let value = trim_ows_end(value);
    // RFC 9110 §5.5: field-vchar, SP, HTAB, obs-text; no other controls.
    let allowed = |byte: &u8| *byte == b'\t' || (*byte >= 0x20 && *byte != 0x7f);
    if !value.iter().all(allowed) {
        return Err(HeadReject::Malformed);
    }
    Ok((name, value))
}

fn trim_ows_end(value: &[u8]) -> &[u8] {
    let end = value
        .iter()
        .rposition(|&byte| byte != b' ' && byte != b'\t')
        .map_or(0, |last| last + 1);
    value.get(..end).unwrap_or_default()
}

/// RFC 9110 §5.6.2 token.
fn is_token(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && bytes
            .iter()
            .all(|byte| byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(byte))
}

/// Validates `host[:port]` for routing; `@` is reported as userinfo.
fn check_authority(authority: &str) -> Result<(), HeadReject> {
    if authority.contains('@') {
        return Err(HeadReject::Userinfo);
    }
    split_host_port(authority)
        .map(|_| ())
        .ok_or(HeadReject::Malformed)
}

/// Accepts origin-form, or absolute-form `http://authority[/?...]` whose
/// authority equals the Host header (RFC 9112 §3.2).
fn check_target(target: &str, host: &str) -> Result<(), HeadReject> {
    if target.starts_with('/') {
        return Ok(());
    }
    const SCHEME: &str = "http://";
    let scheme = target.get(..SCHEME.len()).ok_or(HeadReject::Malformed)?;
    if !scheme.eq_ignore_ascii_case(SCHEME) {
        // authority-form (CONNECT), asterisk-form and other schemes.
        return Err(HeadReject::Malformed);
    }
    let after_scheme = target.get(SCHEME.len()..).unwrap_or_default();
    let authority_end = after_scheme
        .find(['/', '?', '#'])
        .unwrap_or(after_scheme.len());
    let authority = after_scheme.get(..authority_end).unwrap_or_default();
    if authority.contains('@') {
        return Err(HeadReject::Userinfo);
    }
    if authority.is_empty() {
        return Err(HeadReject::Malformed);
    }
    if !authority.eq_ignore_ascii_case(host) {
        return Err(HeadReject::HostMismatch);
    }
    Ok(())
}

/// Splits an authority `host[:port]` (RFC 3986 §3.2.2-3.2.3).
///
/// The host is either a DNS-style name (letters, digits, `-`, `_`, `.`; no
/// percent-encoding or sub-delims, so it compares unambiguously) or a
/// bracketed IPv6 literal, returned without its brackets. The port, if
/// present, must be 1-5 digits and at most 65535. Returns `None` otherwise.
pub fn split_host_port(authority: &str) -> Option<(&str, Option<u16>)> {
    let (host, port_text) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (address, after) = bracketed.split_once(']')?;
        address.parse::<Ipv6Addr>().ok()?;
        let port_text = match after {
            "" => None,
            _ => Some(after.strip_prefix(':')?),
        };
        (address, port_text)
    } else {
        let (host, port_text) = match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        };
        let name_byte =
            |byte: u8| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.');
        if host.is_empty() || !host.bytes().all(name_byte) {
            return None;
        }
        (host, port_text)
    };
    let port = match port_text {
        None => None,
        Some(text) => {
            if text.is_empty() || text.len() > 5 || !text.bytes().all(|byte| byte.is_ascii_digit())
            {
                return None;
            }
            Some(text.parse::<u16>().ok()?)
        }
    };
    Some((host, port))
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn expect_done(bytes: &[u8]) -> RequestHead {
        match parse_request_head(bytes) {
            HeadParse::Done(head) => head,
            other => panic!(
                "expected Done for {:?}, got {other:?}",
                String::from_utf8_lossy(bytes)
            ),
        }
    }

    fn reject_of(bytes: &[u8]) -> HeadReject {
        match parse_request_head(bytes) {
            HeadParse::Reject(reject) => reject,
            other => panic!(
                "expected Reject for {:?}, got {other:?}",
                String::from_utf8_lossy(bytes)
            ),
        }
    }

    fn assert_every_prefix_needs_more(bytes: &[u8]) {
        for cut in 0..bytes.len() {
            assert_eq!(
                parse_request_head(&bytes[..cut]),
                HeadParse::NeedMore,
                "prefix {cut}"
            );
        }
    }

    const VALID_HEADS: &[&str] = &[
        "GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
        "GET /a/b?c=d HTTP/1.1\r\nHost:allowed.test:8080\r\nUser-Agent: x y\r\nAccept: */*\r\n\r\n",
        "POST /upload HTTP/1.0\r\nhOsT: \t Allowed.Test \t\r\nContent-Length: 3\r\n\r\n",
        "GET http://Allowed.test/path HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
        "GET HTTP://allowed.test:80?q HTTP/1.1\r\nHost: allowed.test:80\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "M-SEARCH /x HTTP/1.1\r\nHost: a\r\n\r\n",
    ];

    #[test]
    fn valid_heads_and_all_their_prefixes() {
        for text in VALID_HEADS {
            let bytes = text.as_bytes();
            assert_every_prefix_needs_more(bytes);
            let head = expect_done(bytes);
            assert_eq!(head.head_len, bytes.len());
        }
    }

    #[test]
    fn fields_are_extracted_as_sent() {
        let head = expect_done(VALID_HEADS[2].as_bytes());
        assert_eq!(head.method, "POST");
        assert_eq!(head.target, "/upload");
        assert_eq!(head.host, "Allowed.Test");
        let head = expect_done(VALID_HEADS[3].as_bytes());
        assert_eq!(head.target, "http://Allowed.test/path");
        assert_eq!(head.host, "allowed.test");
    }

    #[test]
    fn body_bytes_after_head_are_not_inspected() {
        let bytes = b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\n\n\r\0\xff!";
        let head = expect_done(bytes);
        assert_eq!(head.head_len, bytes.len() - 5);
    }

    /// The caller must re-parse from `head_len` (plus any body) and compare
    /// the Host of every pipelined request.
    #[test]
    fn pipelined_requests_return_first_head_only() {
        let first = "GET /1 HTTP/1.1\r\nHost: allowed.test\r\n\r\n";
        let second = "GET /2 HTTP/1.1\r\nHost: evil.test\r\n\r\n";
        let both = format!("{first}{second}");
        let head = expect_done(both.as_bytes());
        assert_eq!(head.target, "/1");
        assert_eq!(head.head_len, first.len());
        let next = expect_done(&both.as_bytes()[head.head_len..]);
        assert_eq!(next.host, "evil.test");
    }

    #[test]
    fn each_reject() {
        let cases: &[(&[u8], HeadReject)] = &[
            (b"GET / HTTP/1.1\nHost: a\r\n\r\n", HeadReject::BareLf),
            (b"GET / HTTP/1.1\r\nHost: a\n\r\n", HeadReject::BareLf),
            (b"\n", HeadReject::BareLf),
            (
                b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n",
                HeadReject::Malformed,
            ),
            (b"GET / HTTP/1.1\r\r\n", HeadReject::Malformed),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
                HeadReject::ObsFold,
            ),
            (
                b"GET / HTTP/1.1\r\nX: 1\r\n\tfolded\r\nHost: a\r\n\r\n",
                HeadReject::ObsFold,
            ),
            (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", HeadReject::Malformed),
            (
                b"GET / HTTP/1.1\r\nNoColon\r\nHost: a\r\n\r\n",
                HeadReject::Malformed,
            ),
            (
                b"GET / HTTP/1.1\r\n: empty-name\r\nHost: a\r\n\r\n",
                HeadReject::Malformed,
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\0b\r\n\r\n",
                HeadReject::Malformed,
            ),
            (
                b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n",
                HeadReject::MissingHost,
            ),
            (
                b"GET / HTTP/1.1\r\nHost:  \r\n\r\n",
                HeadReject::MissingHost,
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n",
                HeadReject::DuplicateHost,
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nHOST: b\r\n\r\n",
                HeadReject::DuplicateHost,
            ),
            (
                b"GET http://b.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
                HeadReject::HostMismatch,
            ),
            (
                b"GET http://a.test:80/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
                HeadReject::HostMismatch,
            ),
            (
                b"GET http://u@a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
                HeadReject::Userinfo,
            ),
            (
                b"GET / HTTP/1.1\r\nHost: user:pw@a.test\r\n\r\n",
                HeadReject::Userinfo,
            ),
            (
                b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
                HeadReject::UnsupportedVersion,
            ),
            (
                b"GET / HTTP/1.2\r\nHost: a\r\n\r\n",
                HeadReject::UnsupportedVersion,
            ),
            (
                b"GET / http/1.1\r\nHost: a\r\n\r\n",
                HeadReject::UnsupportedVersion,
            ),
            (b"GET /\r\nHost: a\r\n\r\n", HeadReject::Malformed),
            (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", HeadReject::Malformed),
            (b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", HeadReject::Malformed),
            (b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", HeadReject::Malformed),
            (
                b"GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n",
                HeadReject::Malformed,
            ),
            (
                b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n",
                HeadReject::Malformed,
            ),
            (
                b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
                HeadReject::Malformed,
            ),
            (
                b"GET https://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
                HeadReject::Malformed,
            ),
            (
                b"GET http:///x HTTP/1.1\r\nHost: a.test\r\n\r\n",
                HeadReject::Malformed,
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a.test:99999\r\n\r\n",
                HeadReject::Malformed,
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a.test:\r\n\r\n",
                HeadReject::Malformed,
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a.test:8x\r\n\r\n",
                HeadReject::Malformed,
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
                HeadReject::Malformed,
            ),
            (
                b"GET / HTTP/1.1\r\nHost: [zz::1]\r\n\r\n",
                HeadReject::Malformed,
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a%2e.test\r\n\r\n",
                HeadReject::Malformed,
            ),
            (b"\r\n\r\n", HeadReject::Malformed),
            (
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
                HeadReject::Malformed,
            ),
        ];
        for (bytes, expected) in cases {
            assert_eq!(
                reject_of(bytes),
                *expected,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn oversized_head_is_too_large() {
        let mut bytes = b"GET / HTTP/1.1\r\nHost: a\r\nX: ".to_vec();
        bytes.resize(MAX_HEAD_BYTES - 1, b'x');
        assert_eq!(parse_request_head(&bytes), HeadParse::NeedMore);
        bytes.push(b'x');
        assert_eq!(reject_of(&bytes), HeadReject::TooLarge);
        // A head of exactly MAX_HEAD_BYTES still fits.
        bytes.truncate(MAX_HEAD_BYTES - 4);
        bytes.extend_from_slice(b"\r\n\r\n");
        assert_eq!(expect_done(&bytes).head_len, MAX_HEAD_BYTES);
    }

    #[test]
    fn split_host_port_forms() {
        assert_eq!(split_host_port("a.test"), Some(("a.test", None)));
        assert_eq!(split_host_port("a.test:8080"), Some(("a.test", Some(8080))));
        assert_eq!(
            split_host_port("a.test:65535"),
            Some(("a.test", Some(65535)))
        );
        assert_eq!(split_host_port("[::1]"), Some(("::1", None)));
        assert_eq!(
            split_host_port("[2001:db8::1]:443"),
            Some(("2001:db8::1", Some(443)))
        );
        assert_eq!(split_host_port("10.0.0.1:80"), Some(("10.0.0.1", Some(80))));
        for bad in [
            "",
            ":80",
            "a.test:",
            "a.test:65536",
            "a.test:123456",
            "a:b:c",
            "::1",
            "[::1",
            "[::1]x",
            "[::1]:",
            "[fe80::1%eth0]",
            "a test",
            "a@b",
            "a/b",
            "ü.test",
        ] {
            assert_eq!(split_host_port(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_request_head(&bytes);
        }

        #[test]
        fn random_head_lines_never_panic_and_are_prefix_stable(
            lines in proptest::collection::vec("[ -~\t\r\n]{0,30}", 0..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let bytes = format!("GET / HTTP/1.1\r\n{}\r\n\r\n", lines.join("\r\n")).into_bytes();
            let full = parse_request_head(&bytes);
            let prefix = parse_request_head(&bytes[..cut.index(bytes.len() + 1)]);
            if prefix != HeadParse::NeedMore {
                prop_assert_eq!(prefix, full);
            }
        }

        #[test]
        fn random_split_host_port_never_panics(text in "\\PC{0,40}") {
            let _ = split_host_port(&text);
        }
    }
}
