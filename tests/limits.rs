//! Per-agent limits measured from the outside: new connections per second (±20 % over 5 s),
//! bandwidth (±10 % over 5 s), concurrent tunnels, and a daily byte budget that cuts a live
//! tunnel and survives a restart. Another agent is unaffected by a limited one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// An upstream that, once the client has sent anything, streams zeros for up to 20 s.
async fn firehose() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut first = [0u8; 4096];
                if s.read(&mut first).await.unwrap_or(0) == 0 {
                    return;
                }
                let zeros = vec![0u8; 64 * 1024];
                let deadline = Instant::now() + Duration::from_secs(20);
                while Instant::now() < deadline && s.write_all(&zeros).await.is_ok() {}
            });
        }
    });
    addr
}

fn agent(port: u16, limits: &str) -> String {
    format!(
        "name = \"coder-1\"\nsources = [\"127.0.0.0/8\"]\nallow = [\"allowed.test:{port}\"]\nallow_cidrs = [\"127.0.0.1/32:{port}\"]\n[limits]\n{limits}\n"
    )
}

/// A second agent, identified by proxy credentials rather than its (shared) source address.
fn other_agent(port: u16) -> String {
    use sha2::Digest;
    let hash = hex::encode(sha2::Sha256::digest(b"pw"));
    format!(
        "name = \"other\"\nallow = [\"allowed.test:{port}\"]\nallow_cidrs = [\"127.0.0.1/32:{port}\"]\n[credentials]\nusername = \"other\"\npassword_sha256 = \"{hash}\"\n"
    )
}

/// Send a CONNECT (optionally authenticated) and return the response head.
async fn connect_head(proxy: SocketAddr, port: u16, auth: Option<&str>) -> String {
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let auth = auth.map_or(String::new(), |a| {
        format!("Proxy-Authorization: Basic {a}\r\n")
    });
    let req =
        format!("CONNECT allowed.test:{port} HTTP/1.1\r\nHost: allowed.test:{port}\r\n{auth}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
            Ok(Ok(1)) => head.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_per_second_are_limited_and_other_agents_are_not() {
    let port = firehose().await.port();
    let gw = gateway(
        &[
            (
                "coder-1",
                &agent(port, "new_connections_per_second = 10\nburst = 10"),
            ),
            ("other", &other_agent(port)),
        ],
        &[],
        localhost_resolver(&["allowed.test"]),
    )
    .await;
    // Spend the burst.
    let mut limited_head = String::new();
    for _ in 0..40 {
        let head = connect_head(gw.proxy, port, None).await;
        if !head.starts_with("HTTP/1.1 200") {
            limited_head = head;
            break;
        }
    }
    assert!(limited_head.starts_with("HTTP/1.1 429"), "{limited_head}");
    assert!(
        limited_head.to_ascii_lowercase().contains("retry-after: "),
        "{limited_head}"
    );
    assert!(limited_head.contains("rate_limited"), "{limited_head}");
    // Then measure the sustained rate over 5 s of trying as fast as we can.
    let started = Instant::now();
    let mut admitted = 0u32;
    let mut other_ok = true;
    while started.elapsed() < Duration::from_secs(5) {
        if connect_head(gw.proxy, port, None)
            .await
            .starts_with("HTTP/1.1 200")
        {
            admitted += 1;
        }
        // "other" (base64 of other:pw) keeps getting through while coder-1 is limited.
        other_ok &= connect_head(gw.proxy, port, Some("b3RoZXI6cHc="))
            .await
            .starts_with("HTTP/1.1 200");
    }
    let rate = f64::from(admitted) / started.elapsed().as_secs_f64();
    println!("sustained admitted rate {rate:.2}/s (configured 10/s)");
    assert!(
        (8.0..=12.0).contains(&rate),
        "rate {rate:.2}/s is not within 20 % of 10/s"
    );
    assert!(other_ok, "another agent was limited");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_is_held_to_the_configured_rate() {
    let port = firehose().await.port();
    let gw = gateway(
        &[("coder-1", &agent(port, "bandwidth = \"1 MiB/s\""))],
        &[],
        localhost_resolver(&["allowed.test"]),
    )
    .await;
    let mut s = open_tunnel(gw.proxy, "allowed.test", port).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    // Start the clock at the first byte, so connection set-up is not counted.
    let n = s.read(&mut buf).await.unwrap();
    let started = Instant::now();
    let mut total = n as u64;
    while started.elapsed() < Duration::from_secs(5) {
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => total += n as u64,
            Err(_) => {}
        }
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    let target = 1024.0 * 1024.0;
    println!(
        "measured {rate:.0} B/s for a 1 MiB/s limit ({total} B in {:?})",
        started.elapsed()
    );
    assert!(
        (rate - target).abs() <= target * 0.10,
        "{rate:.0} B/s is not within 10 % of {target}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn concurrent_tunnels_are_capped() {
    let port = firehose().await.port();
    let gw = gateway(
        &[("coder-1", &agent(port, "max_concurrent = 3"))],
        &[],
        localhost_resolver(&["allowed.test"]),
    )
    .await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(open_tunnel(gw.proxy, "allowed.test", port).await.unwrap());
    }
    let err = open_tunnel(gw.proxy, "allowed.test", port)
        .await
        .unwrap_err();
    assert!(
        err.starts_with("HTTP/1.1 429") && err.contains("rate_limited"),
        "{err}"
    );
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(3);
    while open_tunnel(gw.proxy, "allowed.test", port).await.is_err() {
        assert!(Instant::now() < deadline, "the slot was not released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_budget_cuts_the_tunnel_and_survives_restart() {
    let port = firehose().await.port();
    let dir = tempfile::tempdir().unwrap();
    let text = agent(port, "daily_bytes = \"200 KB\"");
    let agents = [("coder-1", text.as_str())];
    let (running, log) = start_in(
        dir.path(),
        &agents,
        &[],
        localhost_resolver(&["allowed.test"]),
        |_, _| {},
    )
    .await;
    let proxy = running.explicit_addr.unwrap();
    let mut s = open_tunnel(proxy, "allowed.test", port).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => total += n as u64,
            Err(_) => panic!("the tunnel was not cut after {total} bytes"),
        }
    }
    println!("tunnel cut after {total} bytes for a 200 KB budget");
    assert!(
        (200_000..=200_000 + 64 * 1024).contains(&total),
        "cut after {total} bytes"
    );
    let second = open_tunnel(proxy, "allowed.test", port).await;
    let err = match second {
        Ok(_) => panic!(
            "admitted after the budget was spent; log: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        ),
        Err(e) => e,
    };
    assert!(
        err.starts_with("HTTP/1.1 429") && err.contains("budget_exceeded"),
        "{err}"
    );
    assert!(err.to_ascii_lowercase().contains("retry-after: "), "{err}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("\"event.reason\":\"budget_exceeded\"")
    {
        assert!(Instant::now() < deadline, "no budget_exceeded log line");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.shutdown(Duration::from_secs(1)).await;

    let (running, _) = start_in(
        dir.path(),
        &agents,
        &[],
        localhost_resolver(&["allowed.test"]),
        |_, _| {},
    )
    .await;
    let err = open_tunnel(running.explicit_addr.unwrap(), "allowed.test", port)
        .await
        .unwrap_err();
    assert!(
        err.contains("budget_exceeded"),
        "the budget did not survive a restart: {err}"
    );
    running.shutdown(Duration::from_secs(1)).await;
}

/// A plain-HTTP upstream: `GET` answers 20 MiB of zeros (Content-Length), `POST` reads the
/// whole body and answers how many bytes it got.
async fn http_firehose() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut s = tokio::io::BufReader::new(s);
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    use tokio::io::AsyncBufReadExt;
                    if s.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let end = line == "\r\n";
                    head.push_str(&line);
                    if end {
                        break;
                    }
                }
                let s = s.get_mut();
                if head.starts_with("POST") {
                    let mut got = 0u64;
                    let mut buf = vec![0u8; 64 * 1024];
                    let deadline = Instant::now() + Duration::from_secs(20);
                    while Instant::now() < deadline {
                        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf))
                            .await
                        {
                            Ok(Ok(0)) | Ok(Err(_)) => break,
                            Ok(Ok(n)) => got += n as u64,
                            Err(_) => {}
                        }
                        if head.contains(&format!("content-length: {got}"))
                            || head.contains(&format!("Content-Length: {got}"))
                        {
                            break;
                        }
                    }
                    let body = got.to_string();
                    let _ = s
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            )
                            .as_bytes(),
                        )
                        .await;
                    return;
                }
                let total: usize = 20 * 1024 * 1024;
                if s.write_all(
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n").as_bytes(),
                )
                .await
                .is_err()
                {
                    return;
                }
                let zeros = vec![0u8; 64 * 1024];
                let mut sent = 0;
                while sent < total && s.write_all(&zeros).await.is_ok() {
                    sent += zeros.len();
                }
            });
        }
    });
    addr
}

/// Read a plain-HTTP response's body for up to `secs`, from the first body byte; returns
/// (bytes, seconds).
async fn read_body_for(s: &mut tokio::net::TcpStream, secs: u64) -> (u64, f64) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut head = Vec::new();
    let mut total;
    // The head, then count what follows it.
    loop {
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "closed before the head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            assert!(
                head.starts_with(b"HTTP/1.1 200"),
                "{:?}",
                String::from_utf8_lossy(&head)
            );
            total = (head.len() - i - 4) as u64;
            break;
        }
    }
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(secs) {
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => total += n as u64,
            Err(_) => {}
        }
    }
    (total, started.elapsed().as_secs_f64())
}

/// The field report: an agent limited to 100 KiB/s and 1 MiB a day pulled 20 MiB over plain
/// HTTP in 0.02 s. A plain-HTTP download is now shaped to `bandwidth` (±20 %).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_download_is_shaped_to_the_bandwidth() {
    let port = http_firehose().await.port();
    let gw = gateway(
        &[("coder-1", &agent(port, "bandwidth = \"512 KiB/s\""))],
        &[],
        localhost_resolver(&["allowed.test"]),
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let req =
        format!("GET http://allowed.test:{port}/big HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let (total, secs) = read_body_for(&mut s, 4).await;
    let rate = total as f64 / secs;
    let target = 512.0 * 1024.0;
    println!("plain HTTP: {rate:.0} B/s for a 512 KiB/s limit ({total} B in {secs:.2} s)");
    assert!(
        (rate - target).abs() <= target * 0.20,
        "{rate:.0} B/s is not within 20 % of {target}"
    );
    gw.stop().await;
}

/// Downloads and uploads stop at the daily budget, at most one 64 KiB piece beyond it; the
/// record says `budget_exceeded`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_stops_at_the_daily_budget_both_ways() {
    let port = http_firehose().await.port();
    let budget: u64 = 1024 * 1024;
    let gw = gateway(
        &[("coder-1", &agent(port, "daily_bytes = \"1 MiB\""))],
        &[],
        localhost_resolver(&["allowed.test"]),
    )
    .await;
    // Download: 20 MiB offered.
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let req =
        format!("GET http://allowed.test:{port}/big HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let (got, _) = read_body_for(&mut s, 3).await;
    println!("download under a 1 MiB budget: {got} B");
    assert!(
        got <= budget + 64 * 1024,
        "{got} B passed a {budget} B budget"
    );
    assert!(
        got >= budget / 2,
        "only {got} B: the budget was not what stopped it"
    );
    let lines = gw.log_lines(1).await;
    assert!(
        lines.iter().any(|l| l["event.reason"] == "budget_exceeded"),
        "{lines:?}"
    );
    gw.stop().await;

    // Upload: five parallel 4 MiB POSTs against a fresh 1 MiB budget.
    let gw = gateway(
        &[("coder-1", &agent(port, "daily_bytes = \"1 MiB\""))],
        &[],
        localhost_resolver(&["allowed.test"]),
    )
    .await;
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let proxy = gw.proxy;
        tasks.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
            let len = 4 * 1024 * 1024;
            let head = format!(
                "POST http://allowed.test:{port}/up HTTP/1.1\r\nHost: allowed.test:{port}\r\nContent-Length: {len}\r\n\r\n"
            );
            if s.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let zeros = vec![0u8; 64 * 1024];
            for _ in 0..len / zeros.len() {
                if tokio::time::timeout(Duration::from_secs(3), s.write_all(&zeros))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }));
    }
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, metrics) = admin_request(gw.admin, "GET", "/metrics", &[], b"").await;
    let sent: u64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("portcullis_bytes_total{agent=\"coder-1\",direction=\"from_agent\"} ")
        })
        .map_or(0, |v| v.trim().parse().unwrap());
    println!("uploads under a 1 MiB budget: {sent} B passed on");
    // Each of the five may overshoot by one piece at most.
    assert!(
        sent <= budget + 5 * 64 * 1024,
        "{sent} B passed a {budget} B budget"
    );
    gw.stop().await;
}
