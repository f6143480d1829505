//! Tests of the rendered ruleset: its shape, its validation, `nft -c` acceptance (root),
//! and applying and editing it inside a private network namespace (root).

use super::*;

fn spec() -> RulesetSpec {
    RulesetSpec {
        agent_interfaces: vec!["vlan66".into()],
        agent_sources: vec![
            "10.66.0.0/24".parse().unwrap(),
            "fd66::/64".parse().unwrap(),
        ],
        interception: Interception::Redirect,
        transparent_port: 15001,
        intercepted_ports: vec![80, 443],
        explicit_port: Some(3128),
        dns_port: Some(53),
        ipv6: false,
        tproxy_mark: 1,
        killed: vec![],
    }
}

#[test]
fn kill_guard_comes_before_diversion_and_forward_is_dropped() {
    let text = render(&spec()).unwrap();
    let kill = text.find("ip saddr @kill_sources_v4").unwrap();
    let divert = text.find("redirect to :15001").unwrap();
    assert!(kill < divert);
    assert!(text.contains("priority raw"));
    assert!(text.contains("chain forward"));
    assert!(text.contains("iifname { \"vlan66\" } counter name agent_forward_dropped drop"));
    assert!(text.contains("oifname { \"vlan66\" } counter name agent_forward_dropped drop"));
    // IPv6 not intercepted: dropped at input, never redirected.
    assert!(text.contains("meta nfproto ipv6 counter name agent_input_dropped drop"));
    let divert = &text[text.find("chain divert").unwrap()..text.find("chain input").unwrap()];
    assert!(!divert.contains("ip6"), "{divert}");
    assert!(text.starts_with("# portcullis ruleset"));
    assert!(text.contains("table inet portcullis {}\ndelete table inet portcullis\n"));
}

#[test]
fn killed_addresses_are_rendered_into_the_sets() {
    let mut s = spec();
    s.killed = vec!["10.66.0.11".parse().unwrap(), "fd66::11".parse().unwrap()];
    let text = render(&s).unwrap();
    assert!(text.contains(
        "set kill_sources_v4 { type ipv4_addr; flags interval; elements = { 10.66.0.11 }; }"
    ));
    assert!(text.contains("elements = { fd66::11 }"));
}

#[test]
fn specs_that_could_inject_or_conflict_are_refused() {
    let mut s = spec();
    s.agent_interfaces = vec!["eth0\" } accept; #".into()];
    assert!(matches!(render(&s), Err(NftError::Spec(_))));
    let mut s = spec();
    s.explicit_port = Some(15001);
    assert!(render(&s).is_err());
    let mut s = spec();
    s.agent_interfaces.clear();
    s.agent_sources.clear();
    assert!(render(&s).is_err());
    let mut s = spec();
    s.intercepted_ports.clear();
    assert!(render(&s).is_err());
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A throwaway network namespace, removed on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        assert!(
            is_root(),
            "nftables tests need root: run `bash tests/run.sh` as root (CI does)"
        );
        let name = format!("pcl-nft-{tag}-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip netns add {name}");
        Self(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn nft_accepts_every_variant() {
    let ns = Netns::new("check");
    let nft = Nft {
        program: "nft".into(),
        netns: Some(ns.0.clone()),
    };
    let mut variants = vec![spec()];
    let mut s = spec();
    s.agent_interfaces.clear();
    s.dns_port = None;
    variants.push(s);
    let mut s = spec();
    s.interception = Interception::Tproxy;
    s.ipv6 = true;
    variants.push(s);
    let mut s = spec();
    s.killed = vec!["10.66.0.11".parse().unwrap(), "fd66::11".parse().unwrap()];
    s.ipv6 = true;
    variants.push(s);
    for (i, v) in variants.iter().enumerate() {
        let text = render(v).unwrap();
        if let Err(e) = nft.check(&text) {
            panic!("variant {i} rejected by nft -c: {e}\n{text}");
        }
    }
}

#[test]
fn apply_is_idempotent_and_kill_sets_are_editable() {
    let ns = Netns::new("apply");
    let nft = Nft {
        program: "nft".into(),
        netns: Some(ns.0.clone()),
    };
    let text = render(&spec()).unwrap();
    nft.apply(&text).unwrap();
    nft.apply(&text).unwrap();
    let a: IpAddr = "10.66.0.11".parse().unwrap();
    let b: IpAddr = "fd66::11".parse().unwrap();
    nft.add_killed(&[a, b]).unwrap();
    let mut listed = nft.list_killed().unwrap();
    listed.sort();
    assert_eq!(listed, vec![a, b]);
    nft.remove_killed(&[a, b, "10.66.0.99".parse().unwrap()])
        .unwrap();
    assert!(nft.list_killed().unwrap().is_empty());
    // Re-applying with killed addresses keeps them in the sets.
    let mut s = spec();
    s.killed = vec![a];
    nft.apply(&render(&s).unwrap()).unwrap();
    assert_eq!(nft.list_killed().unwrap(), vec![a]);
}
