//! Rendering a [`RulesetSpec`] into the `nft -f` batch text: validation first (so no field
//! can inject syntax), then one table written in a single transaction.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::*;

/// Validated, normalised view of a spec; rendering only ever reads this.
struct Validated {
    interfaces: Vec<String>,
    nets_v4: Vec<IpNet>,
    nets_v6: Vec<IpNet>,
    intercepted_ports: Vec<u16>,
    killed_v4: Vec<Ipv4Addr>,
    killed_v6: Vec<Ipv6Addr>,
    /// Bound sources, networks truncated, sorted; never two overlapping.
    bindings: Vec<SourceBinding>,
}

fn validate(spec: &RulesetSpec) -> Result<Validated, NftError> {
    if spec.agent_interfaces.is_empty() && spec.agent_sources.is_empty() {
        return Err(NftError::Spec(
            "at least one of agent_interfaces / agent_sources must be non-empty".into(),
        ));
    }
    let mut interfaces = BTreeSet::new();
    for name in &spec.agent_interfaces {
        validate_interface_name(name)?;
        interfaces.insert(name.clone());
    }

    if spec.transparent_port == 0 {
        return Err(NftError::Spec("transparent_port must be nonzero".into()));
    }
    if spec.explicit_port == Some(0) {
        return Err(NftError::Spec("explicit_port must be nonzero".into()));
    }
    if spec.dns_port == Some(0) {
        return Err(NftError::Spec("dns_port must be nonzero".into()));
    }
    let listeners = [
        ("transparent_port", Some(spec.transparent_port)),
        ("explicit_port", spec.explicit_port),
        ("dns_port", spec.dns_port),
    ];
    for (i, (name_a, port_a)) in listeners.iter().enumerate() {
        for (name_b, port_b) in &listeners[i + 1..] {
            if let (Some(a), Some(b)) = (port_a, port_b)
                && a == b
            {
                return Err(NftError::Spec(format!(
                    "{name_a} and {name_b} must differ (both {a})"
                )));
            }
        }
    }
    if spec.intercepted_ports.contains(&0) {
        return Err(NftError::Spec("intercepted_ports must be nonzero".into()));
    }
    // Port 53 is the DNS redirect's; intercepting it as TCP-to-proxy too would be ambiguous.
    if spec.dns_port.is_some() && spec.intercepted_ports.contains(&DNS_PORT) {
        return Err(NftError::Spec(
            "intercepted_ports must not contain 53 when dns_port is set".into(),
        ));
    }

    if spec.interception == Interception::Tproxy {
        // The mark doubles as the routing table id: 0 is "unmarked"/unspec, 253-255 are
        // the kernel's default/main/local tables, which must not be hijacked.
        if spec.tproxy_mark == 0 || (253..=255).contains(&spec.tproxy_mark) {
            return Err(NftError::Spec(format!(
                "tproxy_mark {} is not usable as fwmark and routing table (0, 253-255 are reserved)",
                spec.tproxy_mark
            )));
        }
    }

    // nft rejects host bits in interval sets and duplicate/overlapping elements; normalise.
    let mut nets_v4 = BTreeSet::new();
    let mut nets_v6 = BTreeSet::new();
    for net in &spec.agent_sources {
        match net.trunc() {
            net @ IpNet::V4(_) => nets_v4.insert(net),
            net @ IpNet::V6(_) => nets_v6.insert(net),
        };
    }
    let (killed_v4, killed_v6) = split_by_family(&spec.killed);
    let bindings = validate_bindings(&spec.bindings)?;

    Ok(Validated {
        interfaces: interfaces.into_iter().collect(),
        nets_v4: nets_v4.into_iter().collect(),
        nets_v6: nets_v6.into_iter().collect(),
        intercepted_ports: spec
            .intercepted_ports
            .iter()
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
        killed_v4,
        killed_v6,
        bindings,
    })
}

/// Each binding names an interface or a MAC; no two bind overlapping networks (an address
/// has one place it may come from, as it has one agent).
fn validate_bindings(bindings: &[SourceBinding]) -> Result<Vec<SourceBinding>, NftError> {
    let mut out: Vec<SourceBinding> = Vec::new();
    for b in bindings {
        if b.interface.is_none() && b.mac.is_none() {
            return Err(NftError::Spec(format!(
                "binding of {} names neither an interface nor a MAC",
                b.net
            )));
        }
        if let Some(name) = &b.interface {
            validate_interface_name(name)?;
        }
        let net = b.net.trunc();
        if let Some(other) = out
            .iter()
            .find(|o| o.net.contains(&net.network()) || net.contains(&o.net.network()))
        {
            return Err(NftError::Spec(format!(
                "bound sources {} and {} overlap",
                other.net, net
            )));
        }
        out.push(SourceBinding { net, ..b.clone() });
    }
    out.sort();
    Ok(out)
}

fn validate_interface_name(name: &str) -> Result<(), NftError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if name.is_empty() || name.len() > MAX_INTERFACE_NAME_LEN || !name.chars().all(allowed) {
        return Err(NftError::Spec(format!(
            "invalid interface name {name:?}: must match [A-Za-z0-9_.-]{{1,{MAX_INTERFACE_NAME_LEN}}}"
        )));
    }
    Ok(())
}

/// Splits addresses into deduplicated v4/v6 lists; v4-mapped v6 counts as v4 since that is
/// how the packets will actually appear on the wire.
pub(super) fn split_by_family(addrs: &[IpAddr]) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
    let mut v4 = BTreeSet::new();
    let mut v6 = BTreeSet::new();
    for addr in addrs {
        match addr.to_canonical() {
            IpAddr::V4(a) => v4.insert(a),
            IpAddr::V6(a) => v6.insert(a),
        };
    }
    (v4.into_iter().collect(), v6.into_iter().collect())
}

pub(super) fn join<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The ways a packet can be "from agents" (or, mirrored, "to agents"); one rule per matcher in use.
fn agent_matchers(v: &Validated, direction: Direction) -> Vec<String> {
    let (ifname, ip, ip6) = match direction {
        Direction::From => ("iifname", "ip saddr", "ip6 saddr"),
        Direction::To => ("oifname", "ip daddr", "ip6 daddr"),
    };
    let mut matchers = Vec::new();
    if !v.interfaces.is_empty() {
        matchers.push(format!("{ifname} @{SET_AGENT_INTERFACES}"));
    }
    if !v.nets_v4.is_empty() {
        matchers.push(format!("{ip} @{SET_AGENT_NETS_V4}"));
    }
    if !v.nets_v6.is_empty() {
        matchers.push(format!("{ip6} @{SET_AGENT_NETS_V6}"));
    }
    matchers
}

#[derive(Clone, Copy)]
enum Direction {
    From,
    To,
}

/// Routing the operator must add for TPROXY (empty for Redirect): marked packets must be
/// delivered locally or the kernel would forward them.
pub fn tproxy_routing_commands(spec: &RulesetSpec) -> Vec<String> {
    if spec.interception != Interception::Tproxy {
        return Vec::new();
    }
    let mark = spec.tproxy_mark;
    let mut commands = vec![
        format!("ip rule add fwmark {mark} lookup {mark}"),
        format!("ip route add local 0.0.0.0/0 dev lo table {mark}"),
    ];
    if spec.ipv6 {
        commands.push(format!("ip -6 rule add fwmark {mark} lookup {mark}"));
        commands.push(format!("ip -6 route add local ::/0 dev lo table {mark}"));
    }
    commands
}

/// Renders the complete `nft -f` batch (create-if-missing, delete, define: one atomic transaction).
pub fn render(spec: &RulesetSpec) -> Result<String, NftError> {
    let v = validate(spec)?;
    let mut out = String::new();
    // `write!` into a String cannot fail; the helper keeps the call sites short.
    let mut line = |indent: usize, text: &str| {
        let _ = writeln!(out, "{}{}", "\t".repeat(indent), text);
    };
    let from_agents = agent_matchers(&v, Direction::From);
    let to_agents = agent_matchers(&v, Direction::To);
    let ports = join(&v.intercepted_ports);
    let transparent = spec.transparent_port;
    let mark = spec.tproxy_mark;

    // Header: explains the matching scheme once so the chains can stay terse.
    for text in [
        "# portcullis egress ruleset - generated by portcullis; re-render instead of editing.",
        "#",
        "# \"From agents\" = a packet matching ANY of (only the ones configured are emitted):",
        "#   iifname @agent_interfaces   arrived on an agent interface",
        "#   ip saddr @agent_nets_v4     IPv4 source inside an agent network",
        "#   ip6 saddr @agent_nets_v6    IPv6 source inside an agent network",
        "# Base chains only classify (one `jump` per matcher) so the policy in the agent_* chains",
        "# is written once and applies identically whichever way a packet was recognised.",
        "# \"To agents\" (forward only) is the mirror image: oifname / ip daddr / ip6 daddr.",
        "#",
        "# Bound sources (rules: sources = [{ net, interface, mac }]) are checked before all of",
        "# that, in source_guard: a packet from a bound network that did not arrive on its",
        "# interface and/or from its MAC is dropped before the kill switch, NAT, DNS or the",
        "# proxy see it. So an agent cannot send with another's address, and the address kill",
        "# sets only ever see a bound address on its own binding; kill_macs adds the killed",
        "# agents' bound MACs.",
        "#",
        "# Transaction: create-if-missing, delete, define - a single `nft -f` batch, so applying",
        "# twice is harmless and there is never a moment without the table.",
    ] {
        line(0, text);
    }
    if v.interfaces.is_empty() && v.nets_v6.is_empty() {
        line(0, "#");
        line(
            0,
            "# NOTE: agents are known only by IPv4 networks; their IPv6 traffic cannot be",
        );
        line(
            0,
            "# recognised (no interface to match on) and is NOT filtered by this table.",
        );
    }
    if spec.interception == Interception::Tproxy {
        line(0, "#");
        line(
            0,
            "# TPROXY needs policy routing so marked packets are delivered locally; run once:",
        );
        for command in tproxy_routing_commands(spec) {
            line(0, &format!("#   {command}"));
        }
    }
    line(0, &format!("table inet {TABLE} {{}}"));
    line(0, &format!("delete table inet {TABLE}"));
    line(0, &format!("table inet {TABLE} {{"));

    line(
        1,
        "# Named counters so metrics and tests can read drops by name.",
    );
    for counter in [
        COUNTER_INPUT_DROPPED,
        COUNTER_FORWARD_DROPPED,
        COUNTER_KILLED_DROPPED,
        COUNTER_SPOOFED_DROPPED,
    ] {
        line(1, &format!("counter {counter} {{}}"));
    }
    line(0, "");

    line(
        1,
        "# Kill switch: sources listed here are dropped before anything else; portcullis edits",
    );
    line(
        1,
        "# these sets at run time and restores them on every apply so a re-apply never reopens one.",
    );
    let kill_sets = [
        (KILL_SET_V4, "ipv4_addr", join(&v.killed_v4)),
        (KILL_SET_V6, "ipv6_addr", join(&v.killed_v6)),
    ];
    for (name, addr_type, elements) in &kill_sets {
        line(1, &format!("set {name} {{"));
        line(2, &format!("type {addr_type}"));
        line(2, "flags interval");
        if !elements.is_empty() {
            line(2, &format!("elements = {{ {elements} }}"));
        }
        line(1, "}");
    }
    line(
        1,
        "# MACs bound to killed agents (and to no live one): their frames drop whatever address",
    );
    line(
        1,
        "# they carry, so a killed agent cannot return under an address nobody claims.",
    );
    line(1, &format!("set {KILL_SET_MAC} {{"));
    line(2, "type ether_addr");
    line(1, "}");
    line(0, "");

    line(
        1,
        "# Agent identity (see header). auto-merge tolerates overlapping networks.",
    );
    if !v.interfaces.is_empty() {
        let quoted: Vec<String> = v.interfaces.iter().map(|i| format!("\"{i}\"")).collect();
        line(1, &format!("set {SET_AGENT_INTERFACES} {{"));
        line(2, "type ifname");
        line(2, &format!("elements = {{ {} }}", quoted.join(", ")));
        line(1, "}");
    }
    for (name, addr_type, nets) in [
        (SET_AGENT_NETS_V4, "ipv4_addr", &v.nets_v4),
        (SET_AGENT_NETS_V6, "ipv6_addr", &v.nets_v6),
    ] {
        if nets.is_empty() {
            continue;
        }
        line(1, &format!("set {name} {{"));
        line(2, &format!("type {addr_type}"));
        line(2, "flags interval");
        line(2, "auto-merge");
        line(2, &format!("elements = {{ {} }}", join(nets)));
        line(1, "}");
    }
    line(0, "");

    if !v.bindings.is_empty() {
        render_bindings(&v.bindings, &mut line);
    }

    let kill_drops = [
        format!("ip saddr @{KILL_SET_V4} counter name \"{COUNTER_KILLED_DROPPED}\" drop"),
        format!("ip6 saddr @{KILL_SET_V6} counter name \"{COUNTER_KILLED_DROPPED}\" drop"),
        format!("ether saddr @{KILL_SET_MAC} counter name \"{COUNTER_KILLED_DROPPED}\" drop"),
    ];

    line(
        1,
        "# Where the kill switch really bites: raw runs before conntrack and NAT, so even",
    );
    line(
        1,
        "# established flows of a killed agent die, whatever hook the rest uses.",
    );
    line(1, "chain input_guard {");
    line(
        2,
        "type filter hook prerouting priority raw; policy accept;",
    );
    for rule in &kill_drops {
        line(2, rule);
    }
    line(1, "}");
    line(0, "");

    line(
        1,
        "# NAT: kill switch again first (defence in depth), then hand agent packets to agent_nat.",
    );
    line(1, "chain prerouting {");
    line(
        2,
        "type nat hook prerouting priority dstnat; policy accept;",
    );
    for rule in &kill_drops {
        line(2, rule);
    }
    for matcher in &from_agents {
        line(2, &format!("{matcher} jump agent_nat"));
    }
    line(1, "}");
    line(0, "");

    line(
        1,
        "# Agents' intercepted traffic goes to portcullis' listeners on the gateway itself.",
    );
    line(1, "chain agent_nat {");
    if !spec.ipv6 {
        line(
            2,
            "# IPv6 disabled: leave it un-NATed so input/forward drop it.",
        );
        line(2, "meta nfproto ipv6 return");
    }
    if spec.interception == Interception::Redirect && !v.intercepted_ports.is_empty() {
        line(
            2,
            &format!("tcp dport {{ {ports} }} redirect to :{transparent}"),
        );
    }
    if let Some(dns) = spec.dns_port {
        line(
            2,
            "# All agent DNS, whatever resolver it names, goes to the filtering forwarder.",
        );
        line(2, &format!("udp dport {DNS_PORT} redirect to :{dns}"));
        line(2, &format!("tcp dport {DNS_PORT} redirect to :{dns}"));
    }
    line(1, "}");
    line(0, "");

    if spec.interception == Interception::Tproxy {
        line(
            1,
            "# TPROXY: runs at mangle (before dstnat); marked packets are routed locally.",
        );
        line(1, "chain tproxy_prerouting {");
        line(
            2,
            "type filter hook prerouting priority mangle; policy accept;",
        );
        for rule in &kill_drops {
            line(2, rule);
        }
        for matcher in &from_agents {
            line(2, &format!("{matcher} jump agent_tproxy"));
        }
        line(1, "}");
        line(0, "");
        line(1, "chain agent_tproxy {");
        if !v.intercepted_ports.is_empty() {
            line(
                2,
                &format!(
                    "meta nfproto ipv4 tcp dport {{ {ports} }} tproxy ip to :{transparent} meta mark set {mark} accept"
                ),
            );
            if spec.ipv6 {
                line(
                    2,
                    &format!(
                        "meta nfproto ipv6 tcp dport {{ {ports} }} tproxy ip6 to :{transparent} meta mark set {mark} accept"
                    ),
                );
            }
        }
        line(1, "}");
        line(0, "");
    }

    line(
        1,
        "# The gateway's own traffic is not ours to break: policy accept, agents handled apart.",
    );
    line(1, "chain input {");
    line(2, "type filter hook input priority filter; policy accept;");
    for rule in &kill_drops {
        line(2, rule);
    }
    for matcher in &from_agents {
        line(2, &format!("{matcher} jump agent_input"));
    }
    line(1, "}");
    line(0, "");

    line(
        1,
        "# Agents may reach only portcullis' listeners on the gateway; everything else drops.",
    );
    line(1, "chain agent_input {");
    if !spec.ipv6 {
        line(
            2,
            "# IPv6 disabled for agents: none of it reaches the gateway.",
        );
        line(
            2,
            &format!("meta nfproto ipv6 counter name \"{COUNTER_INPUT_DROPPED}\" drop"),
        );
    }
    line(2, "ct state established,related accept");
    match spec.interception {
        Interception::Redirect => line(2, &format!("tcp dport {transparent} accept")),
        // TPROXY keeps the original destination port; the mark says the rule chose it.
        Interception::Tproxy => line(2, &format!("meta l4proto tcp meta mark {mark} accept")),
    }
    if let Some(explicit) = spec.explicit_port {
        line(2, &format!("tcp dport {explicit} accept"));
    }
    if let Some(dns) = spec.dns_port {
        line(2, &format!("udp dport {dns} accept"));
        line(2, &format!("tcp dport {dns} accept"));
    }
    line(
        2,
        "# No echo (ICMP payloads are a covert channel); only the errors PMTU discovery needs.",
    );
    line(
        2,
        "icmp type { destination-unreachable, time-exceeded } accept",
    );
    if spec.ipv6 {
        line(
            2,
            "# IPv6 also needs packet-too-big for PMTU and neighbour/router discovery to work at all.",
        );
        line(
            2,
            "icmpv6 type { destination-unreachable, packet-too-big, time-exceeded, parameter-problem, nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } accept",
        );
    }
    line(2, &format!("counter name \"{COUNTER_INPUT_DROPPED}\" drop"));
    line(1, "}");
    line(0, "");

    line(
        1,
        "# Never route agent traffic around the proxy (also drops QUIC, other ports, direct IPs).",
    );
    line(1, "chain forward {");
    line(
        2,
        "type filter hook forward priority filter; policy accept;",
    );
    for matcher in from_agents.iter().chain(&to_agents) {
        line(
            2,
            &format!("{matcher} counter name \"{COUNTER_FORWARD_DROPPED}\" drop"),
        );
    }
    line(1, "}");
    line(0, "}");
    Ok(out)
}

/// The sets of bound sources and the chains that check them: `source_guard` runs at
/// priority raw - 10, before `input_guard` (the kill switch, raw) and everything else, and
/// hands every packet from a bound network to `source_binding`, which returns it when it
/// matches a binding and drops it otherwise. One set per shape (interface, MAC, both) and
/// family; a shape nobody uses is not emitted.
fn render_bindings(bindings: &[SourceBinding], line: &mut impl FnMut(usize, &str)) {
    let mut bound: [Vec<IpNet>; 2] = [Vec::new(), Vec::new()];
    // [family][shape]: shape 0 = interface, 1 = MAC, 2 = both.
    let mut shaped: [[Vec<String>; 3]; 2] = Default::default();
    for b in bindings {
        let family = usize::from(b.net.addr().is_ipv6());
        bound[family].push(b.net);
        let (shape, element) = match (&b.interface, &b.mac) {
            (Some(i), None) => (0, format!("\"{i}\" . {}", b.net)),
            (None, Some(m)) => (1, format!("{m} . {}", b.net)),
            (Some(i), Some(m)) => (2, format!("\"{i}\" . {m} . {}", b.net)),
            // validate_bindings refuses these.
            (None, None) => continue,
        };
        shaped[family][shape].push(element);
    }
    line(
        1,
        "# Bound sources: a packet from these networks must match one of the bindings below.",
    );
    for (family, (name, addr_type)) in [
        (SET_BOUND_SOURCES_V4, "ipv4_addr"),
        (SET_BOUND_SOURCES_V6, "ipv6_addr"),
    ]
    .into_iter()
    .enumerate()
    {
        if bound[family].is_empty() {
            continue;
        }
        line(1, &format!("set {name} {{"));
        line(2, &format!("type {addr_type}"));
        line(2, "flags interval");
        line(2, &format!("elements = {{ {} }}", join(&bound[family])));
        line(1, "}");
    }
    let mut checks = Vec::new();
    for (family, (suffix, addr_type, saddr)) in [
        ("v4", "ipv4_addr", "ip saddr"),
        ("v6", "ipv6_addr", "ip6 saddr"),
    ]
    .into_iter()
    .enumerate()
    {
        for (shape, (prefix, key_type, key)) in [
            ("bindings_if", "ifname", "iifname"),
            ("bindings_mac", "ether_addr", "ether saddr"),
            (
                "bindings_if_mac",
                "ifname . ether_addr",
                "iifname . ether saddr",
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let elements = &shaped[family][shape];
            if elements.is_empty() {
                continue;
            }
            let name = format!("{prefix}_{suffix}");
            line(1, &format!("set {name} {{"));
            line(2, &format!("type {key_type} . {addr_type}"));
            line(2, "flags interval");
            line(2, &format!("elements = {{ {} }}", elements.join(", ")));
            line(1, "}");
            checks.push(format!("{key} . {saddr} @{name} return"));
        }
    }
    line(0, "");
    line(
        1,
        "# Before the kill switch and everything else: an address is only believed on its binding.",
    );
    line(1, "chain source_guard {");
    line(
        2,
        "type filter hook prerouting priority raw - 10; policy accept;",
    );
    for (family, (set, saddr)) in [
        (SET_BOUND_SOURCES_V4, "ip saddr"),
        (SET_BOUND_SOURCES_V6, "ip6 saddr"),
    ]
    .into_iter()
    .enumerate()
    {
        if !bound[family].is_empty() {
            line(2, &format!("{saddr} @{set} jump source_binding"));
        }
    }
    line(1, "}");
    line(0, "");
    line(
        1,
        "# Frames without an Ethernet header never match a MAC binding, so they drop too.",
    );
    line(1, "chain source_binding {");
    for check in &checks {
        line(2, check);
    }
    line(
        2,
        &format!("counter name \"{COUNTER_SPOOFED_DROPPED}\" drop"),
    );
    line(1, "}");
    line(0, "");
}
