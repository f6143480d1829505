//! Raw rules → [`Policy`]. Every check of the rules happens here, once; errors are collected
//! (not just the first) and each names file, line and key.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use toml::Spanned;

use super::binding::{MacAddr, SourceBinding, valid_interface_name};
use super::credentials::parse_argon2id;
use super::domain::DomainName;
use super::http::{HttpAction, HttpRule, HttpRules, PathPattern, host_pattern, valid_method};
use super::pattern::{DomainPattern, DomainSet, Ports, Rule, Scope};
use super::rules::{
    RawAgent, RawCredentials, RawHttpRule, RawLimits, RawList, RawSource, RulesSources,
    SourceError, SourceFile,
};
use super::{
    AgentId, AgentPolicy, CidrRule, Credentials, Limits, PasswordCheck, Policy, UNKNOWN_AGENT,
    address,
};

/// All errors found while compiling; never empty.
#[derive(Debug, Clone)]
pub struct CompileErrors(pub Vec<SourceError>);

impl fmt::Display for CompileErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for CompileErrors {}

struct CompiledList {
    allow: Arc<DomainSet>,
    deny: Arc<DomainSet>,
}

/// Compile read rules files into a policy with the given generation number.
pub fn compile(
    sources: &RulesSources,
    default_ports: &[u16],
    generation: u64,
) -> Result<Policy, CompileErrors> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let mut lists: HashMap<String, CompiledList> = HashMap::new();
    for file in &sources.lists {
        let Some(raw) = parse_or_push::<RawList>(file, &mut errors) else {
            continue;
        };
        let stem = file_stem(file);
        let label = rel_label(file);
        let allow = compile_patterns(file, &label, "allow", &raw.allow, &mut errors);
        let deny = compile_patterns(file, &label, "deny", &raw.deny, &mut errors);
        let _ = raw.description;
        lists.insert(
            stem,
            CompiledList {
                allow: Arc::new(allow),
                deny: Arc::new(deny),
            },
        );
    }

    let mut policy = Policy::deny_all(generation);
    policy.default_ports = default_ports.into();
    let mut source_owner: Vec<(IpNet, Arc<str>, &SourceFile, usize)> = Vec::new();
    for file in &sources.agents {
        let Some(raw) = parse_or_push::<RawAgent>(file, &mut errors) else {
            continue;
        };
        let label = rel_label(file);
        let name = raw.name.get_ref().clone();
        if !valid_agent_name(&name) {
            errors.push(file.error_at(
                raw.name.span().start,
                "name",
                format!("agent name `{name}` must be 1-64 of [a-z0-9_-], start alphanumeric, and not be `{UNKNOWN_AGENT}`"),
            ));
            continue;
        }
        let name: Arc<str> = Arc::from(name.as_str());
        if policy.by_name.contains_key(&name) {
            errors.push(file.error_at(
                raw.name.span().start,
                "name",
                format!("agent `{name}` is defined twice"),
            ));
            continue;
        }

        let mut allow = vec![Arc::new(compile_patterns(
            file,
            &label,
            "allow",
            &raw.allow,
            &mut errors,
        ))];
        let mut deny = vec![Arc::new(compile_patterns(
            file,
            &label,
            "deny",
            &raw.deny,
            &mut errors,
        ))];
        for inc in &raw.include {
            match lists.get(inc.get_ref().as_str()) {
                Some(list) => {
                    allow.push(list.allow.clone());
                    deny.push(list.deny.clone());
                }
                None => errors.push(file.error_at(
                    inc.span().start,
                    "include",
                    format!("no list `{}` in rules/lists/", inc.get_ref()),
                )),
            }
        }
        allow.retain(|s| !s.is_empty());
        deny.retain(|s| !s.is_empty());

        let mut sources_nets = Vec::new();
        let mut bindings = Vec::new();
        for s in &raw.sources {
            let Some((net, binding)) = compile_source(file, s, &mut errors) else {
                continue;
            };
            if let Some((_, owner, _, _)) = source_owner
                .iter()
                .find(|(other, ..)| nets_overlap(&net, other))
            {
                errors.push(file.error_at(
                    s.span().start,
                    "sources",
                    format!("`{net}` overlaps a source of agent `{owner}`: an address must identify one agent"),
                ));
            } else {
                source_owner.push((net, name.clone(), file, s.span().start));
            }
            sources_nets.push(net);
            bindings.extend(binding);
        }

        let mut allow_cidrs = Vec::new();
        for c in &raw.allow_cidrs {
            match parse_cidr_rule(c.get_ref()) {
                Some((net, port)) => allow_cidrs.push(CidrRule {
                    net,
                    port,
                    rule: Arc::from(format!("{label}:allow_cidrs:{}", c.get_ref())),
                }),
                None => errors.push(file.error_at(
                    c.span().start,
                    "allow_cidrs",
                    format!("`{}` is not a CIDR (optionally with :port)", c.get_ref()),
                )),
            }
        }
        let mut resolve_cidrs = Vec::new();
        for c in &raw.resolve_cidrs {
            let text = c.get_ref();
            match parse_net(text) {
                Some(net) => resolve_cidrs.push(CidrRule {
                    net,
                    port: None,
                    rule: Arc::from(format!("{label}:resolve_cidrs:{text}")),
                }),
                None => errors.push(file.error_at(
                    c.span().start,
                    "resolve_cidrs",
                    if parse_cidr_rule(text).is_some() {
                        format!("`{text}`: resolve_cidrs take no port (the name's allow rule decides the port)")
                    } else {
                        format!("`{text}` is not a CIDR")
                    },
                )),
            }
        }
        let limits = raw
            .limits
            .as_ref()
            .map(|l| compile_limits(file, l, &mut errors))
            .unwrap_or_default();
        let credentials = raw
            .credentials
            .as_ref()
            .and_then(|c| compile_credentials(file, c, &mut errors, &mut warnings));
        if let Some(c) = &credentials
            && policy.by_username.contains_key(&c.username)
        {
            errors.push(
                file.error_at(
                    raw.credentials
                        .as_ref()
                        .map(|c| c.get_ref().username.span().start)
                        .unwrap_or(0),
                    "credentials.username",
                    format!("username `{}` is used by another agent", c.username),
                ),
            );
        }

        let inspect = compile_patterns(file, &label, "inspect", &raw.inspect, &mut errors);
        check_inspect_allowed(
            file,
            &raw.inspect,
            &allow,
            &deny,
            default_ports,
            &mut errors,
        );
        let http = compile_http(
            file,
            &label,
            &raw.http,
            &inspect,
            &mut errors,
            &mut warnings,
        );

        let id = AgentId(policy.agents.len() as u32);
        policy.by_name.insert(name.clone(), id);
        for net in &sources_nets {
            if net.prefix_len() == net.max_prefix_len() {
                policy.by_host_source.insert(net.addr(), id);
            } else {
                policy.by_net_source.push((*net, id));
            }
        }
        if let Some(c) = &credentials {
            policy.by_username.entry(c.username.clone()).or_insert(id);
        }
        policy.agents.push(AgentPolicy {
            name,
            sources: sources_nets,
            bindings,
            allow,
            deny,
            allow_cidrs,
            resolve_cidrs,
            deny_ech: raw.deny_ech,
            allow_missing_sni: raw.allow_missing_sni,
            limits,
            credentials,
            inspect,
            inspect_patterns: raw
                .inspect
                .iter()
                .filter_map(|p| DomainPattern::parse(p.get_ref()).ok())
                .collect(),
            http,
        });
    }
    if errors.is_empty() {
        policy.warnings = warnings;
        Ok(policy)
    } else {
        Err(CompileErrors(errors))
    }
}

/// One `sources` entry: the network, and its binding when it names an interface or a MAC.
/// Each bad value is reported at its own line.
fn compile_source(
    file: &SourceFile,
    raw: &Spanned<RawSource>,
    errors: &mut Vec<SourceError>,
) -> Option<(IpNet, Option<SourceBinding>)> {
    let not_a_net = |text: &str, at: usize| {
        file.error_at(at, "sources", format!("`{text}` is not an address or CIDR"))
    };
    let bound = match raw.get_ref() {
        RawSource::Net(text) => {
            let Some(net) = parse_net(text) else {
                errors.push(not_a_net(text, raw.span().start));
                return None;
            };
            return Some((net, None));
        }
        RawSource::Bound(bound) => bound,
    };
    let net = parse_net(bound.net.get_ref());
    if net.is_none() {
        errors.push(not_a_net(bound.net.get_ref(), bound.net.span().start));
    }
    let mut valid = net.is_some();
    let interface = bound.interface.as_ref().map(|i| i.get_ref().clone());
    if let Some(i) = &bound.interface
        && !valid_interface_name(i.get_ref())
    {
        errors.push(file.error_at(
            i.span().start,
            "sources.interface",
            format!(
                "`{}` is not an interface name: 1-15 of [A-Za-z0-9_.-]",
                i.get_ref()
            ),
        ));
        valid = false;
    }
    let mut mac = None;
    if let Some(m) = &bound.mac {
        match m.get_ref().parse::<MacAddr>() {
            Ok(parsed) => mac = Some(parsed),
            Err(e) => {
                errors.push(file.error_at(
                    m.span().start,
                    "sources.mac",
                    format!("`{}` {e}", m.get_ref()),
                ));
                valid = false;
            }
        }
    }
    let net = net.filter(|_| valid)?;
    let binding = (interface.is_some() || mac.is_some()).then_some(SourceBinding {
        net,
        interface,
        mac,
    });
    Some((net, binding))
}

fn parse_or_push<T: serde::de::DeserializeOwned>(
    file: &SourceFile,
    errors: &mut Vec<SourceError>,
) -> Option<T> {
    match file.parse::<T>() {
        Ok(v) => Some(v),
        Err(e) => {
            errors.push(e);
            None
        }
    }
}

fn file_stem(file: &SourceFile) -> String {
    file.path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `agents/coder-1.toml` / `lists/github.toml`: short enough for a log field.
fn rel_label(file: &SourceFile) -> String {
    let dir = file
        .path
        .parent()
        .and_then(|p| p.file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = file
        .path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{dir}/{name}")
}

fn compile_patterns(
    file: &SourceFile,
    label: &str,
    key: &str,
    patterns: &[Spanned<String>],
    errors: &mut Vec<SourceError>,
) -> DomainSet {
    let mut set = DomainSet::default();
    for p in patterns {
        match DomainPattern::parse(p.get_ref()) {
            Ok(pattern) => set.insert(
                &pattern,
                Rule {
                    name: Arc::from(format!("{label}:{key}:{}", p.get_ref())),
                },
            ),
            Err(e) => {
                errors.push(file.error_at(p.span().start, key, format!("`{}`: {e}", p.get_ref())))
            }
        }
    }
    set
}

/// Each `inspect` pattern must name destinations the agent may reach: every name it covers,
/// on the port it names (or the default ports), allowed and not denied. A wildcard is probed
/// with a label no rule names, so only a wildcard allow rule can cover it.
fn check_inspect_allowed(
    file: &SourceFile,
    raw: &[Spanned<String>],
    allow: &[Arc<DomainSet>],
    deny: &[Arc<DomainSet>],
    default_ports: &[u16],
    errors: &mut Vec<SourceError>,
) {
    const PROBE: &str = "portcullis-inspect-probe";
    for p in raw {
        let Ok(pattern) = DomainPattern::parse(p.get_ref()) else {
            continue; // already reported
        };
        let mut names = Vec::new();
        if pattern.scope != Scope::Subdomains {
            names.push(pattern.base.clone());
        }
        if pattern.scope != Scope::Exact
            && let Ok(n) = DomainName::parse(&format!("{PROBE}.{}", pattern.base))
        {
            names.push(n);
        }
        let ports: Vec<u16> = match pattern.ports {
            Ports::Only(port) => vec![port],
            Ports::Default => default_ports.to_vec(),
        };
        let allowed = |name: &DomainName, port: u16| {
            !deny.iter().any(|s| s.find(name, port, |_| true).is_some())
                && allow
                    .iter()
                    .any(|s| s.find(name, port, |q| default_ports.contains(&q)).is_some())
        };
        let missing = names
            .iter()
            .flat_map(|n| ports.iter().map(move |&port| (n, port)))
            .find(|(n, port)| !allowed(n, *port));
        if let Some((n, port)) = missing {
            let shown = n.as_str().replace(PROBE, "*");
            errors.push(file.error_at(
                p.span().start,
                "inspect",
                format!(
                    "`{}`: {shown}:{port} is not allowed to this agent (an inspected name must also be allowed)",
                    p.get_ref()
                ),
            ));
        }
    }
}

/// `[[http]]` tables: each host must be inspected (a rule for a passthrough host could
/// never apply), methods are upper-case tokens, paths are patterns in normal form.
fn compile_http(
    file: &SourceFile,
    label: &str,
    raw: &[Spanned<RawHttpRule>],
    inspect: &DomainSet,
    errors: &mut Vec<SourceError>,
    warnings: &mut Vec<SourceError>,
) -> HttpRules {
    let mut rules = Vec::new();
    let mut starts = Vec::new();
    for (i, spanned) in raw.iter().enumerate() {
        let r = spanned.get_ref();
        let mut ok = true;
        let host = match host_pattern(r.host.get_ref()) {
            Ok(h) => Some(h),
            Err(e) => {
                errors.push(file.error_at(
                    r.host.span().start,
                    "http.host",
                    format!("`{}`: {e}", r.host.get_ref()),
                ));
                None
            }
        };
        if let Some(h) = &host {
            // A probe name under the pattern (or the name itself) must be inspected.
            let probe = match h.scope {
                Scope::Exact => Some(h.base.clone()),
                _ => DomainName::parse(&format!("portcullis-inspect-probe.{}", h.base)).ok(),
            };
            if !probe.is_some_and(|n| inspect.covers_name(&n)) {
                errors.push(file.error_at(
                    r.host.span().start,
                    "http.host",
                    format!(
                        "`{}` is not inspected by this agent (add it to `inspect`): the rule could never apply",
                        r.host.get_ref()
                    ),
                ));
                ok = false;
            }
        }
        let mut methods = Vec::new();
        for m in &r.methods {
            if valid_method(m.get_ref()) {
                methods.push(Box::from(m.get_ref().as_str()));
            } else {
                errors.push(file.error_at(
                    m.span().start,
                    "http.methods",
                    format!(
                        "`{}` is not a method (upper case, like \"GET\")",
                        m.get_ref()
                    ),
                ));
                ok = false;
            }
        }
        let mut paths = Vec::new();
        for p in &r.paths {
            match PathPattern::parse(p.get_ref()) {
                Ok(pp) => paths.push(pp),
                Err(e) => {
                    errors.push(file.error_at(
                        p.span().start,
                        "http.paths",
                        format!("`{}`: {e}", p.get_ref()),
                    ));
                    ok = false;
                }
            }
        }
        let action = match r.action.as_ref().map(|a| a.get_ref().as_str()) {
            None | Some("allow") => HttpAction::Allow,
            Some("deny") => HttpAction::Deny,
            Some(other) => {
                errors.push(
                    file.error_at(
                        r.action
                            .as_ref()
                            .map_or(spanned.span().start, |a| a.span().start),
                        "http.action",
                        format!("`{other}`: \"allow\" or \"deny\""),
                    ),
                );
                ok = false;
                HttpAction::Allow
            }
        };
        if let (Some(host), true) = (host, ok) {
            rules.push(HttpRule {
                host,
                methods,
                paths,
                action,
                name: Arc::from(format!("{label}:http[{i}]")),
            });
            starts.push(spanned.span().start);
        }
    }
    // A host with only deny rules allows nothing: any rule makes its host an allowlist.
    for (r, &at) in rules.iter().zip(&starts) {
        let has_allow = rules
            .iter()
            .any(|o| o.action == HttpAction::Allow && o.host.base == r.host.base);
        if r.action == HttpAction::Deny && !has_allow {
            warnings.push(file.error_at(
                at,
                "http.action",
                format!(
                    "`{}` has deny rules and no allow rule: every request to it is refused (a host with any rule allows only what an allow rule matches)",
                    r.host
                ),
            ));
        }
    }
    HttpRules { rules }
}

fn valid_agent_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name != UNKNOWN_AGENT
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// An address (host route) or a CIDR; host bits must be zero, so `10.0.0.1/8` is an error.
fn parse_net(s: &str) -> Option<IpNet> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(IpNet::from(address::canonical(ip)));
    }
    let net: IpNet = s.parse().ok()?;
    (net.trunc() == net).then_some(net)
}

/// `cidr` or `cidr:port` (the port after the prefix length, so v6 colons do not confuse it).
fn parse_cidr_rule(s: &str) -> Option<(IpNet, Option<u16>)> {
    if let Some((net, rest)) = s.split_once('/')
        && let Some((len, port)) = rest.split_once(':')
    {
        let port: u16 = port.parse().ok().filter(|&p| p != 0)?;
        return Some((parse_net(&format!("{net}/{len}"))?, Some(port)));
    }
    Some((parse_net(s)?, None))
}

fn nets_overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn compile_limits(file: &SourceFile, raw: &RawLimits, errors: &mut Vec<SourceError>) -> Limits {
    let mut size = |v: &Option<Spanned<String>>, key: &str, per_second: bool| -> Option<u64> {
        let v = v.as_ref()?;
        match parse_size(v.get_ref(), per_second) {
            Some(n) => Some(n),
            None => {
                errors.push(file.error_at(
                    v.span().start,
                    key,
                    format!(
                        "`{}` is not a size like \"50 MiB{}\"",
                        v.get_ref(),
                        if per_second { "/s" } else { "" }
                    ),
                ));
                None
            }
        }
    };
    Limits {
        bandwidth_bytes_per_second: size(&raw.bandwidth, "limits.bandwidth", true),
        daily_bytes: size(&raw.daily_bytes, "limits.daily_bytes", false),
        new_connections_per_second: raw
            .new_connections_per_second
            .as_ref()
            .map(|v| *v.get_ref()),
        burst: raw.burst.as_ref().map(|v| *v.get_ref()),
        max_concurrent: raw.max_concurrent.as_ref().map(|v| *v.get_ref()),
    }
}

/// `"50 MiB"`, `"1.5GB"`, `"1024"`; with `per_second`, a `/s` suffix is required.
pub(crate) fn parse_size(s: &str, per_second: bool) -> Option<u64> {
    let s = s.trim();
    let s = if per_second {
        s.strip_suffix("/s")?.trim_end()
    } else {
        s
    };
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let v = num * mult;
    (v.is_finite() && v >= 1.0 && v < u64::MAX as f64).then_some(v as u64)
}

fn compile_credentials(
    file: &SourceFile,
    raw: &Spanned<RawCredentials>,
    errors: &mut Vec<SourceError>,
    warnings: &mut Vec<SourceError>,
) -> Option<Credentials> {
    let c = raw.get_ref();
    let username = c.username.get_ref();
    if username.is_empty() || username.contains(':') {
        errors.push(file.error_at(
            c.username.span().start,
            "credentials.username",
            "must be non-empty and contain no `:`",
        ));
        return None;
    }
    let password = match (&c.password_hash, &c.password_sha256) {
        (Some(h), Some(_)) => {
            errors.push(file.error_at(
                h.span().start,
                "credentials.password_hash",
                "give password_hash or password_sha256, not both",
            ));
            return None;
        }
        (None, None) => {
            errors.push(file.error_at(
                raw.span().start,
                "credentials.password_hash",
                "missing: an argon2id PHC string (docs/proxy-auth.md)",
            ));
            return None;
        }
        (Some(h), None) => match parse_argon2id(h.get_ref()) {
            Ok(parsed) => {
                if let Some(weak) = parsed.weak {
                    warnings.push(file.error_at(h.span().start, "credentials.password_hash", weak));
                }
                parsed.check
            }
            Err(e) => {
                errors.push(file.error_at(
                    h.span().start,
                    "credentials.password_hash",
                    e.to_string(),
                ));
                return None;
            }
        },
        (None, Some(sha)) => {
            let mut hash = [0u8; 32];
            if hex::decode_to_slice(sha.get_ref(), &mut hash).is_err() {
                errors.push(file.error_at(
                    sha.span().start,
                    "credentials.password_sha256",
                    "must be 64 hex digits: printf %s \"$PASSWORD\" | sha256sum",
                ));
                return None;
            }
            warnings.push(file.error_at(
                sha.span().start,
                "credentials.password_sha256",
                "unsalted SHA-256 is cheap to guess offline if the rules leak: replace it with password_hash, an argon2id PHC string (docs/proxy-auth.md)",
            ));
            PasswordCheck::Sha256(hash)
        }
    };
    Some(Credentials {
        username: username.clone(),
        password,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("50 MiB/s", true), Some(50 * 1024 * 1024));
        assert_eq!(parse_size("20 GiB", false), Some(20 * 1024 * 1024 * 1024));
        assert_eq!(parse_size("20 GiB", true), None);
        assert_eq!(parse_size("lots", false), None);
    }

    fn agent_file(text: &str) -> RulesSources {
        RulesSources {
            agents: vec![SourceFile {
                path: "rules/agents/a.toml".into(),
                text: text.to_owned(),
            }],
            lists: Vec::new(),
        }
    }

    fn errors_of(text: &str) -> Vec<String> {
        match compile(&agent_file(text), &[443], 1) {
            Ok(_) => panic!("{text:?} compiled"),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn sources_bound_to_interface_and_mac() {
        let text = "name = \"a\"\nsources = [\n  \"10.66.2.0/28\",\n  \
                    { net = \"10.66.0.11\", interface = \"vlan66\", mac = \"02:00:00:00:00:1A\" },\n  \
                    { net = \"fd66::11/128\", mac = \"02:00:00:00:00:1a\" },\n  \
                    { net = \"10.66.1.0/24\", interface = \"vlan67\" },\n]\n";
        let policy = compile(&agent_file(text), &[443], 1).unwrap();
        let (_, a) = policy.agents().next().unwrap();
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(
            a.sources,
            [
                net("10.66.2.0/28"),
                net("10.66.0.11/32"),
                net("fd66::11/128"),
                net("10.66.1.0/24")
            ]
        );
        let mac = MacAddr([2, 0, 0, 0, 0, 0x1a]);
        assert_eq!(
            a.bindings,
            [
                SourceBinding {
                    net: net("10.66.0.11/32"),
                    interface: Some("vlan66".into()),
                    mac: Some(mac),
                },
                SourceBinding {
                    net: net("fd66::11/128"),
                    interface: None,
                    mac: Some(mac),
                },
                SourceBinding {
                    net: net("10.66.1.0/24"),
                    interface: Some("vlan67".into()),
                    mac: None,
                },
            ]
        );
        // A bound source identifies its agent like a plain one.
        assert!(
            policy
                .agent_by_source("10.66.0.11".parse().unwrap())
                .is_some()
        );
        // A table without interface or mac is a plain source.
        let plain = compile(
            &agent_file("name = \"a\"\nsources = [{ net = \"10.0.0.1\" }]\n"),
            &[443],
            1,
        )
        .unwrap();
        let (_, a) = plain.agents().next().unwrap();
        assert_eq!(a.sources, [net("10.0.0.1/32")]);
        assert!(a.bindings.is_empty());
    }

    #[test]
    fn source_binding_errors_name_their_line() {
        let file = "rules/agents/a.toml";
        let cases = [
            (
                "name = \"a\"\nsources = [\n  { net = \"10.0.0.1\", mac = \"02:00:00:00:00\" },\n]\n",
                format!("{file}:3: key `sources.mac`: `02:00:00:00:00` must be six hex octets"),
            ),
            (
                "name = \"a\"\n[[sources]]\nnet = \"10.0.0.1\"\nmac = \"ff:ff:ff:ff:ff:ff\"\n",
                format!("{file}:4: key `sources.mac`: `ff:ff:ff:ff:ff:ff` is a multicast"),
            ),
            (
                "name = \"a\"\n[[sources]]\nnet = \"10.0.0.1\"\ninterface = \"\"\n",
                format!("{file}:4: key `sources.interface`: `` is not an interface name"),
            ),
            (
                "name = \"a\"\n[[sources]]\nnet = \"10.0.0.1\"\ninterface = \"vlan66 }\"\n",
                format!("{file}:4: key `sources.interface`: `vlan66 }}` is not an interface name"),
            ),
            (
                "name = \"a\"\n[[sources]]\ninterface = \"vlan66\"\nnet = \"10.0.0.1/8\"\n",
                format!("{file}:4: key `sources`: `10.0.0.1/8` is not an address or CIDR"),
            ),
            (
                "name = \"a\"\nsources = [\n  { net = \"10.0.0.1\", iface = \"vlan66\" },\n]\n",
                format!("{file}:3: key `iface`: unknown field `iface`"),
            ),
            (
                "name = \"a\"\nsources = [\n  { interface = \"vlan66\" },\n]\n",
                format!("{file}:3: key `net`: missing field `net`"),
            ),
            (
                "name = \"a\"\nsources = [\n  7,\n]\n",
                format!("{file}:3: invalid type: integer `7`, expected an address or CIDR"),
            ),
        ];
        for (text, expected) in cases {
            let errors = errors_of(text);
            assert!(
                errors.iter().any(|e| e.starts_with(&expected)),
                "{text:?}: expected `{expected}` in {errors:?}"
            );
        }
        // Every bad value is reported, not only the first.
        let errors = errors_of(
            "name = \"a\"\n[[sources]]\nnet = \"10.0.0.1\"\ninterface = \"\"\nmac = \"x\"\n",
        );
        assert_eq!(errors.len(), 2, "{errors:?}");
        // Bound sources overlap like plain ones.
        let errors = errors_of(
            "name = \"a\"\nsources = [\"10.0.0.0/24\", { net = \"10.0.0.5\", mac = \"02:00:00:00:00:05\" }]\n",
        );
        assert!(
            errors[0].contains("overlaps a source of agent `a`"),
            "{errors:?}"
        );
    }

    const INSPECTING: &str = "name = \"a\"\nallow = [\"api.github.com\", \".openai.com\", \"*.hf.test\"]\n\
        inspect = [\"api.github.com\", \".openai.com\", \"*.hf.test\"]\n\
        [[http]]\nhost = \"api.github.com\"\nmethods = [\"GET\", \"HEAD\"]\npaths = [\"/repos/acme/*\", \"/user\"]\n\
        [[http]]\nhost = \"api.github.com\"\npaths = [\"/repos/acme/secret/*\"]\naction = \"deny\"\n";

    #[test]
    fn inspect_and_http_rules_compile() {
        use crate::policy::http::HttpVerdict;
        use crate::policy::path::normalize;
        let policy = compile(&agent_file(INSPECTING), &[443], 1).unwrap();
        assert!(policy.warnings().is_empty(), "{:?}", policy.warnings());
        let id = policy.agent_by_name("a");
        let target = |h: &str, port| crate::policy::Target {
            host: crate::policy::parse_host(h).unwrap(),
            port,
        };
        let rule = policy.inspects(id, &target("api.github.com", 443)).unwrap();
        assert_eq!(&*rule.name, "agents/a.toml:inspect:api.github.com");
        assert!(
            policy
                .inspects(id, &target("chat.openai.com", 443))
                .is_some()
        );
        assert!(policy.inspects(id, &target("x.hf.test", 443)).is_some());
        assert!(policy.inspects(id, &target("hf.test", 443)).is_none());
        assert!(
            policy
                .inspects(id, &target("api.github.com", 8443))
                .is_none()
        );
        assert!(policy.inspects(id, &target("10.0.0.1", 443)).is_none());
        let a = policy.agent(id.unwrap()).unwrap();
        let gh = DomainName::parse("api.github.com").unwrap();
        let v = a
            .http
            .check(&gh, "DELETE", &normalize("/repos/acme/x").unwrap());
        assert_eq!(v, HttpVerdict::NotAllowed);
        let v = a
            .http
            .check(&gh, "GET", &normalize("/repos/acme/x").unwrap());
        assert_eq!(v, HttpVerdict::Allow("agents/a.toml:http[0]".into()));
        let v = a
            .http
            .check(&gh, "GET", &normalize("/repos/acme/secret/x").unwrap());
        assert_eq!(v, HttpVerdict::DeniedByRule("agents/a.toml:http[1]".into()));
    }

    #[test]
    fn inspect_and_http_errors_name_their_line() {
        let file = "rules/agents/a.toml";
        let cases = [
            (
                "name = \"a\"\nallow = [\"x.test\"]\ninspect = [\"y.test\"]\n",
                format!("{file}:3: key `inspect`: `y.test`: y.test:443 is not allowed"),
            ),
            // An exact allow does not cover a wildcard's other names.
            (
                "name = \"a\"\nallow = [\"a.x.test\"]\ninspect = [\"*.x.test\"]\n",
                format!("{file}:3: key `inspect`: `*.x.test`: *.x.test:443 is not allowed"),
            ),
            // A deny takes the name away.
            (
                "name = \"a\"\nallow = [\".x.test\"]\ndeny = [\"x.test\"]\ninspect = [\".x.test\"]\n",
                format!("{file}:4: key `inspect`: `.x.test`: x.test:443 is not allowed"),
            ),
            (
                "name = \"a\"\nallow = [\"x.test\"]\ninspect = [\"x.test\"]\n[[http]]\nhost = \"y.test\"\n",
                format!("{file}:5: key `http.host`: `y.test` is not inspected"),
            ),
            (
                "name = \"a\"\nallow = [\"x.test\"]\ninspect = [\"x.test\"]\n[[http]]\nhost = \"x.test\"\nmethods = [\"get\"]\n",
                format!("{file}:6: key `http.methods`: `get` is not a method"),
            ),
            (
                "name = \"a\"\nallow = [\"x.test\"]\ninspect = [\"x.test\"]\n[[http]]\nhost = \"x.test\"\npaths = [\"/a/../b\"]\n",
                format!("{file}:6: key `http.paths`: `/a/../b`: not in normal form: write `/b`"),
            ),
            (
                "name = \"a\"\nallow = [\"x.test\"]\ninspect = [\"x.test\"]\n[[http]]\nhost = \"x.test\"\npaths = [\"/a%2fb\"]\n",
                format!("{file}:6: key `http.paths`: `/a%2fb`: encoded"),
            ),
            (
                "name = \"a\"\nallow = [\"x.test\"]\ninspect = [\"x.test\"]\n[[http]]\nhost = \"x.test\"\naction = \"block\"\n",
                format!("{file}:6: key `http.action`: `block`"),
            ),
            (
                "name = \"a\"\nallow = [\"x.test\"]\ninspect = [\"x.test\"]\n[[http]]\nhost = \"x.test\"\nverbs = [\"GET\"]\n",
                format!("{file}:6: key `verbs`: unknown field `verbs`"),
            ),
        ];
        for (text, expected) in cases {
            let errors = errors_of(text);
            assert!(
                errors.iter().any(|e| e.starts_with(&expected)),
                "{text:?}: expected `{expected}` in {errors:?}"
            );
        }
        // Deny rules alone make the host refuse everything: compiled, with a warning.
        let text = "name = \"a\"\nallow = [\"x.test\"]\ninspect = [\"x.test\"]\n[[http]]\nhost = \"x.test\"\naction = \"deny\"\n";
        let policy = compile(&agent_file(text), &[443], 1).unwrap();
        assert!(
            policy.warnings()[0].to_string().contains("no allow rule"),
            "{:?}",
            policy.warnings()
        );
    }

    #[test]
    fn cidr_rules() {
        assert_eq!(parse_cidr_rule("10.0.0.0/8").unwrap().1, None);
        assert_eq!(parse_cidr_rule("10.0.0.5/32:5432").unwrap().1, Some(5432));
        assert_eq!(parse_cidr_rule("fd00::/64:443").unwrap().1, Some(443));
        assert!(parse_cidr_rule("10.0.0.1/8").is_none());
        assert!(parse_cidr_rule("127.0.0.1").is_some());
    }
}
