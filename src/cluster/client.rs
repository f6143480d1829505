//! The one HTTP call a node makes to a peer: a POST of a signed request to the peer's admin
//! listener, one connection per call (`Connection: close`), the whole exchange under one
//! deadline, the answer capped in size.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest answer read from a peer (a sync answer holds at most the store's events).
const MAX_ANSWER: u64 = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the answer is not HTTP")]
    Malformed,
}

/// A peer's answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// POST `body` with `headers` to `path` on `addr`, within `deadline`.
pub async fn post(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    deadline: Duration,
) -> Result<Answer, CallError> {
    tokio::time::timeout(deadline, exchange(addr, path, headers, body))
        .await
        .map_err(|_| CallError::Timeout(deadline))?
}

async fn exchange(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Answer, CallError> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        // Header values come from verified requests or our own signing; a CR or LF would
        // split the request, so such a value is never sent.
        if v.bytes().any(|b| b == b'\r' || b == b'\n') {
            return Err(CallError::Malformed);
        }
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut out = Vec::new();
    stream.take(MAX_ANSWER).read_to_end(&mut out).await?;
    parse(&out)
}

fn parse(raw: &[u8]) -> Result<Answer, CallError> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(CallError::Malformed)?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| CallError::Malformed)?;
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|s| s.parse().ok())
        .ok_or(CallError::Malformed)?;
    Ok(Answer {
        status,
        body: raw[split + 4..].to_vec(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_body() {
        let a = parse(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((a.status, a.body.as_slice()), (401, &b"{}"[..]));
        assert!(parse(b"garbage").is_err());
        assert!(parse(b"SMTP 220\r\n\r\n").is_err());
    }
}
