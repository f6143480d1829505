//! The TLS alert that refuses a ClientHello: one plaintext record, content type 21, framed
//! with the version of the hello's first record, carrying a fatal (2) `access_denied` (49)
//! alert (RFC 8446 §6), so a client reports "alert access denied" instead of an
//! unexpected EOF. portcullis does not terminate TLS: the alert is the one thing a proxy
//! that has read only the hello can say in the protocol.
//!
//! Sent only on the deny path, only after a complete, well-formed ClientHello (a
//! [`HelloAlert`] is made from a parsed [`ClientHello`] and nothing else), and only for
//! refusals that would be the same on a retry ([`refuses_hello`]). A malformed stream, a
//! timeout or an upstream failure still gets a bare close.
//!
//! After the alert the write half is shut and what the client still sends is read and
//! dropped, briefly (500 ms, 64 KiB): closing a socket with unread bytes sends a reset, which
//! can destroy the alert before the client reads it. The transparent listener hands that
//! drain to a task of its own ([`HelloAlert::write_and_linger`], at most 1,024 at once), so
//! the connection's future keeps no state for it; a tunnel awaits it boxed
//! ([`HelloAlert::send`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::policy::Reason;
use crate::proxy::sni::ClientHello;
use crate::shutdown::Shutdown;

const CONTENT_TYPE_ALERT: u8 = 21;
const LEVEL_FATAL: u8 = 2;
/// RFC 8446 §6.2 `access_denied`.
pub(crate) const ACCESS_DENIED: u8 = 49;
/// Writing the alert, then reading what the client still sends until it closes: each
/// bounded by this.
const LINGER: Duration = Duration::from_millis(500);
/// At most this much is read (and discarded) after the alert.
const LINGER_BYTES: usize = 64 * 1024;
/// Refused connections draining at once, at most (they hold no connection slot): past it,
/// the alert is written and the socket closed without the drain.
const MAX_LINGERING: usize = 1024;
static LINGERING: AtomicUsize = AtomicUsize::new(0);

/// Whether a refusal of a parsed hello gets the alert: the policy's refusals and the
/// agent's limits, which a retry would meet again. Failures of the path (resolution,
/// upstream, deadlines) and the gateway's own state keep the bare close that a network
/// fault looks like, because that is what they are.
pub(crate) fn refuses_hello(reason: Reason) -> bool {
    match reason {
        Reason::NotAllowed
        | Reason::DeniedRule
        | Reason::UnknownAgent
        | Reason::AuthRequired
        | Reason::AuthFailed
        | Reason::AuthThrottled
        | Reason::PrivateAddress
        | Reason::IpLiteral
        | Reason::SniMismatch
        | Reason::NoSni
        | Reason::EchDenied
        | Reason::RateLimited
        | Reason::BudgetExceeded
        | Reason::KillSwitch
        | Reason::PolicyRevoked => true,
        Reason::Malformed
        | Reason::Timeout
        | Reason::ResolveFailed
        | Reason::UpstreamFailed
        | Reason::Overloaded
        | Reason::ShuttingDown
        | Reason::InternalError => false,
    }
}

/// The alert for one parsed hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HelloAlert {
    record_version: u16,
}

impl HelloAlert {
    pub(crate) fn for_hello(hello: &ClientHello) -> Self {
        Self {
            record_version: hello.record_version,
        }
    }

    /// The record: type 21, the hello's record version, length 2, fatal, access_denied.
    pub(crate) fn bytes(self) -> [u8; 7] {
        let [major, minor] = self.record_version.to_be_bytes();
        [
            CONTENT_TYPE_ALERT,
            major,
            minor,
            0,
            2,
            LEVEL_FATAL,
            ACCESS_DENIED,
        ]
    }

    /// [`HelloAlert::send`] for a bare socket that is closed next, without waiting: the
    /// alert goes into the send buffer now (nothing was ever written to it, so 7 bytes fit),
    /// the write half is shut, and the drain runs on its own task, bounded like `send`'s
    /// and by [`MAX_LINGERING`].
    pub(crate) fn write_and_linger(self, stream: TcpStream, shutdown: &Shutdown) {
        if !matches!(stream.try_write(&self.bytes()), Ok(7)) {
            return;
        }
        let _ = socket2::SockRef::from(&stream).shutdown(std::net::Shutdown::Write);
        if LINGERING.fetch_add(1, Ordering::Relaxed) >= MAX_LINGERING {
            LINGERING.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        shutdown.spawn(async move {
            let mut stream = stream;
            let _ = tokio::time::timeout(LINGER, drain(&mut stream)).await;
            LINGERING.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// Write the alert and close the write half; then read (and drop) what the client
    /// still sends until it closes, briefly: closing with unread bytes would reset the
    /// connection, and the reset can destroy the alert before the client reads it.
    pub(crate) async fn send<S: AsyncRead + AsyncWrite + Unpin>(self, io: &mut S) {
        let alert = self.bytes();
        let written = tokio::time::timeout(LINGER, async {
            io.write_all(&alert).await?;
            io.shutdown().await
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            return;
        }
        let _ = tokio::time::timeout(LINGER, drain(io)).await;
    }
}

/// Read and drop what the peer sends until it closes, or [`LINGER_BYTES`].
async fn drain<S: AsyncRead + Unpin>(io: &mut S) {
    let mut buf = [0u8; 2048];
    let mut read = 0;
    while read < LINGER_BYTES {
        match io.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => read += n,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::proxy::sni::{Parse, parse_client_hello};
    use crate::selftest::packets::client_hello;

    fn parsed(bytes: &[u8]) -> ClientHello {
        match parse_client_hello(bytes) {
            Parse::Done(h) => h,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_alert_is_fatal_access_denied_in_the_hellos_record_version() {
        let mut hello = client_hello(Some("denied.test"), [3; 32]);
        assert_eq!(
            HelloAlert::for_hello(&parsed(&hello)).bytes(),
            [21, 3, 1, 0, 2, 2, 49]
        );
        hello[2] = 3;
        assert_eq!(
            HelloAlert::for_hello(&parsed(&hello)).bytes(),
            [21, 3, 3, 0, 2, 2, 49]
        );
    }

    #[test]
    fn only_lasting_refusals_get_the_alert() {
        assert!(refuses_hello(Reason::NotAllowed));
        assert!(refuses_hello(Reason::NoSni));
        assert!(refuses_hello(Reason::SniMismatch));
        assert!(!refuses_hello(Reason::Malformed));
        assert!(!refuses_hello(Reason::Timeout));
        assert!(!refuses_hello(Reason::UpstreamFailed));
        assert!(!refuses_hello(Reason::ResolveFailed));
    }

    /// On real sockets, the connection handed over at once: the client that sent more than
    /// its hello (bytes the gateway never read) still reads the alert, then EOF, no reset.
    #[tokio::test]
    async fn written_and_lingered_the_alert_survives_unread_bytes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (gateway, _) = listener.accept().await.unwrap();
        client.write_all(&[0x17; 3000]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let shutdown = crate::shutdown::Shutdown::new();
        HelloAlert {
            record_version: 0x0301,
        }
        .write_and_linger(gateway, &shutdown);
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), client.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, [21, 3, 1, 0, 2, 2, 49]);
        drop(client);
        shutdown.stop_accepting();
        tokio::time::timeout(LINGER + Duration::from_secs(1), shutdown.wait())
            .await
            .unwrap();
    }

    /// The client reads the alert, then EOF (a FIN, not a reset), even though it sent more
    /// after its hello; and the gateway side does not wait past its bound for a client
    /// that never closes.
    #[tokio::test]
    async fn the_alert_arrives_before_a_clean_close() {
        let (mut client, mut gateway) = tokio::io::duplex(64 * 1024);
        client
            .write_all(b"more bytes after the hello")
            .await
            .unwrap();
        let alert = HelloAlert {
            record_version: 0x0303,
        };
        let sent = tokio::spawn(async move {
            alert.send(&mut gateway).await;
        });
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, [21, 3, 3, 0, 2, 2, 49]);
        let started = std::time::Instant::now();
        sent.await.unwrap();
        assert!(started.elapsed() < LINGER + Duration::from_millis(300));
    }
}
