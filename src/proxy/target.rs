//! Turning an explicit-proxy request into the [`Target`] that will be checked, and refusing
//! every request where the checked name and what the upstream would see could differ
//! (docs/threat-model.md, "Host desync"): Host ≠ absolute-URI authority, duplicate Host, userinfo,
//! non-http schemes.
//!
//! Pure: takes the request line and headers, returns a target or a deny reason.

use http::header::HOST;
use http::{HeaderMap, Method, Uri};

use crate::policy::{Host, Reason, Target, parse_host};

/// What the client asked the proxy to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `CONNECT host:port`: a tunnel.
    Connect(Target),
    /// `GET http://host[:port]/path`: forward one plain-HTTP request; `authority` is what the
    /// upstream will see in `Host`, `path` the origin-form target.
    Forward {
        target: Target,
        authority: String,
        path: String,
    },
}

impl Request {
    pub fn target(&self) -> &Target {
        match self {
            Request::Connect(t) | Request::Forward { target: t, .. } => t,
        }
    }
}

/// Parse `host[:port]` (port required when `default_port` is `None`).
pub fn parse_authority(authority: &str, default_port: Option<u16>) -> Result<Target, Reason> {
    if authority.contains('@') || authority.is_empty() {
        return Err(Reason::Malformed);
    }
    let (host_text, port) = split_host_port(authority)?;
    let port = match (port, default_port) {
        (Some(p), _) => p,
        (None, Some(d)) => d,
        (None, None) => return Err(Reason::Malformed),
    };
    let host = parse_host(host_text).map_err(|_| Reason::Malformed)?;
    Ok(Target { host, port })
}

fn split_host_port(authority: &str) -> Result<(&str, Option<u16>), Reason> {
    let (host, port) = if authority.starts_with('[') {
        match authority.find(']') {
            Some(end) => {
                let (h, rest) = authority.split_at(end + 1);
                match rest.strip_prefix(':') {
                    Some(p) => (h, Some(p)),
                    None if rest.is_empty() => (h, None),
                    None => return Err(Reason::Malformed),
                }
            }
            None => return Err(Reason::Malformed),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) if !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => {
            match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err(Reason::Malformed),
                Ok(n) => Some(n),
            }
        }
        Some(_) => return Err(Reason::Malformed),
    };
    Ok((host, port))
}

/// Classify and check a request from an explicit-proxy client.
pub fn parse_request(method: &Method, uri: &Uri, headers: &HeaderMap) -> Result<Request, Reason> {
    let mut hosts = headers.get_all(HOST).iter();
    let host_header = hosts.next();
    if hosts.next().is_some() {
        return Err(Reason::Malformed);
    }
    let host_header = match host_header {
        Some(v) => Some(v.to_str().map_err(|_| Reason::Malformed)?.trim()),
        None => None,
    };
    let authority = uri.authority().ok_or(Reason::Malformed)?.as_str();

    if method == Method::CONNECT {
        if uri.scheme().is_some()
            || uri
                .path_and_query()
                .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
        {
            return Err(Reason::Malformed);
        }
        let target = parse_authority(authority, None)?;
        if let Some(h) = host_header
            && parse_authority(h, Some(target.port))? != target
        {
            return Err(Reason::Malformed);
        }
        return Ok(Request::Connect(target));
    }

    // Absolute-form only; plain HTTP only (an `https://` request would ask us to speak TLS).
    if uri.scheme_str().map(str::to_ascii_lowercase).as_deref() != Some("http") {
        return Err(Reason::Malformed);
    }
    let target = parse_authority(authority, Some(80))?;
    if let Some(h) = host_header
        && parse_authority(h, Some(80))? != target
    {
        return Err(Reason::Malformed);
    }
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| p.starts_with('/'))
        .unwrap_or("/")
        .to_owned();
    // What the upstream sees in Host: the very authority we checked, normalised.
    let authority = match (&target.host, target.port) {
        (host, 80) => host.to_string(),
        (host, port) => format!("{host}:{port}"),
    };
    Ok(Request::Forward {
        target,
        authority,
        path,
    })
}

/// The target's name for logging (`destination.domain`), if it is a name.
pub fn domain_of(target: &Target) -> Option<String> {
    match &target.host {
        Host::Name(n) => Some(n.to_string()),
        Host::Ip(_) => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn req(method: &str, uri: &str, hosts: &[&str]) -> Result<Request, Reason> {
        let mut h = HeaderMap::new();
        for v in hosts {
            h.append(HOST, HeaderValue::from_str(v).unwrap());
        }
        parse_request(&method.parse().unwrap(), &uri.parse().unwrap(), &h)
    }

    #[test]
    fn connect_and_forward() {
        let r = req("CONNECT", "allowed.test:443", &["allowed.test:443"]).unwrap();
        assert_eq!(r.target().to_string(), "allowed.test:443");
        let r = req("GET", "http://Allowed.Test/x?y=1", &["allowed.test"]).unwrap();
        assert_eq!(
            r,
            Request::Forward {
                target: parse_authority("allowed.test", Some(80)).unwrap(),
                authority: "allowed.test".into(),
                path: "/x?y=1".into()
            }
        );
        let r = req("GET", "http://allowed.test:8080/", &["allowed.test:8080"]).unwrap();
        assert_eq!(r.target().port, 8080);
    }

    #[test]
    fn threats_a3_host_desync_is_refused() {
        assert_eq!(
            req("GET", "http://allowed.test/", &["evil.test"]),
            Err(Reason::Malformed)
        );
        assert_eq!(
            req(
                "GET",
                "http://allowed.test/",
                &["allowed.test", "evil.test"]
            ),
            Err(Reason::Malformed)
        );
        assert_eq!(
            req(
                "GET",
                "http://allowed.test/",
                &["allowed.test", "allowed.test"]
            ),
            Err(Reason::Malformed)
        );
        assert_eq!(
            req("GET", "http://allowed.test/", &["user@allowed.test"]),
            Err(Reason::Malformed)
        );
        assert_eq!(
            req("GET", "http://allowed.test/", &["allowed.test:8080"]),
            Err(Reason::Malformed)
        );
        assert_eq!(
            req("GET", "http://u:p@allowed.test/", &["allowed.test"]),
            Err(Reason::Malformed)
        );
        assert_eq!(
            req("GET", "https://allowed.test/", &["allowed.test"]),
            Err(Reason::Malformed)
        );
        assert_eq!(
            req("GET", "/relative", &["allowed.test"]),
            Err(Reason::Malformed)
        );
        assert_eq!(
            req("CONNECT", "allowed.test:443", &["evil.test:443"]),
            Err(Reason::Malformed)
        );
        assert_eq!(req("CONNECT", "allowed.test", &[]), Err(Reason::Malformed));
    }

    #[test]
    fn threats_b7_odd_notations_become_ip_literals() {
        for a in [
            "2130706433:443",
            "0x7f.1:443",
            "127.1:443",
            "[::1]:443",
            "[::ffff:127.0.0.1]:443",
        ] {
            let t = parse_authority(a, None).unwrap();
            assert!(matches!(t.host, Host::Ip(_)), "{a}");
        }
        assert!(parse_authority("[::1:443", None).is_err());
        assert!(parse_authority("a.test:99999", None).is_err());
        assert!(parse_authority("a.test:0", None).is_err());
    }
}
