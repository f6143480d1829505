//! The nftables ruleset: rendered from the config as one `inet` table, applied atomically
//! with one `nft -f` batch, and the kill switch's `kill_sources` sets edited in place.
//!
//! Owns the text of the ruleset and the `nft` invocations. Must not decide policy: it only
//! funnels agent traffic into portcullis and drops everything else from the agents. All
//! values reaching the text are typed (addresses, ports) or validated (interface names), so
//! nothing in a config can inject nft syntax.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ipnet::IpNet;

pub const TABLE: &str = "portcullis";
pub const KILL_SET_V4: &str = "kill_sources_v4";
pub const KILL_SET_V6: &str = "kill_sources_v6";
/// Bound on one `nft` invocation.
const NFT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interception {
    Redirect,
    Tproxy,
}

/// Everything the ruleset depends on.
#[derive(Debug, Clone)]
pub struct RulesetSpec {
    /// Interfaces agent traffic arrives on.
    pub agent_interfaces: Vec<String>,
    /// Agent networks (v4 and v6).
    pub agent_sources: Vec<IpNet>,
    pub interception: Interception,
    pub transparent_port: u16,
    /// Destination ports diverted to the transparent listener.
    pub intercepted_ports: Vec<u16>,
    /// Explicit proxy port agents may use on the gateway.
    pub explicit_port: Option<u16>,
    /// DNS port of portcullis; agent DNS to any address is diverted there.
    pub dns_port: Option<u16>,
    /// Intercept agent IPv6 (true) or drop all of it (false).
    pub ipv6: bool,
    pub tproxy_mark: u32,
    /// Addresses currently killed, so a re-apply never reopens a killed agent.
    pub killed: Vec<IpAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("ruleset spec: {0}")]
    Spec(String),
    #[error("cannot run nft: {0}")]
    Spawn(std::io::Error),
    #[error("nft exited with {status}: {stderr}")]
    Nft { status: i32, stderr: String },
}

fn valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn set_list<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The complete `nft -f` batch. Atomic and idempotent: the table is created (if missing),
/// deleted and defined again inside one transaction, so there is never a moment without it.
pub fn render(spec: &RulesetSpec) -> Result<String, NftError> {
    if spec.agent_interfaces.is_empty() && spec.agent_sources.is_empty() {
        return Err(NftError::Spec(
            "need agent interfaces or agent networks".into(),
        ));
    }
    if let Some(bad) = spec.agent_interfaces.iter().find(|i| !valid_ifname(i)) {
        return Err(NftError::Spec(format!("invalid interface name {bad:?}")));
    }
    let ports = [
        Some(spec.transparent_port),
        spec.explicit_port,
        spec.dns_port,
    ];
    if ports.iter().flatten().any(|p| *p == 0)
        || spec.intercepted_ports.contains(&0)
        || spec.intercepted_ports.is_empty()
    {
        return Err(NftError::Spec(
            "ports must be non-zero and at least one port intercepted".into(),
        ));
    }
    let own: Vec<u16> = ports.iter().flatten().copied().collect();
    if (1..own.len()).any(|i| own[..i].contains(&own[i])) {
        return Err(NftError::Spec(
            "transparent, explicit and DNS ports must differ".into(),
        ));
    }
    let v4: Vec<IpNet> = spec
        .agent_sources
        .iter()
        .filter(|n| n.addr().is_ipv4())
        .copied()
        .collect();
    let v6: Vec<IpNet> = spec
        .agent_sources
        .iter()
        .filter(|n| n.addr().is_ipv6())
        .copied()
        .collect();
    let killed4: Vec<IpAddr> = spec
        .killed
        .iter()
        .filter(|a| a.is_ipv4())
        .copied()
        .collect();
    let killed6: Vec<IpAddr> = spec
        .killed
        .iter()
        .filter(|a| a.is_ipv6())
        .copied()
        .collect();

    // "From the agents": arriving on an agent interface, or from an agent network.
    let mut from_agents = Vec::new();
    if !spec.agent_interfaces.is_empty() {
        from_agents.push(format!(
            "iifname {{ {} }}",
            set_list(
                &spec
                    .agent_interfaces
                    .iter()
                    .map(|i| format!("\"{i}\""))
                    .collect::<Vec<_>>()
            )
        ));
    }
    if !v4.is_empty() {
        from_agents.push(format!("ip saddr {{ {} }}", set_list(&v4)));
    }
    if !v6.is_empty() {
        from_agents.push(format!("ip6 saddr {{ {} }}", set_list(&v6)));
    }
    let mut to_agents = Vec::new();
    if !spec.agent_interfaces.is_empty() {
        to_agents.push(format!(
            "oifname {{ {} }}",
            set_list(
                &spec
                    .agent_interfaces
                    .iter()
                    .map(|i| format!("\"{i}\""))
                    .collect::<Vec<_>>()
            )
        ));
    }
    if !v4.is_empty() {
        to_agents.push(format!("ip daddr {{ {} }}", set_list(&v4)));
    }
    if !v6.is_empty() {
        to_agents.push(format!("ip6 daddr {{ {} }}", set_list(&v6)));
    }
    let intercepted = set_list(&spec.intercepted_ports);
    let mut t = String::new();
    let w = &mut t;
    let _ = writeln!(
        w,
        "# portcullis ruleset: rendered by `portcullis print-ruleset`; do not edit by hand."
    );
    let _ = writeln!(w, "# Agent traffic = {}.", from_agents.join(" or "));
    let _ = writeln!(
        w,
        "# Applied as one transaction: create-if-missing, delete, define again."
    );
    let _ = writeln!(w, "table inet {TABLE} {{}}");
    let _ = writeln!(w, "delete table inet {TABLE}");
    let _ = writeln!(w, "table inet {TABLE} {{");
    let _ = writeln!(
        w,
        "  # Kill switch, second layer: sources here are dropped before anything else."
    );
    let _ = writeln!(
        w,
        "  set {KILL_SET_V4} {{ type ipv4_addr; flags interval;{} }}",
        elements(&killed4)
    );
    let _ = writeln!(
        w,
        "  set {KILL_SET_V6} {{ type ipv6_addr; flags interval;{} }}",
        elements(&killed6)
    );
    let _ = writeln!(w, "  counter killed_dropped {{}}");
    let _ = writeln!(w, "  counter agent_input_dropped {{}}");
    let _ = writeln!(w, "  counter agent_forward_dropped {{}}");
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "  # Earliest hook (raw): killed sources never reach conntrack, NAT or a socket."
    );
    let _ = writeln!(w, "  chain kill_guard {{");
    let _ = writeln!(
        w,
        "    type filter hook prerouting priority raw; policy accept;"
    );
    let _ = writeln!(
        w,
        "    ip saddr @{KILL_SET_V4} counter name killed_dropped drop"
    );
    let _ = writeln!(
        w,
        "    ip6 saddr @{KILL_SET_V6} counter name killed_dropped drop"
    );
    let _ = writeln!(w, "  }}");
    let _ = writeln!(w);
    match spec.interception {
        Interception::Redirect => {
            let _ = writeln!(
                w,
                "  # Divert the agents' web traffic and DNS to portcullis (NAT redirect; SO_ORIGINAL_DST)."
            );
            let _ = writeln!(w, "  chain divert {{");
            let _ = writeln!(
                w,
                "    type nat hook prerouting priority dstnat; policy accept;"
            );
            for m in &from_agents {
                if m.starts_with("ip6") && !spec.ipv6 {
                    continue;
                }
                let fam = if m.starts_with("ip6") {
                    "ip6"
                } else if m.starts_with("ip ") {
                    "ip"
                } else {
                    ""
                };
                let _ = writeln!(
                    w,
                    "    {m} {}tcp dport {{ {intercepted} }} redirect to :{}",
                    fam_prefix(fam, spec.ipv6),
                    spec.transparent_port
                );
                if let Some(dns) = spec.dns_port {
                    let _ = writeln!(
                        w,
                        "    {m} {}udp dport 53 redirect to :{dns}",
                        fam_prefix(fam, spec.ipv6)
                    );
                    let _ = writeln!(
                        w,
                        "    {m} {}tcp dport 53 redirect to :{dns}",
                        fam_prefix(fam, spec.ipv6)
                    );
                }
            }
            let _ = writeln!(w, "  }}");
        }
        Interception::Tproxy => {
            let mark = spec.tproxy_mark;
            let _ = writeln!(
                w,
                "  # Divert the agents' web traffic to portcullis with TPROXY (socket local address"
            );
            let _ = writeln!(
                w,
                "  # = original destination). Needs: ip rule add fwmark {mark} lookup 100;"
            );
            let _ = writeln!(
                w,
                "  #   ip route add local 0.0.0.0/0 dev lo table 100 (and the -6 equivalents)."
            );
            let _ = writeln!(w, "  chain divert {{");
            let _ = writeln!(
                w,
                "    type filter hook prerouting priority mangle; policy accept;"
            );
            for m in &from_agents {
                let v4_ok = !m.starts_with("ip6");
                let v6_ok = spec.ipv6 && !m.starts_with("ip ");
                if v4_ok {
                    let _ = writeln!(
                        w,
                        "    {m} meta nfproto ipv4 tcp dport {{ {intercepted} }} tproxy ip to :{} meta mark set {mark} accept",
                        spec.transparent_port
                    );
                }
                if v6_ok {
                    let _ = writeln!(
                        w,
                        "    {m} meta nfproto ipv6 tcp dport {{ {intercepted} }} tproxy ip6 to :{} meta mark set {mark} accept",
                        spec.transparent_port
                    );
                }
            }
            if let Some(dns) = spec.dns_port {
                let _ = writeln!(w, "  }}");
                let _ = writeln!(
                    w,
                    "  # DNS is redirected (NAT) even in TPROXY mode: the DNS listener is an ordinary socket."
                );
                let _ = writeln!(w, "  chain divert_dns {{");
                let _ = writeln!(
                    w,
                    "    type nat hook prerouting priority dstnat; policy accept;"
                );
                for m in &from_agents {
                    if m.starts_with("ip6") && !spec.ipv6 {
                        continue;
                    }
                    let _ = writeln!(
                        w,
                        "    {m} meta l4proto {{ tcp, udp }} th dport 53 redirect to :{dns}"
                    );
                }
            }
            let _ = writeln!(w, "  }}");
        }
    }
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "  # What agents may open on the gateway itself; the gateway's own traffic is not ours."
    );
    let _ = writeln!(w, "  chain input {{");
    let _ = writeln!(
        w,
        "    type filter hook input priority filter; policy accept;"
    );
    for m in &from_agents {
        if !spec.ipv6 && !m.starts_with("ip ") {
            let _ = writeln!(
                w,
                "    {m} meta nfproto ipv6 counter name agent_input_dropped drop"
            );
        }
        let _ = writeln!(w, "    {m} ct state established,related accept");
        let _ = writeln!(w, "    {m} tcp dport {} accept", spec.transparent_port);
        if let Some(p) = spec.explicit_port {
            let _ = writeln!(w, "    {m} tcp dport {p} accept");
        }
        if let Some(p) = spec.dns_port {
            let _ = writeln!(w, "    {m} meta l4proto {{ tcp, udp }} th dport {p} accept");
        }
        let _ = writeln!(
            w,
            "    # ICMP errors are needed for path MTU discovery; no other ICMP (no payload tunnels)."
        );
        let _ = writeln!(
            w,
            "    {m} icmp type {{ destination-unreachable, time-exceeded }} accept"
        );
        if spec.ipv6 {
            let _ = writeln!(
                w,
                "    {m} icmpv6 type {{ destination-unreachable, packet-too-big, time-exceeded, nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit }} accept"
            );
        }
        let _ = writeln!(w, "    {m} counter name agent_input_dropped drop");
    }
    let _ = writeln!(w, "  }}");
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "  # The gateway never routes agent traffic: everything leaves through portcullis"
    );
    let _ = writeln!(
        w,
        "  # (drops UDP 443/QUIC, other ports, direct IPs, ICMP, IPv6 around the proxy)."
    );
    let _ = writeln!(w, "  chain forward {{");
    let _ = writeln!(
        w,
        "    type filter hook forward priority filter; policy accept;"
    );
    for m in from_agents.iter().chain(&to_agents) {
        let _ = writeln!(w, "    {m} counter name agent_forward_dropped drop");
    }
    let _ = writeln!(w, "  }}");
    let _ = writeln!(w, "}}");
    Ok(t)
}

/// Rules matching by interface carry no family; restrict them to IPv4 when IPv6 is not
/// intercepted (it is dropped in `input` instead).
fn fam_prefix(fam: &str, ipv6: bool) -> &'static str {
    match (fam, ipv6) {
        ("", false) => "meta nfproto ipv4 ",
        _ => "",
    }
}

fn elements(addrs: &[IpAddr]) -> String {
    if addrs.is_empty() {
        String::new()
    } else {
        format!(" elements = {{ {} }};", set_list(addrs))
    }
}

/// The operator's TPROXY policy-routing commands.
pub fn tproxy_routing_commands(spec: &RulesetSpec) -> Vec<String> {
    let m = spec.tproxy_mark;
    let mut v = vec![
        format!("ip rule add fwmark {m} lookup 100"),
        "ip route add local 0.0.0.0/0 dev lo table 100".to_owned(),
    ];
    if spec.ipv6 {
        v.push(format!("ip -6 rule add fwmark {m} lookup 100"));
        v.push("ip -6 route add local ::/0 dev lo table 100".to_owned());
    }
    v
}

/// How to run `nft`: the binary (env `PORTCULLIS_NFT`, default `nft`) and optionally a
/// network namespace (tests).
#[derive(Debug, Clone)]
pub struct Nft {
    pub program: String,
    pub netns: Option<String>,
}

impl Default for Nft {
    fn default() -> Self {
        Self {
            program: std::env::var("PORTCULLIS_NFT").unwrap_or_else(|_| "nft".into()),
            netns: None,
        }
    }
}

impl Nft {
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, NftError> {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, &self.program]);
                c
            }
            None => Command::new(&self.program),
        };
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(NftError::Spawn)?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes()).map_err(NftError::Spawn)?;
        }
        // Bounded wait: nft normally answers in milliseconds.
        let started = Instant::now();
        loop {
            match child.try_wait().map_err(NftError::Spawn)? {
                Some(_) => break,
                None if started.elapsed() > NFT_TIMEOUT => {
                    let _ = child.kill();
                    return Err(NftError::Nft {
                        status: -1,
                        stderr: "timed out".into(),
                    });
                }
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        let out = child.wait_with_output().map_err(NftError::Spawn)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(NftError::Nft {
                status: out.status.code().unwrap_or(-1),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }

    /// `nft -c -f -`: validate without applying.
    pub fn check(&self, ruleset: &str) -> Result<(), NftError> {
        self.run(&["-c", "-f", "-"], Some(ruleset)).map(|_| ())
    }

    /// `nft -f -`: apply atomically.
    pub fn apply(&self, ruleset: &str) -> Result<(), NftError> {
        self.run(&["-f", "-"], Some(ruleset)).map(|_| ())
    }

    fn edit_killed(&self, verb: &str, addrs: &[IpAddr]) -> Result<(), NftError> {
        let mut batch = String::new();
        for (set, v4) in [(KILL_SET_V4, true), (KILL_SET_V6, false)] {
            let these: Vec<&IpAddr> = addrs.iter().filter(|a| a.is_ipv4() == v4).collect();
            if !these.is_empty() {
                let _ = writeln!(
                    batch,
                    "{verb} element inet {TABLE} {set} {{ {} }}",
                    set_list(&these)
                );
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.run(&["-f", "-"], Some(&batch)).map(|_| ())
    }

    pub fn add_killed(&self, addrs: &[IpAddr]) -> Result<(), NftError> {
        self.edit_killed("add", addrs)
    }

    /// Remove addresses; ones not in the set are not an error.
    pub fn remove_killed(&self, addrs: &[IpAddr]) -> Result<(), NftError> {
        let present = self.list_killed()?;
        let these: Vec<IpAddr> = addrs
            .iter()
            .filter(|a| present.contains(a))
            .copied()
            .collect();
        self.edit_killed("delete", &these)
    }

    pub fn list_killed(&self) -> Result<Vec<IpAddr>, NftError> {
        let mut out = Vec::new();
        for set in [KILL_SET_V4, KILL_SET_V6] {
            let json = self.run(&["-j", "list", "set", "inet", TABLE, set], None)?;
            let v: serde_json::Value = serde_json::from_str(&json).map_err(|e| NftError::Nft {
                status: 0,
                stderr: format!("unreadable nft JSON: {e}"),
            })?;
            let elems = v["nftables"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|o| o["set"]["elem"].as_array())
                .flatten();
            for e in elems {
                if let Some(ip) = e.as_str().and_then(|s| s.parse().ok()) {
                    out.push(ip);
                }
            }
        }
        Ok(out)
    }
}

pub fn check(ruleset: &str) -> Result<(), NftError> {
    Nft::default().check(ruleset)
}

pub fn apply(ruleset: &str) -> Result<(), NftError> {
    Nft::default().apply(ruleset)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
