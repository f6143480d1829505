//! Inspect mode: TLS terminated for the destinations an agent's `inspect` patterns name,
//! requests checked against its `[[http]]` rules, and forwarded over verified TLS.
//!
//! Everything else stays a blind SNI passthrough; nothing in this module runs for it.
//! docs/inspect.md is the operator's guide.

pub mod ca;
pub(crate) mod connect;
pub mod engine;
