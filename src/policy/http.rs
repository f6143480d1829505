//! `[[http]]` rules: which requests an agent may make to a host it has inspected.
//!
//! Owns the compiled rule (host pattern, methods, path patterns, allow or deny) and
//! [`HttpRules::check`]. Deny rules win; a host with any rule allows only the requests an
//! allow rule matches; a host with none allows every request. Paths are matched in their
//! normal form (`crate::policy::path`), the form that is forwarded.
//!
//! Path patterns: `*` matches any run of characters within one segment; a last segment that
//! is exactly `*` matches one or more segments (`/repos/acme/*` covers `/repos/acme/x` and
//! `/repos/acme/x/y`, not `/repos/acme`).

use std::sync::Arc;

use super::domain::DomainName;
use super::pattern::{DomainPattern, Ports, Scope};
use crate::policy::path::NormalPath;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpAction {
    Allow,
    Deny,
}

/// A path pattern from a rule, already in normal form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    segments: Vec<Box<str>>,
    /// The last segment is `*`: one or more segments.
    tail: bool,
    text: Box<str>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathPatternError {
    #[error("{0} (paths are matched in normal form; write the pattern in it)")]
    Path(#[from] crate::policy::path::PathError),
    #[error("not in normal form: write `{0}`")]
    NotNormal(String),
}

impl PathPattern {
    pub fn parse(text: &str) -> Result<Self, PathPatternError> {
        let normal = crate::policy::path::normalize(text)?;
        if normal.as_str() != text {
            return Err(PathPatternError::NotNormal(normal.as_str().to_owned()));
        }
        let mut segments: Vec<Box<str>> = text[1..].split('/').map(Box::from).collect();
        let tail = segments.last().is_some_and(|s| &**s == "*");
        if tail {
            segments.pop();
        }
        Ok(Self {
            segments,
            tail,
            text: text.into(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn matches(&self, path: &NormalPath) -> bool {
        let mut parts = path.as_str()[1..].split('/');
        for pattern in &self.segments {
            match parts.next() {
                Some(seg) if glob_segment(pattern.as_bytes(), seg.as_bytes()) => {}
                _ => return false,
            }
        }
        match parts.next() {
            None => !self.tail,
            Some(_) => self.tail,
        }
    }
}

/// `*` matches any run of bytes (the caller has split on `/`). Greedy with one backtrack
/// point: O(pattern × segment) at worst.
fn glob_segment(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// One compiled `[[http]]` rule.
#[derive(Debug, Clone)]
pub struct HttpRule {
    pub host: DomainPattern,
    /// Empty: every method.
    pub methods: Vec<Box<str>>,
    /// Empty: every path.
    pub paths: Vec<PathPattern>,
    pub action: HttpAction,
    /// `agents/coder-1.toml:http[0]`, for logs and `explain`.
    pub name: Arc<str>,
}

impl HttpRule {
    pub fn covers_host(&self, host: &DomainName) -> bool {
        pattern_covers(&self.host, host)
    }

    fn matches(&self, method: &str, path: &NormalPath) -> bool {
        (self.methods.is_empty() || self.methods.iter().any(|m| &**m == method))
            && (self.paths.is_empty() || self.paths.iter().any(|p| p.matches(path)))
    }
}

/// Does a port-less pattern cover `name`?
pub(crate) fn pattern_covers(pattern: &DomainPattern, name: &DomainName) -> bool {
    let base = pattern.base.as_str();
    let below = || name.parents().any(|p| p == base);
    match pattern.scope {
        Scope::Exact => name.as_str() == base,
        Scope::Subdomains => below(),
        Scope::ApexAndSubdomains => name.as_str() == base || below(),
    }
}

/// What the rules say about one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpVerdict {
    /// No rule names the host: every request passes.
    NoRules,
    Allow(Arc<str>),
    DeniedByRule(Arc<str>),
    /// The host has rules and none allows this request.
    NotAllowed,
}

impl HttpVerdict {
    pub fn is_allow(&self) -> bool {
        matches!(self, Self::NoRules | Self::Allow(_))
    }

    pub fn rule(&self) -> Option<&Arc<str>> {
        match self {
            Self::Allow(r) | Self::DeniedByRule(r) => Some(r),
            _ => None,
        }
    }
}

/// An agent's `[[http]]` rules, in file order.
#[derive(Debug, Clone, Default)]
pub struct HttpRules {
    pub rules: Vec<HttpRule>,
}

impl HttpRules {
    /// Judge a request to `host`. Deny rules win; with any rule for the host, only a
    /// matching allow rule lets the request through.
    pub fn check(&self, host: &DomainName, method: &str, path: &NormalPath) -> HttpVerdict {
        let mut any = false;
        let mut allowed: Option<&Arc<str>> = None;
        for r in self.rules.iter().filter(|r| r.covers_host(host)) {
            any = true;
            if r.matches(method, path) {
                match r.action {
                    HttpAction::Deny => return HttpVerdict::DeniedByRule(r.name.clone()),
                    HttpAction::Allow => {
                        allowed.get_or_insert(&r.name);
                    }
                }
            }
        }
        match (any, allowed) {
            (false, _) => HttpVerdict::NoRules,
            (true, Some(r)) => HttpVerdict::Allow(r.clone()),
            (true, None) => HttpVerdict::NotAllowed,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// An HTTP method as a rule may name it: an RFC 9110 token, upper case.
pub(crate) fn valid_method(m: &str) -> bool {
    !m.is_empty()
        && m.len() <= 32
        && m.bytes().all(|b| {
            b.is_ascii_uppercase()
                || b.is_ascii_digit()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

/// A host pattern of a rule: a domain pattern without a port.
pub(crate) fn host_pattern(text: &str) -> Result<DomainPattern, String> {
    let p = DomainPattern::parse(text).map_err(|e| e.to_string())?;
    if p.ports != Ports::Default {
        return Err("an http rule's host takes no port".to_owned());
    }
    Ok(p)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::policy::path::normalize;

    fn pat(s: &str) -> PathPattern {
        PathPattern::parse(s).unwrap()
    }

    fn m(p: &str, path: &str) -> bool {
        pat(p).matches(&normalize(path).unwrap())
    }

    #[test]
    fn path_patterns() {
        assert!(m("/user", "/user"));
        assert!(!m("/user", "/user/"));
        assert!(!m("/user", "/users"));
        assert!(m("/repos/acme/*", "/repos/acme/x"));
        assert!(m("/repos/acme/*", "/repos/acme/x/y/z"));
        assert!(m("/repos/acme/*", "/repos/acme/"));
        assert!(!m("/repos/acme/*", "/repos/acme"));
        assert!(!m("/repos/acme/*", "/repos/acmeevil/x"));
        assert!(!m("/repos/acme/*", "/repos/other/x"));
        assert!(m("/repos/*/issues", "/repos/a/issues"));
        assert!(!m("/repos/*/issues", "/repos/a/b/issues"));
        assert!(m("/v1/chat*", "/v1/chat-completions"));
        assert!(!m("/v1/chat*", "/v1/chat/x"));
        assert!(m("/*", "/anything/at/all"));
        assert!(m("/a*b*c", "/axxbyyc"));
        assert!(!m("/a*b*c", "/axxbyy"));
        // Matched in normal form: the dot segment is resolved before matching.
        assert!(!m("/repos/acme/*", "/repos/acme/../other/x"));
        // Patterns must be written in normal form.
        assert!(matches!(
            PathPattern::parse("/a/../b"),
            Err(PathPatternError::NotNormal(_))
        ));
        assert!(PathPattern::parse("/a%2fb").is_err());
        assert!(PathPattern::parse("repos").is_err());
    }

    #[test]
    fn deny_wins_and_any_rule_makes_an_allowlist() {
        let rule = |host: &str, methods: &[&str], paths: &[&str], action, i: usize| HttpRule {
            host: host_pattern(host).unwrap(),
            methods: methods.iter().map(|m| Box::from(*m)).collect(),
            paths: paths.iter().map(|p| pat(p)).collect(),
            action,
            name: Arc::from(format!("http[{i}]")),
        };
        let rules = HttpRules {
            rules: vec![
                rule(
                    "api.github.com",
                    &["GET", "HEAD"],
                    &["/repos/acme/*", "/user"],
                    HttpAction::Allow,
                    0,
                ),
                rule(
                    "api.github.com",
                    &[],
                    &["/repos/acme/secret/*"],
                    HttpAction::Deny,
                    1,
                ),
                rule(".openai.com", &["POST"], &[], HttpAction::Allow, 2),
            ],
        };
        let host = |h: &str| DomainName::parse(h).unwrap();
        let path = |p: &str| normalize(p).unwrap();
        let gh = host("api.github.com");
        assert_eq!(
            rules.check(&gh, "GET", &path("/repos/acme/x")),
            HttpVerdict::Allow("http[0]".into())
        );
        assert_eq!(
            rules.check(&gh, "DELETE", &path("/repos/acme/x")),
            HttpVerdict::NotAllowed
        );
        assert_eq!(
            rules.check(&gh, "GET", &path("/repos/acme/secret/k")),
            HttpVerdict::DeniedByRule("http[1]".into())
        );
        assert_eq!(
            rules.check(&gh, "GET", &path("/orgs/acme")),
            HttpVerdict::NotAllowed
        );
        assert_eq!(
            rules.check(&host("api.openai.com"), "POST", &path("/v1/x")),
            HttpVerdict::Allow("http[2]".into())
        );
        assert_eq!(
            rules.check(&host("openai.com"), "GET", &path("/")),
            HttpVerdict::NotAllowed
        );
        assert_eq!(
            rules.check(&host("other.test"), "DELETE", &path("/")),
            HttpVerdict::NoRules
        );
    }

    #[test]
    fn methods() {
        assert!(valid_method("GET") && valid_method("PROPFIND") && valid_method("M-SEARCH"));
        assert!(!valid_method("get") && !valid_method("") && !valid_method("G T"));
    }
}
