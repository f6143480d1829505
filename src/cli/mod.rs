//! The command line (clap): `run`, `check`, `explain`, …, `selftest`. Each command is a function returning
//! an exit code; `main.rs` only parses and dispatches.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigError, LogFormat};

mod remote;
mod selftest;
use crate::nft::{self, NftError, RulesetSpec};
use crate::policy::{
    AddressGrant, AddressOrigin, CompileErrors, Decision, Host, Policy, Reason, Target,
};
use crate::proxy::target::parse_authority;
use crate::proxy::upstream::DnsResolver;
pub use remote::{kill, reload, revive, status, unlock_revive};
pub use selftest::{SelftestArgs, selftest};

#[derive(Debug, Parser)]
#[command(
    name = "portcullis",
    version,
    about = "Egress gateway for AI agents",
    after_help = "\
Environment:
  PORTCULLIS_LOG  filter of the service's own log on stderr (tracing EnvFilter syntax, e.g.
                  `debug` or `portcullis=debug,hyper=warn`) [default: info]. Connection log
                  lines go to `log.destination`, not here.
  NO_COLOR        set (non-empty): no colour in that log; it is coloured only on a terminal.

Exit status: each command lists its own (`portcullis help <command>`); 2 is a usage error
for every command."
)]
pub struct Cli {
    /// Config file; without it the built-in default is used (explicit proxy on
    /// 127.0.0.1:3128, admin on 127.0.0.1:9090, rules from ./rules).
    #[arg(long, short, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Exit status of the commands that talk to the running gateway.
const REMOTE_EXIT: &str = "\
Exit status:
  0  the gateway did it (its answer is printed)
  1  the gateway refused (e.g. a wrong TOTP code, a locked revive); its answer is printed
  2  the gateway could not be reached, or the config could not be read";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve (the default command).
    #[command(after_help = "\
Exit status:
  0  stopped by SIGTERM or SIGINT after draining (timeouts.drain_secs)
  1  not started: config or rules invalid, a listener could not bind, a secret unreadable")]
    Run,
    /// Validate the config and the rules, print a summary; exit 1 with every error.
    #[command(after_help = "\
Errors and warnings go to stderr as FILE:LINE: key `KEY`: message.

Exit status:
  0  valid (warnings do not fail)
  1  at least one error (each is printed), or the rendered ruleset fails `nft -c`")]
    Check,
    /// Engage the kill switch: through the local control socket (root or the service
    /// user), else the admin API signed with the local webhook secret. Exit 0 when engaged
    /// and written to disk.
    #[command(after_help = REMOTE_EXIT)]
    Kill {
        /// Kill only this agent (its name in rules/agents); without it, every agent.
        #[arg(long, value_name = "NAME")]
        agent: Option<String>,
        /// Why, recorded in the state file, the log and `status` [default: "portcullis
        /// kill (cli)"].
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Reopen routes: needs the current TOTP code. Failed codes are counted; after five,
    /// revive is locked for a growing back-off (see `unlock-revive`).
    #[command(after_help = REMOTE_EXIT)]
    Revive {
        /// The current 6-digit code from the authenticator that holds
        /// kill_switch.totp_secret_file.
        #[arg(long, value_name = "CODE")]
        totp: String,
        /// Revive only this agent; without it, every agent (and a corrupt state).
        #[arg(long, value_name = "NAME")]
        agent: Option<String>,
    },
    /// Show the kill switch state and any revive lock-out.
    #[command(after_help = REMOTE_EXIT)]
    Status,
    /// Clear every revive lock-out earned by failed TOTP codes (control socket only: run
    /// it on the gateway as root or the service user).
    #[command(after_help = REMOTE_EXIT)]
    UnlockRevive,
    /// Reload the rules now (control socket, else the signed admin API).
    #[command(after_help = REMOTE_EXIT)]
    Reload,
    /// Print the nftables ruleset for this config.
    #[command(after_help = "\
Exit status:
  0  printed
  1  config or rules invalid, or no transparent listener to render a ruleset for")]
    PrintRuleset,
    /// Apply the nftables ruleset atomically (one `nft -f` batch, table replaced whole).
    #[command(after_help = "\
Exit status:
  0  applied
  1  config or rules invalid, no transparent listener, or `nft` failed")]
    ApplyRuleset,
    /// Show the verdict for an agent and a target, and the rule behind it.
    #[command(after_help = "\
Exit status:
  0  allowed (and every --address passes)
  1  denied
  2  the config or rules could not be loaded, no such agent, or the target does not parse

Examples:
  portcullis explain --agent example-agent pypi.org
  portcullis explain --agent example-agent http://10.0.0.5:8080/ --address 10.0.0.5")]
    Explain {
        /// The agent's name (as in rules/agents/<file>.toml `name`), or `unknown` for
        /// traffic no agent claims.
        #[arg(long, value_name = "NAME")]
        agent: String,
        /// `https://host/...`, `http://host:port/...`, `host:port`, or `host` (port 443).
        target: String,
        /// An address the target's name resolves to (repeatable): checked as at connect
        /// time, showing whether it passes as public, by `allow_cidrs` or by `resolve_cidrs`.
        #[arg(long, value_name = "IP")]
        address: Vec<std::net::IpAddr>,
        /// For an inspected target: the request method the `[[http]]` rules are asked about
        /// (with the URL's path).
        #[arg(long, default_value = "GET")]
        method: String,
    },
    /// The inspect CA (docs/inspect.md): `ca init`, `ca show`.
    #[command(
        subcommand,
        after_help = "\
Exit status:
  0  done (the CA created, or printed)
  1  not done: a CA already exists (init), none exists (show), the config or rules are invalid,
     or a --permit name is not a domain name"
    )]
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
    config.state_dir.join(crate::proxy::inspect::ca::CA_DIR)
}

/// The DNS subtrees the CA must permit for this policy's `inspect` patterns.
fn inspect_subtrees(policy: &Policy) -> Vec<crate::policy::DomainName> {
    policy
        .agents()
        .flat_map(|(_, a)| a.inspect_patterns.iter())
        .map(crate::proxy::inspect::ca::subtree_of)
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
            .map_err(|e| CliError::Permit {
                name: p.clone(),
                why: e.to_string(),
            })?;
            names.push(n);
        }
        let dir = ca_dir(&config);
        let summary =
            crate::proxy::inspect::ca::init(&dir, names, time::OffsetDateTime::now_utc())?;
        println!("created {}", dir.display());
        print_ca(&summary);
        Ok::<_, CliError>(0)
    })();
    result.unwrap_or_else(|e| {
        eprintln!("{e}");
        1
    })
}

pub fn ca_show(config_path: Option<&Path>) -> i32 {
    let result = load_config(config_path)
        .map_err(CliError::from)
        .and_then(|config| Ok(crate::proxy::inspect::ca::show(&ca_dir(&config))?));
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

fn print_ca(summary: &crate::proxy::inspect::ca::CaSummary) {
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
    match crate::proxy::inspect::ca::show(&dir) {
        Err(e) => vec![format!(
            "agents inspect TLS but the inspect CA cannot be read ({e}): run `portcullis ca init`"
        )],
        Ok(summary) => patterns
            .into_iter()
            .filter(|(_, p)| {
                !summary
                    .permitted
                    .iter()
                    .any(|b| crate::proxy::inspect::ca::in_subtree(p.base.as_str(), b))
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

/// Why a command that reads the config and the rules could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Rules(#[from] CompileErrors),
    #[error("the ruleset needs a transparent listener (listen.transparent)")]
    NoTransparentListener,
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error("cannot parse target `{target}`: {reason}")]
    Target { target: String, reason: Reason },
    #[error("no agent `{agent}` in {}", rules_dir.display())]
    UnknownAgent { agent: String, rules_dir: PathBuf },
    #[error(transparent)]
    Ca(#[from] crate::proxy::inspect::ca::CaError),
    #[error("--permit `{name}`: {why}")]
    Permit { name: String, why: String },
}

pub fn load_config(path: Option<&Path>) -> Result<Config, ConfigError> {
    match path {
        Some(p) => Config::load(p),
        None => Ok(Config::builtin()),
    }
}

fn load_policy(config: &Config) -> Result<Policy, CompileErrors> {
    Policy::load(&config.rules_dir, &config.default_ports, 1)
}

/// The ruleset spec for this config and policy: agent networks default to every agent's
/// sources; the listeners give the ports; every agent's bound sources are enforced.
pub fn ruleset_spec(config: &Config, policy: &Policy) -> Result<RulesetSpec, CliError> {
    let transparent = config
        .listen
        .transparent
        .first()
        .ok_or(CliError::NoTransparentListener)?;
    let mut networks = config.nftables.agent_networks.clone();
    if networks.is_empty() {
        networks = policy
            .agents()
            .flat_map(|(_, a)| a.sources.iter().copied())
            .collect();
    }
    let mut intercepted: Vec<u16> = config.transparent.tls_ports.clone();
    intercepted.extend(&config.transparent.http_ports);
    Ok(RulesetSpec {
        agent_interfaces: config.nftables.agent_interfaces.clone(),
        agent_sources: networks,
        interception: match config.transparent.interception {
            crate::sys::Interception::Redirect => nft::Interception::Redirect,
            crate::sys::Interception::Tproxy => nft::Interception::Tproxy,
        },
        transparent_port: transparent.port(),
        intercepted_ports: intercepted,
        explicit_port: config
            .listen
            .explicit
            .filter(|a| !a.ip().is_loopback())
            .map(|a| a.port()),
        dns_port: config.listen.dns.first().map(|a| a.port()),
        ipv6: config.nftables.ipv6,
        tproxy_mark: config.nftables.tproxy_mark,
        killed: Vec::new(),
        bindings: policy
            .agents()
            .flat_map(|(_, a)| a.bindings.iter().cloned())
            .collect(),
    })
}

/// The ruleset, followed in the same batch by the kill sets the saved state implies (an
/// unreadable state kills everyone), so applying never reopens a killed agent.
fn render_ruleset(config_path: Option<&Path>) -> Result<String, CliError> {
    use crate::killswitch::{STATE_FILE, killed_macs, killed_nets, state};
    let config = load_config(config_path)?;
    let policy = load_policy(&config)?;
    let spec = ruleset_spec(&config, &policy)?;
    let mut text = nft::render(&spec)?;
    let (st, corrupt) = match state::load(&config.state_dir.join(STATE_FILE)) {
        state::Loaded::Fresh => (state::KillState::default(), false),
        state::Loaded::State(s) => (s, false),
        state::Loaded::Corrupt(_) => (state::KillState::default(), true),
    };
    text += &nft::killed_batch(
        &killed_nets(&st, corrupt, &policy, &config.nftables.agent_networks),
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
    match render_ruleset(config_path).and_then(|text| Ok(nft::apply(&text)?)) {
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
            if !config.listen.transparent.is_empty() {
                let checked = ruleset_spec(&config, &policy)
                    .and_then(|spec| Ok(nft::render(&spec)?))
                    .and_then(|text| Ok(nft::check(&text)?));
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

/// What `check` warns about without failing: no agent at all, agents that can claim each
/// other's addresses on a shared segment, bindings that nothing enforces, and loopback
/// sources that a transparent listener never sees.
pub(crate) fn check_warnings(config: &Config, policy: &Policy) -> Vec<String> {
    let mut warnings = Vec::new();
    if policy.agents().next().is_none() {
        warnings.push(format!(
            "no agent in {}: every connection is denied (add rules/agents/<name>.toml)",
            config.rules_dir.join("agents").display()
        ));
    }
    warnings.extend(crate::policy::binding::shared_segment_warnings(
        policy,
        &config.nftables.agent_interfaces,
        &config.nftables.agent_networks,
    ));
    if !config.listen.transparent.is_empty() {
        for (_, a) in policy.agents() {
            for net in a.sources.iter().filter(|n| n.addr().is_loopback()) {
                warnings.push(format!(
                    "agent `{}`: source {net} is loopback, but listen.transparent intercepts \
                     agents' traffic arriving from the network: it never comes from a \
                     loopback address (give the agent's address on its segment)",
                    a.name
                ));
            }
        }
    }
    let bound = policy.agents().any(|(_, a)| !a.bindings.is_empty());
    if bound && config.listen.transparent.is_empty() {
        warnings.push(
            "sources bound to an interface or MAC are enforced only by the nftables ruleset, \
             and this config renders none (listen.transparent is empty)"
                .to_owned(),
        );
    }
    warnings
}

/// Parse an `explain` target: a URL (the scheme decides the default port), `host:port`
/// or a bare host (port 443, what agents mostly reach).
pub fn parse_explain_target(s: &str) -> Result<Target, CliError> {
    let (default_port, rest) = if let Some(r) = s.strip_prefix("https://") {
        (Some(443), r)
    } else if let Some(r) = s.strip_prefix("http://") {
        (Some(80), r)
    } else {
        (Some(443), s)
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    parse_authority(authority, default_port).map_err(|reason| CliError::Target {
        target: s.to_owned(),
        reason,
    })
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
    let result = (|| -> Result<i32, CliError> {
        let config = load_config(config_path)?;
        let policy = load_policy(&config)?;
        let path = explain_path(target).to_owned();
        let target = parse_explain_target(target)?;
        let id = policy.agent_by_name(agent);
        if id.is_none() && agent != crate::policy::UNKNOWN_AGENT {
            return Err(CliError::UnknownAgent {
                agent: agent.to_owned(),
                rules_dir: config.rules_dir.clone(),
            });
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

/// What `run` says once everything listens: one line per listener and one for the policy
/// (a kill restored from the state file has its own line, from the kill switch).
struct StartupSummary {
    backlog: u32,
    interception: crate::sys::Interception,
    control_socket: Option<PathBuf>,
    agents: usize,
    allow_rules: usize,
    deny_rules: usize,
    generation: u64,
    rules_dir: PathBuf,
}

impl StartupSummary {
    fn new(config: &Config, policy: &Policy) -> Self {
        let (mut allow_rules, mut deny_rules) = (0, 0);
        for (_, a) in policy.agents() {
            allow_rules += a.allow.iter().map(|s| s.len()).sum::<usize>();
            deny_rules += a.deny.iter().map(|s| s.len()).sum::<usize>();
        }
        Self {
            backlog: config.listen.backlog,
            interception: config.transparent.interception,
            control_socket: config.control_socket(),
            agents: policy.agents().count(),
            allow_rules,
            deny_rules,
            generation: policy.generation(),
            rules_dir: config.rules_dir.clone(),
        }
    }

    fn log(&self, running: &crate::gateway::Running) {
        let backlog = self.backlog;
        match running.explicit_addr {
            Some(addr) => tracing::info!(%addr, backlog, "explicit proxy listening"),
            None => tracing::info!("explicit proxy off (listen.explicit not set)"),
        }
        let interception = match self.interception {
            crate::sys::Interception::Redirect => "redirect",
            crate::sys::Interception::Tproxy => "tproxy",
        };
        for addr in &running.transparent_addrs {
            tracing::info!(%addr, interception, backlog, "transparent proxy listening");
        }
        for addr in &running.dns_addrs {
            tracing::info!(%addr, backlog, "dns forwarder listening (udp and tcp)");
        }
        if let Some(addr) = running.admin_addr {
            tracing::info!(%addr, backlog, "admin api listening");
        }
        if let Some(path) = &self.control_socket {
            tracing::info!(path = %path.display(), "control socket listening");
        }
        tracing::info!(
            agents = self.agents,
            allow_rules = self.allow_rules,
            deny_rules = self.deny_rules,
            generation = self.generation,
            rules_dir = %self.rules_dir.display(),
            "policy loaded"
        );
    }
}

/// Colour in the service's own log: only on a terminal, and never when `NO_COLOR` is set
/// to anything but "" (no-color.org).
pub(crate) fn colour_wanted(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// The service's own log (tracing) on stderr, filtered by `PORTCULLIS_LOG` (default
/// `info`). `run` writes it as `log.format` of its config says; a config that does not
/// load leaves it as text (the command then reports why).
pub fn init_tracing(config_path: Option<&Path>, command_is_run: bool) {
    use std::io::IsTerminal;
    let format = if command_is_run {
        load_config(config_path).map_or(LogFormat::Text, |c| c.log.format)
    } else {
        LogFormat::Text
    };
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PORTCULLIS_LOG")
                .unwrap_or_else(|_| "info".into()),
        );
    match format {
        LogFormat::Text => builder
            .with_ansi(colour_wanted(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR").as_deref(),
            ))
            .init(),
        LogFormat::Json => builder.json().init(),
    }
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
    let normal = match crate::policy::path::normalize(path) {
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
    let resolver = match DnsResolver::new(&config.resolver.upstreams, config.resolver.timeout) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            eprintln!("resolver: {e}");
            return 1;
        }
    };
    let drain = config.timeouts.drain;
    let summary = StartupSummary::new(&config, &policy);
    let running = match crate::gateway::start(config, policy, resolver).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    summary.log(&running);
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

    /// `--help` documents every flag and argument of every command, and each command's
    /// exit status.
    #[test]
    fn help_documents_every_flag_and_exit_status() {
        use clap::CommandFactory;
        let cli = Cli::command();
        let top = cli.clone().render_long_help().to_string();
        assert!(
            top.contains("PORTCULLIS_LOG") && top.contains("NO_COLOR"),
            "{top}"
        );
        for arg in cli.get_arguments() {
            assert!(arg.get_help().is_some(), "--{} has no help", arg.get_id());
        }
        let mut commands = 0;
        for sub in cli.get_subcommands().filter(|c| c.get_name() != "help") {
            commands += 1;
            let name = sub.get_name();
            let after = sub
                .get_after_help()
                .map(ToString::to_string)
                .unwrap_or_default();
            assert!(after.contains("Exit status:\n  0  "), "{name}: {after}");
            for arg in sub.get_arguments() {
                assert!(
                    arg.get_help().is_some(),
                    "{name} {} has no help",
                    arg.get_id()
                );
            }
        }
        assert_eq!(commands, 12);
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(colour_wanted(true, None));
        assert!(colour_wanted(true, Some(OsStr::new(""))));
        assert!(!colour_wanted(true, Some(OsStr::new("1"))));
        assert!(!colour_wanted(false, None));
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
        assert_eq!(
            parse_explain_target("x.test").unwrap().to_string(),
            "x.test:443"
        );
        assert_eq!(
            parse_explain_target("[2001:db8::1]").unwrap().to_string(),
            "[2001:db8::1]:443"
        );
        assert!(parse_explain_target("user@x.test").is_err());
    }
}
