//! A JSON object written field by field, for the connection log: the keys are fixed ASCII
//! names written as they are, only values are escaped, and numbers need no formatter.
//! serde_json escaped every key byte by byte and was most of the log's cost per connection.
//!
//! It writes into a `Vec<u8>` and nothing else: pushing a byte or a short slice into a vector
//! is a few instructions, where every `io::Write::write_all` was a call and a length check
//! (an IPv4 address was eight of them). Callgrind, 64 concurrent tunnels: about 2,000
//! instructions less per connection log line.

use std::net::IpAddr;

/// A field's name as it is written, `,"name":`, made by [`key!`] at compile time: one copy
/// per field (the comma is left out before the first).
#[derive(Clone, Copy)]
pub(super) struct Key(&'static str);

impl Key {
    /// `text` must be `,"name":` with a name of printable ASCII that needs no escape;
    /// [`key!`] evaluates this in a constant, so a bad name fails the build.
    pub(super) const fn new(text: &'static str) -> Self {
        let b = text.as_bytes();
        let n = b.len();
        assert!(n > 4 && b[0] == b',' && b[1] == b'"' && b[n - 2] == b'"' && b[n - 1] == b':');
        let mut i = 2;
        while i < n - 2 {
            assert!(b[i].is_ascii_graphic() && !needs_escape(b[i]));
            i += 1;
        }
        Self(text)
    }
}

/// The [`Key`] of a field named by a string literal.
macro_rules! key {
    ($name:literal) => {
        const { $crate::telemetry::json::Key::new(concat!(",\"", $name, "\":")) }
    };
}
pub(super) use key;

/// One object being written to `out`: `{` before the first field, `}` at [`Object::end`].
pub(super) struct Object<'w> {
    out: &'w mut Vec<u8>,
    empty: bool,
}

impl<'w> Object<'w> {
    pub(super) fn begin(out: &'w mut Vec<u8>) -> Self {
        Self { out, empty: true }
    }

    /// `"key":`, after a comma unless it is the first field (then after the `{`).
    fn key(&mut self, key: Key) {
        let text = key.0.as_bytes();
        if self.empty {
            self.empty = false;
            self.out.push(b'{');
            self.out
                .extend_from_slice(text.get(1..).unwrap_or_default());
        } else {
            self.out.extend_from_slice(text);
        }
    }

    pub(super) fn str(&mut self, key: Key, value: &str) {
        self.key(key);
        write_string(self.out, value);
    }

    pub(super) fn u64(&mut self, key: Key, value: u64) {
        self.key(key);
        let mut digits = [0u8; 20];
        self.out.extend_from_slice(decimal(value, &mut digits));
    }

    pub(super) fn ip(&mut self, key: Key, value: IpAddr) {
        self.key(key);
        // An address's text is digits, hex, dots and colons: nothing to escape.
        match value {
            IpAddr::V4(v4) => {
                // "255.255.255.255" with its quotes is 17 bytes: formatted on the stack,
                // then copied once.
                let mut text = [0u8; 17];
                let mut len = 0;
                let mut put = |b: u8| {
                    if let Some(slot) = text.get_mut(len) {
                        *slot = b;
                        len += 1;
                    }
                };
                put(b'"');
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        put(b'.');
                    }
                    if octet >= 100 {
                        put(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        put(b'0' + octet / 10 % 10);
                    }
                    put(b'0' + octet % 10);
                }
                put(b'"');
                self.out
                    .extend_from_slice(text.get(..len).unwrap_or_default());
            }
            IpAddr::V6(v6) => {
                use std::io::Write;
                // Writing into a vector cannot fail.
                let _ = write!(self.out, "\"{v6}\"");
            }
        }
    }

    pub(super) fn bool(&mut self, key: Key, value: bool) {
        self.key(key);
        self.out
            .extend_from_slice(if value { b"true" } else { b"false" });
    }

    pub(super) fn opt_str(&mut self, key: Key, value: Option<&str>) {
        if let Some(v) = value {
            self.str(key, v);
        }
    }

    pub(super) fn opt_u64(&mut self, key: Key, value: Option<u64>) {
        if let Some(v) = value {
            self.u64(key, v);
        }
    }

    pub(super) fn opt_ip(&mut self, key: Key, value: Option<IpAddr>) {
        if let Some(v) = value {
            self.ip(key, v);
        }
    }

    /// The closing brace (`{}` for an object with no fields).
    pub(super) fn end(self) {
        self.out
            .extend_from_slice(if self.empty { b"{}" } else { b"}" });
    }
}

/// JSON (RFC 8259 §7) must escape `"`, `\` and the control characters below U+0020.
const fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// [`needs_escape`] for any of a word's eight bytes, without a branch per byte: the classic
/// "has a byte less than n" and "has a zero byte" tests (exact for n <= 128).
fn any_needs_escape(word: u64) -> bool {
    const ONES: u64 = u64::MAX / 255;
    const HIGH: u64 = ONES * 0x80;
    let less_than = |n: u64| word.wrapping_sub(ONES * n) & !word & HIGH != 0;
    let has_zero = |w: u64| w.wrapping_sub(ONES) & !w & HIGH != 0;
    less_than(0x20)
        || has_zero(word ^ (ONES * u64::from(b'"')))
        || has_zero(word ^ (ONES * u64::from(b'\\')))
}

/// Whether any byte of `bytes` needs an escape: eight bytes at a time, the last word
/// overlapping the one before it, so a string of eight bytes or more is never looked at
/// byte by byte.
fn any_byte_needs_escape(bytes: &[u8]) -> bool {
    let word_at = |i: usize| {
        bytes
            .get(i..i + 8)
            .and_then(|w| <[u8; 8]>::try_from(w).ok())
            .map(u64::from_le_bytes)
    };
    if bytes.len() < 8 {
        return bytes.iter().any(|&b| needs_escape(b));
    }
    let mut i = 0;
    while i + 8 <= bytes.len() {
        if word_at(i).is_some_and(any_needs_escape) {
            return true;
        }
        i += 8;
    }
    i < bytes.len() && word_at(bytes.len() - 8).is_some_and(any_needs_escape)
}

/// `value` as a JSON string: copied whole when nothing in it needs an escape (the usual
/// case), else run by run.
fn write_string(out: &mut Vec<u8>, value: &str) {
    let bytes = value.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    if any_byte_needs_escape(bytes) {
        write_escaped(out, bytes);
    } else {
        out.extend_from_slice(bytes);
    }
    out.push(b'"');
}

/// `bytes` with the escapes JSON needs: runs that need none are written whole.
fn write_escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut start = 0;
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        // Eight bytes at a time past runs with nothing to escape (most values are all run).
        if let Some(word) = bytes
            .get(i..i + 8)
            .and_then(|w| <[u8; 8]>::try_from(w).ok())
            && !any_needs_escape(u64::from_le_bytes(word))
        {
            i += 8;
            continue;
        }
        if !needs_escape(b) {
            i += 1;
            continue;
        }
        out.extend_from_slice(bytes.get(start..i).unwrap_or_default());
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                let hex = |n: u8| HEX.get(usize::from(n & 0xf)).copied().unwrap_or(b'0');
                out.extend_from_slice(&[b'\\', b'u', b'0', b'0', hex(b >> 4), hex(b)]);
            }
        }
        i += 1;
        start = i;
    }
    out.extend_from_slice(bytes.get(start..).unwrap_or_default());
}

/// `value` in decimal, written into the end of `digits`.
fn decimal(mut value: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut at = digits.len();
    loop {
        at -= 1;
        if let Some(d) = digits.get_mut(at) {
            *d = b'0' + (value % 10) as u8;
        }
        value /= 10;
        if value == 0 {
            break;
        }
    }
    digits.get(at..).unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn object(fill: impl FnOnce(&mut Object<'_>)) -> String {
        let mut out = Vec::new();
        let mut o = Object::begin(&mut out);
        fill(&mut o);
        o.end();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn fields_numbers_addresses_and_escapes() {
        let line = object(|o| {
            o.str(key!("a.b"), "plain");
            o.u64(key!("zero"), 0);
            o.u64(key!("max"), u64::MAX);
            o.ip(key!("v4"), "10.0.0.1".parse().unwrap());
            o.ip(key!("v4max"), "255.255.255.255".parse().unwrap());
            o.ip(key!("v4zero"), "0.0.0.0".parse().unwrap());
            o.ip(key!("v4mixed"), "100.9.99.250".parse().unwrap());
            o.ip(key!("v6"), "2001:db8::1".parse().unwrap());
            o.bool(key!("yes"), true);
            o.opt_str(key!("absent"), None);
            o.opt_u64(key!("port"), Some(443));
            o.str(key!("tricky"), "q\"b\\n\nr\rt\tnul\0\u{1f}é😀");
        });
        assert_eq!(
            line,
            r#"{"a.b":"plain","zero":0,"max":18446744073709551615,"v4":"10.0.0.1","v4max":"255.255.255.255","v4zero":"0.0.0.0","v4mixed":"100.9.99.250","v6":"2001:db8::1","yes":true,"port":443,"tricky":"q\"b\\n\nr\rt\tnul\u0000\u001fé😀"}"#
        );
        assert_eq!(object(|_| ()), "{}");
    }

    proptest! {
        /// The word test says what the byte test says of any of its bytes (bytes drawn
        /// around every edge: 0x1f/0x20, the quote and backslash and their neighbours,
        /// UTF-8 bytes with the high bit set).
        #[test]
        fn the_word_test_matches_the_byte_test(
            word in proptest::array::uniform8(proptest::sample::select(vec![
                0x00_u8, 0x01, 0x1f, 0x20, 0x21, b'"', b'#', b'[', b'\\', b']', b'a', 0x7f,
                0x80, 0x9f, 0xa0, 0xdf, 0xe0, 0xff,
            ]))
        ) {
            prop_assert_eq!(
                any_needs_escape(u64::from_le_bytes(word)),
                word.iter().any(|&b| needs_escape(b)),
                "{:?}", word
            );
        }

        /// The whole-string test says what the byte test says, at every length around the
        /// word size (bytes drawn around every edge, as above).
        #[test]
        fn the_string_test_matches_the_byte_test(
            bytes in proptest::collection::vec(proptest::sample::select(vec![
                0x00_u8, 0x1f, 0x20, b'"', b'\\', b'a', 0x7f, 0x80, 0xff,
                b'b', b'c', b'd', b'e', b'f', b'g', b'h',
            ]), 0..40)
        ) {
            prop_assert_eq!(
                any_byte_needs_escape(&bytes),
                bytes.iter().any(|&b| needs_escape(b)),
                "{:?}", bytes
            );
        }

        /// Whatever the strings and numbers, the line parses as JSON and gives them back.
        #[test]
        fn any_value_round_trips(
            s in any::<String>(),
            t in "[\\x00-\\x7f]{0,40}",
            n in any::<u64>(),
            ip in any::<IpAddr>(),
        ) {
            let line = object(|o| {
                o.str(key!("s"), &s);
                o.u64(key!("n"), n);
                o.ip(key!("ip"), ip);
                o.str(key!("t"), &t);
            });
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            prop_assert_eq!(v["s"].as_str().unwrap(), s.as_str());
            prop_assert_eq!(v["n"].as_u64().unwrap(), n);
            prop_assert_eq!(v["t"].as_str().unwrap(), t.as_str());
            prop_assert_eq!(v["ip"].as_str().unwrap(), ip.to_string());
        }
    }
}
