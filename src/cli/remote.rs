//! Commands that talk to a running gateway's admin API: `kill`, `revive`, `status`. Kill
//! and revive requests are signed like Standard Webhooks with the local secret file.

use std::path::Path;

use super::load_config;
use crate::config::Config;

/// The admin address to talk to (a wildcard bind is reached on loopback).
fn admin_addr(config: &Config) -> Result<std::net::SocketAddr, String> {
    let mut a = config
        .admin_listen
        .ok_or("no admin listener configured (listen.admin)")?;
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
) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let addr = admin_addr(config)?;
    let timeout = std::time::Duration::from_secs(10);
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
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
        .map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    s.take(1 << 20)
        .read_to_end(&mut resp)
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&resp);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("no HTTP response")?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

/// Sign `body` as a Standard Webhooks request with the first configured secret.
fn signed_headers(config: &Config, body: &[u8]) -> Result<Vec<(String, String)>, String> {
    let secrets = crate::killswitch::read_secrets(&config.webhook_secret_files)?;
    let secret = secrets
        .first()
        .ok_or("no kill_switch.webhook_secret_files configured")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?;
    let id = format!("cli_{}_{}", now.as_nanos(), std::process::id());
    let ts = i64::try_from(now.as_secs()).map_err(|e| e.to_string())?;
    let sig = crate::killswitch::webhook::sign(secret, &id, ts, body);
    Ok(vec![
        ("webhook-id".into(), id),
        ("webhook-timestamp".into(), ts.to_string()),
        ("webhook-signature".into(), sig),
    ])
}

fn print_call(result: Result<(u16, String), String>) -> i32 {
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

pub fn kill(config_path: Option<&Path>, agent: Option<&str>, reason: Option<&str>) -> i32 {
    let call = load_config(config_path).and_then(|config| {
        let body = serde_json::json!({
            "scope": if agent.is_some() { "agent" } else { "all" },
            "agent": agent,
            "reason": reason.unwrap_or("portcullis kill (cli)"),
        })
        .to_string();
        let headers = signed_headers(&config, body.as_bytes())?;
        admin_call(&config, "POST", "/v1/kill", &headers, body.as_bytes())
    });
    print_call(call)
}

pub fn revive(config_path: Option<&Path>, agent: Option<&str>, totp: &str) -> i32 {
    let call = load_config(config_path).and_then(|config| {
        let body = serde_json::json!({
            "scope": if agent.is_some() { "agent" } else { "all" },
            "agent": agent,
            "totp": totp,
        })
        .to_string();
        let headers = signed_headers(&config, body.as_bytes())?;
        admin_call(&config, "POST", "/v1/revive", &headers, body.as_bytes())
    });
    print_call(call)
}

pub fn status(config_path: Option<&Path>) -> i32 {
    print_call(
        load_config(config_path)
            .and_then(|config| admin_call(&config, "GET", "/v1/status", &[], b"")),
    )
}
