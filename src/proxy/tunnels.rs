//! Live tunnels, so that a reload can check each of them against the new policy and cut
//! those it no longer allows (`policy_revoked`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::hash::RuleKeyMap;
use crate::policy::{Policy, Target};

/// Live tunnels, so a new policy can be checked against each of them.
#[derive(Debug, Default)]
pub struct Tunnels {
    next: AtomicU64,
    live: Mutex<RuleKeyMap<u64, TunnelEntry>>,
}

#[derive(Debug)]
struct TunnelEntry {
    agent: Arc<str>,
    target: Target,
    /// The addresses the decision checked.
    addrs: Vec<std::net::IpAddr>,
    shaped_by: ShapedBy,
    cancel: CancellationToken,
    revoked: Arc<AtomicBool>,
}

/// The limits a live tunnel is shaped by (bandwidth, daily budget): a reload that changes
/// them revokes the tunnel, which the agent reopens under the new ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShapedBy {
    bandwidth: Option<u64>,
    daily_bytes: Option<u64>,
}

impl ShapedBy {
    pub fn of(limits: Option<&crate::policy::Limits>) -> Self {
        limits.map_or_else(Self::default, |l| Self {
            bandwidth: l.bandwidth_bytes_per_second,
            daily_bytes: l.daily_bytes,
        })
    }
}

/// Would `policy` still allow `agent`'s tunnel to `target` at `addrs`, shaped as it is:
/// everything the decision relied on (name rules, address checks, limits).
pub fn still_allowed(
    policy: &Policy,
    agent: &str,
    (target, addrs): (&Target, &[std::net::IpAddr]),
    shaped_by: ShapedBy,
) -> bool {
    let limits = policy
        .agent_by_name(agent)
        .and_then(|id| policy.agent(id))
        .map(|a| &a.limits);
    policy.still_allows(agent, target, addrs) && ShapedBy::of(limits) == shaped_by
}

/// Registration of one live tunnel; removed on drop.
#[derive(Debug)]
pub struct TunnelRegistration {
    tunnels: Arc<Tunnels>,
    id: u64,
    revoked: Arc<AtomicBool>,
}

impl TunnelRegistration {
    /// True when a reload cancelled this tunnel.
    pub fn revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }
}

impl Drop for TunnelRegistration {
    fn drop(&mut self) {
        self.tunnels.lock_live().remove(&self.id);
    }
}

impl Tunnels {
    /// The live map, even after a panic elsewhere poisoned the lock: skipping it would let
    /// a tunnel escape revocation (fail open); every update to it is a single insert/remove.
    fn lock_live(&self) -> std::sync::MutexGuard<'_, RuleKeyMap<u64, TunnelEntry>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Register a tunnel of `agent` to `target` at `addrs`, cancelled through `cancel` if
    /// revoked. The caller then checks the live policy once ([`Policy::still_allows`]): a reload
    /// that swapped the policy between the decision and this registration is caught there,
    /// every later one by [`Tunnels::revoke_disallowed`].
    pub fn register(
        self: &Arc<Self>,
        agent: Arc<str>,
        target: Target,
        addrs: Vec<std::net::IpAddr>,
        shaped_by: ShapedBy,
        cancel: CancellationToken,
    ) -> TunnelRegistration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let revoked = Arc::new(AtomicBool::new(false));
        self.lock_live().insert(
            id,
            TunnelEntry {
                agent,
                target,
                addrs,
                shaped_by,
                cancel,
                revoked: revoked.clone(),
            },
        );
        TunnelRegistration {
            tunnels: self.clone(),
            id,
            revoked,
        }
    }

    /// Cancel every tunnel `policy` no longer allows (agent gone, target denied, or an
    /// address no longer covered by `allow_cidrs`). Returns how many were revoked. The lock
    /// is held only to collect, never across I/O.
    pub fn revoke_disallowed(&self, policy: &Policy) -> usize {
        let live = self.lock_live();
        let mut n = 0;
        for entry in live.values() {
            if !still_allowed(
                policy,
                &entry.agent,
                (&entry.target, &entry.addrs),
                entry.shaped_by,
            ) {
                entry.revoked.store(true, Ordering::Release);
                entry.cancel.cancel();
                n += 1;
            }
        }
        n
    }

    pub fn len(&self) -> usize {
        self.lock_live().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
