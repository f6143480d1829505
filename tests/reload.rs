//! Hot reload: file edits (in place and rename-into-place) change verdicts within 2 s, a
//! broken file keeps the last good policy and says why, revoked live tunnels are closed, and
//! reloading under load never fails an allowed connection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;

fn agent(port: u16, names: &[&str]) -> String {
    let allow: Vec<String> = names.iter().map(|n| format!("\"{n}:{port}\"")).collect();
    format!(
        "name = \"coder-1\"\nsources = [\"127.0.0.0/8\"]\nallow = [{}]\nallow_cidrs = [\"127.0.0.1/32:{port}\"]\n",
        allow.join(", ")
    )
}

async fn allowed(gw: &TestGateway, host: &str, port: u16) -> bool {
    open_tunnel(gw.proxy, host, port).await.is_ok()
}

/// Poll until `host` is allowed (or not), bounded by `within`; returns the time it took.
async fn until(gw: &TestGateway, host: &str, port: u16, want: bool, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if allowed(gw, host, port).await == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{host} still {} after {within:?}",
            if want { "denied" } else { "allowed" }
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_in_place_and_by_rename_change_verdicts_within_2s() {
    let up = silent_upstream().await;
    let port = up.addr.port();
    let names = ["a.test", "b.test", "c.test"];
    let gw = gateway(
        &[("coder-1", &agent(port, &["a.test"]))],
        &[],
        localhost_resolver(&names),
    )
    .await;
    let file = gw.dir.path().join("rules/agents/coder-1.toml");
    assert!(allowed(&gw, "a.test", port).await);
    assert!(!allowed(&gw, "b.test", port).await);

    std::fs::write(&file, agent(port, &["a.test", "b.test"])).unwrap();
    let took = until(&gw, "b.test", port, true, Duration::from_secs(2)).await;
    println!("in-place edit took effect after {took:?}");

    // Editors write a temp file and rename it over the original.
    let tmp = gw.dir.path().join("rules/agents/.coder-1.toml.swp");
    std::fs::write(&tmp, agent(port, &["c.test"])).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    until(&gw, "c.test", port, true, Duration::from_secs(2)).await;
    until(&gw, "a.test", port, false, Duration::from_secs(2)).await;
    let (_, health) = admin_request(gw.admin, "GET", "/healthz", &[], b"").await;
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["last_reload"]["ok"], true);
    assert!(
        health["policy_generation"].as_u64().unwrap() >= 3,
        "{health}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_keeps_the_last_good_policy_and_reports_it() {
    let up = silent_upstream().await;
    let port = up.addr.port();
    let gw = gateway(
        &[("coder-1", &agent(port, &["a.test"]))],
        &[],
        localhost_resolver(&["a.test"]),
    )
    .await;
    let file = gw.dir.path().join("rules/agents/coder-1.toml");
    std::fs::write(&file, "name = \"coder-1\"\nallow = [\"*.com\"]\n").unwrap();
    let started = Instant::now();
    let health = loop {
        let (_, h) = admin_request(gw.admin, "GET", "/healthz", &[], b"").await;
        let h: serde_json::Value = serde_json::from_str(&h).unwrap();
        if h["last_reload"]["ok"] == false {
            break h;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the broken file was never reported: {h}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let error = health["last_reload"]["error"].as_str().unwrap();
    assert!(error.contains("coder-1.toml:2: key `allow`"), "{error}");
    assert_eq!(health["policy_generation"], 1);
    assert!(
        allowed(&gw, "a.test", port).await,
        "the last good policy was dropped"
    );
    let (_, metrics) = admin_request(gw.admin, "GET", "/metrics", &[], b"").await;
    assert!(
        metrics.contains("portcullis_policy_reload_total{result=\"failure\"} 1"),
        "{metrics}"
    );
    // An explicit reload reports the same error.
    let (code, body) = signed_reload(gw.admin).await;
    assert_eq!(code, 422, "{body}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_tunnels_the_new_policy_denies_are_closed() {
    let up = silent_upstream().await;
    let port = up.addr.port();
    let gw = gateway(
        &[("coder-1", &agent(port, &["a.test", "b.test"]))],
        &[],
        localhost_resolver(&["a.test", "b.test"]),
    )
    .await;
    let mut revoked = open_tunnel(gw.proxy, "a.test", port).await.unwrap();
    let mut kept = open_tunnel(gw.proxy, "b.test", port).await.unwrap();
    std::fs::write(
        gw.dir.path().join("rules/agents/coder-1.toml"),
        agent(port, &["b.test"]),
    )
    .unwrap();
    let (code, _) = signed_reload(gw.admin).await;
    assert_eq!(code, 200);
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(1), revoked.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "revoked tunnel still open: {closed:?}"
    );
    let still_open = tokio::time::timeout(Duration::from_millis(300), kept.read(&mut buf)).await;
    assert!(
        still_open.is_err(),
        "an allowed tunnel was closed: {still_open:?}"
    );
    let lines = gw.log_lines(1).await;
    assert!(
        lines
            .iter()
            .any(|l| l["event.reason"] == "policy_revoked" && l["destination.domain"] == "a.test"),
        "{lines:?}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reloads_under_200_clients_fail_no_allowed_connection() {
    let up = http_upstream("ok").await;
    let port = up.addr.port();
    let gw = gateway(
        &[("coder-1", &agent(port, &["a.test"]))],
        &[],
        localhost_resolver(&["a.test"]),
    )
    .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..200 {
        let proxy = gw.proxy;
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut ok, mut failed) = (0u32, 0u32);
            let deadline = Instant::now() + Duration::from_secs(20);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                let Ok(mut s) = tokio::net::TcpStream::connect(proxy).await else {
                    failed += 1;
                    continue;
                };
                let req = format!("GET http://a.test:{port}/ HTTP/1.1\r\nHost: a.test:{port}\r\nConnection: close\r\n\r\n");
                let mut resp = Vec::new();
                let done = async {
                    s.write_all(req.as_bytes()).await?;
                    s.read_to_end(&mut resp).await
                };
                match tokio::time::timeout(Duration::from_secs(5), done).await {
                    Ok(Ok(_)) if resp.starts_with(b"HTTP/1.1 200") => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        }));
    }
    let file = gw.dir.path().join("rules/agents/coder-1.toml");
    for i in 0..50 {
        // Each generation keeps a.test and adds an unrelated name.
        std::fs::write(&file, agent(port, &["a.test", &format!("extra{i}.test")])).unwrap();
        let (code, body) = signed_reload(gw.admin).await;
        assert_eq!(code, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, 0);
    for c in clients {
        let (o, f) = c.await.unwrap();
        ok += o;
        failed += f;
    }
    println!("{ok} allowed connections during 50 reloads, {failed} failed");
    assert!(ok >= 200, "too few connections to mean anything: {ok}");
    assert_eq!(failed, 0);
    gw.stop().await;
}

/// A reload reads every rules file; those reads must not count as changes, or the watcher
/// reloads forever (every debounce period) on its own reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_the_rules_does_not_trigger_a_reload() {
    let up = silent_upstream().await;
    let port = up.addr.port();
    let gw = gateway(
        &[("coder-1", &agent(port, &["a.test"]))],
        &[("shared", "allow = [\"x.test\"]\n")],
        localhost_resolver(&["a.test"]),
    )
    .await;
    let generation = |gw: &TestGateway| gw.running.as_ref().unwrap().policy_generation();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(generation(&gw), 1, "reloaded with no change at all");
    let (code, _) = signed_reload(gw.admin).await;
    assert_eq!(code, 200);
    assert_eq!(generation(&gw), 2);
    // Reading the files (by the reload above, and by anyone else) is not a change.
    for _ in 0..3 {
        let _ = std::fs::read_dir(gw.dir.path().join("rules/agents"))
            .unwrap()
            .count();
        let _ = std::fs::read_to_string(gw.dir.path().join("rules/agents/coder-1.toml")).unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(generation(&gw), 2, "the watcher reloaded on mere reads");
    gw.stop().await;
}

async fn generation(gw: &TestGateway) -> u64 {
    let (_, health) = admin_request(gw.admin, "GET", "/healthz", &[], b"").await;
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    health["policy_generation"].as_u64().unwrap()
}

/// A reload opens every rules file; if opening counted as a change, each reload would
/// trigger the next, a new policy generation every debounce period for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_edit_is_one_reload() {
    let gw = gateway(
        &[("coder-1", &agent(443, &["a.test"]))],
        &[],
        localhost_resolver(&["a.test"]),
    )
    .await;
    assert_eq!(generation(&gw).await, 1);
    let file = gw.dir.path().join("rules/agents/coder-1.toml");
    std::fs::write(&file, agent(443, &["a.test", "b.test"])).unwrap();
    let started = Instant::now();
    while generation(&gw).await < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the edit was not seen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Several debounce periods (200 ms) with no edit: no further generation. (A loop
    // would add one every period, 7 or more here; the events of one write landing in two
    // debounce windows on a loaded machine may add one.)
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let settled = generation(&gw).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(generation(&gw).await, settled, "reloads without an edit");
    assert!(settled <= 3, "one edit made {} reloads", settled - 1);
    gw.stop().await;
}
