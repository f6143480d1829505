//! Load generator and fake TLS backend for `benches/load/run.sh`.
//!
//! `loadgen backend --listen ADDR` serves the upstream side: it reads one TLS record (the
//! ClientHello), answers a fixed 64-byte "server hello", then reads one command byte:
//! `S` source (writes as fast as it can), `E` echo; EOF closes.
//!
//! `loadgen client --path direct|connect|sni --addr ADDR [--host H --port P] [--pid PID]
//! --tests rss,bulk1,bulk8,conns,ping,newconn` opens tunnels the way an agent would:
//! - `direct`: TCP to the backend, ClientHello, read the answer;
//! - `connect`: TCP to the proxy, `CONNECT host:port`, expect 200, then the same;
//! - `sni`: TCP to the proxy's SNI listener, ClientHello, read the answer;
//!
//! and prints one `name value` line per figure (machine-readable, parsed by run.sh).
//!
//! `loadgen relay --listen ADDR --to ADDR [--copy]`: a minimal relay, the reference for
//! the bulk tests (relay.rs).
//! With `--pid`, the proxy's CPU ticks and RSS are read from /proc around a test.
//! Everything runs on one current-thread runtime: run.sh pins this process to one core.

mod hello;
mod procfs;
mod relay;

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const REPLY_LEN: usize = 64;
const PING_LEN: usize = 64;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => fail(&format!("runtime: {e}")),
    };
    match args.first().map(String::as_str) {
        Some("backend") => {
            let listen = addr(&opt(&args, "--listen").unwrap_or_else(|| fail("--listen")));
            if let Err(e) = rt.block_on(backend(listen)) {
                fail(&format!("backend: {e}"));
            }
        }
        Some("client") => rt.block_on(client(&args)),
        Some("relay") => {
            let listen = addr(&opt(&args, "--listen").unwrap_or_else(|| fail("--listen")));
            let to = addr(&opt(&args, "--to").unwrap_or_else(|| fail("--to")));
            let mode = if args.iter().any(|a| a == "--copy") {
                relay::Mode::Copy
            } else {
                relay::Mode::Splice
            };
            if let Err(e) = relay::run(listen, to, mode) {
                fail(&format!("relay: {e}"));
            }
        }
        _ => fail(
            "usage: loadgen backend --listen ADDR | loadgen client --path P --addr A ... \
             | loadgen relay --listen ADDR --to ADDR [--copy]",
        ),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("loadgen: {msg}");
    std::process::exit(2)
}

fn opt(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn num<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    match opt(args, name) {
        None => default,
        Some(v) => v
            .parse()
            .unwrap_or_else(|_| fail(&format!("{name}: not a number: {v}"))),
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|_| fail(&format!("not an address: {s}")))
}

// ---------------------------------------------------------------- backend

async fn backend(listen: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(async move {
                    let _ = serve(stream).await;
                });
            }
            // EMFILE and friends: back off briefly instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

async fn serve(mut s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut header = [0u8; 5];
    s.read_exact(&mut header).await?;
    if header[0] != 0x16 {
        return Err(io::Error::other("not a TLS handshake record"));
    }
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    s.write_all(&reply()).await?;
    let mut cmd = [0u8; 1];
    if s.read(&mut cmd).await? == 0 {
        return Ok(());
    }
    match cmd[0] {
        b'S' => {
            let buf = vec![0x5a_u8; 256 * 1024];
            loop {
                s.write_all(&buf).await?;
            }
        }
        b'E' => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                s.write_all(&buf[..n]).await?;
            }
        }
        _ => Ok(()),
    }
}

/// 64 bytes that start like a TLS handshake record; nobody parses them.
fn reply() -> [u8; REPLY_LEN] {
    let mut r = [0x42u8; REPLY_LEN];
    r[..5].copy_from_slice(&[0x16, 0x03, 0x03, 0x00, (REPLY_LEN - 5) as u8]);
    r
}

// ---------------------------------------------------------------- client

#[derive(Clone, Copy, PartialEq)]
enum Path {
    Direct,
    Connect,
    Sni,
}

struct Target {
    path: Path,
    addr: SocketAddr,
    connect_line: Vec<u8>,
    hello: Vec<u8>,
}

/// Open one tunnel: TCP, optional CONNECT exchange, ClientHello, the backend's answer;
/// at most 10 s.
async fn open(t: &Target) -> io::Result<TcpStream> {
    tokio::time::timeout(Duration::from_secs(10), open_unbounded(t))
        .await
        .unwrap_or_else(|_| Err(io::Error::other("tunnel setup timed out")))
}

async fn open_unbounded(t: &Target) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect(t.addr).await?;
    s.set_nodelay(true)?;
    let mut extra = 0;
    if t.path == Path::Connect {
        s.write_all(&t.connect_line).await?;
        let mut head = [0u8; 2048];
        let mut got = 0;
        let end = loop {
            let n = s.read(&mut head[got..]).await?;
            if n == 0 {
                return Err(io::Error::other("proxy closed during CONNECT"));
            }
            got += n;
            if let Some(p) = head[..got].windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if got == head.len() {
                return Err(io::Error::other("CONNECT response head too long"));
            }
        };
        if !(head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200")) {
            return Err(io::Error::other(format!(
                "CONNECT refused: {}",
                String::from_utf8_lossy(&head[..end.min(80)])
            )));
        }
        extra = got - end; // nothing should follow the head before our hello; tolerate it
    }
    s.write_all(&t.hello).await?;
    let mut answer = [0u8; REPLY_LEN];
    s.read_exact(&mut answer[..REPLY_LEN - extra.min(REPLY_LEN)])
        .await?;
    Ok(s)
}

async fn client(args: &[String]) {
    let path = match opt(args, "--path").as_deref() {
        Some("direct") => Path::Direct,
        Some("connect") => Path::Connect,
        Some("sni") => Path::Sni,
        _ => fail("--path direct|connect|sni"),
    };
    let host = opt(args, "--host").unwrap_or_else(|| "backend.bench.test".into());
    let port: u16 = num(args, "--port", 9443);
    let target = Target {
        path,
        addr: addr(&opt(args, "--addr").unwrap_or_else(|| fail("--addr"))),
        connect_line: format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n")
            .into_bytes(),
        hello: hello::client_hello(&host),
    };
    let pid: u32 = num(args, "--pid", 0);
    let clk_tck: f64 = num(args, "--clk-tck", 100.0);
    let secs: f64 = num(args, "--secs", 3.0);
    let idle: usize = num(args, "--idle", 5000);
    let concurrency: usize = num(args, "--concurrency", 64);
    let tests =
        opt(args, "--tests").unwrap_or_else(|| "idlecpu,rss,bulk1,bulk8,conns,ping,newconn".into());
    let target = std::sync::Arc::new(target);
    let window = Duration::from_secs_f64(secs);
    for test in tests.split(',') {
        match test {
            "idlecpu" if pid != 0 => idle_cpu(pid, clk_tck).await,
            "idlecpu" => {}
            "rss" if pid != 0 => rss(&target, idle, pid).await,
            "rss" => {}
            "bulk1" => bulk(&target, 1, window).await,
            "bulk8" => bulk(&target, 8, window).await,
            "conns" => conns(&target, concurrency, window, pid, clk_tck).await,
            "ping" => ping(&target, window).await,
            "newconn" => newconn(&target, window).await,
            other => fail(&format!("unknown test {other}")),
        }
    }
}

/// The proxy's CPU with no traffic at all, over 2 s: background work (timers, reloads).
async fn idle_cpu(pid: u32, clk_tck: f64) {
    let before = procfs::cpu_ticks(pid);
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ticks = procfs::cpu_ticks(pid).saturating_sub(before) as f64;
    println!(
        "idle_cpu_ms_per_s {:.1}",
        ticks / clk_tck * 1e3 / start.elapsed().as_secs_f64()
    );
}

/// RSS per idle tunnel: open `n` tunnels (64 at a time), let them settle, read VmRSS.
async fn rss(t: &std::sync::Arc<Target>, n: usize, pid: u32) {
    let before = procfs::rss_kib(pid);
    let workers = 64.min(n.max(1));
    let mut handles = Vec::new();
    for w in 0..workers {
        let t = t.clone();
        let share = n / workers + usize::from(w < n % workers);
        handles.push(tokio::spawn(async move {
            let mut held = Vec::with_capacity(share);
            let mut errors = 0usize;
            for _ in 0..share {
                match open(&t).await {
                    Ok(s) => held.push(s),
                    Err(_) => errors += 1,
                }
            }
            (held, errors)
        }));
    }
    let mut held = Vec::new();
    let mut errors = 0;
    for h in handles {
        if let Ok((h, e)) = h.await {
            held.extend(h);
            errors += e;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = procfs::rss_kib(pid);
    let open_now = held.len();
    println!("idle_tunnels {open_now}");
    println!("idle_errors {errors}");
    if open_now > 0 {
        println!(
            "rss_kib_per_tunnel {:.2}",
            after.saturating_sub(before) as f64 / open_now as f64
        );
    }
    drop(held);
    // Let the proxy tear the tunnels down before the next test measures anything.
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// Bytes from the backend's source through `streams` tunnels for `window`, in Gbit/s.
async fn bulk(t: &std::sync::Arc<Target>, streams: usize, window: Duration) {
    let mut handles = Vec::new();
    for _ in 0..streams {
        let t = t.clone();
        handles.push(tokio::spawn(tokio::time::timeout(
            window + Duration::from_secs(15),
            async move {
                let mut s = open(&t).await?;
                s.write_all(b"S").await?;
                let mut buf = vec![0u8; 256 * 1024];
                let start = Instant::now();
                let end = start + window;
                let mut bytes = 0u64;
                while Instant::now() < end {
                    let n = s.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    bytes += n as u64;
                }
                Ok::<f64, io::Error>(bytes as f64 / start.elapsed().as_secs_f64())
            },
        )));
    }
    let mut rate = 0.0;
    let mut errors = 0;
    for h in handles {
        match h.await {
            Ok(Ok(Ok(r))) => rate += r,
            _ => errors += 1,
        }
    }
    println!("bulk{streams}_gbit_per_s {:.3}", rate * 8.0 / 1e9);
    println!("bulk{streams}_errors {errors}");
}

/// New tunnels per second with `concurrency` in flight, and the proxy's CPU per tunnel.
async fn conns(
    t: &std::sync::Arc<Target>,
    concurrency: usize,
    window: Duration,
    pid: u32,
    clk_tck: f64,
) {
    let cpu_before = (pid != 0).then(|| procfs::cpu_ticks(pid));
    let start = Instant::now();
    let end = start + window;
    let mut handles = Vec::new();
    for _ in 0..concurrency {
        let t = t.clone();
        handles.push(tokio::spawn(async move {
            let (mut ok, mut errors) = (0u64, 0u64);
            while Instant::now() < end {
                match open(&t).await {
                    Ok(s) => {
                        drop(s);
                        ok += 1;
                    }
                    Err(_) => {
                        errors += 1;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
            (ok, errors)
        }));
    }
    let (mut ok, mut errors) = (0u64, 0u64);
    for h in handles {
        if let Ok((o, e)) = h.await {
            ok += o;
            errors += e;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    // The proxy finishes closing the last tunnels after the client has dropped them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    println!("conns_per_s {:.0}", ok as f64 / elapsed);
    println!("conns_errors {errors}");
    if let Some(before) = cpu_before
        && ok > 0
    {
        let ticks = procfs::cpu_ticks(pid).saturating_sub(before) as f64;
        println!("cpu_us_per_conn {:.1}", ticks / clk_tck * 1e6 / ok as f64);
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

/// Round trips of 64 bytes over one established tunnel (echo backend), for `window`.
async fn ping(t: &std::sync::Arc<Target>, window: Duration) {
    let result = tokio::time::timeout(window + Duration::from_secs(15), async {
        let mut s = open(t).await?;
        s.write_all(b"E").await?;
        let msg = [0x61u8; PING_LEN];
        let mut back = [0u8; PING_LEN];
        let mut samples = Vec::with_capacity(200_000);
        let start = Instant::now();
        let mut i = 0u32;
        while start.elapsed() < window && samples.len() < 1_000_000 {
            let t0 = Instant::now();
            s.write_all(&msg).await?;
            s.read_exact(&mut back).await?;
            i += 1;
            if i > 200 {
                samples.push(t0.elapsed().as_nanos() as u64); // first 200: warm-up
            }
        }
        Ok::<_, io::Error>(samples)
    })
    .await
    .unwrap_or_else(|_| Err(io::Error::other("ping timed out")));
    match result {
        Ok(mut samples) => {
            samples.sort_unstable();
            println!("ping_p50_us {:.1}", percentile(&samples, 0.50));
            println!("ping_p99_us {:.1}", percentile(&samples, 0.99));
            println!("ping_samples {}", samples.len());
        }
        Err(e) => println!("ping_error {}", e.to_string().replace(' ', "_")),
    }
}

/// One new tunnel at a time (connect, CONNECT if any, hello, answer), for `window` or
/// 5,000 tunnels, whichever ends first.
async fn newconn(t: &std::sync::Arc<Target>, window: Duration) {
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut errors = 0u64;
    while start.elapsed() < window && samples.len() < 5000 {
        let t0 = Instant::now();
        match open(t).await {
            Ok(s) => {
                samples.push(t0.elapsed().as_nanos() as u64);
                drop(s);
            }
            Err(_) => errors += 1,
        }
    }
    samples.sort_unstable();
    println!("newconn_p50_us {:.1}", percentile(&samples, 0.50));
    println!("newconn_p99_us {:.1}", percentile(&samples, 0.99));
    println!("newconn_samples {}", samples.len());
    println!("newconn_errors {errors}");
}
