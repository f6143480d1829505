//! The real-client matrix, end to end, in network namespaces (root; CI runs it as root): the
//! clients an agent actually runs, each through the explicit proxy (proxy settings from the
//! environment or the client's own option) and transparently (no settings: the gateway's
//! ruleset diverts TCP 80/443, the gateway answers DNS), against a local origin in the test
//! "internet" (`tests/e2e/origin.py`: a static file, a PyPI simple index, an npm registry,
//! `git http-backend`, a flat apt repository; over TLS with a test CA on 443, plain on 80).
//!
//! For every client and mode, three things:
//! - **allowed**: a fetch from `allowed.test` works (the client printed the origin's bytes);
//! - **denied**: a fetch from `denied.example` fails, and the client's output carries the
//!   reason: `not_allowed` where the client shows an HTTP refusal's header, status line or
//!   (with its verbose switch) the proxy's answer; the TLS `access_denied` alert for a
//!   refused transparent hello (no HTTP to speak there); from the origin's side, no request
//!   for `denied.example` ever arrived;
//! - **the log**: the fetch's connection lines all name the agent, the mode, the
//!   destination and the verdict (`allow`, or `deny` with `event.reason = not_allowed`).
//!
//! The matrix runs every row and fails at the end with a table of the rows that did not
//! hold, so one broken client does not hide the others.
//!
//! Clients: curl (https, http, and `curl -p`: `CONNECT host:80` then plain HTTP inside the
//! tunnel), wget, Python urllib and requests, pip (the local index), npm (the local registry),
//! git (smart HTTP), Node's fetch through undici's `EnvHttpProxyAgent` for https and http
//! (what Node >= 24 uses with `NODE_USE_ENV_PROXY=1`; the machine's Node is older, so undici
//! comes from the npm registry at test time, once, into `target/clients-e2e/`), apt
//! (`Acquire::http::Proxy`, a flat repository). undici sends `CONNECT host:80` for
//! `http://` URLs as `curl -p` does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::netns::*;

const ALLOWED: &str = "allowed.test";
/// Refused by the policy; the agent's hosts file pins it to the test internet, so a
/// transparent client connects and meets the gateway's refusal (not a DNS failure).
const DENIED: &str = "denied.example";
/// What the origin's `hello.txt` holds.
const BODY: &str = "hello from the origin";
/// undici, pinned: the version whose `EnvHttpProxyAgent` the matrix drives (6.x: it runs on
/// the Node 18 of Debian 12 as well as on later ones).
const UNDICI: &str = "undici@6.29.1";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Explicit,
    Transparent,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Explicit => "explicit",
            Mode::Transparent => "transparent",
        }
    }
}

/// `/etc/netns/<agent ns>/{hosts,resolv.conf}` (mounted over the agent's by `ip netns
/// exec`): the denied name pinned, the gateway as the resolver. Removed on drop.
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

/// A child process killed on drop (the origin servers).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn e2e(file: &str) -> String {
    format!("{}/tests/e2e/{file}", env!("CARGO_MANIFEST_DIR"))
}

/// A CA and a leaf for `names`, as PEM files: `ca.pem`, `leaf.pem` (leaf then CA), `key.pem`.
fn write_pki(dir: &Path, names: &[&str]) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "portcullis client-matrix CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(
        dir.join("leaf.pem"),
        format!("{}{}", leaf.pem(), ca_cert.pem()),
    )
    .unwrap();
    std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem()).unwrap();
}

/// undici from the npm registry, installed once into `target/clients-e2e/` (the root
/// namespace has the registry; the agent namespace only loads the files).
fn undici() -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/clients-e2e");
    let module = dir.join("node_modules/undici");
    let stamp = dir.join(UNDICI);
    if !stamp.exists() {
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("timeout")
            .args([
                "300",
                "npm",
                "install",
                "--no-audit",
                "--no-fund",
                "--prefix",
            ])
            .arg(&dir)
            .arg(UNDICI)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "npm install {UNDICI}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(&stamp, "").unwrap();
    }
    module.display().to_string()
}

/// One origin: `origin.py serve` on `INTERNET:port`, TLS when `tls`; waits until it accepts.
async fn origin(root: &Path, pki: &Path, port: u16, tls: bool, log: &Path) -> Killed {
    let mut cmd = Command::new("python3");
    cmd.arg(e2e("origin.py"))
        .args(["serve", INTERNET, &port.to_string()])
        .arg(root)
        .arg(log);
    if tls {
        cmd.arg(pki.join("leaf.pem")).arg(pki.join("key.pem"));
    }
    let child = Killed(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr: SocketAddr = format!("{INTERNET}:{port}").parse().unwrap();
    let up = eventually(Duration::from_secs(10), || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    })
    .await;
    assert!(up, "the origin on {addr} did not come up");
    child
}

/// What a client printed (stdout and stderr together) and whether it exited 0.
struct Fetch {
    ok: bool,
    text: String,
}

/// Run `cmd` in the agent namespace in a fresh directory under `work` (the client's HOME:
/// no user config, no cache), with the proxy variables of `mode` and the test CA trusted
/// through each client's variable.
async fn fetch(topo: &Topology, work: &Path, pki: &Path, mode: Mode, cmd: &str) -> Fetch {
    let home = tempfile::tempdir_in(work).unwrap().keep();
    let ca = pki.join("ca.pem");
    let proxy = match mode {
        Mode::Explicit => {
            let p = format!("http://{GW_AGENT_SIDE}:3128");
            format!("http_proxy={p} https_proxy={p} HTTP_PROXY={p} HTTPS_PROXY={p}")
        }
        Mode::Transparent => String::new(),
    };
    let o = run(in_ns(
        &topo.agent_ns,
        &format!(
            "cd {h} && env -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY -u ALL_PROXY \
             -u all_proxy -u no_proxy -u NO_PROXY HOME={h} SSL_CERT_FILE={ca} \
             REQUESTS_CA_BUNDLE={ca} GIT_SSL_CAINFO={ca} NODE_EXTRA_CA_CERTS={ca} \
             UNDICI={u} {proxy} sh -c '{c}' 2>&1",
            h = home.display(),
            ca = ca.display(),
            u = undici(),
            c = cmd.replace('\'', "'\\''"),
        ),
    ))
    .await;
    Fetch {
        ok: o.status.success(),
        text: String::from_utf8_lossy(&o.stdout).into_owned(),
    }
}

/// One client: the command for a URL's host, and what its denied fetch must print in each
/// mode (case-insensitive).
struct Client {
    name: &'static str,
    /// The command; `{host}` is replaced by the name to fetch from.
    cmd: String,
    /// What the allowed fetch prints.
    ok_needle: &'static str,
    explicit_denied: &'static [&'static str],
    transparent_denied: &'static [&'static str],
    /// The destination port the fetch's connections go to.
    port: u16,
    /// Only meaningful through the explicit proxy (`curl -p`).
    explicit_only: bool,
}

/// What the transparent listener does with a refused TLS hello: the alert.
const ALERT: &[&str] = &["access denied"];
const ALERT_CODE: &[&str] = &["ACCESS_DENIED"];
/// A refused plain-HTTP request (both modes): the status and the reason header.
const HTTP_403: &[&str] = &["403", "x-portcullis-reason: not_allowed"];
/// A refusal only the status line can carry (the client shows no header): the reason
/// phrase must name it (`403 Forbidden (not_allowed)`).
const STATUS_LINE: &[&str] = &["403", "not_allowed"];

fn clients(work: &Path) -> Vec<Client> {
    let ca = "$SSL_CERT_FILE";
    let apt = work.join("apt");
    vec![
        Client {
            name: "curl https",
            cmd: format!("curl -sS -v --max-time 10 --cacert {ca} https://{{host}}/hello.txt"),
            ok_needle: BODY,
            explicit_denied: HTTP_403,
            transparent_denied: ALERT,
            port: 443,
            explicit_only: false,
        },
        Client {
            name: "curl http",
            cmd: "curl -sS -i --fail-with-body --max-time 10 http://{host}/hello.txt".into(),
            ok_needle: BODY,
            explicit_denied: HTTP_403,
            transparent_denied: HTTP_403,
            port: 80,
            explicit_only: false,
        },
        Client {
            name: "curl -p http",
            cmd: "curl -sS -v -p --fail-with-body --max-time 10 http://{host}/hello.txt".into(),
            ok_needle: BODY,
            explicit_denied: HTTP_403,
            transparent_denied: &[],
            port: 80,
            explicit_only: true,
        },
        Client {
            name: "wget https",
            cmd: format!(
                "wget -S --tries=1 --timeout=10 --ca-certificate={ca} -O- https://{{host}}/hello.txt"
            ),
            ok_needle: BODY,
            // wget prints the refused CONNECT's reason phrase, not its status code.
            explicit_denied: &["Proxy tunneling failed", "not_allowed"],
            transparent_denied: &["access"],
            port: 443,
            explicit_only: false,
        },
        Client {
            name: "python urllib",
            cmd: format!(
                "python3 {} urllib https://{{host}}/hello.txt",
                e2e("fetch.py")
            ),
            ok_needle: BODY,
            explicit_denied: STATUS_LINE,
            transparent_denied: ALERT_CODE,
            port: 443,
            explicit_only: false,
        },
        Client {
            name: "python requests",
            cmd: format!(
                "python3 {} requests https://{{host}}/hello.txt",
                e2e("fetch.py")
            ),
            ok_needle: BODY,
            explicit_denied: STATUS_LINE,
            transparent_denied: ALERT_CODE,
            port: 443,
            explicit_only: false,
        },
        Client {
            // pip says why an index page failed only with -vv (by default: "No matching
            // distribution found"; with -v, nothing more).
            name: "pip",
            cmd: format!(
                "python3 -m pip -vv --isolated download --no-cache-dir --retries 0 --timeout 10 \
                 --no-deps --cert {ca} -d dl --index-url https://{{host}}/simple demo-pkg"
            ),
            ok_needle: "Successfully downloaded demo-pkg",
            explicit_denied: STATUS_LINE,
            transparent_denied: ALERT_CODE,
            port: 443,
            explicit_only: false,
        },
        Client {
            name: "npm",
            cmd: format!(
                "npm install --no-audit --no-fund --no-update-notifier --fetch-retries=0 \
                 --cache ./npm-cache --cafile {ca} --registry https://{{host}}/npm/ demo-pkg \
                 && cat node_modules/demo-pkg/package.json"
            ),
            ok_needle: "\"version\": \"1.0.0\"",
            explicit_denied: STATUS_LINE,
            transparent_denied: ALERT_CODE,
            port: 443,
            explicit_only: false,
        },
        Client {
            name: "git clone",
            // GIT_CURL_VERBOSE: git shows the proxy's answer (and its reason header) only so;
            // by default it prints "CONNECT tunnel failed, response 403".
            cmd: "GIT_CURL_VERBOSE=1 git clone -q https://{host}/git/repo.git r && cat r/README"
                .into(),
            ok_needle: "cloned through portcullis",
            explicit_denied: HTTP_403,
            transparent_denied: &["denied"],
            port: 443,
            explicit_only: false,
        },
        Client {
            name: "node undici https",
            cmd: format!("node {} https://{{host}}/hello.txt", e2e("undici_fetch.js")),
            ok_needle: BODY,
            // undici reports a refused CONNECT as "Proxy response (403) !== 200 when HTTP
            // Tunneling" (the innermost cause of "fetch failed"), the reason phrase and headers
            // dropped: the status is all it can show.
            explicit_denied: &["Proxy response (403)"],
            transparent_denied: ALERT_CODE,
            port: 443,
            explicit_only: false,
        },
        Client {
            name: "node undici http",
            cmd: format!("node {} http://{{host}}/hello.txt", e2e("undici_fetch.js")),
            ok_needle: BODY,
            explicit_denied: &["Proxy response (403)"],
            transparent_denied: &["status 403 reason=not_allowed"],
            port: 80,
            explicit_only: false,
        },
        Client {
            name: "apt",
            cmd: format!(
                "sed s/HOST/{{host}}/ {apt}/sources.template > sources.list && \
                 mkdir -p state/lists/partial cache/archives/partial && : > status && \
                 APT_CONFIG={apt}/apt.conf apt-get -q -o Debug::Acquire::http=true \
                 -o Dir::Etc::SourceList=$PWD/sources.list -o Dir::State=$PWD/state \
                 -o Dir::State::status=$PWD/status -o Dir::Cache=$PWD/cache $APT_PROXY update \
                 && APT_CONFIG={apt}/apt.conf apt-get -q -o Dir::Etc::SourceList=$PWD/sources.list \
                 -o Dir::State=$PWD/state -o Dir::State::status=$PWD/status \
                 -o Dir::Cache=$PWD/cache $APT_PROXY download demo-pkg && ls demo-pkg_1.0_all.deb",
                apt = apt.display()
            ),
            ok_needle: "demo-pkg_1.0_all.deb",
            explicit_denied: HTTP_403,
            transparent_denied: HTTP_403,
            port: 80,
            explicit_only: false,
        },
    ]
}

/// The apt configuration every apt run shares: nothing from the host's /etc/apt, root as
/// the sandbox user (the test's files are root's), no locks.
fn write_apt_conf(work: &Path) {
    let apt = work.join("apt");
    std::fs::create_dir_all(apt.join("none")).unwrap();
    let none = apt.join("none").display().to_string();
    std::fs::write(
        apt.join("apt.conf"),
        format!(
            "Dir::Etc::SourceParts \"{none}\";\nDir::Etc::Parts \"{none}\";\n\
             Dir::Etc::Preferences \"{none}/p\";\nDir::Etc::PreferencesParts \"{none}\";\n\
             Dir::Etc::Trusted \"{none}/t\";\nDir::Etc::TrustedParts \"{none}\";\n\
             APT::Sandbox::User \"root\";\nDebug::NoLocking \"true\";\n"
        ),
    )
    .unwrap();
    std::fs::write(
        apt.join("sources.template"),
        "deb [trusted=yes] http://HOST/apt ./\n",
    )
    .unwrap();
}

/// Whether `lines` (one fetch's connection lines) are right for `mode`: at least one, each
/// naming the agent, the mode, `host` and `port`; allowed: every verdict `allow`; denied:
/// every verdict `deny` with `not_allowed`.
fn check_lines(
    lines: &[serde_json::Value],
    mode: Mode,
    host: &str,
    port: u16,
    allowed: bool,
) -> Result<(), String> {
    if lines.is_empty() {
        return Err("no log line".into());
    }
    for l in lines {
        let ok = l["agent.name"] == "coder-1"
            && l["source.ip"] == AGENT_IP
            && l["portcullis.mode"] == mode.name()
            && l["destination.domain"] == host
            && l["destination.port"] == port
            && if allowed {
                l["event.action"] == "allow" && l.get("event.reason").is_none()
            } else {
                l["event.action"] == "deny" && l["event.reason"] == "not_allowed"
            };
        if !ok {
            return Err(format!("wrong line: {l}"));
        }
    }
    Ok(())
}

fn contains_all(text: &str, needles: &[&str]) -> Result<(), String> {
    let lower = text.to_ascii_lowercase();
    match needles
        .iter()
        .find(|n| !lower.contains(&n.to_ascii_lowercase()))
    {
        Some(n) => Err(format!("no {n:?} in the output")),
        None => Ok(()),
    }
}

/// The last 25 lines of a client's output, for the failure table.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n      ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_through_both_modes() {
    let topo = Topology::new();
    let dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let pki = w.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    write_pki(&pki, &[ALLOWED, DENIED]);
    let root = w.join("origin");
    let built = run(format!(
        "python3 {} fixtures {} https://{ALLOWED}",
        e2e("origin.py"),
        root.display()
    ))
    .await;
    assert!(built.status.success(), "fixtures: {built:?}");
    write_apt_conf(w);
    let origin_log = w.join("origin.log");
    let _https = origin(&root, &pki, 443, true, &origin_log).await;
    let _http = origin(&root, &pki, 80, false, &origin_log).await;
    let ip = |a: &str, p: u16| -> SocketAddr { format!("{a}:{p}").parse().unwrap() };
    let _dns = dns_server(ip(INTERNET, 53), &[(ALLOWED, INTERNET), (DENIED, INTERNET)]).await;
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

    let mut failures = Vec::new();
    let mut rows = 0;
    for mode in [Mode::Explicit, Mode::Transparent] {
        for client in clients(w) {
            if client.explicit_only && mode == Mode::Transparent {
                continue;
            }
            let apt_proxy = match mode {
                Mode::Explicit => format!("-o Acquire::http::Proxy=http://{GW_AGENT_SIDE}:3128"),
                Mode::Transparent => String::new(),
            };
            for (host, allowed) in [(ALLOWED, true), (DENIED, false)] {
                rows += 1;
                let cmd = client
                    .cmd
                    .replace("{host}", host)
                    .replace("$APT_PROXY", &apt_proxy);
                let before = gw.settled_lines().await.len();
                let origin_before = std::fs::read_to_string(&origin_log).unwrap_or_default();
                let f = fetch(&topo, w, &pki, mode, &cmd).await;
                let lines: Vec<serde_json::Value> = gw
                    .settled_lines()
                    .await
                    .into_iter()
                    .skip(before)
                    .filter(|l| l["portcullis.mode"] != "dns")
                    .collect();
                let origin_now = std::fs::read_to_string(&origin_log).unwrap_or_default();
                let reached = origin_now[origin_before.len()..].to_owned();
                let verdict = if allowed {
                    if !f.ok {
                        Err("the allowed fetch failed".to_owned())
                    } else {
                        contains_all(&f.text, &[client.ok_needle])
                    }
                } else if f.ok {
                    Err("the denied fetch succeeded".to_owned())
                } else if f.text.contains(BODY) {
                    Err("the denied fetch printed the origin's bytes".to_owned())
                } else if reached.to_ascii_lowercase().contains(DENIED) {
                    Err(format!("the origin saw the denied name: {reached}"))
                } else {
                    contains_all(
                        &f.text,
                        match mode {
                            Mode::Explicit => client.explicit_denied,
                            Mode::Transparent => client.transparent_denied,
                        },
                    )
                }
                .and_then(|()| check_lines(&lines, mode, host, client.port, allowed));
                if let Err(why) = verdict {
                    failures.push(format!(
                        "{:<11} {:<17} {:<7} {why}\n      {}",
                        mode.name(),
                        client.name,
                        if allowed { "allowed" } else { "denied" },
                        tail(&f.text)
                    ));
                }
            }
        }
    }
    drop(gw);
    let mut report = String::new();
    for f in &failures {
        writeln!(report, "{f}").unwrap();
    }
    assert!(
        failures.is_empty(),
        "{} of {rows} rows failed:\n{report}",
        failures.len()
    );
}
