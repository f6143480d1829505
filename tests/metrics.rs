//! The metrics as Prometheus sees them: exact counter movement after real connections,
//! bounded cardinality, every name the dashboard and alerts use exists, and a real
//! Prometheus scraping a running portcullis.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use portcullis::proxy::upstream::StaticResolver;

async fn scrape(gw: &TestGateway) -> String {
    let (code, body) = admin_request(gw.admin, "GET", "/metrics", &[], b"").await;
    assert_eq!(code, 200);
    body
}

/// The value of one sample line (`name{labels} value`), or 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

fn series_count(text: &str) -> usize {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count()
}

fn agent(port: u16) -> String {
    format!(
        "name = \"coder-1\"\nsources = [\"127.0.0.0/8\"]\nallow = [\"allowed.test:{port}\", \"meta.test:{port}\"]\nallow_cidrs = [\"127.0.0.1/32:{port}\"]\n"
    )
}

#[tokio::test]
async fn counters_move_by_exactly_what_happened() {
    let up = http_upstream("0123456789").await;
    let port = up.addr.port();
    let resolver = localhost_resolver(&["allowed.test"])
        .with("meta.test", &["169.254.169.254".parse().unwrap()]);
    let gw = gateway(&[("coder-1", &agent(port))], &[], resolver).await;
    let before = scrape(&gw).await;
    for _ in 0..2 {
        let out = curl(&[
            "-x",
            &gw.proxy_url(),
            &format!("http://allowed.test:{port}/"),
        ])
        .await;
        assert_eq!(out.stdout, "0123456789");
    }
    for host in ["evil.test", "evil2.test", "evil3.test"] {
        curl(&[
            "-x",
            &gw.proxy_url(),
            "-o",
            "/dev/null",
            &format!("http://{host}:{port}/"),
        ])
        .await;
    }
    curl(&[
        "-x",
        &gw.proxy_url(),
        "-o",
        "/dev/null",
        &format!("http://meta.test:{port}/"),
    ])
    .await;
    let lines = gw.log_lines(6).await;
    let after = scrape(&gw).await;
    // Heads count too (as in a tunnel, every byte): what the log says each request sent.
    let to_agent: u64 = lines
        .iter()
        .filter(|l| l["event.action"] == "allow")
        .map(|l| l["destination.bytes"].as_u64().unwrap())
        .sum();
    assert!(to_agent > 20, "{lines:?}");
    let delta = |s: &str| sample(&after, s) - sample(&before, s);
    let c = |verdict: &str, reason: &str| {
        format!(
            "portcullis_connections_total{{agent=\"coder-1\",mode=\"explicit\",verdict=\"{verdict}\",reason=\"{reason}\"}}"
        )
    };
    assert_eq!(delta(&c("allow", "none")), 2.0, "{after}");
    assert_eq!(delta(&c("deny", "not_allowed")), 3.0);
    assert_eq!(delta(&c("deny", "private_address")), 1.0);
    assert_eq!(
        delta("portcullis_bytes_total{agent=\"coder-1\",direction=\"to_agent\"}"),
        to_agent as f64
    );
    assert_eq!(
        delta("portcullis_connection_duration_seconds_count{mode=\"explicit\"}"),
        6.0
    );
    assert_eq!(delta("portcullis_decision_duration_seconds_count"), 6.0);
    assert_eq!(
        sample(&after, "portcullis_active_tunnels{agent=\"coder-1\"}"),
        0.0
    );
    assert_eq!(sample(&after, "portcullis_policy_generation"), 1.0);
    gw.stop().await;
}

#[tokio::test]
async fn series_do_not_grow_with_distinct_domains() {
    let gw = gateway(&[("coder-1", &agent(9))], &[], StaticResolver::new()).await;
    // Warm up: the first denial creates its series.
    curl(&[
        "-x",
        &gw.proxy_url(),
        "-o",
        "/dev/null",
        "http://warmup.test/",
    ])
    .await;
    let before = series_count(&scrape(&gw).await);
    // 10,000 distinct names, 1,000 per keep-alive connection.
    let mut tasks = Vec::new();
    for c in 0..10 {
        let proxy = gw.proxy;
        tasks.push(tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
            let mut buf = vec![0u8; 4096];
            for i in 0..1000 {
                let host = format!("d{c}-{i}.random-{}.test", c * 1000 + i);
                let req = format!("GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\n\r\n");
                s.write_all(req.as_bytes()).await.unwrap();
                let mut got = Vec::new();
                while !String::from_utf8_lossy(&got).contains("denied (not_allowed)\n") {
                    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                        .await
                        .unwrap()
                        .unwrap();
                    assert!(n > 0, "proxy closed the connection");
                    got.extend_from_slice(&buf[..n]);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let text = scrape(&gw).await;
    assert_eq!(
        series_count(&text),
        before,
        "series grew with distinct domains"
    );
    assert!(!text.contains("random-"), "a domain leaked into a label");
    let denied = "portcullis_connections_total{agent=\"coder-1\",mode=\"explicit\",verdict=\"deny\",reason=\"not_allowed\"}";
    assert_eq!(sample(&text, denied), 10_001.0);
    gw.stop().await;
}

/// Every `portcullis_*` metric name in a deploy file.
fn names_in(path: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap();
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("portcullis_") {
        let start = i + pos;
        let preceded_ok =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |e| start + e);
        if preceded_ok {
            out.insert(text[start..end].to_owned());
        }
        i = end;
    }
    out
}

#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_use_exists() {
    let up = http_upstream("x").await;
    let port = up.addr.port();
    let with_budget = agent(port) + "[limits]\ndaily_bytes = \"1 GiB\"\n";
    // A cluster node (its peer never answers), so the per-peer series exist too.
    let peer: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let gw = gateway_with(
        &[("coder-1", &with_budget)],
        &[],
        localhost_resolver(&["allowed.test"]),
        |c, _| {
            c.cluster = portcullis::cluster::ClusterSettings {
                node: "a".into(),
                peers: vec![portcullis::cluster::Peer {
                    url: format!("http://{peer}"),
                    addr: peer,
                }],
                sync_timeout: Duration::ZERO,
                ..portcullis::cluster::ClusterSettings::default()
            };
        },
    )
    .await;
    // Serving once the (failed) start-up sync is over.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !scrape(&gw).await.contains("portcullis_cluster_synced 1") {
        assert!(
            Instant::now() < deadline,
            "the node never finished its start-up sync"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Families appear once they have a series: one allowed and one denied connection.
    curl(&[
        "-x",
        &gw.proxy_url(),
        &format!("http://allowed.test:{port}/"),
    ])
    .await;
    curl(&[
        "-x",
        &gw.proxy_url(),
        "-o",
        "/dev/null",
        "http://evil.test/",
    ])
    .await;
    gw.log_lines(2).await;
    let text = scrape(&gw).await;
    let exposed: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let known = |n: &str| {
        exposed.contains(n)
            || ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .any(|s| n.strip_suffix(s).is_some_and(|b| exposed.contains(b)))
    };
    for file in [
        "deploy/grafana/portcullis.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let used = names_in(file);
        assert!(used.len() >= 5, "{file}: found only {used:?}");
        let missing: Vec<&String> = used.iter().filter(|n| !known(n)).collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics that do not exist: {missing:?}\nexposed: {exposed:?}"
        );
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_portcullis() {
    let gw = gateway(&[("coder-1", &agent(9))], &[], StaticResolver::new()).await;
    curl(&[
        "-x",
        &gw.proxy_url(),
        "-o",
        "/dev/null",
        "http://evil.test/",
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let prom_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: portcullis\n    static_configs:\n      - targets: ['{}']\n",
            gw.admin
        ),
    )
    .unwrap();
    let mut prom = tokio::process::Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus is installed (tests/run.sh installs it)");
    let query = format!(
        "http://127.0.0.1:{prom_port}/api/v1/query?query=portcullis_connections_total%7Breason%3D%22not_allowed%22%7D"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let found = loop {
        let out = curl(&[&query]).await;
        if out.stdout.contains("\"agent\":\"coder-1\"")
            && out.stdout.contains("\"reason\":\"not_allowed\"")
        {
            break out.stdout;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never had the counter: {}",
            out.stdout
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(found.contains("\"1\"]"), "{found}");
    let _ = prom.kill().await;
    gw.stop().await;
}
