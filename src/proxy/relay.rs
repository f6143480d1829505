//! Relaying bytes both ways between the agent and the upstream, counting them, with an idle
//! timeout and a cancellation token (kill switch, policy revocation, shutdown).
//!
//! TCP to TCP (every tunnel) goes through `splice(2)` and a pooled pipe (src/sys/splice.rs):
//! bulk bytes never enter user space. Small reads (under 16 KiB: requests, replies, TLS
//! records) are copied through a stack buffer instead, which costs less than splice's two
//! trips through the pipe; a read that fills the buffer switches the burst to splice, and a
//! shorter one ends the burst (see `read_small`). Each direction waits for readability
//! holding nothing, takes a pipe only while data moves, and gives it back empty, so an idle
//! tunnel costs its two sockets and a small task, no buffers. Without a pipe (fd
//! exhaustion) a burst falls back to a buffer copy; non-TCP streams use [`relay_io`], a
//! plain buffered copy.
//!
//! Half-close is propagated: EOF from one side shuts down the write half of the other, and
//! the other direction keeps flowing until it ends too (its EOF needs no `shutdown`: the
//! sockets close right after, which sends the FIN). Byte counts are bytes delivered to the
//! other side, exactly.

use std::io;
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::limits::Shaping;
use crate::limits::bandwidth::throttle;
use crate::sys::splice::{PIPE_CHUNK, Pipe, recv_into, send_from};

/// Buffer of the copy paths (no pipe available, or not TCP).
const BUF: usize = 16 * 1024;
/// A read of less than this is copied through the stack, not spliced (see [`move_now`]).
const SMALL: usize = 16 * 1024;
/// Pipe-fulls moved in one burst before the pipe goes back and the task yields, so one
/// firehose direction cannot hold a worker (or its pipe) forever.
const BURST_CHUNKS: usize = 4;

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

/// What the two directions share: the idle clock (milliseconds since the relay started at
/// the last byte moved) and whether one of them has ended.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    /// One direction has reached EOF (and shut down the other side's write half).
    one_way_done: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            one_way_done: AtomicBool::new(false),
        }
    }
    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn idle_deadline(&self, idle: Duration) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle
    }
}

// The futures a tunnel keeps while idle are built by plain `fn`s returning an `async move`
// block, not by `async fn`s: an `async fn` stores its arguments twice in its state (as the
// call's arguments and as the body's bindings), in every idle tunnel.

/// Relay between two TCP sockets until both directions end, the tunnel idles out, or
/// `cancel` fires. Zero-copy (splice) on Linux.
///
/// The sockets are lent, not given: the caller's state holds them anyway, and moving them in
/// would store each twice in every idle tunnel. They close when the caller drops them.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice in the state of every idle tunnel"
)]
pub fn relay<'a>(
    agent: &'a TcpStream,
    upstream: &'a TcpStream,
    idle: Duration,
    cancel: &'a CancellationToken,
    counters: &'a RelayCounters,
    shaping: &'a Shaping,
) -> impl Future<Output = RelayEnd> + 'a {
    async move {
        let activity = Activity::new();
        // Registered for the tunnel's lifetime so the agent's bandwidth is shared fairly.
        let _share = shaping.bandwidth.as_ref().map(|b| b.open());
        // The pumps are made inside the joined future, so the tunnel's state holds them
        // once; pinned here and lent to `supervise`, so its state holds no second copy.
        let both = std::pin::pin!(async {
            tokio::try_join!(
                pump(agent, upstream, &counters.from_agent, &activity, shaping),
                pump(upstream, agent, &counters.to_agent, &activity, shaping),
            )
            .map(|_| ())
        });
        supervise(both, idle, cancel, &activity, shaping).await
    }
}

/// [`relay`] for any byte streams (a plain buffered copy; the buffers live as long as the
/// tunnel). Used only when the agent side is not a bare TCP socket.
pub async fn relay_io<A, U>(
    agent: A,
    upstream: U,
    idle: Duration,
    cancel: &CancellationToken,
    counters: &RelayCounters,
    shaping: &Shaping,
) -> RelayEnd
where
    A: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut agent_r, mut agent_w) = tokio::io::split(agent);
    let (mut up_r, mut up_w) = tokio::io::split(upstream);
    let activity = Activity::new();
    let _share = shaping.bandwidth.as_ref().map(|b| b.open());
    let both = std::pin::pin!(async {
        tokio::try_join!(
            copy_counted(
                &mut agent_r,
                &mut up_w,
                &counters.from_agent,
                &activity,
                shaping
            ),
            copy_counted(
                &mut up_r,
                &mut agent_w,
                &counters.to_agent,
                &activity,
                shaping
            ),
        )
        .map(|_| ())
    });
    supervise(both, idle, cancel, &activity, shaping).await
}

/// Run both directions (`both`) to their end, under the idle timeout and the cancellation
/// token. An error either way ends the tunnel; EOF one way only half-closes it.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice in the state of every idle tunnel"
)]
fn supervise<'a>(
    mut both: Pin<&'a mut impl Future<Output = io::Result<()>>>,
    idle: Duration,
    cancel: &'a CancellationToken,
    activity: &'a Activity,
    shaping: &'a Shaping,
) -> impl Future<Output = RelayEnd> + 'a {
    async move {
        let mut idle_timer = std::pin::pin!(tokio::time::sleep_until(activity.idle_deadline(idle)));
        let mut cancelled = std::pin::pin!(cancel.cancelled());
        loop {
            tokio::select! {
                _ = both.as_mut() => {
                    return if shaping.spent() {
                        RelayEnd::BudgetExceeded
                    } else {
                        RelayEnd::Closed
                    };
                }
                () = cancelled.as_mut() => return RelayEnd::Cancelled,
                () = idle_timer.as_mut() => {
                    let deadline = activity.idle_deadline(idle);
                    if deadline <= Instant::now() {
                        return RelayEnd::IdleTimeout;
                    }
                    idle_timer.as_mut().reset(deadline);
                }
            }
        }
    }
}

/// How a burst ended.
enum Burst {
    /// `from` has nothing more to read for now.
    Drained,
    /// `from` reached EOF.
    Eof,
}

/// One direction, TCP to TCP: wait (holding nothing) until `from` is readable, move what
/// is there, repeat; on EOF shut down `to`'s write half, unless the other direction has
/// already ended: then both sockets are about to close, and the close sends that FIN.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice in the state of every idle tunnel"
)]
fn pump<'a>(
    from: &'a TcpStream,
    to: &'a TcpStream,
    counter: &'a AtomicU64,
    activity: &'a Activity,
    shaping: &'a Shaping,
) -> impl Future<Output = io::Result<()>> + 'a {
    async move {
        // The last burst was bulk (at least SMALL bytes): the next one is spliced from its
        // first byte, not copied for its first SMALL.
        let mut bulk = false;
        loop {
            // Not `readable()`: its waiter would sit in every idle tunnel's state (152 bytes
            // each way). Only this pump polls `from` for reading, so the stream's own waker
            // slot is enough.
            std::future::poll_fn(|cx| from.poll_read_ready(cx)).await?;
            let before = counter.load(Ordering::Relaxed);
            let burst = match Pipe::take() {
                Ok(mut pipe) => {
                    // Most bursts (a request, a reply) move without waiting: done inline. Only
                    // a burst that must wait is boxed: its state exists only while it waits,
                    // and an idle tunnel's task keeps just this loop's readiness wait.
                    let now = if bulk {
                        Ok(Now::empty_after(0))
                    } else {
                        move_now(&mut pipe, from, to, counter, activity, shaping)
                    };
                    let r = match now {
                        Ok(Now::Done(burst)) => Ok(burst),
                        Ok(Now::Wait { chunks, in_flight }) => {
                            let so_far = (chunks, in_flight);
                            Box::pin(splice_burst(
                                &mut pipe, from, to, counter, activity, shaping, so_far,
                            ))
                            .await
                        }
                        Err(e) => Err(e),
                    };
                    if r.is_ok() {
                        pipe.give_back();
                    }
                    r?
                }
                // No pipe (out of descriptors): this burst goes through a buffer instead.
                Err(_) => Box::pin(copy_burst(from, to, counter, activity, shaping)).await?,
            };
            bulk = counter.load(Ordering::Relaxed).wrapping_sub(before) >= SMALL as u64;
            if let Burst::Eof = burst {
                // Half-close: the other side learns we are done sending, and keeps talking.
                // The second direction to end skips it: the relay ends and the sockets close
                // now, which sends the FIN anyway (`to` has no unread bytes: its own reading
                // ended at EOF, so the close is a FIN, not a reset). One syscall per tunnel.
                if !activity.one_way_done.swap(true, Ordering::Relaxed) {
                    let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
                }
                return Ok(());
            }
        }
    }
}

/// How far [`move_now`] got.
enum Now {
    /// The burst ended without waiting; the pipe is empty.
    Done(Burst),
    /// It must wait (full send buffer, bandwidth limit) or has moved `chunks` pipe-fulls
    /// already; [`splice_burst`] goes on from here, with what is left in the pipe: the end
    /// of a chunk of `in_flight` bytes (0 if the pipe is empty), counted once all are out.
    Wait { chunks: usize, in_flight: usize },
}

impl Now {
    /// Go on the waiting way with an empty pipe, after `chunks` chunks.
    fn empty_after(chunks: usize) -> Self {
        Now::Wait {
            chunks,
            in_flight: 0,
        }
    }
}

/// Pipe size, or less under a byte budget: the budget is charged per chunk delivered, so
/// the chunk bounds how far a tunnel can overshoot it (a small read is at most `SMALL`).
fn chunk_for(shaping: &Shaping) -> usize {
    if shaping.budget.is_some() {
        crate::limits::PIECE
    } else {
        PIPE_CHUNK
    }
}

/// The start of a burst, without waiting. Small reads (a request, a reply, a TLS record)
/// are copied through the stack: for them `recv` + `send` cost less than splice's two trips
/// through the pipe. A read that fills [`SMALL`] is bulk: the rest of the burst is spliced.
/// If `to` cannot take all that was read, the rest goes into the pipe and the burst goes on
/// the waiting way, which sends it first.
fn move_now(
    pipe: &mut Pipe,
    from: &TcpStream,
    to: &TcpStream,
    counter: &AtomicU64,
    activity: &Activity,
    shaping: &Shaping,
) -> io::Result<Now> {
    if shaping.bandwidth.is_some() || pipe.capacity() < SMALL {
        // Every piece waits for its share; or the pipe could not hold an unsent rest.
        return Ok(Now::empty_after(0));
    }
    let mut buf = [MaybeUninit::<u8>::uninit(); SMALL];
    for chunks in 1..=BURST_CHUNKS {
        let read = match read_small(from, &mut buf) {
            Ok([]) => return Ok(Now::Done(Burst::Eof)),
            Ok(read) => read,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Ok(Now::Done(Burst::Drained));
            }
            Err(e) => return Err(e),
        };
        let n = read.len();
        let sent = match to.try_io(Interest::WRITABLE, || send_from(to, read)) {
            Ok(sent) => sent,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        if let Some(rest) = read.get(sent..).filter(|rest| !rest.is_empty()) {
            pipe.push(rest)?;
            return Ok(Now::Wait {
                chunks,
                in_flight: n,
            });
        }
        delivered(n, counter, activity, shaping)?;
        if n == SMALL {
            return Ok(Now::empty_after(chunks));
        }
    }
    Ok(Now::empty_after(BURST_CHUNKS))
}

/// One `recv` into `buf`: the bytes read (empty at EOF).
///
/// A read shorter than `buf` took all the socket held, so it is the burst's last: the
/// readiness is cleared as a `WouldBlock` would clear it, and the next read of the burst
/// stops at that cleared readiness, without the `recv` that would only say `EAGAIN` (one
/// syscall less per message each way). tokio clears with the
/// readiness tick it read before the `recv`: bytes whose event the driver handled after
/// that keep the socket ready, and bytes after the `recv` bring an event of their own, so
/// no wake-up is lost. EOF stays seen (tokio never clears a closed read half). A read cut
/// short at TCP urgent data leaves bytes behind until the sender sends again or the tunnel
/// idles out: only that sender's own bytes wait, as in proxies that read to a short read.
fn read_small<'b>(from: &TcpStream, buf: &'b mut [MaybeUninit<u8>]) -> io::Result<&'b [u8]> {
    let capacity = buf.len();
    let mut short: Option<&'b [u8]> = None;
    let slot = &mut short;
    let read = from.try_io(Interest::READABLE, move || {
        #[cfg(test)]
        tests::RECVS.with(|n| n.set(n.get() + 1));
        let read = recv_into(from, buf)?;
        if read.is_empty() || read.len() == capacity {
            return Ok(read);
        }
        *slot = Some(read);
        Err(io::ErrorKind::WouldBlock.into())
    });
    match (read, short) {
        (Err(e), Some(read)) if e.kind() == io::ErrorKind::WouldBlock => Ok(read),
        (read, _) => read,
    }
}

/// Move bytes `from` → pipe → `to` until `from` would block or hits EOF, going on from
/// where [`move_now`] stopped (`so_far`: chunks moved, bytes of the one still in the
/// pipe). The pipe is empty when this returns `Ok`.
async fn splice_burst(
    pipe: &mut Pipe,
    from: &TcpStream,
    to: &TcpStream,
    counter: &AtomicU64,
    activity: &Activity,
    shaping: &Shaping,
    (mut chunks, mut in_flight): (usize, usize),
) -> io::Result<Burst> {
    let chunk = chunk_for(shaping);
    loop {
        while pipe.pending() > 0 {
            let mut allowed = shaped(shaping, pipe.pending()).await;
            while allowed > 0 {
                match to.try_io(Interest::WRITABLE, || pipe.drain_into(to, allowed)) {
                    Ok(m) => allowed -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
                    Err(e) => return Err(e),
                }
            }
        }
        // Counted per chunk, not per piece: the idle clock reads the time on each count.
        let out = std::mem::take(&mut in_flight);
        if out > 0 {
            delivered(out, counter, activity, shaping)?;
        }
        if chunks > 0 {
            tokio::task::consume_budget().await;
        }
        if chunks >= BURST_CHUNKS {
            return Ok(Burst::Drained);
        }
        match from.try_io(Interest::READABLE, || pipe.fill_from(from, chunk)) {
            Ok(0) => return Ok(Burst::Eof),
            Ok(n) => {
                chunks += 1;
                in_flight = n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
            Err(e) => return Err(e),
        }
    }
}

/// [`splice_burst`] through a user-space buffer, for when no pipe can be had.
async fn copy_burst(
    from: &TcpStream,
    to: &TcpStream,
    counter: &AtomicU64,
    activity: &Activity,
    shaping: &Shaping,
) -> io::Result<Burst> {
    let mut buf = vec![0u8; BUF];
    for _ in 0..BURST_CHUNKS {
        let n = match from.try_read(&mut buf) {
            Ok(0) => return Ok(Burst::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
            Err(e) => return Err(e),
        };
        let mut sent = 0;
        while sent < n {
            let allowed = shaped(shaping, n - sent).await;
            let mut chunk = buf.get(sent..sent + allowed).unwrap_or_default();
            while !chunk.is_empty() {
                match to.try_write(chunk) {
                    Ok(m) => chunk = chunk.get(m..).unwrap_or_default(),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
                    Err(e) => return Err(e),
                }
            }
            sent += allowed;
        }
        delivered(n, counter, activity, shaping)?;
        tokio::task::consume_budget().await;
    }
    Ok(Burst::Drained)
}

/// How many of `want` bytes may go now under the agent's bandwidth limit (waits for it).
async fn shaped(shaping: &Shaping, want: usize) -> usize {
    match &shaping.bandwidth {
        Some(bw) => throttle(bw, want).await.clamp(1, want),
        None => want,
    }
}

/// Count `n` delivered bytes, reset the idle clock, and charge the daily budget; an
/// exhausted budget ends the tunnel.
fn delivered(
    n: usize,
    counter: &AtomicU64,
    activity: &Activity,
    shaping: &Shaping,
) -> io::Result<()> {
    counter.fetch_add(n as u64, Ordering::Relaxed);
    activity.touch();
    if !shaping.charge(n) {
        return Err(io::Error::other("daily byte budget exceeded"));
    }
    Ok(())
}

async fn copy_counted<R, W>(
    reader: &mut R,
    writer: &mut W,
    counter: &AtomicU64,
    activity: &Activity,
    shaping: &Shaping,
) -> io::Result<()>
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
            let allowed = shaped(shaping, n - sent).await;
            let chunk = buf.get(sent..sent + allowed).unwrap_or_default();
            writer.write_all(chunk).await?;
            sent += allowed;
        }
        writer.flush().await?;
        delivered(n, counter, activity, shaping)?;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::net::TcpListener;

    /// Two connected sockets: (the peer's end, the proxy's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (proxy, _) = l.accept().await.unwrap();
        (peer, proxy)
    }

    /// The relay between the proxy's two ends (zero-copy, or the buffered [`relay_io`]) on
    /// its own task, unshaped, with a 10 s idle timeout: its end, and its counters to read
    /// while it runs.
    fn spawn_relay(
        agent_side: TcpStream,
        upstream_side: TcpStream,
        zero_copy: bool,
    ) -> (tokio::task::JoinHandle<RelayEnd>, Arc<RelayCounters>) {
        let counters = Arc::new(RelayCounters::default());
        let relayed = {
            let counters = counters.clone();
            tokio::spawn(async move {
                let (cancel, shaping) = (CancellationToken::new(), Shaping::default());
                let idle = Duration::from_secs(10);
                if zero_copy {
                    relay(
                        &agent_side,
                        &upstream_side,
                        idle,
                        &cancel,
                        &counters,
                        &shaping,
                    )
                    .await
                } else {
                    relay_io(
                        agent_side,
                        upstream_side,
                        idle,
                        &cancel,
                        &counters,
                        &shaping,
                    )
                    .await
                }
            })
        };
        (relayed, counters)
    }

    /// The relay ends (within 5 s) as closed, having counted exactly these bytes each way.
    async fn ended_closed(
        relayed: tokio::task::JoinHandle<RelayEnd>,
        counters: &RelayCounters,
        from_agent: u64,
        to_agent: u64,
    ) {
        let end = tokio::time::timeout(Duration::from_secs(5), relayed)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(end, RelayEnd::Closed);
        assert_eq!(counters.from_agent.load(Ordering::Relaxed), from_agent);
        assert_eq!(counters.to_agent.load(Ordering::Relaxed), to_agent);
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8)
            .collect()
    }

    /// Both directions at once, several MiB each, with half-close: the agent finishes
    /// sending first and still receives everything; bytes arrive intact and are counted
    /// exactly.
    async fn both_ways_with_half_close(zero_copy: bool) {
        let (mut agent, agent_side) = pair().await;
        let (mut upstream, upstream_side) = pair().await;
        let (relayed, counters) = spawn_relay(agent_side, upstream_side, zero_copy);
        let up_bytes = pattern(5 * 1024 * 1024 + 17, 1);
        let down_bytes = pattern(3 * 1024 * 1024 + 5, 2);
        let (mut agent_r, mut agent_w) = agent.split();
        let (mut up_r, mut up_w) = upstream.split();
        let agent_sends = async {
            agent_w.write_all(&up_bytes).await.unwrap();
            agent_w.shutdown().await.unwrap(); // half-close towards the upstream
        };
        let agent_receives = async {
            let mut got = Vec::new();
            agent_r.read_to_end(&mut got).await.unwrap();
            got
        };
        let upstream_side_work = async {
            let mut got = Vec::new();
            up_r.read_to_end(&mut got).await.unwrap(); // sees the agent's EOF...
            up_w.write_all(&down_bytes).await.unwrap(); // ...and still answers
            up_w.shutdown().await.unwrap();
            got
        };
        let run = async { tokio::join!(agent_sends, agent_receives, upstream_side_work) };
        let ((), at_agent, at_upstream) = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("transfer finishes");
        assert!(
            at_upstream == up_bytes,
            "upstream got {} bytes",
            at_upstream.len()
        );
        assert!(at_agent == down_bytes, "agent got {} bytes", at_agent.len());
        ended_closed(
            relayed,
            &counters,
            up_bytes.len() as u64,
            down_bytes.len() as u64,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn zero_copy_relay_carries_both_ways_exactly_with_half_close() {
        both_ways_with_half_close(true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn copy_relay_carries_both_ways_exactly_with_half_close() {
        both_ways_with_half_close(false).await;
    }

    /// The paths a burst can take: small messages that move without waiting (ping-pong, each
    /// must arrive without a later byte to push it), and a reader that does not read, so the
    /// sender's bytes wait in the pipe and the rest of the burst goes the waiting way. Every
    /// byte arrives once, in order, counted; the second EOF closes the agent cleanly (no
    /// reset), though only the first one shut a write half down.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_messages_and_a_paused_reader_arrive_exactly() {
        let (mut agent, agent_side) = pair().await;
        let (mut upstream, upstream_side) = pair().await;
        let (relayed, counters) = spawn_relay(agent_side, upstream_side, true);
        let run = async {
            for i in 0..200u8 {
                let msg = [i; 37];
                agent.write_all(&msg).await.unwrap();
                let mut got = [0u8; 37];
                upstream.read_exact(&mut got).await.unwrap();
                assert_eq!(got, msg);
                upstream.write_all(&got[..5]).await.unwrap();
                let mut back = [0u8; 5];
                agent.read_exact(&mut back).await.unwrap();
                assert_eq!(back, [i; 5]);
            }
            // The upstream reads nothing until the agent has sent all it could.
            let bulk = pattern(6 * 1024 * 1024 + 3, 7);
            let (mut agent_r, mut agent_w) = agent.split();
            let send = async {
                agent_w.write_all(&bulk).await.unwrap();
                agent_w.shutdown().await.unwrap();
            };
            let receive = async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let mut got = Vec::new();
                upstream.read_to_end(&mut got).await.unwrap();
                assert!(got == bulk, "upstream got {} bytes", got.len());
                upstream.shutdown().await.unwrap();
            };
            tokio::join!(send, receive);
            let mut rest = Vec::new();
            agent_r.read_to_end(&mut rest).await.unwrap(); // EOF, not a reset
            assert!(rest.is_empty());
            bulk.len()
        };
        let bulk_len = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("relay keeps up");
        ended_closed(relayed, &counters, 200 * 37 + bulk_len as u64, 200 * 5).await;
    }

    /// Small reads that `to` can take only in part (tiny buffers, a reader that waits): the
    /// unsent rest goes into the pipe and leaves first, so every byte arrives once, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_reads_that_do_not_fit_arrive_in_order() {
        let (mut agent, agent_side) = pair().await;
        let (mut upstream, upstream_side) = pair().await;
        socket2::SockRef::from(&upstream_side)
            .set_send_buffer_size(4096)
            .unwrap();
        socket2::SockRef::from(&upstream)
            .set_recv_buffer_size(4096)
            .unwrap();
        let (relayed, counters) = spawn_relay(agent_side, upstream_side, true);
        let sent = pattern(300 * 1000, 9);
        let run = async {
            let send = async {
                for piece in sent.chunks(1000) {
                    agent.write_all(piece).await.unwrap();
                    tokio::time::sleep(Duration::from_micros(200)).await; // one burst each
                }
                agent.shutdown().await.unwrap();
            };
            let receive = async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let mut got = Vec::new();
                upstream.read_to_end(&mut got).await.unwrap();
                got
            };
            tokio::join!(send, receive).1
        };
        let got = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("relay keeps up");
        assert!(got == sent, "upstream got {} bytes", got.len());
        drop(upstream); // the other direction ends too
        ended_closed(relayed, &counters, sent.len() as u64, 0).await;
    }

    thread_local! {
        /// `recv`s made by [`read_small`] on this thread.
        pub(super) static RECVS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// A short read is its burst's last: one `recv` per small message, not a second one to
    /// hear `EAGAIN`; and the next message, and bytes that arrive with the FIN, still get
    /// through (no wake-up lost by clearing the readiness). One thread: the relay's `recv`s
    /// are the ones counted here.
    #[tokio::test]
    async fn a_short_read_is_the_last_recv_of_its_burst() {
        let (mut agent, agent_side) = pair().await;
        let (mut upstream, upstream_side) = pair().await;
        let (relayed, counters) = spawn_relay(agent_side, upstream_side, true);
        const ROUNDS: usize = 100;
        let run = async {
            let before = RECVS.with(std::cell::Cell::get);
            for i in 0..ROUNDS {
                let msg = [i as u8; 100];
                agent.write_all(&msg).await.unwrap();
                let mut got = [0u8; 100];
                upstream.read_exact(&mut got).await.unwrap();
                assert_eq!(got, msg);
                upstream.write_all(&got[..60]).await.unwrap();
                let mut back = [0u8; 60];
                agent.read_exact(&mut back).await.unwrap();
                assert_eq!(back, [i as u8; 60]);
            }
            let recvs = RECVS.with(std::cell::Cell::get) - before;
            // One per message each way; a few more if a message ever came in two segments.
            assert!(
                (2 * ROUNDS..2 * ROUNDS + 10).contains(&recvs),
                "{recvs} recvs for {} messages",
                2 * ROUNDS
            );
            // Bytes and FIN back to back, both ways.
            agent.write_all(b"last words").await.unwrap();
            agent.shutdown().await.unwrap();
            let mut got = Vec::new();
            upstream.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"last words");
            upstream.write_all(b"bye").await.unwrap();
            upstream.shutdown().await.unwrap();
            let mut back = Vec::new();
            agent.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"bye");
        };
        tokio::time::timeout(Duration::from_secs(20), run)
            .await
            .expect("no wake-up lost");
        let (up, down) = (ROUNDS as u64 * 100 + 10, ROUNDS as u64 * 60 + 3);
        ended_closed(relayed, &counters, up, down).await;
    }

    #[tokio::test]
    async fn an_idle_tunnel_times_out_and_a_cancelled_one_stops() {
        let (_agent, agent_side) = pair().await;
        let (_upstream, upstream_side) = pair().await;
        let counters = RelayCounters::default();
        let shaping = Shaping::default();
        let cancel = CancellationToken::new();
        let started = Instant::now();
        let idle = Duration::from_millis(200);
        let end = relay(
            &agent_side,
            &upstream_side,
            idle,
            &cancel,
            &counters,
            &shaping,
        )
        .await;
        assert_eq!(end, RelayEnd::IdleTimeout);
        assert!(started.elapsed() >= idle);

        let (_agent, agent_side) = pair().await;
        let (_upstream, upstream_side) = pair().await;
        cancel.cancel();
        let idle = Duration::from_secs(60);
        let end = tokio::time::timeout(
            Duration::from_secs(5),
            relay(
                &agent_side,
                &upstream_side,
                idle,
                &cancel,
                &counters,
                &shaping,
            ),
        )
        .await
        .unwrap();
        assert_eq!(end, RelayEnd::Cancelled);
    }
}
