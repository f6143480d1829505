//! Classification of destination addresses: which ones an agent may never reach unless an
//! explicit `allow_cidrs` rule says so (DESIGN §2 step 5, THREATS B5).
//!
//! Pure functions over `IpAddr`; no resolution here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Unwrap IPv4-mapped (`::ffff:a.b.c.d`) and IPv4-compatible forms so a v4 address hidden in
/// v6 is judged as the v4 address the kernel will actually reach.
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
/// broadcast, documentation, benchmarking or otherwise not a public unicast destination.
pub fn is_special(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => is_special_v4(v4),
        IpAddr::V6(v6) => is_special_v6(v6),
    }
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
    a.is_unspecified()
        || a.is_loopback()
        || a.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00                    // fc00::/7 ULA
        || (s[0] & 0xffc0) == 0xfe80                    // fe80::/10 link-local
        || (s[0] & 0xffc0) == 0xfec0                    // fec0::/10 deprecated site-local
        || (s[0] == 0x2001 && s[1] == 0x0db8)           // 2001:db8::/32 documentation
        || (s[0] == 0x0064 && s[1] == 0xff9b)           // 64:ff9b::/96 NAT64 can reach v4 private
        || (s[0] == 0x2002)                             // 6to4 embeds arbitrary v4
        || (s[0] == 0x2001 && s[1] == 0)                // Teredo embeds arbitrary v4
        || (s[0..6] == [0, 0, 0, 0, 0, 0])              // ::/96 IPv4-compatible (deprecated)
        || (s[0] == 0x0100 && s[1..4] == [0, 0, 0]) // 100::/64 discard
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn threats_b5_addresses_are_special() {
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
        ] {
            assert!(!is_special(s.parse().unwrap()), "{s} special");
        }
    }

    #[test]
    fn mapped_addresses_unwrap() {
        assert_eq!(
            canonical("::ffff:10.0.0.1".parse().unwrap()),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }
}
