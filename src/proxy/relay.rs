//! Relaying bytes both ways between the agent and the upstream, counting them, with an idle
//! timeout and a cancellation token (kill switch, policy revocation, shutdown).
//!
//! Half-close is propagated: EOF from one side shuts down the write half of the other, and
//! the other direction keeps flowing until it ends too.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::limits::Shaping;
use crate::limits::bandwidth::throttle;

const BUF: usize = 16 * 1024;

/// Why the relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both directions reached EOF (or one side errored, which ends the tunnel).
    Closed,
    IdleTimeout,
    Cancelled,
    /// The agent's daily byte budget ran out mid-tunnel.
    BudgetExceeded,
}

/// Byte counts, readable while the relay runs.
#[derive(Debug, Default)]
pub struct RelayCounters {
    pub from_agent: AtomicU64,
    pub to_agent: AtomicU64,
}

/// Relay until both directions end, the tunnel idles out, or `cancel` fires.
pub async fn relay<A, U>(
    agent: A,
    upstream: U,
    idle: Duration,
    cancel: &CancellationToken,
    counters: &Arc<RelayCounters>,
    shaping: &Shaping,
) -> RelayEnd
where
    A: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut agent_r, mut agent_w) = tokio::io::split(agent);
    let (mut up_r, mut up_w) = tokio::io::split(upstream);
    let start = Instant::now();
    let last_activity = AtomicU64::new(0);
    let touch = || {
        last_activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    };
    // Registered for the tunnel's lifetime so the agent's bandwidth is shared fairly.
    let _share = shaping.bandwidth.as_ref().map(|b| b.open());
    let up = copy_counted(
        &mut agent_r,
        &mut up_w,
        &counters.from_agent,
        &touch,
        shaping,
    );
    let down = copy_counted(&mut up_r, &mut agent_w, &counters.to_agent, &touch, shaping);
    // An error either way ends the tunnel; EOF one way only half-closes it.
    let both = async {
        let _ = tokio::try_join!(up, down);
    };
    tokio::pin!(both);
    loop {
        let deadline = start + Duration::from_millis(last_activity.load(Ordering::Relaxed)) + idle;
        tokio::select! {
            _ = &mut both => {
                return if shaping.budget.as_ref().is_some_and(|b| b.tripped()) {
                    RelayEnd::BudgetExceeded
                } else {
                    RelayEnd::Closed
                };
            }
            () = cancel.cancelled() => return RelayEnd::Cancelled,
            () = tokio::time::sleep_until(deadline) => {
                let latest = start + Duration::from_millis(last_activity.load(Ordering::Relaxed)) + idle;
                if latest <= Instant::now() {
                    return RelayEnd::IdleTimeout;
                }
            }
        }
    }
}

async fn copy_counted<R, W>(
    reader: &mut R,
    writer: &mut W,
    counter: &AtomicU64,
    touch: &impl Fn(),
    shaping: &Shaping,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            // Half-close: tell the other side we are done sending, keep reading its way.
            let _ = writer.shutdown().await;
            return Ok(());
        }
        let mut sent = 0;
        while sent < n {
            let allowed = match &shaping.bandwidth {
                Some(bw) => throttle(bw, n - sent).await.clamp(1, n - sent),
                None => n - sent,
            };
            let chunk = buf.get(sent..sent + allowed).unwrap_or_default();
            writer.write_all(chunk).await?;
            sent += allowed;
        }
        writer.flush().await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        touch();
        if let Some(budget) = &shaping.budget
            && !budget.charge(n as u64)
        {
            return Err(std::io::Error::other("daily byte budget exceeded"));
        }
    }
}
