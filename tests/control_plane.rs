//! The control plane under attack: the kill switch and admin API tried as someone holding one
//! webhook key would (guessing revive codes, flooding the replay guard, replaying a captured
//! revive after a restart) and as anyone on the management network (unsigned mutation,
//! connection floods). Each test fails on a build without the defence it names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use portcullis::config::Config;
use portcullis::killswitch::attempts::SENDER_ALLOWANCE;
use portcullis::killswitch::totp::{TotpSecret, code_at};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// The attacker's key (the alerting pipeline's, say) and the person's.
const ATTACKER_WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const PERSON_WHSEC: &str = "whsec_cGVyc29uLXBob25lLWtleS1sb25nLWVub3VnaA==";
const TOTP: &str = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP";

fn agent(port: u16) -> String {
    format!(
        "name = \"coder-1\"\nsources = [\"127.0.0.0/8\"]\nallow = [\"allowed.test:{port}\"]\nallow_cidrs = [\"127.0.0.1/32:{port}\"]\n"
    )
}

fn with_keys(c: &mut Config, dir: &Path) {
    std::fs::write(dir.join("alerting.secret"), format!("{ATTACKER_WHSEC}\n")).unwrap();
    std::fs::write(dir.join("phone.secret"), format!("{PERSON_WHSEC}\n")).unwrap();
    std::fs::write(dir.join("totp.secret"), format!("{TOTP}\n")).unwrap();
    c.kill_switch.webhook_secret_files =
        vec![dir.join("alerting.secret"), dir.join("phone.secret")];
    c.kill_switch.totp_secret_file = Some(dir.join("totp.secret"));
}

fn code(at: i64) -> String {
    code_at(&TotpSecret::from_base32(TOTP).unwrap(), at as u64)
}

/// A code that is not valid now (nor a step either side).
fn wrong_code(at: i64, i: usize) -> String {
    let valid = [code(at - 30), code(at), code(at + 30)];
    (0..)
        .map(|k| format!("{:06}", (i * 7_919 + k * 104_729) % 1_000_000))
        .find(|c| !valid.contains(c))
        .unwrap()
}

async fn signed_post(
    admin: std::net::SocketAddr,
    key: &str,
    id: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let h = signed_headers(key, id, now(), body);
    admin_request(admin, "POST", path, &h, body.as_bytes()).await
}

async fn status(admin: std::net::SocketAddr) -> serde_json::Value {
    let (code, body) = admin_request(admin, "GET", "/v1/status", &[], b"").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

async fn metrics(admin: std::net::SocketAddr) -> String {
    admin_request(admin, "GET", "/metrics", &[], b"").await.1
}

fn metric(text: &str, reason: &str) -> u64 {
    let prefix = format!("portcullis_kill_switch_auth_failures_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Kill-switch lines of the log (after the writer settled).
async fn kill_switch_lines(log: &Path) -> Vec<serde_json::Value> {
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = std::fs::read_to_string(log).unwrap_or_default();
    whole_lines(&text)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event.category"] == "kill_switch")
        .collect()
}

/// One exchange on the control socket, as `portcullis kill` makes it.
async fn control(state_dir: &Path, request: serde_json::Value) -> (u16, serde_json::Value) {
    let mut s = tokio::net::UnixStream::connect(state_dir.join("control.sock"))
        .await
        .unwrap();
    s.write_all(format!("{request}\n").as_bytes())
        .await
        .unwrap();
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        BufReader::new(s).read_line(&mut line),
    )
    .await
    .unwrap()
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    (v["status"].as_u64().unwrap() as u16, v["body"].clone())
}

fn cli(args: &[&str], config: &Path) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A config file for the CLI that reaches the test gateway in `dir`.
fn cli_config(dir: &Path, admin: std::net::SocketAddr) -> std::path::PathBuf {
    let path = dir.join("cli.toml");
    std::fs::write(
        &path,
        format!(
            "state_dir = \"state\"\n[listen]\nadmin = \"{admin}\"\n[kill_switch]\nwebhook_secret_files = [\"alerting.secret\"]\ntotp_secret_file = \"totp.secret\"\n"
        ),
    )
    .unwrap();
    path
}

/// Guessing: 300 signed revives with wrong codes, all at once from the attacker's key. At
/// most the allowance is even checked; the rest, and then the right code, are refused as
/// locked; every attempt is logged and counted; the lock survives a restart; a person's
/// other key still revives; an operator on the gateway clears the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessed_revive_codes_lock_revive_even_for_the_right_code() {
    let up = silent_upstream().await;
    let port = up.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let agents = [("coder-1", agent(port))];
    let agents: Vec<(&str, &str)> = agents.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let resolver = || localhost_resolver(&["allowed.test"]);
    let (running, log) = start_in(dir.path(), &agents, &[], resolver(), with_keys).await;
    let admin = running.admin_addr.unwrap();
    assert!(
        open_tunnel(running.explicit_addr.unwrap(), "allowed.test", port)
            .await
            .is_ok()
    );
    let kill = r#"{"scope":"all","reason":"guessing test"}"#;
    assert_eq!(
        signed_post(admin, ATTACKER_WHSEC, "k0", "/v1/kill", kill)
            .await
            .0,
        200
    );

    const GUESSES: usize = 300;
    let t = now();
    // As many at once as the admin listener serves (64 by default): the race between the
    // lock check and the count is what this tries.
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(48));
    let mut tasks = Vec::new();
    for i in 0..GUESSES {
        let slots = slots.clone();
        tasks.push(tokio::spawn(async move {
            let _slot = slots.acquire_owned().await.unwrap();
            let body = format!(r#"{{"scope":"all","totp":"{}"}}"#, wrong_code(t, i));
            signed_post(
                admin,
                ATTACKER_WHSEC,
                &format!("guess_{i}"),
                "/v1/revive",
                &body,
            )
            .await
            .0
        }));
    }
    let mut by_status = std::collections::BTreeMap::<u16, usize>::new();
    for task in tasks {
        *by_status.entry(task.await.unwrap()).or_default() += 1;
    }
    // Exactly the allowance was checked (401); every other guess was refused unchecked (429).
    assert_eq!(
        by_status.get(&401).copied(),
        Some(SENDER_ALLOWANCE as usize),
        "{by_status:?}"
    );
    assert_eq!(
        by_status.get(&429).copied(),
        Some(GUESSES - SENDER_ALLOWANCE as usize),
        "{by_status:?}"
    );
    // The right code from the locked key is refused too.
    let right = format!(r#"{{"scope":"all","totp":"{}"}}"#, code(now()));
    let (st, body) = signed_post(
        admin,
        ATTACKER_WHSEC,
        "right_while_locked",
        "/v1/revive",
        &right,
    )
    .await;
    assert_eq!(st, 429, "{body}");
    assert!(
        open_tunnel(running.explicit_addr.unwrap(), "allowed.test", port)
            .await
            .is_err()
    );
    let m = metrics(admin).await;
    assert_eq!(
        metric(&m, "totp_invalid"),
        u64::from(SENDER_ALLOWANCE),
        "{m}"
    );
    assert_eq!(
        metric(&m, "totp_locked"),
        (GUESSES - SENDER_ALLOWANCE as usize + 1) as u64
    );
    // Every attempt is logged: one line each within the control plane's share of the log
    // (a burst of 200, then 50 a second), the rest counted in a summary line each second.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let lines = kill_switch_lines(&log).await;
    let denied: Vec<_> = lines
        .iter()
        .filter(|l| l["event.action"] == "deny" && l["event.kind"].is_null())
        .collect();
    let summarized: u64 = lines
        .iter()
        .filter(|l| l["event.kind"] == "summary")
        .map(|l| l["portcullis.summarized"].as_u64().unwrap())
        .sum();
    assert!(denied.len() >= 200, "{} lines", denied.len());
    assert_eq!(
        denied.len() as u64 + summarized,
        (GUESSES + 1) as u64,
        "every attempt is logged or summarised"
    );
    assert!(denied.iter().all(
        |l| l["portcullis.kill_switch.sender"] == "key:alerting.secret"
            && l["source.ip"] == "127.0.0.1"
    ));
    let st_json = status(admin).await;
    assert!(
        st_json["revive_locked"]["senders"]["key:alerting.secret"].is_i64(),
        "{st_json}"
    );
    running.shutdown(Duration::from_secs(1)).await;

    // A restart forgets nothing: still locked for the attacker's key, right code or not.
    let (running, _) = start_in(dir.path(), &agents, &[], resolver(), with_keys).await;
    let admin = running.admin_addr.unwrap();
    let right = format!(r#"{{"scope":"all","totp":"{}"}}"#, code(now()));
    let (st, body) =
        signed_post(admin, ATTACKER_WHSEC, "after_restart", "/v1/revive", &right).await;
    assert_eq!(st, 429, "the lock did not survive a restart: {body}");

    // The person's own key is not locked by the attacker's guesses (the global count is at
    // 5 of 10) and revives.
    let (st, body) = signed_post(admin, PERSON_WHSEC, "person", "/v1/revive", &right).await;
    assert_eq!(st, 200, "{body}");
    assert!(
        open_tunnel(running.explicit_addr.unwrap(), "allowed.test", port)
            .await
            .is_ok()
    );

    // An operator on the gateway clears the attacker key's lock with the CLI.
    let cfg = cli_config(dir.path(), admin);
    let (code_, out, err) = cli(&["unlock-revive"], &cfg);
    assert_eq!(code_, 0, "{out}{err}");
    assert!(
        status(admin).await["revive_locked"]["senders"]
            .as_object()
            .unwrap()
            .is_empty()
    );
    running.shutdown(Duration::from_secs(1)).await;
}

/// Ten senders' worth of failures lock revive for everyone, the local socket included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_from_every_sender_together_lock_revive_globally() {
    let up = silent_upstream().await;
    let gw = gateway_with(
        &[("coder-1", &agent(up.addr.port()))],
        &[],
        localhost_resolver(&["allowed.test"]),
        with_keys,
    )
    .await;
    let state_dir = gw.dir.path().join("state");
    let t = now();
    // 5 from the attacker's key (locks it), 4 from the person's, 1 from the socket: 10.
    for i in 0..5 {
        let body = format!(r#"{{"scope":"all","totp":"{}"}}"#, wrong_code(t, i));
        signed_post(
            gw.admin,
            ATTACKER_WHSEC,
            &format!("a{i}"),
            "/v1/revive",
            &body,
        )
        .await;
    }
    for i in 5..9 {
        let body = format!(r#"{{"scope":"all","totp":"{}"}}"#, wrong_code(t, i));
        let (st, _) = signed_post(
            gw.admin,
            PERSON_WHSEC,
            &format!("p{i}"),
            "/v1/revive",
            &body,
        )
        .await;
        assert_eq!(st, 401);
    }
    let (st, _) = control(
        &state_dir,
        serde_json::json!({"op":"revive","totp": wrong_code(t, 9)}),
    )
    .await;
    assert_eq!(st, 401);
    let (st, body) = control(
        &state_dir,
        serde_json::json!({"op":"revive","totp": code(now())}),
    )
    .await;
    assert_eq!(st, 429, "{body}");
    let right = format!(r#"{{"scope":"all","totp":"{}"}}"#, code(now()));
    assert_eq!(
        signed_post(gw.admin, PERSON_WHSEC, "p-right", "/v1/revive", &right)
            .await
            .0,
        429
    );
    gw.stop().await;
}

/// A client that sends `n` signed revives over keep-alive connections (a new one every
/// 500 requests), as fast as the gateway answers; returns the statuses seen.
async fn flood(admin: std::net::SocketAddr, worker: usize, n: usize, ts: i64) -> usize {
    let mut answered = 0;
    let mut i = 0;
    while i < n {
        let Ok(mut s) = tokio::net::TcpStream::connect(admin).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        s.set_nodelay(true).unwrap();
        let (r, mut w) = s.split();
        let mut r = BufReader::new(r);
        let batch_end = (i + 500).min(n);
        while i < batch_end {
            let body = format!(r#"{{"scope":"all","totp":"{:06}"}}"#, i % 1_000_000);
            let id = format!("flood_{worker}_{i}");
            let mut req = format!(
                "POST /v1/revive HTTP/1.1\r\nHost: admin\r\nContent-Length: {}\r\n",
                body.len()
            );
            for (k, v) in signed_headers(ATTACKER_WHSEC, &id, ts, &body) {
                req += &format!("{k}: {v}\r\n");
            }
            req += "\r\n";
            req += &body;
            if w.write_all(req.as_bytes()).await.is_err() {
                break;
            }
            // Read the head, then the body by Content-Length.
            let mut len = 0usize;
            let mut line = String::new();
            let mut ok = false;
            loop {
                line.clear();
                match r.read_line(&mut line).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                if line == "\r\n" {
                    ok = true;
                    break;
                }
            }
            if !ok {
                break;
            }
            let mut body = vec![0; len];
            if r.read_exact(&mut body).await.is_err() {
                break;
            }
            answered += 1;
            i += 1;
        }
    }
    answered
}

/// The lock-out seen in the field: 100,000 validly signed requests dated as far ahead as
/// the gateway allows fill the replay memory. A signed kill, a control-socket kill and
/// `portcullis kill` all succeed at once afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_that_fills_the_replay_memory_never_locks_a_kill_out() {
    let up = silent_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let agents = [("coder-1", agent(up.addr.port()))];
    let agents: Vec<(&str, &str)> = agents.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let (running, _) = start_in(
        dir.path(),
        &agents,
        &[],
        localhost_resolver(&["allowed.test"]),
        |c, d| {
            with_keys(c, d);
            // The flood is not what this test measures: a file log keeps up.
            c.log.queue = 1 << 20;
        },
    )
    .await;
    let admin = running.admin_addr.unwrap();
    const TOTAL: usize = 100_000;
    const WORKERS: usize = 8;
    let ts = now() + portcullis::killswitch::webhook::FUTURE_SKEW_SECS - 1;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        tasks.push(tokio::spawn(flood(admin, w, TOTAL / WORKERS, ts)));
    }
    let mut answered = 0;
    for t in tasks {
        answered += t.await.unwrap();
    }
    println!(
        "{answered} signed requests answered in {:?}",
        started.elapsed()
    );
    assert_eq!(answered, TOTAL);

    // A signed kill from the person's key: accepted, within 100 ms.
    let body = r#"{"scope":"agent","agent":"coder-1","reason":"after the flood"}"#;
    let t0 = Instant::now();
    let (st, resp) = signed_post(admin, PERSON_WHSEC, "kill_after_flood", "/v1/kill", body).await;
    let took = t0.elapsed();
    assert_eq!(st, 200, "{resp}");
    assert!(
        took < Duration::from_millis(100),
        "signed kill took {took:?}"
    );

    // The control socket, as `portcullis kill` uses it: within 100 ms.
    let t0 = Instant::now();
    let (st, resp) = control(
        &dir.path().join("state"),
        serde_json::json!({"op":"kill","reason":"socket"}),
    )
    .await;
    let took = t0.elapsed();
    assert_eq!(st, 200, "{resp}");
    assert!(
        took < Duration::from_millis(100),
        "socket kill took {took:?}"
    );

    // And the command itself (a process start included).
    let cfg = cli_config(dir.path(), admin);
    let t0 = Instant::now();
    let (code_, out, err) = cli(&["kill", "--reason", "cli after flood"], &cfg);
    println!("portcullis kill took {:?}", t0.elapsed());
    assert_eq!(code_, 0, "{out}{err}");
    assert!(out.contains("\"action\":\"kill\""), "{out}");
    let st = status(admin).await;
    assert_eq!(st["all"]["reason"], "cli after flood", "{st}");
    assert_eq!(st["agents"]["coder-1"]["reason"], "after the flood");
    running.shutdown(Duration::from_secs(1)).await;
}

/// A captured revive (and the kill before it), replayed byte for byte after a restart,
/// within their five minutes: refused; the gateway stays killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_revive_replayed_after_a_restart_is_refused() {
    let up = silent_upstream().await;
    let port = up.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let agents = [("coder-1", agent(port))];
    let agents: Vec<(&str, &str)> = agents.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let resolver = || localhost_resolver(&["allowed.test"]);
    let (running, _) = start_in(dir.path(), &agents, &[], resolver(), with_keys).await;
    let admin = running.admin_addr.unwrap();
    let t = now();
    let kill = r#"{"scope":"all","reason":"first"}"#;
    let kill_h = signed_headers(PERSON_WHSEC, "captured_kill", t, kill);
    assert_eq!(
        admin_request(admin, "POST", "/v1/kill", &kill_h, kill.as_bytes())
            .await
            .0,
        200
    );
    let revive = format!(r#"{{"scope":"all","totp":"{}"}}"#, code(t));
    let revive_h = signed_headers(PERSON_WHSEC, "captured_revive", t, &revive);
    let (st, body) = admin_request(admin, "POST", "/v1/revive", &revive_h, revive.as_bytes()).await;
    assert_eq!(st, 200, "{body}");
    running.shutdown(Duration::from_secs(1)).await;

    let (running, log) = start_in(dir.path(), &agents, &[], resolver(), with_keys).await;
    let admin = running.admin_addr.unwrap();
    // The captured kill, replayed: refused (it would re-kill after the person's revive).
    let (st, body) = admin_request(admin, "POST", "/v1/kill", &kill_h, kill.as_bytes()).await;
    assert_eq!(st, 401, "captured kill replayed after restart: {body}");
    // Killed again by a new request, then the captured revive replayed: refused.
    let kill2 = r#"{"scope":"all","reason":"second"}"#;
    assert_eq!(
        signed_post(admin, PERSON_WHSEC, "kill_2", "/v1/kill", kill2)
            .await
            .0,
        200
    );
    let (st, body) = admin_request(admin, "POST", "/v1/revive", &revive_h, revive.as_bytes()).await;
    assert_eq!(st, 401, "captured revive replayed after restart: {body}");
    // The same code under a fresh id (the id memory lost, say): the TOTP step is spent.
    let fresh = signed_headers(PERSON_WHSEC, "fresh_id_same_code", t, &revive);
    let (st, body) = admin_request(admin, "POST", "/v1/revive", &fresh, revive.as_bytes()).await;
    assert_eq!(st, 401, "a used TOTP step accepted after restart: {body}");
    assert!(!status(admin).await["all"].is_null());
    assert!(
        open_tunnel(running.explicit_addr.unwrap(), "allowed.test", port)
            .await
            .is_err()
    );
    let lines = kill_switch_lines(&log).await;
    let reasons: Vec<&str> = lines
        .iter()
        .filter(|l| l["event.action"] == "deny")
        .filter_map(|l| l["event.reason"].as_str())
        .collect();
    assert_eq!(reasons, ["replay", "replay", "totp_invalid"], "{lines:?}");
    running.shutdown(Duration::from_secs(1)).await;
}

/// Mutation needs a signature; status shows no request ids; a kill restored at start-up is
/// logged; `/healthz` says `degraded` (HTTP 200) while killed or after a failed reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_mutation_refused_and_health_tells_the_truth() {
    let up = silent_upstream().await;
    let port = up.addr.port();
    let gw = gateway_with(
        &[("coder-1", &agent(port))],
        &[],
        localhost_resolver(&["allowed.test"]),
        with_keys,
    )
    .await;
    let generation = |h: &serde_json::Value| h["policy_generation"].as_u64().unwrap();
    let health = || async {
        let (code, body) = admin_request(gw.admin, "GET", "/healthz", &[], b"").await;
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    let h = health().await;
    assert_eq!(h["status"], "ok", "{h}");
    let (st, _) = admin_request(gw.admin, "POST", "/v1/reload", &[], b"").await;
    assert_eq!(st, 401);
    let forged = signed_headers(
        "whsec_bm90LXRoZS1yaWdodC1zZWNyZXQtYXQtYWxs",
        "r1",
        now(),
        "{}",
    );
    assert_eq!(
        admin_request(gw.admin, "POST", "/v1/reload", &forged, b"{}")
            .await
            .0,
        401
    );
    assert_eq!(
        generation(&health().await),
        1,
        "an unsigned reload reloaded"
    );
    let (st, body) = signed_post(gw.admin, PERSON_WHSEC, "r2", "/v1/reload", "{}").await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(generation(&health().await), 2);

    let body = r#"{"scope":"agent","agent":"coder-1","reason":"status test"}"#;
    assert_eq!(
        signed_post(
            gw.admin,
            PERSON_WHSEC,
            "msg_do_not_show_me",
            "/v1/kill",
            body
        )
        .await
        .0,
        200
    );
    let (_, st) = admin_request(gw.admin, "GET", "/v1/status", &[], b"").await;
    assert!(!st.contains("msg_do_not_show_me"), "{st}");
    assert!(st.contains("key:phone.secret"), "{st}");
    let h = health().await;
    assert_eq!(h["status"], "degraded", "{h}");
    assert!(
        h["reasons"].to_string().contains("agents killed: coder-1"),
        "{h}"
    );

    std::fs::write(
        gw.dir.path().join("rules/agents/coder-1.toml"),
        "name = \"coder-1\"\nallow = 3\n",
    )
    .unwrap();
    let (st, _) = signed_post(gw.admin, PERSON_WHSEC, "r3", "/v1/reload", "{}").await;
    assert_eq!(st, 422);
    let h = health().await;
    assert!(h["reasons"].to_string().contains("reload"), "{h}");
    let m = metrics(gw.admin).await;
    assert_eq!(metric(&m, "signature_invalid"), 2, "{m}");
    gw.stop().await;

    // A kill restored from the state file at start-up is logged.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    std::fs::write(
        dir.path().join("state/killswitch.json"),
        r#"{"version":1,"all":{"reason":"from before","at_unix":1,"by":"cli"},"agents":{}}"#,
    )
    .unwrap();
    let agents = [("coder-1", agent(port))];
    let agents: Vec<(&str, &str)> = agents.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let (running, log) = start_in(
        dir.path(),
        &agents,
        &[],
        localhost_resolver(&["allowed.test"]),
        with_keys,
    )
    .await;
    let lines = kill_switch_lines(&log).await;
    assert!(
        lines.iter().any(|l| l["event.action"] == "kill_restored"
            && l["portcullis.kill_switch.reason"] == "from before"),
        "{lines:?}"
    );
    running.shutdown(Duration::from_secs(1)).await;
}

/// Idle connections cannot hold the admin API: at most `max_connections` are served, each
/// for at most its deadlines; meanwhile the control socket still kills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_are_capped_and_timed_out() {
    let up = silent_upstream().await;
    let gw = gateway_with(
        &[("coder-1", &agent(up.addr.port()))],
        &[],
        localhost_resolver(&["allowed.test"]),
        |c, d| {
            with_keys(c, d);
            c.admin.max_connections = 8;
            c.admin.header_timeout = Duration::from_millis(500);
            c.admin.connection_timeout = Duration::from_secs(2);
        },
    )
    .await;
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(tokio::net::TcpStream::connect(gw.admin).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Past the cap, connections are closed at once.
    let mut closed_at_once = 0;
    for s in &mut idle {
        let mut b = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(20), s.read(&mut b)).await
        {
            closed_at_once += 1;
        }
    }
    assert_eq!(closed_at_once, 42, "the cap did not hold");
    // The control socket is not behind that cap.
    let (st, body) = control(
        &gw.dir.path().join("state"),
        serde_json::json!({"op":"kill"}),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    // The deadlines free the slots: every idle connection is closed within them.
    let deadline = Instant::now() + Duration::from_secs(4);
    for s in &mut idle {
        let mut b = [0u8; 1];
        let left = deadline.saturating_duration_since(Instant::now());
        let r = tokio::time::timeout(left, s.read(&mut b)).await;
        assert!(
            matches!(r, Ok(Ok(0) | Err(_))),
            "an idle admin connection outlived its deadline"
        );
    }
    let (code, _) = admin_request(gw.admin, "GET", "/healthz", &[], b"").await;
    assert_eq!(code, 200);
    gw.stop().await;
}

/// `/metrics` behind a bearer token when one is configured.
#[tokio::test]
async fn metrics_can_require_a_bearer_token() {
    let up = silent_upstream().await;
    let gw = gateway_with(
        &[("coder-1", &agent(up.addr.port()))],
        &[],
        localhost_resolver(&["allowed.test"]),
        |c, d| {
            std::fs::write(d.join("metrics.token"), "scrape-token-0123456789\n").unwrap();
            c.admin.metrics_token_file = Some(d.join("metrics.token"));
        },
    )
    .await;
    let (st, _) = admin_request(gw.admin, "GET", "/metrics", &[], b"").await;
    assert_eq!(st, 401);
    let wrong = [(
        "Authorization".to_owned(),
        "Bearer scrape-token-01234567890".to_owned(),
    )];
    assert_eq!(
        admin_request(gw.admin, "GET", "/metrics", &wrong, b"")
            .await
            .0,
        401
    );
    let right = [(
        "Authorization".to_owned(),
        "Bearer scrape-token-0123456789".to_owned(),
    )];
    let (st, body) = admin_request(gw.admin, "GET", "/metrics", &right, b"").await;
    assert_eq!(st, 200);
    assert!(body.contains("portcullis_kill_switch_auth_failures_total"));
    // Health stays open: a load balancer needs no token.
    assert_eq!(
        admin_request(gw.admin, "GET", "/healthz", &[], b"").await.0,
        200
    );
    gw.stop().await;
}

/// The control socket trusts its file mode and, behind it, the peer's credentials: even with
/// the socket opened to everyone (a mistaken chmod), a peer that is neither root nor the
/// service's user gets no answer and changes nothing. Needs root (to become another user).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_socket_answers_only_root_and_the_service_user() {
    let uid = std::process::Command::new("id").arg("-u").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "this test switches users and needs root: run `bash tests/run.sh` as root (CI does)"
    );
    let up = silent_upstream().await;
    let gw = gateway_with(
        &[("coder-1", &agent(up.addr.port()))],
        &[],
        localhost_resolver(&["allowed.test"]),
        with_keys,
    )
    .await;
    let state = gw.dir.path().join("state");
    let sock = state.join("control.sock");
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(&sock), 0o600, "the socket is not private");
    // Open the way for the test: the directories and the socket itself.
    use std::os::unix::fs::PermissionsExt;
    for p in [gw.dir.path(), state.as_path(), sock.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    // `portcullis kill` run as nobody: the gateway closes without an answer.
    let cfg = cli_config(gw.dir.path(), gw.admin);
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = tokio::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_portcullis"))
        .arg("--config")
        .arg(&cfg)
        .arg("kill")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Refused at the socket (no answer, a reset or a broken pipe, as the close races the
    // write): the command's I/O failure, exit 2.
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("control.sock"), "{stderr}");
    assert!(status(gw.admin).await["all"].is_null(), "a stranger killed");
    // Root, on the same socket, is answered.
    let (st, body) = control(&state, serde_json::json!({"op":"status"})).await;
    assert_eq!(st, 200, "{body}");
    gw.stop().await;
}
