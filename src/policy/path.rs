//! The request-path normaliser of inspect mode: one canonical form per path, or a refusal.
//!
//! Pure and bounded (linear in the input, which is capped at [`MAX_PATH_LEN`]). The path an
//! `[[http]]` rule is matched against is exactly the path forwarded upstream, so the gateway
//! and the upstream cannot disagree on what was asked for. Following RFC 3986 §6.2.2:
//! percent-encoded unreserved characters are decoded, other percent-encodings are kept with
//! upper-case hex, dot segments are resolved. Refused as ambiguous (servers differ on them,
//! which is how path-confusion attacks slip past a proxy's rules):
//!
//! - an encoded `/` or `\` (`%2F`, `%5C`), and a raw `\`;
//! - an encoded dot in a segment that decodes to `.` or `..` (`%2e%2e`, `.%2E`, any case);
//! - double encoding: `%25` followed by two hex digits (`%252e`);
//! - NUL (raw or `%00`), other control characters, raw bytes outside ASCII;
//! - percent-encoded bytes that are not valid UTF-8 (overlong forms, surrogates, truncated
//!   sequences);
//! - `;` anywhere (path parameters: some servers strip `;x` from a segment, some treat
//!   `..;` as `..`);
//! - empty segments (`//`): some servers merge them, some do not;
//! - a `..` that would climb above the root;
//! - a path not starting with `/`, a malformed `%`, or more than [`MAX_PATH_LEN`] bytes
//!   (before or after normalising).
//!
//! The query string is not part of the path: the caller splits it off first.

use std::fmt;

/// Longest path accepted, in bytes.
pub const MAX_PATH_LEN: usize = 8192;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path does not start with `/`")]
    NotAbsolute,
    #[error("path longer than {MAX_PATH_LEN} bytes")]
    TooLong,
    #[error("malformed percent-encoding")]
    BadPercent,
    #[error("encoded `/` or `\\`, or a raw `\\`")]
    EncodedSeparator,
    #[error("encoded dot segment")]
    EncodedDot,
    #[error("double percent-encoding")]
    DoubleEncoding,
    #[error("NUL or control character")]
    Control,
    #[error("raw byte outside ASCII")]
    RawNonAscii,
    #[error("percent-encoded bytes are not valid UTF-8")]
    BadUtf8,
    #[error("`;` path parameters")]
    Parameters,
    #[error("empty path segment (`//`)")]
    EmptySegment,
    #[error("`..` above the root")]
    AboveRoot,
}

impl PathError {
    /// A short stable name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotAbsolute => "not_absolute",
            Self::TooLong => "too_long",
            Self::BadPercent => "bad_percent",
            Self::EncodedSeparator => "encoded_separator",
            Self::EncodedDot => "encoded_dot",
            Self::DoubleEncoding => "double_encoding",
            Self::Control => "control",
            Self::RawNonAscii => "raw_non_ascii",
            Self::BadUtf8 => "bad_utf8",
            Self::Parameters => "parameters",
            Self::EmptySegment => "empty_segment",
            Self::AboveRoot => "above_root",
        }
    }
}

/// A normalised path: ASCII, starts with `/`, no dot segments, no empty segments (except a
/// trailing `/`), every `%` followed by two upper-case hex digits of a byte that is not
/// unreserved.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NormalPath(String);

impl NormalPath {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NormalPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Raw characters allowed in a path segment (RFC 3986 `pchar` minus `%`, and minus `;`,
/// which is refused on its own).
fn is_raw_pchar(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=' | b':' | b'@'
        )
}

/// One segment, normalised, appended to `out`.
fn segment(raw: &[u8], out: &mut String) -> Result<(), PathError> {
    let mut i = 0;
    let mut encoded_dot = false;
    // Percent-encoded bytes ≥ 0x80 must form UTF-8: collect the run and check it whole.
    let mut run: Vec<u8> = Vec::new();
    let flush = |run: &mut Vec<u8>, out: &mut String| -> Result<(), PathError> {
        if run.is_empty() {
            return Ok(());
        }
        std::str::from_utf8(run).map_err(|_| PathError::BadUtf8)?;
        for b in run.drain(..) {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b >> 4)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b & 0xf)]));
        }
        Ok(())
    };
    let start = out.len();
    while i < raw.len() {
        let b = raw[i];
        if b == b'%' {
            let (Some(h), Some(l)) = (
                raw.get(i + 1).copied().and_then(hex_val),
                raw.get(i + 2).copied().and_then(hex_val),
            ) else {
                return Err(PathError::BadPercent);
            };
            let d = h << 4 | l;
            i += 3;
            if d >= 0x80 {
                run.push(d);
                continue;
            }
            flush(&mut run, out)?;
            match d {
                b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                0 => return Err(PathError::Control),
                b'.' => {
                    encoded_dot = true;
                    out.push('.');
                }
                d if is_unreserved(d) => out.push(char::from(d)),
                d => {
                    out.push('%');
                    out.push(char::from(b"0123456789ABCDEF"[usize::from(d >> 4)]));
                    out.push(char::from(b"0123456789ABCDEF"[usize::from(d & 0xf)]));
                }
            }
            continue;
        }
        flush(&mut run, out)?;
        match b {
            b'\\' => return Err(PathError::EncodedSeparator),
            b';' => return Err(PathError::Parameters),
            0..=0x20 | 0x7f => return Err(PathError::Control),
            0x80.. => return Err(PathError::RawNonAscii),
            b if is_raw_pchar(b) => out.push(char::from(b)),
            // `"`, `<`, `>`, `^`, `` ` ``, `{`, `|`, `}`, `[`, `]`, `?`, `#`: not raw path
            // characters; kept encoded, as a client should have sent them.
            b => {
                out.push('%');
                out.push(char::from(b"0123456789ABCDEF"[usize::from(b >> 4)]));
                out.push(char::from(b"0123456789ABCDEF"[usize::from(b & 0xf)]));
            }
        }
        i += 1;
    }
    flush(&mut run, out)?;
    let text = &out[start..];
    // An encoded `%` before two hex digits decodes to a percent-encoding: double encoding,
    // whatever mix of raw and encoded digits produced it.
    let t = text.as_bytes();
    if t.windows(5)
        .any(|w| w[..3] == *b"%25" && hex_val(w[3]).is_some() && hex_val(w[4]).is_some())
    {
        return Err(PathError::DoubleEncoding);
    }
    if encoded_dot && (text == "." || text == "..") {
        return Err(PathError::EncodedDot);
    }
    Ok(())
}

/// Normalise `path` (no query string), or say why it is ambiguous.
pub fn normalize(path: &str) -> Result<NormalPath, PathError> {
    let bytes = path.as_bytes();
    if bytes.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong);
    }
    let Some(rest) = bytes.strip_prefix(b"/") else {
        return Err(PathError::NotAbsolute);
    };
    // Output segments as ranges of `buf`; `..` pops one.
    let mut buf = String::with_capacity(bytes.len());
    let mut segs: Vec<(usize, usize)> = Vec::new();
    let raw_segs: Vec<&[u8]> = rest.split(|&b| b == b'/').collect();
    let last = raw_segs.len() - 1;
    // Does the output end with `/` (a trailing empty segment, or a final dot segment)?
    let mut trailing_slash = false;
    for (n, raw) in raw_segs.iter().enumerate() {
        if raw.is_empty() {
            if n == last {
                trailing_slash = true;
                continue;
            }
            return Err(PathError::EmptySegment);
        }
        let start = buf.len();
        segment(raw, &mut buf)?;
        match &buf[start..] {
            "." => {
                buf.truncate(start);
                trailing_slash = n == last;
            }
            ".." => {
                buf.truncate(start);
                let (s, _) = segs.pop().ok_or(PathError::AboveRoot)?;
                buf.truncate(s);
                trailing_slash = n == last;
            }
            _ => {
                segs.push((start, buf.len()));
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(buf.len() + segs.len() + 1);
    for (s, e) in &segs {
        out.push('/');
        out.push_str(&buf[*s..*e]);
    }
    if trailing_slash || segs.is_empty() {
        out.push('/');
    }
    // Encoding raw characters can triple them: the normal form is bounded too (and so
    // normalises to itself).
    if out.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong);
    }
    Ok(NormalPath(out))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(p: &str) -> String {
        normalize(p)
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .as_str()
            .to_owned()
    }

    #[test]
    fn canonical_forms() {
        for (input, want) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("/a/./b", "/a/b"),
            ("/a/b/..", "/a/"),
            ("/a/b/../c", "/a/c"),
            ("/a/.", "/a/"),
            ("/..x/.y", "/..x/.y"),
            ("/%7Euser/%41%62%2d%5F", "/~user/Ab-_"),
            ("/file%2ejson", "/file.json"),
            ("/a%20b/%3f%23%3B", "/a%20b/%3F%23%3B"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/q%25", "/q%25"),
            ("/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,="),
            ("/a|b", "/a%7Cb"),
        ] {
            assert_eq!(ok(input), want, "{input}");
        }
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        use PathError::*;
        for (input, want) in [
            ("a/b", NotAbsolute),
            ("", NotAbsolute),
            ("/a%2fb", EncodedSeparator),
            ("/a%2Fb", EncodedSeparator),
            ("/a%5cb", EncodedSeparator),
            ("/a\\b", EncodedSeparator),
            ("/a/%2e%2e/b", EncodedDot),
            ("/a/%2E%2e/b", EncodedDot),
            ("/a/.%2e/b", EncodedDot),
            ("/a/%2e./b", EncodedDot),
            ("/a/%2e/b", EncodedDot),
            ("/a/%252e%252e/b", DoubleEncoding),
            ("/a%252fb", DoubleEncoding),
            ("/a%25%41%42", DoubleEncoding),
            ("/a%00", Control),
            ("/a\0", Control),
            ("/a b", Control),
            ("/a\tb", Control),
            ("/caf\u{e9}", RawNonAscii),
            ("/%c0%af", BadUtf8),
            ("/%e0%80%af", BadUtf8),
            ("/%ed%a0%80", BadUtf8),
            ("/%c3", BadUtf8),
            ("/%ff", BadUtf8),
            ("/admin;x=1/secret", Parameters),
            ("/public/..;/admin", Parameters),
            ("/a//b", EmptySegment),
            ("//a", EmptySegment),
            ("/..", AboveRoot),
            ("/a/../../b", AboveRoot),
            ("/a%2", BadPercent),
            ("/a%zz", BadPercent),
            ("/a%", BadPercent),
        ] {
            assert_eq!(normalize(input), Err(want), "{input:?}");
        }
        assert_eq!(
            normalize(&format!("/{}", "a".repeat(MAX_PATH_LEN))),
            Err(PathError::TooLong)
        );
        // Short enough raw, too long once its characters are encoded (found by the fuzzer).
        assert_eq!(
            normalize(&format!("/{}", "|".repeat(MAX_PATH_LEN / 2))),
            Err(PathError::TooLong)
        );
    }

    fn path_strategy() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                Just("/".to_owned()),
                Just(".".to_owned()),
                Just("..".to_owned()),
                Just("%2e".to_owned()),
                Just("%2E".to_owned()),
                Just("%2f".to_owned()),
                Just("%25".to_owned()),
                Just("%41".to_owned()),
                Just("%c3%a9".to_owned()),
                Just("%c0".to_owned()),
                Just(";".to_owned()),
                Just("\\".to_owned()),
                "[a-z0-9~_-]{1,3}",
                "[ -~]",
            ],
            0..16,
        )
        .prop_map(|parts| format!("/{}", parts.concat()))
    }

    proptest! {
        /// Normalising is idempotent, and the result has none of what is refused.
        #[test]
        fn normal_forms_are_fixed_points(p in path_strategy()) {
            if let Ok(n) = normalize(&p) {
                let s = n.as_str();
                prop_assert_eq!(normalize(s), Ok(n.clone()));
                prop_assert!(s.starts_with('/'));
                prop_assert!(!s.contains("//") && !s.contains(';') && !s.contains('\\'));
                prop_assert!(s.split('/').all(|seg| seg != "." && seg != ".."));
                let lower = s.to_ascii_lowercase();
                prop_assert!(!lower.contains("%2f") && !lower.contains("%5c") && !lower.contains("%2e"));
                // Only non-unreserved bytes stay encoded, in upper case.
                for (i, _) in s.match_indices('%') {
                    let hex = &s[i + 1..i + 3];
                    prop_assert_eq!(hex, hex.to_ascii_uppercase());
                    let b = u8::from_str_radix(hex, 16).unwrap();
                    prop_assert!(!is_unreserved(b));
                }
            }
        }

        /// Any byte string: no panic, and an accepted result is ASCII.
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let s = String::from_utf8_lossy(&bytes);
            if let Ok(n) = normalize(&s) {
                prop_assert!(n.as_str().is_ascii());
            }
        }
    }
}
