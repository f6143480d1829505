//! Where an agent's source addresses may come from: an ingress interface and/or a MAC.
//!
//! Owns the typed binding ([`SourceBinding`], [`MacAddr`]) that `compile` builds from
//! `sources = [{ net = …, interface = …, mac = … }]` and the nftables ruleset enforces, and
//! the `check` warning for agents that share an L2 segment without a MAC binding. Pure: the
//! ruleset, not this module, drops the packets.

use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;

use super::Policy;

/// Linux IFNAMSIZ is 16 including the terminating NUL.
const MAX_INTERFACE_NAME_LEN: usize = 15;

/// An Ethernet address, written `02:00:00:00:00:11` (lower case when displayed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

/// Why a MAC address was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    #[error("must be six hex octets separated by `:`, like 02:00:00:00:00:11")]
    Syntax,
    #[error("is a multicast/broadcast address, never the source of a frame")]
    Group,
    #[error("is all zeros")]
    Zero,
}

impl FromStr for MacAddr {
    type Err = MacError;

    fn from_str(s: &str) -> Result<Self, MacError> {
        let mut octets = [0u8; 6];
        let mut parts = s.split(':');
        for octet in &mut octets {
            let part = parts.next().ok_or(MacError::Syntax)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(MacError::Syntax);
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| MacError::Syntax)?;
        }
        if parts.next().is_some() {
            return Err(MacError::Syntax);
        }
        if octets[0] & 1 == 1 {
            return Err(MacError::Group);
        }
        if octets == [0; 6] {
            return Err(MacError::Zero);
        }
        Ok(Self(octets))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// An agent source that may only arrive on `interface` and/or from `mac` (at least one is
/// set; a source with neither is a plain source and has no binding).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SourceBinding {
    pub net: IpNet,
    pub interface: Option<String>,
    pub mac: Option<MacAddr>,
}

/// `[A-Za-z0-9_.-]{1,15}`: a Linux interface name that cannot inject nft syntax.
pub(crate) fn valid_interface_name(name: &str) -> bool {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    (1..=MAX_INTERFACE_NAME_LEN).contains(&name.len()) && name.chars().all(allowed)
}

/// One source of one agent, as far as its segment is known.
struct Placed<'a> {
    agent: &'a str,
    net: IpNet,
    interface: Option<&'a str>,
    mac: bool,
}

/// Warnings for sources that another agent on the same L2 segment could claim: a source
/// without a MAC binding shares a segment with another agent's source when both are bound
/// to the same interface, or when either is not bound to an interface and they may meet on
/// one (several `agent_interfaces` are configured, or the two lie in one of the
/// `agent_networks`, or in one /24 (IPv4) or /64 (IPv6) when none is configured).
pub(crate) fn shared_segment_warnings(
    policy: &Policy,
    agent_interfaces: &[String],
    agent_networks: &[IpNet],
) -> Vec<String> {
    let mut placed = Vec::new();
    for (_, a) in policy.agents() {
        for net in &a.sources {
            let binding = a.bindings.iter().find(|b| b.net == *net);
            placed.push(Placed {
                agent: &a.name,
                net: *net,
                interface: binding.and_then(|b| b.interface.as_deref()),
                mac: binding.is_some_and(|b| b.mac.is_some()),
            });
        }
    }
    let mut warnings = Vec::new();
    for s in placed.iter().filter(|s| !s.mac) {
        let neighbours: Vec<&str> = placed
            .iter()
            .filter(|t| t.agent != s.agent && shared(s, t, agent_interfaces, agent_networks))
            .map(|t| t.agent)
            .fold(Vec::new(), |mut names, n| {
                if !names.contains(&n) {
                    names.push(n);
                }
                names
            });
        if neighbours.is_empty() {
            continue;
        }
        let place = match s.interface {
            Some(i) => format!("interface {i}"),
            None => "an agent segment".to_owned(),
        };
        warnings.push(format!(
            "agent `{}`: source {} shares {place} with agent(s) {} and has no `mac` binding: \
             they can send with its address (threat model: \"Agent identity on a shared \
             segment\")",
            s.agent,
            s.net,
            neighbours
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    warnings
}

fn shared(s: &Placed, t: &Placed, agent_interfaces: &[String], agent_networks: &[IpNet]) -> bool {
    match (s.interface, t.interface) {
        (Some(a), Some(b)) => a == b,
        _ => agent_interfaces.len() > 1 || same_subnet(&s.net, &t.net, agent_networks),
    }
}

fn same_subnet(a: &IpNet, b: &IpNet, agent_networks: &[IpNet]) -> bool {
    if a.addr().is_ipv4() != b.addr().is_ipv4() {
        return false;
    }
    if !agent_networks.is_empty() {
        return agent_networks
            .iter()
            .any(|n| n.contains(&a.network()) && n.contains(&b.network()));
    }
    let len = if a.addr().is_ipv4() { 24 } else { 64 };
    let cover = |n: &IpNet| {
        IpNet::new(n.network(), len.min(n.prefix_len()))
            .map(|c| c.trunc())
            .ok()
    };
    match (cover(a), cover(b)) {
        (Some(ca), Some(cb)) => ca.contains(&b.network()) || cb.contains(&a.network()),
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::policy::compile;
    use crate::policy::rules::{RulesSources, SourceFile};

    /// A policy of agents given as (name, `sources` TOML value).
    fn policy(agents: &[(&str, &str)]) -> Policy {
        let sources = RulesSources {
            agents: agents
                .iter()
                .map(|(name, sources)| SourceFile {
                    path: format!("rules/agents/{name}.toml").into(),
                    text: format!("name = \"{name}\"\nsources = {sources}\n"),
                })
                .collect(),
            lists: Vec::new(),
        };
        compile(&sources, &[443], 1).unwrap()
    }

    fn warned(policy: &Policy, interfaces: &[&str], networks: &[&str]) -> Vec<String> {
        let interfaces: Vec<String> = interfaces.iter().map(|s| s.to_string()).collect();
        let networks: Vec<IpNet> = networks.iter().map(|s| s.parse().unwrap()).collect();
        shared_segment_warnings(policy, &interfaces, &networks)
    }

    #[test]
    fn agents_in_one_subnet_without_mac_are_warned_about() {
        let p = policy(&[("a", r#"["10.66.0.11"]"#), ("b", r#"["10.66.0.12"]"#)]);
        let w = warned(&p, &["vlan66"], &[]);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with(
                "agent `a`: source 10.66.0.11/32 shares an agent segment with agent(s) `b` and has no `mac` binding"
            ),
            "{w:?}"
        );
        assert!(w[1].starts_with("agent `b`"), "{w:?}");
        // Other subnets, and no agent interfaces beyond one: apart.
        let p = policy(&[("a", r#"["10.66.0.11"]"#), ("b", r#"["10.67.0.12"]"#)]);
        assert!(warned(&p, &["vlan66"], &[]).is_empty());
        // ... unless several agent interfaces may put them anywhere.
        assert_eq!(warned(&p, &["vlan66", "vlan67"], &[]).len(), 2);
        // A configured agent network is the subnet.
        assert_eq!(warned(&p, &[], &["10.64.0.0/12"]).len(), 2);
        assert!(warned(&p, &[], &["10.66.0.0/16", "10.67.0.0/16"]).is_empty());
        // IPv6: one /64.
        let p = policy(&[("a", r#"["fd66::11"]"#), ("b", r#"["fd66::12/127"]"#)]);
        assert_eq!(warned(&p, &[], &[]).len(), 2);
        // One agent alone shares nothing.
        let p = policy(&[("a", r#"["10.66.0.11", "10.66.0.12"]"#)]);
        assert!(warned(&p, &["vlan66", "vlan67"], &[]).is_empty());
    }

    #[test]
    fn mac_or_distinct_interfaces_silence_the_warning() {
        let p = policy(&[
            (
                "a",
                r#"[{ net = "10.66.0.11", interface = "vlan66", mac = "02:00:00:00:00:11" }]"#,
            ),
            ("b", r#"[{ net = "10.66.0.12", interface = "vlan66" }]"#),
        ]);
        // A is bound to its MAC; B is not, and A shares its interface.
        let w = warned(&p, &["vlan66"], &[]);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with(
                "agent `b`: source 10.66.0.12/32 shares interface vlan66 with agent(s) `a`"
            ),
            "{w:?}"
        );
        // Each agent on its own interface (one veth or VLAN per agent): nothing to claim.
        let p = policy(&[
            ("a", r#"[{ net = "10.66.0.11", interface = "veth-a" }]"#),
            ("b", r#"[{ net = "10.66.0.12", interface = "veth-b" }]"#),
        ]);
        assert!(warned(&p, &["veth-a", "veth-b"], &[]).is_empty());
        // An interface-bound source still shares with an unbound one in its subnet.
        let p = policy(&[
            ("a", r#"[{ net = "10.66.0.11", interface = "veth-a" }]"#),
            ("b", r#"["10.66.0.12"]"#),
        ]);
        assert_eq!(warned(&p, &[], &[]).len(), 2);
    }

    #[test]
    fn mac_parsing() {
        let mac: MacAddr = "02:00:00:00:00:1A".parse().unwrap();
        assert_eq!(mac.0, [2, 0, 0, 0, 0, 0x1a]);
        assert_eq!(mac.to_string(), "02:00:00:00:00:1a");
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:11:22",
            "02-00-00-00-00-11",
            "2:0:0:0:0:11",
            "02:00:00:00:00:1g",
            "02:00:00:00:00:+1",
        ] {
            assert_eq!(bad.parse::<MacAddr>(), Err(MacError::Syntax), "{bad:?}");
        }
        assert_eq!("ff:ff:ff:ff:ff:ff".parse::<MacAddr>(), Err(MacError::Group));
        assert_eq!("01:00:5e:00:00:01".parse::<MacAddr>(), Err(MacError::Group));
        assert_eq!("00:00:00:00:00:00".parse::<MacAddr>(), Err(MacError::Zero));
    }

    #[test]
    fn interface_names() {
        assert!(valid_interface_name("vlan66"));
        assert!(valid_interface_name("br-lan.66_x"));
        assert!(valid_interface_name("fifteen-chars-x"));
        for bad in ["", "sixteen-chars-xx", "vlan66 }", "a*", "eth0\n", "@x"] {
            assert!(!valid_interface_name(bad), "{bad:?}");
        }
    }
}
