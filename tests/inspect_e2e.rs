//! Inspect mode end to end through the explicit proxy: real curl and a rustls client as the
//! agent, a hyper TLS upstream (HTTP/1.1 and HTTP/2) that records every request it
//! receives, so each verdict is judged by what reached the upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis::policy::DomainName;
use portcullis::proxy::inspect::ca;
use portcullis::proxy::upstream::StaticResolver;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the upstream received: `VERSION METHOD path?query`, one per request.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<String>>>);

impl Received {
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn upstream_handle(req: Request<Incoming>, seen: Received) -> Response<UpBody> {
    let line = format!(
        "{:?} {} {}",
        req.version(),
        req.method(),
        req.uri().path_and_query().map_or("", |p| p.as_str())
    );
    seen.0.lock().unwrap().push(line.clone());
    let path = req.uri().path().to_owned();
    if path == "/ws" && req.headers().contains_key(http::header::UPGRADE) {
        let mut req = req;
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Full::new(Bytes::new()).boxed())
            .unwrap();
    }
    if path == "/events" {
        // One event now, the next after 3 s: the first must reach the agent at once.
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(events().boxed())
            .unwrap();
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    Response::builder()
        .header("x-upstream", "yes")
        .body(Full::new(Bytes::from(format!("upstream saw {line} body {body}"))).boxed())
        .unwrap()
}

/// A body fed by a channel: each frame goes out when it is sent.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn events() -> ChannelBody {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(async move {
        let _ = tx.send(Bytes::from("data: first\n\n")).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let _ = tx.send(Bytes::from("data: second\n\n")).await;
    });
    ChannelBody(rx)
}

/// A hyper TLS upstream (ALPN h2 and http/1.1) serving `pki`'s certificate.
async fn upstream(server: Arc<rustls::ServerConfig>) -> (SocketAddr, Received) {
    let mut config = (*server).clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Received::default();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let s = s.clone();
            // As real servers do: small writes go out at once.
            sock.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(sock).await else {
                    return;
                };
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                let svc = hyper::service::service_fn(move |req| {
                    let s = s.clone();
                    async move { Ok::<_, Infallible>(upstream_handle(req, s).await) }
                });
                let io = TokioIo::new(tls);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .with_upgrades()
                        .await;
                }
            });
        }
    });
    (addr, seen)
}

struct Setup {
    gw: TestGateway,
    port: u16,
    bad_port: u16,
    plain_port: u16,
    seen: Received,
    bad_seen: Received,
    inspect_ca: PathBuf,
    upstream_ca: PathBuf,
}

async fn setup() -> Setup {
    setup_with(Duration::from_secs(300)).await
}

async fn setup_with(idle: Duration) -> Setup {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = pki(
        pki_dir.path(),
        &["api.github.test", "bad.test", "plain.test"],
    );
    let upstream_ca = pki_dir.path().join("ca.pem");
    let (addr, seen) = upstream(pki.server.clone()).await;
    let (bad_addr, bad_seen) = upstream(pki.server.clone()).await;
    let plain = tls_upstream(pki.server.clone(), "passthrough body").await;
    let (port, bad_port, plain_port) = (addr.port(), bad_addr.port(), plain.addr.port());
    let agent = format!(
        "name = \"coder\"\nsources = [\"127.0.0.0/8\"]\nresolve_cidrs = [\"127.0.0.0/8\"]\n\
         allow = [\"api.github.test:{port}\", \"bad.test:{bad_port}\", \"plain.test:{plain_port}\"]\n\
         inspect = [\"api.github.test:{port}\", \"bad.test:{bad_port}\"]\n\
         [[http]]\nhost = \"api.github.test\"\nmethods = [\"GET\", \"HEAD\", \"POST\"]\n\
         paths = [\"/repos/acme/*\", \"/user\", \"/ws\", \"/events\"]\n\
         [[http]]\nhost = \"api.github.test\"\nmethods = [\"POST\"]\npaths = [\"/repos/acme/locked/*\"]\naction = \"deny\"\n"
    );
    let lo = "127.0.0.1".parse().unwrap();
    let resolver = StaticResolver::new()
        .with("api.github.test", &[lo])
        .with("bad.test", &[lo])
        .with("plain.test", &[lo]);
    let ca_for_host = upstream_ca.clone();
    let gw = gateway_with(&[("coder", &agent)], &[], resolver, move |c, dir| {
        let names = ["api.github.test", "bad.test"].map(|n| DomainName::parse(n).unwrap());
        ca::init(
            &dir.join("state/ca"),
            names,
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
        // The upstream's own CA for api.github.test; bad.test is checked against the OS
        // store, which does not know the test CA.
        c.inspect.upstream_ca_files = vec![("api.github.test".into(), ca_for_host)];
        c.timeouts.idle = idle;
    })
    .await;
    let inspect_ca = gw.dir.path().join("state/ca/ca.pem");
    // The PKI dir must outlive the gateway's config: keep it with the gateway's dir.
    std::mem::forget(pki_dir);
    Setup {
        gw,
        port,
        bad_port,
        plain_port,
        seen,
        bad_seen,
        inspect_ca,
        upstream_ca,
    }
}

fn url(port: u16, path: &str) -> String {
    format!("https://api.github.test:{port}{path}")
}

async fn curl_via(s: &Setup, extra: &[&str]) -> CurlOutput {
    let proxy = format!("http://{}", s.gw.proxy);
    let mut args = vec![
        "--proxy",
        proxy.as_str(),
        "--path-as-is",
        "-w",
        "\n%{http_code}",
    ];
    // HTTP/1.1 unless the test asks for HTTP/2 (curl offers h2 by default).
    if !extra.contains(&"--http2") {
        args.push("--http1.1");
    }
    args.extend_from_slice(extra);
    curl(&args).await
}

/// Log lines of inspected requests, once `n` are there (bounded wait).
async fn inspected_lines(log: &Path, n: usize) -> Vec<serde_json::Value> {
    for _ in 0..50 {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["portcullis.inspected"] == true)
            .collect();
        if lines.len() >= n {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("fewer than {n} inspected log lines in {}", log.display());
}

#[tokio::test]
async fn get_passes_delete_is_refused_and_an_untrusting_client_fails() {
    let s = setup().await;
    let ca = s.inspect_ca.to_str().unwrap();
    let out = curl_via(&s, &["--cacert", ca, &url(s.port, "/repos/acme/x?page=2")]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout
            .starts_with("upstream saw HTTP/1.1 GET /repos/acme/x?page=2"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.ends_with("\n200"), "{}", out.stdout);

    let out = curl_via(
        &s,
        &[
            "--cacert",
            ca,
            "-X",
            "DELETE",
            &url(s.port, "/repos/acme/x"),
        ],
    )
    .await;
    assert!(out.stdout.ends_with("\n403"), "{}", out.stdout);
    assert!(
        out.stdout.contains("no [[http]] rule allows DELETE"),
        "{}",
        out.stdout
    );
    // Deny wins over the allow rule that also matches.
    let out = curl_via(
        &s,
        &[
            "--cacert",
            ca,
            "-X",
            "POST",
            "-d",
            "x",
            &url(s.port, "/repos/acme/locked/k"),
        ],
    )
    .await;
    assert!(out.stdout.ends_with("\n403"), "{}", out.stdout);
    assert!(
        out.stdout.contains("denied by agents/coder.toml:http[1]"),
        "{}",
        out.stdout
    );
    assert_eq!(s.seen.all(), ["HTTP/1.1 GET /repos/acme/x?page=2"]);

    // A client that trusts only the upstream's real CA: the gateway's leaf fails its
    // handshake, so nothing was passed through (a tunnel would have succeeded).
    let upstream_ca = s.upstream_ca.to_str().unwrap();
    let out = curl_via(
        &s,
        &["--cacert", upstream_ca, &url(s.port, "/repos/acme/x")],
    )
    .await;
    assert_eq!(out.code, 60, "{} {}", out.stdout, out.stderr);
    // And one that trusts nothing extra.
    let out = curl_via(&s, &[&url(s.port, "/repos/acme/x")]).await;
    assert_eq!(out.code, 60, "{} {}", out.stdout, out.stderr);
    assert_eq!(s.seen.all().len(), 1);

    let lines = inspected_lines(&s.gw.log_path, 3).await;
    let get = &lines[0];
    assert_eq!(get["http.request.method"], "GET");
    assert_eq!(get["url.path"], "/repos/acme/x");
    assert!(get.get("url.query").is_none(), "query logged: {get}");
    assert_eq!(get["http.response.status_code"], 200);
    assert_eq!(get["rule.name"], "agents/coder.toml:http[0]");
    assert!(get["destination.bytes"].as_u64().unwrap() > 0, "{get}");
    let delete = &lines[1];
    assert_eq!(delete["http.request.method"], "DELETE");
    assert_eq!(delete["http.response.status_code"], 403);
    assert_eq!(delete["event.reason"], "http_not_allowed");

    // A name that is allowed and not inspected is still a blind tunnel: the client sees the
    // upstream's own certificate.
    let out = curl_via(
        &s,
        &[
            "--cacert",
            upstream_ca,
            &format!("https://plain.test:{}/", s.plain_port),
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.starts_with("passthrough body"), "{}", out.stdout);
}

#[tokio::test]
async fn http2_to_the_agent_and_upstream() {
    let s = setup().await;
    let ca = s.inspect_ca.to_str().unwrap();
    let out = curl_via(
        &s,
        &["--http2", "--cacert", ca, "-v", &url(s.port, "/user")],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stderr.contains("ALPN: server accepted h2") || out.stderr.contains("Using HTTP2"),
        "{}",
        out.stderr
    );
    assert!(
        out.stdout.starts_with("upstream saw HTTP/2.0 GET /user"),
        "{}",
        out.stdout
    );
    let out = curl_via(
        &s,
        &[
            "--http2",
            "--cacert",
            ca,
            "-X",
            "DELETE",
            &url(s.port, "/user"),
        ],
    )
    .await;
    assert!(out.stdout.ends_with("\n403"), "{}", out.stdout);
    // A request body streams through.
    let out = curl_via(
        &s,
        &[
            "--http2",
            "--cacert",
            ca,
            "-X",
            "POST",
            "--data-binary",
            &"z".repeat(100_000),
            &url(s.port, "/repos/acme/upload"),
        ],
    )
    .await;
    assert!(
        out.stdout.contains("POST /repos/acme/upload body 100000"),
        "{}",
        out.stdout
    );
}

#[tokio::test]
async fn upstream_certificate_errors_are_502_and_logged() {
    let s = setup().await;
    let ca = s.inspect_ca.to_str().unwrap();
    let out = curl_via(
        &s,
        &["--cacert", ca, &format!("https://bad.test:{}/", s.bad_port)],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.ends_with("\n502"), "{}", out.stdout);
    assert!(s.bad_seen.all().is_empty());
    let lines = inspected_lines(&s.gw.log_path, 1).await;
    assert_eq!(lines[0]["event.reason"], "upstream_tls");
    assert_eq!(lines[0]["http.response.status_code"], 502);
}

/// Path-confusion requests against the rule `GET /repos/acme/*`, each judged by what the
/// upstream received (nothing, or the normal form).
#[tokio::test]
async fn path_confusion_corpus() {
    let s = setup().await;
    let ca = s.inspect_ca.to_str().unwrap();
    let cases: &[(&str, Option<&str>)] = &[
        ("/repos/acme/x", Some("/repos/acme/x")),
        ("/repos/acme/./x", Some("/repos/acme/x")),
        ("/repos/other/../acme/x", Some("/repos/acme/x")),
        ("/repos/%61cme/x", Some("/repos/acme/x")),
        ("/repos/acme/a%20b", Some("/repos/acme/a%20b")),
        ("/repos/acme/../other/x", None),
        ("/repos/acme/%2e%2e/other", None),
        ("/repos/acme/%2E%2e/other", None),
        ("/repos/acme/.%2e/other", None),
        ("/repos/acme/%252e%252e/other", None),
        ("/repos/acme%2fx", None),
        ("/repos/acme/..%2fother", None),
        ("/repos/acme/..%5cother", None),
        ("/repos//acme/x", None),
        ("/repos/acme;x=1/y", None),
        ("/repos/acme/..;/other", None),
        ("/REPOS/acme/x", None),
        ("/repos/acme/x%00", None),
        ("/repos/acme/%c0%ae%c0%ae/", None),
        ("/repos/acme", None),
    ];
    for (path, forwarded) in cases {
        let before = s.seen.all().len();
        let out = curl_via(&s, &["--cacert", ca, &url(s.port, path)]).await;
        let after = s.seen.all();
        match forwarded {
            Some(p) => {
                assert!(out.stdout.ends_with("\n200"), "{path}: {}", out.stdout);
                assert_eq!(
                    after.last().unwrap(),
                    &format!("HTTP/1.1 GET {p}"),
                    "{path}"
                );
            }
            None => {
                assert!(out.stdout.ends_with("\n403"), "{path}: {}", out.stdout);
                assert_eq!(
                    after.len(),
                    before,
                    "{path} reached the upstream: {after:?}"
                );
            }
        }
    }
}

async fn agent_tls(s: &Setup) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut tcp = tokio::net::TcpStream::connect(s.gw.proxy).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let connect = format!(
        "CONNECT api.github.test:{0} HTTP/1.1\r\nHost: api.github.test:{0}\r\n\r\n",
        s.port
    );
    tcp.write_all(connect.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(tcp.read(&mut b).await.unwrap(), 1);
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&s.inspect_ca).unwrap();
    for c in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("api.github.test".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test]
async fn websocket_upgrade_passes_and_echoes() {
    let s = setup().await;
    let mut tls = agent_tls(&s).await;
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: api.github.test:{}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        s.port
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(tls.read(&mut b).await.unwrap(), 1);
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for msg in [&b"ping one"[..], b"and two"] {
        tls.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, msg);
    }
    // The connection's record, written when the relay ends, counts the relayed bytes.
    drop(tls);
    let mut record = None;
    for _ in 0..50 {
        let text = std::fs::read_to_string(&s.gw.log_path).unwrap_or_default();
        record = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| {
                v["destination.domain"] == "api.github.test"
                    && v["tcp"].is_null()
                    && v.get("portcullis.mode").is_some()
            });
        if record.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let record = record.expect("no connection record");
    assert!(
        record["destination.bytes"].as_u64().unwrap() >= 15,
        "{record}"
    );
    assert!(record["source.bytes"].as_u64().unwrap() >= 15, "{record}");
}

#[tokio::test]
async fn server_sent_events_arrive_without_buffering() {
    let s = setup().await;
    let mut tls = agent_tls(&s).await;
    let req = format!(
        "GET /events HTTP/1.1\r\nHost: api.github.test:{}\r\n\r\n",
        s.port
    );
    let started = Instant::now();
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("data: first") {
        let n = tokio::time::timeout(Duration::from_secs(2), tls.read(&mut buf))
            .await
            .expect("first event held back")
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let first = started.elapsed();
    eprintln!("SSE first event after {first:?}");
    assert!(first < Duration::from_millis(1000), "{first:?}");
    assert!(!String::from_utf8_lossy(&got).contains("second"));
}

/// A hello naming another host than the CONNECT target is refused, with no leaf minted
/// for it and nothing forwarded.
#[tokio::test]
async fn a_hello_for_another_name_is_refused() {
    let s = setup().await;
    let mut tcp = tokio::net::TcpStream::connect(s.gw.proxy).await.unwrap();
    let connect = format!(
        "CONNECT api.github.test:{0} HTTP/1.1\r\nHost: api.github.test:{0}\r\n\r\n",
        s.port
    );
    tcp.write_all(connect.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(tcp.read(&mut b).await.unwrap(), 1);
        head.push(b[0]);
    }
    tcp.write_all(&client_hello("bad.test")).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), tcp.read_to_end(&mut rest)).await;
    // No ServerHello (handshake record type 22) came back.
    assert!(rest.first() != Some(&22), "{rest:?}");
    assert!(s.seen.all().is_empty());
}

/// The gateway does not start with a CA key others may read, nor when an agent inspects
/// and there is no CA.
#[tokio::test]
async fn start_refuses_a_readable_ca_key_and_a_missing_ca() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir_all(rules.join("agents")).unwrap();
    std::fs::write(
        rules.join("agents/coder.toml"),
        "name = \"coder\"\nallow = [\"api.github.test\"]\ninspect = [\"api.github.test\"]\n",
    )
    .unwrap();
    let config = || {
        let mut c = portcullis::config::Config::builtin();
        c.rules_dir = rules.clone();
        c.state_dir = dir.path().join("state");
        c.listen.explicit = Some("127.0.0.1:0".parse().unwrap());
        c.listen.admin = None;
        c.admin.control_socket = None;
        c.log.destination = portcullis::config::LogDestination::File(dir.path().join("log"));
        c
    };
    let start = |c: portcullis::config::Config| async move {
        let policy = portcullis::policy::Policy::load(&c.rules_dir, &[80, 443], 1).unwrap();
        portcullis::gateway::start(c, policy, Arc::new(StaticResolver::new())).await
    };
    let err = start(config()).await.err().expect("started without a CA");
    assert!(err.to_string().contains("portcullis ca init"), "{err}");
    let ca_dir = dir.path().join("state/ca");
    ca::init(
        &ca_dir,
        [DomainName::parse("api.github.test").unwrap()],
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    std::fs::set_permissions(
        ca_dir.join(ca::CA_KEY_FILE),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    let err = start(config())
        .await
        .err()
        .expect("started with a readable key");
    assert!(
        err.to_string().contains("readable by group or others"),
        "{err}"
    );
    std::fs::set_permissions(
        ca_dir.join(ca::CA_KEY_FILE),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let running = start(config()).await.expect("a private key starts");
    running.shutdown(Duration::from_millis(10)).await;
}

/// Send one HTTP/1.1 request on an open inspected connection; the status, or `None` when
/// the connection is gone.
async fn request_on(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    port: u16,
    method: &str,
    path: &str,
) -> Option<u16> {
    let req = format!("{method} {path} HTTP/1.1\r\nHost: api.github.test:{port}\r\n\r\n");
    tls.write_all(req.as_bytes()).await.ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // Head, then a Content-Length body.
    loop {
        let n = tokio::time::timeout(Duration::from_secs(3), tls.read(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            if got.len() >= end + 4 + len {
                return text.get(9..12).and_then(|s| s.parse().ok());
            }
        }
    }
}

/// The kill switch cuts a live inspected connection, and a reload's [[http]] rules apply to
/// the next request on an open one.
#[tokio::test]
async fn reloads_apply_to_open_connections_and_a_kill_cuts_them() {
    let s = setup().await;
    let mut tls = agent_tls(&s).await;
    assert_eq!(
        request_on(&mut tls, s.port, "GET", "/user").await,
        Some(200)
    );
    // Take /user out of the allow rule.
    let file = s.gw.dir.path().join("rules/agents/coder.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replace("\"/user\", ", "")).unwrap();
    let (code, body) = signed_reload(s.gw.admin).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        request_on(&mut tls, s.port, "GET", "/user").await,
        Some(403)
    );
    assert_eq!(
        request_on(&mut tls, s.port, "GET", "/repos/acme/x").await,
        Some(200)
    );

    let body = r#"{"scope":"agent","agent":"coder","reason":"test"}"#;
    let headers = signed_headers(ADMIN_WHSEC, "kill-inspect", now(), body);
    let (code, resp) =
        admin_request(s.gw.admin, "POST", "/v1/kill", &headers, body.as_bytes()).await;
    assert_eq!(code, 200, "{resp}");
    let cut = Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(2), tls.read(&mut buf))
        .await
        .expect("the inspected connection outlived the kill");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    eprintln!(
        "inspected connection closed {:?} after the kill",
        cut.elapsed()
    );
    let seen = s.seen.all();
    assert_eq!(
        seen.iter().filter(|l| l.contains("/user")).count(),
        1,
        "{seen:?}"
    );
}

/// Figures for the report, printed (debug build: indicative only): new inspected TLS
/// connections (CONNECT, leaf from the cache, handshake, one request) and keep-alive
/// requests on one connection. Bounds are loose sanity checks, not targets.
#[tokio::test]
async fn timings_of_new_connections_and_keep_alive_requests() {
    let s = setup().await;
    let mut new_conn = Vec::new();
    for _ in 0..30 {
        let t = Instant::now();
        let mut tls = agent_tls(&s).await;
        assert_eq!(
            request_on(&mut tls, s.port, "GET", "/user").await,
            Some(200)
        );
        new_conn.push(t.elapsed());
    }
    let mut tls = agent_tls(&s).await;
    let mut keep_alive = Vec::new();
    for _ in 0..300 {
        let t = Instant::now();
        assert_eq!(
            request_on(&mut tls, s.port, "GET", "/user").await,
            Some(200)
        );
        keep_alive.push(t.elapsed());
    }
    let pct = |v: &mut Vec<Duration>, p: usize| {
        v.sort();
        v[(v.len() * p / 100).min(v.len() - 1)]
    };
    let (n50, n99) = (pct(&mut new_conn, 50), pct(&mut new_conn, 99));
    let (k50, k99) = (pct(&mut keep_alive, 50), pct(&mut keep_alive, 99));
    eprintln!(
        "inspected: new connection + request p50 {n50:?} p99 {n99:?}; keep-alive request p50 {k50:?} p99 {k99:?}"
    );
    assert!(n50 < Duration::from_millis(500) && k50 < Duration::from_millis(100));
}

/// Python (stdlib `urllib`, CONNECT through `https_proxy`) trusting the CA through
/// `SSL_CERT_FILE`, as docs/inspect.md tells agents to.
#[tokio::test]
async fn python_trusts_the_ca_through_ssl_cert_file() {
    let s = setup().await;
    let script = "import sys, urllib.request\n\
        req = urllib.request.Request(sys.argv[1], method=sys.argv[2])\n\
        try:\n    r = urllib.request.urlopen(req, timeout=10); print(r.status, r.read().decode())\n\
        except urllib.error.HTTPError as e:\n    print(e.code, e.read().decode())\n";
    let run = |method: &'static str, path: &'static str| {
        let mut cmd = tokio::process::Command::new("python3");
        cmd.args(["-c", script, &url(s.port, path), method])
            .env("https_proxy", format!("http://{}", s.gw.proxy))
            .env("SSL_CERT_FILE", &s.inspect_ca)
            .env_remove("HTTPS_PROXY")
            .env_remove("no_proxy")
            .env_remove("NO_PROXY");
        async move {
            let out = tokio::time::timeout(Duration::from_secs(20), cmd.output())
                .await
                .unwrap()
                .unwrap();
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        }
    };
    let got = run("GET", "/repos/acme/x").await;
    assert!(
        got.starts_with("200 upstream saw HTTP/1.1 GET /repos/acme/x"),
        "{got}"
    );
    let got = run("DELETE", "/repos/acme/x").await;
    assert!(got.starts_with("403 portcullis: refused"), "{got}");
    assert_eq!(s.seen.all(), ["HTTP/1.1 GET /repos/acme/x"]);
}

/// git through the proxy with `http.sslCAInfo`: its TLS handshake succeeds and its smart-HTTP
/// discovery request arrives in normal form (the test upstream is no git server, so the
/// command itself then fails); a repository outside the rule never reaches the upstream.
#[tokio::test]
async fn git_trusts_the_ca_through_http_sslcainfo() {
    let s = setup().await;
    for repo in ["/repos/acme/tool.git", "/repos/other/tool.git"] {
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::process::Command::new("git")
                .args(["-c", &format!("http.proxy=http://{}", s.gw.proxy)])
                .args(["-c", &format!("http.sslCAInfo={}", s.inspect_ca.display())])
                .args(["ls-remote", &url(s.port, repo)])
                .current_dir(s.gw.dir.path())
                .env("GIT_TERMINAL_PROMPT", "0")
                // The environment's own CA setting would win over http.sslCAInfo.
                .env_remove("GIT_SSL_CAINFO")
                .env_remove("GIT_SSL_CAPATH")
                .output(),
        )
        .await
        .unwrap()
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("SSL") && !stderr.contains("certificate"),
            "{stderr}"
        );
    }
    let seen = s.seen.all();
    assert!(
        seen.iter()
            .any(|l| l.ends_with(" GET /repos/acme/tool.git/info/refs?service=git-upload-pack")),
        "{seen:?}"
    );
    assert!(!seen.iter().any(|l| l.contains("/repos/other")), "{seen:?}");
}

/// A request on an inspected connection for another host gets 421 and goes nowhere.
#[tokio::test]
async fn a_request_for_another_host_is_misdirected() {
    let s = setup().await;
    let mut tls = agent_tls(&s).await;
    let req = "GET /repos/acme/x HTTP/1.1\r\nHost: bad.test\r\n\r\n";
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(3), tls.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 421"), "{head}");
    assert!(s.seen.all().is_empty() && s.bad_seen.all().is_empty());
}

/// An inspected connection that moves no byte for `idle_secs` is closed, like a tunnel; one
/// that never completes its handshake is closed after the handshake timeout.
#[tokio::test]
async fn idle_and_silent_connections_are_closed() {
    let s = setup_with(Duration::from_secs(1)).await;
    let mut tls = agent_tls(&s).await;
    assert_eq!(
        request_on(&mut tls, s.port, "GET", "/user").await,
        Some(200)
    );
    let t = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
        .await
        .expect("idle inspected connection still open after 5 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t.elapsed()
    );

    // CONNECT, then silence: the handshake timeout (2 s in test gateways) ends it.
    let mut tcp = tokio::net::TcpStream::connect(s.gw.proxy).await.unwrap();
    let connect = format!(
        "CONNECT api.github.test:{0} HTTP/1.1\r\nHost: api.github.test:{0}\r\n\r\n",
        s.port
    );
    tcp.write_all(connect.as_bytes()).await.unwrap();
    let mut rest = Vec::new();
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(6), tcp.read_to_end(&mut rest))
        .await
        .expect("silent inspected connection still open after 6 s")
        .unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
}
