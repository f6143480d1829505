//! Asking the configured upstream servers (`resolver.upstreams`, else resolv.conf) one
//! question, with hickory-resolver, under one deadline.
//!
//! Owns the mapping of hickory's results to what the forwarder answers: records (CNAME
//! chains as the resolver returns them), NXDOMAIN/NODATA with their negative TTL and the
//! upstream's SOA (RFC 2308: what lets the agent's own cache keep the negative answer), or a
//! failure (which the forwarder turns into SERVFAIL, never a guess). Must not cache (the
//! forwarder's cache is the only one, so TTL caps and tests see one cache) and must not
//! read the gateway's hosts file.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{Name, Record, RecordType};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::ResolveHosts;
use hickory_resolver::net::{DnsError as HickoryDnsError, NetError};

use super::DnsError;
use crate::policy::DomainName;
use crate::proxy::upstream::resolver_builder;

/// The upstream's answer to one question.
#[derive(Debug, Clone)]
pub struct Answer {
    /// NOERROR or NXDOMAIN; other codes are failures.
    pub rcode: ResponseCode,
    pub records: Vec<Record>,
    /// The authority section of a negative answer: the zone's SOA when the upstream gave one.
    pub authority: Vec<Record>,
    /// How long the answer may be cached (before the `max_ttl` cap); 0 = do not cache.
    pub ttl: u32,
}

/// Why there is no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream did not answer in time")]
    Timeout,
    #[error("upstream failed: {0}")]
    Failed(String),
}

/// The hickory resolver the forwarder asks.
pub struct Upstream {
    resolver: TokioResolver,
    deadline: Duration,
}

impl Upstream {
    /// `deadline` bounds a whole question: two attempts of half of it each.
    pub fn new(upstreams: &[SocketAddr], deadline: Duration) -> Result<Self, DnsError> {
        let mut builder = resolver_builder(upstreams).map_err(DnsError::Upstream)?;
        let opts = builder.options_mut();
        opts.timeout = (deadline / 2).max(Duration::from_millis(50));
        opts.attempts = 2;
        opts.cache_size = 0;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.preserve_intermediates = true;
        opts.ndots = 0;
        let resolver = builder
            .build()
            .map_err(|e| DnsError::Upstream(e.to_string()))?;
        Ok(Self { resolver, deadline })
    }

    /// Ask for `name`/`rtype`. Exactly the normalised, policy-checked name goes upstream.
    pub async fn query(
        &self,
        name: &DomainName,
        rtype: RecordType,
    ) -> Result<Answer, UpstreamError> {
        // Fully qualified: search domains must never turn `evil` into `evil.corp.lan`.
        let fqdn = Name::from_ascii(format!("{}.", name.as_str()))
            .map_err(|e| UpstreamError::Failed(e.to_string()))?;
        let looked = tokio::time::timeout(self.deadline, self.resolver.lookup(fqdn, rtype))
            .await
            .map_err(|_| UpstreamError::Timeout)?;
        match looked {
            Ok(lookup) => {
                let records = lookup.answers().to_vec();
                let ttl = records.iter().map(|r| r.ttl).min().unwrap_or(0);
                Ok(Answer {
                    rcode: ResponseCode::NoError,
                    records,
                    authority: Vec::new(),
                    ttl,
                })
            }
            Err(NetError::Dns(HickoryDnsError::NoRecordsFound(none)))
                if matches!(
                    none.response_code,
                    ResponseCode::NoError | ResponseCode::NXDomain
                ) =>
            {
                Ok(Answer {
                    rcode: none.response_code,
                    records: Vec::new(),
                    authority: none
                        .soa
                        .map(|soa| vec![(*soa).into_record_of_rdata()])
                        .unwrap_or_default(),
                    // RFC 2308 §5: no SOA, no negative caching.
                    ttl: none.negative_ttl.unwrap_or(0),
                })
            }
            Err(NetError::Timeout) => Err(UpstreamError::Timeout),
            Err(e) => Err(UpstreamError::Failed(e.to_string())),
        }
    }
}
