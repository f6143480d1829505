//! Reading what the agent sends first, before any upstream is contacted: the TLS
//! ClientHello (SNI) with a deadline and a byte cap, failing closed (STYLE rule 4).
//! The bytes read are returned so they can be replayed to the upstream unchanged.

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Poll, ready};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::Instant;

use super::sni::{ClientHello, MAX_HELLO_BYTES, MAX_RECORDS, Parse, parse_client_hello};
use crate::policy::Reason;

/// Most bytes we hold while waiting for a complete hello: the largest accepted handshake
/// plus a record header per record.
pub const MAX_PEEK_BYTES: usize = MAX_HELLO_BYTES + 4 + MAX_RECORDS * 5;
/// Bytes asked of the socket per read while waiting for what the agent says first.
const READ_CHUNK: usize = 4096;

/// What one connection may hold of what its agent sent first without asking the shared
/// budget: a whole ordinary hello or request head.
pub const FREE_HANDSHAKE_BYTES: usize = 4096;

/// A budget for the bytes all connections hold in hellos and request heads not yet
/// complete (`caps.max_handshake_bytes`). Beyond their first [`FREE_HANDSHAKE_BYTES`],
/// connections take from it, and a connection that finds it spent is closed as
/// `overloaded`: half-open connections holding most of a 64 KiB hello each cannot add up to
/// gigabytes. Memory held this way is at most `max_connections` × 4 KiB plus the budget.
#[derive(Debug)]
pub struct HandshakeBudget {
    held: AtomicUsize,
    cap: usize,
}

impl HandshakeBudget {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            held: AtomicUsize::new(0),
            cap,
        })
    }

    /// A connection's account, empty.
    pub fn account(self: &Arc<Self>) -> Held {
        Held {
            budget: self.clone(),
            counted: 0,
            total: 0,
        }
    }

    /// Bytes taken from the budget now.
    pub fn in_use(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// One connection's bytes held against the [`HandshakeBudget`]; given back on drop.
#[derive(Debug)]
pub struct Held {
    budget: Arc<HandshakeBudget>,
    /// Taken from the shared budget.
    counted: usize,
    /// Held in all, the free part included.
    total: usize,
}

impl Held {
    /// Account for `n` more bytes; false when the budget has no room for them.
    fn grow(&mut self, n: usize) -> bool {
        let before = self.total;
        self.total = self.total.saturating_add(n);
        let over = self.total.saturating_sub(FREE_HANDSHAKE_BYTES);
        let extra = over.saturating_sub(before.saturating_sub(FREE_HANDSHAKE_BYTES));
        if extra == 0 {
            return true;
        }
        let was = self.budget.held.fetch_add(extra, Ordering::Relaxed);
        self.counted += extra;
        was.saturating_add(extra) <= self.budget.cap
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.counted, Ordering::Relaxed);
    }
}

/// Read from `io` into `buf` until a complete ClientHello, a rejection, EOF, the cap or the
/// deadline. `buf` keeps every byte read, accounted in `held`.
pub async fn read_client_hello<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
    held: &mut Held,
    deadline: Instant,
) -> Result<ClientHello, Reason> {
    loop {
        match parse_client_hello(buf) {
            Parse::Done(hello) => return Ok(hello),
            Parse::Reject(r) => {
                tracing::debug!(reject = ?r, "client hello rejected");
                return Err(Reason::Malformed);
            }
            Parse::NeedMore => {}
        }
        if buf.len() >= MAX_PEEK_BYTES {
            return Err(Reason::Malformed);
        }
        read_more(io, buf, MAX_PEEK_BYTES - buf.len(), held, deadline).await?;
    }
}

/// One read of at most `min(room, 4 KiB)` bytes from `io`, appended to `buf`, before
/// `deadline`. EOF or an error is `Malformed` (the agent stopped before saying enough), the
/// deadline is `Timeout`.
///
/// The read goes into an array on the stack of the poll that makes it (not in the task's
/// state, where it would stay allocated for the tunnel's whole life), and `buf` grows by
/// exactly what was read. A typical hello (0.5–2 KiB) then costs one allocation of its own
/// size: reserving 4 KiB up front made every new tunnel ask glibc for a large block, which
/// merges its free lists first (about 1,700 instructions per tunnel, ~5 % of the proxy's
/// user-space work; callgrind, benches/load).
pub async fn read_more<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
    room: usize,
    held: &mut Held,
    deadline: Instant,
) -> Result<(), Reason> {
    let want = READ_CHUNK.min(room);
    let read = std::future::poll_fn(|cx| {
        let mut stack = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut chunk = ReadBuf::uninit(stack.get_mut(..want).unwrap_or_default());
        ready!(Pin::new(&mut *io).poll_read(cx, &mut chunk))?;
        buf.extend_from_slice(chunk.filled());
        Poll::Ready(Ok::<_, std::io::Error>(chunk.filled().len()))
    });
    match tokio::time::timeout_at(deadline, read).await {
        Ok(Ok(n)) if n > 0 && held.grow(n) => Ok(()),
        Ok(Ok(n)) if n > 0 => Err(Reason::Overloaded),
        Err(_) => Err(Reason::Timeout),
        Ok(_) => Err(Reason::Malformed),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::selftest::packets::client_hello;

    fn budget() -> Arc<HandshakeBudget> {
        HandshakeBudget::new(1 << 20)
    }

    fn soon(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    /// A hello that arrives a few bytes at a time (a 16-byte pipe: dozens of reads) is read
    /// whole; `buf` holds every byte in order, the hello and what followed it, for the
    /// replay.
    #[tokio::test]
    async fn a_hello_in_small_pieces_is_kept_byte_for_byte() {
        let hello = client_hello(Some("pieces.test"), [7; 32]);
        let mut sent = hello.clone();
        sent.extend_from_slice(b"early data");
        let (mut agent, mut gateway) = tokio::io::duplex(16);
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(5) {
                agent.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            agent
        });
        let mut buf = Vec::new();
        let got = read_client_hello(&mut gateway, &mut buf, &mut budget().account(), soon(5000))
            .await
            .unwrap();
        assert_eq!(got.server_name.as_deref(), Some("pieces.test"));
        assert_eq!(got.consumed, hello.len());
        assert_eq!(buf.get(..hello.len()), Some(hello.as_slice()));
        assert!(b"early data".starts_with(buf.get(hello.len()..).unwrap()));
        drop(writer.await.unwrap());
    }

    /// An agent that stops halfway is `Malformed`; one that says nothing hits the deadline.
    #[tokio::test]
    async fn eof_midway_is_malformed_and_silence_times_out() {
        let hello = client_hello(Some("half.test"), [9; 32]);
        let (mut agent, mut gateway) = tokio::io::duplex(4096);
        agent
            .write_all(hello.get(..hello.len() / 2).unwrap())
            .await
            .unwrap();
        drop(agent);
        let mut buf = Vec::new();
        let got =
            read_client_hello(&mut gateway, &mut buf, &mut budget().account(), soon(5000)).await;
        assert_eq!(got.err(), Some(Reason::Malformed));
        assert_eq!(buf.len(), hello.len() / 2);

        let (_silent, mut gateway) = tokio::io::duplex(4096);
        let mut buf = Vec::new();
        let got =
            read_client_hello(&mut gateway, &mut buf, &mut budget().account(), soon(50)).await;
        assert_eq!(got.err(), Some(Reason::Timeout));
        assert!(buf.is_empty());
    }

    /// Past its free 4 KiB, a connection takes from the shared budget, gives it back when it
    /// ends, and is refused as `overloaded` when the budget is spent.
    #[tokio::test]
    async fn big_hellos_share_one_budget_and_give_it_back() {
        let budget = HandshakeBudget::new(10_000);
        // A "hello" that never completes: 0x16 0x03 0x01, a length of 16 KiB, then bytes.
        let mut partial = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x3f, 0xfc];
        partial.resize(12_000, 0x41);
        let mut accounts = Vec::new();
        for i in 0..3 {
            let (mut agent, mut gateway) = tokio::io::duplex(64 * 1024);
            agent.write_all(&partial).await.unwrap();
            let mut buf = Vec::new();
            let mut held = budget.account();
            let r = read_client_hello(&mut gateway, &mut buf, &mut held, soon(200)).await;
            if i < 1 {
                // 12,000 bytes: 4 KiB free, ~8 KiB from the budget; it then waits for more.
                assert_eq!(r.unwrap_err(), Reason::Timeout);
            } else {
                assert_eq!(r.unwrap_err(), Reason::Overloaded, "connection {i}");
            }
            accounts.push((held, agent));
        }
        assert!(budget.in_use() > 10_000);
        drop(accounts);
        assert_eq!(budget.in_use(), 0, "every account gave its bytes back");
        // An ordinary hello never needs the budget, even when it is spent.
        let spent = HandshakeBudget::new(0);
        let hello = client_hello(Some("small.test"), [1; 32]);
        let (mut agent, mut gateway) = tokio::io::duplex(16 * 1024);
        agent.write_all(&hello).await.unwrap();
        let mut buf = Vec::new();
        let got = read_client_hello(&mut gateway, &mut buf, &mut spent.account(), soon(1000)).await;
        assert_eq!(got.unwrap().server_name.as_deref(), Some("small.test"));
    }
}
