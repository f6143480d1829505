//! The per-connection hot pieces besides the policy decision (see benches/policy.rs):
//! ClientHello parsing (SNI detection), HTTP head parsing (Host detection), recording one
//! connection's metrics (issue target: < 1 µs), formatting its JSON log line (the log
//! writer thread's work per connection), taking and giving back a connection slot (caps by
//! agent, then by source), and proxy Basic auth: the cache-hit check a connection with
//! already verified credentials pays, and one argon2id verification at the recommended
//! cost (what a cache miss costs a blocking thread).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use portcullis::config::AuthSettings;
use portcullis::policy::rules::{RulesSources, SourceFile};
use portcullis::policy::{PasswordCheck, Reason, compile};
use portcullis::proxy::auth::{Authenticator, Session};
use portcullis::proxy::http_head::parse_request_head;
use portcullis::proxy::sni::parse_client_hello;
use portcullis::proxy::{CapLimits, ConnectionCaps};
use portcullis::telemetry::{ConnectionRecord, Metrics, Mode};

/// A real rustls ClientHello (TLS 1.3 + 1.2, ALPN h2/http1.1, X25519 key share).
fn rustls_hello(sni: &str) -> Vec<u8> {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map(|b| {
        b.with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth()
    });
    let Ok(config) = config.as_mut() else {
        return Vec::new();
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let (Ok(name), config) = (
        rustls::pki_types::ServerName::try_from(sni.to_owned()),
        Arc::new(config.clone()),
    ) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Ok(mut conn) = rustls::ClientConnection::new(config, name) {
        let _ = conn.write_tls(&mut out);
    }
    out
}

/// The hello re-framed as `n` TLS records (docs/threat-model.md, "Protocol confusion").
fn split_records(hello: &[u8], n: usize) -> Vec<u8> {
    let payload = hello.get(5..).unwrap_or_default();
    let size = payload.len().div_ceil(n).max(1);
    let mut out = Vec::new();
    for chunk in payload.chunks(size) {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

fn bench(c: &mut Criterion) {
    let hello = rustls_hello("registry.npmjs.org");
    assert!(!hello.is_empty(), "no hello captured");
    let split = split_records(&hello, 50);
    let mut g = c.benchmark_group("sni");
    g.bench_function("rustls_hello", |b| {
        b.iter(|| black_box(parse_client_hello(black_box(&hello))))
    });
    g.bench_function("rustls_hello_50_records", |b| {
        b.iter(|| black_box(parse_client_hello(black_box(&split))))
    });
    g.finish();

    let head = b"GET /simple/requests/ HTTP/1.1\r\nHost: pypi.org\r\nUser-Agent: pip/24.0\r\nAccept: */*\r\nAccept-Encoding: gzip\r\nConnection: keep-alive\r\n\r\n";
    c.bench_function("http_head/pip_request", |b| {
        b.iter(|| black_box(parse_request_head(black_box(head))))
    });

    let metrics = Metrics::new();
    let mut rec = ConnectionRecord::begin(
        Mode::Transparent,
        ([10, 66, 0, 11], 40000).into(),
        Arc::from("coder-1"),
        1,
    );
    rec.bytes_from_agent = 1200;
    rec.bytes_to_agent = 48_000;
    metrics.observe(&rec);
    let mut denied = rec.clone();
    denied.reason = Some(Reason::NotAllowed);
    let mut g = c.benchmark_group("metrics_record_one_connection");
    g.bench_function("allowed", |b| b.iter(|| metrics.observe(black_box(&rec))));
    g.bench_function("denied", |b| b.iter(|| metrics.observe(black_box(&denied))));
    g.finish();

    // One connection's slot at accept: by agent (then source), or in the unknown bucket.
    let caps = ConnectionCaps::new(CapLimits {
        total: 16_384,
        per_source: 1_024,
        per_agent: 4_096,
        unknown: 512,
    });
    let agent: Arc<str> = Arc::from("coder-1");
    let source: std::net::IpAddr = [10, 66, 0, 11].into();
    let held: Vec<_> = (0..100)
        .filter_map(|i| caps.try_acquire(Some(&agent), [10, 66, 1, i].into()))
        .collect();
    let mut g = c.benchmark_group("caps_acquire_release");
    g.bench_function("agent", |b| {
        b.iter(|| drop(black_box(caps.try_acquire(Some(&agent), source))))
    });
    g.bench_function("unknown", |b| {
        b.iter(|| drop(black_box(caps.try_acquire(None, source))))
    });
    g.finish();
    drop(held);

    // A transparent SNI tunnel's line, as the load benchmark writes ~640 bytes of it.
    let mut line_rec = rec.clone();
    line_rec.destination_domain = Some("registry.npmjs.org".into());
    line_rec.server_name = Some("registry.npmjs.org".into());
    line_rec.destination_ip = Some([104, 16, 1, 35].into());
    line_rec.destination_port = Some(443);
    line_rec.original_destination = Some(([104, 16, 1, 35], 443).into());
    line_rec.rule = Some(Arc::from("agents/coder-1.toml:allow:registry.npmjs.org"));
    let mut line = Vec::with_capacity(1024);
    c.bench_function("log_line/transparent_tunnel", |b| {
        b.iter(|| {
            line.clear();
            black_box(&line_rec).write_json(&mut line);
            black_box(line.len())
        })
    });
}

/// An argon2id PHC string for `password` at cost m KiB, t passes.
fn phc(password: &str, m: u32, t: u32) -> String {
    use argon2::{Argon2, Params};
    use password_hash::CustomizedPasswordHasher;
    let Ok(params) = Params::new(m, t, 1, None) else {
        return String::new();
    };
    Argon2::default()
        .hash_password_with_params(password.as_bytes(), b"bench-salt-16byt", params)
        .map(|h| h.to_string())
        .unwrap_or_default()
}

fn bench_auth(c: &mut Criterion) {
    // 100 agents; one hash made (each costs what a verification does), shared by all.
    let hash = phc("password-42", 19 * 1024, 2);
    let mut sources = RulesSources::default();
    for i in 0..100 {
        sources.agents.push(SourceFile {
            path: format!("rules/agents/agent-{i}.toml").into(),
            text: format!(
                "name = \"agent-{i}\"\n[credentials]\nusername = \"agent-{i}\"\npassword_hash = \"{hash}\"\n"
            ),
        });
    }
    let policy = match compile(&sources, &[443], 1) {
        Ok(p) => p,
        Err(e) => panic!("bench policy invalid: {e}"),
    };
    let auth = Authenticator::new(AuthSettings::default());
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else {
        panic!("no runtime");
    };
    let source: std::net::IpAddr = [10, 66, 0, 11].into();
    let (user, password) = ("agent-42", "password-42");
    // The one verification that fills the cache.
    let first =
        rt.block_on(auth.authenticate(&policy, source, user, password, &Session::default()));
    assert!(first.is_ok(), "bench credentials refused: {first:?}");

    let mut g = c.benchmark_group("proxy_auth");
    g.bench_function("cache_hit_key_and_lookup", |b| {
        b.iter(|| {
            let key = auth.credential_key(black_box(user), black_box(password));
            black_box(auth.cached(&policy, user, &key, std::time::Instant::now()))
        })
    });
    // What a new connection with verified credentials pays in all (a fresh session each).
    g.bench_function("authenticate_cache_hit", |b| {
        b.iter(|| {
            black_box(rt.block_on(auth.authenticate(
                &policy,
                source,
                black_box(user),
                black_box(password),
                &Session::default(),
            )))
        })
    });
    // Later requests on the same keep-alive connection.
    let session = Session::default();
    g.bench_function("authenticate_same_connection", |b| {
        b.iter(|| {
            black_box(rt.block_on(auth.authenticate(
                &policy,
                source,
                black_box(user),
                black_box(password),
                &session,
            )))
        })
    });
    let sha = PasswordCheck::Sha256([0; 32]);
    g.bench_function("verify_sha256", |b| {
        b.iter(|| black_box(sha.verify(black_box(b"password-42"))))
    });
    g.finish();

    // A cache miss: one argon2id verification at m = 19456 KiB, t = 2, p = 1.
    let Some((_, creds)) = policy.credentials_for(user) else {
        panic!("no credentials");
    };
    let mut g = c.benchmark_group("proxy_auth_verify");
    g.sample_size(10);
    g.bench_function("argon2id_m19456_t2", |b| {
        b.iter(|| black_box(creds.password.verify(black_box(b"wrong-password"))))
    });
    g.finish();
}

criterion_group!(benches, bench, bench_auth);
criterion_main!(benches);
