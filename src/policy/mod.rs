//! The policy: who may reach what. Compiled from the rules directory, immutable once built,
//! swapped whole on reload.
//!
//! Owns agent identification (source CIDR or proxy credentials), [`Policy::evaluate`] and
//! [`Policy::check_address`]. Everything here is pure: no I/O, no clock, no locks; that is
//! what makes a decision benchmarkable, fuzzable and explainable.

pub mod address;
pub(crate) mod binding;
mod compile;
mod credentials;
pub mod domain;
pub mod pattern;
pub mod rules;
mod verdict;

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use ipnet::IpNet;

use crate::hash::RuleKeyMap;

pub use binding::{MacAddr, MacError, SourceBinding};
pub use compile::{CompileErrors, compile};
pub use credentials::{Credentials, PasswordCheck};
pub use domain::{DomainName, Host, parse_host};
pub use pattern::{DomainPattern, DomainSet, Rule};
pub use verdict::{Decision, Reason, Verdict};

/// Index of an agent in the policy that identified it. Only meaningful with that policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AgentId(pub(crate) u32);

/// What a connection wants to reach, as the agent named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: Host,
    pub port: u16,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Per-agent limits as configured (enforced by the limits layer).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub new_connections_per_second: Option<u32>,
    pub burst: Option<u32>,
    pub max_concurrent: Option<u32>,
    pub bandwidth_bytes_per_second: Option<u64>,
    pub daily_bytes: Option<u64>,
}

/// A CIDR rule: `allow_cidrs` (addresses an agent may reach by IP literal, and names may
/// resolve into) or `resolve_cidrs` (special ranges names may resolve into; no port).
#[derive(Debug, Clone)]
pub struct CidrRule {
    pub net: IpNet,
    pub port: Option<u16>,
    pub rule: Arc<str>,
}

/// Everything the policy knows about one agent.
#[derive(Debug)]
pub struct AgentPolicy {
    pub name: Arc<str>,
    pub sources: Vec<IpNet>,
    /// The sources bound to an interface and/or a MAC (a subset of `sources`, same order);
    /// the nftables ruleset drops their packets from anywhere else.
    pub bindings: Vec<SourceBinding>,
    pub allow: Vec<Arc<DomainSet>>,
    pub deny: Vec<Arc<DomainSet>>,
    pub allow_cidrs: Vec<CidrRule>,
    pub resolve_cidrs: Vec<CidrRule>,
    pub deny_ech: bool,
    pub allow_missing_sni: bool,
    pub limits: Limits,
    pub credentials: Option<Credentials>,
}

impl AgentPolicy {
    /// The `resolve_cidrs` rule that covers `ip`, if any.
    pub fn resolve_cidr(&self, ip: IpAddr) -> Option<&CidrRule> {
        let ip = address::canonical(ip);
        self.resolve_cidrs.iter().find(|c| c.net.contains(&ip))
    }

    /// May a name this agent asks for resolve to `ip` (the DNS forwarder's rebinding
    /// filter)? Public addresses, and special ones an `allow_cidrs` rule (on any port: the
    /// name may serve on the port the rule names) or a `resolve_cidrs` rule covers.
    pub fn may_resolve_into(&self, ip: IpAddr) -> bool {
        if !address::is_special(ip) {
            return true;
        }
        let canonical = address::canonical(ip);
        self.allow_cidrs.iter().any(|c| c.net.contains(&canonical))
            || self.resolve_cidr(ip).is_some()
    }
}

/// Where an address about to be dialled came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressOrigin {
    /// The agent named the address itself (`CONNECT 10.1.2.3:443`, `Host: 10.1.2.3`):
    /// only `allow_cidrs` admits a special one.
    Literal,
    /// The gateway resolved an allowed name to it: `allow_cidrs` or `resolve_cidrs`.
    Resolved,
}

/// Why an address may be dialled.
#[derive(Debug, Clone, Copy)]
pub enum AddressGrant<'a> {
    /// Not a special address: no rule needed.
    Public,
    /// A special address under this `allow_cidrs` rule.
    AllowCidrs(&'a CidrRule),
    /// A special address a name resolved to, under this `resolve_cidrs` rule.
    ResolveCidrs(&'a CidrRule),
}

/// Who sent a connection, as far as the policy can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    Agent(AgentId),
    /// The source matched an agent that declares credentials, or credentials are in use
    /// and none were presented: the client must authenticate (407).
    NeedsCredentials,
    Unknown,
}

/// An immutable, valid policy. Build one with [`Policy::load`] or [`compile`].
#[derive(Debug)]
pub struct Policy {
    generation: u64,
    default_ports: Box<[u16]>,
    agents: Vec<AgentPolicy>,
    by_name: RuleKeyMap<Arc<str>, AgentId>,
    by_host_source: RuleKeyMap<IpAddr, AgentId>,
    by_net_source: Vec<(IpNet, AgentId)>,
    by_username: RuleKeyMap<String, AgentId>,
    /// What `check` prints as warnings: accepted, but worth changing.
    warnings: Vec<rules::SourceError>,
}

/// Name used in logs and metrics for connections that matched no agent.
pub const UNKNOWN_AGENT: &str = "unknown";

impl Policy {
    /// Read and compile a rules directory.
    pub fn load(dir: &Path, default_ports: &[u16], generation: u64) -> Result<Self, CompileErrors> {
        let sources = rules::read_dir(dir).map_err(|e| CompileErrors(vec![e]))?;
        compile(&sources, default_ports, generation)
    }

    /// A policy that denies everything: what runs before the first successful load.
    pub fn deny_all(generation: u64) -> Self {
        Self {
            generation,
            default_ports: Box::new([80, 443]),
            agents: Vec::new(),
            by_name: RuleKeyMap::default(),
            by_host_source: RuleKeyMap::default(),
            by_net_source: Vec::new(),
            by_username: RuleKeyMap::default(),
            warnings: Vec::new(),
        }
    }

    /// Accepted but discouraged settings, each located like an error (`check` prints them).
    pub fn warnings(&self) -> &[rules::SourceError] {
        &self.warnings
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn agents(&self) -> impl Iterator<Item = (AgentId, &AgentPolicy)> {
        self.agents
            .iter()
            .enumerate()
            .map(|(i, a)| (AgentId(i as u32), a))
    }

    pub fn agent(&self, id: AgentId) -> Option<&AgentPolicy> {
        self.agents.get(id.0 as usize)
    }

    pub fn agent_by_name(&self, name: &str) -> Option<AgentId> {
        self.by_name.get(name).copied()
    }

    /// The agent's name, or `unknown`.
    pub fn agent_name(&self, id: Option<AgentId>) -> Arc<str> {
        id.and_then(|id| self.agent(id))
            .map(|a| a.name.clone())
            .unwrap_or_else(|| Arc::from(UNKNOWN_AGENT))
    }

    /// The agent whose `sources` contain `ip` (overlaps are rejected at compile time).
    pub fn agent_by_source(&self, ip: IpAddr) -> Option<AgentId> {
        let ip = address::canonical(ip);
        if let Some(id) = self.by_host_source.get(&ip) {
            return Some(*id);
        }
        self.by_net_source
            .iter()
            .find(|(net, _)| net.contains(&ip))
            .map(|(_, id)| *id)
    }

    /// Identify a client that presented no credentials, by its source address. An agent
    /// that declares credentials must present them, and while any agent has credentials, an
    /// unknown source is asked for them. Credentials are checked by `proxy::auth` (their
    /// verification may be costly), starting from [`Policy::credentials_for`].
    pub fn identify(&self, source: IpAddr) -> Identity {
        match self.agent_by_source(source) {
            Some(id) if self.agent(id).is_some_and(|a| a.credentials.is_some()) => {
                Identity::NeedsCredentials
            }
            Some(id) => Identity::Agent(id),
            None if !self.by_username.is_empty() => Identity::NeedsCredentials,
            None => Identity::Unknown,
        }
    }

    /// The agent a Basic-auth username belongs to, and its credentials. Pure lookup: the
    /// password is not checked here.
    pub fn credentials_for(&self, username: &str) -> Option<(AgentId, &Credentials)> {
        let id = *self.by_username.get(username)?;
        Some((id, self.agent(id)?.credentials.as_ref()?))
    }

    fn default_port(&self, port: u16) -> bool {
        self.default_ports.contains(&port)
    }

    /// Decide whether `agent` may reach `target` by name (docs/architecture.md, "decide"). Pure.
    pub fn evaluate(&self, agent: Option<AgentId>, target: &Target) -> Verdict {
        let Some(a) = agent.and_then(|id| self.agent(id)) else {
            return Verdict::deny(Reason::UnknownAgent);
        };
        match &target.host {
            Host::Ip(ip) => match cidr_rule(a, *ip, target.port, |p| self.default_port(p)) {
                Some(rule) => Verdict::allow(rule.rule.clone()),
                None => Verdict::deny(Reason::IpLiteral),
            },
            Host::Name(name) => {
                // A deny without a port denies every port.
                for set in &a.deny {
                    if let Some(rule) = set.find(name, target.port, |_| true) {
                        return Verdict::deny_by(Reason::DeniedRule, rule.name.clone());
                    }
                }
                for set in &a.allow {
                    if let Some(rule) = set.find(name, target.port, |p| self.default_port(p)) {
                        return Verdict::allow(rule.name.clone());
                    }
                }
                Verdict::deny(Reason::NotAllowed)
            }
        }
    }

    /// Check an address before dialling it (docs/architecture.md, "check addresses"). Special
    /// addresses pass only under an `allow_cidrs` rule, or a `resolve_cidrs` rule when a name
    /// resolved to them. Pure.
    pub fn check_address(
        &self,
        agent: Option<AgentId>,
        ip: IpAddr,
        port: u16,
        origin: AddressOrigin,
    ) -> Result<(), Verdict> {
        self.address_grant(agent, ip, port, origin).map(|_| ())
    }

    /// Would this policy still allow `agent`'s connection to `target` at `addrs`: the name
    /// rules and every address check (`allow_cidrs`, or `resolve_cidrs` for a name's
    /// addresses) the decision relied on. What a reload re-checks live tunnels by.
    pub fn still_allows(&self, agent: &str, target: &Target, addrs: &[IpAddr]) -> bool {
        let agent = self.agent_by_name(agent);
        let origin = match target.host {
            Host::Ip(_) => AddressOrigin::Literal,
            Host::Name(_) => AddressOrigin::Resolved,
        };
        self.evaluate(agent, target).is_allow()
            && addrs
                .iter()
                .all(|ip| self.check_address(agent, *ip, target.port, origin).is_ok())
    }

    /// [`Policy::check_address`], and which rule let the address through (for `explain`).
    pub fn address_grant(
        &self,
        agent: Option<AgentId>,
        ip: IpAddr,
        port: u16,
        origin: AddressOrigin,
    ) -> Result<AddressGrant<'_>, Verdict> {
        let Some(a) = agent.and_then(|id| self.agent(id)) else {
            return Err(Verdict::deny(Reason::UnknownAgent));
        };
        if !address::is_special(ip) {
            return Ok(AddressGrant::Public);
        }
        if let Some(rule) = cidr_rule(a, ip, port, |p| self.default_port(p)) {
            return Ok(AddressGrant::AllowCidrs(rule));
        }
        match origin {
            AddressOrigin::Resolved => a
                .resolve_cidr(ip)
                .map(AddressGrant::ResolveCidrs)
                .ok_or(Verdict::deny(Reason::PrivateAddress)),
            AddressOrigin::Literal => Err(Verdict::deny(Reason::PrivateAddress)),
        }
    }

    /// May the agent's DNS queries for `name` be answered (any port)?
    pub fn allows_name(&self, agent: Option<AgentId>, name: &DomainName) -> bool {
        let Some(a) = agent.and_then(|id| self.agent(id)) else {
            return false;
        };
        let denied_everywhere = a.deny.iter().any(|s| s.find(name, 0, |_| true).is_some());
        !denied_everywhere && a.allow.iter().any(|s| s.covers_name(name))
    }
}

fn cidr_rule(
    a: &AgentPolicy,
    ip: IpAddr,
    port: u16,
    default_port: impl Fn(u16) -> bool,
) -> Option<&CidrRule> {
    let ip = address::canonical(ip);
    a.allow_cidrs.iter().find(|c| {
        c.net.contains(&ip)
            && match c.port {
                Some(p) => p == port,
                None => default_port(port),
            }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::rules::{RulesSources, SourceFile};
    use super::*;

    fn policy(agent: &str) -> Result<Policy, CompileErrors> {
        let sources = RulesSources {
            agents: vec![SourceFile {
                path: "rules/agents/coder-1.toml".into(),
                text: agent.to_owned(),
            }],
            lists: Vec::new(),
        };
        compile(&sources, &[80, 443], 1)
    }

    const MIRROR: &str = "name = \"coder-1\"\nallow = [\"mirror.corp.test\"]\nresolve_cidrs = [\"10.1.2.0/24\", \"fd00:1::/64\"]\nallow_cidrs = [\"192.168.7.7/32:443\"]\n";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn literal(s: &str, port: u16) -> Target {
        Target {
            host: Host::Ip(ip(s)),
            port,
        }
    }

    #[test]
    fn a_name_may_resolve_into_resolve_cidrs() {
        let p = policy(MIRROR).unwrap();
        let id = p.agent_by_name("coder-1");
        let name = Target {
            host: parse_host("mirror.corp.test").unwrap(),
            port: 443,
        };
        assert!(p.evaluate(id, &name).is_allow());
        for addr in ["10.1.2.3", "::ffff:10.1.2.3", "fd00:1::5"] {
            match p.address_grant(id, ip(addr), 443, AddressOrigin::Resolved) {
                Ok(AddressGrant::ResolveCidrs(rule)) => assert!(
                    rule.rule.starts_with("agents/coder-1.toml:resolve_cidrs:"),
                    "{}",
                    rule.rule
                ),
                other => panic!("{addr}: {other:?}"),
            }
            assert!(p.agent(id.unwrap()).unwrap().may_resolve_into(ip(addr)));
        }
        // Outside the range, and an embedded form of an address inside it (an IPv6
        // destination, not 10.1.2.3): still private.
        for addr in [
            "10.1.3.1",
            "127.0.0.1",
            "::ffff:0:10.1.2.3",
            "64:ff9b::10.1.2.3",
        ] {
            assert_eq!(
                p.check_address(id, ip(addr), 443, AddressOrigin::Resolved),
                Err(Verdict::deny(Reason::PrivateAddress)),
                "{addr}"
            );
            assert!(!p.agent(id.unwrap()).unwrap().may_resolve_into(ip(addr)));
        }
        assert!(matches!(
            p.address_grant(id, ip("8.8.8.8"), 443, AddressOrigin::Resolved),
            Ok(AddressGrant::Public)
        ));
    }

    #[test]
    fn an_ip_literal_in_resolve_cidrs_is_still_denied() {
        let p = policy(MIRROR).unwrap();
        let id = p.agent_by_name("coder-1");
        for addr in ["10.1.2.3", "fd00:1::5", "::ffff:10.1.2.3"] {
            let v = p.evaluate(id, &literal(addr, 443));
            assert_eq!(v.deny_reason(), Some(Reason::IpLiteral), "{addr}");
            assert_eq!(
                p.check_address(id, ip(addr), 443, AddressOrigin::Literal),
                Err(Verdict::deny(Reason::PrivateAddress)),
                "{addr}"
            );
        }
    }

    #[test]
    fn allow_cidrs_cover_literals_and_names() {
        let p = policy(MIRROR).unwrap();
        let id = p.agent_by_name("coder-1");
        let v = p.evaluate(id, &literal("192.168.7.7", 443));
        assert!(v.is_allow());
        assert_eq!(
            v.rule.as_deref(),
            Some("agents/coder-1.toml:allow_cidrs:192.168.7.7/32:443")
        );
        for origin in [AddressOrigin::Literal, AddressOrigin::Resolved] {
            assert!(matches!(
                p.address_grant(id, ip("192.168.7.7"), 443, origin),
                Ok(AddressGrant::AllowCidrs(_))
            ));
            // The allow_cidrs rule names a port; another port is not covered.
            assert!(p.check_address(id, ip("192.168.7.7"), 80, origin).is_err());
        }
        assert!(
            p.evaluate(id, &literal("192.168.7.7", 80)).deny_reason() == Some(Reason::IpLiteral)
        );
    }

    #[test]
    fn resolve_cidrs_errors_name_file_line_and_key() {
        for (text, message) in [
            (
                "name = \"a\"\n\nresolve_cidrs = [\"10.1.2.0/24:443\"]\n",
                "take no port",
            ),
            (
                "name = \"a\"\n\nresolve_cidrs = [\"10.1.2.1/24\"]\n",
                "is not a CIDR",
            ),
            (
                "name = \"a\"\n\nresolve_cidrs = [\"mirror\"]\n",
                "is not a CIDR",
            ),
        ] {
            let e = policy(text).unwrap_err().to_string();
            assert!(
                e.starts_with("rules/agents/coder-1.toml:3: key `resolve_cidrs`: "),
                "{e}"
            );
            assert!(e.contains(message), "{e}");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod credential_tests {
    use super::rules::{RulesSources, SourceFile};
    use super::*;
    use argon2::{Argon2, Params};
    use password_hash::CustomizedPasswordHasher;

    fn phc(password: &str, m: u32, t: u32) -> String {
        Argon2::default()
            .hash_password_with_params(
                password.as_bytes(),
                b"0123456789abcdef",
                Params::new(m, t, 1, None).unwrap(),
            )
            .unwrap()
            .to_string()
    }

    fn policy(credentials: &str) -> Result<Policy, CompileErrors> {
        let sources = RulesSources {
            agents: vec![SourceFile {
                path: "rules/agents/coder-1.toml".into(),
                text: format!(
                    "name = \"coder-1\"\n[credentials]\nusername = \"coder\"\n{credentials}\n"
                ),
            }],
            lists: Vec::new(),
        };
        compile(&sources, &[443], 1)
    }

    #[test]
    fn password_hash_compiles_and_warns_only_below_the_recommended_cost() {
        let strong = policy(&format!(
            "password_hash = \"{}\"",
            phc("s3cret", 19 * 1024, 2)
        ))
        .unwrap();
        assert!(strong.warnings().is_empty(), "{:?}", strong.warnings());
        let (id, creds) = strong.credentials_for("coder").unwrap();
        assert_eq!(strong.agent_by_name("coder-1"), Some(id));
        assert!(creds.password.is_costly() && creds.password.verify(b"s3cret"));
        assert!(
            strong.credentials_for("coder-1").is_none(),
            "by username, not agent name"
        );

        let weak = policy(&format!("password_hash = \"{}\"", phc("s3cret", 64, 1))).unwrap();
        let [w] = weak.warnings() else {
            panic!("{:?}", weak.warnings())
        };
        assert_eq!((w.line, w.key.as_str()), (4, "credentials.password_hash"));
        assert!(w.message.contains("below the recommended"), "{w}");

        let legacy = policy(&format!(
            "password_sha256 = \"{}\"",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"s3cret"))
        ))
        .unwrap();
        let [w] = legacy.warnings() else {
            panic!("{:?}", legacy.warnings())
        };
        assert_eq!((w.line, w.key.as_str()), (4, "credentials.password_sha256"));
        let (_, creds) = legacy.credentials_for("coder").unwrap();
        assert!(!creds.password.is_costly() && creds.password.verify(b"s3cret"));
    }

    #[test]
    fn credentials_need_exactly_one_password_key() {
        let e = policy("").unwrap_err().to_string();
        assert!(
            e.contains("key `credentials.password_hash`: missing"),
            "{e}"
        );
        let e = policy("password_sha256 = \"abc\"").unwrap_err().to_string();
        assert!(
            e.starts_with("rules/agents/coder-1.toml:4: key `credentials.password_sha256`: must be 64 hex digits"),
            "{e}"
        );
    }
}
