//! What the cluster (src/cluster/, docs/cluster.md) needs from the kill switch, and nothing
//! more: verifying a signed request a peer relays (our own keys, an age bound instead of the
//! 5-minute window: a peer may have been down), reviving from a relayed request (the TOTP
//! code checked at the request's own timestamp, last signed event wins), signing a request
//! made on the control socket so peers can verify it, and the start-up hold.
//!
//! Must not: trust anything a peer says that is not signed with one of our keys, or count a
//! genuine relayed revive as a failed attempt.

use std::sync::atomic::Ordering;

use super::*;

/// What a relayed kill or revive did here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    /// The state changed.
    Applied,
    /// Verified, remembered, but nothing to change: a later kill stands, or nothing was
    /// killed.
    NoEffect,
}

/// A relayed revive's TOTP code and the time its request was signed (the code is checked
/// for that time, not for now).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SignedCode<'a> {
    pub code: &'a str,
    pub signed_at: i64,
}

impl KillSwitch {
    /// Refuse every agent (as killed) until the cluster's start-up sync is over, or stop.
    pub(crate) fn hold(&self, on: bool) {
        self.held.store(on, Ordering::Relaxed);
    }

    pub(crate) fn held(&self) -> bool {
        self.held.load(Ordering::Relaxed)
    }

    /// Check a request a peer relayed: signed with one of **our** keys, dated at most
    /// `max_age` seconds ago and at most [`webhook::FUTURE_SKEW_SECS`] ahead. No replay guard
    /// here: the cluster's event store knows which ids were applied. Every refusal is logged
    /// and counted like a direct one.
    pub(crate) fn verify_relayed(
        &self,
        action: &'static str,
        req: &Signed<'_>,
        now: i64,
        max_age: i64,
    ) -> Result<(Sender, i64), KillError> {
        if self.secrets.is_empty() {
            return Err(KillError::NotConfigured);
        }
        let checked = relayed_timestamp(req.request.timestamp, now, max_age).and_then(|ts| {
            // The window is judged above; `verify` judges it against the request itself.
            webhook::verify(&self.secrets, &req.request, ts).map(|index| (index, ts))
        });
        match checked {
            Ok((index, ts)) => self
                .senders
                .get(index)
                .cloned()
                .map(|s| (s, ts))
                .ok_or(KillError::Unauthorized(WebhookError::BadSignature)),
            Err(e) => {
                self.refused(action, e.reason(), None, req.source, None);
                Err(KillError::Unauthorized(e))
            }
        }
    }

    /// Remember a relayed request's id in the replay guard, so the same request sent here
    /// directly is a replay.
    pub(crate) fn remember_relayed(&self, id: &str, ts: i64, now: i64) {
        let _ = self
            .replay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check_and_remember(id, ts, now);
    }

    /// Revive from a request a peer relayed (already verified by [`Self::verify_relayed`],
    /// within the 5-minute window for a revive). Refused, not counted, while revive is
    /// locked for the sender here; the code is checked against the time its request was
    /// signed (the peer may relay it minutes later): a wrong code is counted like any failed
    /// attempt, a right one is not; a right code whose step is already spent here opens
    /// nothing. The last signed event wins: only kills dated at or before the signing time
    /// are lifted, so a revive cannot undo a later kill.
    pub(crate) async fn revive_relayed(
        &self,
        scope: Scope,
        code: SignedCode<'_>,
        by: Accepted<'_>,
        now: i64,
        policy: &Arc<Policy>,
        nets: &[IpNet],
    ) -> Result<Effect, KillError> {
        let totp = self.totp.as_ref().ok_or(KillError::ReviveNotConfigured)?;
        let SignedCode { code, signed_at } = code;
        let (sender, source) = (by.sender, by.source);
        let mut ledger = self.ops.lock().await;
        if let Some(until) = ledger
            .state
            .guard
            .attempts
            .locked_until(sender.as_str(), now)
        {
            drop(ledger);
            self.refused("revive", "totp_locked", Some(sender), source, Some(until));
            return Err(KillError::Locked { until });
        }
        let step = u64::try_from(signed_at)
            .ok()
            .and_then(|t| totp.matching_step(code, t));
        let Some(step) = step else {
            let mut next = ledger.state.clone();
            let locked_until = next.guard.attempts.failed(sender.as_str(), now);
            let _ = self.write(&next).await;
            ledger.state = next;
            drop(ledger);
            self.refused("revive", "totp_invalid", Some(sender), source, locked_until);
            return Err(KillError::BadTotp { locked_until });
        };
        if ledger
            .state
            .guard
            .totp_last_step
            .is_some_and(|last| step <= last)
        {
            // The right code, already spent here (the same person's revive arriving twice,
            // or a spent code under another request): not a guess, so not counted, and it
            // opens nothing.
            return Ok(Effect::NoEffect);
        }
        let mut next = ledger.state.clone();
        // The step is spent here too: the same code cannot open this node afterwards.
        next.guard.totp_last_step = next.guard.totp_last_step.max(Some(step));
        next.guard.attempts.succeeded(sender.as_str());
        remember_id(&mut next, by.id, now);
        let before = (next.all.is_some(), next.agents.len());
        let mut corrupt = ledger.corrupt.clone();
        match &scope {
            Scope::All => {
                if next.all.as_ref().is_none_or(|e| e.at_unix <= signed_at) {
                    next.all = None;
                    corrupt = None;
                }
                next.agents.retain(|_, e| e.at_unix > signed_at);
            }
            Scope::Agent(a) => {
                if next.agents.get(a).is_some_and(|e| e.at_unix <= signed_at) {
                    next.agents.remove(a);
                }
            }
        }
        let effect = if (next.all.is_some(), next.agents.len()) == before {
            Effect::NoEffect
        } else {
            Effect::Applied
        };
        if !self.write(&next).await {
            ledger.state.guard.totp_last_step = next.guard.totp_last_step;
            return Err(KillError::NotWritten);
        }
        ledger.state = next.clone();
        ledger.corrupt = corrupt.clone();
        self.view.store(Arc::new(View {
            state: next,
            corrupt,
        }));
        drop(ledger);
        if effect == Effect::NoEffect {
            return Ok(effect);
        }
        self.renew_tokens(&scope);
        let nft = self.sync_nft(policy, nets).await;
        let metrics = &self.telemetry.metrics;
        if scope == Scope::All {
            for (_, a) in policy.agents() {
                metrics.set_kill_switch(&a.name, self.is_killed(&a.name));
            }
        }
        metrics.set_kill_switch(scope.label(), false);
        tracing::warn!(scope = scope.label(), by = sender.as_str(), %nft, "kill switch revived by a request a peer relayed");
        self.telemetry.event(
            "kill_switch",
            &[
                ("event.action", "revive".into()),
                ("portcullis.kill_switch.scope", scope.label().into()),
                ("portcullis.kill_switch.sender", sender.as_str().into()),
                ("portcullis.kill_switch.relayed", true.into()),
            ],
        );
        Ok(effect)
    }

    /// Sign a request made on the control socket with the first webhook key, so peers can
    /// verify it like any other (the gateway holds the key anyway). `None` without a key:
    /// then the request stays on this node.
    pub(crate) fn sign_local(&self, id: &str, ts: i64, body: &[u8]) -> Option<String> {
        self.secrets
            .first()
            .map(|secret| webhook::sign(secret, id, ts, body))
    }
}

/// A relayed request's timestamp: decimal digits, at most `max_age` seconds old and at most
/// [`webhook::FUTURE_SKEW_SECS`] ahead of `now`.
fn relayed_timestamp(text: &str, now: i64, max_age: i64) -> Result<i64, WebhookError> {
    if text.is_empty() || text.len() > 18 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(WebhookError::BadTimestamp);
    }
    let ts: i64 = text.parse().map_err(|_| WebhookError::BadTimestamp)?;
    if ts < now.saturating_sub(max_age) {
        return Err(WebhookError::Expired);
    }
    if ts > now.saturating_add(webhook::FUTURE_SKEW_SECS) {
        return Err(WebhookError::Future);
    }
    Ok(ts)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_relayed_timestamp_is_bounded_by_the_age_not_the_window() {
        let now = 1_000_000;
        assert_eq!(relayed_timestamp("999000", now, 3_600), Ok(999_000));
        assert_eq!(
            relayed_timestamp("996399", now, 3_600),
            Err(WebhookError::Expired)
        );
        assert_eq!(
            relayed_timestamp("1000061", now, 3_600),
            Err(WebhookError::Future)
        );
        for bad in ["", "+5", "-5", "12a", "1234567890123456789"] {
            assert_eq!(
                relayed_timestamp(bad, now, 3_600),
                Err(WebhookError::BadTimestamp)
            );
        }
    }
}
