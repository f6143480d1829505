//! portcullis: the egress gateway of an AI-agent network.
//!
//! The path of one explicit-proxy connection through the modules (the whole map, both modes,
//! and the invariants: docs/architecture.md; the threats named here: docs/threat-model.md):
//!
//! ```text
//! gateway::start ─ binds listeners after the policy is loaded (fail closed)
//!   proxy::explicit::serve      accept; proxy::caps bounds total and per-source slots
//!   proxy::explicit::handle     one HTTP request:
//!     proxy::auth::Authenticator    Proxy-Authorization → agent (memo, success cache,
//!                                   per-source back-off, argon2id on blocking threads)
//!     policy::Policy::identify      else the source CIDR → agent
//!     proxy::target::parse_request  CONNECT authority / absolute URI + Host (Host desync)
//!     policy::Policy::evaluate      pure decision: deny rules, allow rules, default deny
//!     proxy::upstream::connect      resolve (injected Resolve), check_address every
//!                                   address (literal or resolved), dial the checked address
//!     proxy::relay::relay           bytes both ways by splice(2) (sys::splice), counted,
//!                                   idle timeout, cancellable; no buffer while idle
//!   telemetry::Telemetry::record    one ConnectionRecord → one JSON log line (bounded queue)
//! ```
//!
//! `config` is the process configuration, `policy::rules` the raw rules files and
//! `policy::compile` turns them into a `Policy` that cannot be invalid. `admin` serves the
//! management API. `cli` holds the commands. `selftest` runs on an agent and probes the
//! gateway from the outside: every escape path it must close.

pub mod admin;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod dns;
pub mod gateway;
pub mod hash;
pub mod killswitch;
pub mod limits;
pub mod nft;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod selftest;
pub mod shutdown;
pub mod sys;
pub mod telemetry;
