//! Commands that talk to the running gateway on this machine: `kill`, `revive`, `status`,
//! `unlock-revive`, `reload`. They use the local control socket (`[admin] control_socket`)
//! when it answers: no secret needed, and nothing on the network side (connection cap,
//! replay memory) can keep a kill out. Without it, kill, revive, status and reload go to the
//! admin API, signed like Standard Webhooks with the local secret file.

use std::path::{Path, PathBuf};

use super::load_config;
use crate::config::{Config, ConfigError};

/// Why a command could not reach the gateway or got no answer from it.
#[derive(Debug, thiserror::Error)]
enum RemoteError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("no admin listener configured (listen.admin)")]
    NoAdminListener,
    #[error("{addr}: {source}")]
    Admin {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr}: no HTTP response")]
    NoHttpResponse { addr: std::net::SocketAddr },
    #[error("{0}")]
    Secrets(#[from] crate::killswitch::SecretFileError),
    #[error("no kill_switch.webhook_secret_files configured")]
    NoSecret,
    #[error("the system clock is before 1970")]
    Clock,
    #[error("{}: {source}", path.display())]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{}: the gateway closed without an answer (is this user root or the service user?)",
        path.display()
    )]
    NoAnswer { path: PathBuf },
    #[error("{}: no status in the answer", path.display())]
    NoStatus { path: PathBuf },
    #[error(
        "the control socket is not reachable: unlock-revive runs on the gateway, as root or \
         the service user"
    )]
    NoControlSocket,
}

/// The admin address to talk to (a wildcard bind is reached on loopback).
fn admin_addr(config: &Config) -> Result<std::net::SocketAddr, RemoteError> {
    let mut a = config.listen.admin.ok_or(RemoteError::NoAdminListener)?;
    if a.ip().is_unspecified() {
        a.set_ip(if a.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    Ok(a)
}

/// One HTTP/1.1 request to the admin API, bounded in time; returns status and body.
fn admin_call(
    config: &Config,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<(u16, String), RemoteError> {
    use std::io::{Read, Write};
    let addr = admin_addr(config)?;
    let io = |source| RemoteError::Admin { addr, source };
    let timeout = std::time::Duration::from_secs(10);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes())
        .and_then(|()| s.write_all(body))
        .map_err(io)?;
    let mut resp = Vec::new();
    s.take(1 << 20).read_to_end(&mut resp).map_err(io)?;
    let text = String::from_utf8_lossy(&resp);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or(RemoteError::NoHttpResponse { addr })?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

/// Sign `body` as a Standard Webhooks request with the first configured secret.
fn signed_headers(config: &Config, body: &[u8]) -> Result<Vec<(String, String)>, RemoteError> {
    let secrets = crate::killswitch::read_secrets(&config.kill_switch.webhook_secret_files)
        .map_err(RemoteError::Secrets)?;
    let secret = secrets.first().ok_or(RemoteError::NoSecret)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| RemoteError::Clock)?;
    let id = format!("cli_{}_{}", now.as_nanos(), std::process::id());
    let ts = i64::try_from(now.as_secs()).map_err(|_| RemoteError::Clock)?;
    let sig = crate::killswitch::webhook::sign(secret, &id, ts, body);
    Ok(vec![
        ("webhook-id".into(), id),
        ("webhook-timestamp".into(), ts.to_string()),
        ("webhook-signature".into(), sig),
    ])
}

fn print_call(result: Result<(u16, String), RemoteError>) -> i32 {
    match result {
        Ok((status, body)) => {
            print!("{body}");
            i32::from(status != 200)
        }
        Err(e) => {
            eprintln!("{e}");
            2
        }
    }
}

/// One request over the control socket. `Ok(None)` when there is no socket to talk to
/// (turned off, absent, refused, or not ours to open): the caller may use the admin API.
fn control_call(
    config: &Config,
    request: &serde_json::Value,
) -> Result<Option<(u16, String)>, RemoteError> {
    use std::io::{ErrorKind, Read, Write};
    let Some(path) = config.control_socket() else {
        return Ok(None);
    };
    let mut s = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::NotFound | ErrorKind::ConnectionRefused | ErrorKind::PermissionDenied
            ) =>
        {
            return Ok(None);
        }
        Err(source) => return Err(RemoteError::Socket { path, source }),
    };
    let io = |source| RemoteError::Socket {
        path: path.clone(),
        source,
    };
    let timeout = Some(std::time::Duration::from_secs(15));
    s.set_read_timeout(timeout)
        .and_then(|()| s.set_write_timeout(timeout))
        .map_err(io)?;
    let mut line = request.to_string();
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(io)?;
    let mut resp = String::new();
    s.take(1 << 20).read_to_string(&mut resp).map_err(io)?;
    let v: serde_json::Value = serde_json::from_str(resp.trim())
        .map_err(|_| RemoteError::NoAnswer { path: path.clone() })?;
    let status = v["status"]
        .as_u64()
        .and_then(|s| u16::try_from(s).ok())
        .ok_or_else(|| RemoteError::NoStatus { path: path.clone() })?;
    Ok(Some((status, format!("{}\n", v["body"]))))
}

/// The control socket if it answers, else the admin API (signed when `signed`).
fn local_or_admin(
    config_path: Option<&Path>,
    request: serde_json::Value,
    path: &str,
    http_body: Option<serde_json::Value>,
) -> i32 {
    let call = load_config(config_path)
        .map_err(RemoteError::from)
        .and_then(|config| {
            if let Some(answer) = control_call(&config, &request)? {
                return Ok(answer);
            }
            match http_body {
                Some(body) => {
                    let body = body.to_string();
                    let headers = signed_headers(&config, body.as_bytes())?;
                    admin_call(&config, "POST", path, &headers, body.as_bytes())
                }
                None => admin_call(&config, "GET", path, &[], b""),
            }
        });
    print_call(call)
}

pub fn kill(config_path: Option<&Path>, agent: Option<&str>, reason: Option<&str>) -> i32 {
    let reason = reason.unwrap_or("portcullis kill (cli)");
    local_or_admin(
        config_path,
        serde_json::json!({ "op": "kill", "agent": agent, "reason": reason }),
        "/v1/kill",
        Some(serde_json::json!({
            "scope": if agent.is_some() { "agent" } else { "all" },
            "agent": agent,
            "reason": reason,
        })),
    )
}

pub fn revive(config_path: Option<&Path>, agent: Option<&str>, totp: &str) -> i32 {
    local_or_admin(
        config_path,
        serde_json::json!({ "op": "revive", "agent": agent, "totp": totp }),
        "/v1/revive",
        Some(serde_json::json!({
            "scope": if agent.is_some() { "agent" } else { "all" },
            "agent": agent,
            "totp": totp,
        })),
    )
}

pub fn status(config_path: Option<&Path>) -> i32 {
    local_or_admin(
        config_path,
        serde_json::json!({ "op": "status" }),
        "/v1/status",
        None,
    )
}

pub fn reload(config_path: Option<&Path>) -> i32 {
    local_or_admin(
        config_path,
        serde_json::json!({ "op": "reload" }),
        "/v1/reload",
        Some(serde_json::json!({})),
    )
}

/// Clear every revive lock-out: on the gateway only, through the control socket.
pub fn unlock_revive(config_path: Option<&Path>) -> i32 {
    let call = load_config(config_path)
        .map_err(RemoteError::from)
        .and_then(|config| {
            control_call(&config, &serde_json::json!({ "op": "unlock-revive" }))?
                .ok_or(RemoteError::NoControlSocket)
        });
    print_call(call)
}
