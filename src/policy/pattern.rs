//! Domain patterns from rules files and the label-based set that matches them.
//!
//! Owns the three pattern forms of docs/configuration.md (`name`, `*.name`, `.name`, each with an
//! optional `:port`), the public-suffix check on wildcards, and [`DomainSet`]: hash maps keyed
//! by normalised names, looked up once per label of the observed name. No glob engine: a
//! glob `*` crosses dots and costs milliseconds at thousands of patterns.

use std::fmt;
use std::sync::Arc;

use super::domain::{DomainName, NameError};
use crate::hash::RuleKeyMap;

/// Which names a pattern covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// `example.com`: exactly that name.
    Exact,
    /// `*.example.com`: any name strictly under it, not the apex.
    Subdomains,
    /// `.example.com`: the apex and everything under it.
    ApexAndSubdomains,
}

/// Which ports a pattern covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ports {
    /// No `:port` in the rule: the config's `default_ports` (for allow) or every port (deny).
    Default,
    Only(u16),
}

/// A compiled, valid pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DomainPattern {
    pub scope: Scope,
    pub base: DomainName,
    pub ports: Ports,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("invalid name in pattern: {0}")]
    Name(NameError),
    #[error("invalid port")]
    Port,
    #[error("only `*.` at the start is a wildcard; `{0}` is not a supported form")]
    Wildcard(String),
    #[error("wildcard over the public suffix `{0}` would allow names anyone can register")]
    PublicSuffix(String),
}

impl DomainPattern {
    pub fn parse(input: &str) -> Result<Self, PatternError> {
        let (name_part, ports) = match input.rsplit_once(':') {
            Some((n, p)) => {
                let port: u16 = p.parse().map_err(|_| PatternError::Port)?;
                if port == 0 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(PatternError::Port);
                }
                (n, Ports::Only(port))
            }
            None => (input, Ports::Default),
        };
        let (scope, base_text) = if let Some(rest) = name_part.strip_prefix("*.") {
            (Scope::Subdomains, rest)
        } else if let Some(rest) = name_part.strip_prefix('.') {
            (Scope::ApexAndSubdomains, rest)
        } else {
            (Scope::Exact, name_part)
        };
        if base_text.contains('*') {
            return Err(PatternError::Wildcard(input.to_owned()));
        }
        // A pattern's base may not itself carry a trailing dot after a wildcard prefix is
        // removed twice (`..x`); DomainName rejects empty labels.
        let base = DomainName::parse(base_text).map_err(PatternError::Name)?;
        if scope != Scope::Exact && is_public_suffix(&base) {
            return Err(PatternError::PublicSuffix(base.to_string()));
        }
        Ok(Self { scope, base, ports })
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.scope {
            Scope::Exact => {}
            Scope::Subdomains => f.write_str("*.")?,
            Scope::ApexAndSubdomains => f.write_str(".")?,
        }
        f.write_str(self.base.as_str())?;
        if let Ports::Only(p) = self.ports {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

/// True when `name` is a public suffix (ICANN or private section of the PSL), or a bare
/// single label, which the PSL's default rule treats as a suffix.
fn is_public_suffix(name: &DomainName) -> bool {
    match psl::suffix(name.as_str().as_bytes()) {
        Some(suffix) => suffix.as_bytes() == name.as_str().as_bytes(),
        None => true,
    }
}

/// Where a rule came from, for `explain`, the log's `rule.name` and error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: Arc<str>,
}

#[derive(Debug, Clone)]
struct Entry {
    ports: Ports,
    rule: Rule,
}

/// A set of patterns matched label by label: for a name with `n` labels, at most `2n + 1`
/// hash lookups, whatever the number of patterns.
#[derive(Debug, Default, Clone)]
pub struct DomainSet {
    exact: RuleKeyMap<Box<str>, Vec<Entry>>,
    /// `*.base` and `.base`, keyed by base; an entry here matches names strictly below it.
    below: RuleKeyMap<Box<str>, Vec<Entry>>,
    len: usize,
}

impl DomainSet {
    pub fn insert(&mut self, pattern: &DomainPattern, rule: Rule) {
        let entry = Entry {
            ports: pattern.ports,
            rule,
        };
        let key: Box<str> = pattern.base.as_str().into();
        match pattern.scope {
            Scope::Exact => self.exact.entry(key).or_default().push(entry),
            Scope::Subdomains => self.below.entry(key).or_default().push(entry),
            Scope::ApexAndSubdomains => {
                self.exact
                    .entry(key.clone())
                    .or_default()
                    .push(entry.clone());
                self.below.entry(key).or_default().push(entry);
            }
        }
        self.len += 1;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first rule covering `name` on `port`; `Ports::Default` entries cover the ports
    /// for which `default_covers(port)` is true.
    pub fn find(
        &self,
        name: &DomainName,
        port: u16,
        default_covers: impl Fn(u16) -> bool,
    ) -> Option<&Rule> {
        let covers = |e: &&Entry| match e.ports {
            Ports::Default => default_covers(port),
            Ports::Only(p) => p == port,
        };
        if let Some(entries) = self.exact.get(name.as_str())
            && let Some(e) = entries.iter().find(covers)
        {
            return Some(&e.rule);
        }
        if self.below.is_empty() {
            return None;
        }
        for parent in name.parents() {
            if let Some(entries) = self.below.get(parent)
                && let Some(e) = entries.iter().find(covers)
            {
                return Some(&e.rule);
            }
        }
        None
    }

    /// True when some pattern covers `name` on any port (the DNS forwarder's question).
    pub fn covers_name(&self, name: &DomainName) -> bool {
        self.exact.contains_key(name.as_str()) || name.parents().any(|p| self.below.contains_key(p))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn set(patterns: &[&str]) -> DomainSet {
        let mut s = DomainSet::default();
        for p in patterns {
            s.insert(
                &DomainPattern::parse(p).unwrap(),
                Rule {
                    name: Arc::from(*p),
                },
            );
        }
        s
    }

    fn hit(s: &DomainSet, name: &str, port: u16) -> Option<String> {
        let n = DomainName::parse(name).unwrap();
        s.find(&n, port, |p| p == 80 || p == 443)
            .map(|r| r.name.to_string())
    }

    #[test]
    fn wildcard_semantics_threats_c11() {
        let s = set(&["allowed.test", "*.wild.test"]);
        assert_eq!(
            hit(&s, "allowed.test", 443).as_deref(),
            Some("allowed.test")
        );
        assert_eq!(hit(&s, "a.wild.test", 443).as_deref(), Some("*.wild.test"));
        assert_eq!(
            hit(&s, "a.b.c.wild.test", 80).as_deref(),
            Some("*.wild.test")
        );
        for denied in [
            "wild.test",
            "xwild.test",
            "x.wild.test.evil.test",
            "wild.test.evil.test",
            "sub.allowed.test",
            "allowed.test.evil.test",
        ] {
            assert_eq!(hit(&s, denied, 443), None, "{denied}");
        }
    }

    #[test]
    fn apex_form_and_ports() {
        let s = set(&[".hf.test", "ci.test:8443"]);
        assert!(hit(&s, "hf.test", 443).is_some());
        assert!(hit(&s, "x.hf.test", 80).is_some());
        assert!(hit(&s, "hf.test", 8080).is_none());
        assert!(hit(&s, "ci.test", 8443).is_some());
        assert!(hit(&s, "ci.test", 443).is_none());
    }

    #[test]
    fn rejects_bad_patterns() {
        for bad in [
            "*.com",
            "*.co.uk",
            ".com",
            "*.github.io",
            "a.*.b",
            "*foo.test",
            "**.x.test",
            "x.test:0",
            "x.test:99999",
            "x.test:",
            "*",
            "*.",
            "x..test",
            "x.test:+1",
        ] {
            assert!(DomainPattern::parse(bad).is_err(), "{bad} accepted");
        }
        assert!(DomainPattern::parse("*.example.co.uk").is_ok());
        assert!(DomainPattern::parse("*.wild.test").is_ok());
        assert!(DomainPattern::parse("com").is_ok());
    }

    #[test]
    fn display_round_trips() {
        for p in ["a.test", "*.a.test", ".a.test:8443"] {
            assert_eq!(DomainPattern::parse(p).unwrap().to_string(), p);
        }
    }
}
