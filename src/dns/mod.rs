//! The filtering DNS forwarder: the agent VLAN's only resolver (DESIGN §1 "dns", THREATS
//! D13–D14). It answers only names the asking agent may reach; everything else is refused
//! without a single byte going upstream, which is what closes DNS tunnelling.
//!
//! The path of one query:
//!
//! ```text
//! server::serve_udp / serve_tcp   socket, RFC 1035 §4.2.2 framing, deadlines, size caps
//!   query::Forwarder::prepare     parse, identify (source), kill switch, rate limit,
//!                                 one question, type, name, Policy::allows_name, cache
//!   query::Forwarder::resolve     upstream::Upstream (hickory-resolver), deadline → SERVFAIL
//!   filter                        ECH stripped from HTTPS/SVCB, special addresses dropped
//!                                 (rebinding) unless the agent's allow_cidrs cover them
//!   ede                           the Extended DNS Error (RFC 8914) a refusal carries
//!   telemetry                     one record per refused query, sampled allowed ones
//! ```
//!
//! Must not: answer from anything but the upstream's reply (never a guess), forward a
//! question the policy did not allow, or wait on a socket without a deadline.

mod cache;
pub(crate) mod ede;
// Public for the fuzz target (fuzz/fuzz_targets/dns_message.rs): it runs the answer-side
// filters on records parsed from arbitrary bytes, as if an upstream had sent them.
#[doc(hidden)]
pub mod filter;
mod limit;
mod query;
mod server;
mod upstream;

use std::str::FromStr;

use hickory_proto::rr::RecordType;

pub use query::{Forwarder, Step, Transport};
pub use server::{DnsListener, spawn};

/// Why the forwarder could not be started.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot build the upstream resolver: {0}")]
    Upstream(String),
}

/// Why a name in `dns.allowed_types` is not a type that can be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordTypeError {
    #[error("not a DNS record type")]
    Unknown,
    #[error("a meta or unknown type cannot be allowed")]
    NotData,
}

/// The numeric code of a query type named in `dns.allowed_types` (`"AAAA"` → 28).
/// Meta types (ANY, AXFR, IXFR, OPT, …) cannot be allowed: they are not data.
pub fn record_type_code(name: &str) -> Result<u16, RecordTypeError> {
    let t =
        RecordType::from_str(&name.to_ascii_uppercase()).map_err(|_| RecordTypeError::Unknown)?;
    match t {
        RecordType::ANY
        | RecordType::AXFR
        | RecordType::IXFR
        | RecordType::OPT
        | RecordType::TSIG
        | RecordType::SIG
        | RecordType::NULL
        | RecordType::ZERO
        | RecordType::Unknown(_) => Err(RecordTypeError::NotData),
        t => Ok(u16::from(t)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn record_types_by_name() {
        assert_eq!(record_type_code("aaaa").unwrap(), 28);
        assert_eq!(record_type_code("HTTPS").unwrap(), 65);
        assert_eq!(record_type_code("ANY"), Err(RecordTypeError::NotData));
        assert_eq!(record_type_code("AXFR"), Err(RecordTypeError::NotData));
        assert_eq!(record_type_code("bogus"), Err(RecordTypeError::Unknown));
    }
}
