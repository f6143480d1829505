//! Reading what the agent sends first, before any upstream is contacted: the TLS
//! ClientHello (SNI) with a deadline and a byte cap, failing closed (STYLE rule 4).
//! The bytes read are returned so they can be replayed to the upstream unchanged.

use std::mem::MaybeUninit;
use std::pin::Pin;
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

/// Read from `io` into `buf` until a complete ClientHello, a rejection, EOF, the cap or the
/// deadline. `buf` keeps every byte read.
pub async fn read_client_hello<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
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
        read_more(io, buf, MAX_PEEK_BYTES - buf.len(), deadline).await?;
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
        Ok(Ok(n)) if n > 0 => Ok(()),
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
        let got = read_client_hello(&mut gateway, &mut buf, soon(5000))
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
        let got = read_client_hello(&mut gateway, &mut buf, soon(5000)).await;
        assert_eq!(got.err(), Some(Reason::Malformed));
        assert_eq!(buf.len(), hello.len() / 2);

        let (_silent, mut gateway) = tokio::io::duplex(4096);
        let mut buf = Vec::new();
        let got = read_client_hello(&mut gateway, &mut buf, soon(50)).await;
        assert_eq!(got.err(), Some(Reason::Timeout));
        assert!(buf.is_empty());
    }
}
