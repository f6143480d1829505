//! portcullis: the egress gateway of an AI-agent network.
//!
//! The path of one connection through the modules (the whole map, both modes, and the
//! invariants: docs/architecture.md; the threats: docs/threat-model.md):
//!
//! ```text
//! gateway::start ─ binds listeners after the policy is loaded (fail closed), hands each
//!                  listener its own narrow context (proxy::ProxyContext, dns::DnsContext,
//!                  admin::AdminContext)
//!   proxy::explicit / proxy::transparent   find the target: the CONNECT authority, the
//!                                   absolute URI, the ClientHello's SNI, each request's Host
//!   proxy::session                  the lifecycle, once for every front end:
//!     Attempt::begin                kill-switch token first, then the record
//!     authorize                     kill check → policy::Policy::evaluate (pure) → limits
//!                                   → resolve (injected Resolve) → check every address →
//!                                   register (proxy::tunnels) → generation check
//!     Authorized::dial              live re-check, dial the checked address, replay
//!     relay_tunnel / forward        bytes through the agent's meter (limits::Shaping)
//!     Drop for Attempt              one ConnectionRecord → one JSON line (telemetry)
//! ```
//!
//! `config` is the process configuration, `policy::rules` the raw rules files and
//! `policy::compile` turns them into a `Policy` that cannot be invalid. `admin` serves the
//! management API. `cli` holds the commands. `selftest` runs on an agent and probes the
//! gateway from the outside: every escape path it must close.
//!
//! The public modules are what the binary, the integration tests, the benchmarks and the
//! fuzz targets reach; the rest is `pub(crate)`.

pub(crate) mod admin;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod dns;
pub mod gateway;
pub(crate) mod hash;
pub mod killswitch;
pub(crate) mod limits;
pub(crate) mod nft;
pub mod policy;
pub mod proxy;
pub mod selftest;
pub(crate) mod shutdown;
pub mod sys;
pub mod telemetry;
