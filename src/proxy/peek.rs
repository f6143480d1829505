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

/// Read from `io` into `buf` until a complete ClientHello, a rejection, EOF, the cap or the
/// deadline. `buf` keeps every byte read.
pub async fn read_client_hello<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> Result<ClientHello, Reason> {
    let mut chunk = [0u8; 4096];
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
        let want = chunk.len().min(MAX_PEEK_BYTES - buf.len());
        let Some(dst) = chunk.get_mut(..want) else {
            return Err(Reason::Malformed);
        };
        match tokio::time::timeout_at(deadline, io.read(dst)).await {
            Err(_) => return Err(Reason::Timeout),
            Ok(Err(_)) | Ok(Ok(0)) => return Err(Reason::Malformed),
            Ok(Ok(n)) => buf.extend_from_slice(dst.get(..n).unwrap_or_default()),
        }
    }
}
