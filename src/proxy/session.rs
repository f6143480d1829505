//! One connection's lifecycle, written once for every front end.
//!
//! A front end (an explicit `CONNECT`, an explicit absolute-form request, a transparent
//! ClientHello, a transparent port-80 request, a plain-HTTP request inside a `CONNECT`
//! tunnel) only finds the target. Everything else happens here, in this order, everywhere:
//!
//! 1. [`Attempt::begin`]: the kill-switch token is taken first, so a kill from then on cuts
//!    the attempt in whatever phase it is (the hello wait, the resolution, the dial, the
//!    relay); the record is opened.
//! 2. [`authorize`]: the kill check → the decision (pure policy; a denied attempt spends
//!    nothing) → the agent's limits → resolution of the name by us (after the limits, so an
//!    agent cannot make the gateway resolve more names than it may open connections) → every
//!    address checked → registration in the tunnel registry (reloads see the attempt from
//!    here) → the decision's policy generation compared with the live one.
//! 3. [`Authorized::dial`]: the live policy checked again if a reload came since, then the
//!    checked address dialled (never the agent's), the agent's first bytes replayed.
//! 4. [`relay_tunnel`] or `forward::forward`: bytes move through the agent's meter.
//! 5. The record is written exactly once, when the [`Attempt`] is dropped.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::limits::{Admission, Refusal};
use crate::policy::{AgentId, Policy, Reason, Target, address};
use crate::proxy::ProxyContext;
use crate::proxy::relay::{RelayCounters, RelayEnd, relay};
use crate::proxy::target::domain_of;
use crate::proxy::tunnels::{ShapedBy, TunnelRegistration, still_allowed};
use crate::proxy::upstream::{self, Upstream};
use crate::telemetry::{ConnectionRecord, Mode, TunnelGauge};

/// One attempt to reach a target: a tunnel, or one plain-HTTP request. Owns its record and
/// writes it exactly once, when dropped (whatever path ends it: a refusal, an error, the
/// relay's end, a client that vanished; a panic is recorded by the task's supervisor).
pub(crate) struct Attempt {
    ctx: Arc<ProxyContext>,
    /// `Some` until `drop` takes it.
    record: Option<ConnectionRecord>,
    started: Instant,
    agent: Option<AgentId>,
    /// Cancelled by a kill of this agent or of all, by a reload that revokes the attempt,
    /// and by the end of the shutdown's drain.
    cancel: CancellationToken,
    /// False once the attempt handed over to per-request records (its own is not written).
    armed: bool,
}

impl Attempt {
    /// Step 1: take the kill-switch token (before any kill check, so no kill falls between
    /// the check and the token), open the record.
    pub(crate) fn begin(
        ctx: &Arc<ProxyContext>,
        mode: Mode,
        peer: SocketAddr,
        policy: &Policy,
        agent: Option<AgentId>,
    ) -> Self {
        let record =
            ConnectionRecord::begin(mode, peer, policy.agent_name(agent), policy.generation());
        let cancel = ctx.killswitch.tunnel_token(&record.agent);
        Self {
            ctx: ctx.clone(),
            record: Some(record),
            started: Instant::now(),
            agent,
            cancel,
            armed: true,
        }
    }

    pub(crate) fn rec(&mut self) -> &mut ConnectionRecord {
        self.record
            .as_mut()
            .unwrap_or_else(|| unreachable!("only drop takes the record"))
    }

    pub(crate) fn agent_name(&self) -> Arc<str> {
        self.record
            .as_ref()
            .map_or_else(|| Arc::from(""), |r| r.agent.clone())
    }

    pub(crate) fn agent(&self) -> Option<AgentId> {
        self.agent
    }

    pub(crate) fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// End the attempt with `reason` (the record says so when it is written).
    pub(crate) fn fail(&mut self, reason: Reason) -> Reason {
        self.rec().reason = Some(reason);
        reason
    }

    /// The record's byte counts, from the relay's counters.
    pub(crate) fn count(&mut self, counters: &RelayCounters) {
        let rec = self.rec();
        rec.bytes_from_agent = counters.from_agent.load(Ordering::Relaxed);
        rec.bytes_to_agent = counters.to_agent.load(Ordering::Relaxed);
    }

    /// The connection handed over to per-request attempts, each with its own record.
    pub(crate) fn hand_over(mut self) {
        self.armed = false;
    }

    /// Is the agent (or everyone) killed: checked before anything is read or resolved for it.
    pub(crate) fn check_kill(&self) -> Result<(), Reason> {
        let agent = self.record.as_ref().map_or("", |r| &r.agent);
        if self.cancel.is_cancelled() || self.ctx.killswitch.is_killed(agent) {
            return Err(cancelled_reason(&self.ctx, agent, false));
        }
        Ok(())
    }

    /// Why the token fired: the kill switch, a reload that revoked it, or shutdown.
    pub(crate) fn cancelled_reason(&self, revoked: bool) -> Reason {
        let agent = self.record.as_ref().map_or("", |r| &r.agent);
        cancelled_reason(&self.ctx, agent, revoked)
    }

    /// `phase`, unless the attempt's token fires first: then it ends at once with the
    /// reason. Boxed by callers with the phase inside where state size matters.
    pub(crate) async fn until_cancelled<T>(
        &self,
        phase: impl Future<Output = Result<T, Reason>>,
    ) -> Result<T, Reason> {
        tokio::select! {
            biased;
            r = phase => r,
            () = self.cancel.cancelled() => Err(self.cancelled_reason(false)),
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        // A panic unwinding through the attempt is recorded once, as `internal_error`, by
        // the task's supervisor (`spawn_supervised`).
        if let Some(mut rec) = self.record.take()
            && self.armed
            && !std::thread::panicking()
        {
            rec.duration = self.started.elapsed();
            self.ctx.telemetry.record(rec);
        }
    }
}

/// Why a cancelled connection ended: the kill switch, a reload that revoked it, or shutdown.
pub(crate) fn cancelled_reason(ctx: &ProxyContext, agent: &str, revoked: bool) -> Reason {
    if ctx.killswitch.is_killed(agent) {
        Reason::KillSwitch
    } else if revoked {
        Reason::PolicyRevoked
    } else {
        Reason::ShuttingDown
    }
}

/// An attempt the checks let through: what was decided, where it may go, the agent's
/// admission (its concurrency slot and meter), and its place in the tunnel registry.
pub(crate) struct Authorized {
    pub(crate) target: Target,
    /// The checked addresses; emptied by the dial (the registry keeps its own copy).
    addrs: Vec<IpAddr>,
    pub(crate) live: Live,
    /// The generation the decision was made on.
    generation: u64,
    shaped_by: ShapedBy,
}

/// Step 2, for `target` (found by the front end): kill check → decide → admit → resolve →
/// check addresses → register → compare generations. `original` is the address a
/// transparent connection was sent to: we dial our own resolution of the name, and the
/// record notes when it differs.
pub(crate) async fn authorize(
    att: &mut Attempt,
    policy: &Policy,
    target: Target,
    original: Option<SocketAddr>,
) -> Result<Authorized, Refusal> {
    let refuse = |reason| Refusal {
        reason,
        retry_after: None,
    };
    let ctx = att.ctx.clone();
    att.rec().destination_domain = domain_of(&target);
    att.rec().destination_port = Some(target.port);
    att.check_kill().map_err(refuse)?;

    let decided = Instant::now();
    let verdict = policy.evaluate(att.agent, &target);
    ctx.telemetry
        .metrics
        .decision_duration
        .observe(decided.elapsed().as_secs_f64());
    att.rec().rule = verdict.rule.clone();
    if let Some(reason) = verdict.deny_reason() {
        return Err(refuse(reason));
    }

    let limits = att.agent.and_then(|id| policy.agent(id)).map(|a| &a.limits);
    let admission = match limits {
        Some(limits) => ctx
            .limiter
            .admit(&att.agent_name(), limits, Instant::now())?,
        None => Admission::default(),
    };

    let agent = att.agent;
    let resolved = tokio::select! {
        biased;
        () = att.cancel.cancelled() => return Err(refuse(att.cancelled_reason(false))),
        r = upstream::resolve_checked(
            policy,
            agent,
            &target,
            ctx.resolver.as_ref(),
            ctx.settings.resolver_timeout,
        ) => r,
    };
    let addrs = match resolved {
        Ok(addrs) => addrs,
        Err(f) => {
            att.rec().destination_ip = f.addr;
            return Err(refuse(f.reason));
        }
    };
    // The record names the rule that let a special address through beside the deciding one.
    let origin = match target.host {
        crate::policy::Host::Ip(_) => crate::policy::AddressOrigin::Literal,
        crate::policy::Host::Name(_) => crate::policy::AddressOrigin::Resolved,
    };
    let decided_by = att.rec().rule.clone();
    if let Some(rule) = addrs
        .iter()
        .filter_map(|ip| {
            policy.rule_name_for_address(agent, decided_by.as_ref(), *ip, target.port, origin)
        })
        .find(|r| Some(r) != decided_by.as_ref())
    {
        att.rec().rule = Some(rule);
    }
    if let Some(original) = original {
        let original_ip = address::canonical(original.ip());
        if !addrs.iter().any(|a| address::canonical(*a) == original_ip) {
            // The agent aimed elsewhere than the name resolves to; we dial the name.
            att.rec().destination_mismatch = true;
        }
    }

    let shaped_by = ShapedBy::of(limits);
    let registration = ctx.tunnels.register(
        att.agent_name(),
        target.clone(),
        addrs.clone(),
        shaped_by,
        att.cancel.clone(),
    );
    let authorized = Authorized {
        target,
        addrs,
        live: Live {
            admission,
            registration,
        },
        generation: policy.generation(),
        shaped_by,
    };
    authorized.still_live(att).map_err(refuse)?;
    Ok(authorized)
}

impl Authorized {
    /// A reload since the decision that no longer allows the attempt revokes it; a later
    /// reload finds it registered and cancels its token.
    fn still_live(&self, att: &Attempt) -> Result<(), Reason> {
        if self.live.registration.revoked() {
            return Err(Reason::PolicyRevoked);
        }
        let live = att.ctx.policy.load();
        if live.generation() != self.generation
            && !still_allowed(
                &live,
                &att.agent_name(),
                (&self.target, &self.addrs),
                self.shaped_by,
            )
        {
            return Err(Reason::PolicyRevoked);
        }
        Ok(())
    }

    /// Step 3: dial one of the checked addresses and send it `first` (the agent's bytes
    /// read so far, replayed unchanged). Nothing leaves that the live policy would not
    /// allow; a kill or revocation during the dial ends it.
    pub(crate) async fn dial(
        &mut self,
        att: &mut Attempt,
        first: &[u8],
    ) -> Result<Upstream, Reason> {
        self.still_live(att)?;
        let addrs = std::mem::take(&mut self.addrs);
        let connect_timeout = att.ctx.settings.connect_timeout;
        let dialled = tokio::select! {
            biased;
            () = att.cancel.cancelled() => return Err(att.cancelled_reason(self.live.registration.revoked())),
            r = upstream::dial(&addrs, self.target.port, connect_timeout, first) => r,
        };
        match dialled {
            Ok(up) => {
                att.rec().destination_ip = Some(up.addr.ip());
                Ok(up)
            }
            Err(f) => {
                att.rec().destination_ip = f.addr;
                Err(f.reason)
            }
        }
    }

    pub(crate) fn revoked(&self) -> bool {
        self.live.registration.revoked()
    }

    /// The checked addresses (until the dial).
    pub(crate) fn addrs(&self) -> &[IpAddr] {
        &self.addrs
    }

    /// Dialled: what the relay still needs (the admission, the registration), without what
    /// only the checks did.
    pub(crate) fn into_live(self) -> Live {
        self.live
    }
}

/// A dialled attempt while its bytes move: it holds the agent's concurrency slot and meter,
/// and stays registered (so a reload can revoke it) until dropped.
pub(crate) struct Live {
    pub(crate) admission: Admission,
    registration: TunnelRegistration,
}

impl Live {
    /// What a relay's end means for the record: a normal end (closed, or idled out), or why
    /// it was cut.
    pub(crate) fn outcome(&self, att: &Attempt, end: RelayEnd) -> Result<(), Reason> {
        match end {
            RelayEnd::Closed | RelayEnd::IdleTimeout => Ok(()),
            RelayEnd::Cancelled => Err(att.cancelled_reason(self.registration.revoked())),
            RelayEnd::BudgetExceeded => Err(Reason::BudgetExceeded),
        }
    }

    pub(crate) fn revoked(&self) -> bool {
        self.registration.revoked()
    }
}

/// Step 4 for a TCP tunnel: relay both ways through the agent's meter until either side
/// ends, the tunnel idles out, or its token fires. A plain `fn` returning an `async move`
/// block: an `async fn` would store its arguments twice in every idle tunnel's state.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice in the state of every idle tunnel"
)]
pub(crate) fn relay_tunnel<'a>(
    att: &'a Attempt,
    live: &'a Live,
    (agent_io, up): (&'a TcpStream, &'a TcpStream),
    counters: &'a RelayCounters,
) -> impl Future<Output = Result<(), Reason>> + 'a {
    async move {
        let ctx = &att.ctx;
        let _active = TunnelGauge::open(ctx.telemetry.metrics.agent(&att.agent_name()));
        let end = relay(
            agent_io,
            up,
            ctx.settings.idle_timeout,
            &att.cancel,
            counters,
            &live.admission.shaping,
        )
        .await;
        live.outcome(att, end)
    }
}
