//! `portcullis selftest`: run on an agent, try every escape path the gateway must close
//! (docs/threat-model.md, "Escaping around the proxy", and names through the gateway), and report
//! each as closed / OPEN / inconclusive, plus two checks that the gateway works at all (an allowed
//! name resolves and answers). All probes run at once, each bounded by the timeout, so a run takes
//! about one to three timeouts.
//!
//! `packets` builds the bytes, `probe` is the only module touching sockets, `verdict`
//! decides what each observation means (pure), `report` renders the table and picks the
//! exit code (pure). This module owns the plan: which probe, where, with what.

pub mod packets;
pub mod probe;
pub mod report;
pub mod verdict;

use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use report::{Path, Row};
use verdict::{Expect, Finding};

/// Where to probe and what to ask (see `portcullis selftest --help`).
#[derive(Debug, Clone)]
pub struct Options {
    /// The explicit proxy; `None` = transparent mode (names go to their addresses and the
    /// gateway's interception decides).
    pub proxy: Option<SocketAddr>,
    /// The resolver the agent uses (the gateway's filtering DNS).
    pub resolver: SocketAddr,
    pub probe_v4: Ipv4Addr,
    pub probe_v6: Ipv6Addr,
    pub outside_resolver: IpAddr,
    /// Ports other than 80/443 tried on `probe_v4`.
    pub ports: Vec<u16>,
    pub allowed_name: String,
    pub denied_name: String,
    pub doh_hosts: Vec<String>,
    pub timeout: Duration,
}

/// `nameserver` lines of a resolv.conf, first one: the agent's resolver.
pub fn first_nameserver(resolv_conf: &str) -> Option<IpAddr> {
    resolv_conf.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        (words.next() == Some("nameserver"))
            .then(|| words.next())
            .flatten()
            .and_then(|a| a.split('%').next())
            .and_then(|a| a.parse().ok())
    })
}

/// Random bytes for ids, labels and hellos: not secret, only unpredictable enough that a
/// cached answer or a replay cannot pass for a fresh one.
fn random_bytes<const N: usize>() -> [u8; N] {
    let state = std::collections::hash_map::RandomState::new();
    let mut out = [0u8; N];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let v = state.hash_one((i, std::time::SystemTime::now()));
        chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
    }
    out
}

fn random_id() -> u16 {
    u16::from_le_bytes(random_bytes::<2>())
}

/// One planned attempt: the row's path and text, and the future that yields its finding.
type Probe = (
    Path,
    String,
    std::pin::Pin<Box<dyn std::future::Future<Output = Finding> + Send>>,
);

fn sock(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Every probe, in report order.
fn plan(o: &Options) -> Vec<Probe> {
    let t = o.timeout;
    let mut probes: Vec<Probe> = Vec::new();
    let v4 = IpAddr::V4(o.probe_v4);
    let v6 = IpAddr::V6(o.probe_v6);

    // A ClientHello without SNI: what a client sends to a bare address; the gateway denies
    // it at once (no_sni), a real server answers it.
    let raw_tls = |ip: IpAddr| {
        let to = sock(ip, 443);
        let hello = packets::client_hello(None, random_bytes());
        (
            format!("tcp {to}, TLS hello without SNI"),
            Box::pin(async move {
                verdict::tcp_escape(&probe::tcp(to, &hello, t).await, Expect::Raw, t)
            }) as std::pin::Pin<Box<dyn std::future::Future<Output = Finding> + Send>>,
        )
    };
    let raw_http = |ip: IpAddr, port: u16| {
        let to = sock(ip, port);
        let request = packets::http_request(ip, port);
        (
            format!("tcp {to}, HTTP GET"),
            Box::pin(async move {
                verdict::tcp_escape(&probe::tcp(to, &request, t).await, Expect::Raw, t)
            }) as std::pin::Pin<Box<dyn std::future::Future<Output = Finding> + Send>>,
        )
    };
    let quic = |ip: IpAddr| {
        let to = sock(ip, 443);
        let (dcid, scid) = (random_bytes(), random_bytes());
        let datagram = packets::quic_probe(dcid, scid);
        (
            format!("udp {to}, QUIC version probe"),
            Box::pin(async move {
                verdict::quic_escape(&probe::udp(to, &datagram, t).await, dcid, scid, t)
            }) as std::pin::Pin<Box<dyn std::future::Future<Output = Finding> + Send>>,
        )
    };

    let (tried, f) = raw_tls(v4);
    probes.push((Path::DirectIp, tried, f));
    let (tried, f) = raw_http(v4, 80);
    probes.push((Path::DirectIp, tried, f));
    for &port in &o.ports {
        let (tried, f) = raw_http(v4, port);
        probes.push((Path::OtherPort, tried, f));
    }
    let (tried, f) = quic(v4);
    probes.push((Path::Quic, tried, f));
    let (tried, f) = raw_tls(v6);
    probes.push((Path::Ipv6, tried, f));
    let (tried, f) = quic(v6);
    probes.push((Path::Ipv6, tried, f));

    // Outside resolver, both transports, asked the denied name (which any public resolver
    // answers and the gateway's forwarder refuses).
    let outside = sock(o.outside_resolver, 53);
    for tcp in [false, true] {
        let name = o.denied_name.clone();
        let proto = if tcp { "tcp" } else { "udp" };
        probes.push((
            Path::OutsideDns,
            format!("{proto} {outside}, A {name}"),
            Box::pin(async move {
                let id = random_id();
                let seen = if tcp {
                    probe::dns_tcp(outside, &name, id, t).await
                } else {
                    probe::dns_udp(outside, &name, id, t).await
                };
                verdict::outside_dns(&seen, &name, t)
            }),
        ));
    }

    // DNS exfiltration: a random label, shaped like an encoded payload, under the denied
    // name, through the gateway's resolver.
    let exfil = format!(
        "{}.{}",
        packets::random_label(&random_bytes::<32>(), 50),
        o.denied_name
    );
    let resolver = o.resolver;
    probes.push((
        Path::DnsExfil,
        format!("udp {resolver}, A {exfil}"),
        Box::pin(async move {
            verdict::dns_exfil(&probe::dns_udp(resolver, &exfil, random_id(), t).await, t)
        }),
    ));

    // Names the gateway must deny: DoH resolvers and the denied name.
    let mut named: Vec<(Path, String)> =
        o.doh_hosts.iter().map(|h| (Path::Doh, h.clone())).collect();
    named.push((Path::DeniedName, o.denied_name.clone()));
    for (path, host) in named {
        let hello = packets::client_hello(Some(&host), random_bytes());
        match o.proxy {
            Some(proxy) => probes.push((
                path,
                format!("CONNECT {host}:443 via {proxy}"),
                Box::pin(async move {
                    verdict::proxy_escape(&probe::proxy_connect(proxy, &host, 443, &hello, t).await)
                }),
            )),
            None => {
                // Transparent: the gateway decides on the SNI, whatever address is dialled.
                let to = sock(v4, 443);
                probes.push((
                    path,
                    format!("tcp {to}, TLS hello SNI {host}"),
                    Box::pin(async move {
                        verdict::tcp_escape(&probe::tcp(to, &hello, t).await, Expect::Named, t)
                    }),
                ));
            }
        }
    }

    // The gateway works: the allowed name resolves through its resolver and answers.
    let name = o.allowed_name.clone();
    probes.push((
        Path::GatewayDns,
        format!("udp {resolver}, A {name}"),
        Box::pin(async move {
            verdict::gateway_dns(&probe::dns_udp(resolver, &name, random_id(), t).await, t)
        }),
    ));
    let name = o.allowed_name.clone();
    let hello = packets::client_hello(Some(&name), random_bytes());
    match o.proxy {
        Some(proxy) => probes.push((
            Path::AllowedName,
            format!("CONNECT {name}:443 via {proxy}, TLS hello"),
            Box::pin(async move {
                verdict::proxy_works(&probe::proxy_connect(proxy, &name, 443, &hello, t).await)
            }),
        )),
        None => probes.push((
            Path::AllowedName,
            format!("tcp {name}:443 (resolved via {resolver}), TLS hello SNI {name}"),
            Box::pin(async move {
                let seen = probe::dns_udp(resolver, &name, random_id(), t).await;
                let Some(ip) = probe::addresses(&seen).into_iter().next() else {
                    return Finding {
                        outcome: verdict::Outcome::Failed,
                        detail: format!(
                            "cannot resolve it: {}",
                            verdict::gateway_dns(&seen, t).detail
                        ),
                    };
                };
                verdict::tcp_works(&probe::tcp(sock(ip, 443), &hello, t).await, t)
            }),
        )),
    }
    probes
}

/// Run every probe concurrently; rows in plan order.
pub async fn run(options: &Options) -> Vec<Row> {
    let mut set = tokio::task::JoinSet::new();
    let mut rows: Vec<Option<Row>> = Vec::new();
    for (i, (path, tried, fut)) in plan(options).into_iter().enumerate() {
        rows.push(Some(Row {
            path,
            tried,
            finding: Finding {
                outcome: verdict::Outcome::Inconclusive,
                detail: "the probe did not finish".into(),
            },
        }));
        set.spawn(async move { (i, fut.await) });
    }
    while let Some(joined) = set.join_next().await {
        if let Ok((i, finding)) = joined
            && let Some(Some(row)) = rows.get_mut(i)
        {
            row.finding = finding;
        }
    }
    rows.into_iter().flatten().collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf() {
        assert_eq!(
            first_nameserver("# x\nsearch lan\nnameserver 10.66.0.1\nnameserver 1.1.1.1\n"),
            Some("10.66.0.1".parse().unwrap())
        );
        assert_eq!(
            first_nameserver("nameserver fe80::1%eth0\n"),
            Some("fe80::1".parse().unwrap())
        );
        assert_eq!(first_nameserver("options ndots:1\n"), None);
    }

    #[test]
    fn the_plan_covers_every_path() {
        let o = Options {
            proxy: None,
            resolver: "10.66.0.1:53".parse().unwrap(),
            probe_v4: "192.0.2.1".parse().unwrap(),
            probe_v6: "2001:db8::1".parse().unwrap(),
            outside_resolver: "192.0.2.53".parse().unwrap(),
            ports: vec![22, 25],
            allowed_name: "allowed.test".into(),
            denied_name: "evil.test".into(),
            doh_hosts: vec!["dns.google".into()],
            timeout: Duration::from_secs(1),
        };
        let tried: Vec<(Path, String)> = plan(&o).into_iter().map(|(p, t, _)| (p, t)).collect();
        let paths: Vec<Path> = tried.iter().map(|(p, _)| *p).collect();
        assert_eq!(
            paths,
            [
                Path::DirectIp,
                Path::DirectIp,
                Path::OtherPort,
                Path::OtherPort,
                Path::Quic,
                Path::Ipv6,
                Path::Ipv6,
                Path::OutsideDns,
                Path::OutsideDns,
                Path::DnsExfil,
                Path::Doh,
                Path::DeniedName,
                Path::GatewayDns,
                Path::AllowedName,
            ]
        );
        assert_eq!(tried[0].1, "tcp 192.0.2.1:443, TLS hello without SNI");
        assert_eq!(tried[3].1, "tcp 192.0.2.1:25, HTTP GET");
        assert_eq!(tried[6].1, "udp [2001:db8::1]:443, QUIC version probe");
        assert_eq!(tried[8].1, "tcp 192.0.2.53:53, A evil.test");
        assert!(tried[9].1.ends_with(".evil.test"), "{}", tried[9].1);
        assert_eq!(tried[10].1, "tcp 192.0.2.1:443, TLS hello SNI dns.google");
        let o = Options {
            proxy: Some("10.66.0.1:3128".parse().unwrap()),
            ..o
        };
        let tried: Vec<String> = plan(&o).into_iter().map(|(_, t, _)| t).collect();
        assert_eq!(tried[10], "CONNECT dns.google:443 via 10.66.0.1:3128");
        assert_eq!(tried[11], "CONNECT evil.test:443 via 10.66.0.1:3128");
    }

    #[test]
    fn randomness_differs_between_calls() {
        assert_ne!(random_bytes::<16>(), random_bytes::<16>());
    }
}
