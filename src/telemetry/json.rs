//! A JSON object written field by field, for the connection log: the keys are fixed ASCII
//! names written as they are, only values are escaped, and numbers need no formatter.
//! serde_json escaped every key byte by byte and was most of the log's cost per connection.

use std::io::{self, Write};
use std::net::IpAddr;

/// One object being written to `out`: `{` before the first field, `}` at [`Object::end`].
pub(super) struct Object<'w, W: Write> {
    out: &'w mut W,
    empty: bool,
}

impl<'w, W: Write> Object<'w, W> {
    pub(super) fn begin(out: &'w mut W) -> Self {
        Self { out, empty: true }
    }

    /// `"key":`, after a comma unless it is the first field. Keys are plain ASCII names
    /// (checked in debug builds): nothing in them needs escaping.
    fn key(&mut self, key: &'static str) -> io::Result<()> {
        debug_assert!(
            key.bytes()
                .all(|b| b.is_ascii_graphic() && !needs_escape(b))
        );
        let open: &[u8] = if self.empty { b"{\"" } else { b",\"" };
        self.empty = false;
        self.out.write_all(open)?;
        self.out.write_all(key.as_bytes())?;
        self.out.write_all(b"\":")
    }

    pub(super) fn str(&mut self, key: &'static str, value: &str) -> io::Result<()> {
        self.key(key)?;
        write_string(self.out, value)
    }

    pub(super) fn u64(&mut self, key: &'static str, value: u64) -> io::Result<()> {
        self.key(key)?;
        let mut digits = [0u8; 20];
        self.out.write_all(decimal(value, &mut digits))
    }

    pub(super) fn ip(&mut self, key: &'static str, value: IpAddr) -> io::Result<()> {
        self.key(key)?;
        // An address's text is digits, hex, dots and colons: nothing to escape.
        match value {
            IpAddr::V4(v4) => {
                let mut digits = [0u8; 20];
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    self.out.write_all(if i == 0 { b"\"" } else { b"." })?;
                    self.out.write_all(decimal(octet.into(), &mut digits))?;
                }
                self.out.write_all(b"\"")
            }
            IpAddr::V6(v6) => write!(self.out, "\"{v6}\""),
        }
    }

    pub(super) fn bool(&mut self, key: &'static str, value: bool) -> io::Result<()> {
        self.key(key)?;
        self.out.write_all(if value { b"true" } else { b"false" })
    }

    pub(super) fn opt_str(&mut self, key: &'static str, value: Option<&str>) -> io::Result<()> {
        value.map_or(Ok(()), |v| self.str(key, v))
    }

    pub(super) fn opt_u64(&mut self, key: &'static str, value: Option<u64>) -> io::Result<()> {
        value.map_or(Ok(()), |v| self.u64(key, v))
    }

    pub(super) fn opt_ip(&mut self, key: &'static str, value: Option<IpAddr>) -> io::Result<()> {
        value.map_or(Ok(()), |v| self.ip(key, v))
    }

    /// The closing brace (`{}` for an object with no fields).
    pub(super) fn end(self) -> io::Result<()> {
        self.out.write_all(if self.empty { b"{}" } else { b"}" })
    }
}

/// JSON (RFC 8259 §7) must escape `"`, `\` and the control characters below U+0020.
fn needs_escape(b: u8) -> bool {
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

/// `value` as a JSON string: runs that need no escape are written whole.
fn write_string(out: &mut impl Write, value: &str) -> io::Result<()> {
    out.write_all(b"\"")?;
    let bytes = value.as_bytes();
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
        out.write_all(bytes.get(start..i).unwrap_or_default())?;
        match b {
            b'"' => out.write_all(b"\\\"")?,
            b'\\' => out.write_all(b"\\\\")?,
            b'\n' => out.write_all(b"\\n")?,
            b'\r' => out.write_all(b"\\r")?,
            b'\t' => out.write_all(b"\\t")?,
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                let hex = |n: u8| HEX.get(usize::from(n & 0xf)).copied().unwrap_or(b'0');
                out.write_all(&[b'\\', b'u', b'0', b'0', hex(b >> 4), hex(b)])?;
            }
        }
        i += 1;
        start = i;
    }
    out.write_all(bytes.get(start..).unwrap_or_default())?;
    out.write_all(b"\"")
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

    fn object(fill: impl FnOnce(&mut Object<'_, Vec<u8>>) -> io::Result<()>) -> String {
        let mut out = Vec::new();
        let mut o = Object::begin(&mut out);
        fill(&mut o).unwrap();
        o.end().unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn fields_numbers_addresses_and_escapes() {
        let line = object(|o| {
            o.str("a.b", "plain")?;
            o.u64("zero", 0)?;
            o.u64("max", u64::MAX)?;
            o.ip("v4", "10.0.0.1".parse().unwrap())?;
            o.ip("v4max", "255.255.255.255".parse().unwrap())?;
            o.ip("v4zero", "0.0.0.0".parse().unwrap())?;
            o.ip("v6", "2001:db8::1".parse().unwrap())?;
            o.bool("yes", true)?;
            o.opt_str("absent", None)?;
            o.opt_u64("port", Some(443))?;
            o.str("tricky", "q\"b\\n\nr\rt\tnul\0\u{1f}é😀")
        });
        assert_eq!(
            line,
            r#"{"a.b":"plain","zero":0,"max":18446744073709551615,"v4":"10.0.0.1","v4max":"255.255.255.255","v4zero":"0.0.0.0","v6":"2001:db8::1","yes":true,"port":443,"tricky":"q\"b\\n\nr\rt\tnul\u0000\u001fé😀"}"#
        );
        assert_eq!(object(|_| Ok(())), "{}");
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

        /// Whatever the strings and numbers, the line parses as JSON and gives them back.
        #[test]
        fn any_value_round_trips(
            s in any::<String>(),
            t in "[\\x00-\\x7f]{0,40}",
            n in any::<u64>(),
            ip in any::<IpAddr>(),
        ) {
            let line = object(|o| {
                o.str("s", &s)?;
                o.u64("n", n)?;
                o.ip("ip", ip)?;
                o.str("t", &t)
            });
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            prop_assert_eq!(v["s"].as_str().unwrap(), s.as_str());
            prop_assert_eq!(v["n"].as_u64().unwrap(), n);
            prop_assert_eq!(v["t"].as_str().unwrap(), t.as_str());
            prop_assert_eq!(v["ip"].as_str().unwrap(), ip.to_string());
        }
    }
}
