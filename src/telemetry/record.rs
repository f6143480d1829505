//! [`ConnectionRecord`]: everything known about one connection when it ends, and its JSON
//! line with Elastic Common Schema field names (docs/observability.md).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::json::{Object, key};
use crate::policy::Reason;

/// Which listener served the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// resolved to (docs/threat-model.md, "Original destination"). We dialled the name's address
    /// anyway.
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
        self.write_json(&mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// [`ConnectionRecord::to_json`] written straight into `out` (the log writer's buffer):
    /// no string per record.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let mut stamp = [0u8; 64];
        let port = |p: Option<u16>| p.map(u64::from);
        let mut o = Object::begin(out);
        o.str(key!("@timestamp"), rfc3339(self.start, &mut stamp));
        o.str(key!("event.action"), self.action());
        o.opt_str(key!("event.reason"), self.reason.map(Reason::as_str));
        let duration_ns = u64::try_from(self.duration.as_nanos()).unwrap_or(u64::MAX);
        o.u64(key!("event.duration"), duration_ns);
        o.str(key!("agent.name"), &self.agent);
        o.ip(key!("source.ip"), self.source.ip());
        o.u64(key!("source.port"), self.source.port().into());
        o.opt_str(
            key!("destination.domain"),
            self.destination_domain.as_deref(),
        );
        o.opt_ip(key!("destination.ip"), self.destination_ip);
        o.opt_u64(key!("destination.port"), port(self.destination_port));
        let original = self.original_destination;
        o.opt_ip(
            key!("portcullis.original_destination.ip"),
            original.map(|a| a.ip()),
        );
        let original_port = port(original.map(|a| a.port()));
        o.opt_u64(key!("portcullis.original_destination.port"), original_port);
        if self.destination_mismatch {
            o.bool(key!("portcullis.original_destination.mismatch"), true);
        }
        o.opt_str(key!("tls.client.server_name"), self.server_name.as_deref());
        if self.ech {
            o.bool(key!("tls.client.ech"), true);
        }
        o.opt_str(key!("http.request.method"), self.http_method.as_deref());
        o.opt_str(key!("url.original"), self.url.as_deref());
        let transport = if self.mode == Mode::Dns { "udp" } else { "tcp" };
        o.str(key!("network.transport"), transport);
        o.str(key!("portcullis.mode"), self.mode.as_str());
        o.u64(key!("source.bytes"), self.bytes_from_agent);
        o.u64(key!("destination.bytes"), self.bytes_to_agent);
        o.opt_str(key!("rule.name"), self.rule.as_deref());
        o.u64(key!("portcullis.policy_generation"), self.policy_generation);
        o.opt_str(key!("dns.question.name"), self.dns_question_name.as_deref());
        o.opt_str(key!("dns.question.type"), self.dns_question_type);
        o.opt_str(key!("dns.response_code"), self.dns_response_code);
        o.end();
    }
}

/// `t` in RFC 3339, UTC, formatted into `buf`: what `time`'s `Rfc3339` writes (the fraction
/// without trailing zeros, none when it is zero), by hand from 1970 to the end of 9999
/// (`time` took about 400 instructions a line for it), by `time` before 1970, and empty
/// after 9999 (RFC 3339 has four digits for the year, and `time` panics there).
pub(super) fn rfc3339(t: SystemTime, buf: &mut [u8; 64]) -> &str {
    let len = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(since) if since.as_secs() <= LAST_SECOND_OF_9999 => civil_stamp(since, buf),
        Ok(_) => 0,
        Err(_) => stamp_by_time(t, buf),
    };
    buf.get(..len)
        .and_then(|b| std::str::from_utf8(b).ok())
        .unwrap_or_default()
}

/// 9999-12-31T23:59:59Z, in seconds since the epoch.
const LAST_SECOND_OF_9999: u64 = 253_402_300_799;

/// `since` (at most [`LAST_SECOND_OF_9999`]) as `YYYY-MM-DDTHH:MM:SS[.fraction]Z`; its length.
fn civil_stamp(since: Duration, buf: &mut [u8; 64]) -> usize {
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let of_day = secs % 86_400;
    let mut at = Cursor { buf, len: 0 };
    at.digits(year, 4);
    at.byte(b'-');
    at.digits(month, 2);
    at.byte(b'-');
    at.digits(day, 2);
    at.byte(b'T');
    at.digits(of_day / 3600, 2);
    at.byte(b':');
    at.digits(of_day / 60 % 60, 2);
    at.byte(b':');
    at.digits(of_day % 60, 2);
    let mut nanos = u64::from(since.subsec_nanos());
    if nanos != 0 {
        let mut width = 9;
        while nanos % 10 == 0 {
            nanos /= 10;
            width -= 1;
        }
        at.byte(b'.');
        at.digits(nanos, width);
    }
    at.byte(b'Z');
    at.len
}

/// Where [`civil_stamp`] writes next.
struct Cursor<'a> {
    buf: &'a mut [u8; 64],
    len: usize,
}

impl Cursor<'_> {
    fn byte(&mut self, b: u8) {
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = b;
            self.len += 1;
        }
    }

    /// `value`'s last `width` decimal digits, zero-padded.
    fn digits(&mut self, mut value: u64, width: usize) {
        let end = self.len + width;
        for at in (self.len..end).rev() {
            if let Some(slot) = self.buf.get_mut(at) {
                *slot = b'0' + (value % 10) as u8;
            }
            value /= 10;
        }
        self.len = end.min(self.buf.len());
    }
}

/// Day `days` after 1970-01-01 as (year, month, day) in the proleptic Gregorian calendar
/// (H. Hinnant's `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// [`rfc3339`] by the `time` crate, for times up to the end of 9999 (past it `time` panics);
/// the stamp's length, 0 if it cannot be formatted.
fn stamp_by_time(t: SystemTime, buf: &mut [u8; 64]) -> usize {
    let mut rest = &mut buf[..];
    let formatted = time::OffsetDateTime::from(t)
        .format_into(&mut rest, &time::format_description::well_known::Rfc3339);
    // Measured by what was written: the count `format_into` returns leaves out the
    // fraction's digits (time 0.3).
    if formatted.is_ok() {
        64 - rest.len()
    } else {
        0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The stamp by hand is the stamp `time` writes, for any second from the epoch to
        /// the end of 9999 and any fraction (whole seconds and round fractions included).
        #[test]
        fn the_hand_made_stamp_is_times(
            secs in prop_oneof![0..=LAST_SECOND_OF_9999, Just(0u64), Just(LAST_SECOND_OF_9999),
                                Just(951_782_400u64), Just(4_107_542_399u64)],
            nanos in prop_oneof![0..1_000_000_000u32, Just(0u32), Just(500_000_000u32),
                                 Just(1u32), Just(999_999_999u32), Just(120_000u32)],
        ) {
            let t = SystemTime::UNIX_EPOCH + Duration::new(secs, nanos);
            let mut by_hand = [0u8; 64];
            let mut by_time = [0u8; 64];
            let len = civil_stamp(Duration::new(secs, nanos), &mut by_hand);
            let expected = stamp_by_time(t, &mut by_time);
            prop_assert_eq!(&by_hand[..len], &by_time[..expected]);
            prop_assert_eq!(rfc3339(t, &mut by_hand).as_bytes(), &by_time[..expected]);
        }
    }

    /// Every day from 1970 to 2500 and of the last ten years of 9999 (each at another time
    /// of day and fraction): the calendar by hand is `time`'s on each of them.
    #[test]
    fn every_day_is_times_day() {
        let mut by_hand = [0u8; 64];
        let mut by_time = [0u8; 64];
        let last_day = LAST_SECOND_OF_9999 / 86_400;
        let days = (0..=194_000u64).chain(last_day - 3_660..=last_day);
        for day in days {
            let since = Duration::new(
                day * 86_400 + day * 7_919 % 86_400,
                (day * 104_729) as u32 % 1_000_000_000,
            );
            let len = civil_stamp(since, &mut by_hand);
            let expected = stamp_by_time(SystemTime::UNIX_EPOCH + since, &mut by_time);
            assert_eq!(by_hand[..len], by_time[..expected], "day {day}");
        }
    }

    /// Before the epoch the stamp is `time`'s; past 9999 it is empty (and nothing panics).
    #[test]
    fn stamps_outside_the_hand_made_range() {
        let mut buf = [0u8; 64];
        let before = SystemTime::UNIX_EPOCH - Duration::new(86_400, 5);
        assert_eq!(rfc3339(before, &mut buf), "1969-12-30T23:59:59.999999995Z");
        let after = SystemTime::UNIX_EPOCH + Duration::from_secs(LAST_SECOND_OF_9999 + 1);
        assert_eq!(rfc3339(after, &mut buf), "");
        let leap = SystemTime::UNIX_EPOCH + Duration::new(951_782_400, 120_000);
        assert_eq!(rfc3339(leap, &mut buf), "2000-02-29T00:00:00.00012Z");
    }

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
