//! The data path: listeners, target detection, upstream dialling and relaying.
//!
//! Owns the accept loops and per-connection tasks. Decisions are delegated to
//! [`crate::policy::Policy`]; every connection ends in exactly one
//! [`crate::telemetry::ConnectionRecord`]. Must not read rules files or block on the log.

mod caps;
pub mod explicit;
pub mod forward;
pub mod http_head;
pub mod peek;
pub mod relay;
pub mod sni;
pub mod target;
pub mod transparent;
pub mod upstream;

pub use caps::{ConnectionCaps, ConnectionSlot};
