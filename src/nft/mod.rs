//! nftables ruleset for the portcullis egress gateway.
//!
//! Owns: the single `table inet portcullis` — rendering it from a typed [`RulesetSpec`],
//! checking and applying it atomically with `nft -f`, and editing the kill-switch sets
//! (`kill_sources_v4` / `kill_sources_v6`) at run time.
//!
//! Must not: touch any other table or the host's routing (TPROXY routing commands are only
//! *returned* for the operator, never run), break the gateway's own non-agent traffic (base
//! chains use `policy accept` and only act on packets classified as agent traffic), or let any
//! spec field inject nft syntax (interface names are validated, everything else is typed).
//! Commands are always run without a shell and bounded by [`COMMAND_TIMEOUT`].

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ipnet::IpNet;

pub use crate::policy::{MacAddr, SourceBinding};

/// Name of the table (`table inet portcullis`).
pub const TABLE: &str = "portcullis";
/// Set of killed IPv4 agent addresses.
pub const KILL_SET_V4: &str = "kill_sources_v4";
/// Set of killed IPv6 agent addresses.
pub const KILL_SET_V6: &str = "kill_sources_v6";
/// Set of MACs bound to killed agents (see [`SourceBinding`]).
pub const KILL_SET_MAC: &str = "kill_macs";
/// Named counter of agent packets dropped in the `input` hook.
pub const COUNTER_INPUT_DROPPED: &str = "agent_input_dropped";
/// Named counter of agent packets dropped in the `forward` hook.
pub const COUNTER_FORWARD_DROPPED: &str = "agent_forward_dropped";
/// Named counter of packets dropped by the kill switch.
pub const COUNTER_KILLED_DROPPED: &str = "killed_dropped";
/// Named counter of packets dropped because their source address is bound to another
/// interface or MAC than the one they came from.
pub const COUNTER_SPOOFED_DROPPED: &str = "spoofed_dropped";
#[cfg(test)]
/// Ports intercepted when the operator does not say otherwise.
pub const DEFAULT_INTERCEPTED_PORTS: [u16; 2] = [80, 443];
/// Environment variable naming the `nft` binary (default `nft`).
pub const NFT_PROGRAM_ENV: &str = "PORTCULLIS_NFT";
/// Upper bound for any single `nft` invocation: a wedged netlink call must not hang the gateway.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

const SET_AGENT_INTERFACES: &str = "agent_interfaces";
const SET_AGENT_NETS_V4: &str = "agent_nets_v4";
const SET_AGENT_NETS_V6: &str = "agent_nets_v6";
const SET_BOUND_SOURCES_V4: &str = "bound_sources_v4";
const SET_BOUND_SOURCES_V6: &str = "bound_sources_v6";
const DNS_PORT: u16 = 53;
/// Linux IFNAMSIZ is 16 including the terminating NUL.
const MAX_INTERFACE_NAME_LEN: usize = 15;

/// How agents' TCP 80/443 reaches the transparent listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interception {
    /// NAT `redirect` to the local port (listener reads the original destination via SO_ORIGINAL_DST).
    Redirect,
    /// TPROXY (listener needs IP_TRANSPARENT; operator must add the policy routing).
    Tproxy,
}

/// Everything the ruleset depends on.
#[derive(Debug, Clone)]
pub struct RulesetSpec {
    /// Interfaces the agents' traffic arrives on (e.g. "vlan66"); may be empty if sources are given.
    pub agent_interfaces: Vec<String>,
    /// Agent networks (v4 and v6 CIDRs); may be empty if interfaces are given. At least one of the two must be non-empty.
    pub agent_sources: Vec<IpNet>,
    pub interception: Interception,
    /// Port of portcullis' transparent listener (TCP 80/443 from agents go there).
    pub transparent_port: u16,
    /// Ports intercepted (default [80, 443]).
    pub intercepted_ports: Vec<u16>,
    /// The explicit proxy port agents may connect to on the gateway itself (None = not offered).
    pub explicit_port: Option<u16>,
    /// The DNS port portcullis listens on for agents (None = not offered). Agent DNS (udp+tcp 53) to ANY address is redirected to this port on the gateway.
    pub dns_port: Option<u16>,
    /// Whether agents' IPv6 traffic is intercepted like IPv4 (true) or dropped entirely (false, default).
    pub ipv6: bool,
    /// fwmark and routing table used for TPROXY (ignored for Redirect).
    pub tproxy_mark: u32,
    /// Addresses currently killed (restored on apply, so a re-apply never reopens a killed agent).
    pub killed: Vec<IpAddr>,
    /// Agent sources bound to an ingress interface and/or a MAC: a packet from one of these
    /// networks that arrives anywhere else is dropped before any other rule sees it.
    pub bindings: Vec<SourceBinding>,
}

/// Errors from rendering or running `nft`.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// The spec cannot be rendered safely.
    #[error("invalid ruleset spec: {0}")]
    Spec(String),
    /// `nft` (or `ip netns exec`) could not be started, fed, or finished within the timeout.
    #[error("could not run nft: {0}")]
    Spawn(std::io::Error),
    /// `nft` ran and failed (status -1 = killed by a signal).
    #[error("nft failed with status {status}: {stderr}")]
    Nft { status: i32, stderr: String },
    /// `nft -j` output was not what this module writes into the kill sets.
    #[error("unexpected nft output: {0}")]
    Parse(String),
}

mod render;
pub use render::render;
#[cfg(test)]
pub use render::tproxy_routing_commands;
use render::{join, split_by_family};

/// Commands that make the kill sets hold exactly `nets` and `macs`: flush the sets, then
/// add every network not already covered by another, so the interval sets never see
/// overlapping elements. Appended to a ruleset batch, a re-apply keeps killed agents killed.
pub fn killed_batch(nets: &[IpNet], macs: &[MacAddr]) -> String {
    let mut kept: Vec<IpNet> = Vec::new();
    let mut sorted: Vec<IpNet> = nets.iter().map(IpNet::trunc).collect();
    // Widest first, so a covered network is always seen after its cover.
    sorted.sort_by_key(|n| n.prefix_len());
    for n in sorted {
        if !kept.iter().any(|k| k.contains(&n)) {
            kept.push(n);
        }
    }
    // A table applied by an older portcullis has no MAC set: create it if missing, so an
    // upgraded daemon's kills reach the address sets before the ruleset is re-applied.
    let mut batch = format!("add set inet {TABLE} {KILL_SET_MAC} {{ type ether_addr; }}\n");
    for set in [KILL_SET_V4, KILL_SET_V6, KILL_SET_MAC] {
        batch += &format!("flush set inet {TABLE} {set}\n");
    }
    for (set, v4) in [(KILL_SET_V4, true), (KILL_SET_V6, false)] {
        let these: Vec<String> = kept
            .iter()
            .filter(|n| n.addr().is_ipv4() == v4)
            .map(ToString::to_string)
            .collect();
        if !these.is_empty() {
            batch += &element_command("add", set, &these.join(", "));
        }
    }
    let macs: BTreeSet<&MacAddr> = macs.iter().collect();
    if !macs.is_empty() {
        batch += &element_command(
            "add",
            KILL_SET_MAC,
            &join(&macs.into_iter().collect::<Vec<_>>()),
        );
    }
    batch
}

/// `nft -c -f -`: validates the batch against the running kernel without changing anything.
pub fn check(ruleset: &str) -> Result<(), NftError> {
    Nft::default().check(ruleset)
}

/// `nft -f -`: applies the batch atomically.
pub fn apply(ruleset: &str) -> Result<(), NftError> {
    Nft::default().apply(ruleset)
}

/// How to invoke `nft`: which binary, and optionally inside which network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nft {
    pub program: String,
    /// When set, commands run as `ip netns exec NAME <program> ...`.
    pub netns: Option<String>,
}

impl Default for Nft {
    fn default() -> Self {
        Self {
            program: std::env::var(NFT_PROGRAM_ENV).unwrap_or_else(|_| "nft".to_string()),
            netns: None,
        }
    }
}

impl Nft {
    /// `nft -c -f -`.
    pub fn check(&self, ruleset: &str) -> Result<(), NftError> {
        self.run(&["-c", "-f", "-"], Some(ruleset)).map(drop)
    }

    /// `nft -f -`.
    pub fn apply(&self, ruleset: &str) -> Result<(), NftError> {
        self.run(&["-f", "-"], Some(ruleset)).map(drop)
    }

    /// Adds all addresses in one transaction (adding an existing element is a no-op in nft).
    pub fn add_killed(&self, addrs: &[IpAddr]) -> Result<(), NftError> {
        let (v4, v6) = split_by_family(addrs);
        let mut batch = String::new();
        if !v4.is_empty() {
            batch += &element_command("add", KILL_SET_V4, &join(&v4));
        }
        if !v6.is_empty() {
            batch += &element_command("add", KILL_SET_V6, &join(&v6));
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.apply(&batch)
    }

    /// Make the kill sets hold exactly `nets` and `macs` (the kill switch's state), atomically.
    pub fn sync_killed(&self, nets: &[IpNet], macs: &[MacAddr]) -> Result<(), NftError> {
        self.apply(&killed_batch(nets, macs))
    }

    /// Deletes one address at a time so one absent address cannot abort the rest. nft's
    /// wording for "not in set" differs between versions (ENOENT vs "element does not
    /// exist", the former also meaning "no such table"), so a failure is ignored only when a
    /// fresh listing confirms the address is really not killed.
    pub fn remove_killed(&self, addrs: &[IpAddr]) -> Result<(), NftError> {
        let (v4, v6) = split_by_family(addrs);
        let targets = v4
            .iter()
            .map(|a| (KILL_SET_V4, a.to_string(), IpAddr::V4(*a)))
            .chain(
                v6.iter()
                    .map(|a| (KILL_SET_V6, a.to_string(), IpAddr::V6(*a))),
            );
        for (set, text, addr) in targets {
            if let Err(err) = self.apply(&element_command("delete", set, &text)) {
                match self.list_killed() {
                    Ok(killed) if !killed.contains(&addr) => {}
                    _ => return Err(err),
                }
            }
        }
        Ok(())
    }

    /// Reads both kill sets via `nft -j`.
    pub fn list_killed(&self) -> Result<Vec<IpAddr>, NftError> {
        let mut killed = Vec::new();
        for set in [KILL_SET_V4, KILL_SET_V6] {
            let json = self.run(&["-j", "list", "set", "inet", TABLE, set], None)?;
            killed.extend(parse_set_elements(&json)?);
        }
        Ok(killed)
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, NftError> {
        let mut command = match &self.netns {
            Some(netns) => {
                validate_netns_name(netns)?;
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns, &self.program]);
                command
            }
            None => Command::new(&self.program),
        };
        command.args(args);
        run_bounded(command, stdin, COMMAND_TIMEOUT)
    }
}

fn element_command(verb: &str, set: &str, elements: &str) -> String {
    format!("{verb} element inet {TABLE} {set} {{ {elements} }}\n")
}

/// Names go on argv (no shell), but one starting with '-' would be read by `ip` as an option.
fn validate_netns_name(name: &str) -> Result<(), NftError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if name.is_empty() || name.starts_with('-') || !name.chars().all(allowed) {
        return Err(NftError::Spec(format!("invalid netns name {name:?}")));
    }
    Ok(())
}

/// Runs a command with optional stdin, capturing output, killing it after `timeout`.
fn run_bounded(
    mut command: Command,
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<String, NftError> {
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(NftError::Spawn)?;

    // Feed and drain on threads: a large batch or listing must not deadlock on a full pipe.
    let writer = match (stdin, child.stdin.take()) {
        (Some(text), Some(mut pipe)) => {
            let text = text.to_owned();
            Some(std::thread::spawn(move || pipe.write_all(text.as_bytes())))
        }
        _ => None,
    };
    let stdout_reader = child.stdout.take().map(spawn_reader);
    let stderr_reader = child.stderr.take().map(spawn_reader);

    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().map_err(NftError::Spawn)? {
            Some(status) => break status,
            None if Instant::now() >= deadline => {
                // Best effort: the process may exit between the check and the kill.
                let _ = child.kill();
                let _ = child.wait();
                return Err(NftError::Spawn(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("nft did not finish within {timeout:?}"),
                )));
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    };

    let stdout = join_reader(stdout_reader)?;
    let stderr = join_reader(stderr_reader)?;
    if let Some(writer) = writer {
        let written = writer
            .join()
            .map_err(|_| NftError::Spawn(std::io::Error::other("stdin writer panicked")))?;
        // A failing nft may close stdin early; its own status and stderr say more than EPIPE.
        if status.success() {
            written.map_err(NftError::Spawn)?;
        }
    }
    if !status.success() {
        return Err(NftError::Nft {
            status: status.code().unwrap_or(-1),
            stderr: stderr.trim().to_string(),
        });
    }
    Ok(stdout)
}

type Reader = std::thread::JoinHandle<std::io::Result<String>>;

fn spawn_reader<R: Read + Send + 'static>(mut pipe: R) -> Reader {
    std::thread::spawn(move || {
        let mut text = String::new();
        pipe.read_to_string(&mut text).map(|_| text)
    })
}

fn join_reader(reader: Option<Reader>) -> Result<String, NftError> {
    match reader {
        None => Ok(String::new()),
        Some(handle) => handle
            .join()
            .map_err(|_| NftError::Spawn(std::io::Error::other("output reader panicked")))?
            .map_err(NftError::Spawn),
    }
}

/// Extracts addresses from `nft -j list set` output. Only single addresses are accepted
/// (plain, full-length prefix, or one-address range): anything wider was not put there by
/// portcullis and silently reporting part of it would misstate who is killed.
fn parse_set_elements(json: &str) -> Result<Vec<IpAddr>, NftError> {
    let document: serde_json::Value =
        serde_json::from_str(json).map_err(|e| NftError::Parse(format!("invalid JSON: {e}")))?;
    let entries = document
        .get("nftables")
        .and_then(|v| v.as_array())
        .ok_or_else(|| NftError::Parse("missing \"nftables\" array".into()))?;
    let mut addrs = Vec::new();
    for entry in entries {
        let Some(set) = entry.get("set") else {
            continue;
        };
        match set.get("elem") {
            None => {}
            Some(serde_json::Value::Array(elements)) => {
                for element in elements {
                    addrs.push(parse_element(element)?);
                }
            }
            // Some nft versions print a lone element without the array.
            Some(element) => addrs.push(parse_element(element)?),
        }
    }
    Ok(addrs)
}

fn parse_element(element: &serde_json::Value) -> Result<IpAddr, NftError> {
    let unexpected = || NftError::Parse(format!("unexpected kill-set element {element}"));
    let parse_addr = |v: &serde_json::Value| -> Result<IpAddr, NftError> {
        v.as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(unexpected)
    };
    if element.is_string() {
        return parse_addr(element);
    }
    // Elements carrying counters/timeouts are wrapped as {"elem": {"val": ...}}.
    if let Some(inner) = element.get("elem").and_then(|e| e.get("val")) {
        return parse_element(inner);
    }
    if let Some(prefix) = element.get("prefix") {
        let addr = prefix
            .get("addr")
            .map(parse_addr)
            .ok_or_else(unexpected)??;
        let len = prefix.get("len").and_then(|l| l.as_u64());
        let full = if addr.is_ipv4() { 32 } else { 128 };
        return if len == Some(full) {
            Ok(addr)
        } else {
            Err(unexpected())
        };
    }
    if let Some(serde_json::Value::Array(bounds)) = element.get("range")
        && let [low, high] = bounds.as_slice()
    {
        let (low, high) = (parse_addr(low)?, parse_addr(high)?);
        return if low == high {
            Ok(low)
        } else {
            Err(unexpected())
        };
    }
    Err(unexpected())
}

#[cfg(test)]
mod tests;
