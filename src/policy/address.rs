//! Classification of destination addresses: which ones an agent may never reach unless an
//! explicit `allow_cidrs` (or, for names, `resolve_cidrs`) rule says so.
//!
//! Pure functions over `IpAddr`; no resolution here.
//!
//! IPv6 has several ways to carry an IPv4 address. Each one is either judged by the IPv4
//! address it carries (special exactly when that address is special) or refused whole,
//! so that no form reaches a private IPv4 network the plain address could not:
//!
//! | form | range | treatment |
//! |---|---|---|
//! | IPv4-mapped (RFC 4291) | `::ffff:0:0/96` | unwrapped ([`canonical`]): dialled as the IPv4 address |
//! | IPv4-translated (RFC 2765, SIIT) | `::ffff:0:0:0/96` | judged by the embedded IPv4 |
//! | NAT64 well-known prefix (RFC 6052) | `64:ff9b::/96` | judged by the embedded IPv4 |
//! | NAT64 local-use (RFC 8215) | `64:ff9b:1::/48` | refused whole: the operator picks where the IPv4 sits |
//! | rest of `64:ff9b::/32` | | refused whole (unassigned) |
//! | IPv4-compatible (RFC 4291, deprecated) | `::/96` | refused whole (with `::` and `::1`) |
//! | 6to4 (RFC 3056, deprecated by RFC 7526) | `2002::/16` | refused whole |
//! | Teredo (RFC 4380) | `2001::/32` | refused whole (the client's IPv4 is obfuscated) |
//! | ISATAP interface id (RFC 5214) | `…:0:5efe:a.b.c.d`, `…:200:5efe:a.b.c.d` in any /64 | special if the prefix is, or if the embedded IPv4 is |
//!
//! A network-specific NAT64 prefix (RFC 6052 §2.3, any operator prefix) cannot be told
//! from a plain IPv6 address: a gateway whose own network translates such a prefix must
//! keep it out of agents' reach itself (docs/addresses.md).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Unwrap IPv4-mapped addresses (`::ffff:a.b.c.d`), the one embedded form the kernel itself
/// turns into IPv4 on a dual-stack socket, so it is judged and dialled as the v4 address the
/// kernel will actually reach. Other embedded forms stay IPv6 (see the module's table).
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// The address is loopback, private, link-local, shared (CGNAT), unspecified, multicast,
/// broadcast, documentation, benchmarking or otherwise not a public unicast destination,
/// or an IPv6 form that carries such an IPv4 address (see the module's table).
pub fn is_special(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => is_special_v4(v4),
        IpAddr::V6(v6) => is_special_v6(v6),
    }
}

/// The IPv4 address in the low 32 bits.
fn low_v4(s: &[u16; 8]) -> Ipv4Addr {
    Ipv4Addr::from((u32::from(s[6]) << 16) | u32::from(s[7]))
}

fn is_special_v4(a: Ipv4Addr) -> bool {
    let o = a.octets();
    a.is_unspecified()
        || o[0] == 0                                   // 0.0.0.0/8 "this network"
        || a.is_loopback()                              // 127/8
        || a.is_private()                               // 10/8, 172.16/12, 192.168/16
        || a.is_link_local()                            // 169.254/16, incl. cloud metadata
        || (o[0] == 100 && (o[1] & 0xc0) == 64)         // 100.64/10 CGNAT
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)      // 192.0.0/24 IETF protocol assignments
        || a.is_documentation()                         // TEST-NET-1/2/3
        || (o[0] == 198 && (o[1] & 0xfe) == 18)         // 198.18/15 benchmarking
        || a.is_multicast()                             // 224/4
        || o[0] >= 240 // 240/4 reserved + broadcast
}

fn is_special_v6(a: Ipv6Addr) -> bool {
    let s = a.segments();
    match s {
        // ::ffff:0:a.b.c.d, IPv4-translated (RFC 2765): judged as the IPv4 address.
        [0, 0, 0, 0, 0xffff, 0, _, _] => is_special_v4(low_v4(&s)),
        // 64:ff9b::a.b.c.d, the NAT64 well-known prefix (RFC 6052): judged as the IPv4.
        [0x0064, 0xff9b, 0, 0, 0, 0, _, _] => is_special_v4(low_v4(&s)),
        _ => is_special_v6_range(&s) || is_isatap_to_special_v4(&s),
    }
}

/// IPv6 ranges that are special whatever follows their prefix.
fn is_special_v6_range(s: &[u16; 8]) -> bool {
    let a = Ipv6Addr::from(*s);
    a.is_unspecified()
        || a.is_loopback()
        || a.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00                    // fc00::/7 ULA
        || (s[0] & 0xffc0) == 0xfe80                    // fe80::/10 link-local
        || (s[0] & 0xffc0) == 0xfec0                    // fec0::/10 deprecated site-local
        || (s[0] == 0x2001 && s[1] == 0x0db8)           // 2001:db8::/32 documentation
        || (s[0] == 0x3fff && (s[1] & 0xf000) == 0)     // 3fff::/20 documentation (RFC 9637)
        || (s[0] == 0x2001 && s[1] == 0x0002 && s[2] == 0) // 2001:2::/48 benchmarking
        || s[0] == 0x5f00                               // 5f00::/16 SRv6 SIDs (RFC 9602)
        || (s[0] == 0x0064 && s[1] == 0xff9b)           // 64:ff9b::/32 past the /96: local-use NAT64 (RFC 8215), unassigned
        || s[0] == 0x2002                               // 2002::/16 6to4 embeds any v4
        || (s[0] == 0x2001 && s[1] == 0)                // 2001::/32 Teredo embeds any v4
        || s[0..6] == [0, 0, 0, 0, 0, 0]                // ::/96 IPv4-compatible (deprecated)
        || (s[0] == 0x0100 && s[1..4] == [0, 0, 0]) // 100::/64 discard
}

/// An ISATAP interface identifier (RFC 5214 §6.1: `0000:5efe` or `0200:5efe`, with or
/// without the group bit, then the IPv4 address) carrying a special IPv4 address: an
/// ISATAP router on the path delivers it to that address over IPv4.
fn is_isatap_to_special_v4(s: &[u16; 8]) -> bool {
    (s[4] & 0xfcff) == 0 && s[5] == 0x5efe && is_special_v4(low_v4(s))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn special_addresses_are_special() {
        for s in [
            "127.0.0.1",
            "::1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "255.255.255.255",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "2001:2::1",
            "3fff::1",
            "3fff:fff::1",
            "5f00::1",
        ] {
            assert!(is_special(s.parse().unwrap()), "{s} not special");
        }
    }

    #[test]
    fn public_addresses_are_not() {
        for s in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "2001:3::1",
            "3fff:1000::1",
            "2001:db9::1",
        ] {
            assert!(!is_special(s.parse().unwrap()), "{s} special");
        }
    }

    /// Every IPv6 form that carries an IPv4 address, with a private, a metadata, a loopback
    /// and a public IPv4 inside: judged forms follow the IPv4, refused forms are special
    /// whatever they carry.
    #[test]
    fn embedded_ipv4_forms_table() {
        // (form, private 10.1.2.3, metadata 169.254.169.254, loopback 127.0.0.1, public 8.8.8.8)
        let table: [(&str, [&str; 4], [bool; 4]); 12] = [
            (
                "mapped ::ffff:0:0/96",
                [
                    "::ffff:10.1.2.3",
                    "::ffff:169.254.169.254",
                    "::ffff:127.0.0.1",
                    "::ffff:8.8.8.8",
                ],
                [true, true, true, false],
            ),
            (
                "translated ::ffff:0:0:0/96",
                [
                    "::ffff:0:10.1.2.3",
                    "::ffff:0:169.254.169.254",
                    "::ffff:0:127.0.0.1",
                    "::ffff:0:8.8.8.8",
                ],
                [true, true, true, false],
            ),
            (
                "NAT64 64:ff9b::/96",
                [
                    "64:ff9b::10.1.2.3",
                    "64:ff9b::169.254.169.254",
                    "64:ff9b::127.0.0.1",
                    "64:ff9b::8.8.8.8",
                ],
                [true, true, true, false],
            ),
            (
                "NAT64 local-use 64:ff9b:1::/48 (/96 layout)",
                [
                    "64:ff9b:1::10.1.2.3",
                    "64:ff9b:1::169.254.169.254",
                    "64:ff9b:1::127.0.0.1",
                    "64:ff9b:1::8.8.8.8",
                ],
                [true; 4],
            ),
            (
                // RFC 6052 /48 layout: v4 in bits 48..63 and 72..87, around the zero u octet.
                "NAT64 local-use 64:ff9b:1::/48 (/48 layout)",
                [
                    "64:ff9b:1:a01:2:300::",
                    "64:ff9b:1:a9fe:a9:fe00::",
                    "64:ff9b:1:7f00:0:100::",
                    "64:ff9b:1:808:8:800::",
                ],
                [true; 4],
            ),
            (
                "64:ff9b::/32 outside the /96",
                [
                    "64:ff9b:0:1::10.1.2.3",
                    "64:ff9b:2::169.254.169.254",
                    "64:ff9b:ffff::127.0.0.1",
                    "64:ff9b:0:0:1::8.8.8.8",
                ],
                [true; 4],
            ),
            (
                "IPv4-compatible ::/96",
                [
                    "::10.1.2.3",
                    "::169.254.169.254",
                    "::127.0.0.1",
                    "::8.8.8.8",
                ],
                [true; 4],
            ),
            (
                "6to4 2002::/16",
                [
                    "2002:a01:203::1",
                    "2002:a9fe:a9fe::1",
                    "2002:7f00:1::1",
                    "2002:808:808::1",
                ],
                [true; 4],
            ),
            (
                // Server v4 in bits 32..63, the client's v4 XORed with ones in the last 32.
                "Teredo 2001::/32",
                [
                    "2001:0:a01:203::",
                    "2001:0:4136:e378:8000:63bf:5601:5656",
                    "2001:0:7f00:1::",
                    "2001:0:808:808::f7f7:f7f7",
                ],
                [true; 4],
            ),
            (
                "ISATAP 0:5efe in a public /64",
                [
                    "2606:4700:1::5efe:10.1.2.3",
                    "2606:4700:1::5efe:169.254.169.254",
                    "2606:4700:1::5efe:127.0.0.1",
                    "2606:4700:1::5efe:8.8.8.8",
                ],
                [true, true, true, false],
            ),
            (
                "ISATAP 200:5efe in a public /64",
                [
                    "2606:4700:1::200:5efe:10.1.2.3",
                    "2606:4700:1::200:5efe:169.254.169.254",
                    "2606:4700:1::300:5efe:127.0.0.1",
                    "2606:4700:1::200:5efe:8.8.8.8",
                ],
                [true, true, true, false],
            ),
            (
                "ISATAP in a link-local /64",
                [
                    "fe80::5efe:10.1.2.3",
                    "fe80::5efe:169.254.169.254",
                    "fe80::5efe:127.0.0.1",
                    "fe80::5efe:8.8.8.8",
                ],
                [true; 4],
            ),
        ];
        for (form, addrs, expected) in table {
            for (s, special) in addrs.iter().zip(expected) {
                let ip: IpAddr = s.parse().unwrap();
                assert!(ip.is_ipv6(), "{form}: {s} must be written as IPv6");
                assert_eq!(is_special(ip), special, "{form}: {s}");
            }
        }
    }

    #[test]
    fn mapped_addresses_unwrap() {
        assert_eq!(
            canonical("::ffff:10.0.0.1".parse().unwrap()),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
        // Only the mapped form: a translated address is no IPv4 socket address.
        let translated: IpAddr = "::ffff:0:10.0.0.1".parse().unwrap();
        assert_eq!(canonical(translated), translated);
    }

    fn v6(segments: [u16; 6], v4: Ipv4Addr) -> IpAddr {
        let [a, b, c, d] = v4.octets();
        let [s0, s1, s2, s3, s4, s5] = segments;
        IpAddr::V6(Ipv6Addr::new(
            s0,
            s1,
            s2,
            s3,
            s4,
            s5,
            u16::from_be_bytes([a, b]),
            u16::from_be_bytes([c, d]),
        ))
    }

    proptest! {
        /// Judged forms: special exactly when the IPv4 address is, for every IPv4 address.
        #[test]
        fn judged_forms_follow_the_ipv4(raw in any::<u32>(), isatap_id in prop::sample::select(vec![0u16, 0x100, 0x200, 0x300])) {
            let v4 = Ipv4Addr::from(raw);
            let plain = is_special(IpAddr::V4(v4));
            prop_assert_eq!(is_special(v6([0, 0, 0, 0, 0, 0xffff], v4)), plain, "mapped");
            prop_assert_eq!(is_special(v6([0, 0, 0, 0, 0xffff, 0], v4)), plain, "translated");
            prop_assert_eq!(is_special(v6([0x64, 0xff9b, 0, 0, 0, 0], v4)), plain, "NAT64");
            prop_assert_eq!(is_special(v6([0x2606, 0x4700, 1, 0, isatap_id, 0x5efe], v4)), plain, "ISATAP");
        }

        /// Refused forms: special whatever they carry and wherever it sits.
        #[test]
        fn refused_forms_are_always_special(raw in any::<u32>(), mid in any::<[u16; 4]>()) {
            let v4 = Ipv4Addr::from(raw);
            let [hi, lo] = [(raw >> 16) as u16, raw as u16];
            prop_assert!(is_special(v6([0, 0, 0, 0, 0, 0], v4)), "IPv4-compatible");
            prop_assert!(is_special(v6([0x2002, hi, lo, mid[0], mid[1], mid[2]], v4)), "6to4");
            prop_assert!(is_special(v6([0x2001, 0, hi, lo, mid[0], mid[1]], v4)), "Teredo");
            prop_assert!(is_special(v6([0x64, 0xff9b, 1, mid[0], mid[1], mid[2]], v4)), "local-use NAT64");
            prop_assert!(is_special(v6([0x64, 0xff9b, mid[0] | 2, mid[1], mid[2], mid[3]], v4)), "64:ff9b::/32");
            prop_assert!(is_special(v6([0xfe80, 0, 0, 0, mid[0] & 0x0300, 0x5efe], v4)), "link-local ISATAP");
        }
    }
}
