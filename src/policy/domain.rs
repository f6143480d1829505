//! Domain names as the policy sees them: normalised once, then compared as plain strings.
//!
//! Owns the normalisation of docs/configuration.md (lowercase, one trailing dot stripped, IDNA
//! UTS-46 to A-labels, length and label checks) and the recognition of IP literals in odd notations
//! (docs/threat-model.md, "Odd IPv4 notations"). Must not know about rules or agents.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest name in presentation form without the trailing dot (RFC 1035 §2.3.4).
const MAX_NAME_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

/// A normalised, valid DNS name: ASCII lowercase A-labels, no trailing dot, no empty label.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainName(Box<str>);

/// Why a name was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty name")]
    Empty,
    #[error("name longer than 253 bytes")]
    TooLong,
    #[error("label longer than 63 bytes")]
    LabelTooLong,
    #[error("empty label")]
    EmptyLabel,
    #[error("character not allowed in a host name")]
    BadCharacter,
    #[error("IDNA conversion failed")]
    Idna,
    #[error("the name is an IP address")]
    IpLiteral,
}

impl DomainName {
    /// Normalise `input` (docs/configuration.md, "Domain patterns"). Rejects IP literals: use
    /// [`parse_host`] where an IP literal is a legitimate (if policed) answer.
    pub fn parse(input: &str) -> Result<Self, NameError> {
        let trimmed = input.strip_suffix('.').unwrap_or(input);
        if trimmed.is_empty() {
            return Err(NameError::Empty);
        }
        // Anything that reads as an IPv4 number in any notation is an address, not a name:
        // `127.1`, `0x7f.1`, `2130706433` (WHATWG URL "ends in a number" rule).
        if ends_in_number(trimmed) {
            return Err(NameError::IpLiteral);
        }
        if trimmed.is_ascii() && !has_ace_label(trimmed) {
            let ascii = trimmed.to_ascii_lowercase();
            validate_ascii(&ascii)?;
            // Lowercasing changes no digit and `0x` is matched in any case: the check above
            // on `trimmed` holds for `ascii` too.
            return Ok(Self(ascii.into_boxed_str()));
        }
        // UTS-46 (non-transitional) mapping to A-labels; rejects invalid punycode.
        let ascii = idna::domain_to_ascii(trimmed).map_err(|_| NameError::Idna)?;
        validate_ascii(&ascii)?;
        // The mapping can make digits of other characters (fullwidth `１２７`).
        if ends_in_number(&ascii) {
            return Err(NameError::IpLiteral);
        }
        Ok(Self(ascii.into_boxed_str()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name and each parent name, longest first: `a.b.c`, `b.c`, `c`.
    pub fn suffixes(&self) -> impl Iterator<Item = &str> {
        let s: &str = &self.0;
        std::iter::once(s).chain(
            s.char_indices()
                .filter(|&(_, c)| c == '.')
                .filter_map(move |(i, _)| s.get(i + 1..)),
        )
    }

    /// Parent names only (excluding the name itself), longest first.
    pub fn parents(&self) -> impl Iterator<Item = &str> {
        self.suffixes().skip(1)
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DomainName({})", self.0)
    }
}

// The label loops below split bytes, not `str`s: every connection's name goes through them,
// and a byte split is a plain loop where `str::split(char)` runs a searcher per label.

/// The labels of `s`, as bytes.
fn labels(s: &str) -> std::slice::Split<'_, u8, impl FnMut(&u8) -> bool> {
    s.as_bytes().split(|&b| b == b'.')
}

fn has_ace_label(s: &str) -> bool {
    labels(s).any(|l| l.get(..4).is_some_and(|p| p.eq_ignore_ascii_case(b"xn--")))
}

fn validate_ascii(s: &str) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    if s.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    for label in labels(s) {
        if label.is_empty() {
            return Err(NameError::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(NameError::LabelTooLong);
        }
        // Letters, digits, inner hyphens (RFC 952/1123 §2.1) and underscore, which real
        // service names use.
        if label.first() == Some(&b'-') || label.last() == Some(&b'-') {
            return Err(NameError::BadCharacter);
        }
        if !label
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(NameError::BadCharacter);
        }
    }
    Ok(())
}

/// WHATWG URL §3.5 "ends in a number": the last label is decimal digits or `0x` hex.
fn ends_in_number(s: &str) -> bool {
    let last = s
        .as_bytes()
        .rsplit(|&b| b == b'.')
        .next()
        .unwrap_or_default();
    if !last.is_empty() && last.iter().all(u8::is_ascii_digit) {
        return true;
    }
    // `0x…` (any case), checked without allocating: this runs for every connection's name.
    last.get(..2).is_some_and(|p| p.eq_ignore_ascii_case(b"0x"))
        && last.iter().skip(2).all(u8::is_ascii_hexdigit)
}

/// A target host as the agent named it: a normalised name or an IP address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Name(DomainName),
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n.as_str()),
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
            Host::Ip(a) => write!(f, "{a}"),
        }
    }
}

/// Parse a host as it appears in an authority (`[v6]`, IPv4 in any inet_aton notation, or a name).
/// Odd IPv4 notations are decoded to the address they really mean, so that the address check sees
/// what the OS would dial (docs/threat-model.md, "Odd IPv4 notations").
pub fn parse_host(input: &str) -> Result<Host, NameError> {
    if let Some(inner) = input.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
        return inner
            .parse::<Ipv6Addr>()
            .map(|a| Host::Ip(IpAddr::V6(a)))
            .map_err(|_| NameError::BadCharacter);
    }
    if let Ok(a) = input.parse::<Ipv6Addr>() {
        return Ok(Host::Ip(IpAddr::V6(a)));
    }
    match DomainName::parse(input) {
        Ok(name) => Ok(Host::Name(name)),
        Err(NameError::IpLiteral) => {
            let trimmed = input.strip_suffix('.').unwrap_or(input);
            parse_inet_aton(trimmed)
                .map(|a| Host::Ip(IpAddr::V4(a)))
                .ok_or(NameError::BadCharacter)
        }
        Err(e) => Err(e),
    }
}

/// inet_aton(3) semantics: 1–4 parts, each decimal, octal (leading 0) or hex (0x); the last
/// part fills the remaining bytes.
fn parse_inet_aton(s: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut nums = Vec::with_capacity(4);
    for p in &parts {
        nums.push(parse_aton_part(p)?);
    }
    let (last, init) = nums.split_last()?;
    let mut value: u64 = 0;
    for (i, &n) in init.iter().enumerate() {
        if n > 255 {
            return None;
        }
        value |= n << (24 - 8 * i);
    }
    let remaining_bits = 32 - 8 * init.len() as u32;
    if remaining_bits < 64 && *last >= (1u64 << remaining_bits) {
        return None;
    }
    value |= last;
    u32::try_from(value).ok().map(Ipv4Addr::from)
}

fn parse_aton_part(p: &str) -> Option<u64> {
    if p.is_empty() || p.len() > 12 {
        return None;
    }
    let lower = p.to_ascii_lowercase();
    if let Some(hex) = lower.strip_prefix("0x") {
        if hex.is_empty() {
            return Some(0);
        }
        return u64::from_str_radix(hex, 16).ok();
    }
    if lower.len() > 1 && lower.starts_with('0') {
        return u64::from_str_radix(&lower[1..], 8).ok();
    }
    lower.parse::<u64>().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn normalises_case_trailing_dot_and_unicode() {
        assert_eq!(
            DomainName::parse("Allowed.TEST.").unwrap().as_str(),
            "allowed.test"
        );
        assert_eq!(
            DomainName::parse("bücher.example").unwrap().as_str(),
            "xn--bcher-kva.example"
        );
        assert_eq!(
            DomainName::parse("XN--BCHER-KVA.example").unwrap().as_str(),
            "xn--bcher-kva.example"
        );
    }

    #[test]
    fn rejects_invalid_names() {
        for bad in [
            "", ".", "a..b", ".a", "a b", "a\0b", "a.b..", "-", "a/b", "a:b", "a@b",
        ] {
            assert!(DomainName::parse(bad).is_err(), "{bad:?} accepted");
        }
        let long_label = format!("{}.test", "a".repeat(64));
        assert_eq!(DomainName::parse(&long_label), Err(NameError::LabelTooLong));
        let long_name = format!("{}.test", vec!["a".repeat(60); 5].join("."));
        assert_eq!(DomainName::parse(&long_name), Err(NameError::TooLong));
        assert!(DomainName::parse(&"a.".repeat(126)).is_ok());
    }

    #[test]
    fn odd_ipv4_notations_are_addresses() {
        let lo = Host::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        for s in [
            "127.0.0.1",
            "127.1",
            "0x7f.1",
            "2130706433",
            "0177.0.0.1",
            "0x7f000001",
            "127.0.0.1.",
        ] {
            assert_eq!(parse_host(s).unwrap(), lo, "{s}");
        }
        assert_eq!(
            parse_host("[::1]").unwrap(),
            Host::Ip("::1".parse().unwrap())
        );
        assert_eq!(parse_host("::1").unwrap(), Host::Ip("::1".parse().unwrap()));
        assert!(parse_host("1.2.3.4.5").is_err());
        assert!(parse_host("256.1.1.1").is_err());
        assert!(parse_host("example.0x").is_err());
        assert!(matches!(parse_host("a.b1").unwrap(), Host::Name(_)));
    }

    #[test]
    fn digits_made_by_the_idna_mapping_are_an_address() {
        assert_eq!(DomainName::parse("１２７.0.0.1"), Err(NameError::IpLiteral));
        assert_eq!(DomainName::parse("a.０ｘ７ｆ"), Err(NameError::IpLiteral));
    }

    /// The rules as first written, with `str` splits: the byte loops must agree with them.
    fn reference(input: &str) -> Result<String, NameError> {
        let trimmed = input.strip_suffix('.').unwrap_or(input);
        if trimmed.is_empty() {
            return Err(NameError::Empty);
        }
        let number = |s: &str| {
            let last = s.rsplit('.').next().unwrap_or(s);
            (!last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()))
                || (last.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("0x"))
                    && last.bytes().skip(2).all(|b| b.is_ascii_hexdigit()))
        };
        if number(trimmed) {
            return Err(NameError::IpLiteral);
        }
        let ace = |s: &str| {
            s.split('.')
                .any(|l| l.len() >= 4 && l[..4].eq_ignore_ascii_case("xn--"))
        };
        let ascii = if trimmed.is_ascii() && !ace(trimmed) {
            trimmed.to_ascii_lowercase()
        } else {
            idna::domain_to_ascii(trimmed).map_err(|_| NameError::Idna)?
        };
        if ascii.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        for label in ascii.split('.') {
            if label.is_empty() {
                return Err(NameError::EmptyLabel);
            }
            if label.len() > MAX_LABEL_LEN {
                return Err(NameError::LabelTooLong);
            }
            if label.starts_with('-')
                || label.ends_with('-')
                || !label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            {
                return Err(NameError::BadCharacter);
            }
        }
        if number(&ascii) {
            return Err(NameError::IpLiteral);
        }
        Ok(ascii)
    }

    proptest::proptest! {
        #[test]
        fn byte_loops_agree_with_the_str_rules(
            s in "([a-fA-FxX0-9_-]{0,5}\\.?){0,6}|[a-z.]{0,70}|(xn--[a-z0-9-]{0,8}\\.)?[a-zé０-９ｘ.-]{0,8}"
        ) {
            let ours = DomainName::parse(&s).map(|n| n.as_str().to_owned());
            proptest::prop_assert_eq!(ours, reference(&s), "{:?}", s);
        }
    }

    #[test]
    fn suffixes_walk_labels() {
        let n = DomainName::parse("a.b.c").unwrap();
        assert_eq!(n.suffixes().collect::<Vec<_>>(), ["a.b.c", "b.c", "c"]);
        assert_eq!(n.parents().collect::<Vec<_>>(), ["b.c", "c"]);
    }
}
