//! Test harness shared by the integration tests: upstream servers that record what they
//! receive (so "no byte reached the upstream" is proven from the upstream's side), a test
//! CA, an in-process gateway on port 0, and real `curl`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod netns;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis::config::{Config, LogDestination};
use portcullis::gateway::{self, Running};
use portcullis::policy::Policy;
use portcullis::proxy::upstream::{Resolve, StaticResolver};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What an upstream saw: one entry per accepted TCP connection, with every byte received.
#[derive(Clone, Default)]
pub struct Seen(Arc<Mutex<Vec<Vec<u8>>>>);

impl Seen {
    pub fn connections(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    pub fn connection(&self, i: usize) -> Vec<u8> {
        self.0.lock().unwrap()[i].clone()
    }
    pub fn all_bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().concat()
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.all_bytes()).into_owned()
    }
    fn open(&self) -> usize {
        let mut v = self.0.lock().unwrap();
        v.push(Vec::new());
        v.len() - 1
    }
    fn push(&self, i: usize, data: &[u8]) {
        self.0.lock().unwrap()[i].extend_from_slice(data);
    }
}

pub struct TestUpstream {
    pub addr: SocketAddr,
    pub seen: Seen,
}

/// A plain HTTP/1.1 server: reads one request head, answers `body` and closes.
pub async fn http_upstream(body: &'static str) -> TestUpstream {
    http_upstream_on("127.0.0.1:0".parse().unwrap(), body).await
}

pub async fn http_upstream_on(addr: SocketAddr, body: &'static str) -> TestUpstream {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let s = s.clone();
            tokio::spawn(async move {
                let i = s.open();
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => {
                            s.push(i, &buf[..n]);
                            head.extend_from_slice(&buf[..n]);
                        }
                        _ => return,
                    }
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    TestUpstream { addr, seen }
}

/// A TCP server that records raw bytes and never answers (for "nothing reached it").
pub async fn silent_upstream() -> TestUpstream {
    silent_upstream_on("127.0.0.1:0".parse().unwrap()).await
}

pub async fn silent_upstream_on(addr: SocketAddr) -> TestUpstream {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let s = s.clone();
            tokio::spawn(async move {
                let i = s.open();
                let mut buf = [0u8; 4096];
                while let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_secs(10), sock.read(&mut buf)).await
                {
                    if n == 0 {
                        return;
                    }
                    s.push(i, &buf[..n]);
                }
            });
        }
    });
    TestUpstream { addr, seen }
}

/// A test CA and a server certificate for `names`, signed by it.
pub struct TestPki {
    pub ca_pem: PathBuf,
    pub server: Arc<rustls::ServerConfig>,
}

pub fn pki(dir: &Path, names: &[&str]) -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "portcullis test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let ca_pem = dir.join("ca.pem");
    std::fs::write(&ca_pem, ca_cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![leaf.der().clone(), ca_cert.der().clone()], key)
    .unwrap();
    TestPki {
        ca_pem,
        server: Arc::new(server),
    }
}

/// A TLS server: records raw TCP bytes per connection, reads one request, answers `body`.
pub async fn tls_upstream(config: Arc<rustls::ServerConfig>, body: &'static str) -> TestUpstream {
    tls_upstream_on("127.0.0.1:0".parse().unwrap(), config, body).await
}

pub async fn tls_upstream_on(
    addr: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    body: &'static str,
) -> TestUpstream {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let s = seen.clone();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let s = s.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let i = s.open();
                let recorder = Recorder {
                    inner: sock,
                    seen: s,
                    index: i,
                };
                let Ok(Ok(mut tls)) =
                    tokio::time::timeout(Duration::from_secs(5), acceptor.accept(recorder)).await
                else {
                    return;
                };
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
                // Keep reading to EOF so every byte the client sent is recorded.
                while let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await
                {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    TestUpstream { addr, seen }
}

/// Records every raw byte read from the socket.
struct Recorder {
    inner: tokio::net::TcpStream,
    seen: Seen,
    index: usize,
}

impl tokio::io::AsyncRead for Recorder {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let new = buf.filled()[before..].to_vec();
        if !new.is_empty() {
            self.seen.push(self.index, &new);
        }
        r
    }
}

impl tokio::io::AsyncWrite for Recorder {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A running gateway with its rules in a temp dir and its log in a file.
pub struct TestGateway {
    pub running: Option<Running>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub log_path: PathBuf,
    pub dir: tempfile::TempDir,
}

/// Start a gateway with the given agent files and lists (file stem, contents).
pub async fn gateway(
    agents: &[(&str, &str)],
    lists: &[(&str, &str)],
    resolver: impl Resolve,
) -> TestGateway {
    gateway_with(agents, lists, resolver, |_, _| {}).await
}

/// Like [`gateway`], with a chance to adjust the config (given the gateway's directory).
/// [`gateway_with`], with the transparent listener's original-destination lookup injected
/// (transparent mode without root).
pub async fn gateway_with_lookup(
    agents: &[(&str, &str)],
    lists: &[(&str, &str)],
    resolver: impl Resolve,
    tweak: impl FnOnce(&mut Config, &Path),
    lookup: portcullis::proxy::OriginalDestination,
) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let (running, log_path) =
        start_in_with(dir.path(), agents, lists, resolver, tweak, Some(lookup)).await;
    TestGateway {
        proxy: running.explicit_addr.unwrap(),
        admin: running.admin_addr.unwrap(),
        running: Some(running),
        log_path,
        dir,
    }
}

pub async fn gateway_with(
    agents: &[(&str, &str)],
    lists: &[(&str, &str)],
    resolver: impl Resolve,
    tweak: impl FnOnce(&mut Config, &Path),
) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    let (running, log_path) = start_in(dir.path(), agents, lists, resolver, tweak).await;
    TestGateway {
        proxy: running.explicit_addr.unwrap(),
        admin: running.admin_addr.unwrap(),
        running: Some(running),
        log_path,
        dir,
    }
}

/// Write the rules into `dir` and start a gateway there (ports 0, log in `dir`).
pub async fn start_in(
    dir: &Path,
    agents: &[(&str, &str)],
    lists: &[(&str, &str)],
    resolver: impl Resolve,
    tweak: impl FnOnce(&mut Config, &Path),
) -> (Running, PathBuf) {
    start_in_with(dir, agents, lists, resolver, tweak, None).await
}

/// [`start_in`], with the transparent listener's original-destination lookup injected.
pub async fn start_in_with(
    dir: &Path,
    agents: &[(&str, &str)],
    lists: &[(&str, &str)],
    resolver: impl Resolve,
    tweak: impl FnOnce(&mut Config, &Path),
    lookup: Option<portcullis::proxy::OriginalDestination>,
) -> (Running, PathBuf) {
    let rules = dir.join("rules");
    std::fs::create_dir_all(rules.join("agents")).unwrap();
    std::fs::create_dir_all(rules.join("lists")).unwrap();
    for (name, text) in agents {
        std::fs::write(rules.join("agents").join(format!("{name}.toml")), text).unwrap();
    }
    for (name, text) in lists {
        std::fs::write(rules.join("lists").join(format!("{name}.toml")), text).unwrap();
    }
    let log_path = dir.join("connections.log");
    let mut config = Config::builtin();
    config.rules_dir = rules.clone();
    config.state_dir = dir.join("state");
    config.listen.explicit = Some("127.0.0.1:0".parse().unwrap());
    config.listen.admin = Some("127.0.0.1:0".parse().unwrap());
    config.log.destination = LogDestination::File(log_path.clone());
    config.timeouts.handshake = Duration::from_secs(2);
    // Every test gateway has an admin key, so signed admin calls (reload) work.
    std::fs::write(dir.join("admin.secret"), format!("{ADMIN_WHSEC}\n")).unwrap();
    config.kill_switch.webhook_secret_files = vec![dir.join("admin.secret")];
    tweak(&mut config, dir);
    let policy = Policy::load(&rules, &config.default_ports, 1).unwrap();
    let running = match lookup {
        Some(lookup) => gateway::start_with(config, policy, Arc::new(resolver), lookup).await,
        None => gateway::start(config, policy, Arc::new(resolver)).await,
    }
    .unwrap();
    (running, log_path)
}

/// The bytes of a real rustls ClientHello for `sni`, as one TLS record.
pub fn client_hello(sni: &str) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// Open a CONNECT tunnel and send a ClientHello for `host` through it; returns the socket
/// after the proxy's 200, or the proxy's refusal as an error.
pub async fn open_tunnel(
    proxy: SocketAddr,
    host: &str,
    port: u16,
) -> Result<tokio::net::TcpStream, String> {
    let mut s = connect_only(proxy, host, port).await?;
    s.write_all(&client_hello(host))
        .await
        .map_err(|e| e.to_string())?;
    Ok(s)
}

/// A CONNECT answered 200, nothing sent into the tunnel yet; else the answer's head.
pub async fn connect_only(
    proxy: SocketAddr,
    host: &str,
    port: u16,
) -> Result<tokio::net::TcpStream, String> {
    let mut s = tokio::net::TcpStream::connect(proxy)
        .await
        .map_err(|e| e.to_string())?;
    let req = format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => {
                return Err(format!(
                    "no response head: {:?}",
                    String::from_utf8_lossy(&head)
                ));
            }
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head);
    }
    Ok(s)
}

/// The webhook key every test gateway starts with (tests may configure others).
pub const ADMIN_WHSEC: &str = "whsec_dGVzdC1hZG1pbi1rZXktZm9yLXNpZ25lZC1jYWxscw==";

/// Standard Webhooks headers for `body`, signed with `secret` at `ts`, under `id`.
pub fn signed_headers(secret: &str, id: &str, ts: i64, body: &str) -> Vec<(String, String)> {
    let s = portcullis::killswitch::webhook::Secret::parse(secret).unwrap();
    vec![
        ("webhook-id".into(), id.into()),
        ("webhook-timestamp".into(), ts.to_string()),
        (
            "webhook-signature".into(),
            portcullis::killswitch::webhook::sign(&s, id, ts, body.as_bytes()),
        ),
    ]
}

/// The Standard Webhooks reference secret, and a TOTP secret (base32): the kill-switch tests'
/// keys, installed by [`with_kill_switch_secrets`].
pub const KILL_SWITCH_WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
pub const KILL_SWITCH_TOTP: &str = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP";

/// A config tweak: [`KILL_SWITCH_WHSEC`] as the webhook key (`webhook.secret`) and
/// [`KILL_SWITCH_TOTP`] as the revive secret, written into the gateway's directory.
pub fn with_kill_switch_secrets(c: &mut Config, dir: &Path) {
    std::fs::write(dir.join("webhook.secret"), format!("{KILL_SWITCH_WHSEC}\n")).unwrap();
    std::fs::write(dir.join("totp.secret"), format!("{KILL_SWITCH_TOTP}\n")).unwrap();
    c.kill_switch.webhook_secret_files = vec![dir.join("webhook.secret")];
    c.kill_switch.totp_secret_file = Some(dir.join("totp.secret"));
}

/// The clock in unix seconds, as webhook timestamps carry it.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `POST /v1/reload`, signed with [`ADMIN_WHSEC`].
pub async fn signed_reload(admin: SocketAddr) -> (u16, String) {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = now();
    let id = format!(
        "reload_{}_{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let headers = signed_headers(ADMIN_WHSEC, &id, now, "{}");
    admin_request(admin, "POST", "/v1/reload", &headers, b"{}").await
}

/// A POST or GET to the admin API; returns status and body.
pub async fn admin_request(
    admin: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

impl TestGateway {
    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.proxy)
    }

    /// Wait (bounded, 5 s) until the log holds at least `n` connection records, then return
    /// them all.
    pub async fn log_lines(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
            // Connection records only: the control plane's lines (kills, refused admin
            // requests) share the log but are not what these counts are about.
            let lines: Vec<serde_json::Value> = whole_lines(&text)
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("log line is JSON"))
                .filter(|l| l["event.category"] != "kill_switch")
                .collect();
            if lines.len() >= n || tokio::time::Instant::now() >= deadline {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown(Duration::from_secs(1)).await;
        }
    }
}

/// `text` up to its last newline: a line still being written (a reader can catch a write
/// halfway) is not a line yet.
pub fn whole_lines(text: &str) -> &str {
    text.get(..text.rfind('\n').map_or(0, |i| i + 1))
        .unwrap_or_default()
}

pub fn localhost_resolver(names: &[&str]) -> StaticResolver {
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    names
        .iter()
        .fold(StaticResolver::new(), |r, n| r.with(n, &[lo]))
}

pub struct CurlOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Run real curl (bounded by --max-time).
pub async fn curl(args: &[&str]) -> CurlOutput {
    let out = tokio::process::Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--max-time",
            "10",
            "--noproxy",
            "",
        ])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .output()
        .await
        .expect("curl is installed (tests/run.sh installs it)");
    CurlOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Send raw bytes to the proxy and read the reply until close or `wait`.
pub async fn raw_exchange(proxy: SocketAddr, request: &[u8], wait: Duration) -> String {
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}
