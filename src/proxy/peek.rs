//! Reading what the agent sends first, before any upstream is contacted: the TLS
//! ClientHello (SNI) with a deadline and a byte cap, failing closed (STYLE rule 4).
//! The bytes read are returned so they can be replayed to the upstream unchanged.

use tokio::io::{AsyncRead, AsyncReadExt};
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
/// deadline is `Timeout`. Reads straight into `buf`: no array in the task's state, where it
/// would stay allocated for the tunnel's whole life.
pub async fn read_more<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
    room: usize,
    deadline: Instant,
) -> Result<(), Reason> {
    let want = READ_CHUNK.min(room);
    buf.reserve(want);
    // Into the spare capacity, which needs no zeroing first; `buf` grows by what was read.
    let mut spare = bytes::BufMut::limit(&mut *buf, want);
    match tokio::time::timeout_at(deadline, io.read_buf(&mut spare)).await {
        Ok(Ok(n)) if n > 0 => Ok(()),
        Err(_) => Err(Reason::Timeout),
        Ok(_) => Err(Reason::Malformed),
    }
}
