//! The outcome of a decision: allow or deny, with the reason and the rule behind it.
//!
//! [`Reason`] is the closed set of deny reasons; its `as_str` is the log's `event.reason`
//! and the metrics' `reason` label, 1:1.

use std::fmt;
use std::sync::Arc;

/// Why a connection was denied or closed. Closed set: adding one is a schema change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No rule allows the target.
    NotAllowed,
    /// A `deny` rule matched.
    DeniedRule,
    /// The source matched no agent.
    UnknownAgent,
    /// Proxy credentials were required and missing.
    AuthRequired,
    /// Proxy credentials were presented and wrong (unknown user or wrong password).
    AuthFailed,
    /// Proxy credentials were refused without being verified: the source is in its
    /// back-off after failed attempts, or the gateway is running its maximum of
    /// verifications at once.
    AuthThrottled,
    /// A resolved address is loopback/private/link-local/... and no `allow_cidrs` covers it.
    PrivateAddress,
    /// The target is an IP literal not covered by `allow_cidrs`.
    IpLiteral,
    /// The TLS SNI differs from the name that was checked (CONNECT host; docs/threat-model.md,
    /// "SNI ≠ CONNECT host").
    SniMismatch,
    /// TLS without SNI where one is required.
    NoSni,
    /// The hello carries ECH and the agent has `deny_ech`.
    EchDenied,
    /// The request or hello could not be parsed, or was ambiguous.
    Malformed,
    /// The agent did not send what was needed before the deadline.
    Timeout,
    RateLimited,
    BudgetExceeded,
    KillSwitch,
    PolicyRevoked,
    ResolveFailed,
    UpstreamFailed,
    /// A global or per-source concurrency cap was hit.
    Overloaded,
    /// The process is shutting down and no longer accepts work.
    ShuttingDown,
    /// The connection's task panicked (a bug): that connection was closed, nothing else.
    InternalError,
}

impl Reason {
    pub const ALL: [Reason; 22] = [
        Reason::NotAllowed,
        Reason::DeniedRule,
        Reason::UnknownAgent,
        Reason::AuthRequired,
        Reason::AuthFailed,
        Reason::AuthThrottled,
        Reason::PrivateAddress,
        Reason::IpLiteral,
        Reason::SniMismatch,
        Reason::NoSni,
        Reason::EchDenied,
        Reason::Malformed,
        Reason::Timeout,
        Reason::RateLimited,
        Reason::BudgetExceeded,
        Reason::KillSwitch,
        Reason::PolicyRevoked,
        Reason::ResolveFailed,
        Reason::UpstreamFailed,
        Reason::Overloaded,
        Reason::ShuttingDown,
        Reason::InternalError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NotAllowed => "not_allowed",
            Reason::DeniedRule => "denied_rule",
            Reason::UnknownAgent => "unknown_agent",
            Reason::AuthRequired => "auth_required",
            Reason::AuthFailed => "auth_failed",
            Reason::AuthThrottled => "auth_throttled",
            Reason::PrivateAddress => "private_address",
            Reason::IpLiteral => "ip_literal",
            Reason::SniMismatch => "sni_mismatch",
            Reason::NoSni => "no_sni",
            Reason::EchDenied => "ech_denied",
            Reason::Malformed => "malformed",
            Reason::Timeout => "timeout",
            Reason::RateLimited => "rate_limited",
            Reason::BudgetExceeded => "budget_exceeded",
            Reason::KillSwitch => "kill_switch",
            Reason::PolicyRevoked => "policy_revoked",
            Reason::ResolveFailed => "resolve_failed",
            Reason::UpstreamFailed => "upstream_failed",
            Reason::Overloaded => "overloaded",
            Reason::ShuttingDown => "shutting_down",
            Reason::InternalError => "internal_error",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(Reason),
}

/// A decision and the rule that made it (`None` for the default deny).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    pub rule: Option<Arc<str>>,
}

impl Verdict {
    pub fn allow(rule: Arc<str>) -> Self {
        Self {
            decision: Decision::Allow,
            rule: Some(rule),
        }
    }

    pub fn deny(reason: Reason) -> Self {
        Self {
            decision: Decision::Deny(reason),
            rule: None,
        }
    }

    pub fn deny_by(reason: Reason, rule: Arc<str>) -> Self {
        Self {
            decision: Decision::Deny(reason),
            rule: Some(rule),
        }
    }

    pub fn is_allow(&self) -> bool {
        self.decision == Decision::Allow
    }

    pub fn deny_reason(&self) -> Option<Reason> {
        match self.decision {
            Decision::Allow => None,
            Decision::Deny(r) => Some(r),
        }
    }
}
