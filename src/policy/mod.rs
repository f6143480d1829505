//! The policy: who may reach what. Compiled from the rules directory, immutable once built,
//! swapped whole on reload.
//!
//! Owns agent identification (source CIDR or proxy credentials), [`Policy::evaluate`] and
//! [`Policy::check_address`]. Everything here is pure: no I/O, no clock, no locks; that is
//! what makes a decision benchmarkable, fuzzable and explainable.

pub mod address;
pub(crate) mod binding;
mod compile;
pub mod domain;
pub mod pattern;
pub mod rules;
mod verdict;

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use ipnet::IpNet;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::hash::RuleKeyMap;

pub use binding::{MacAddr, MacError, SourceBinding};
pub use compile::{CompileErrors, compile};
pub use domain::{DomainName, Host, parse_host};
pub use pattern::{DomainPattern, DomainSet, Rule};
pub use verdict::{Decision, Reason, Verdict};

/// Index of an agent in the policy that identified it. Only meaningful with that policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AgentId(u32);

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

/// A CIDR an agent may reach by address (or may resolve into, for private ranges).
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
    pub deny_ech: bool,
    pub allow_missing_sni: bool,
    pub limits: Limits,
    pub credentials: Option<Credentials>,
}

/// Proxy credentials; only the SHA-256 of the password is kept.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub username: String,
    pub password_sha256: [u8; 32],
}

/// Who sent a connection, as far as the policy can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    Agent(AgentId),
    /// The source matched an agent that declares credentials, or credentials are in use
    /// and none matched: the client must authenticate (407).
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
        }
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

    /// Identify an explicit-proxy client: credentials when given, else the source address.
    /// An agent that declares credentials must present them.
    pub fn identify(&self, source: IpAddr, basic: Option<(&str, &str)>) -> Identity {
        if let Some((user, password)) = basic {
            return match self.by_username.get(user).and_then(|&id| {
                let creds = self.agent(id)?.credentials.as_ref()?;
                let digest: [u8; 32] = Sha256::digest(password.as_bytes()).into();
                bool::from(digest.ct_eq(&creds.password_sha256)).then_some(id)
            }) {
                Some(id) => Identity::Agent(id),
                None => Identity::NeedsCredentials,
            };
        }
        match self.agent_by_source(source) {
            Some(id) if self.agent(id).is_some_and(|a| a.credentials.is_some()) => {
                Identity::NeedsCredentials
            }
            Some(id) => Identity::Agent(id),
            None if !self.by_username.is_empty() => Identity::NeedsCredentials,
            None => Identity::Unknown,
        }
    }

    fn default_port(&self, port: u16) -> bool {
        self.default_ports.contains(&port)
    }

    /// Decide whether `agent` may reach `target` by name (DESIGN §2 step 4). Pure.
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

    /// Check a resolved address before dialling it (DESIGN §2 step 5). Special addresses
    /// pass only under an `allow_cidrs` rule. Pure.
    pub fn check_address(
        &self,
        agent: Option<AgentId>,
        ip: IpAddr,
        port: u16,
    ) -> Result<(), Verdict> {
        let Some(a) = agent.and_then(|id| self.agent(id)) else {
            return Err(Verdict::deny(Reason::UnknownAgent));
        };
        if !address::is_special(ip) || cidr_rule(a, ip, port, |p| self.default_port(p)).is_some() {
            Ok(())
        } else {
            Err(Verdict::deny(Reason::PrivateAddress))
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
