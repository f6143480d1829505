//! The command line (clap): `run`, `check`, `explain`, …, `selftest`. Each command is a function returning
//! an exit code; `main.rs` only parses and dispatches.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::config::Config;

mod remote;
mod selftest;
use crate::nft::{self, RulesetSpec};
use crate::policy::{AddressGrant, AddressOrigin, Decision, Host, Policy, Target};
use crate::proxy::target::parse_authority;
use crate::proxy::upstream::DnsResolver;
pub use remote::{kill, reload, revive, status, unlock_revive};
pub use selftest::{SelftestArgs, selftest};

#[derive(Debug, Parser)]
#[command(name = "portcullis", version, about = "Egress gateway for AI agents")]
pub struct Cli {
    /// Config file; without it the built-in default is used (explicit proxy on
    /// 127.0.0.1:3128, admin on 127.0.0.1:9090, rules from ./rules).
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve (the default command).
    Run,
    /// Validate the config and the rules, print a summary; exit 1 with every error.
    Check,
    /// Engage the kill switch: through the local control socket (root or the service
    /// user), else the admin API signed with the local webhook secret. Exit 0 when engaged
    /// and written to disk.
    Kill {
        /// One agent; without it, every agent.
        #[arg(long)]
        agent: Option<String>,
        /// Why, recorded in the state file and the log.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Reopen routes: needs the current TOTP code. Failed codes are counted; after five,
    /// revive is locked for a growing back-off (see `unlock-revive`).
    Revive {
        /// The current 6-digit code from the authenticator.
        #[arg(long)]
        totp: String,
        /// One agent; without it, every agent (and a corrupt state).
        #[arg(long)]
        agent: Option<String>,
    },
    /// Show the kill switch state and any revive lock-out.
    Status,
    /// Clear every revive lock-out earned by failed TOTP codes (control socket only: run
    /// it on the gateway as root or the service user).
    UnlockRevive,
    /// Reload the rules now (control socket, else the signed admin API).
    Reload,
    /// Print the nftables ruleset for this config.
    PrintRuleset,
    /// Apply the nftables ruleset atomically (one `nft -f` batch, table replaced whole).
    ApplyRuleset,
    /// Show the verdict for an agent and a target, and the rule behind it.
    Explain {
        #[arg(long)]
        agent: String,
        /// `https://host/...`, `http://host:port/...` or `host:port`.
        target: String,
        /// An address the target's name resolves to (repeatable): checked as at connect
        /// time, showing whether it passes as public, by `allow_cidrs` or by `resolve_cidrs`.
        #[arg(long)]
        address: Vec<std::net::IpAddr>,
        /// For an inspected target: the request method the `[[http]]` rules are asked about
        /// (with the URL's path).
        #[arg(long, default_value = "GET")]
        method: String,
    },
    /// The inspect CA (docs/inspect.md).
    #[command(subcommand)]
    Ca(CaCommand),
    /// Run on an agent: try every escape path (direct IP, other ports, QUIC, IPv6, outside
    /// DNS, DNS exfiltration, DoH, a denied name) and the gateway itself; print a table.
    Selftest(Box<SelftestArgs>),
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create the CA in state_dir/ca/, name-constrained to the DNS subtrees of every
    /// agent's `inspect` patterns (and --permit). Refuses to overwrite an existing CA.
    Init {
        /// One more name whose subtree the CA may sign for (repeatable).
        #[arg(long)]
        permit: Vec<String>,
    },
    /// Print the CA certificate (PEM) and the names it may sign for.
    Show,
}

fn ca_dir(config: &Config) -> PathBuf {
    config.state_dir.join(crate::inspect::ca::CA_DIR)
}

/// The DNS subtrees the CA must permit for this policy's `inspect` patterns.
fn inspect_subtrees(policy: &Policy) -> Vec<crate::policy::DomainName> {
    policy
        .agents()
        .flat_map(|(_, a)| a.inspect_patterns.iter())
        .map(crate::inspect::ca::subtree_of)
        .collect()
}

pub fn ca_init(config_path: Option<&Path>, permits: &[String]) -> i32 {
    let result = (|| {
        let config = load_config(config_path)?;
        let policy = load_policy(&config)?;
        let mut names = inspect_subtrees(&policy);
        for p in permits {
            let n = crate::policy::DomainName::parse(
                p.trim_start_matches("*.").trim_start_matches('.'),
            )
            .map_err(|e| format!("--permit `{p}`: {e}"))?;
            names.push(n);
        }
        let dir = ca_dir(&config);
        let summary = crate::inspect::ca::init(&dir, names, time::OffsetDateTime::now_utc())
            .map_err(|e| e.to_string())?;
        println!("created {}", dir.display());
        print_ca(&summary);
        Ok(0)
    })();
    result.unwrap_or_else(|e: String| {
        eprintln!("{e}");
        1
    })
}

pub fn ca_show(config_path: Option<&Path>) -> i32 {
    let result = load_config(config_path)
        .and_then(|config| crate::inspect::ca::show(&ca_dir(&config)).map_err(|e| e.to_string()));
    match result {
        Ok(summary) => {
            print_ca(&summary);
            0
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

fn print_ca(summary: &crate::inspect::ca::CaSummary) {
    print!("{}", summary.cert_pem);
    println!("valid until: {}", summary.not_after);
    println!("may sign for (each name and every name under it; no IP address):");
    for p in &summary.permitted {
        println!("  {p}");
    }
}

/// `check`'s warnings about inspect: patterns the CA cannot sign for, or no CA at all.
fn inspect_warnings(config: &Config, policy: &Policy) -> Vec<String> {
    let patterns: Vec<(&str, &crate::policy::DomainPattern)> = policy
        .agents()
        .flat_map(|(_, a)| a.inspect_patterns.iter().map(move |p| (&*a.name, p)))
        .collect();
    if patterns.is_empty() {
        return Vec::new();
    }
    let dir = ca_dir(config);
    match crate::inspect::ca::show(&dir) {
        Err(e) => vec![format!(
            "agents inspect TLS but the inspect CA cannot be read ({e}): run `portcullis ca init`"
        )],
        Ok(summary) => patterns
            .into_iter()
            .filter(|(_, p)| {
                !summary
                    .permitted
                    .iter()
                    .any(|b| crate::inspect::ca::in_subtree(p.base.as_str(), b))
            })
            .map(|(agent, p)| {
                format!(
                    "agent {agent}: inspect `{p}` is outside the CA's name constraints ({}): its connections will fail on the agents (a new CA with --permit is needed)",
                    summary.permitted.join(", ")
                )
            })
            .collect(),
    }
}

pub fn load_config(path: Option<&Path>) -> Result<Config, String> {
    match path {
        Some(p) => Config::load(p).map_err(|e| e.to_string()),
        None => Ok(Config::builtin()),
    }
}

fn load_policy(config: &Config) -> Result<Policy, String> {
    Policy::load(&config.rules_dir, &config.default_ports, 1).map_err(|e| e.to_string())
}

/// The ruleset spec for this config and policy: agent networks default to every agent's
/// sources; the listeners give the ports; every agent's bound sources are enforced.
pub fn ruleset_spec(config: &Config, policy: &Policy) -> Result<RulesetSpec, String> {
    let transparent = config
        .transparent_listen
        .first()
        .ok_or("the ruleset needs a transparent listener (listen.transparent)")?;
    let mut networks = config.nft_agent_networks.clone();
    if networks.is_empty() {
        networks = policy
            .agents()
            .flat_map(|(_, a)| a.sources.iter().copied())
            .collect();
    }
    let mut intercepted: Vec<u16> = config.transparent_tls_ports.clone();
    intercepted.extend(&config.transparent_http_ports);
    Ok(RulesetSpec {
        agent_interfaces: config.nft_agent_interfaces.clone(),
        agent_sources: networks,
        interception: match config.interception {
            crate::sys::Interception::Redirect => nft::Interception::Redirect,
            crate::sys::Interception::Tproxy => nft::Interception::Tproxy,
        },
        transparent_port: transparent.port(),
        intercepted_ports: intercepted,
        explicit_port: config
            .explicit_listen
            .filter(|a| !a.ip().is_loopback())
            .map(|a| a.port()),
        dns_port: config.dns_listen.first().map(|a| a.port()),
        ipv6: config.nft_ipv6,
        tproxy_mark: config.nft_tproxy_mark,
        killed: Vec::new(),
        bindings: policy
            .agents()
            .flat_map(|(_, a)| a.bindings.iter().cloned())
            .collect(),
    })
}

/// The ruleset, followed in the same batch by the kill sets the saved state implies (an
/// unreadable state kills everyone), so applying never reopens a killed agent.
fn render_ruleset(config_path: Option<&Path>) -> Result<String, String> {
    use crate::killswitch::{STATE_FILE, killed_macs, killed_nets, state};
    let config = load_config(config_path)?;
    let policy = load_policy(&config)?;
    let spec = ruleset_spec(&config, &policy)?;
    let mut text = nft::render(&spec).map_err(|e| e.to_string())?;
    let (st, corrupt) = match state::load(&config.state_dir.join(STATE_FILE)) {
        state::Loaded::Fresh => (state::KillState::default(), false),
        state::Loaded::State(s) => (s, false),
        state::Loaded::Corrupt(_) => (state::KillState::default(), true),
    };
    text += &nft::killed_batch(
        &killed_nets(&st, corrupt, &policy, &config.nft_agent_networks),
        &killed_macs(&st, corrupt, &policy),
    );
    Ok(text)
}

pub fn print_ruleset(config_path: Option<&Path>) -> i32 {
    match render_ruleset(config_path) {
        Ok(text) => {
            print!("{text}");
            0
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

pub fn apply_ruleset(config_path: Option<&Path>) -> i32 {
    match render_ruleset(config_path).and_then(|text| nft::apply(&text).map_err(|e| e.to_string()))
    {
        Ok(()) => {
            println!("applied table inet {}", nft::TABLE);
            0
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

pub fn check(config_path: Option<&Path>) -> i32 {
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    match load_policy(&config) {
        Ok(policy) => {
            println!(
                "config: {}",
                config
                    .source
                    .as_deref()
                    .map_or("<built-in>".into(), |p| p.display().to_string())
            );
            println!("rules:  {}", config.rules_dir.display());
            // Accepted, but worth changing: on stderr like errors, without failing.
            for w in policy.warnings() {
                eprintln!("warning: {w}");
            }
            for (_, a) in policy.agents() {
                let rules: usize = a.allow.iter().map(|s| s.len()).sum();
                let denies: usize = a.deny.iter().map(|s| s.len()).sum();
                println!(
                    "agent {:<20} sources {:<3} allow {:<5} deny {:<4} allow_cidrs {} resolve_cidrs {}",
                    a.name,
                    a.sources.len(),
                    rules,
                    denies,
                    a.allow_cidrs.len(),
                    a.resolve_cidrs.len()
                );
            }
            for warning in check_warnings(&config, &policy)
                .into_iter()
                .chain(inspect_warnings(&config, &policy))
            {
                eprintln!("warning: {warning}");
            }
            if !config.transparent_listen.is_empty() {
                let checked = ruleset_spec(&config, &policy)
                    .and_then(|spec| nft::render(&spec).map_err(|e| e.to_string()))
                    .and_then(|text| nft::check(&text).map_err(|e| e.to_string()));
                match checked {
                    Ok(()) => println!("ruleset: ok (nft -c)"),
                    Err(e) => {
                        eprintln!("ruleset: {e}");
                        return 1;
                    }
                }
            }
            println!("ok");
            0
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

/// What `check` warns about without failing: agents that can claim each other's addresses
/// on a shared segment, and bindings that nothing enforces.
fn check_warnings(config: &Config, policy: &Policy) -> Vec<String> {
    let mut warnings = crate::policy::binding::shared_segment_warnings(
        policy,
        &config.nft_agent_interfaces,
        &config.nft_agent_networks,
    );
    let bound = policy.agents().any(|(_, a)| !a.bindings.is_empty());
    if bound && config.transparent_listen.is_empty() {
        warnings.push(
            "sources bound to an interface or MAC are enforced only by the nftables ruleset, \
             and this config renders none (listen.transparent is empty)"
                .to_owned(),
        );
    }
    warnings
}

/// Parse an `explain` target: a URL (scheme decides the default port) or `host:port`.
pub fn parse_explain_target(s: &str) -> Result<Target, String> {
    let (default_port, rest) = if let Some(r) = s.strip_prefix("https://") {
        (Some(443), r)
    } else if let Some(r) = s.strip_prefix("http://") {
        (Some(80), r)
    } else {
        (None, s)
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    parse_authority(authority, default_port).map_err(|r| format!("cannot parse target `{s}`: {r}"))
}

/// The path of an `explain` URL (`/` when it has none), without query or fragment.
fn explain_path(s: &str) -> &str {
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .unwrap_or(s);
    let rest = rest.split(['?', '#']).next().unwrap_or(rest);
    rest.find('/').map_or("/", |i| &rest[i..])
}

pub fn explain(
    config_path: Option<&Path>,
    agent: &str,
    target: &str,
    addresses: &[std::net::IpAddr],
    method: &str,
) -> i32 {
    let result = (|| {
        let config = load_config(config_path)?;
        let policy = load_policy(&config)?;
        let path = explain_path(target).to_owned();
        let target = parse_explain_target(target)?;
        let id = policy.agent_by_name(agent);
        if id.is_none() && agent != crate::policy::UNKNOWN_AGENT {
            return Err(format!(
                "no agent `{agent}` in {}",
                config.rules_dir.display()
            ));
        }
        let v = policy.evaluate(id, &target);
        let mut allowed_http = true;
        let verdict = match v.decision {
            Decision::Allow => "allow".to_owned(),
            Decision::Deny(r) => format!("deny ({r})"),
        };
        println!("agent:   {agent}");
        println!("target:  {target}");
        println!("verdict: {verdict}");
        println!("rule:    {}", v.rule.as_deref().unwrap_or("(default deny)"));
        if v.is_allow() {
            explain_inspect(&policy, id, &target, method, &path, &mut allowed_http);
        }
        let mut allowed = v.is_allow();
        // An IP literal is its own address; a name's are the ones given with --address.
        let (checked, origin) = match target.host {
            Host::Ip(ip) => (vec![ip], AddressOrigin::Literal),
            Host::Name(_) => (addresses.to_vec(), AddressOrigin::Resolved),
        };
        let agent_policy = id.and_then(|id| policy.agent(id));
        for ip in checked {
            let line = match policy.address_grant(id, ip, target.port, origin) {
                Ok(AddressGrant::Public) => "allow (public address)".to_owned(),
                Ok(AddressGrant::AllowCidrs(c)) => format!("allow (allow_cidrs {})", c.rule),
                Ok(AddressGrant::ResolveCidrs(c)) => format!("allow (resolve_cidrs {})", c.rule),
                Err(d) => {
                    allowed = false;
                    let reason = d
                        .deny_reason()
                        .unwrap_or(crate::policy::Reason::PrivateAddress);
                    format!("deny ({reason})")
                }
            };
            println!("address: {ip} {line}");
            if origin == AddressOrigin::Literal
                && let Some(c) = agent_policy.and_then(|a| a.resolve_cidr(ip))
                && !v.is_allow()
            {
                println!(
                    "note:    {} covers {ip} for names that resolve into it only; an IP literal needs allow_cidrs",
                    c.rule
                );
            }
        }
        if v.is_allow() && matches!(target.host, Host::Name(_)) && addresses.is_empty() {
            println!(
                "note:    resolved addresses are checked at connect time (special ranges need allow_cidrs or resolve_cidrs; try --address)"
            );
        }
        Ok(i32::from(!(allowed && allowed_http)))
    })();
    result.unwrap_or_else(|e| {
        eprintln!("{e}");
        2
    })
}

/// `explain`'s inspect lines: whether TLS to the target is terminated, and what the
/// `[[http]]` rules say about `method` and `path`.
fn explain_inspect(
    policy: &Policy,
    id: Option<crate::policy::AgentId>,
    target: &Target,
    method: &str,
    path: &str,
    allowed: &mut bool,
) {
    use crate::policy::http::HttpVerdict;
    let (Some(rule), Host::Name(name), Some(a)) = (
        policy.inspects(id, target),
        &target.host,
        id.and_then(|id| policy.agent(id)),
    ) else {
        println!("inspect: no (TLS passes through untouched)");
        return;
    };
    println!("inspect: yes ({})", rule.name);
    let normal = match crate::inspect::path::normalize(path) {
        Ok(n) => n,
        Err(e) => {
            *allowed = false;
            println!("http:    {method} {path}: refused, ambiguous path ({e})");
            return;
        }
    };
    let line = match a.http.check(name, method, &normal) {
        HttpVerdict::NoRules => "allow (no [[http]] rule names this host)".to_owned(),
        HttpVerdict::Allow(r) => format!("allow ({r})"),
        HttpVerdict::DeniedByRule(r) => format!("deny 403 ({r})"),
        HttpVerdict::NotAllowed => {
            "deny 403 (the host has [[http]] rules and none allows this request)".to_owned()
        }
    };
    *allowed &= a.http.check(name, method, &normal).is_allow();
    println!("http:    {method} {normal}: {line}");
}

/// The runtime for `portcullis run` on `cores` usable CPUs (the process's affinity).
///
/// On one CPU, tokio's current-thread scheduler: the multi-thread one would run every task
/// on its single worker anyway, behind work-stealing queues, atomics and a second thread
/// (the one in `block_on`) that only waits. Measured on the load benchmark's one-core proxy:
/// a few per cent less CPU per new tunnel. Blocking work (file writes, policy loads, the DNS
/// forwarder's UDP threads) still goes to the blocking pool, and tasks spawned from those
/// threads are run by the one scheduler thread.
pub fn runtime(cores: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if cores <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Runtime::new()
    }
}

pub async fn run(config_path: Option<&Path>) -> i32 {
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    // Fail closed: without a valid policy nothing starts listening.
    let policy = match load_policy(&config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("rules invalid, not starting:\n{e}");
            return 1;
        }
    };
    for w in policy.warnings() {
        tracing::warn!("rules: {w}");
    }
    let resolver = match DnsResolver::new(&config.resolver_upstreams, config.resolver_timeout) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            eprintln!("resolver: {e}");
            return 1;
        }
    };
    let drain = config.drain_timeout;
    let running = match crate::gateway::start(config, policy, resolver).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    if let Some(a) = running.explicit_addr {
        tracing::info!(%a, "explicit proxy listening");
    }
    if let Some(a) = running.admin_addr {
        tracing::info!(%a, "admin listening");
    }
    // Policy and kill state are loaded and every listener is bound: tell systemd
    // (Type=notify), and keep its watchdog fed while the runtime schedules tasks.
    crate::sys::notify::notify("READY=1");
    let watchdog_stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(crate::sys::notify::watchdog(watchdog_stop.clone()));
    crate::gateway::terminated().await;
    crate::sys::notify::notify("STOPPING=1");
    tracing::info!("shutting down: draining live connections");
    running.shutdown(drain).await;
    // Pinged through the drain too: a wedged drain is still caught by WatchdogSec.
    watchdog_stop.cancel();
    0
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::runtime::RuntimeFlavor;

    /// One CPU: the current-thread scheduler, which still runs what the gateway hands it
    /// from other threads (the DNS forwarder's UDP threads spawn onto it, file work goes to
    /// the blocking pool). More CPUs: the multi-thread scheduler.
    #[test]
    fn one_cpu_gets_the_current_thread_scheduler() {
        let rt = runtime(1).unwrap();
        assert_eq!(rt.handle().runtime_flavor(), RuntimeFlavor::CurrentThread);
        let answer = rt.block_on(async {
            let handle = tokio::runtime::Handle::current();
            let from_thread = std::thread::spawn(move || handle.spawn(async { 40 }))
                .join()
                .unwrap();
            let blocking = tokio::task::spawn_blocking(|| 2).await.unwrap();
            from_thread.await.unwrap() + blocking
        });
        assert_eq!(answer, 42);
        let rt = runtime(2).unwrap();
        assert_eq!(rt.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
    }

    #[test]
    fn explain_targets() {
        assert_eq!(
            parse_explain_target("https://x.test/a")
                .unwrap()
                .to_string(),
            "x.test:443"
        );
        assert_eq!(
            parse_explain_target("http://x.test:8080")
                .unwrap()
                .to_string(),
            "x.test:8080"
        );
        assert_eq!(
            parse_explain_target("x.test:22").unwrap().to_string(),
            "x.test:22"
        );
        assert!(parse_explain_target("x.test").is_err());
    }
}
