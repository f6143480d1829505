//! [`ConnectionRecord`]: everything known about one connection when it ends, and its JSON
//! line with Elastic Common Schema field names (DESIGN §6).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::policy::Reason;

/// Which listener served the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Explicit,
    Transparent,
    Dns,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Explicit => "explicit",
            Mode::Transparent => "transparent",
            Mode::Dns => "dns",
        }
    }
}

/// One connection (or one proxied plain-HTTP request), start to end.
#[derive(Debug, Clone)]
pub struct ConnectionRecord {
    pub start: SystemTime,
    pub duration: Duration,
    /// `None`: allowed and ended normally. `Some`: denied, or cut, and why.
    pub reason: Option<Reason>,
    pub rule: Option<Arc<str>>,
    pub agent: Arc<str>,
    pub source: SocketAddr,
    pub destination_domain: Option<String>,
    pub destination_ip: Option<IpAddr>,
    pub destination_port: Option<u16>,
    /// Transparent mode: where the agent's packets were addressed.
    pub original_destination: Option<SocketAddr>,
    /// Transparent mode: the original destination is not among the addresses the name
    /// resolved to (THREATS A1). We dialled the name's address anyway.
    pub destination_mismatch: bool,
    pub server_name: Option<String>,
    pub ech: bool,
    pub http_method: Option<String>,
    pub url: Option<String>,
    pub mode: Mode,
    /// Bytes the agent sent (ECS `source.bytes`).
    pub bytes_from_agent: u64,
    /// Bytes sent to the agent (ECS `destination.bytes`).
    pub bytes_to_agent: u64,
    pub policy_generation: u64,
    /// DNS mode: the question's name (ECS `dns.question.name`).
    pub dns_question_name: Option<String>,
    /// DNS mode: the question's type, e.g. `AAAA` (ECS `dns.question.type`).
    pub dns_question_type: Option<&'static str>,
    /// DNS mode: the answer's code, e.g. `REFUSED` (ECS `dns.response_code`).
    pub dns_response_code: Option<&'static str>,
}

impl ConnectionRecord {
    /// A record for a connection from `source` that starts now.
    pub fn begin(mode: Mode, source: SocketAddr, agent: Arc<str>, policy_generation: u64) -> Self {
        Self {
            start: SystemTime::now(),
            duration: Duration::ZERO,
            reason: None,
            rule: None,
            agent,
            source,
            destination_domain: None,
            destination_ip: None,
            destination_port: None,
            original_destination: None,
            destination_mismatch: false,
            server_name: None,
            ech: false,
            http_method: None,
            url: None,
            mode,
            bytes_from_agent: 0,
            bytes_to_agent: 0,
            policy_generation,
            dns_question_name: None,
            dns_question_type: None,
            dns_response_code: None,
        }
    }

    pub fn action(&self) -> &'static str {
        if self.reason.is_some() {
            "deny"
        } else {
            "allow"
        }
    }

    /// The record as one JSON line (no trailing newline).
    pub fn to_json(&self) -> String {
        let mut out = Vec::with_capacity(512);
        let _ = self.write_json(&mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// [`ConnectionRecord::to_json`] written straight into `out` (the log writer's buffer):
    /// no string per record.
    pub fn write_json(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        let mut stamp = [0u8; 64];
        let line = Line {
            timestamp: rfc3339(self.start, &mut stamp),
            action: self.action(),
            reason: self.reason.map(Reason::as_str),
            duration_ns: u64::try_from(self.duration.as_nanos()).unwrap_or(u64::MAX),
            agent: &self.agent,
            source_ip: self.source.ip(),
            source_port: self.source.port(),
            destination_domain: self.destination_domain.as_deref(),
            destination_ip: self.destination_ip,
            destination_port: self.destination_port,
            original_ip: self.original_destination.map(|a| a.ip()),
            original_port: self.original_destination.map(|a| a.port()),
            mismatch: self.destination_mismatch.then_some(true),
            server_name: self.server_name.as_deref(),
            ech: self.ech.then_some(true),
            http_method: self.http_method.as_deref(),
            url: self.url.as_deref(),
            transport: if self.mode == Mode::Dns { "udp" } else { "tcp" },
            mode: self.mode.as_str(),
            source_bytes: self.bytes_from_agent,
            destination_bytes: self.bytes_to_agent,
            rule: self.rule.as_deref(),
            generation: self.policy_generation,
            dns_question_name: self.dns_question_name.as_deref(),
            dns_question_type: self.dns_question_type,
            dns_response_code: self.dns_response_code,
        };
        serde_json::to_writer(out, &line).map_err(std::io::Error::from)
    }
}

/// `t` in RFC 3339, formatted into `buf` (a stamp is at most 35 bytes; empty if it fails).
fn rfc3339(t: SystemTime, buf: &mut [u8; 64]) -> &str {
    let mut rest = &mut buf[..];
    let formatted = time::OffsetDateTime::from(t)
        .format_into(&mut rest, &time::format_description::well_known::Rfc3339);
    // Measured by what was written: the count `format_into` returns leaves out the
    // fraction's digits (time 0.3).
    let len = if formatted.is_ok() {
        64 - rest.len()
    } else {
        0
    };
    buf.get(..len)
        .and_then(|b| std::str::from_utf8(b).ok())
        .unwrap_or_default()
}

#[derive(Serialize)]
struct Line<'a> {
    #[serde(rename = "@timestamp")]
    timestamp: &'a str,
    #[serde(rename = "event.action")]
    action: &'static str,
    #[serde(rename = "event.reason", skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    #[serde(rename = "event.duration")]
    duration_ns: u64,
    #[serde(rename = "agent.name")]
    agent: &'a str,
    #[serde(rename = "source.ip")]
    source_ip: IpAddr,
    #[serde(rename = "source.port")]
    source_port: u16,
    #[serde(rename = "destination.domain", skip_serializing_if = "Option::is_none")]
    destination_domain: Option<&'a str>,
    #[serde(rename = "destination.ip", skip_serializing_if = "Option::is_none")]
    destination_ip: Option<IpAddr>,
    #[serde(rename = "destination.port", skip_serializing_if = "Option::is_none")]
    destination_port: Option<u16>,
    #[serde(
        rename = "portcullis.original_destination.ip",
        skip_serializing_if = "Option::is_none"
    )]
    original_ip: Option<IpAddr>,
    #[serde(
        rename = "portcullis.original_destination.port",
        skip_serializing_if = "Option::is_none"
    )]
    original_port: Option<u16>,
    #[serde(
        rename = "portcullis.original_destination.mismatch",
        skip_serializing_if = "Option::is_none"
    )]
    mismatch: Option<bool>,
    #[serde(
        rename = "tls.client.server_name",
        skip_serializing_if = "Option::is_none"
    )]
    server_name: Option<&'a str>,
    #[serde(rename = "tls.client.ech", skip_serializing_if = "Option::is_none")]
    ech: Option<bool>,
    #[serde(
        rename = "http.request.method",
        skip_serializing_if = "Option::is_none"
    )]
    http_method: Option<&'a str>,
    #[serde(rename = "url.original", skip_serializing_if = "Option::is_none")]
    url: Option<&'a str>,
    #[serde(rename = "network.transport")]
    transport: &'static str,
    #[serde(rename = "portcullis.mode")]
    mode: &'static str,
    #[serde(rename = "source.bytes")]
    source_bytes: u64,
    #[serde(rename = "destination.bytes")]
    destination_bytes: u64,
    #[serde(rename = "rule.name", skip_serializing_if = "Option::is_none")]
    rule: Option<&'a str>,
    #[serde(rename = "portcullis.policy_generation")]
    generation: u64,
    #[serde(rename = "dns.question.name", skip_serializing_if = "Option::is_none")]
    dns_question_name: Option<&'a str>,
    #[serde(rename = "dns.question.type", skip_serializing_if = "Option::is_none")]
    dns_question_type: Option<&'static str>,
    #[serde(rename = "dns.response_code", skip_serializing_if = "Option::is_none")]
    dns_response_code: Option<&'static str>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn json_line_uses_ecs_names() {
        let mut r = ConnectionRecord::begin(
            Mode::Explicit,
            "10.66.0.11:40000".parse().unwrap(),
            Arc::from("coder-1"),
            7,
        );
        r.reason = Some(Reason::NotAllowed);
        r.destination_domain = Some("evil.test".into());
        r.destination_port = Some(443);
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["event.action"], "deny");
        assert_eq!(v["event.reason"], "not_allowed");
        assert_eq!(v["agent.name"], "coder-1");
        assert_eq!(v["source.ip"], "10.66.0.11");
        assert_eq!(v["destination.domain"], "evil.test");
        assert_eq!(v["portcullis.policy_generation"], 7);
        let stamp = v["@timestamp"].as_str().unwrap();
        assert!(stamp.ends_with('Z'));
        let whole = time::OffsetDateTime::from(r.start)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        assert_eq!(stamp, whole, "the whole stamp, to the nanosecond");
        assert!(v.get("url.original").is_none());
    }
}
