//! Denials a client can tell from a network fault, end to end, in network namespaces (root;
//! CI runs it as root): an agent whose only route and resolver is a gateway running the
//! portcullis binary (transparent listener, DNS forwarder) behind the ruleset it renders,
//! and an "internet" that records every connection and question.
//!
//! For each real client Debian or the registries ship (curl, wget, Python urllib, pip,
//! git, Node fetch, npm, dig, getaddrinfo): the denied fetch fails within a bound and
//! the message it prints names a refusal:
//! - HTTPS to a name the policy refuses (the agent's hosts file pins its address, as a
//!   hard-coded address would): the TLS `access_denied` alert ("alert access denied");
//! - plain HTTP to it: `403` and `X-Portcullis-Reason: not_allowed`;
//! - a name the forwarder refuses: NXDOMAIN, which every client reports as "not found"
//!   (never "temporary failure"), and, to a client that sends EDNS (dig), the Extended DNS
//!   Error with the reason.
//!
//! pip and npm retry every failure that is not an HTTP status, whatever the gateway says
//! (docs/dns.md has the measured times): here they run with their retries off for the DNS
//! and TLS denials, so the bound measures the gateway, not their back-off. `npm install`
//! from a denied plain-HTTP registry runs with npm's defaults.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::netns::*;
use common::*;

/// Refused by the policy; the agent's hosts file pins it to the test internet.
const DENIED: &str = "denied.example";
/// Refused by the policy and not in the hosts file: the agent asks the forwarder.
const UNRESOLVED: &str = "blocked.example";
/// Every denied fetch must fail within this (the slowest client start, npm, takes ~1 s).
const FAST: Duration = Duration::from_secs(5);

/// `/etc/netns/<agent ns>/{hosts,resolv.conf}`: `ip netns exec` mounts them over the
/// agent's `/etc/hosts` and `/etc/resolv.conf`. Removed on drop.
struct AgentEtc(PathBuf);

impl AgentEtc {
    fn new(ns: &str) -> Self {
        let dir = Path::new("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("hosts"),
            format!("127.0.0.1 localhost\n{INTERNET} {DENIED}\n"),
        )
        .unwrap();
        std::fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {GW_AGENT_SIDE}\n"),
        )
        .unwrap();
        Self(dir)
    }
}

impl Drop for AgentEtc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a client printed (stdout and stderr), how it exited and how long it took.
struct Fetch {
    took: Duration,
    ok: bool,
    text: String,
}

/// Run `cmd` in the agent namespace, in `work`, with `HOME=work` (no user config, no
/// cache) and no proxy variables.
async fn fetch(topo: &Topology, work: &Path, cmd: &str) -> Fetch {
    let started = Instant::now();
    let o = run(in_ns(
        &topo.agent_ns,
        &format!(
            "cd {w} && env -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY \
             -u ALL_PROXY -u no_proxy HOME={w} {cmd} 2>&1",
            w = work.display()
        ),
    ))
    .await;
    Fetch {
        took: started.elapsed(),
        ok: o.status.success(),
        text: String::from_utf8_lossy(&o.stdout).into_owned(),
    }
}

/// The fetch failed (unless `exit_ok`: curl prints a 403 and exits 0), within [`FAST`],
/// and printed every one of `needles` (case-insensitive) and none of `never`.
fn assert_refused(label: &str, f: &Fetch, exit_ok: bool, needles: &[&str], never: &[&str]) {
    assert!(exit_ok || !f.ok, "{label}: succeeded:\n{}", f.text);
    assert!(
        f.took < FAST,
        "{label}: took {:?} (bound {FAST:?}):\n{}",
        f.took,
        f.text
    );
    let text = f.text.to_ascii_lowercase();
    for n in needles {
        assert!(
            text.contains(&n.to_ascii_lowercase()),
            "{label}: no {n:?} in:\n{}",
            f.text
        );
    }
    for n in never {
        assert!(
            !text.contains(&n.to_ascii_lowercase()),
            "{label}: {n:?} in:\n{}",
            f.text
        );
    }
}

fn client_py() -> String {
    format!("{}/tests/e2e/client.py", env!("CARGO_MANIFEST_DIR"))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_fetches_fail_fast_with_a_recognisable_refusal() {
    let topo = Topology::new();
    let dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let pki = pki(dir.path(), &["allowed.test", DENIED]);
    let ip = |a: &str, p: u16| -> SocketAddr { format!("{a}:{p}").parse().unwrap() };
    let tls = tls_upstream_on(
        ip(INTERNET, 443),
        pki.server.clone(),
        "tls from the internet",
    )
    .await;
    let http = http_upstream_on(ip(INTERNET, 80), "http from the internet").await;
    let dns = dns_server(
        ip(INTERNET, 53),
        &[
            ("allowed.test", INTERNET),
            (DENIED, INTERNET),
            (UNRESOLVED, INTERNET),
        ],
    )
    .await;
    let cfg = write_config(
        dir.path(),
        &topo,
        &format!("\"{GW_AGENT_SIDE}:15001\""),
        "redirect",
        false,
    );
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replacen(
            "[listen]\n",
            &format!("[listen]\ndns = [\"{GW_AGENT_SIDE}:53\"]\n"),
            1,
        ),
    )
    .unwrap();
    let _etc = AgentEtc::new(&topo.agent_ns);
    let gw = start_gateway(&topo, env!("CARGO_BIN_EXE_portcullis"), &cfg, dir.path()).await;
    let ca = pki.ca_pem.display().to_string();

    // Control: the allowed name, resolved by the gateway, works over HTTPS and HTTP.
    let f = fetch(
        &topo,
        w,
        &format!("curl -sS --max-time 5 --cacert {ca} https://allowed.test/"),
    )
    .await;
    assert_eq!(f.text.trim(), "tls from the internet", "{}", f.text);
    let f = fetch(&topo, w, "curl -sS --max-time 5 http://allowed.test/").await;
    assert_eq!(f.text.trim(), "http from the internet", "{}", f.text);
    let (tls_seen, http_seen) = (tls.seen.connections(), http.seen.connections());
    assert_eq!((tls_seen, http_seen), (1, 1));

    // --- HTTPS: the refused hello gets the TLS access_denied alert. ---
    let https = format!("https://{DENIED}/");
    assert_refused(
        "curl https",
        &fetch(
            &topo,
            w,
            &format!("curl -sS --max-time 10 --cacert {ca} {https}"),
        )
        .await,
        false,
        &["curl: (35)", "tlsv1 alert access denied"],
        &["ssl_error_syscall", "unexpected eof"],
    );
    assert_refused(
        "wget https",
        &fetch(
            &topo,
            w,
            &format!("wget --tries=1 --timeout=10 -O- {https}"),
        )
        .await,
        false,
        &["access"],
        &[],
    );
    std::fs::write(
        w.join("get.py"),
        "import sys, urllib.request\nurllib.request.urlopen(sys.argv[1], timeout=10)\n",
    )
    .unwrap();
    assert_refused(
        "python urllib https",
        &fetch(&topo, w, &format!("python3 get.py {https}")).await,
        false,
        &["TLSV1_ALERT_ACCESS_DENIED"],
        &["EOF occurred"],
    );
    assert_refused(
        "git clone https",
        &fetch(&topo, w, &format!("git clone -q {https}repo.git")).await,
        false,
        &["denied"],
        &[],
    );
    std::fs::write(
        w.join("get.js"),
        "fetch(process.argv[2]).then(r => { console.log('status', r.status, \
         r.headers.get('x-portcullis-reason')); process.exit(2) }, e => { \
         console.log('error', e.cause && e.cause.code, e.cause && e.cause.message); \
         process.exit(1) })\n",
    )
    .unwrap();
    assert_refused(
        "node fetch https",
        &fetch(&topo, w, &format!("node get.js {https}")).await,
        false,
        &["ERR_SSL_TLSV1_ALERT_ACCESS_DENIED"],
        &["ECONNRESET"],
    );
    let pip = |index: &str, extra: &str| {
        format!(
            "python3 -m pip --isolated download --no-cache-dir --retries 0 --timeout 10 \
             {extra} -d dl --index-url {index} six"
        )
    };
    assert_refused(
        "pip https",
        &fetch(&topo, w, &pip(&format!("{https}simple"), "")).await,
        false,
        &["TLSV1_ALERT_ACCESS_DENIED"],
        &[],
    );
    let npm = |registry: &str, extra: &str| {
        format!(
            "npm install --no-audit --no-fund --cache {w}/npm-cache {extra} --registry {registry} left-pad",
            w = w.display()
        )
    };
    assert_refused(
        "npm https",
        &fetch(&topo, w, &npm(&https, "--fetch-retries=0")).await,
        false,
        &["ERR_SSL_TLSV1_ALERT_ACCESS_DENIED"],
        &[],
    );

    // The alert by hand: one record, framed with the hello's record version, fatal,
    // access_denied; a hello without SNI gets it too. A stream that is no ClientHello
    // (garbage, HTTP on 443) gets a bare close.
    let exchange = |bytes: Vec<u8>| {
        let cmd = in_ns(
            &topo.agent_ns,
            &format!(
                "python3 {} exchange {INTERNET} 443 {}",
                client_py(),
                hex(&bytes)
            ),
        );
        async move { stdout(&run(cmd).await) }
    };
    let hello = client_hello(DENIED);
    assert_eq!(hello[..3], [0x16, 3, 1]);
    assert_eq!(exchange(hello.clone()).await, "15030100020231");
    let mut tls12_framed = hello.clone();
    tls12_framed[2] = 3;
    assert_eq!(exchange(tls12_framed).await, "15030300020231");
    assert_eq!(
        exchange(portcullis::selftest::packets::client_hello(None, [5; 32])).await,
        "15030100020231",
        "no SNI"
    );
    assert_eq!(
        exchange(b"\x16\x03\x01\x00\x05hello".to_vec()).await,
        "",
        "garbage"
    );
    assert_eq!(
        exchange(format!("GET / HTTP/1.1\r\nHost: {DENIED}\r\n\r\n").into_bytes()).await,
        "",
        "HTTP on 443"
    );

    // CONNECT through the explicit proxy, a hello naming another host than the CONNECT
    // after the 200: the same alert.
    assert_refused(
        "curl CONNECT sni mismatch",
        &fetch(
            &topo,
            w,
            &format!(
                "curl -sS --max-time 10 --cacert {ca} -x http://{GW_AGENT_SIDE}:3128 \
                 --connect-to {DENIED}:443:allowed.test:443 {https}"
            ),
        )
        .await,
        false,
        &["tlsv1 alert access denied"],
        &[],
    );

    // --- Plain HTTP: the first request gets 403 and the reason, then the close. ---
    let plain = format!("http://{DENIED}/");
    assert_refused(
        "curl http",
        &fetch(&topo, w, &format!("curl -sS -i --max-time 10 {plain}")).await,
        true,
        &[
            "HTTP/1.1 403 Forbidden",
            "x-portcullis-reason: not_allowed",
            "portcullis: denied (not_allowed)",
        ],
        &["Empty reply"],
    );
    assert_refused(
        "wget http",
        &fetch(
            &topo,
            w,
            &format!("wget --tries=1 --timeout=10 -O- {plain}"),
        )
        .await,
        false,
        &["403 Forbidden"],
        &[],
    );
    assert_refused(
        "python urllib http",
        &fetch(&topo, w, &format!("python3 get.py {plain}")).await,
        false,
        &["HTTP Error 403"],
        &["RemoteDisconnected"],
    );
    assert_refused(
        "git clone http",
        &fetch(&topo, w, &format!("git clone -q {plain}repo.git")).await,
        false,
        &["403"],
        &[],
    );
    assert_refused(
        "node fetch http",
        &fetch(&topo, w, &format!("node get.js {plain}")).await,
        false,
        &["status 403 not_allowed"],
        &[],
    );
    // pip names an index page's 403 only with -v (by default: "No matching distribution
    // found", at once); a file it is told to fetch, it names.
    assert_refused(
        "pip http",
        &fetch(
            &topo,
            w,
            &format!(
                "python3 -m pip --isolated download --no-cache-dir --no-deps -d dl \
                 {plain}six-1.16.0-py2.py3-none-any.whl"
            ),
        )
        .await,
        false,
        &["HTTP error 403"],
        &[],
    );
    // npm with its default retries: a 403 is final.
    assert_refused(
        "npm http",
        &fetch(&topo, w, &npm(&plain, "")).await,
        false,
        &["E403"],
        &[],
    );
    // Two requests on one connection, the first refused: the 403, then the close; the
    // second is never answered and nothing reaches the upstream.
    let two = format!(
        "GET /a HTTP/1.1\r\nHost: {DENIED}\r\n\r\nGET /b HTTP/1.1\r\nHost: {DENIED}\r\n\r\n"
    );
    let back = stdout(
        &run(in_ns(
            &topo.agent_ns,
            &format!(
                "python3 {} exchange {INTERNET} 80 {}",
                client_py(),
                hex(two.as_bytes())
            ),
        ))
        .await,
    );
    let back = String::from_utf8(
        (0..back.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&back[i..i + 2], 16).unwrap())
            .collect(),
    )
    .unwrap();
    assert_eq!(back.matches("HTTP/1.1 ").count(), 1, "{back}");
    assert!(
        back.starts_with("HTTP/1.1 403 Forbidden (not_allowed)\r\n"),
        "{back}"
    );
    assert!(back.contains("connection: close\r\n"), "{back}");

    // --- DNS: the forwarder's NXDOMAIN, with the EDE for a client that sends EDNS. ---
    let f = fetch(
        &topo,
        w,
        &format!("dig +time=2 +tries=1 @{GW_AGENT_SIDE} {UNRESOLVED} A"),
    )
    .await;
    assert_refused(
        "dig",
        &f,
        true,
        &[
            "status: NXDOMAIN",
            "EDE: 15 (Blocked): (portcullis: not_allowed for coder-1)",
        ],
        &[],
    );
    let f = fetch(
        &topo,
        w,
        &format!("dig +time=2 +tries=1 +noedns @{GW_AGENT_SIDE} {UNRESOLVED} A"),
    )
    .await;
    assert_refused("dig +noedns", &f, true, &["status: NXDOMAIN"], &["EDE"]);
    let host = format!("https://{UNRESOLVED}/");
    let not_temporary = ["temporary", "EAI_AGAIN"];
    assert_refused(
        "getent",
        &fetch(&topo, w, &format!("getent ahosts {UNRESOLVED}")).await,
        false,
        &[],
        &[],
    );
    std::fs::write(
        w.join("resolve.py"),
        "import socket, sys\ntry:\n    socket.getaddrinfo(sys.argv[1], 443)\nexcept socket.gaierror as e:\n    print(e)\n    sys.exit(1)\n",
    )
    .unwrap();
    assert_refused(
        "getaddrinfo",
        &fetch(&topo, w, &format!("python3 resolve.py {UNRESOLVED}")).await,
        false,
        &["Name or service not known"],
        &not_temporary,
    );
    assert_refused(
        "curl dns",
        &fetch(&topo, w, &format!("curl -sS --max-time 10 {host}")).await,
        false,
        &["Could not resolve host"],
        &not_temporary,
    );
    assert_refused(
        "wget dns",
        &fetch(&topo, w, &format!("wget --tries=1 --timeout=10 -O- {host}")).await,
        false,
        &["unable to resolve host address"],
        &not_temporary,
    );
    assert_refused(
        "git dns",
        &fetch(&topo, w, &format!("git clone -q {host}repo.git")).await,
        false,
        &["Could not resolve host"],
        &not_temporary,
    );
    assert_refused(
        "node dns",
        &fetch(&topo, w, &format!("node get.js {host}")).await,
        false,
        &["ENOTFOUND"],
        &not_temporary,
    );
    assert_refused(
        "pip dns",
        &fetch(
            &topo,
            w,
            &format!(
                "python3 -m pip --isolated download --no-cache-dir --retries 0 --no-deps -d dl \
                 {host}six-1.16.0-py2.py3-none-any.whl"
            ),
        )
        .await,
        false,
        &["Name or service not known"],
        &not_temporary,
    );
    assert_refused(
        "npm dns",
        &fetch(&topo, w, &npm(&host, "--fetch-retries=0")).await,
        false,
        &["ENOTFOUND"],
        &not_temporary,
    );

    // From the internet's side: not one denied connection, request or question got out.
    assert_eq!(
        tls.seen.connections(),
        tls_seen,
        "a refused hello reached the upstream"
    );
    assert_eq!(
        http.seen.connections(),
        http_seen,
        "a refused request reached the upstream"
    );
    let asked = dns.names();
    assert!(
        !asked
            .iter()
            .any(|n| n.contains("denied") || n.contains("blocked")),
        "a refused name went upstream: {asked:?}"
    );
    // And the gateway logged each refusal with its reason.
    let lines = gw.settled_lines().await;
    let count =
        |pred: &dyn Fn(&serde_json::Value) -> bool| lines.iter().filter(|l| pred(l)).count();
    assert!(
        count(&|l| l["event.reason"] == "not_allowed" && l["tls.client.server_name"] == DENIED)
            >= 7,
        "{lines:#?}"
    );
    assert!(
        count(&|l| l["event.reason"] == "not_allowed"
            && l["url.original"]
                .as_str()
                .is_some_and(|u| u.starts_with(&plain)))
            >= 7
    );
    assert!(
        count(&|l| l["portcullis.mode"] == "dns"
            && l["dns.response_code"] == "NXDOMAIN"
            && l["dns.question.name"] == UNRESOLVED)
            >= 8
    );
    drop(gw);
}
