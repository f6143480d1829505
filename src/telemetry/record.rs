//! [`ConnectionRecord`]: everything known about one connection when it ends, and its JSON
//! line with Elastic Common Schema field names (DESIGN §6).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::json::Object;
use crate::policy::Reason;

/// Which listener served the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
        let port = |p: Option<u16>| p.map(u64::from);
        let mut o = Object::begin(out);
        o.str("@timestamp", rfc3339(self.start, &mut stamp))?;
        o.str("event.action", self.action())?;
        o.opt_str("event.reason", self.reason.map(Reason::as_str))?;
        let duration_ns = u64::try_from(self.duration.as_nanos()).unwrap_or(u64::MAX);
        o.u64("event.duration", duration_ns)?;
        o.str("agent.name", &self.agent)?;
        o.ip("source.ip", self.source.ip())?;
        o.u64("source.port", self.source.port().into())?;
        o.opt_str("destination.domain", self.destination_domain.as_deref())?;
        o.opt_ip("destination.ip", self.destination_ip)?;
        o.opt_u64("destination.port", port(self.destination_port))?;
        let original = self.original_destination;
        o.opt_ip(
            "portcullis.original_destination.ip",
            original.map(|a| a.ip()),
        )?;
        let original_port = port(original.map(|a| a.port()));
        o.opt_u64("portcullis.original_destination.port", original_port)?;
        if self.destination_mismatch {
            o.bool("portcullis.original_destination.mismatch", true)?;
        }
        o.opt_str("tls.client.server_name", self.server_name.as_deref())?;
        if self.ech {
            o.bool("tls.client.ech", true)?;
        }
        o.opt_str("http.request.method", self.http_method.as_deref())?;
        o.opt_str("url.original", self.url.as_deref())?;
        let transport = if self.mode == Mode::Dns { "udp" } else { "tcp" };
        o.str("network.transport", transport)?;
        o.str("portcullis.mode", self.mode.as_str())?;
        o.u64("source.bytes", self.bytes_from_agent)?;
        o.u64("destination.bytes", self.bytes_to_agent)?;
        o.opt_str("rule.name", self.rule.as_deref())?;
        o.u64("portcullis.policy_generation", self.policy_generation)?;
        o.opt_str("dns.question.name", self.dns_question_name.as_deref())?;
        o.opt_str("dns.question.type", self.dns_question_type)?;
        o.opt_str("dns.response_code", self.dns_response_code)?;
        o.end()
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

    /// Every field, set, under its ECS name, with the value given; unset fields absent;
    /// strings from the agent (URL, method, question) escaped so the line stays one line.
    #[test]
    fn every_field_has_its_name_and_value() {
        let mut r = ConnectionRecord::begin(
            Mode::Transparent,
            "[fd00::11]:40000".parse().unwrap(),
            Arc::from("coder \"1\""),
            u64::MAX,
        );
        r.duration = Duration::from_nanos(1_234_567);
        r.reason = Some(Reason::KillSwitch);
        r.rule = Some(Arc::from("agents/c.toml:allow:*.test"));
        r.destination_domain = Some("api.test".into());
        r.destination_ip = Some("192.0.2.7".parse().unwrap());
        r.destination_port = Some(443);
        r.original_destination = Some("198.51.100.1:8443".parse().unwrap());
        r.destination_mismatch = true;
        r.server_name = Some("api.test".into());
        r.ech = true;
        r.http_method = Some("GET\r\n".into());
        r.url = Some("http://api.test/a\"b\\c\n\u{1}é".into());
        r.bytes_from_agent = 517;
        r.bytes_to_agent = 0;
        r.dns_question_name = Some("x.test".into());
        r.dns_question_type = Some("AAAA");
        r.dns_response_code = Some("REFUSED");
        let line = r.to_json();
        assert!(!line.contains('\n'), "one line: {line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let expected = serde_json::json!({
            "@timestamp": v["@timestamp"],
            "event.action": "deny",
            "event.reason": Reason::KillSwitch.as_str(),
            "event.duration": 1_234_567,
            "agent.name": "coder \"1\"",
            "source.ip": "fd00::11",
            "source.port": 40000,
            "destination.domain": "api.test",
            "destination.ip": "192.0.2.7",
            "destination.port": 443,
            "portcullis.original_destination.ip": "198.51.100.1",
            "portcullis.original_destination.port": 8443,
            "portcullis.original_destination.mismatch": true,
            "tls.client.server_name": "api.test",
            "tls.client.ech": true,
            "http.request.method": "GET\r\n",
            "url.original": "http://api.test/a\"b\\c\n\u{1}é",
            "network.transport": "tcp",
            "portcullis.mode": "transparent",
            "source.bytes": 517,
            "destination.bytes": 0,
            "rule.name": "agents/c.toml:allow:*.test",
            "portcullis.policy_generation": u64::MAX,
            "dns.question.name": "x.test",
            "dns.question.type": "AAAA",
            "dns.response_code": "REFUSED",
        });
        assert_eq!(v, expected);

        let bare =
            ConnectionRecord::begin(Mode::Dns, "10.0.0.1:53".parse().unwrap(), Arc::from("a"), 1);
        let v: serde_json::Value = serde_json::from_str(&bare.to_json()).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "@timestamp",
                "agent.name",
                "destination.bytes",
                "event.action",
                "event.duration",
                "network.transport",
                "portcullis.mode",
                "portcullis.policy_generation",
                "source.bytes",
                "source.ip",
                "source.port",
            ]
        );
        assert_eq!(v["network.transport"], "udp");
        assert_eq!(v["event.action"], "allow");
    }
}
