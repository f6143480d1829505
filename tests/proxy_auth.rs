//! Proxy Basic auth end to end (docs/proxy-auth.md): argon2id PHC hashes work, wrong
//! passwords are logged and counted as `auth_failed`, one source's guesses are throttled to
//! the documented rate, and a flood of wrong passwords against a costly hash does not stall
//! the proxy for an agent whose credentials are already verified.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use argon2::{Argon2, Params};
use base64::Engine;
use common::*;
use password_hash::CustomizedPasswordHasher;
use portcullis::config::AuthSettings;
use portcullis::proxy::auth::max_attempts_within;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An argon2id PHC string for `password`, at cost `m` KiB and `t` passes (tests choose a
/// low cost; docs/proxy-auth.md gives the production one).
fn phc(password: &str, m: u32, t: u32) -> String {
    let params = Params::new(m, t, 1, None).unwrap();
    Argon2::default()
        .hash_password_with_params(password.as_bytes(), b"0123456789abcdef", params)
        .unwrap()
        .to_string()
}

fn agent_with_hash(port: u16, hash: &str) -> String {
    format!(
        "name = \"coder-1\"\nallow = [\"allowed.test:{port}\"]\nresolve_cidrs = [\"127.0.0.1/32\"]\n[credentials]\nusername = \"coder\"\npassword_hash = \"{hash}\"\n"
    )
}

/// One plain-HTTP request through the proxy with `user:password`; the status and the
/// `X-Portcullis-Reason` header (empty when none).
async fn request(proxy: SocketAddr, port: u16, user: &str, password: &str) -> (u16, String) {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let req = format!(
        "GET http://allowed.test:{port}/ HTTP/1.1\r\nHost: allowed.test:{port}\r\nProxy-Authorization: Basic {token}\r\nConnection: close\r\n\r\n"
    );
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the proxy answered within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let reason = text
        .lines()
        .find_map(|l| l.strip_prefix("x-portcullis-reason: "))
        .unwrap_or_default()
        .to_owned();
    (status, reason)
}

#[tokio::test]
async fn argon2id_hashes_work_end_to_end_and_failures_are_logged_and_counted() {
    let up = http_upstream("authed").await;
    let port = up.addr.port();
    let hash = phc("s3cret", 64, 1);
    assert!(hash.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{hash}");
    let gw = gateway(
        &[("coder-1", &agent_with_hash(port, &hash))],
        &[],
        localhost_resolver(&["allowed.test"]),
    )
    .await;
    let url = format!("http://allowed.test:{port}/");
    let ok = curl(&["-x", &gw.proxy_url(), "-U", "coder:s3cret", &url]).await;
    assert_eq!(ok.stdout, "authed", "{}", ok.stderr);
    for (user, password, reason) in [
        ("coder", "wrong", "auth_failed"),
        ("nobody", "s3cret", "auth_failed"),
        ("coder", "S3cret", "auth_failed"),
    ] {
        assert_eq!(
            request(gw.proxy, port, user, password).await,
            (407, reason.to_owned()),
            "{user}:{password}"
        );
    }
    // No credentials at all: asked for them.
    let out = curl(&[
        "-x",
        &gw.proxy_url(),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &url,
    ])
    .await;
    assert_eq!(out.stdout, "407");
    assert_eq!(up.seen.connections(), 1);
    let lines = gw.log_lines(5).await;
    let reasons: Vec<&str> = lines
        .iter()
        .map(|l| l["event.reason"].as_str().unwrap_or("allow"))
        .collect();
    assert_eq!(
        reasons,
        [
            "allow",
            "auth_failed",
            "auth_failed",
            "auth_failed",
            "auth_required"
        ]
    );
    assert_eq!(lines[0]["agent.name"], "coder-1");
    let (_, metrics) = admin_request(gw.admin, "GET", "/metrics", &[], b"").await;
    let series = "portcullis_connections_total{agent=\"unknown\",mode=\"explicit\",verdict=\"deny\",reason=\"auth_failed\"} 3";
    assert!(metrics.contains(series), "{metrics}");
    gw.stop().await;
}

/// Many wrong passwords from one source, eight at a time, for about two seconds: at most
/// the documented number is verified (the free failures, then one per back-off step), the
/// rest are refused unverified (`auth_throttled`); credentials verified before the flood
/// still pass from the same source.
#[tokio::test]
async fn guessing_from_one_source_is_throttled_to_the_documented_rate() {
    let up = http_upstream("authed").await;
    let port = up.addr.port();
    let settings = AuthSettings {
        free_failures: 3,
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_millis(400),
        ..AuthSettings::default()
    };
    let tweak = settings.clone();
    let gw = gateway_with(
        &[("coder-1", &agent_with_hash(port, &phc("s3cret", 64, 1)))],
        &[],
        localhost_resolver(&["allowed.test"]),
        move |c, _| c.auth = tweak,
    )
    .await;
    assert_eq!(request(gw.proxy, port, "coder", "s3cret").await.0, 200);

    let started = Instant::now();
    let window = Duration::from_secs(2);
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let proxy = gw.proxy;
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut i = 0;
                while started.elapsed() < window {
                    seen.push(request(proxy, port, "coder", &format!("guess-{w}-{i}")).await);
                    i += 1;
                }
                seen
            })
        })
        .collect();
    let mut answers = Vec::new();
    for w in workers {
        answers.extend(w.await.unwrap());
    }
    let elapsed = started.elapsed();
    let count = |r: &str| answers.iter().filter(|(_, reason)| reason == r).count() as u64;
    let (verified, throttled) = (count("auth_failed"), count("auth_throttled"));
    assert!(
        answers.iter().all(|(status, _)| *status == 407),
        "{answers:?}"
    );
    assert_eq!(verified + throttled, answers.len() as u64, "{answers:?}");
    let bound = max_attempts_within(elapsed, &settings);
    eprintln!(
        "{} attempts in {elapsed:?}: {verified} verified (documented at most {bound}), {throttled} throttled",
        answers.len()
    );
    assert!(
        verified <= bound,
        "{verified} guesses verified in {elapsed:?}; documented at most {bound}"
    );
    // A rate, not a lock-out: the back-off lets guesses through again as it ends (3 free,
    // then at 0.1, 0.3, 0.7, 1.1, 1.5, 1.9 s); the first of them at 0.1 s at the latest.
    assert!(
        verified > 3,
        "only {verified} verified: a lock-out, not a rate"
    );
    assert!(
        throttled > 10 * verified,
        "{throttled} throttled, {verified} verified"
    );
    // Credentials already verified still pass from the throttled source.
    assert_eq!(
        request(gw.proxy, port, "coder", "s3cret").await,
        (200, String::new())
    );
    let (_, metrics) = admin_request(gw.admin, "GET", "/metrics", &[], b"").await;
    let series = format!(
        "portcullis_connections_total{{agent=\"unknown\",mode=\"explicit\",verdict=\"deny\",reason=\"auth_failed\"}} {verified}"
    );
    assert!(metrics.contains(&series), "{series} not in {metrics}");
    gw.stop().await;
}

/// A client opening 16 connections at once with credentials not verified yet (cold cache,
/// production-cost hash, two verification slots): all 16 are served, one verification
/// answering them all, none refused for want of a slot.
#[tokio::test]
async fn a_burst_of_first_connections_shares_one_verification() {
    let up = http_upstream("authed").await;
    let port = up.addr.port();
    let gw = gateway(
        &[(
            "coder-1",
            &agent_with_hash(port, &phc("s3cret", 19 * 1024, 2)),
        )],
        &[],
        localhost_resolver(&["allowed.test"]),
    )
    .await;
    let burst: Vec<_> = (0..16)
        .map(|_| {
            let proxy = gw.proxy;
            tokio::spawn(async move { request(proxy, port, "coder", "s3cret").await })
        })
        .collect();
    for b in burst {
        assert_eq!(b.await.unwrap(), (200, String::new()));
    }
    assert_eq!(up.seen.connections(), 16);
    gw.stop().await;
}

/// Wrong passwords against a production-cost hash (m = 19 MiB, t = 2), 32 at a time:
/// verification runs on blocking threads, two at a time, the rest refused at once; an
/// agent whose credentials are verified keeps being served within a bound.
#[tokio::test]
async fn a_flood_of_wrong_passwords_does_not_stall_verified_agents() {
    let up = http_upstream("authed").await;
    let port = up.addr.port();
    let gw = gateway_with(
        &[(
            "coder-1",
            &agent_with_hash(port, &phc("s3cret", 19 * 1024, 2)),
        )],
        &[],
        localhost_resolver(&["allowed.test"]),
        |c, _| {
            // Every wrong password is verified: no per-source back-off in the way.
            c.auth.free_failures = 1_000_000;
        },
    )
    .await;
    assert_eq!(request(gw.proxy, port, "coder", "s3cret").await.0, 200);
    let stop = Instant::now() + Duration::from_secs(2);
    let flood: Vec<_> = (0..32)
        .map(|i| {
            let proxy = gw.proxy;
            tokio::spawn(async move {
                let mut answers = Vec::new();
                while Instant::now() < stop {
                    answers.push(request(proxy, port, "coder", &format!("wrong-{i}")).await.1);
                }
                answers
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut slowest = Duration::ZERO;
    while Instant::now() < stop {
        let t = Instant::now();
        assert_eq!(request(gw.proxy, port, "coder", "s3cret").await.0, 200);
        slowest = slowest.max(t.elapsed());
    }
    let mut answers = Vec::new();
    for f in flood {
        answers.extend(f.await.unwrap());
    }
    eprintln!(
        "flood: {} wrong passwords answered, {} verified; slowest verified-agent request {slowest:?}",
        answers.len(),
        answers.iter().filter(|r| *r == "auth_failed").count()
    );
    assert!(
        slowest < Duration::from_secs(1),
        "a verified agent waited {slowest:?} during the flood"
    );
    assert!(
        answers.iter().any(|r| r == "auth_failed"),
        "nothing verified"
    );
    assert!(
        answers.iter().any(|r| r == "auth_throttled"),
        "32 at once and none refused for the verification limit"
    );
    gw.stop().await;
}
