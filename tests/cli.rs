//! The `portcullis` binary's `check` and `explain` commands, run as a user would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

fn portcullis(args: &[&str], cwd: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_passes_on_the_shipped_rules_and_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (code, stdout, stderr) = portcullis(&["check"], root);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("agent example-agent"), "{stdout}");
    let (code, stdout, stderr) = portcullis(&["--config", "deploy/portcullis.toml", "check"], root);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let empty = tempfile::tempdir().unwrap();
    let (code, _, stderr) = portcullis(&["check"], empty.path());
    assert_eq!(code, 1);
    assert!(stderr.contains("rules directory not found"), "{stderr}");
}

fn rules_with_agent(text: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rules/agents")).unwrap();
    std::fs::create_dir_all(dir.path().join("rules/lists")).unwrap();
    std::fs::write(dir.path().join("rules/agents/bad.toml"), text).unwrap();
    dir
}

#[test]
fn check_names_file_line_and_key_of_each_error() {
    let cases = [
        (
            "name = \"a\"\nallow = [\"x.test\"]\nalow = [\"y.test\"]\n",
            3,
            "alow",
        ),
        (
            "name = \"a\"\n\nallow = [\n  \"ok.test\",\n  \"a.*.test\",\n]\n",
            5,
            "allow",
        ),
        ("name = \"a\"\nallow = [\"*.com\"]\n", 2, "allow"),
        ("name = \"a\"\nallow = [\"*.co.uk\"]\n", 2, "allow"),
        ("name = \"a\"\ninclude = [\"nope\"]\n", 2, "include"),
        ("name = \"a\"\nsources = [\"10.0.0.1/8\"]\n", 2, "sources"),
        (
            "name = \"a\"\nsources = [\n  \"10.0.0.2\",\n  { net = \"10.0.0.1\", mac = \"02:00:00:00:00\" },\n]\n",
            4,
            "sources.mac",
        ),
        (
            "name = \"a\"\n[[sources]]\nnet = \"10.0.0.1\"\ninterface = \"\"\n",
            4,
            "sources.interface",
        ),
        (
            "name = \"a\"\n[limits]\nbandwidth = \"fast\"\n",
            3,
            "limits.bandwidth",
        ),
        ("name = \"a\"\n[limits]\nspeed = 3\n", 3, "speed"),
    ];
    for (text, line, key) in cases {
        let dir = rules_with_agent(text);
        let (code, stdout, stderr) = portcullis(&["check"], dir.path());
        assert_eq!(code, 1, "{text:?} passed check: {stdout}");
        let expected = format!("rules/agents/bad.toml:{line}: key `{key}`");
        assert!(
            stderr.contains(&expected),
            "{text:?}: expected `{expected}` in: {stderr}"
        );
    }
}

/// A config file with several mistakes: `check` names each at its own line and key, the
/// unknown key and the bad enum value included, and fails.
#[test]
fn check_reports_every_config_error_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rules/agents")).unwrap();
    let config = dir.path().join("portcullis.toml");
    std::fs::write(
        &config,
        "# idle_secs and connect_ms are timeouts\n\
         [listen]\n\
         explicit = \"127.0.0.1:3128\"\n\
         [timeouts]\n\
         idle_secs = 30\n\
         connect_ms = 0\n\
         [transparent]\n\
         interception = \"nat\"\n\
         [caps]\n\
         max_conections = 10\n",
    )
    .unwrap();
    let (code, stdout, stderr) = portcullis(&["--config", "portcullis.toml", "check"], dir.path());
    assert_eq!(code, 1, "{stdout}{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    for (line, (at, key)) in lines.iter().zip([
        (6, "timeouts.connect_ms"),
        (8, "transparent.interception"),
        (10, "caps.max_conections"),
    ]) {
        assert!(
            line.starts_with(&format!("portcullis.toml:{at}: key `{key}`: ")),
            "{stderr}"
        );
    }
    assert!(lines[1].contains("`redirect`"), "{stderr}");
    assert!(lines[2].contains("unknown field"), "{stderr}");
    // A missing file is not placed at a line.
    let (code, _, stderr) = portcullis(&["--config", "nope.toml", "check"], dir.path());
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with("nope.toml: cannot read the config file: "),
        "{stderr}"
    );
}

/// `password_sha256` still works, with a warning naming file, line and key; a bad
/// `password_hash` is an error located the same way.
#[test]
fn check_warns_on_password_sha256_and_locates_password_hash_errors() {
    let sha = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8";
    let dir = rules_with_agent(&format!(
        "name = \"a\"\n[credentials]\nusername = \"a\"\npassword_sha256 = \"{sha}\"\n"
    ));
    let (code, stdout, stderr) = portcullis(&["check"], dir.path());
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stderr.starts_with("warning: ")
            && stderr.contains(
                "rules/agents/bad.toml:4: key `credentials.password_sha256`: unsalted SHA-256"
            ),
        "{stderr}"
    );
    assert!(stdout.ends_with("ok\n"), "{stdout}");
    for (text, message) in [
        (
            "password_hash = \"$argon2i$v=19$m=19456,t=2,p=1$MDEyMzQ1Njc4OWFiY2RlZg$zZHM6vZ7qNfMOr1uJQYZ0uCzYYfSyR2lM2d0HxB9FaM\"",
            "only argon2id",
        ),
        ("password_hash = \"not-a-hash\"", "not a PHC string"),
        (
            "password_hash = \"$argon2id$v=19$m=4194304,t=2,p=1$MDEyMzQ1Njc4OWFiY2RlZg$zZHM6vZ7qNfMOr1uJQYZ0uCzYYfSyR2lM2d0HxB9FaM\"",
            "costs more than one verification may",
        ),
        (
            &format!("password_hash = \"x\"\npassword_sha256 = \"{sha}\""),
            "not both",
        ),
    ] {
        let dir = rules_with_agent(&format!(
            "name = \"a\"\n[credentials]\nusername = \"a\"\n{text}\n"
        ));
        let (code, stdout, stderr) = portcullis(&["check"], dir.path());
        assert_eq!(code, 1, "{text}: {stdout}");
        assert!(
            stderr.contains("rules/agents/bad.toml:4: key `credentials.password_hash`: "),
            "{text}: {stderr}"
        );
        assert!(stderr.contains(message), "{text}: {stderr}");
    }
}

#[test]
fn check_rejects_overlapping_sources_between_agents() {
    let dir = rules_with_agent("name = \"a\"\nsources = [\"10.66.0.0/24\"]\n");
    std::fs::write(
        dir.path().join("rules/agents/b.toml"),
        "name = \"b\"\nsources = [\"10.66.0.11\"]\n",
    )
    .unwrap();
    let (code, _, stderr) = portcullis(&["check"], dir.path());
    assert_eq!(code, 1);
    assert!(stderr.contains("overlaps a source of agent"), "{stderr}");
}

#[test]
fn check_warns_when_agents_share_a_segment_without_a_mac_binding() {
    let dir = rules_with_agent("name = \"a\"\nsources = [\"10.66.0.11\"]\n");
    let b = dir.path().join("rules/agents/b.toml");
    std::fs::write(&b, "name = \"b\"\nsources = [\"10.66.0.12\"]\n").unwrap();
    let (code, stdout, stderr) = portcullis(&["check"], dir.path());
    assert_eq!(code, 0, "a warning is not an error: {stdout}{stderr}");
    for agent in ["a", "b"] {
        assert!(
            stderr.contains(&format!("warning: agent `{agent}`: source 10.66.0.1")),
            "{stderr}"
        );
    }
    assert!(stderr.contains("has no `mac` binding"), "{stderr}");

    // B bound to its MAC: A (unbound) is still claimable by B, B no longer by A.
    std::fs::write(
        &b,
        "name = \"b\"\nsources = [{ net = \"10.66.0.12\", mac = \"02:00:00:00:00:12\" }]\n",
    )
    .unwrap();
    let (code, _, stderr) = portcullis(&["check"], dir.path());
    assert_eq!(code, 0);
    assert!(stderr.contains("warning: agent `a`"), "{stderr}");
    assert!(!stderr.contains("warning: agent `b`"), "{stderr}");
    // The built-in config renders no ruleset, so nothing would enforce the binding.
    assert!(
        stderr.contains("enforced only by the nftables ruleset"),
        "{stderr}"
    );

    // Both bound: no warning about the segment.
    std::fs::write(
        dir.path().join("rules/agents/bad.toml"),
        "name = \"a\"\nsources = [{ net = \"10.66.0.11\", mac = \"02:00:00:00:00:11\" }]\n",
    )
    .unwrap();
    let (code, _, stderr) = portcullis(&["check"], dir.path());
    assert_eq!(code, 0);
    assert!(!stderr.contains("warning: agent"), "{stderr}");
}

#[test]
fn explain_prints_verdict_and_rule() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (code, stdout, _) = portcullis(
        &[
            "explain",
            "--agent",
            "example-agent",
            "https://PyPI.org./simple/",
        ],
        root,
    );
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("verdict: allow"));
    assert!(
        stdout.contains("rule:    lists/package-registries.toml:allow:pypi.org"),
        "{stdout}"
    );
    let (code, stdout, _) = portcullis(
        &["explain", "--agent", "example-agent", "gist.github.com:443"],
        root,
    );
    assert_eq!(code, 1);
    assert!(stdout.contains("verdict: deny (denied_rule)"), "{stdout}");
    let (code, stdout, _) = portcullis(
        &[
            "explain",
            "--agent",
            "example-agent",
            "https://pypi.org.evil.test/",
        ],
        root,
    );
    assert_eq!(code, 1);
    assert!(
        stdout.contains("deny (not_allowed)") && stdout.contains("(default deny)"),
        "{stdout}"
    );
}

/// `explain` says which rule let an address through: `resolve_cidrs` for a name resolving
/// into the range, `allow_cidrs` for a literal, and refuses the literal `resolve_cidrs` alone
/// covers (naming the rule that does not apply).
#[test]
fn explain_shows_whether_allow_cidrs_or_resolve_cidrs_applied() {
    let dir = rules_with_agent(
        "name = \"a\"\nallow = [\"mirror.corp.test\"]\nresolve_cidrs = [\"10.1.2.0/24\"]\nallow_cidrs = [\"10.9.9.9/32:443\"]\n",
    );
    let run = |args: &[&str]| {
        let mut all = vec!["explain", "--agent", "a"];
        all.extend_from_slice(args);
        portcullis(&all, dir.path())
    };
    let (code, stdout, _) = run(&[
        "mirror.corp.test:443",
        "--address",
        "10.1.2.3",
        "--address",
        "8.8.8.8",
    ]);
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.contains(
            "address: 10.1.2.3 allow (resolve_cidrs agents/bad.toml:resolve_cidrs:10.1.2.0/24)"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("address: 8.8.8.8 allow (public address)"),
        "{stdout}"
    );
    let (code, stdout, _) = run(&["mirror.corp.test:443", "--address", "10.1.3.1"]);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains("address: 10.1.3.1 deny (private_address)"),
        "{stdout}"
    );
    let (code, stdout, _) = run(&["10.1.2.3:443"]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("verdict: deny (ip_literal)"), "{stdout}");
    assert!(
        stdout.contains("address: 10.1.2.3 deny (private_address)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("agents/bad.toml:resolve_cidrs:10.1.2.0/24 covers 10.1.2.3 for names"),
        "{stdout}"
    );
    let (code, stdout, _) = run(&["10.9.9.9:443"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(
        stdout.contains(
            "address: 10.9.9.9 allow (allow_cidrs agents/bad.toml:allow_cidrs:10.9.9.9/32:443)"
        ),
        "{stdout}"
    );
}

#[test]
fn sigterm_stops_accepting_drains_and_exits() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    // An upstream that accepts and holds connections, on loopback (allowed explicitly).
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up_port = upstream.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in upstream.incoming().take(4) {
            held.push(s);
        }
    });
    let dir = rules_with_agent(&format!(
        "name = \"a\"\nsources = [\"127.0.0.0/8\"]\nallow_cidrs = [\"127.0.0.1/32:{up_port}\"]\n"
    ));
    let (proxy_port, admin_port) = (common::free_port(), common::free_port());
    std::fs::write(
        dir.path().join("portcullis.toml"),
        format!(
            "[listen]\nexplicit = \"127.0.0.1:{proxy_port}\"\nadmin = \"127.0.0.1:{admin_port}\"\n[log]\ndestination = \"conn.log\"\n[timeouts]\ndrain_secs = 2\n"
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["--config", "portcullis.toml", "run"])
        .current_dir(dir.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut tunnel = loop {
        if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", proxy_port)) {
            break s;
        }
        assert!(Instant::now() < deadline, "portcullis did not start");
        std::thread::sleep(Duration::from_millis(50));
    };
    // A live tunnel to an address allowed by allow_cidrs, carrying a hello without SNI (what
    // a client sends when it connects to an IP).
    tunnel
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        tunnel,
        "CONNECT 127.0.0.1:{up_port} HTTP/1.1\r\nHost: 127.0.0.1:{up_port}\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 64];
    let n = tunnel.read(&mut head).unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
    tunnel
        .write_all(&common::client_hello("127.0.0.1"))
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));

    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    std::thread::sleep(Duration::from_millis(300));
    // Stopped accepting: a new connection is refused.
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", proxy_port)).is_err(),
        "still accepting after SIGTERM"
    );
    // Draining: the process is still alive for the live tunnel, then exits by itself.
    assert!(
        child.try_wait().unwrap().is_none(),
        "exited without draining"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "did not exit after the drain period"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let log = std::fs::read_to_string(dir.path().join("conn.log")).unwrap();
    assert!(log.contains("\"event.reason\":\"shutting_down\""), "{log}");
}

/// Run `portcullis run` in `dir` until it logs its policy line; its stderr lines, and the
/// listening TCP sockets it holds as `ss` shows them (local address, accept-queue limit).
fn run_until_started(dir: &Path) -> (Vec<String>, Vec<(String, u32)>) {
    use std::io::BufRead;
    use std::time::{Duration, Instant};
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["--config", "portcullis.toml", "run"])
        .current_dir(dir)
        .env_remove("NO_COLOR")
        .env_remove("PORTCULLIS_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut lines = Vec::new();
    while !lines.iter().any(|l: &String| l.contains("policy loaded")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!("no policy line within 10 s: {lines:#?}");
            }
        }
    }
    let pid = child.id();
    let ss = Command::new("ss").args(["-ltnpH"]).output().unwrap();
    let sockets = String::from_utf8_lossy(&ss.stdout)
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[3].to_owned(), f[2].parse().unwrap())
        })
        .collect();
    child.kill().unwrap();
    child.wait().unwrap();
    (lines, sockets)
}

/// Startup: one line per listener and one for the policy, one for a kill restored from the
/// state file; no explicit proxy when the config names none; every TCP listener with the
/// configured backlog; no colour codes when stderr is not a terminal.
#[test]
fn run_logs_each_listener_the_policy_and_a_restored_kill() {
    let dir = rules_with_agent("name = \"a\"\nsources = [\"10.66.0.11\"]\nallow = [\"x.test\"]\n");
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    std::fs::write(
        dir.path().join("state/killswitch.json"),
        r#"{"all":null,"agents":{"a":{"reason":"test kill","at_unix":1700000000,"by":"cli"}},"guard":{}}"#,
    )
    .unwrap();
    let config = "state_dir = \"state\"\n\
                  [listen]\n\
                  admin = \"127.0.0.1:0\"\n\
                  transparent = [\"127.0.0.1:0\"]\n\
                  dns = [\"127.0.0.1:0\"]\n\
                  backlog = 777\n\
                  [log]\n\
                  destination = \"conn.log\"\n";
    std::fs::write(dir.path().join("portcullis.toml"), config).unwrap();
    let (lines, sockets) = run_until_started(dir.path());
    let text = lines.join("\n");
    assert!(!text.contains('\u{1b}'), "colour codes in a pipe: {text}");
    for expected in [
        "explicit proxy off",
        "transparent proxy listening",
        "dns forwarder listening",
        "admin api listening",
        "control socket listening",
        "kill switch restored from the state file",
    ] {
        assert_eq!(
            lines.iter().filter(|l| l.contains(expected)).count(),
            1,
            "{expected}: {text}"
        );
    }
    let policy = lines.iter().find(|l| l.contains("policy loaded")).unwrap();
    for field in ["agents=1", "allow_rules=1", "deny_rules=0", "generation=1"] {
        assert!(policy.contains(field), "{policy}");
    }
    // Transparent, DNS over TCP, admin: no explicit proxy was asked for, none is open.
    assert_eq!(sockets.len(), 3, "{sockets:?}");
    for (addr, backlog) in &sockets {
        assert_eq!(*backlog, 777, "{addr}");
        assert!(text.contains(addr.as_str()), "{addr} not logged: {text}");
    }
}

/// `log.format = "json"`: every line of the service's own log is a JSON object.
#[test]
fn run_writes_its_own_log_as_json_when_asked() {
    let dir = rules_with_agent("name = \"a\"\nsources = [\"10.66.0.11\"]\nallow = [\"x.test\"]\n");
    std::fs::write(
        dir.path().join("portcullis.toml"),
        "[listen]\nexplicit = \"127.0.0.1:0\"\nadmin = false\n[admin]\ncontrol_socket = \"\"\n\
         [log]\nformat = \"json\"\ndestination = \"conn.log\"\n",
    )
    .unwrap();
    let (lines, sockets) = run_until_started(dir.path());
    assert_eq!(sockets.len(), 1, "only the explicit proxy: {sockets:?}");
    assert_eq!(sockets[0].1, 4096, "the default backlog");
    let mut messages = Vec::new();
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        messages.push(v["fields"]["message"].as_str().unwrap().to_owned());
    }
    assert!(
        messages.iter().any(|m| m == "explicit proxy listening"),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m == "policy loaded"),
        "{messages:?}"
    );
}

/// `explain` with a bare name assumes port 443; `check` warns about an empty rules
/// directory and about loopback sources behind a transparent listener, and a missing rules
/// directory is not placed at a line.
#[test]
fn explain_defaults_to_443_and_check_warns_about_useless_setups() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (code, stdout, stderr) =
        portcullis(&["explain", "--agent", "example-agent", "pypi.org"], root);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("target:  pypi.org:443"), "{stdout}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rules/agents")).unwrap();
    let (code, stdout, stderr) = portcullis(&["check"], dir.path());
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stderr.contains("warning: no agent in"), "{stderr}");

    let dir = rules_with_agent("name = \"a\"\nsources = [\"127.0.0.1\", \"10.66.0.11\"]\n");
    let config = dir.path().join("portcullis.toml");
    std::fs::write(&config, "[listen]\ntransparent = [\"10.66.0.1:15001\"]\n").unwrap();
    // Without nft in PATH the ruleset check fails; the warnings come before it.
    let (_, _, stderr) = portcullis(&["--config", "portcullis.toml", "check"], dir.path());
    assert!(
        stderr.contains("warning: agent `a`: source 127.0.0.1/32 is loopback"),
        "{stderr}"
    );
    assert!(!stderr.contains("10.66.0.11/32 is loopback"), "{stderr}");
    std::fs::write(&config, "").unwrap();
    let (_, _, stderr) = portcullis(&["--config", "portcullis.toml", "check"], dir.path());
    assert!(
        !stderr.contains("is loopback"),
        "no transparent listener: {stderr}"
    );

    let empty = tempfile::tempdir().unwrap();
    let (code, _, stderr) = portcullis(&["check"], empty.path());
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with("./rules: rules directory not found"),
        "{stderr}"
    );
}
