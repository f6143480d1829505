//! A gateway pair on loopback (two in-process gateways, each the other's `[cluster]` peer):
//! kill state travels only as the original signed requests, each node verifies them itself,
//! a node that missed a kill comes up killed, revive needs the signature and TOTP and reaches
//! both, a node that cannot confirm a revive refuses it, and forged relays are refused and
//! counted. The keepalived failover itself is tests/ha_pair_e2e.rs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use portcullis::cluster::{ClusterSettings, Peer};
use portcullis::config::Config;
use portcullis::killswitch::totp::{TotpSecret, code_at};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const OTHER_WHSEC: &str = "whsec_b3RoZXIta2V5LW5vdC1vbi10aGUtZ2F0ZXdheXM=";

fn agent(port: u16) -> String {
    format!(
        "name = \"coder-1\"\nsources = [\"127.0.0.0/8\"]\nallow = [\"allowed.test:{port}\"]\nallow_cidrs = [\"127.0.0.1/32:{port}\"]\n"
    )
}

fn code(at: i64) -> String {
    code_at(
        &TotpSecret::from_base32(KILL_SWITCH_TOTP).unwrap(),
        at as u64,
    )
}

fn wrong_code(at: i64) -> String {
    let valid = [code(at - 30), code(at), code(at + 30)];
    (0..)
        .map(|k| format!("{:06}", (k * 104_729 + 17) % 1_000_000))
        .find(|c| !valid.contains(c))
        .unwrap()
}

fn settings(node: &str, peer: SocketAddr, sync_timeout: Duration) -> ClusterSettings {
    ClusterSettings {
        node: node.into(),
        peers: vec![Peer {
            url: format!("http://{peer}"),
            addr: peer,
        }],
        sync_timeout,
        sync_interval: Duration::from_millis(300),
        confirm_timeout: Duration::from_secs(1),
        ..ClusterSettings::default()
    }
}

/// One node: a gateway in `dir` with the kill-switch keys, its admin on `admin`, `peer` as
/// its peer.
async fn node(
    dir: &Path,
    name: &str,
    admin: SocketAddr,
    peer: SocketAddr,
    upstream_port: u16,
    sync_timeout: Duration,
) -> TestGateway {
    std::fs::create_dir_all(dir).unwrap();
    let agent = agent(upstream_port);
    let (running, log_path) = start_in(
        dir,
        &[("coder-1", agent.as_str())],
        &[],
        localhost_resolver(&["allowed.test"]),
        |c: &mut Config, d: &Path| {
            with_kill_switch_secrets(c, d);
            c.listen.admin = Some(admin);
            c.cluster = settings(name, peer, sync_timeout);
        },
    )
    .await;
    TestGateway {
        proxy: running.explicit_addr.unwrap(),
        admin: running.admin_addr.unwrap(),
        running: Some(running),
        log_path,
        dir: tempfile::tempdir().unwrap(),
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

static IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn fresh_id(what: &str) -> String {
    format!(
        "{what}_{}_{}",
        std::process::id(),
        IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

async fn signed(admin: SocketAddr, key: &str, path: &str, body: &str) -> (u16, String) {
    let h = signed_headers(key, &fresh_id("req"), now(), body);
    admin_request(admin, "POST", path, &h, body.as_bytes()).await
}

async fn status(admin: SocketAddr) -> serde_json::Value {
    let (code, body) = admin_request(admin, "GET", "/v1/status", &[], b"").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

async fn killed_all(admin: SocketAddr) -> bool {
    !status(admin).await["all"].is_null()
}

/// Poll `f` every 50 ms for at most `within`.
async fn until<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metric(admin: SocketAddr, series: &str) -> u64 {
    let text = admin_request(admin, "GET", "/metrics", &[], b"").await.1;
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .map_or(0, |v| v.trim().parse().unwrap())
}

async fn control(state_dir: &Path, request: serde_json::Value) -> (u16, serde_json::Value) {
    let mut s = tokio::net::UnixStream::connect(state_dir.join("control.sock"))
        .await
        .unwrap();
    s.write_all(format!("{request}\n").as_bytes())
        .await
        .unwrap();
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        BufReader::new(s).read_line(&mut line),
    )
    .await
    .unwrap()
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    (v["status"].as_u64().unwrap() as u16, v["body"].clone())
}

/// Can the agent open a tunnel through `proxy` now?
async fn serves(proxy: SocketAddr, port: u16) -> bool {
    open_tunnel(proxy, "allowed.test", port).await.is_ok()
}

struct Pair {
    root: tempfile::TempDir,
    admin_a: SocketAddr,
    admin_b: SocketAddr,
    port: u16,
    _upstream: TestUpstream,
}

impl Pair {
    async fn new() -> Pair {
        let upstream = http_upstream("origin").await;
        Pair {
            root: tempfile::tempdir().unwrap(),
            admin_a: loopback(),
            admin_b: loopback(),
            port: upstream.addr.port(),
            _upstream: upstream,
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    async fn a(&self) -> TestGateway {
        node(
            &self.dir("a"),
            "a",
            self.admin_a,
            self.admin_b,
            self.port,
            Duration::from_secs(2),
        )
        .await
    }

    async fn b(&self) -> TestGateway {
        node(
            &self.dir("b"),
            "b",
            self.admin_b,
            self.admin_a,
            self.port,
            Duration::from_secs(2),
        )
        .await
    }
}

/// Kill through A: B is killed too (relayed, verified there), and its log says from whom.
/// Revive through A with a wrong code: refused on both, counted on both. With the right
/// code: both reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kill_reaches_the_peer_and_a_revive_needs_the_code_and_reaches_both() {
    let pair = Pair::new().await;
    let (a, b) = tokio::join!(pair.a(), pair.b());
    assert!(
        until(Duration::from_secs(5), || async {
            serves(a.proxy, pair.port).await && serves(b.proxy, pair.port).await
        })
        .await,
        "both nodes serve once synced"
    );

    let t0 = Instant::now();
    let (code_, body) = signed(
        a.admin,
        KILL_SWITCH_WHSEC,
        "/v1/kill",
        r#"{"scope":"all","reason":"pair test"}"#,
    )
    .await;
    assert_eq!(code_, 200, "{body}");
    assert!(
        until(Duration::from_secs(3), || killed_all(b.admin)).await,
        "the kill reached B"
    );
    let relayed_in = t0.elapsed();
    assert!(!serves(b.proxy, pair.port).await);
    assert_eq!(status(b.admin).await["all"]["reason"], "pair test");

    // Wrong code: refused by A and by B (B checked it itself, and counted it).
    let failures_b = metric(
        b.admin,
        "portcullis_kill_switch_auth_failures_total{reason=\"totp_invalid\"} ",
    )
    .await;
    let body = format!(r#"{{"scope":"all","totp":"{}"}}"#, wrong_code(now()));
    let (code_, text) = signed(a.admin, KILL_SWITCH_WHSEC, "/v1/revive", &body).await;
    assert_eq!(code_, 401, "{text}");
    assert!(killed_all(a.admin).await && killed_all(b.admin).await);
    assert_eq!(
        metric(
            b.admin,
            "portcullis_kill_switch_auth_failures_total{reason=\"totp_invalid\"} "
        )
        .await,
        failures_b + 1,
        "B counted the forwarded wrong code"
    );

    let body = format!(r#"{{"scope":"all","totp":"{}"}}"#, code(now()));
    let (code_, text) = signed(a.admin, KILL_SWITCH_WHSEC, "/v1/revive", &body).await;
    assert_eq!(code_, 200, "{text}");
    assert!(!killed_all(a.admin).await);
    assert!(
        !killed_all(b.admin).await,
        "confirmed by B before A reopened"
    );
    assert!(serves(a.proxy, pair.port).await && serves(b.proxy, pair.port).await);
    // A valid relayed revive is not a failure on B.
    assert_eq!(
        metric(
            b.admin,
            "portcullis_kill_switch_auth_failures_total{reason=\"totp_invalid\"} "
        )
        .await,
        failures_b + 1
    );
    // Each node shows the other's view.
    let s = status(a.admin).await;
    let peer = &s["cluster"]["peers"][format!("http://{}", pair.admin_b)];
    assert_eq!(peer["node"], "b", "{s}");
    assert_eq!(peer["reachable"], true, "{s}");
    eprintln!("kill relayed A -> B in {relayed_in:?}");
    tokio::join!(a.stop(), b.stop());
}

/// No state moves on an unsigned word: unsigned, wrongly signed, tampered and stale relays
/// are refused (401) and counted; a relayed revive with a wrong code is refused and counted
/// as a failed attempt; a replayed relay is idempotent; a captured revive replayed after a
/// later kill changes nothing; the sync call is signed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_relays_to_a_peer_endpoint_are_refused() {
    let pair = Pair::new().await;
    let b = pair.b().await; // A never runs: every call here is the attacker's.
    assert!(until(Duration::from_secs(5), || serves(b.proxy, pair.port)).await);
    let sig_invalid = "portcullis_kill_switch_auth_failures_total{reason=\"signature_invalid\"} ";
    let before = metric(b.admin, sig_invalid).await;
    let kill = r#"{"scope":"all","reason":"forged"}"#;
    let ts = now();

    // Unsigned.
    let (c, _) = admin_request(b.admin, "POST", "/v1/cluster/kill", &[], kill.as_bytes()).await;
    assert_eq!(c, 401);
    // Signed with a key B does not hold.
    let (c, _) = signed(b.admin, OTHER_WHSEC, "/v1/cluster/kill", kill).await;
    assert_eq!(c, 401);
    // Signed, then the body changed.
    let h = signed_headers(KILL_SWITCH_WHSEC, &fresh_id("t"), ts, kill);
    let tampered = r#"{"scope":"all","reason":"forgeD"}"#;
    let (c, _) = admin_request(b.admin, "POST", "/v1/cluster/kill", &h, tampered.as_bytes()).await;
    assert_eq!(c, 401);
    // A revive signed with a foreign key, carrying the right code.
    let revive_ok = format!(r#"{{"scope":"all","totp":"{}"}}"#, code(ts));
    let (c, _) = signed(b.admin, OTHER_WHSEC, "/v1/cluster/revive", &revive_ok).await;
    assert_eq!(c, 401);
    // The sync call is signed too.
    let (c, _) = admin_request(b.admin, "POST", "/v1/cluster/sync", &[], b"{}").await;
    assert_eq!(c, 401);
    assert_eq!(metric(b.admin, sig_invalid).await, before + 5);
    // Older than the age bound (7 days by default).
    let old = ts - 8 * 24 * 3600;
    let h = signed_headers(KILL_SWITCH_WHSEC, &fresh_id("old"), old, kill);
    let (c, _) = admin_request(b.admin, "POST", "/v1/cluster/kill", &h, kill.as_bytes()).await;
    assert_eq!(c, 401);
    assert!(!killed_all(b.admin).await, "nothing forged took effect");
    assert!(serves(b.proxy, pair.port).await);

    // A genuine kill, relayed: applied; relayed again (a replay): known, nothing more.
    let h = signed_headers(KILL_SWITCH_WHSEC, "genuine-kill", ts - 10, kill);
    let (c, body) = admin_request(b.admin, "POST", "/v1/cluster/kill", &h, kill.as_bytes()).await;
    assert_eq!((c, body.contains("applied")), (200, true), "{body}");
    let (c, body) = admin_request(b.admin, "POST", "/v1/cluster/kill", &h, kill.as_bytes()).await;
    assert_eq!((c, body.contains("known")), (200, true), "{body}");
    // The same request sent directly is a replay now (shared anti-replay).
    let (c, _) = admin_request(b.admin, "POST", "/v1/kill", &h, kill.as_bytes()).await;
    assert_eq!(c, 401);

    // A relayed revive with a wrong code: refused and counted as a failed attempt.
    let totp_invalid = "portcullis_kill_switch_auth_failures_total{reason=\"totp_invalid\"} ";
    let failures = metric(b.admin, totp_invalid).await;
    let wrong = format!(r#"{{"scope":"all","totp":"{}"}}"#, wrong_code(ts));
    let (c, _) = signed(b.admin, KILL_SWITCH_WHSEC, "/v1/cluster/revive", &wrong).await;
    assert_eq!(c, 401);
    assert_eq!(metric(b.admin, totp_invalid).await, failures + 1);
    let s = status(b.admin).await;
    assert!(killed_all(b.admin).await, "{s}");

    // A genuine revive (signed after the kill): reopens; not counted.
    let revive = format!(r#"{{"scope":"all","totp":"{}"}}"#, code(ts - 5));
    let rh = signed_headers(KILL_SWITCH_WHSEC, "genuine-revive", ts - 5, &revive);
    let (c, body) = admin_request(
        b.admin,
        "POST",
        "/v1/cluster/revive",
        &rh,
        revive.as_bytes(),
    )
    .await;
    assert_eq!(c, 200, "{body}");
    assert!(!killed_all(b.admin).await);
    assert_eq!(metric(b.admin, totp_invalid).await, failures + 1);

    // A kill dated before that revive (kills always apply), then the same code in another
    // request under a fresh id: its step is spent here, it opens nothing and is not
    // counted. The captured revive itself, replayed: known.
    let kb = signed_headers(KILL_SWITCH_WHSEC, "kill-before", ts - 8, kill);
    let (c, body) = admin_request(b.admin, "POST", "/v1/cluster/kill", &kb, kill.as_bytes()).await;
    assert_eq!((c, body.contains("applied")), (200, true), "{body}");
    let reused = format!(
        r#"{{"scope":"all","reason":"reused","totp":"{}"}}"#,
        code(ts - 5)
    );
    let rh2 = signed_headers(KILL_SWITCH_WHSEC, "spent-code", ts - 5, &reused);
    let (c, body) = admin_request(
        b.admin,
        "POST",
        "/v1/cluster/revive",
        &rh2,
        reused.as_bytes(),
    )
    .await;
    assert_eq!((c, body.contains("no_effect")), (200, true), "{body}");
    let (c, body) = admin_request(
        b.admin,
        "POST",
        "/v1/cluster/revive",
        &rh,
        revive.as_bytes(),
    )
    .await;
    assert_eq!((c, body.contains("known")), (200, true), "{body}");
    assert!(killed_all(b.admin).await);
    assert_eq!(metric(b.admin, totp_invalid).await, failures + 1);

    // A later kill, then a revive signed before it with an unspent code: the later kill
    // stands (last signed event wins).
    let kl = signed_headers(KILL_SWITCH_WHSEC, "kill-later", ts + 55, kill);
    let (c, _) = admin_request(b.admin, "POST", "/v1/cluster/kill", &kl, kill.as_bytes()).await;
    assert_eq!(c, 200);
    let earlier = format!(r#"{{"scope":"all","totp":"{}"}}"#, code(ts + 50));
    let rh3 = signed_headers(KILL_SWITCH_WHSEC, "revive-before-kill", ts + 50, &earlier);
    let (c, body) = admin_request(
        b.admin,
        "POST",
        "/v1/cluster/revive",
        &rh3,
        earlier.as_bytes(),
    )
    .await;
    assert_eq!((c, body.contains("no_effect")), (200, true), "{body}");
    assert!(
        killed_all(b.admin).await,
        "a revive signed before the kill undoes nothing"
    );
    assert!(!serves(b.proxy, pair.port).await);

    // A revive older than the webhook window is refused (stale), whatever its code.
    let old_revive = format!(r#"{{"scope":"all","totp":"{}"}}"#, code(ts - 400));
    let ro = signed_headers(KILL_SWITCH_WHSEC, "old-revive", ts - 400, &old_revive);
    let (c, _) = admin_request(
        b.admin,
        "POST",
        "/v1/cluster/revive",
        &ro,
        old_revive.as_bytes(),
    )
    .await;
    assert_eq!(c, 401);
    assert!(killed_all(b.admin).await);
    b.stop().await;
}

/// Kill through A while B is down; B starts: it refuses agents until synced, and comes up
/// killed. Then, B down again, A's operator revives on the gateway (the control socket does
/// not wait for peers); B starts again: it comes up revived. A's network revive while B is
/// down is refused (it cannot be confirmed) and A stays killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_missed_a_kill_comes_up_killed_and_a_revive_it_missed_reopens_it() {
    let pair = Pair::new().await;
    let a = pair.a().await;
    // B is down: A serves after its start-up timeout (2 s), with what it knows.
    assert!(until(Duration::from_secs(5), || serves(a.proxy, pair.port)).await);
    let (c, body) = signed(
        a.admin,
        KILL_SWITCH_WHSEC,
        "/v1/kill",
        r#"{"scope":"all","reason":"while b was down"}"#,
    )
    .await;
    assert_eq!(c, 200, "{body}");

    let b = pair.b().await;
    // From its first moment, B refuses agents (held until synced), then it is killed.
    assert!(!serves(b.proxy, pair.port).await);
    assert!(until(Duration::from_secs(5), || killed_all(b.admin)).await);
    assert!(
        until(Duration::from_secs(5), || async {
            status(b.admin).await["cluster"]["synced"] == true
        })
        .await
    );
    assert!(!serves(b.proxy, pair.port).await, "B came up killed");
    b.stop().await;

    // Network revive with B down: not confirmed, refused, A still killed.
    let body = format!(r#"{{"scope":"all","totp":"{}"}}"#, code(now()));
    let (c, text) = signed(a.admin, KILL_SWITCH_WHSEC, "/v1/revive", &body).await;
    assert_eq!(c, 503, "{text}");
    assert!(text.contains("not confirmed"), "{text}");
    assert!(killed_all(a.admin).await);
    assert!(!serves(a.proxy, pair.port).await);

    // The operator on A overrides (control socket, still the TOTP code). Next step's code:
    // the network attempt above spent nothing, but keep clear of the same step anyway.
    let t = now();
    let (c, body) = control(
        &pair.dir("a").join("state"),
        serde_json::json!({"op": "revive", "totp": code(t)}),
    )
    .await;
    assert_eq!(c, 200, "{body}");
    assert!(serves(a.proxy, pair.port).await);
    let b = pair.b().await;
    assert!(
        until(Duration::from_secs(5), || async {
            !killed_all(b.admin).await && serves(b.proxy, pair.port).await
        })
        .await,
        "the revive B missed reached it at start-up: {}",
        status(b.admin).await
    );
    tokio::join!(a.stop(), b.stop());
}

/// A node that cannot reach its peer at start-up refuses agents until the sync timeout
/// passes. Then it serves with what it knows, unless the peer, when last reached, had newer
/// events than this node has, or this node's event store is unreadable: then it starts
/// killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_peer_that_knew_more_makes_a_node_start_killed() {
    let pair = Pair::new().await;
    let newer = serde_json::json!({
        "events": [],
        "peers_latest": { format!("http://{}", pair.admin_a): now() - 60 },
    })
    .to_string();
    for (case, store, killed) in [
        ("nothing known", None, false),
        ("peer knew newer events", Some(newer.as_str()), true),
        ("store unreadable", Some("{not json"), true),
    ] {
        let dir = pair.dir(&format!("b-{}", case.replace(' ', "-")));
        let state = dir.join("state");
        std::fs::create_dir_all(&state).unwrap();
        if let Some(store) = store {
            std::fs::write(state.join("cluster.json"), store).unwrap();
        }
        let started = Instant::now();
        let b = node(
            &dir,
            "b",
            pair.admin_b,
            pair.admin_a,
            pair.port,
            Duration::from_secs(2),
        )
        .await;
        assert!(
            !serves(b.proxy, pair.port).await,
            "{case}: held while syncing"
        );
        assert!(
            until(Duration::from_secs(6), || async {
                status(b.admin).await["cluster"]["synced"] == true
            })
            .await,
            "{case}"
        );
        let held_for = started.elapsed();
        assert!(
            held_for >= Duration::from_millis(1_900),
            "{case}: {held_for:?}"
        );
        let s = status(b.admin).await;
        assert_eq!(!s["all"].is_null(), killed, "{case}: {s}");
        if killed {
            assert!(
                s["all"]["reason"].as_str().unwrap().contains("unreachable"),
                "{s}"
            );
        }
        assert_eq!(serves(b.proxy, pair.port).await, !killed, "{case}");
        b.stop().await;
    }
}

/// A node whose reload failed is visible: `/healthz` degraded, the metric at 1, until a
/// good reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reload_is_visible_in_health_and_metrics() {
    let upstream = http_upstream("x").await;
    let agent = agent(upstream.addr.port());
    let gw = gateway(
        &[("coder-1", agent.as_str())],
        &[],
        localhost_resolver(&["allowed.test"]),
    )
    .await;
    let failed = "portcullis_policy_reload_failed ";
    assert_eq!(metric(gw.admin, failed).await, 0);
    let file = gw.dir.path().join("rules/agents/coder-1.toml");
    std::fs::write(&file, "name = \"coder-1\"\nallow = [\"no closing quote]\n").unwrap();
    let (c, _) = signed_reload(gw.admin).await;
    assert_eq!(c, 422);
    let (_, health) = admin_request(gw.admin, "GET", "/healthz", &[], b"").await;
    assert!(
        health.contains("\"degraded\"") && health.contains("reload"),
        "{health}"
    );
    assert_eq!(metric(gw.admin, failed).await, 1);
    std::fs::write(&file, &agent).unwrap();
    let (c, _) = signed_reload(gw.admin).await;
    assert_eq!(c, 200);
    assert_eq!(metric(gw.admin, failed).await, 0);
    gw.stop().await;
}
