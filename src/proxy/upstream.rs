//! Reaching an allowed target: resolve the name ourselves, check every address, dial exactly an
//! address that was checked (docs/architecture.md; docs/threat-model.md, "Reaching private and
//! internal addresses"). Never re-resolves and never dials an address the agent supplied unless
//! `allow_cidrs` covers it (`resolve_cidrs` admit only addresses a name resolved to).
//!
//! The resolver is injected ([`Resolve`]) so that tests control what names resolve to.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{ResolverBuilder, TokioResolver};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::policy::{AddressOrigin, AgentId, Host, Policy, Reason, Target};

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

/// hickory-resolver over the system's resolv.conf or configured upstream servers, with a
/// small cache of its answers in front.
pub struct DnsResolver {
    resolver: TokioResolver,
    names: NameCache,
}

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
        // No cache inside hickory: it counts answers, not bytes, and keeps each whole (an
        // agent's own DNS under an allowed wildcard can answer thousands of records a name,
        // for a day). `NameCache` below keeps at most MAX_ADDRESSES a name, and answers
        // without addresses for NEGATIVE_MIN_TTL.
        builder.options_mut().cache_size = 0;
        let resolver = builder
            .build()
            .map_err(|e| ResolveError::Failed(e.to_string()))?;
        Ok(Self {
            resolver,
            names: NameCache::default(),
        })
    }
}

impl Resolve for DnsResolver {
    fn lookup<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<IpAddr>, ResolveError>> {
        if let Some(addrs) = self.names.get(name, Instant::now()) {
            let found = if addrs.is_empty() {
                Err(ResolveError::NoAddress)
            } else {
                Ok(addrs)
            };
            return Box::pin(std::future::ready(found));
        }
        Box::pin(async move {
            // Fully qualified: search domains must never turn `evil` into `evil.corp.lan`.
            let fqdn = format!("{name}.");
            let looked = self.resolver.lookup_ip(fqdn.as_str()).await;
            let now = Instant::now();
            let lookup = match looked {
                Ok(l) => l,
                Err(e) if e.is_no_records_found() => {
                    self.names.put(name, &[], now + NEGATIVE_MIN_TTL, now);
                    return Err(ResolveError::NoAddress);
                }
                Err(e) => return Err(ResolveError::Failed(e.to_string())),
            };
            let addrs: Vec<IpAddr> = lookup.iter().take(MAX_ADDRESSES).collect();
            if addrs.is_empty() {
                self.names.put(name, &[], now + NEGATIVE_MIN_TTL, now);
                return Err(ResolveError::NoAddress);
            }
            self.names.put(name, &addrs, lookup.valid_until(), now);
            Ok(addrs)
        })
    }
}

/// Names kept at most; a full cache drops its expired entries, and if none are, all of
/// them (the next lookups go upstream). With at most [`MAX_ADDRESSES`] a name, the cache
/// holds at most about 4096 × (253 + 32 × 17 + 64) bytes, ~3.5 MiB.
const NAME_CACHE_MAX: usize = 4096;
/// Addresses kept of one answer, in the order given (the dial tries them in order).
pub const MAX_ADDRESSES: usize = 32;

/// Addresses per name until their TTL runs out: a cache hit is a hash lookup, where
/// hickory's own cache costs ~7 µs of future machinery per new tunnel. Only answers with
/// addresses are kept, never longer than hickory says they are valid, and every address is
/// still checked against the policy on every connection (resolve_checked). An empty list
/// is an answer without addresses.
#[derive(Default)]
struct NameCache(Mutex<HashMap<Box<str>, Cached>>);

/// A name's addresses and when they stop being valid.
type Cached = (Vec<IpAddr>, Instant);

impl NameCache {
    fn get(&self, name: &str, now: Instant) -> Option<Vec<IpAddr>> {
        let names = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match names.get(name) {
            Some((addrs, until)) if *until > now => Some(addrs.clone()),
            _ => None,
        }
    }

    fn put(&self, name: &str, addrs: &[IpAddr], until: Instant, now: Instant) {
        if until <= now {
            return;
        }
        let mut names = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if names.len() >= NAME_CACHE_MAX && !names.contains_key(name) {
            names.retain(|_, (_, u)| *u > now);
            if names.len() >= NAME_CACHE_MAX {
                names.clear();
            }
        }
        names.insert(name.into(), (addrs.to_vec(), until));
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
    let (addrs, origin) = match &target.host {
        Host::Ip(ip) => (vec![*ip], AddressOrigin::Literal),
        Host::Name(name) => {
            match tokio::time::timeout(resolve_timeout, resolver.lookup(name.as_str())).await {
                Ok(Ok(addrs)) if !addrs.is_empty() => (addrs, AddressOrigin::Resolved),
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
        if let Err(v) = policy.check_address(agent, *ip, target.port, origin) {
            return Err(ConnectFailure {
                reason: v.deny_reason().unwrap_or(Reason::PrivateAddress),
                addr: Some(*ip),
            });
        }
    }
    Ok(addrs)
}

/// Dial the first of the checked `addrs` that answers, and send it `first` (the agent's
/// bytes peeked so far, replayed unchanged; may be empty). Never resolves again
/// (docs/threat-model.md, "Rebinding between check and dial").
pub async fn dial(
    addrs: &[IpAddr],
    port: u16,
    connect_timeout: Duration,
    first: &[u8],
) -> Result<Upstream, ConnectFailure> {
    let mut last = ConnectFailure {
        reason: Reason::UpstreamFailed,
        addr: None,
    };
    for ip in addrs {
        let addr = SocketAddr::new(crate::policy::address::canonical(*ip), port);
        match tokio::time::timeout(connect_timeout, connect_and_send(addr, first)).await {
            Ok(Ok(stream)) => return Ok(Upstream { stream, addr }),
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

/// Connect to `addr` and send `first`. The bytes go out the moment the handshake is done,
/// which on loopback or a LAN is often before `connect(2)` returns: the send is tried at
/// once, and only if the socket is still connecting do we wait for the event loop. That
/// saves a round trip through it (and whatever else is queued there) per new tunnel.
async fn connect_and_send(addr: SocketAddr, first: &[u8]) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INPROGRESS.raw_os_error()) => {}
        Err(e) => return Err(e),
    }
    // Still connecting: `WouldBlock` (EAGAIN). Refused or reset: that error, now.
    let sent = if first.is_empty() {
        0
    } else {
        match socket.send(first) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        }
    };
    let mut stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    if sent == 0 {
        // Nothing went yet, so the connection is not known to be up: wait for it.
        stream.writable().await?;
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
    }
    stream
        .write_all(first.get(sent..).unwrap_or_default())
        .await?;
    Ok(stream)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The peeked bytes reach the upstream exactly once, whether they went out at once or
    /// after the handshake; a refused address fails the dial with that address logged.
    #[tokio::test]
    async fn dial_replays_the_first_bytes_and_reports_a_refusal() {
        use tokio::io::AsyncReadExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let first = b"\x16\x03\x01 hello".repeat(100);
        let up = dial(&[ip("127.0.0.1")], port, Duration::from_secs(2), &first)
            .await
            .unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        drop(up);
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, first);
        // Nothing to send: still a checked connection.
        let up = dial(&[ip("127.0.0.1")], port, Duration::from_secs(2), &[]).await;
        assert!(up.is_ok());
        // A closed port: refused, the next address is tried, the last failure reported.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let err = dial(&[ip("127.0.0.1")], closed, Duration::from_secs(2), &first)
            .await
            .err()
            .unwrap();
        assert_eq!(err.reason, Reason::UpstreamFailed);
        assert_eq!(err.addr, Some(ip("127.0.0.1")));
    }

    #[test]
    fn cached_names_expire_with_their_ttl() {
        let cache = NameCache::default();
        let now = Instant::now();
        let ttl = Duration::from_secs(30);
        cache.put("a.test", &[ip("192.0.2.1")], now + ttl, now);
        assert_eq!(cache.get("a.test", now), Some(vec![ip("192.0.2.1")]));
        assert_eq!(
            cache.get("a.test", now + ttl - Duration::from_millis(1)),
            Some(vec![ip("192.0.2.1")])
        );
        assert_eq!(cache.get("a.test", now + ttl), None, "served past its TTL");
        assert_eq!(cache.get("b.test", now), None);
        // An answer already expired (TTL 0) is not kept at all.
        cache.put("z.test", &[ip("192.0.2.9")], now, now);
        assert_eq!(cache.get("z.test", now - Duration::from_millis(1)), None);
        // A fresh answer replaces the old one.
        cache.put("a.test", &[ip("192.0.2.2")], now + ttl, now);
        assert_eq!(cache.get("a.test", now), Some(vec![ip("192.0.2.2")]));
    }

    #[test]
    fn the_cache_stays_bounded() {
        let cache = NameCache::default();
        let now = Instant::now();
        let long = now + Duration::from_secs(3600);
        for i in 0..NAME_CACHE_MAX + 10 {
            cache.put(&format!("n{i}.test"), &[ip("192.0.2.1")], long, now);
            assert!(cache.0.lock().unwrap().len() <= NAME_CACHE_MAX);
        }
        // The newest name is always in.
        let last = format!("n{}.test", NAME_CACHE_MAX + 9);
        assert!(cache.get(&last, now).is_some());
        // Expired entries go first, live ones stay when there is room that way.
        let cache = NameCache::default();
        cache.put("live.test", &[ip("192.0.2.1")], long, now);
        for i in 0..NAME_CACHE_MAX - 1 {
            cache.put(
                &format!("old{i}.test"),
                &[ip("192.0.2.1")],
                now + Duration::from_secs(1),
                now,
            );
        }
        let later = now + Duration::from_secs(2);
        cache.put("new.test", &[ip("192.0.2.3")], long, later);
        assert!(cache.get("live.test", later).is_some());
        assert!(cache.get("new.test", later).is_some());
        assert_eq!(cache.0.lock().unwrap().len(), 2);
    }
}
