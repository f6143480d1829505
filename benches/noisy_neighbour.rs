//! One noisy agent hammering at its connection-rate limit must not raise another agent's p99
//! connection latency by more than 20 % (issue target). Measured in one run: the quiet
//! agent's plain-HTTP round trips through the proxy, alone and then beside the noise.
//! Run: `cargo bench --bench noisy_neighbour`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use portcullis::config::{Config, LogDestination};
use portcullis::policy::Policy;
use portcullis::proxy::upstream::StaticResolver;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Samples per measurement; `cargo test` (no `--bench` argument) runs a short smoke pass.
fn samples() -> usize {
    if std::env::args().any(|a| a == "--bench") {
        2_000
    } else {
        50
    }
}

async fn upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = l.local_addr().unwrap_or_else(|e| panic!("addr: {e}"));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    addr
}

/// One new connection + one plain-HTTP request through the proxy; the round-trip time.
async fn round_trip(proxy: SocketAddr, port: u16, auth: &str) -> Option<(Duration, bool)> {
    let started = Instant::now();
    let mut s = TcpStream::connect(proxy).await.ok()?;
    let req = format!(
        "GET http://allowed.test:{port}/ HTTP/1.1\r\nHost: allowed.test:{port}\r\nProxy-Authorization: Basic {auth}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.ok()?;
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut resp))
        .await
        .ok()?
        .ok()?;
    Some((started.elapsed(), resp.starts_with(b"HTTP/1.1 200")))
}

fn p(mut v: Vec<Duration>, q: f64) -> Duration {
    v.sort();
    v.get(((v.len() as f64 - 1.0) * q) as usize)
        .copied()
        .unwrap_or_default()
}

fn agent(name: &str, port: u16, limits: &str) -> String {
    use sha2::Digest;
    let hash = hex::encode(sha2::Sha256::digest(b"pw"));
    format!(
        "name = \"{name}\"\nallow = [\"allowed.test:{port}\"]\nallow_cidrs = [\"127.0.0.1/32:{port}\"]\n[credentials]\nusername = \"{name}\"\npassword_sha256 = \"{hash}\"\n{limits}"
    )
}

async fn measure(proxy: SocketAddr, port: u16) -> Vec<Duration> {
    let n = samples();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        if let Some((d, true)) = round_trip(proxy, port, "cXVpZXQ6cHc=").await {
            out.push(d);
        }
    }
    out
}

/// The noisy agent: `clients` loops of round trips, each paced to `per_client_rate` per
/// second (`None`: as fast as it can). Returns (admitted, refused) counters and a stop flag.
fn noise(
    proxy: SocketAddr,
    port: u16,
    clients: usize,
    per_client_rate: Option<f64>,
) -> (
    Arc<AtomicBool>,
    Arc<AtomicU64>,
    Arc<AtomicU64>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let (admitted, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (stop, admitted, refused) = (stop.clone(), admitted.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut tick = per_client_rate.map(|r| {
                let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / r));
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                match round_trip(proxy, port, "bm9pc3k6cHc=").await {
                    Some((_, true)) => admitted.fetch_add(1, Ordering::Relaxed),
                    _ => refused.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    (stop, admitted, refused, tasks)
}

fn main() {
    // The gateway on a runtime of its own (one worker), the clients (quiet and noisy) and
    // the upstream on another: the quiet agent's latency then measures the gateway, not
    // the load generator competing with it inside one scheduler.
    let gateway_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let port = client_rt.block_on(upstream()).port();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let running = gateway_rt.block_on(async {
        let rules = dir.path().join("rules");
        let agents = rules.join("agents");
        std::fs::create_dir_all(&agents).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(agents.join("quiet.toml"), agent("quiet", port, ""))
            .unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(
            agents.join("noisy.toml"),
            agent("noisy", port, "[limits]\nnew_connections_per_second = 50\n"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut config = Config::builtin();
        config.rules_dir = rules.clone();
        config.state_dir = dir.path().join("state");
        config.explicit_listen = Some(([127, 0, 0, 1], 0).into());
        config.admin_listen = None;
        config.log_destination = LogDestination::File(dir.path().join("log"));
        let policy =
            Policy::load(&rules, &config.default_ports, 1).unwrap_or_else(|e| panic!("{e}"));
        let resolver = StaticResolver::new().with("allowed.test", &[[127, 0, 0, 1].into()]);
        portcullis::gateway::start(config, policy, Arc::new(resolver))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    });
    let proxy = running.explicit_addr.unwrap_or_else(|| panic!("no proxy"));

    client_rt.block_on(async {
        let _ = measure(proxy, port).await; // warm up
        let alone = measure(proxy, port).await;
        let (p50a, p99a) = (p(alone.clone(), 0.5), p(alone, 0.99));
        println!("| quiet agent round trip | p50 | p99 | p99 ratio |");
        println!("|---|---|---|---|");
        println!("| alone | {p50a:?} | {p99a:?} | 1.00 |");
        // At its limit: the noisy agent offers 8 times its 50/s (past its burst within the
        // measurement, then mostly refused); then a flood: as fast as 4 clients can go.
        for (label, clients, rate) in [
            ("noisy agent at its limit (offers 400/s, limit 50/s)", 4, Some(100.0)),
            ("noisy agent flooding (4 clients, unpaced)", 4, None),
        ] {
            let (stop, admitted, refused, tasks) = noise(proxy, port, clients, rate);
            let started = Instant::now();
            let beside = measure(proxy, port).await;
            let secs = started.elapsed().as_secs_f64();
            stop.store(true, Ordering::Relaxed);
            for t in tasks {
                let _ = t.await;
            }
            let (p50b, p99b) = (p(beside.clone(), 0.5), p(beside, 0.99));
            println!(
                "| beside a {label}: {:.0} admitted/s, {:.0} refused/s | {p50b:?} | {p99b:?} | {:.2} |",
                admitted.load(Ordering::Relaxed) as f64 / secs,
                refused.load(Ordering::Relaxed) as f64 / secs,
                p99b.as_secs_f64() / p99a.as_secs_f64().max(1e-9)
            );
        }
        println!("target: p99 ratio at its limit <= 1.20");
    });
    gateway_rt.block_on(running.shutdown(Duration::from_secs(1)));
}
