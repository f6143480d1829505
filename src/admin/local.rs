//! The local control socket: what `portcullis kill`, `revive`, `status`, `unlock-revive` and
//! `reload` use on the gateway itself. A Unix socket in the state directory, mode 0600,
//! and every peer is checked by its credentials (root or the service's own user), so the
//! file system is the authentication: no webhook secret, and none of the network-facing
//! guards (connection cap, replay memory) stand between an operator and a kill.
//!
//! One request per connection: a JSON line in, a JSON line out (`{"status": 200, "body":
//! {...}}`). Revive still needs the TOTP code, counted under the sender `local`.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use super::{kill_error_parts, unix_now};
use crate::admin::AdminContext as Shared;
use crate::cluster::store::Action;
use crate::killswitch::{self, Accepted, KillSwitch, Sender};

/// A request line is a few hundred bytes.
const MAX_REQUEST: u64 = 4 * 1024;
/// Connections served at once; more wait in the backlog.
const MAX_CONNECTIONS: usize = 16;
/// The whole exchange, read to write.
const DEADLINE: Duration = Duration::from_secs(10);

/// One control request.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum ControlRequest {
    Kill {
        #[serde(default)]
        agent: Option<String>,
        #[serde(default)]
        reason: Option<String>,
    },
    Revive {
        #[serde(default)]
        agent: Option<String>,
        totp: String,
    },
    Status,
    UnlockRevive,
    Reload,
}

/// Bind the socket at `path`: a stale socket from an earlier run is replaced, anything else
/// at the path is an error. Mode 0600 (peers are checked by credentials as well).
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Root, or the user this process runs as.
fn peer_allowed(stream: &UnixStream) -> bool {
    let me = rustix::process::geteuid().as_raw();
    stream
        .peer_cred()
        .is_ok_and(|c| c.uid() == 0 || c.uid() == me)
}

pub async fn serve(shared: Arc<Shared>, listener: UnixListener) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            () = shared.shutdown.stopping() => return,
            r = listener.accept() => r,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let shared = shared.clone();
        shared.clone().shutdown.spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(DEADLINE, exchange(shared, stream)).await;
        });
    }
}

async fn exchange(shared: Arc<Shared>, stream: UnixStream) -> io::Result<()> {
    if !peer_allowed(&stream) {
        tracing::warn!("control socket: refused a peer that is neither root nor the service user");
        return Ok(());
    }
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST))
        .read_line(&mut line)
        .await?;
    let (status, body) = match serde_json::from_str::<ControlRequest>(line.trim()) {
        // In a task of its own: the deadline or a client that goes away drops only the
        // answer, never a kill half-way.
        Ok(request) => {
            let task = shared.shutdown.spawn(handle(shared.clone(), request));
            task.await.unwrap_or((
                500,
                serde_json::json!({ "error": "the control task failed" }),
            ))
        }
        Err(e) => (400, serde_json::json!({ "error": format!("request: {e}") })),
    };
    let mut out = serde_json::json!({ "status": status, "body": body }).to_string();
    out.push('\n');
    write.write_all(out.as_bytes()).await?;
    write.shutdown().await
}

async fn handle(shared: Arc<Shared>, request: ControlRequest) -> (u16, serde_json::Value) {
    let ks = &shared.killswitch;
    let now = unix_now();
    let local = Sender::local();
    let by = Accepted {
        sender: &local,
        id: None,
        source: None,
    };
    let policy = shared.policy.load_full();
    let nets = &shared.nft_agent_networks;
    let scope_of = |agent: Option<String>| {
        KillSwitch::parse_scope(
            &killswitch::Request {
                scope: if agent.is_some() { "agent" } else { "all" }.to_owned(),
                agent,
                reason: None,
                totp: None,
            },
            &policy,
        )
    };
    let failed = |e: &killswitch::KillError| {
        let (status, body) = kill_error_parts(e);
        (status.as_u16(), body)
    };
    match request {
        ControlRequest::Kill { agent, reason } => match scope_of(agent) {
            Ok(scope) => {
                let reason = reason.unwrap_or_else(|| "portcullis kill (control socket)".into());
                let body = scope_body(&scope, Some(&reason), None);
                let report = ks.kill(scope, reason, by, now, &policy, nets).await;
                // Signed with this node's key and relayed to the peers (src/cluster/).
                if let Some(c) = &shared.cluster {
                    crate::cluster::originate(c, Action::Kill, body).await;
                }
                let status = if report.state_written { 200 } else { 500 };
                (status, serde_json::to_value(report).unwrap_or_default())
            }
            Err(e) => failed(&e),
        },
        ControlRequest::Revive { agent, totp } => match scope_of(agent) {
            Ok(scope) => match ks
                .revive(scope.clone(), &totp, by, now, &policy, nets)
                .await
            {
                Ok(report) => {
                    // The operator on the gateway decides: relayed, not confirmed first.
                    let body = scope_body(&scope, None, Some(&totp));
                    if let Some(c) = &shared.cluster {
                        crate::cluster::originate(c, Action::Revive, body).await;
                    }
                    (200, serde_json::to_value(report).unwrap_or_default())
                }
                Err(e) => failed(&e),
            },
            Err(e) => failed(&e),
        },
        ControlRequest::Status => {
            let mut status = ks.status(now).await;
            if let Some(c) = &shared.cluster {
                crate::cluster::status_into(c, &mut status);
            }
            (200, status)
        }
        ControlRequest::UnlockRevive => {
            let written = ks.clear_lockout(now).await;
            (
                if written { 200 } else { 500 },
                serde_json::json!({ "action": "unlock-revive", "state_written": written }),
            )
        }
        ControlRequest::Reload => match shared.control.reload().await {
            Ok(generation) => (200, serde_json::json!({ "generation": generation })),
            Err(e) => (422, serde_json::json!({ "error": e.to_string() })),
        },
    }
}

/// The body of `/v1/kill` or `/v1/revive` for a request made here, to sign and relay.
fn scope_body(
    scope: &killswitch::Scope,
    reason: Option<&str>,
    totp: Option<&str>,
) -> serde_json::Value {
    let mut body = match scope {
        killswitch::Scope::All => serde_json::json!({ "scope": "all" }),
        killswitch::Scope::Agent(a) => serde_json::json!({ "scope": "agent", "agent": a }),
    };
    if let Some(r) = reason {
        body["reason"] = r.into();
    }
    if let Some(t) = totp {
        body["totp"] = t.into();
    }
    body
}
