//! What an observation means: pure functions from what a probe saw (a [`TcpSeen`],
//! [`UdpSeen`], [`DnsSeen`] or [`ProxySeen`]) to a [`Finding`]. No sockets, no clock.
//!
//! How "open" is told apart from "closed" without a cooperating server, given how the
//! portcullis ruleset behaves (`src/nft/render.rs`): every agent packet it does not divert
//! to a portcullis listener is **dropped**, never rejected. So:
//! - no SYN-ACK / no reply before the deadline, or no route → `closed`;
//! - a connection that completes and gets bytes back → `OPEN` (something past the gateway
//!   answered), unless the bytes are portcullis' own refusal: an HTTP response with
//!   `x-portcullis-reason`, or, to a ClientHello, one fatal TLS `access_denied` alert record
//!   and nothing else (a server that answers a hello sends a ServerHello or, for a name it
//!   does not serve, another alert);
//! - a connection that completes and is closed without a byte after a complete request →
//!   `closed`: the transparent listener took it and denied it (a real server answers a
//!   ClientHello or an HTTP request);
//! - "connection refused" (TCP RST, ICMP port unreachable) → `inconclusive`: the portcullis
//!   ruleset never sends one, so some host answered: the target itself (the packet got
//!   out: open, but the port is closed) or another firewall rejecting (closed). The two
//!   cannot be told apart from the agent.

use std::time::Duration;

use hickory_proto::op::ResponseCode;

use super::packets::{ALERT_ACCESS_DENIED, DnsReply, is_version_negotiation, tls_alert};

/// The result column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The escape path is shut.
    Closed,
    /// The escape path is open: something outside answered.
    Open,
    /// The observation does not decide it (see the detail).
    Inconclusive,
    /// A gateway check: the gateway did what it is for.
    Ok,
    /// A gateway check: the gateway did not work.
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Closed => "closed",
            Outcome::Open => "OPEN",
            Outcome::Inconclusive => "inconclusive",
            Outcome::Ok => "ok",
            Outcome::Failed => "FAILED",
        }
    }
}

/// An outcome and the one-line reason for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub outcome: Outcome,
    pub detail: String,
}

fn finding(outcome: Outcome, detail: impl Into<String>) -> Finding {
    Finding {
        outcome,
        detail: detail.into(),
    }
}

/// How a connection that completed ended, when no byte came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Orderly close (FIN).
    Eof,
    /// Reset, or the write of our request failed.
    Reset,
    /// Still open, nothing received, when the deadline passed.
    Silent,
}

/// One TCP attempt: connect, send a complete request, read what comes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpSeen {
    /// No SYN-ACK before the deadline.
    ConnectTimeout,
    /// RST in answer to the SYN (ECONNREFUSED).
    Refused,
    /// No route, or network/host unreachable.
    Unreachable(String),
    /// Any other error before the connection completed.
    Error(String),
    /// Connected and sent the request; `reply` is every byte received before `end` (or
    /// before the deadline / the read cap, with `end = Silent`).
    Connected { reply: Vec<u8>, end: End },
}

/// What the probe knew about the far side when it sent the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A bare address: a complete request the gateway decides at once (ClientHello without
    /// SNI, HTTP to an IP literal), so a connection held open in silence is past the gateway.
    Raw,
    /// A name (SNI): the gateway may be resolving and dialling, silence decides nothing.
    Named,
}

/// An escape attempt over TCP.
pub fn tcp_escape(seen: &TcpSeen, expect: Expect, timeout: Duration) -> Finding {
    let t = fmt_duration(timeout);
    match seen {
        TcpSeen::ConnectTimeout => finding(
            Outcome::Closed,
            format!("no answer to the SYN in {t} (dropped)"),
        ),
        TcpSeen::Unreachable(e) => finding(Outcome::Closed, format!("unreachable: {e}")),
        TcpSeen::Refused => finding(
            Outcome::Inconclusive,
            "connection refused: the portcullis ruleset drops silently, so this RST came \
             from the target (reached, port closed) or from another firewall",
        ),
        TcpSeen::Error(e) => finding(Outcome::Inconclusive, format!("error: {e}")),
        TcpSeen::Connected { reply, end } => {
            if let Some(refusal) = gateway_refusal(reply) {
                return finding(Outcome::Closed, format!("denied by the gateway: {refusal}"));
            }
            if !reply.is_empty() {
                return finding(
                    Outcome::Open,
                    format!("connected; {} back", describe_bytes(reply)),
                );
            }
            match (end, expect) {
                (End::Eof | End::Reset, _) => finding(
                    Outcome::Closed,
                    "accepted, then closed without a byte: intercepted and denied by the \
                     gateway (a server answers this request)",
                ),
                (End::Silent, Expect::Raw) => finding(
                    Outcome::Open,
                    format!(
                        "connected and held open {t} without a reply: past the gateway \
                         (portcullis answers or closes a complete request at once)"
                    ),
                ),
                (End::Silent, Expect::Named) => finding(
                    Outcome::Inconclusive,
                    format!("connected, no reply and no close in {t}"),
                ),
            }
        }
    }
}

/// The allowed name, sent transparently (ClientHello with its SNI to its address): the
/// gateway works if the upstream's answer comes back.
pub fn tcp_works(seen: &TcpSeen, timeout: Duration) -> Finding {
    match seen {
        TcpSeen::Connected { reply, .. } if !reply.is_empty() => {
            if let Some(refusal) = gateway_refusal(reply) {
                finding(Outcome::Failed, format!("denied by the gateway: {refusal}"))
            } else {
                finding(
                    Outcome::Ok,
                    format!("the upstream answered: {}", describe_bytes(reply)),
                )
            }
        }
        other => {
            let why = tcp_escape(other, Expect::Named, timeout).detail;
            finding(Outcome::Failed, why)
        }
    }
}

/// If `reply` is portcullis' own refusal, what it said: "HTTP 403 not_allowed" (status and
/// `x-portcullis-reason`), or "TLS alert access_denied" (the hello was refused; the alert
/// carries no reason, the gateway's log has it).
pub fn gateway_refusal(reply: &[u8]) -> Option<String> {
    if tls_alert(reply) == Some((2, ALERT_ACCESS_DENIED)) {
        return Some("TLS alert access_denied".into());
    }
    http_refusal(reply).map(|r| format!("HTTP {r}"))
}

/// If `reply` is portcullis' own HTTP refusal, its status and reason ("403 not_allowed").
fn http_refusal(reply: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(reply.get(..reply.len().min(4096))?).ok()?;
    let (head, _) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let mut lines = head.split("\r\n");
    let status = lines.next()?.strip_prefix("HTTP/1.")?.get(2..)?;
    let code = status.split_whitespace().next()?;
    let reason = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(crate::proxy::forward::REASON_HEADER)
            .then(|| v.trim().to_owned())
    })?;
    Some(format!("{code} {reason}"))
}

/// One UDP exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UdpSeen {
    Reply(Vec<u8>),
    NoReply,
    /// ICMP port unreachable came back (ECONNREFUSED on the connected socket).
    Refused,
    Unreachable(String),
    Error(String),
}

/// The QUIC probe ([`super::packets::quic_probe`] with these ids).
pub fn quic_escape(seen: &UdpSeen, dcid: [u8; 8], scid: [u8; 8], timeout: Duration) -> Finding {
    match seen {
        UdpSeen::Reply(b) if is_version_negotiation(b, dcid, scid) => finding(
            Outcome::Open,
            "a QUIC server answered (version negotiation)",
        ),
        UdpSeen::Reply(b) => finding(Outcome::Open, format!("{} came back", describe_bytes(b))),
        UdpSeen::NoReply => finding(
            Outcome::Closed,
            format!("no reply in {} (dropped)", fmt_duration(timeout)),
        ),
        UdpSeen::Refused => finding(
            Outcome::Inconclusive,
            "ICMP port unreachable: the portcullis ruleset drops silently, so the target \
             (reached, nothing listening) or another firewall answered",
        ),
        UdpSeen::Unreachable(e) => finding(Outcome::Closed, format!("unreachable: {e}")),
        UdpSeen::Error(e) => finding(Outcome::Inconclusive, format!("error: {e}")),
    }
}

/// One DNS exchange, over UDP or TCP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsSeen {
    Reply(DnsReply),
    /// Bytes that are not the reply to our query.
    Garbage(usize),
    NoReply,
    /// ICMP port unreachable (UDP) or RST (TCP).
    Refused,
    Unreachable(String),
    Error(String),
}

/// The Extended DNS Error of a reply, for a detail: ` (EDE 15 Blocked: "portcullis: …")`.
fn ede_note(r: &DnsReply) -> String {
    match &r.ede {
        Some((info, text)) => format!(" (EDE {}: {text:?})", crate::dns::ede::describe(*info)),
        None => String::new(),
    }
}

/// The reply carries portcullis' own Extended DNS Error: refused by the gateway's policy.
fn gateway_ede(r: &DnsReply) -> bool {
    r.ede
        .as_ref()
        .is_some_and(|(_, text)| text.starts_with("portcullis: "))
}

fn rcode_name(rcode: ResponseCode) -> String {
    match rcode {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        other => format!("rcode {}", u16::from(other)),
    }
}

/// The shared part of the DNS verdicts: everything but a parsed reply.
fn dns_unanswered(seen: &DnsSeen, timeout: Duration, no_reply: Outcome) -> Finding {
    match seen {
        DnsSeen::NoReply => finding(
            no_reply,
            format!("no reply in {} (dropped)", fmt_duration(timeout)),
        ),
        DnsSeen::Garbage(0) => finding(
            Outcome::Inconclusive,
            "the connection closed without a reply",
        ),
        DnsSeen::Garbage(n) => finding(
            Outcome::Inconclusive,
            format!("{n} bytes back that are not a reply to the query"),
        ),
        DnsSeen::Refused if no_reply == Outcome::Failed => finding(
            Outcome::Failed,
            "port unreachable / connection refused: no resolver listens there",
        ),
        DnsSeen::Refused => finding(
            Outcome::Inconclusive,
            "port unreachable / connection refused: the portcullis ruleset drops silently, \
             so the target or another firewall answered",
        ),
        DnsSeen::Unreachable(e) => finding(no_reply, format!("unreachable: {e}")),
        DnsSeen::Error(e) => finding(Outcome::Inconclusive, format!("error: {e}")),
        DnsSeen::Reply(_) => finding(Outcome::Inconclusive, "unexpected reply"),
    }
}

/// The denied name asked of a resolver outside the gateway. A public resolver answers that
/// name; the gateway's filtering forwarder (the ruleset redirects all agent DNS to it)
/// refuses it, so a refusal without records means the query was caught.
pub fn outside_dns(seen: &DnsSeen, name: &str, timeout: Duration) -> Finding {
    let DnsSeen::Reply(r) = seen else {
        return dns_unanswered(seen, timeout, Outcome::Closed);
    };
    let rcode = rcode_name(r.rcode);
    match r.rcode {
        ResponseCode::NoError if r.answers > 0 => finding(
            Outcome::Open,
            format!(
                "answered {name}: {rcode}, {} record(s){}",
                r.answers,
                list_addresses(r)
            ),
        ),
        ResponseCode::Refused | ResponseCode::NXDomain if r.answers == 0 => finding(
            Outcome::Closed,
            format!(
                "{rcode}{}: the gateway's filtering resolver caught it (a public resolver \
                 answers {name})",
                ede_note(r)
            ),
        ),
        _ => finding(
            Outcome::Inconclusive,
            format!("{rcode} with {} record(s)", r.answers),
        ),
    }
}

/// A random label under the denied name, asked of the gateway's resolver: it must be
/// refused without being forwarded (docs/threat-model.md, "DNS tunnelling").
pub fn dns_exfil(seen: &DnsSeen, timeout: Duration) -> Finding {
    let DnsSeen::Reply(r) = seen else {
        return dns_unanswered(seen, timeout, Outcome::Closed);
    };
    let rcode = rcode_name(r.rcode);
    match r.rcode {
        ResponseCode::Refused => finding(
            Outcome::Closed,
            format!(
                "REFUSED{}: the resolver would not look the name up",
                ede_note(r)
            ),
        ),
        ResponseCode::NXDomain if gateway_ede(r) => finding(
            Outcome::Closed,
            format!(
                "NXDOMAIN{}: refused by the gateway's policy, not looked up",
                ede_note(r)
            ),
        ),
        ResponseCode::NoError => finding(
            Outcome::Open,
            format!(
                "NOERROR with {} record(s): the resolver looks up names outside the policy",
                r.answers
            ),
        ),
        ResponseCode::NXDomain => finding(
            Outcome::Inconclusive,
            "NXDOMAIN without portcullis' Extended DNS Error: a forwarding resolver answers \
             so after asking upstream (the leak)",
        ),
        ResponseCode::ServFail => finding(
            Outcome::Inconclusive,
            "SERVFAIL: the resolver probably tried to look it up upstream",
        ),
        _ => finding(Outcome::Inconclusive, rcode),
    }
}

/// The allowed name through the gateway's resolver: it must resolve.
pub fn gateway_dns(seen: &DnsSeen, timeout: Duration) -> Finding {
    match seen {
        DnsSeen::Reply(r) if r.rcode == ResponseCode::NoError && !r.addresses.is_empty() => {
            finding(
                Outcome::Ok,
                format!("NOERROR{}", list_addresses(r).replacen(';', ":", 1)),
            )
        }
        DnsSeen::Reply(r) => finding(
            Outcome::Failed,
            format!("{} with no address{}", rcode_name(r.rcode), ede_note(r)),
        ),
        other => {
            let why = dns_unanswered(other, timeout, Outcome::Failed).detail;
            finding(Outcome::Failed, why)
        }
    }
}

fn list_addresses(r: &DnsReply) -> String {
    if r.addresses.is_empty() {
        return String::new();
    }
    let list: Vec<String> = r.addresses.iter().map(ToString::to_string).collect();
    format!("; {}", list.join(", "))
}

/// One `CONNECT` through the explicit proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxySeen {
    /// The proxy itself could not be reached.
    Unreachable(String),
    /// Connected, but no complete response head before the deadline.
    NoAnswer(String),
    /// The response head; after a 200, what the tunnel returned for our ClientHello.
    Answered {
        status: u16,
        reason: Option<String>,
        tunnel: Option<(Vec<u8>, End)>,
    },
}

fn status_text(status: u16, reason: Option<&str>) -> String {
    match reason {
        Some(r) => format!("{status} {r}"),
        None => status.to_string(),
    }
}

/// A name the gateway must deny, through the proxy.
pub fn proxy_escape(seen: &ProxySeen) -> Finding {
    match seen {
        ProxySeen::Answered {
            status: 200,
            tunnel: Some((reply, _)),
            ..
        } if gateway_refusal(reply).is_some() => finding(
            Outcome::Closed,
            format!(
                "the proxy opened the tunnel, then refused the hello: {}",
                gateway_refusal(reply).unwrap_or_default()
            ),
        ),
        ProxySeen::Answered { status: 200, .. } => finding(
            Outcome::Open,
            "the proxy opened the tunnel (200 Connection established)",
        ),
        ProxySeen::Answered {
            status: 403,
            reason,
            ..
        } => finding(
            Outcome::Closed,
            format!(
                "denied by the proxy: {}",
                status_text(403, reason.as_deref())
            ),
        ),
        ProxySeen::Answered { status, reason, .. } => finding(
            Outcome::Inconclusive,
            format!(
                "the proxy answered {}",
                status_text(*status, reason.as_deref())
            ),
        ),
        ProxySeen::Unreachable(e) => finding(Outcome::Inconclusive, format!("no proxy: {e}")),
        ProxySeen::NoAnswer(e) => finding(Outcome::Inconclusive, format!("no answer: {e}")),
    }
}

/// The allowed name through the proxy: a 200 and the upstream's answer to our hello.
pub fn proxy_works(seen: &ProxySeen) -> Finding {
    match seen {
        ProxySeen::Answered {
            status: 200,
            tunnel: Some((reply, _)),
            ..
        } if gateway_refusal(reply).is_some() => finding(
            Outcome::Failed,
            format!(
                "200, then the hello was refused: {}",
                gateway_refusal(reply).unwrap_or_default()
            ),
        ),
        ProxySeen::Answered {
            status: 200,
            tunnel: Some((reply, _)),
            ..
        } if !reply.is_empty() => finding(
            Outcome::Ok,
            format!("200, then the upstream answered: {}", describe_bytes(reply)),
        ),
        ProxySeen::Answered { status: 200, .. } => finding(
            Outcome::Failed,
            "200, but nothing came back through the tunnel",
        ),
        ProxySeen::Answered { status, reason, .. } => finding(
            Outcome::Failed,
            format!(
                "the proxy answered {}",
                status_text(*status, reason.as_deref())
            ),
        ),
        ProxySeen::Unreachable(e) => finding(Outcome::Failed, format!("no proxy: {e}")),
        ProxySeen::NoAnswer(e) => finding(Outcome::Failed, format!("no answer: {e}")),
    }
}

/// "37 bytes (TLS handshake)" / "12 bytes: \"SSH-2.0-x\"".
pub fn describe_bytes(b: &[u8]) -> String {
    let kind = match b {
        [0x16, 0x03, ..] => Some("TLS handshake"),
        [0x15, 0x03, ..] => Some("TLS alert"),
        _ => None,
    };
    if let Some(kind) = kind {
        return format!("{} bytes ({kind})", b.len());
    }
    let preview: String = b
        .iter()
        .take(32)
        .map(|&c| {
            if c.is_ascii_graphic() || c == b' ' {
                char::from(c)
            } else {
                '.'
            }
        })
        .collect();
    format!("{} bytes: \"{preview}\"", b.len())
}

pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(2);

    fn connected(reply: &[u8], end: End) -> TcpSeen {
        TcpSeen::Connected {
            reply: reply.to_vec(),
            end,
        }
    }

    #[test]
    fn tcp_outcomes() {
        let o = |s: &TcpSeen, e| tcp_escape(s, e, T).outcome;
        assert_eq!(o(&TcpSeen::ConnectTimeout, Expect::Raw), Outcome::Closed);
        assert_eq!(
            o(&TcpSeen::Unreachable("no route".into()), Expect::Raw),
            Outcome::Closed
        );
        // The ruleset never rejects: a RST proves nothing either way.
        assert_eq!(o(&TcpSeen::Refused, Expect::Raw), Outcome::Inconclusive);
        assert_eq!(
            o(&TcpSeen::Error("x".into()), Expect::Raw),
            Outcome::Inconclusive
        );
        assert_eq!(
            o(&connected(b"SSH-2.0-OpenSSH\r\n", End::Silent), Expect::Raw),
            Outcome::Open
        );
        assert_eq!(
            o(
                &connected(&[0x16, 0x03, 0x03, 0, 1], End::Eof),
                Expect::Named
            ),
            Outcome::Open
        );
        // Accepted then closed in silence: the transparent listener denied it.
        for end in [End::Eof, End::Reset] {
            assert_eq!(o(&connected(b"", end), Expect::Raw), Outcome::Closed);
            assert_eq!(o(&connected(b"", end), Expect::Named), Outcome::Closed);
        }
        assert_eq!(o(&connected(b"", End::Silent), Expect::Raw), Outcome::Open);
        assert_eq!(
            o(&connected(b"", End::Silent), Expect::Named),
            Outcome::Inconclusive
        );
    }

    #[test]
    fn the_gateways_own_refusal_is_closed_not_open() {
        let refusal = b"HTTP/1.1 403 Forbidden\r\nX-Portcullis-Reason: not_allowed\r\ncontent-length: 3\r\n\r\nno\n";
        assert_eq!(
            gateway_refusal(refusal).as_deref(),
            Some("HTTP 403 not_allowed")
        );
        let f = tcp_escape(&connected(refusal, End::Eof), Expect::Raw, T);
        assert_eq!(f.outcome, Outcome::Closed);
        assert!(f.detail.contains("403 not_allowed"), "{}", f.detail);
        // Any other server's 403 is an answer from outside.
        let other = b"HTTP/1.1 403 Forbidden\r\nServer: nginx\r\n\r\n";
        assert_eq!(gateway_refusal(other), None);
        assert_eq!(
            tcp_escape(&connected(other, End::Eof), Expect::Raw, T).outcome,
            Outcome::Open
        );
        assert_eq!(gateway_refusal(b"SSH-2.0-x\r\n"), None);
        assert_eq!(gateway_refusal(&[0xff, 0xfe]), None);
        assert_eq!(
            tcp_works(&connected(refusal, End::Eof), T).outcome,
            Outcome::Failed
        );
    }

    /// The transparent listener refuses a hello with one fatal access_denied alert: closed
    /// (or failed, for the allowed name), with that reason. Any other alert, or an alert
    /// followed by more bytes, is an answer from outside.
    #[test]
    fn the_gateways_alert_is_closed_not_open() {
        let alert = [21, 3, 1, 0, 2, 2, 49];
        for end in [End::Eof, End::Reset, End::Silent] {
            let f = tcp_escape(&connected(&alert, end), Expect::Named, T);
            assert_eq!(f.outcome, Outcome::Closed, "{end:?}");
            assert_eq!(f.detail, "denied by the gateway: TLS alert access_denied");
        }
        let f = tcp_works(&connected(&alert, End::Eof), T);
        assert_eq!(f.outcome, Outcome::Failed);
        assert!(f.detail.contains("TLS alert access_denied"), "{}", f.detail);
        // unrecognized_name (112), a warning, or an alert and a handshake: a real server.
        for other in [
            &[21, 3, 3, 0, 2, 2, 112][..],
            &[21, 3, 3, 0, 2, 1, 49],
            &[21, 3, 3, 0, 2, 2, 49, 22, 3, 3, 0, 1, 0],
        ] {
            assert_eq!(
                tcp_escape(&connected(other, End::Eof), Expect::Named, T).outcome,
                Outcome::Open,
                "{other:?}"
            );
        }
    }

    #[test]
    fn tcp_works_needs_an_answer() {
        assert_eq!(
            tcp_works(&connected(&[0x16, 3, 3], End::Eof), T).outcome,
            Outcome::Ok
        );
        for s in [
            connected(b"", End::Eof),
            connected(b"", End::Silent),
            TcpSeen::ConnectTimeout,
            TcpSeen::Refused,
        ] {
            assert_eq!(tcp_works(&s, T).outcome, Outcome::Failed, "{s:?}");
        }
    }

    #[test]
    fn quic_outcomes() {
        let (d, s) = ([1u8; 8], [2u8; 8]);
        let mut vn = vec![0x80, 0, 0, 0, 0, 8];
        vn.extend_from_slice(&s);
        vn.push(8);
        vn.extend_from_slice(&d);
        let f = quic_escape(&UdpSeen::Reply(vn), d, s, T);
        assert_eq!(f.outcome, Outcome::Open);
        assert!(f.detail.contains("version negotiation"));
        let f = quic_escape(&UdpSeen::Reply(vec![1, 2, 3]), d, s, T);
        assert_eq!(f.outcome, Outcome::Open);
        assert_eq!(
            quic_escape(&UdpSeen::NoReply, d, s, T).outcome,
            Outcome::Closed
        );
        assert_eq!(
            quic_escape(&UdpSeen::Refused, d, s, T).outcome,
            Outcome::Inconclusive
        );
        assert_eq!(
            quic_escape(&UdpSeen::Unreachable("x".into()), d, s, T).outcome,
            Outcome::Closed
        );
    }

    fn reply(rcode: ResponseCode, addresses: &[&str]) -> DnsSeen {
        DnsSeen::Reply(DnsReply {
            rcode,
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            answers: addresses.len(),
            ede: None,
        })
    }

    fn with_ede(seen: DnsSeen, info: u16, text: &str) -> DnsSeen {
        let DnsSeen::Reply(mut r) = seen else {
            panic!("not a reply")
        };
        r.ede = Some((info, text.to_owned()));
        DnsSeen::Reply(r)
    }

    /// The forwarder's NXDOMAIN (the default refusal) with its Extended DNS Error is the
    /// gateway at work, named with its reason; without the EDE it proves nothing.
    #[test]
    fn the_gateways_ede_is_closed_with_its_reason() {
        let text = "portcullis: not_allowed for coder-1";
        let nx = with_ede(reply(ResponseCode::NXDomain, &[]), 15, text);
        let f = dns_exfil(&nx, T);
        assert_eq!(f.outcome, Outcome::Closed);
        assert_eq!(
            f.detail,
            "NXDOMAIN (EDE 15 Blocked: \"portcullis: not_allowed for coder-1\"): refused by \
             the gateway's policy, not looked up"
        );
        let f = outside_dns(&nx, "example.com", T);
        assert_eq!(f.outcome, Outcome::Closed);
        assert!(f.detail.contains("EDE 15 Blocked"), "{}", f.detail);
        let refused = with_ede(
            reply(ResponseCode::Refused, &[]),
            18,
            "portcullis: kill_switch for coder-1",
        );
        assert!(dns_exfil(&refused, T).detail.contains("18 Prohibited"));
        // Another resolver's EDE is not the gateway's.
        let other = with_ede(
            reply(ResponseCode::NXDomain, &[]),
            15,
            "blocked by a DNS filter",
        );
        assert_eq!(dns_exfil(&other, T).outcome, Outcome::Inconclusive);
        let f = gateway_dns(&nx, T);
        assert_eq!(f.outcome, Outcome::Failed);
        assert!(f.detail.contains(text), "{}", f.detail);
    }

    #[test]
    fn dns_outcomes() {
        let outside = |s: &DnsSeen| outside_dns(s, "example.com", T).outcome;
        assert_eq!(
            outside(&reply(ResponseCode::NoError, &["192.0.2.1"])),
            Outcome::Open
        );
        assert_eq!(outside(&reply(ResponseCode::Refused, &[])), Outcome::Closed);
        assert_eq!(
            outside(&reply(ResponseCode::NXDomain, &[])),
            Outcome::Closed
        );
        assert_eq!(
            outside(&reply(ResponseCode::NoError, &[])),
            Outcome::Inconclusive
        );
        assert_eq!(
            outside(&reply(ResponseCode::ServFail, &[])),
            Outcome::Inconclusive
        );
        assert_eq!(outside(&DnsSeen::NoReply), Outcome::Closed);
        assert_eq!(outside(&DnsSeen::Refused), Outcome::Inconclusive);
        assert_eq!(outside(&DnsSeen::Garbage(3)), Outcome::Inconclusive);

        let exfil = |s: &DnsSeen| dns_exfil(s, T).outcome;
        assert_eq!(exfil(&reply(ResponseCode::Refused, &[])), Outcome::Closed);
        assert_eq!(exfil(&DnsSeen::NoReply), Outcome::Closed);
        assert_eq!(exfil(&reply(ResponseCode::NoError, &[])), Outcome::Open);
        assert_eq!(
            exfil(&reply(ResponseCode::NoError, &["192.0.2.1"])),
            Outcome::Open
        );
        assert_eq!(
            exfil(&reply(ResponseCode::NXDomain, &[])),
            Outcome::Inconclusive
        );
        assert_eq!(
            exfil(&reply(ResponseCode::ServFail, &[])),
            Outcome::Inconclusive
        );

        let f = gateway_dns(
            &reply(ResponseCode::NoError, &["192.0.2.1", "192.0.2.2"]),
            T,
        );
        assert_eq!(f.outcome, Outcome::Ok);
        assert_eq!(f.detail, "NOERROR: 192.0.2.1, 192.0.2.2");
        assert_eq!(
            gateway_dns(&reply(ResponseCode::NoError, &[]), T).outcome,
            Outcome::Failed
        );
        assert_eq!(
            gateway_dns(&reply(ResponseCode::Refused, &[]), T).outcome,
            Outcome::Failed
        );
        assert_eq!(gateway_dns(&DnsSeen::NoReply, T).outcome, Outcome::Failed);
        assert_eq!(gateway_dns(&DnsSeen::Refused, T).outcome, Outcome::Failed);
    }

    #[test]
    fn proxy_outcomes() {
        let answered = |status, tunnel: Option<&[u8]>| ProxySeen::Answered {
            status,
            reason: (status != 200).then(|| "not_allowed".to_owned()),
            tunnel: tunnel.map(|b| (b.to_vec(), End::Eof)),
        };
        let alert: &[u8] = &[21, 3, 3, 0, 2, 2, 49];
        let f = proxy_escape(&answered(200, Some(alert)));
        assert_eq!(f.outcome, Outcome::Closed);
        assert!(
            f.detail.ends_with("TLS alert access_denied"),
            "{}",
            f.detail
        );
        let f = proxy_works(&answered(200, Some(alert)));
        assert_eq!(f.outcome, Outcome::Failed);
        assert!(
            f.detail.ends_with("TLS alert access_denied"),
            "{}",
            f.detail
        );
        let f = proxy_escape(&answered(403, None));
        assert_eq!(f.outcome, Outcome::Closed);
        assert_eq!(f.detail, "denied by the proxy: 403 not_allowed");
        assert_eq!(
            proxy_escape(&answered(200, Some(b""))).outcome,
            Outcome::Open
        );
        assert_eq!(
            proxy_escape(&answered(502, None)).outcome,
            Outcome::Inconclusive
        );
        assert_eq!(
            proxy_escape(&ProxySeen::Unreachable("x".into())).outcome,
            Outcome::Inconclusive
        );
        assert_eq!(
            proxy_works(&answered(200, Some(&[0x16, 3, 3]))).outcome,
            Outcome::Ok
        );
        assert_eq!(
            proxy_works(&answered(200, Some(b""))).outcome,
            Outcome::Failed
        );
        assert_eq!(proxy_works(&answered(200, None)).outcome, Outcome::Failed);
        assert_eq!(proxy_works(&answered(403, None)).outcome, Outcome::Failed);
        assert_eq!(
            proxy_works(&ProxySeen::NoAnswer("x".into())).outcome,
            Outcome::Failed
        );
    }

    #[test]
    fn byte_descriptions() {
        assert_eq!(describe_bytes(&[0x16, 3, 3, 0]), "4 bytes (TLS handshake)");
        assert_eq!(describe_bytes(&[0x15, 3, 3]), "3 bytes (TLS alert)");
        assert_eq!(describe_bytes(b"SSH-2.0\r\n"), "9 bytes: \"SSH-2.0..\"");
        assert_eq!(fmt_duration(Duration::from_secs(2)), "2s");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1500ms");
    }
}
