//! systemd service notification (`sd_notify(3)`) without libsystemd and without `unsafe`:
//! one datagram per state change on the `AF_UNIX` socket named by `NOTIFY_SOCKET` (a path,
//! or an abstract name written with a leading `@`).
//!
//! - `READY=1` once the gateway is serving (policy and kill state loaded, listeners bound),
//!   so `Type=notify` units only count as started when agents can actually be served;
//! - `STOPPING=1` when SIGTERM starts the drain;
//! - `WATCHDOG=1` every half `WatchdogSec=` (from `WATCHDOG_USEC`), so systemd restarts a
//!   wedged runtime.
//!
//! Notification is best effort: outside systemd (no `NOTIFY_SOCKET`) every call is a no-op,
//! and a failed send is logged at debug level and otherwise ignored: a missing notification
//! never stops the gateway (systemd's own timeouts deal with a service that never reports).

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Send `msg` (e.g. `"READY=1"`) to the notification socket at `socket`: a filesystem path,
/// or `@name` for an abstract socket.
pub fn notify_to(socket: &str, msg: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    if let Some(name) = socket.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
        sock.send_to_addr(msg.as_bytes(), &addr)?;
    } else {
        sock.send_to(msg.as_bytes(), Path::new(socket))?;
    }
    Ok(())
}

/// Send `msg` to `$NOTIFY_SOCKET` if set. Best effort: errors are logged, never returned.
pub fn notify(msg: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return; // not started by systemd (or NotifyAccess=none): nothing to tell
    };
    let Some(socket) = socket.to_str().filter(|s| !s.is_empty()) else {
        tracing::debug!("NOTIFY_SOCKET is empty or not UTF-8; not notifying");
        return;
    };
    if let Err(e) = notify_to(socket, msg) {
        // Ignored on purpose: notification must never take the gateway down.
        tracing::debug!(error = %e, msg, "sd_notify failed");
    }
}

/// How often to send `WATCHDOG=1`: half of `WatchdogSec=`, as sd_watchdog_enabled(3)
/// recommends. `None` when the watchdog is off or meant for another process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok()?;
    let pid = std::env::var("WATCHDOG_PID").ok();
    interval_from(&usec, pid.as_deref(), std::process::id())
}

/// [`watchdog_interval`] on explicit values (testable without touching the environment).
fn interval_from(usec: &str, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok()? != own_pid
    {
        return None; // the watchdog belongs to another process (e.g. our parent)
    }
    let usec = usec.trim().parse::<u64>().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 2))
}

/// Send `WATCHDOG=1` every [`watchdog_interval`] until `stop`. Returns at once when the
/// watchdog is not configured. The pings come from a tokio task, so a runtime that stops
/// scheduling tasks stops pinging and systemd restarts the service.
pub async fn watchdog(stop: CancellationToken) {
    let Some(every) = watchdog_interval() else {
        return;
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => notify("WATCHDOG=1"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ready_reaches_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        notify_to(path.to_str().unwrap(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn ready_reaches_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("portcullis-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        notify_to(&format!("@{name}"), "STOPPING=1").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn missing_socket_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nobody-listens.sock");
        assert!(notify_to(path.to_str().unwrap(), "READY=1").is_err());
    }

    #[test]
    fn watchdog_interval_is_half_and_checks_the_pid() {
        assert_eq!(
            interval_from("30000000", None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            interval_from("30000000", Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(interval_from("30000000", Some("8"), 7), None);
        assert_eq!(interval_from("30000000", Some("x"), 7), None);
        assert_eq!(interval_from("0", None, 7), None);
        assert_eq!(interval_from("soon", None, 7), None);
    }
}
