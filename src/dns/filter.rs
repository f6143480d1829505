//! What may not reach an agent inside an upstream answer, removed before it is sent.
//!
//! - The `ech` SvcParam (key 5) of HTTPS/SVCB records, always (docs/threat-model.md, "ECH"): a
//!   client that never learns a real ECH config cannot hide its inner name behind an allowed outer
//!   one.
//! - A/AAAA records (and SVCB `ipv4hint`/`ipv6hint` addresses) whose address is special
//!   (loopback, RFC 1918, link-local, …): DNS rebinding (docs/threat-model.md) would otherwise let
//!   an allowed name point an agent at the gateway's own network. The caller says which special
//!   addresses the agent's `allow_cidrs` cover.
//!
//! Pure functions over records; must not know about sockets, agents or the cache.

use std::net::IpAddr;

use hickory_proto::rr::rdata::svcb::{SVCB, SvcParamKey, SvcParamValue};
use hickory_proto::rr::{RData, Record};

/// Remove every `ech` parameter (and its mention in `mandatory`) from HTTPS/SVCB records.
pub fn strip_ech(records: &mut [Record]) {
    for r in records {
        if let Some(svcb) = svcb_mut(&mut r.data) {
            svcb.svc_params
                .retain(|(k, _)| *k != SvcParamKey::EchConfigList);
            for (_, v) in &mut svcb.svc_params {
                if let SvcParamValue::Mandatory(m) = v {
                    m.0.retain(|k| *k != SvcParamKey::EchConfigList);
                }
            }
            // `mandatory` with no key left is invalid (RFC 9460 §8): drop it.
            svcb.svc_params.retain(|(_, v)| match v {
                SvcParamValue::Mandatory(m) => !m.0.is_empty(),
                _ => true,
            });
        }
    }
}

/// Addresses (A and AAAA together) kept of one answer: enough for any real service, and an
/// answer the agent's own DNS inflates to thousands of records cannot fill a cache.
pub const MAX_ADDRESSES: usize = 32;
/// Records of any type kept of one answer (CNAME chains, HTTPS/SVCB and addresses).
pub const MAX_RECORDS: usize = 64;

/// Keep the first [`MAX_ADDRESSES`] addresses and the first [`MAX_RECORDS`] records of an
/// answer, in order, in a new allocation of their size: shrinking the upstream's (possibly
/// thousands of records) in place would keep its start allocated, and with it a hole the
/// allocator cannot give back.
pub fn cap_records(records: &mut Vec<Record>) {
    if records.len() <= MAX_ADDRESSES {
        return;
    }
    let mut kept = Vec::with_capacity(records.len().min(MAX_RECORDS));
    let mut addresses = 0;
    for r in records.drain(..) {
        if matches!(r.data, RData::A(_) | RData::AAAA(_)) {
            addresses += 1;
            if addresses > MAX_ADDRESSES {
                continue;
            }
        }
        kept.push(r);
        if kept.len() == MAX_RECORDS {
            break;
        }
    }
    *records = kept;
}

/// What the rebinding filter did to one answer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Filtered {
    /// A/AAAA records removed.
    pub removed: usize,
    /// A/AAAA records left.
    pub kept: usize,
}

/// Remove A/AAAA records and SVCB address hints the agent may not be pointed at;
/// `may_reach(ip)` is true for public addresses and for special ones the agent's
/// `allow_cidrs` cover.
pub fn drop_unreachable(records: &mut Vec<Record>, may_reach: impl Fn(IpAddr) -> bool) -> Filtered {
    let mut f = Filtered::default();
    records.retain_mut(|r| {
        let ip = match &mut r.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            data => {
                if let Some(svcb) = svcb_mut(data) {
                    drop_hints(svcb, &may_reach);
                }
                return true;
            }
        };
        if may_reach(ip) {
            f.kept += 1;
            true
        } else {
            f.removed += 1;
            false
        }
    });
    f
}

fn drop_hints(svcb: &mut SVCB, may_reach: &impl Fn(IpAddr) -> bool) {
    for (_, v) in &mut svcb.svc_params {
        match v {
            SvcParamValue::Ipv4Hint(h) => h.0.retain(|a| may_reach(IpAddr::V4(a.0))),
            SvcParamValue::Ipv6Hint(h) => h.0.retain(|a| may_reach(IpAddr::V6(a.0))),
            _ => {}
        }
    }
    // An empty hint list is not valid on the wire (RFC 9460 §7.3).
    svcb.svc_params.retain(|(_, v)| match v {
        SvcParamValue::Ipv4Hint(h) => !h.0.is_empty(),
        SvcParamValue::Ipv6Hint(h) => !h.0.is_empty(),
        _ => true,
    });
}

fn svcb_mut(data: &mut RData) -> Option<&mut SVCB> {
    match data {
        RData::HTTPS(h) => Some(&mut h.0),
        RData::SVCB(s) => Some(s),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use hickory_proto::rr::Name;
    use hickory_proto::rr::rdata::svcb::{Alpn, EchConfigList, IpHint, Mandatory};
    use hickory_proto::rr::rdata::{A, AAAA, CNAME, HTTPS};

    use super::*;
    use crate::policy::address::is_special;

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn https(params: Vec<(SvcParamKey, SvcParamValue)>) -> Record {
        Record::from_rdata(
            name("a.test."),
            60,
            RData::HTTPS(HTTPS(SVCB::new(1, name("."), params))),
        )
    }

    #[test]
    fn ech_is_removed_and_other_params_kept() {
        let mut records = vec![https(vec![
            (
                SvcParamKey::Mandatory,
                SvcParamValue::Mandatory(Mandatory(vec![SvcParamKey::EchConfigList])),
            ),
            (
                SvcParamKey::Alpn,
                SvcParamValue::Alpn(Alpn(vec!["h2".into()])),
            ),
            (
                SvcParamKey::EchConfigList,
                SvcParamValue::EchConfigList(EchConfigList(vec![1, 2, 3])),
            ),
        ])];
        strip_ech(&mut records);
        let RData::HTTPS(h) = &records[0].data else {
            panic!("not HTTPS")
        };
        let keys: Vec<_> = h.0.svc_params.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, vec![SvcParamKey::Alpn]);
    }

    #[test]
    fn special_addresses_and_hints_are_dropped() {
        let mut records = vec![
            Record::from_rdata(name("a.test."), 60, RData::CNAME(CNAME(name("b.test.")))),
            Record::from_rdata(
                name("b.test."),
                60,
                RData::A(A(Ipv4Addr::new(127, 0, 0, 1))),
            ),
            Record::from_rdata(
                name("b.test."),
                60,
                RData::A(A(Ipv4Addr::new(203, 0, 114, 7))),
            ),
            Record::from_rdata(name("b.test."), 60, RData::AAAA(AAAA(Ipv6Addr::LOCALHOST))),
            https(vec![(
                SvcParamKey::Ipv4Hint,
                SvcParamValue::Ipv4Hint(IpHint(vec![A(Ipv4Addr::new(169, 254, 169, 254))])),
            )]),
        ];
        let f = drop_unreachable(&mut records, |ip| !is_special(ip));
        assert_eq!(
            f,
            Filtered {
                removed: 2,
                kept: 1
            }
        );
        assert_eq!(records.len(), 3);
        let RData::HTTPS(h) = &records[2].data else {
            panic!("not HTTPS")
        };
        assert!(h.0.svc_params.is_empty());
    }

    #[test]
    fn covered_special_addresses_stay() {
        let mut records = vec![Record::from_rdata(
            name("a.test."),
            60,
            RData::A(A(Ipv4Addr::new(10, 0, 0, 5))),
        )];
        let f = drop_unreachable(&mut records, |_| true);
        assert_eq!(
            f,
            Filtered {
                removed: 0,
                kept: 1
            }
        );
    }
}
