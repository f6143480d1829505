//! End-to-end tests of the explicit proxy with real curl and recording upstreams.
//! "Denied" is always proven from the upstream's side too: it accepted no connection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;
use portcullis::proxy::upstream::StaticResolver;

fn agent(port: u16, extra: &str) -> String {
    format!(
        r#"name = "coder-1"
sources = ["127.0.0.0/8"]
allow = ["allowed.test:{port}", "*.wild.test:{port}", "meta.test:{port}", "loop.test:{port}"]
deny = ["blocked.wild.test"]
{extra}
"#
    )
}

#[tokio::test]
async fn allowed_connect_carries_tls_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), &["allowed.test"]);
    let up = tls_upstream(pki.server.clone(), "hello over tls").await;
    let port = up.addr.port();
    // The name resolves to loopback: this test allows exactly that address explicitly.
    let gw = gateway(
        &[(
            "coder-1",
            &agent(port, &format!(r#"allow_cidrs = ["127.0.0.1/32:{port}"]"#)),
        )],
        &[],
        localhost_resolver(&["allowed.test"]),
    )
    .await;
    let url = format!("https://allowed.test:{port}/x");
    let out = curl(&[
        "-x",
        &gw.proxy_url(),
        "--cacert",
        pki.ca_pem.to_str().unwrap(),
        &url,
    ])
    .await;
    assert_eq!(out.code, 0, "curl failed: {}", out.stderr);
    assert_eq!(out.stdout, "hello over tls");
    assert_eq!(up.seen.connections(), 1);
    let lines = gw.log_lines(1).await;
    let line = &lines[0];
    assert_eq!(line["event.action"], "allow");
    assert_eq!(line["agent.name"], "coder-1");
    assert_eq!(line["destination.domain"], "allowed.test");
    assert_eq!(line["destination.ip"], "127.0.0.1");
    assert_eq!(line["tls.client.server_name"], "allowed.test");
    assert_eq!(line["http.request.method"], "CONNECT");
    // The deciding rule, then the one that let the (loopback) address through.
    assert_eq!(
        line["rule.name"],
        format!(
            "agents/coder-1.toml:allow:allowed.test:{port} + agents/coder-1.toml:allow_cidrs:127.0.0.1/32:{port}"
        )
    );
    // The upstream received exactly the bytes the proxy counted from the agent.
    assert_eq!(
        line["source.bytes"].as_u64().unwrap() as usize,
        up.seen.all_bytes().len()
    );
    assert!(line["destination.bytes"].as_u64().unwrap() > 0);
    gw.stop().await;
}

#[tokio::test]
async fn allowed_plain_get_is_forwarded_with_the_checked_host() {
    let up = http_upstream("plain body").await;
    let port = up.addr.port();
    let gw = gateway(
        &[(
            "coder-1",
            &agent(port, &format!(r#"allow_cidrs = ["127.0.0.1/32:{port}"]"#)),
        )],
        &[],
        localhost_resolver(&["allowed.test"]),
    )
    .await;
    let url = format!("http://allowed.test:{port}/path?q=1");
    let out = curl(&[
        "-x",
        &gw.proxy_url(),
        "-H",
        "Proxy-Connection: keep-alive",
        &url,
    ])
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout, "plain body");
    let seen = up.seen.text();
    assert!(seen.starts_with("GET /path?q=1 HTTP/1.1\r\n"), "{seen}");
    assert!(
        seen.to_ascii_lowercase()
            .contains(&format!("host: allowed.test:{port}\r\n")),
        "{seen}"
    );
    assert!(
        !seen.to_ascii_lowercase().contains("proxy-"),
        "proxy headers leaked: {seen}"
    );
    let lines = gw.log_lines(1).await;
    assert_eq!(lines[0]["event.action"], "allow");
    assert_eq!(
        lines[0]["url.original"],
        format!("http://allowed.test:{port}/path?q=1")
    );
    // The rule that let the loopback address through is named beside the deciding one.
    let rule = lines[0]["rule.name"].as_str().unwrap();
    assert!(
        rule.contains(" + ") && rule.contains("allow_cidrs"),
        "{rule}"
    );
    // Every byte each way is counted, heads included, as a tunnel counts them: the 10-byte
    // body and the response head to the agent, the request head from it.
    let to_agent = lines[0]["destination.bytes"].as_u64().unwrap();
    assert!((10 + 17..10 + 512).contains(&to_agent), "{to_agent}");
    let from_agent = lines[0]["source.bytes"].as_u64().unwrap();
    assert!((30..1024).contains(&from_agent), "{from_agent}");
    gw.stop().await;
}

#[tokio::test]
async fn denied_connect_and_get_get_403_and_the_upstream_sees_nothing() {
    let up = silent_upstream().await;
    let port = up.addr.port();
    let gw = gateway(
        &[(
            "coder-1",
            &agent(port, &format!(r#"allow_cidrs = ["127.0.0.1/32:{port}"]"#)),
        )],
        &[],
        localhost_resolver(&[
            "allowed.test",
            "evil.test",
            "blocked.wild.test",
            "wild.test",
        ]),
    )
    .await;
    for host in ["evil.test", "blocked.wild.test", "wild.test"] {
        let out = curl(&[
            "-x",
            &gw.proxy_url(),
            "-o",
            "/dev/null",
            "-w",
            "%{http_connect}",
            &format!("https://{host}:{port}/"),
        ])
        .await;
        assert_eq!(out.stdout, "403", "{host}: {}", out.stderr);
        let out = curl(&[
            "-x",
            &gw.proxy_url(),
            "-D",
            "-",
            "-o",
            "/dev/null",
            &format!("http://{host}:{port}/"),
        ])
        .await;
        // The reason is in the status line too, for clients that print only that.
        assert!(
            out.stdout.starts_with("HTTP/1.1 403 Forbidden ("),
            "{host}: {}",
            out.stdout
        );
        assert!(
            out.stdout
                .to_ascii_lowercase()
                .contains("x-portcullis-reason:"),
            "{}",
            out.stdout
        );
    }
    assert_eq!(
        up.seen.connections(),
        0,
        "a denied request reached the upstream"
    );
    let lines = gw.log_lines(6).await;
    assert_eq!(lines.len(), 6);
    assert!(lines.iter().all(|l| l["event.action"] == "deny"));
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["event.reason"] == "not_allowed")
            .count(),
        4
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["event.reason"] == "denied_rule")
            .count(),
        2
    );
    gw.stop().await;
}

#[tokio::test]
async fn ssrf_names_resolving_to_private_addresses_are_denied() {
    // No allow_cidrs: an allowed name that resolves to loopback or metadata must not pass.
    let up = silent_upstream().await;
    let port = up.addr.port();
    let resolver = StaticResolver::new()
        .with("loop.test", &["127.0.0.1".parse().unwrap()])
        .with("meta.test", &["169.254.169.254".parse().unwrap()])
        .with(
            "allowed.test",
            &[
                "8.8.8.8".parse().unwrap(),
                "::ffff:127.0.0.1".parse().unwrap(),
            ],
        );
    let gw = gateway(&[("coder-1", &agent(port, ""))], &[], resolver).await;
    for host in ["loop.test", "meta.test", "allowed.test"] {
        let out = curl(&[
            "-x",
            &gw.proxy_url(),
            "-D",
            "-",
            "-o",
            "/dev/null",
            &format!("http://{host}:{port}/"),
        ])
        .await;
        assert!(
            out.stdout.starts_with("HTTP/1.1 403"),
            "{host}: {}",
            out.stdout
        );
        assert!(out.stdout.contains("private_address"), "{}", out.stdout);
        let out = curl(&[
            "-x",
            &gw.proxy_url(),
            "-o",
            "/dev/null",
            "-w",
            "%{http_connect}",
            &format!("https://{host}:{port}/"),
        ])
        .await;
        assert_eq!(out.stdout, "403", "{host}");
    }
    assert_eq!(up.seen.connections(), 0);
    let lines = gw.log_lines(6).await;
    assert!(
        lines.iter().all(|l| l["event.reason"] == "private_address"),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["destination.ip"] == "169.254.169.254")
    );
    gw.stop().await;
}

#[tokio::test]
async fn ip_literals_in_odd_notations_are_denied_unless_allow_cidrs_covers_them() {
    let up = silent_upstream().await;
    let port = up.addr.port();
    let gw = gateway(&[("coder-1", &agent(port, ""))], &[], StaticResolver::new()).await;
    for host in [
        "127.0.0.1",
        "2130706433",
        "0x7f.1",
        "127.1",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "0177.0.0.1",
    ] {
        let req = format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n");
        let reply = raw_exchange(gw.proxy, req.as_bytes(), Duration::from_secs(3)).await;
        assert!(reply.starts_with("HTTP/1.1 403"), "{host}: {reply}");
        assert!(reply.contains("ip_literal"), "{host}: {reply}");
    }
    assert_eq!(up.seen.connections(), 0);
    gw.stop().await;

    // With an allow_cidrs rule for the address, the same odd notation reaches it.
    let up = http_upstream("by address").await;
    let port = up.addr.port();
    let gw = gateway(
        &[(
            "coder-1",
            &agent(port, &format!(r#"allow_cidrs = ["127.0.0.1/32:{port}"]"#)),
        )],
        &[],
        StaticResolver::new(),
    )
    .await;
    let out = curl(&["-x", &gw.proxy_url(), &format!("http://2130706433:{port}/")]).await;
    assert_eq!(out.stdout, "by address", "{}", out.stderr);
    gw.stop().await;
}

#[tokio::test]
async fn host_desync_tricks_are_refused_threats_a3() {
    let up = silent_upstream().await;
    let port = up.addr.port();
    let gw = gateway(
        &[(
            "coder-1",
            &agent(port, &format!(r#"allow_cidrs = ["127.0.0.1/32:{port}"]"#)),
        )],
        &[],
        localhost_resolver(&["allowed.test", "evil.test"]),
    )
    .await;
    let a = format!("allowed.test:{port}");
    let cases = [
        format!("GET http://{a}/ HTTP/1.1\r\nHost: evil.test:{port}\r\n\r\n"),
        format!("GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\nHost: evil.test:{port}\r\n\r\n"),
        format!("GET http://{a}/ HTTP/1.1\r\nHost: user@{a}\r\n\r\n"),
        format!("GET http://user@{a}/ HTTP/1.1\r\nHost: {a}\r\n\r\n"),
        format!("GET http://{a}/ HTTP/1.1\r\nHost: allowed.test:1{port}\r\n\r\n"),
        format!("GET https://{a}/ HTTP/1.1\r\nHost: {a}\r\n\r\n"),
        format!("CONNECT {a} HTTP/1.1\r\nHost: evil.test:{port}\r\n\r\n"),
    ];
    for req in &cases {
        let reply = raw_exchange(gw.proxy, req.as_bytes(), Duration::from_secs(3)).await;
        assert!(
            reply.starts_with("HTTP/1.1 400") || reply.starts_with("HTTP/1.1 403"),
            "{req:?} → {reply}"
        );
    }
    assert_eq!(up.seen.connections(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn pipelined_request_to_another_host_is_denied() {
    let up = http_upstream("first").await;
    let port = up.addr.port();
    let gw = gateway(
        &[(
            "coder-1",
            &agent(port, &format!(r#"allow_cidrs = ["127.0.0.1/32:{port}"]"#)),
        )],
        &[],
        localhost_resolver(&["allowed.test", "evil.test"]),
    )
    .await;
    let req = format!(
        "GET http://allowed.test:{port}/1 HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n\
         GET http://evil.test:{port}/2 HTTP/1.1\r\nHost: evil.test:{port}\r\n\r\n"
    );
    let reply = raw_exchange(gw.proxy, req.as_bytes(), Duration::from_secs(3)).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        reply.contains("HTTP/1.1 403"),
        "second request not denied: {reply}"
    );
    assert_eq!(up.seen.connections(), 1);
    assert!(!up.seen.text().contains("evil"), "{}", up.seen.text());
    gw.stop().await;
}

#[tokio::test]
async fn sni_must_match_the_connect_host_threats_a2() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), &["allowed.test", "evil.test"]);
    let up = tls_upstream(pki.server.clone(), "should not be reached").await;
    let port = up.addr.port();
    let gw = gateway(
        &[(
            "coder-1",
            &agent(port, &format!(r#"allow_cidrs = ["127.0.0.1/32:{port}"]"#)),
        )],
        &[],
        localhost_resolver(&["allowed.test", "evil.test"]),
    )
    .await;
    // curl --connect-to: CONNECT allowed.test, but the TLS inside names evil.test.
    let out = curl(&[
        "-x",
        &gw.proxy_url(),
        "--cacert",
        pki.ca_pem.to_str().unwrap(),
        "--connect-to",
        &format!("evil.test:{port}:allowed.test:{port}"),
        &format!("https://evil.test:{port}/"),
    ])
    .await;
    assert_ne!(out.code, 0, "mismatched SNI got through: {}", out.stdout);
    // The refused hello got a TLS access_denied alert, which curl names.
    assert!(
        out.stderr.contains("alert access denied"),
        "curl: {}",
        out.stderr
    );
    // The same by hand: after the 200, exactly one alert record, framed with the hello's
    // record version (0x0301 here, as rustls sends it), fatal, access_denied (49).
    let head = format!("CONNECT allowed.test:{port} HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n");
    let mut req = head.clone().into_bytes();
    let hello = client_hello("evil.test");
    assert_eq!(hello[..3], [0x16, 3, 1]);
    req.extend_from_slice(&hello);
    let reply = raw_exchange(gw.proxy, &req, Duration::from_secs(3)).await;
    let (status, tunnel) = reply.split_once("\r\n\r\n").unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(tunnel.as_bytes(), [21, 3, 1, 0, 2, 2, 49], "{reply:?}");
    // Not TLS at all inside a CONNECT tunnel: refused too, with a bare close (no alert for
    // a stream that is not a ClientHello).
    let req = format!("{head}GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n");
    let reply = raw_exchange(gw.proxy, req.as_bytes(), Duration::from_secs(3)).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        reply.ends_with("\r\n\r\n"),
        "bytes after the 200: {reply:?}"
    );
    assert_eq!(up.seen.connections(), 0, "the upstream was contacted");
    let lines = gw.log_lines(3).await;
    assert_eq!(lines[0]["event.reason"], "sni_mismatch", "{lines:?}");
    assert_eq!(lines[0]["tls.client.server_name"], "evil.test");
    assert_eq!(lines[1]["event.reason"], "sni_mismatch", "{lines:?}");
    assert_eq!(lines[2]["event.reason"], "malformed");
    gw.stop().await;
}

#[tokio::test]
async fn proxy_credentials_identify_the_agent() {
    let up = http_upstream("authed").await;
    let port = up.addr.port();
    // Only the SHA-256 of the password is stored in the rules file.
    let hash = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(b"s3cret"))
    };
    let creds = format!("[credentials]\nusername = \"coder\"\npassword_sha256 = \"{hash}\"\n");
    let agent_text = format!(
        "name = \"coder-1\"\nallow = [\"allowed.test:{port}\"]\nallow_cidrs = [\"127.0.0.1/32:{port}\"]\n{creds}"
    );
    let gw = gateway(
        &[("coder-1", &agent_text)],
        &[],
        localhost_resolver(&["allowed.test"]),
    )
    .await;
    let url = format!("http://allowed.test:{port}/");
    let ok = curl(&["-x", &gw.proxy_url(), "-U", "coder:s3cret", &url]).await;
    assert_eq!(ok.stdout, "authed", "{}", ok.stderr);
    let proxy = gw.proxy_url();
    for args in [
        vec!["-U", "coder:wrong"],
        vec!["-U", "nobody:s3cret"],
        vec![],
    ] {
        let mut a = vec![
            "-x",
            proxy.as_str(),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ];
        a.extend(args.iter());
        a.push(&url);
        let out = curl(&a).await;
        assert_eq!(out.stdout, "407", "{args:?}");
    }
    assert_eq!(up.seen.connections(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn unknown_sources_are_denied() {
    let up = silent_upstream().await;
    let port = up.addr.port();
    let text = format!(
        "name = \"elsewhere\"\nsources = [\"10.66.0.11/32\"]\nallow = [\"allowed.test:{port}\"]\n"
    );
    let gw = gateway(
        &[("elsewhere", &text)],
        &[],
        localhost_resolver(&["allowed.test"]),
    )
    .await;
    let out = curl(&[
        "-x",
        &gw.proxy_url(),
        "-D",
        "-",
        "-o",
        "/dev/null",
        &format!("http://allowed.test:{port}/"),
    ])
    .await;
    assert!(out.stdout.starts_with("HTTP/1.1 403"), "{}", out.stdout);
    assert!(out.stdout.contains("unknown_agent"));
    assert_eq!(up.seen.connections(), 0);
    let lines = gw.log_lines(1).await;
    assert_eq!(lines[0]["agent.name"], "unknown");
    gw.stop().await;
}

#[tokio::test]
async fn names_are_normalised_before_matching_threats_c10() {
    let up = http_upstream("normalised").await;
    let port = up.addr.port();
    let gw = gateway(
        &[(
            "coder-1",
            &agent(port, &format!(r#"allow_cidrs = ["127.0.0.1/32:{port}"]"#)),
        )],
        &[],
        localhost_resolver(&["allowed.test", "deep.sub.wild.test"]),
    )
    .await;
    for host in ["ALLOWED.test", "allowed.test.", "Deep.Sub.WILD.test."] {
        let req = format!("GET http://{host}:{port}/ HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n");
        let reply = raw_exchange(gw.proxy, req.as_bytes(), Duration::from_secs(3)).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{host}: {reply}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn slow_request_heads_time_out_and_healthz_answers() {
    let up = silent_upstream().await;
    let gw = gateway(
        &[("coder-1", &agent(up.addr.port(), ""))],
        &[],
        StaticResolver::new(),
    )
    .await;
    // One byte, then silence: dropped at the handshake deadline (2 s in tests).
    let started = std::time::Instant::now();
    let reply = raw_exchange(gw.proxy, b"G", Duration::from_secs(6)).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "not cut at the deadline"
    );
    assert!(!reply.contains("200"), "{reply}");
    let health = curl(&[&format!("http://{}/healthz", gw.admin)]).await;
    assert!(
        health.stdout.contains("\"status\":\"ok\""),
        "{}",
        health.stdout
    );
    gw.stop().await;
}

/// A rebinding resolver: the first answer is the checked, allowed address; every later
/// answer points at cloud metadata. Counting lookups proves we resolve exactly once.
struct Rebinding {
    first: std::net::IpAddr,
    lookups: std::sync::atomic::AtomicUsize,
}

impl portcullis::proxy::upstream::Resolve for Rebinding {
    fn lookup<'a>(
        &'a self,
        _name: &'a str,
    ) -> portcullis::proxy::upstream::BoxFuture<
        'a,
        Result<Vec<std::net::IpAddr>, portcullis::proxy::upstream::ResolveError>,
    > {
        let n = self
            .lookups
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let answer = if n == 0 {
            self.first
        } else {
            "169.254.169.254".parse().unwrap()
        };
        Box::pin(async move { Ok(vec![answer]) })
    }
}

#[tokio::test]
async fn dns_rebinding_resolve_once_dial_that_address_threats_b6() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), &["allowed.test"]);
    let up = tls_upstream(pki.server.clone(), "checked address").await;
    let port = up.addr.port();
    let resolver = std::sync::Arc::new(Rebinding {
        first: "127.0.0.1".parse().unwrap(),
        lookups: Default::default(),
    });
    let mut config = portcullis::config::Config::builtin();
    let rules = dir.path().join("rules");
    std::fs::create_dir_all(rules.join("agents")).unwrap();
    std::fs::write(
        rules.join("agents/coder-1.toml"),
        agent(port, &format!(r#"allow_cidrs = ["127.0.0.1/32:{port}"]"#)),
    )
    .unwrap();
    config.rules_dir = rules.clone();
    config.listen.explicit = Some("127.0.0.1:0".parse().unwrap());
    config.listen.admin = None;
    config.log.destination = portcullis::config::LogDestination::File(dir.path().join("log"));
    config.state_dir = dir.path().join("state");
    let policy = portcullis::policy::Policy::load(&rules, &config.default_ports, 1).unwrap();
    let running = portcullis::gateway::start(config, policy, resolver.clone())
        .await
        .unwrap();
    let proxy = format!("http://{}", running.explicit_addr.unwrap());
    let out = curl(&[
        "-x",
        &proxy,
        "--cacert",
        pki.ca_pem.to_str().unwrap(),
        &format!("https://allowed.test:{port}/"),
    ])
    .await;
    assert_eq!(out.stdout, "checked address", "{}", out.stderr);
    assert_eq!(
        resolver.lookups.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the name was resolved more than once"
    );
    running.shutdown(Duration::from_secs(1)).await;
}

/// `resolve_cidrs`: an allowed name that resolves into the range is reached (plain HTTP and
/// CONNECT); the same address as an IP literal is refused, and no byte reaches it.
#[tokio::test]
async fn names_may_resolve_into_resolve_cidrs_but_literals_are_refused() {
    let up = http_upstream("mirror").await;
    let port = up.addr.port();
    let text = format!(
        "name = \"coder-1\"\nsources = [\"127.0.0.0/8\"]\nallow = [\"mirror.test:{port}\"]\nresolve_cidrs = [\"127.0.0.0/8\"]\n"
    );
    let gw = gateway(
        &[("coder-1", &text)],
        &[],
        localhost_resolver(&["mirror.test"]),
    )
    .await;
    let by_name = curl(&[
        "-x",
        &gw.proxy_url(),
        &format!("http://mirror.test:{port}/"),
    ])
    .await;
    assert_eq!(by_name.stdout, "mirror", "{}", by_name.stderr);
    assert_eq!(up.seen.connections(), 1);
    for url in [
        format!("http://127.0.0.1:{port}/"),
        format!("https://127.0.0.1:{port}/"),
    ] {
        let out = curl(&[
            "-x",
            &gw.proxy_url(),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_connect}",
            &url,
        ])
        .await;
        assert!(out.stdout.contains("403"), "{url}: {}", out.stdout);
    }
    assert_eq!(up.seen.connections(), 1, "an IP literal reached the range");
    let lines = gw.log_lines(3).await;
    assert_eq!(lines[0]["event.action"], "allow", "{lines:?}");
    assert!(
        lines[1..].iter().all(|l| l["event.reason"] == "ip_literal"),
        "{lines:?}"
    );
    gw.stop().await;
}

/// HTTP inside CONNECT (what undici's `EnvHttpProxyAgent` and `curl -p` do for `http://`
/// URLs): a tunnel to a port served as HTTP that starts with a request is served request
/// by request, like transparent port 80. Before, the gateway answered 200 and then closed
/// the tunnel because it did not start with a ClientHello.
#[tokio::test]
async fn plain_http_inside_a_connect_tunnel_is_served_request_by_request() {
    let up = http_upstream("plain body").await;
    let port = up.addr.port();
    let gw = gateway_with(
        &[(
            "coder-1",
            &agent(port, &format!(r#"allow_cidrs = ["127.0.0.1/32:{port}"]"#)),
        )],
        &[],
        localhost_resolver(&["allowed.test", "evil.test"]),
        |c, _| c.transparent.http_ports = vec![port],
    )
    .await;
    let url = format!("http://allowed.test:{port}/inside?x=1");
    let out = curl(&["-p", "-x", &gw.proxy_url(), &url]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout, "plain body");
    assert!(
        up.seen.text().starts_with("GET /inside?x=1 HTTP/1.1\r\n"),
        "{}",
        up.seen.text()
    );
    let lines = gw.log_lines(1).await;
    assert_eq!(lines.len(), 1, "one line for the request: {lines:?}");
    assert_eq!(lines[0]["event.action"], "allow");
    assert_eq!(lines[0]["http.request.method"], "GET");
    assert_eq!(lines[0]["url.original"], url);

    // A request naming another host inside the tunnel is refused; nothing reaches an
    // upstream for it.
    let before = up.seen.connections();
    let mut tunnel = connect_only(gw.proxy, "allowed.test", port).await.unwrap();
    tunnel
        .write_all(b"GET /x HTTP/1.1\r\nHost: evil.test\r\n\r\n")
        .await
        .unwrap();
    let mut back = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut back)).await;
    let back = String::from_utf8_lossy(&back);
    assert!(
        back.starts_with("HTTP/1.1 400 Bad Request (malformed)\r\n"),
        "{back}"
    );
    assert_eq!(
        up.seen.connections(),
        before,
        "the other host's request went out"
    );
    gw.stop().await;
}

/// Plain HTTP in a tunnel to a port not served as HTTP is refused (as before): only TLS
/// goes there.
#[tokio::test]
async fn plain_http_inside_a_tunnel_to_a_tls_port_is_refused() {
    let up = http_upstream("plain body").await;
    let port = up.addr.port();
    let gw = gateway(
        &[(
            "coder-1",
            &agent(port, &format!(r#"allow_cidrs = ["127.0.0.1/32:{port}"]"#)),
        )],
        &[],
        localhost_resolver(&["allowed.test"]),
    )
    .await;
    let mut tunnel = connect_only(gw.proxy, "allowed.test", port).await.unwrap();
    tunnel
        .write_all(format!("GET / HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut back = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut back)).await;
    assert!(back.is_empty(), "{}", String::from_utf8_lossy(&back));
    assert_eq!(up.seen.connections(), 0);
    let lines = gw.log_lines(1).await;
    assert_eq!(lines[0]["event.reason"], "malformed", "{lines:?}");
    gw.stop().await;
}
