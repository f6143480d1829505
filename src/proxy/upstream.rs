//! Reaching an allowed target: resolve the name ourselves, check every address, dial exactly
//! an address that was checked (DESIGN §2 step 5, THREATS B5–B6). Never re-resolves and never
//! dials an address the agent supplied unless `allow_cidrs` covers it.
//!
//! The resolver is injected ([`Resolve`]) so that tests control what names resolve to.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::time::Duration;

use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{ResolverBuilder, TokioResolver};
use tokio::net::TcpStream;

use crate::policy::{AgentId, Host, Policy, Reason, Target};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Name → addresses. Implementations must not follow any agent-supplied hint.
pub trait Resolve: Send + Sync + 'static {
    fn lookup<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<IpAddr>, ResolveError>>;
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    #[error("no address for the name")]
    NoAddress,
    #[error("resolver error: {0}")]
    Failed(String),
}

/// A hickory resolver builder for `resolver.upstreams` (each server over UDP and TCP on its
/// own port), or the system's resolv.conf when none are configured. Shared by the proxy's
/// resolver and the DNS forwarder's upstream, which then set their own options.
pub(crate) fn resolver_builder(
    upstreams: &[SocketAddr],
) -> Result<ResolverBuilder<TokioRuntimeProvider>, String> {
    if upstreams.is_empty() {
        return TokioResolver::builder_tokio().map_err(|e| e.to_string());
    }
    let servers = upstreams
        .iter()
        .map(|a| {
            let mut ns = NameServerConfig::udp_and_tcp(a.ip());
            for c in &mut ns.connections {
                c.port = a.port();
            }
            ns
        })
        .collect();
    Ok(TokioResolver::builder_with_config(
        ResolverConfig::from_name_servers(servers),
        TokioRuntimeProvider::default(),
    ))
}

/// How long an answer without addresses is reused when the server gave no TTL for it.
const NEGATIVE_MIN_TTL: Duration = Duration::from_secs(5);

/// hickory-resolver over the system's resolv.conf or configured upstream servers.
pub struct DnsResolver(TokioResolver);

impl DnsResolver {
    pub fn new(upstreams: &[SocketAddr], timeout: Duration) -> Result<Self, ResolveError> {
        let mut builder = resolver_builder(upstreams).map_err(ResolveError::Failed)?;
        builder.options_mut().timeout = timeout;
        builder.options_mut().attempts = 2;
        // "No address of this type" without an SOA (common from local servers such as
        // dnsmasq's `address=`) would otherwise be asked again on every connection.
        builder.options_mut().negative_min_ttl = Some(NEGATIVE_MIN_TTL);
        // One question per name, not two: AAAA only when there is no A. The dial tries the
        // addresses in order anyway, and a server that refuses AAAA (dnsmasq without an
        // upstream does) no longer costs every new connection a refused question and its
        // retries.
        builder.options_mut().ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
        builder
            .build()
            .map(Self)
            .map_err(|e| ResolveError::Failed(e.to_string()))
    }
}

impl Resolve for DnsResolver {
    fn lookup<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<IpAddr>, ResolveError>> {
        Box::pin(async move {
            // Fully qualified: search domains must never turn `evil` into `evil.corp.lan`.
            let fqdn = format!("{name}.");
            let lookup = self
                .0
                .lookup_ip(fqdn.as_str())
                .await
                .map_err(|e| ResolveError::Failed(e.to_string()))?;
            let addrs: Vec<IpAddr> = lookup.iter().collect();
            if addrs.is_empty() {
                Err(ResolveError::NoAddress)
            } else {
                Ok(addrs)
            }
        })
    }
}

/// A fixed name → addresses table (tests, and air-gapped setups).
#[derive(Debug, Default, Clone)]
pub struct StaticResolver(HashMap<String, Vec<IpAddr>>);

impl StaticResolver {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, name: &str, addrs: &[IpAddr]) -> Self {
        self.0.insert(name.to_ascii_lowercase(), addrs.to_vec());
        self
    }
}

impl Resolve for StaticResolver {
    fn lookup<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<IpAddr>, ResolveError>> {
        let result = self.0.get(name).cloned().ok_or(ResolveError::NoAddress);
        Box::pin(async move { result })
    }
}

/// An upstream connection and the address it was dialled at.
pub struct Upstream {
    pub stream: TcpStream,
    pub addr: SocketAddr,
}

/// A failed attempt to reach a target, with the address involved if any (for the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectFailure {
    pub reason: Reason,
    pub addr: Option<IpAddr>,
}

/// Resolve the target (an IP literal is its own answer) and check every address. One bad
/// address taints the whole answer: a rebinding attacker mixes public and private ones.
pub async fn resolve_checked(
    policy: &Policy,
    agent: Option<AgentId>,
    target: &Target,
    resolver: &dyn Resolve,
    resolve_timeout: Duration,
) -> Result<Vec<IpAddr>, ConnectFailure> {
    let addrs = match &target.host {
        Host::Ip(ip) => vec![*ip],
        Host::Name(name) => {
            match tokio::time::timeout(resolve_timeout, resolver.lookup(name.as_str())).await {
                Ok(Ok(addrs)) if !addrs.is_empty() => addrs,
                _ => {
                    return Err(ConnectFailure {
                        reason: Reason::ResolveFailed,
                        addr: None,
                    });
                }
            }
        }
    };
    for ip in &addrs {
        if let Err(v) = policy.check_address(agent, *ip, target.port) {
            return Err(ConnectFailure {
                reason: v.deny_reason().unwrap_or(Reason::PrivateAddress),
                addr: Some(*ip),
            });
        }
    }
    Ok(addrs)
}

/// Dial the first of the checked `addrs` that answers. Never resolves again (THREATS B6).
pub async fn dial(
    addrs: &[IpAddr],
    port: u16,
    connect_timeout: Duration,
) -> Result<Upstream, ConnectFailure> {
    let mut last = ConnectFailure {
        reason: Reason::UpstreamFailed,
        addr: None,
    };
    for ip in addrs {
        let addr = SocketAddr::new(crate::policy::address::canonical(*ip), port);
        match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(Upstream { stream, addr });
            }
            Ok(Err(_)) => {
                last = ConnectFailure {
                    reason: Reason::UpstreamFailed,
                    addr: Some(addr.ip()),
                }
            }
            Err(_) => {
                last = ConnectFailure {
                    reason: Reason::Timeout,
                    addr: Some(addr.ip()),
                }
            }
        }
    }
    Err(last)
}
