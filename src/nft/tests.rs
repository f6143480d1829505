//! Tests of the ruleset: rendered text, `nft -c`, and applying it in private network
//! namespaces with real traffic (root).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

fn homelab() -> RulesetSpec {
    RulesetSpec {
        agent_interfaces: vec!["vlan66".into()],
        agent_sources: vec!["10.66.0.0/24".parse().unwrap()],
        interception: Interception::Redirect,
        transparent_port: 15001,
        intercepted_ports: DEFAULT_INTERCEPTED_PORTS.to_vec(),
        explicit_port: Some(3128),
        dns_port: Some(53),
        ipv6: false,
        tproxy_mark: 100,
        killed: Vec::new(),
        bindings: Vec::new(),
    }
}

fn tproxy_v6() -> RulesetSpec {
    RulesetSpec {
        agent_sources: vec![
            "10.66.0.0/24".parse().unwrap(),
            "fd66::/64".parse().unwrap(),
        ],
        interception: Interception::Tproxy,
        ipv6: true,
        killed: vec!["10.66.0.9".parse().unwrap(), "fd66::9".parse().unwrap()],
        ..homelab()
    }
}

fn mac(text: &str) -> MacAddr {
    text.parse().unwrap()
}

/// Two agents on one segment: A bound to interface and MAC (v4 and v6), B to the interface
/// only, C to a MAC only.
fn bound() -> RulesetSpec {
    let binding = |net: &str, interface: Option<&str>, m: Option<&str>| SourceBinding {
        net: net.parse().unwrap(),
        interface: interface.map(Into::into),
        mac: m.map(mac),
    };
    RulesetSpec {
        ipv6: true,
        agent_sources: vec![
            "10.66.0.0/24".parse().unwrap(),
            "fd66::/64".parse().unwrap(),
        ],
        bindings: vec![
            binding("10.66.0.12/32", Some("vlan66"), None),
            binding("10.66.0.11/32", Some("vlan66"), Some("02:00:00:00:00:11")),
            binding("fd66::11/128", Some("vlan66"), Some("02:00:00:00:00:11")),
            binding("10.66.0.32/27", None, Some("02:00:00:00:00:33")),
        ],
        ..homelab()
    }
}

fn spec_error(spec: &RulesetSpec) -> String {
    match render(spec) {
        Err(NftError::Spec(message)) => message,
        other => panic!("expected a spec error, got {other:?}"),
    }
}

fn position(text: &str, needle: &str) -> usize {
    text.find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in:\n{text}"))
}

/// The text without `#` comment lines.
fn rules(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The body of `chain NAME { ... }`.
fn chain<'a>(text: &'a str, name: &str) -> &'a str {
    let start = position(text, &format!("chain {name} {{"));
    let end = start + position(&text[start..], "\n\t}");
    &text[start..end]
}

#[test]
fn transaction_is_create_delete_define() {
    let text = render(&homelab()).unwrap();
    let create = position(&text, "table inet portcullis {}\n");
    let delete = position(&text, "delete table inet portcullis\n");
    let define = position(&text, "table inet portcullis {\n");
    assert!(create < delete && delete < define);
}

#[test]
fn kill_drop_comes_before_redirects_and_accepts() {
    let text = render(&homelab()).unwrap();
    let kill = "ip saddr @kill_sources_v4 counter name \"killed_dropped\" drop";
    for name in ["input_guard", "prerouting", "input"] {
        let body = chain(&text, name);
        let first_rule = body.lines().nth(2).unwrap().trim();
        assert_eq!(first_rule, kill, "chain {name}");
    }
    assert!(chain(&text, "input_guard").contains("priority raw"));
    let kill_mac = "ether saddr @kill_macs counter name \"killed_dropped\" drop";
    for name in ["input_guard", "prerouting", "input"] {
        let body = chain(&text, name);
        assert_eq!(
            body.lines().nth(4).unwrap().trim(),
            kill_mac,
            "chain {name}"
        );
    }
    assert!(text.contains("set kill_macs {\n\t\ttype ether_addr\n\t}"));
    // The redirects live in agent_nat, reached only after the kill drops.
    let prerouting = chain(&text, "prerouting");
    assert!(position(prerouting, kill) < position(prerouting, "jump agent_nat"));
    assert!(chain(&text, "agent_nat").contains("tcp dport { 80, 443 } redirect to :15001"));
    assert!(chain(&text, "agent_nat").contains("udp dport 53 redirect to :53"));
    assert!(chain(&text, "agent_nat").contains("tcp dport 53 redirect to :53"));
}

#[test]
fn every_matcher_is_used_from_and_to() {
    let text = render(&tproxy_v6()).unwrap();
    let forward = chain(&text, "forward");
    for matcher in [
        "ip saddr @agent_nets_v4",
        "ip daddr @agent_nets_v4",
        "ip6 saddr @agent_nets_v6",
        "ip6 daddr @agent_nets_v6",
    ] {
        assert!(
            forward.contains(&format!(
                "{matcher} counter name \"agent_forward_dropped\" drop"
            )),
            "{matcher}"
        );
    }
    let text = render(&homelab()).unwrap();
    assert!(chain(&text, "input").contains("iifname @agent_interfaces jump agent_input"));
    assert!(chain(&text, "forward").contains("oifname @agent_interfaces counter"));
}

#[test]
fn ipv6_disabled_drops_all_agent_v6() {
    let text = render(&homelab()).unwrap();
    let agent_input = chain(&text, "agent_input");
    let drop_v6 = "meta nfproto ipv6 counter name \"agent_input_dropped\" drop";
    assert!(position(agent_input, drop_v6) < position(agent_input, "ct state"));
    assert!(chain(&text, "agent_nat").contains("meta nfproto ipv6 return"));
    assert!(!text.contains("icmpv6"));
    assert!(!text.contains("tproxy ip6"));
    // Forward drops agent traffic of every family by matcher, v6 included.
    assert!(chain(&text, "forward").contains("iifname @agent_interfaces counter"));
}

#[test]
fn input_allows_only_listeners_and_pmtu_icmp() {
    let text = render(&homelab()).unwrap();
    let agent_input = chain(&text, "agent_input");
    for rule in [
        "tcp dport 15001 accept",
        "tcp dport 3128 accept",
        "udp dport 53 accept",
        "tcp dport 53 accept",
        "icmp type { destination-unreachable, time-exceeded } accept",
    ] {
        assert!(agent_input.contains(rule), "{rule}");
    }
    assert!(!rules(agent_input).contains("echo"));
    assert!(
        agent_input
            .trim_end()
            .ends_with("counter name \"agent_input_dropped\" drop")
    );
    assert!(text.contains("counter agent_input_dropped {}"));
    assert!(text.contains("counter agent_forward_dropped {}"));
    assert!(text.contains("counter killed_dropped {}"));
}

#[test]
fn optional_listeners_are_omitted() {
    let spec = RulesetSpec {
        explicit_port: None,
        dns_port: None,
        ..homelab()
    };
    let text = render(&spec).unwrap();
    assert!(!text.contains("3128"));
    assert!(!text.contains("dport 53"));
}

#[test]
fn tproxy_text() {
    let spec = tproxy_v6();
    let text = render(&spec).unwrap();
    let tproxy = chain(&text, "tproxy_prerouting");
    assert!(tproxy.contains("type filter hook prerouting priority mangle"));
    assert!(tproxy.lines().nth(2).unwrap().contains("@kill_sources_v4"));
    let agent_tproxy = chain(&text, "agent_tproxy");
    assert!(agent_tproxy.contains(
        "meta nfproto ipv4 tcp dport { 80, 443 } tproxy ip to :15001 meta mark set 100 accept"
    ));
    assert!(agent_tproxy.contains("tproxy ip6 to :15001 meta mark set 100 accept"));
    assert!(chain(&text, "agent_input").contains("meta l4proto tcp meta mark 100 accept"));
    assert!(!chain(&text, "agent_nat").contains("redirect to :15001"));
    assert!(chain(&text, "agent_nat").contains("udp dport 53 redirect to :53"));
    assert!(text.contains("elements = { 10.66.0.9 }"));
    assert!(text.contains("elements = { fd66::9 }"));
    let commands = tproxy_routing_commands(&spec);
    assert_eq!(
        commands,
        [
            "ip rule add fwmark 100 lookup 100",
            "ip route add local 0.0.0.0/0 dev lo table 100",
            "ip -6 rule add fwmark 100 lookup 100",
            "ip -6 route add local ::/0 dev lo table 100",
        ]
    );
    for command in &commands {
        assert!(text.contains(&format!("#   {command}\n")));
    }
    assert!(tproxy_routing_commands(&homelab()).is_empty());
}

#[test]
fn v4_only_sources_get_a_v6_note() {
    let spec = RulesetSpec {
        agent_interfaces: Vec::new(),
        ..homelab()
    };
    let text = render(&spec).unwrap();
    assert!(text.contains("IPv6 traffic cannot be"));
    assert!(!rules(&text).contains("@agent_interfaces"));
    assert!(
        !render(&homelab())
            .unwrap()
            .contains("IPv6 traffic cannot be")
    );
}

#[test]
fn sources_are_normalised_and_killed_deduplicated() {
    let spec = RulesetSpec {
        agent_sources: vec![
            "10.66.0.7/24".parse().unwrap(),
            "10.66.0.0/24".parse().unwrap(),
        ],
        killed: vec![
            "10.66.0.5".parse().unwrap(),
            "::ffff:10.66.0.5".parse().unwrap(),
        ],
        ..homelab()
    };
    let text = render(&spec).unwrap();
    assert!(text.contains("elements = { 10.66.0.0/24 }"));
    assert!(text.contains("elements = { 10.66.0.5 }"));
}

#[test]
fn validation_errors() {
    let none = RulesetSpec {
        agent_interfaces: Vec::new(),
        agent_sources: Vec::new(),
        ..homelab()
    };
    assert!(spec_error(&none).contains("at least one"));
    let zero = RulesetSpec {
        transparent_port: 0,
        ..homelab()
    };
    assert!(spec_error(&zero).contains("transparent_port"));
    let zero_dns = RulesetSpec {
        dns_port: Some(0),
        ..homelab()
    };
    assert!(spec_error(&zero_dns).contains("dns_port"));
    let zero_intercepted = RulesetSpec {
        intercepted_ports: vec![80, 0],
        ..homelab()
    };
    assert!(spec_error(&zero_intercepted).contains("intercepted_ports"));
    let clash = RulesetSpec {
        explicit_port: Some(15001),
        ..homelab()
    };
    assert!(spec_error(&clash).contains("transparent_port and explicit_port"));
    let clash = RulesetSpec {
        dns_port: Some(3128),
        ..homelab()
    };
    assert!(spec_error(&clash).contains("explicit_port and dns_port"));
    let bad_mark = RulesetSpec {
        tproxy_mark: 0,
        ..tproxy_v6()
    };
    assert!(spec_error(&bad_mark).contains("tproxy_mark"));
    let main_table = RulesetSpec {
        tproxy_mark: 254,
        ..tproxy_v6()
    };
    assert!(spec_error(&main_table).contains("tproxy_mark"));
    // The mark is irrelevant to Redirect.
    render(&RulesetSpec {
        tproxy_mark: 0,
        ..homelab()
    })
    .unwrap();
}

#[test]
fn bound_sources_are_checked_before_everything_else() {
    let text = render(&bound()).unwrap();
    // source_guard is the only chain on a hook earlier than the kill switch's raw.
    let guard = chain(&text, "source_guard");
    assert!(guard.contains("type filter hook prerouting priority raw - 10; policy accept;"));
    assert_eq!(
        rules(guard)
            .lines()
            .skip(2)
            .map(str::trim)
            .collect::<Vec<_>>(),
        [
            "ip saddr @bound_sources_v4 jump source_binding",
            "ip6 saddr @bound_sources_v6 jump source_binding",
        ]
    );
    assert!(position(&text, "chain source_guard {") < position(&text, "chain input_guard {"));
    for other in ["input_guard", "prerouting", "input", "forward"] {
        assert!(!chain(&text, other).contains("raw - "), "{other}");
    }
    // Returned when a binding matches, dropped and counted otherwise.
    let binding = chain(&text, "source_binding");
    assert_eq!(
        binding.lines().skip(1).map(str::trim).collect::<Vec<_>>(),
        [
            "iifname . ip saddr @bindings_if_v4 return",
            "ether saddr . ip saddr @bindings_mac_v4 return",
            "iifname . ether saddr . ip saddr @bindings_if_mac_v4 return",
            "iifname . ether saddr . ip6 saddr @bindings_if_mac_v6 return",
            "counter name \"spoofed_dropped\" drop",
        ]
    );
    assert!(text.contains("counter spoofed_dropped {}"));
    // The sets, sorted by network.
    for (set, elements) in [
        (
            "bound_sources_v4",
            "10.66.0.11/32, 10.66.0.12/32, 10.66.0.32/27",
        ),
        ("bound_sources_v6", "fd66::11/128"),
        ("bindings_if_v4", "\"vlan66\" . 10.66.0.12/32"),
        ("bindings_mac_v4", "02:00:00:00:00:33 . 10.66.0.32/27"),
        (
            "bindings_if_mac_v4",
            "\"vlan66\" . 02:00:00:00:00:11 . 10.66.0.11/32",
        ),
        (
            "bindings_if_mac_v6",
            "\"vlan66\" . 02:00:00:00:00:11 . fd66::11/128",
        ),
    ] {
        let start = position(&text, &format!("set {set} {{"));
        let body = &text[start..start + position(&text[start..], "\n\t}")];
        assert!(
            body.contains(&format!("elements = {{ {elements} }}")),
            "{set}: {body}"
        );
        assert!(body.contains("flags interval"), "{set}");
    }
    // Shapes nobody uses are not emitted.
    assert!(!text.contains("bindings_if_v6"));
    assert!(!text.contains("bindings_mac_v6"));
}

#[test]
fn no_bindings_no_guard() {
    let text = rules(&render(&homelab()).unwrap());
    assert!(!text.contains("source_guard"));
    assert!(!text.contains("source_binding"));
    assert!(!text.contains("bound_sources"));
    // A v4-only binding emits no v6 set and no v6 jump.
    let spec = RulesetSpec {
        bindings: bound().bindings[..1].to_vec(),
        ..homelab()
    };
    let text = render(&spec).unwrap();
    assert!(chain(&text, "source_guard").contains("ip saddr @bound_sources_v4"));
    assert!(!text.contains("bound_sources_v6"));
}

#[test]
fn binding_validation() {
    let mut spec = bound();
    spec.bindings[0].interface = None;
    assert!(spec_error(&spec).contains("neither an interface nor a MAC"));
    let mut spec = bound();
    spec.bindings[0].interface = Some("vlan66\" accept; #".into());
    assert!(spec_error(&spec).contains("invalid interface name"));
    let mut spec = bound();
    spec.bindings[0].net = "10.66.0.0/24".parse().unwrap();
    assert!(spec_error(&spec).contains("overlap"));
}

#[test]
fn interface_name_injection_rejected() {
    for name in [
        "vlan66\" accept; #",
        "vlan66 }",
        "eth0\ndelete table inet filter",
        "a*",
        "",
        "sixteen-chars-xx",
        "vlan66;",
        "@agent",
    ] {
        let spec = RulesetSpec {
            agent_interfaces: vec![name.to_string()],
            ..homelab()
        };
        assert!(
            spec_error(&spec).contains("invalid interface name"),
            "{name:?}"
        );
    }
    let ok = RulesetSpec {
        agent_interfaces: vec!["br-lan.66_x".into(), "fifteen-chars-x".into()],
        ..homelab()
    };
    render(&ok).unwrap();
}

#[test]
fn netns_name_validated() {
    let nft = Nft {
        program: "nft".into(),
        netns: Some("-all".into()),
    };
    assert!(matches!(nft.list_killed(), Err(NftError::Spec(_))));
}

#[test]
fn parses_set_json() {
    let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"set": {"family": "inet", "name": "kill_sources_v4", "table": "portcullis",
              "type": "ipv4_addr", "flags": ["interval"],
              "elem": ["10.0.0.5", {"prefix": {"addr": "10.0.0.6", "len": 32}},
                       {"range": ["10.0.0.7", "10.0.0.7"]},
                       {"elem": {"val": "10.0.0.8", "counter": {"packets": 0}}}]}}]}"#;
    let addrs = parse_set_elements(json).unwrap();
    let expected: Vec<IpAddr> = ["10.0.0.5", "10.0.0.6", "10.0.0.7", "10.0.0.8"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    assert_eq!(addrs, expected);
    let empty = r#"{"nftables": [{"set": {"name": "kill_sources_v6"}}]}"#;
    assert!(parse_set_elements(empty).unwrap().is_empty());
    let lone = r#"{"nftables": [{"set": {"elem": "fd00::1"}}]}"#;
    assert_eq!(
        parse_set_elements(lone).unwrap(),
        vec!["fd00::1".parse::<IpAddr>().unwrap()]
    );
    let wide =
        r#"{"nftables": [{"set": {"elem": [{"prefix": {"addr": "10.1.0.0", "len": 24}}]}}]}"#;
    assert!(matches!(parse_set_elements(wide), Err(NftError::Parse(_))));
    assert!(matches!(
        parse_set_elements("not json"),
        Err(NftError::Parse(_))
    ));
}

#[test]
fn timeout_kills_slow_command() {
    let mut command = Command::new("sleep");
    command.arg("5");
    let started = Instant::now();
    let result = run_bounded(command, None, Duration::from_millis(200));
    assert!(
        matches!(&result, Err(NftError::Spawn(e)) if e.kind() == std::io::ErrorKind::TimedOut),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn missing_program_is_spawn_error() {
    let nft = Nft {
        program: "/nonexistent/nft".into(),
        netns: None,
    };
    assert!(matches!(
        nft.check("table inet x {}"),
        Err(NftError::Spawn(_))
    ));
}

// ---- against the real nft (root; CI runs as root with nftables installed) ----

fn assert_kernel_accepts(spec: &RulesetSpec) {
    let text = render(spec).unwrap();
    if let Err(err) = check(&text) {
        panic!("nft -c rejected the ruleset: {err}\n{text}");
    }
}

#[test]
fn nft_check_redirect_interfaces() {
    assert_kernel_accepts(&RulesetSpec {
        agent_sources: Vec::new(),
        ..homelab()
    });
}

#[test]
fn nft_check_redirect_sources_only() {
    assert_kernel_accepts(&RulesetSpec {
        agent_interfaces: Vec::new(),
        agent_sources: vec![
            "10.66.0.0/24".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
            "fd66::/64".parse().unwrap(),
        ],
        ipv6: true,
        ..homelab()
    });
}

#[test]
fn nft_check_tproxy_ipv6_with_killed() {
    assert_kernel_accepts(&tproxy_v6());
}

#[test]
fn nft_check_redirect_with_killed_no_optional_listeners() {
    assert_kernel_accepts(&RulesetSpec {
        explicit_port: None,
        dns_port: None,
        intercepted_ports: Vec::new(),
        killed: vec![
            "10.66.0.1".parse().unwrap(),
            "10.66.0.2".parse().unwrap(),
            "fd66::1".parse().unwrap(),
        ],
        ..homelab()
    });
}

#[test]
fn nft_check_bound_sources() {
    assert_kernel_accepts(&bound());
    assert_kernel_accepts(&RulesetSpec {
        interception: Interception::Tproxy,
        ..bound()
    });
}

#[test]
fn nft_check_rejects_garbage() {
    assert!(matches!(
        check("table inet portcullis { chain c { bogus } }"),
        Err(NftError::Nft { status: 1, .. })
    ));
}

/// A network namespace deleted on drop, so a failing test leaves nothing behind.
struct Netns(String);

impl Netns {
    fn create(tag: &str) -> Self {
        let name = format!("pcl-nfttest-{}-{tag}", std::process::id());
        run_timeout(&["ip", "netns", "add", &name]);
        Netns(name)
    }
    fn nft(&self) -> Nft {
        Nft {
            netns: Some(self.0.clone()),
            ..Nft::default()
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("timeout")
            .args(["10", "ip", "netns", "delete", &self.0])
            .status();
    }
}

fn run_timeout(args: &[&str]) -> String {
    let output = Command::new("timeout")
        .arg("10")
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn sorted(mut addrs: Vec<IpAddr>) -> Vec<IpAddr> {
    addrs.sort();
    addrs
}

#[test]
fn netns_apply_kill_list_remove() {
    let netns = Netns::create("kill");
    let nft = netns.nft();
    let spec = homelab();
    let text = render(&spec).unwrap();
    nft.apply(&text).unwrap();
    nft.apply(&text).unwrap(); // idempotent
    assert!(nft.list_killed().unwrap().is_empty());

    let v4: IpAddr = "10.66.0.42".parse().unwrap();
    let v6: IpAddr = "fd66::42".parse().unwrap();
    nft.add_killed(&[v4, v6]).unwrap();
    nft.add_killed(&[v4]).unwrap(); // re-adding is harmless
    assert_eq!(sorted(nft.list_killed().unwrap()), vec![v4, v6]);

    nft.remove_killed(&[v4, v6]).unwrap();
    assert!(nft.list_killed().unwrap().is_empty());
    nft.remove_killed(&[v4]).unwrap(); // "not in set" is ignored

    // A re-apply restores the killed list from the spec.
    let killed_spec = RulesetSpec {
        killed: vec![v4, v6],
        ..spec
    };
    nft.apply(&render(&killed_spec).unwrap()).unwrap();
    assert_eq!(sorted(nft.list_killed().unwrap()), vec![v4, v6]);
    nft.apply(&render(&killed_spec).unwrap()).unwrap();
    assert_eq!(sorted(nft.list_killed().unwrap()), vec![v4, v6]);

    // Exactly one portcullis table, with the named counters readable.
    let tables = run_timeout(&["ip", "netns", "exec", &netns.0, "nft", "list", "tables"]);
    assert_eq!(tables.trim(), "table inet portcullis");
    let counter = run_timeout(&[
        "ip",
        "netns",
        "exec",
        &netns.0,
        "nft",
        "list",
        "counter",
        "inet",
        TABLE,
        COUNTER_KILLED_DROPPED,
    ]);
    assert!(counter.contains("packets 0"), "{counter}");
}

/// Reads a named counter's packet count inside a namespace.
fn counter_packets(netns: &str, counter: &str) -> u64 {
    let text = run_timeout(&[
        "ip", "netns", "exec", netns, "nft", "list", "counter", "inet", TABLE, counter,
    ]);
    let after = &text[position(&text, "packets ") + "packets ".len()..];
    after.split_whitespace().next().unwrap().parse().unwrap()
}

/// Connects from the agent namespace with bash's /dev/tcp: `Some(true)` = connected,
/// `Some(false)` = refused (the packet reached the gateway's stack, nothing listens),
/// `None` = no answer within a second (dropped).
fn agent_connect(agent: &str, host: &str, port: u16) -> Option<bool> {
    let script = format!("exec 3<>/dev/tcp/{host}/{port}");
    let status = Command::new("timeout")
        .args(["1", "ip", "netns", "exec", agent, "bash", "-c", &script])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    match status.code() {
        Some(0) => Some(true),
        Some(124) => None,
        _ => Some(false),
    }
}

/// End to end on real packets: an agent namespace behind a veth named "vlan66" on a
/// gateway namespace that has a default route, so forwarding would happen without us.
#[test]
fn netns_traffic_is_confined() {
    let gateway = Netns::create("gw");
    let agent = Netns::create("agent");
    let (gw, ag) = (gateway.0.as_str(), agent.0.as_str());
    for args in [
        vec![
            "ip", "-n", gw, "link", "add", "vlan66", "type", "veth", "peer", "name", "eth0",
            "netns", ag,
        ],
        vec![
            "ip", "-n", gw, "link", "add", "up0", "type", "veth", "peer", "name", "up1",
        ],
        vec![
            "ip",
            "-n",
            gw,
            "addr",
            "add",
            "10.66.0.1/24",
            "dev",
            "vlan66",
        ],
        vec!["ip", "-n", gw, "addr", "add", "192.0.2.1/24", "dev", "up0"],
        vec!["ip", "-n", gw, "link", "set", "lo", "up"],
        vec!["ip", "-n", gw, "link", "set", "vlan66", "up"],
        vec!["ip", "-n", gw, "link", "set", "up0", "up"],
        vec!["ip", "-n", gw, "link", "set", "up1", "up"],
        vec![
            "ip",
            "-n",
            gw,
            "route",
            "add",
            "default",
            "via",
            "192.0.2.2",
        ],
        vec![
            "ip",
            "netns",
            "exec",
            gw,
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/ip_forward",
        ],
        vec!["ip", "-n", ag, "addr", "add", "10.66.0.2/24", "dev", "eth0"],
        vec!["ip", "-n", ag, "link", "set", "lo", "up"],
        vec!["ip", "-n", ag, "link", "set", "eth0", "up"],
        vec![
            "ip",
            "-n",
            ag,
            "route",
            "add",
            "default",
            "via",
            "10.66.0.1",
        ],
    ] {
        run_timeout(&args);
    }
    let nft = gateway.nft();
    let spec = RulesetSpec {
        agent_sources: Vec::new(),
        dns_port: Some(5353),
        ..homelab()
    };
    nft.apply(&render(&spec).unwrap()).unwrap();

    // Redirected to the transparent port and explicit port allowed: refused, not dropped.
    assert_eq!(agent_connect(ag, "198.51.100.7", 443), Some(false));
    assert_eq!(agent_connect(ag, "198.51.100.7", 80), Some(false));
    assert_eq!(agent_connect(ag, "10.66.0.1", 3128), Some(false));
    // Anything else to the gateway is dropped and counted.
    assert_eq!(agent_connect(ag, "10.66.0.1", 22), None);
    assert!(counter_packets(gw, COUNTER_INPUT_DROPPED) > 0);
    // Never routed around the proxy.
    assert_eq!(agent_connect(ag, "198.51.100.7", 22), None);
    assert!(counter_packets(gw, COUNTER_FORWARD_DROPPED) > 0);

    // Kill switch bites, and lifting it restores service.
    let agent_addr: IpAddr = "10.66.0.2".parse().unwrap();
    nft.add_killed(&[agent_addr]).unwrap();
    assert_eq!(agent_connect(ag, "198.51.100.7", 443), None);
    assert!(counter_packets(gw, COUNTER_KILLED_DROPPED) > 0);
    nft.remove_killed(&[agent_addr]).unwrap();
    assert_eq!(agent_connect(ag, "198.51.100.7", 443), Some(false));
}

#[test]
fn netns_apply_tproxy() {
    let netns = Netns::create("tproxy");
    let nft = netns.nft();
    let text = render(&tproxy_v6()).unwrap();
    nft.apply(&text).unwrap();
    nft.apply(&text).unwrap();
    assert_eq!(nft.list_killed().unwrap().len(), 2);
}

#[test]
fn sync_killed_works_on_a_table_without_the_mac_set() {
    let ns = Netns::create("oldtable");
    let nft = ns.nft();
    nft.apply(&format!(
        "table inet {TABLE} {{\n\tset {KILL_SET_V4} {{ type ipv4_addr; flags interval; }}\n\
         \tset {KILL_SET_V6} {{ type ipv6_addr; flags interval; }}\n}}\n"
    ))
    .unwrap();
    let killed: IpAddr = "10.66.0.11".parse().unwrap();
    nft.sync_killed(&[killed.into()], &[mac("02:00:00:00:00:11")])
        .unwrap();
    assert_eq!(nft.list_killed().unwrap(), vec![killed]);
}

#[test]
fn netns_remove_without_table_fails() {
    let netns = Netns::create("notable");
    let nft = netns.nft();
    let result = nft.remove_killed(&["10.0.0.1".parse().unwrap()]);
    assert!(matches!(result, Err(NftError::Nft { .. })), "{result:?}");
}

#[test]
fn sync_killed_mirrors_the_state_with_overlaps() {
    let ns = Netns::create("sync");
    let nft = ns.nft();
    nft.apply(&render(&homelab()).unwrap()).unwrap();
    let nets: Vec<ipnet::IpNet> = ["10.66.0.11/32", "10.66.0.0/24", "fd66::11/128"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    nft.sync_killed(&nets, &[]).unwrap();
    let out = run_timeout(&[
        "ip",
        "netns",
        "exec",
        &ns.0,
        "nft",
        "list",
        "set",
        "inet",
        TABLE,
        KILL_SET_V4,
    ]);
    assert!(out.contains("10.66.0.0/24"), "{out}");
    nft.sync_killed(&nets[..1], &[]).unwrap();
    assert_eq!(
        nft.list_killed().unwrap(),
        vec!["10.66.0.11".parse::<IpAddr>().unwrap()]
    );
    let macs = [mac("02:00:00:00:00:11"), mac("02:00:00:00:00:12")];
    nft.sync_killed(&nets[..1], &[macs[1], macs[0], macs[1]])
        .unwrap();
    let list_macs = || {
        run_timeout(&[
            "ip",
            "netns",
            "exec",
            &ns.0,
            "nft",
            "list",
            "set",
            "inet",
            TABLE,
            KILL_SET_MAC,
        ])
    };
    let listed = list_macs();
    assert!(
        listed.contains("02:00:00:00:00:11") && listed.contains("02:00:00:00:00:12"),
        "{listed}"
    );
    nft.sync_killed(&nets[..1], &macs[..1]).unwrap();
    assert!(
        !list_macs().contains("02:00:00:00:00:12"),
        "{}",
        list_macs()
    );
    nft.sync_killed(&[], &[]).unwrap();
    assert!(nft.list_killed().unwrap().is_empty());
    assert!(!list_macs().contains("elements"), "{}", list_macs());
}

/// Each binding shape on real packets: an agent namespace behind "vlan66" (MAC
/// 02:00:00:00:00:02), its source bound by interface, by MAC and by both, rightly and
/// wrongly. Bound rightly, its connection to the explicit port is refused by the stack (it
/// got through); bound wrongly, it is dropped and counted as spoofed.
#[test]
fn netns_bindings_on_real_packets() {
    let gateway = Netns::create("bindgw");
    let agent = Netns::create("bindag");
    let (gw, ag) = (gateway.0.as_str(), agent.0.as_str());
    for args in [
        vec![
            "ip", "-n", gw, "link", "add", "vlan66", "type", "veth", "peer", "name", "eth0",
            "netns", ag,
        ],
        vec![
            "ip", "-n", gw, "link", "add", "vlan67", "type", "veth", "peer", "name", "vlan67p",
        ],
        vec![
            "ip",
            "-n",
            gw,
            "addr",
            "add",
            "10.66.0.1/24",
            "dev",
            "vlan66",
        ],
        vec!["ip", "-n", gw, "link", "set", "vlan66", "up"],
        vec!["ip", "-n", gw, "link", "set", "vlan67", "up"],
        vec![
            "ip",
            "-n",
            ag,
            "link",
            "set",
            "eth0",
            "address",
            "02:00:00:00:00:02",
        ],
        vec!["ip", "-n", ag, "addr", "add", "10.66.0.2/24", "dev", "eth0"],
        vec!["ip", "-n", ag, "link", "set", "eth0", "up"],
    ] {
        run_timeout(&args);
    }
    let nft = gateway.nft();
    let net: IpNet = "10.66.0.2/32".parse().unwrap();
    let cases = [
        (Some("vlan66"), None, true),
        (Some("vlan67"), None, false),
        (None, Some("02:00:00:00:00:02"), true),
        (None, Some("02:00:00:00:00:03"), false),
        (Some("vlan66"), Some("02:00:00:00:00:02"), true),
        (Some("vlan67"), Some("02:00:00:00:00:02"), false),
        (Some("vlan66"), Some("02:00:00:00:00:03"), false),
    ];
    for (interface, m, passes) in cases {
        let spec = RulesetSpec {
            agent_interfaces: vec!["vlan66".into(), "vlan67".into()],
            bindings: vec![SourceBinding {
                net,
                interface: interface.map(Into::into),
                mac: m.map(mac),
            }],
            ..homelab()
        };
        nft.apply(&render(&spec).unwrap()).unwrap();
        let reached = agent_connect(ag, "10.66.0.1", 3128);
        let dropped = counter_packets(gw, COUNTER_SPOOFED_DROPPED);
        if passes {
            assert_eq!(reached, Some(false), "{interface:?} {m:?}");
            assert_eq!(dropped, 0, "{interface:?} {m:?}");
        } else {
            assert_eq!(reached, None, "{interface:?} {m:?}");
            assert!(dropped > 0, "{interface:?} {m:?}");
        }
    }
}
