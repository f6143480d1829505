//! The kill switch over its real HTTP API: signatures, replay, TOTP, cutting 500 live tunnels
//! within 100 ms, and the killed state surviving restarts (fail closed on a corrupt file).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use common::{KILL_SWITCH_TOTP as TOTP, KILL_SWITCH_WHSEC as WHSEC};
use portcullis::killswitch::totp::{TotpSecret, code_at};
use portcullis::killswitch::webhook::{Secret, sign};
use tokio::io::AsyncReadExt;

const OTHER_WHSEC: &str = "whsec_bm90LXRoZS1yaWdodC1zZWNyZXQtYXQtYWxs";

fn agent(port: u16) -> String {
    format!(
        "name = \"coder-1\"\nsources = [\"127.0.0.0/8\"]\nallow = [\"allowed.test:{port}\"]\nallow_cidrs = [\"127.0.0.1/32:{port}\"]\n"
    )
}

fn signed(secret: &str, id: &str, ts: i64, body: &str) -> Vec<(String, String)> {
    let s = Secret::parse(secret).unwrap();
    vec![
        ("webhook-id".into(), id.into()),
        ("webhook-timestamp".into(), ts.to_string()),
        (
            "webhook-signature".into(),
            sign(&s, id, ts, body.as_bytes()),
        ),
    ]
}

async fn post(
    gw: &TestGateway,
    path: &str,
    headers: &[(String, String)],
    body: &str,
) -> (u16, String) {
    admin_request(gw.admin, "POST", path, headers, body.as_bytes()).await
}

async fn status(gw: &TestGateway) -> serde_json::Value {
    let (code, body) = admin_request(gw.admin, "GET", "/v1/status", &[], b"").await;
    assert_eq!(code, 200);
    serde_json::from_str(&body).unwrap()
}

fn totp_code(at: i64) -> String {
    code_at(&TotpSecret::from_base32(TOTP).unwrap(), at as u64)
}

#[tokio::test]
async fn badly_signed_expired_replayed_or_malformed_requests_change_nothing() {
    let up = silent_upstream().await;
    let port = up.addr.port();
    let gw = gateway_with(
        &[("coder-1", &agent(port))],
        &[],
        localhost_resolver(&["allowed.test"]),
        with_kill_switch_secrets,
    )
    .await;
    let body = r#"{"scope":"all","reason":"test"}"#;
    let t = now();
    // (what, signed headers, body sent, expected status)
    type Case<'a> = (&'a str, Vec<(String, String)>, &'a str, u16);
    let cases: Vec<Case> = vec![
        (
            "wrong secret",
            signed(OTHER_WHSEC, "msg_1", t, body),
            body,
            401,
        ),
        ("expired", signed(WHSEC, "msg_2", t - 301, body), body, 401),
        (
            "from the future",
            signed(WHSEC, "msg_3", t + 301, body),
            body,
            401,
        ),
        ("no headers", vec![], body, 401),
        (
            "tampered body",
            signed(WHSEC, "msg_4", t, body),
            r#"{"scope":"all","reason":"x"}"#,
            401,
        ),
        (
            "unknown scope",
            signed(WHSEC, "msg_5", t, r#"{"scope":"everything"}"#),
            r#"{"scope":"everything"}"#,
            400,
        ),
        (
            "unknown agent",
            signed(WHSEC, "msg_6", t, r#"{"scope":"agent","agent":"nobody"}"#),
            r#"{"scope":"agent","agent":"nobody"}"#,
            400,
        ),
        ("not json", signed(WHSEC, "msg_7", t, "kill"), "kill", 400),
    ];
    for (label, headers, b, expected) in &cases {
        let (code, resp) = post(&gw, "/v1/kill", headers, b).await;
        assert_eq!(code, *expected, "{label}: {resp}");
    }
    let st = status(&gw).await;
    assert!(
        st["all"].is_null() && st["agents"].as_object().unwrap().is_empty(),
        "{st}"
    );
    assert!(
        open_tunnel(gw.proxy, "allowed.test", port).await.is_ok(),
        "a refused request changed something"
    );

    // Replay: a valid kill, revived, then the very same request again is refused.
    let kill_agent = r#"{"scope":"agent","agent":"coder-1","reason":"replay test"}"#;
    let h = signed(WHSEC, "msg_replay", t, kill_agent);
    assert_eq!(post(&gw, "/v1/kill", &h, kill_agent).await.0, 200);
    let revive = format!(
        r#"{{"scope":"agent","agent":"coder-1","totp":"{}"}}"#,
        totp_code(now())
    );
    assert_eq!(
        post(
            &gw,
            "/v1/revive",
            &signed(WHSEC, "msg_rev", now(), &revive),
            &revive
        )
        .await
        .0,
        200
    );
    let (code, resp) = post(&gw, "/v1/kill", &h, kill_agent).await;
    assert_eq!(code, 401, "replayed request accepted: {resp}");
    assert!(status(&gw).await["agents"].as_object().unwrap().is_empty());
    gw.stop().await;
}

#[tokio::test]
async fn revive_needs_signature_and_current_totp() {
    let up = silent_upstream().await;
    let port = up.addr.port();
    let gw = gateway_with(
        &[("coder-1", &agent(port))],
        &[],
        localhost_resolver(&["allowed.test"]),
        with_kill_switch_secrets,
    )
    .await;
    let body = r#"{"scope":"all","reason":"test"}"#;
    assert_eq!(
        post(&gw, "/v1/kill", &signed(WHSEC, "k1", now(), body), body)
            .await
            .0,
        200
    );
    let err = open_tunnel(gw.proxy, "allowed.test", port)
        .await
        .unwrap_err();
    assert!(
        err.starts_with("HTTP/1.1 403") && err.contains("kill_switch"),
        "{err}"
    );

    let t = now();
    for (label, code) in [
        ("wrong", "000000".to_owned()),
        ("stale", totp_code(t - 120)),
        ("empty", String::new()),
    ] {
        let b = format!(r#"{{"scope":"all","totp":"{code}"}}"#);
        let (status_code, resp) = post(
            &gw,
            "/v1/revive",
            &signed(WHSEC, &format!("r-{label}"), t, &b),
            &b,
        )
        .await;
        assert_eq!(status_code, 401, "{label} TOTP accepted: {resp}");
    }
    // A valid TOTP without a valid signature is refused too.
    let b = format!(r#"{{"scope":"all","totp":"{}"}}"#, totp_code(t));
    assert_eq!(
        post(&gw, "/v1/revive", &signed(OTHER_WHSEC, "r-sig", t, &b), &b)
            .await
            .0,
        401
    );
    assert!(
        open_tunnel(gw.proxy, "allowed.test", port).await.is_err(),
        "reopened without a valid revive"
    );

    let (code, resp) = post(&gw, "/v1/revive", &signed(WHSEC, "r-ok", t, &b), &b).await;
    assert_eq!(code, 200, "{resp}");
    assert!(open_tunnel(gw.proxy, "allowed.test", port).await.is_ok());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_closes_500_live_tunnels_within_100ms() {
    // 500 tunnels hold ~2,000 descriptors in this process.
    let pid = std::process::id();
    let _ = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "prlimit --pid {pid} --nofile=$(ulimit -Hn):$(ulimit -Hn)"
        ))
        .status();
    let up = silent_upstream().await;
    let port = up.addr.port();
    let gw = gateway_with(
        &[("coder-1", &agent(port))],
        &[],
        localhost_resolver(&["allowed.test"]),
        with_kill_switch_secrets,
    )
    .await;
    let mut tunnels = Vec::new();
    for _ in 0..500 {
        tunnels.push(open_tunnel(gw.proxy, "allowed.test", port).await.unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.seen.connections() < 500 {
        assert!(
            Instant::now() < deadline,
            "only {} tunnels reached the upstream",
            up.seen.connections()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let closed: Vec<_> = tunnels
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                // EOF or reset both mean the proxy closed the tunnel.
                let _ = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await;
                Instant::now()
            })
        })
        .collect();
    let body = r#"{"scope":"all","reason":"500 tunnels"}"#;
    let started = Instant::now();
    let (code, resp) = post(&gw, "/v1/kill", &signed(WHSEC, "k500", now(), body), body).await;
    let answered = started.elapsed();
    assert_eq!(code, 200, "{resp}");
    let report: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(report["state_written"], true);
    assert_eq!(report["tunnels_cut"], 500);
    let mut slowest = Duration::ZERO;
    for c in closed {
        slowest = slowest.max(c.await.unwrap().duration_since(started));
    }
    println!(
        "500 tunnels closed {slowest:?} after the kill request was sent (answered after {answered:?})"
    );
    assert!(
        slowest <= Duration::from_millis(100),
        "slowest tunnel closed after {slowest:?}"
    );
    let err = open_tunnel(gw.proxy, "allowed.test", port)
        .await
        .unwrap_err();
    assert!(err.contains("kill_switch"), "{err}");
    let lines = gw.log_lines(501).await;
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["event.reason"] == "kill_switch")
            .count(),
        501
    );
    gw.stop().await;
}

#[tokio::test]
async fn killed_stays_killed_across_restart_and_a_corrupt_state_kills() {
    let up = silent_upstream().await;
    let port = up.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let agents = [("coder-1", agent(port))];
    let agents: Vec<(&str, &str)> = agents.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let (running, _) = start_in(
        dir.path(),
        &agents,
        &[],
        localhost_resolver(&["allowed.test"]),
        with_kill_switch_secrets,
    )
    .await;
    let admin = running.admin_addr.unwrap();
    let body = r#"{"scope":"agent","agent":"coder-1","reason":"restart test"}"#;
    let (code, _) = admin_request(
        admin,
        "POST",
        "/v1/kill",
        &signed(WHSEC, "kr", now(), body),
        body.as_bytes(),
    )
    .await;
    assert_eq!(code, 200);
    running.shutdown(Duration::from_secs(1)).await;

    let (running, _) = start_in(
        dir.path(),
        &agents,
        &[],
        localhost_resolver(&["allowed.test"]),
        with_kill_switch_secrets,
    )
    .await;
    let err = open_tunnel(running.explicit_addr.unwrap(), "allowed.test", port)
        .await
        .unwrap_err();
    assert!(
        err.contains("kill_switch"),
        "not killed after restart: {err}"
    );
    running.shutdown(Duration::from_secs(1)).await;

    std::fs::write(
        dir.path().join("state/killswitch.json"),
        "{ this is not json",
    )
    .unwrap();
    let (running, _) = start_in(
        dir.path(),
        &agents,
        &[],
        localhost_resolver(&["allowed.test"]),
        with_kill_switch_secrets,
    )
    .await;
    let err = open_tunnel(running.explicit_addr.unwrap(), "allowed.test", port)
        .await
        .unwrap_err();
    assert!(
        err.contains("kill_switch"),
        "a corrupt state did not kill: {err}"
    );
    let (_, st) = admin_request(running.admin_addr.unwrap(), "GET", "/v1/status", &[], b"").await;
    assert!(
        !serde_json::from_str::<serde_json::Value>(&st).unwrap()["corrupt"].is_null(),
        "{st}"
    );
    running.shutdown(Duration::from_secs(1)).await;
    assert_eq!(
        up.seen.connections(),
        0,
        "a killed agent reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_sender_script_signs_correctly() {
    let up = silent_upstream().await;
    let port = up.addr.port();
    let gw = gateway_with(
        &[("coder-1", &agent(port))],
        &[],
        localhost_resolver(&["allowed.test"]),
        with_kill_switch_secrets,
    )
    .await;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kill-switch/send.sh");
    let run = |args: Vec<String>| {
        let mut cmd = tokio::process::Command::new("bash");
        cmd.arg(&script)
            .args(args)
            .env("PORTCULLIS_URL", format!("http://{}", gw.admin))
            .env("PORTCULLIS_SECRET", WHSEC);
        cmd
    };
    let out = run(vec![
        "kill".into(),
        "coder-1".into(),
        "script \"test\"".into(),
    ])
    .output()
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\"state_written\":true"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        status(&gw).await["agents"]["coder-1"]["reason"],
        "script \"test\""
    );
    let out = run(vec!["revive".into(), totp_code(now())])
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"action\":\"revive\""));
    assert!(status(&gw).await["agents"].as_object().unwrap().is_empty());
    gw.stop().await;
}
