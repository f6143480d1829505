//! The filtering DNS forwarder: the agent VLAN's only resolver (docs/dns.md; docs/threat-model.md,
//! "DNS tunnelling" and rebinding). It answers only names the asking agent may reach; everything
//! else is refused without a single byte going upstream, which is what closes DNS tunnelling.
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

/// What the DNS listeners use: the live policy, the kill switch, the log, the connection
/// caps they share with the proxies, the stop sequence.
pub struct DnsContext {
    pub policy: std::sync::Arc<arc_swap::ArcSwap<crate::policy::Policy>>,
    pub killswitch: std::sync::Arc<crate::killswitch::KillSwitch>,
    pub telemetry: crate::telemetry::Telemetry,
    pub caps: std::sync::Arc<crate::proxy::ConnectionCaps>,
    pub shutdown: crate::shutdown::Shutdown,
    /// A TCP client's time to send a whole query.
    pub handshake_timeout: std::time::Duration,
    /// How long an idle TCP connection is kept.
    pub tcp_idle: std::time::Duration,
}

impl crate::proxy::Listening for DnsContext {
    fn policy(&self) -> &arc_swap::ArcSwap<crate::policy::Policy> {
        &self.policy
    }
    fn caps(&self) -> &std::sync::Arc<crate::proxy::ConnectionCaps> {
        &self.caps
    }
    fn telemetry(&self) -> &crate::telemetry::Telemetry {
        &self.telemetry
    }
    fn shutdown(&self) -> &crate::shutdown::Shutdown {
        &self.shutdown
    }
}
pub use server::{DnsListener, spawn};

/// Why the forwarder could not be started.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot build the upstream resolver: {0}")]
    Upstream(String),
}

/// The numeric code of a query type named in `dns.allowed_types` (`"AAAA"` → 28).
/// Meta types (ANY, AXFR, IXFR, OPT, …) cannot be allowed: they are not data.
pub fn record_type_code(name: &str) -> Result<u16, String> {
    let t = RecordType::from_str(&name.to_ascii_uppercase())
        .map_err(|_| "not a DNS record type".to_owned())?;
    match t {
        RecordType::ANY
        | RecordType::AXFR
        | RecordType::IXFR
        | RecordType::OPT
        | RecordType::TSIG
        | RecordType::SIG
        | RecordType::NULL
        | RecordType::ZERO
        | RecordType::Unknown(_) => Err("a meta or unknown type cannot be allowed".into()),
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
        assert!(record_type_code("ANY").is_err());
        assert!(record_type_code("AXFR").is_err());
        assert!(record_type_code("bogus").is_err());
    }
}
