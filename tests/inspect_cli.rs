//! `portcullis ca init`, `ca show`, and what `check` and `explain` say about inspect mode,
//! run as an operator would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
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

const AGENT: &str = "name = \"coder\"\nallow = [\"api.github.com\", \".openai.com\", \"pypi.org\"]\n\
inspect = [\"api.github.com\", \".openai.com\"]\n\
[[http]]\nhost = \"api.github.com\"\nmethods = [\"GET\", \"HEAD\"]\npaths = [\"/repos/acme/*\", \"/user\"]\n";

fn workdir(agent: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rules/agents")).unwrap();
    std::fs::write(dir.path().join("rules/agents/coder.toml"), agent).unwrap();
    dir
}

#[test]
fn ca_init_constrains_the_ca_to_the_inspected_names() {
    let dir = workdir(AGENT);
    // Before the CA exists, check warns that inspected connections would fail.
    let (code, _, stderr) = portcullis(&["check"], dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("portcullis ca init"), "{stderr}");

    let (code, stdout, stderr) =
        portcullis(&["ca", "init", "--permit", "internal.test"], dir.path());
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("-----BEGIN CERTIFICATE-----"), "{stdout}");
    let listed: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("may sign for"))
        .skip(1)
        .map(str::trim)
        .collect();
    assert_eq!(listed, ["api.github.com", "internal.test", "openai.com"]);
    let key = dir.path().join("state/ca/ca.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // `openssl x509` sees the same constraints.
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(dir.path().join("state/ca/ca.pem"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("X509v3 Name Constraints: critical"), "{text}");
    assert!(
        text.contains("DNS:api.github.com") && text.contains("DNS:openai.com"),
        "{text}"
    );
    assert!(text.contains("pathlen:0"), "{text}");

    // Once: a second init refuses to replace the CA the agents trust.
    let (code, _, stderr) = portcullis(&["ca", "init"], dir.path());
    assert_eq!(code, 1);
    assert!(stderr.contains("already exists"), "{stderr}");

    let (code, shown, _) = portcullis(&["ca", "show"], dir.path());
    assert_eq!(code, 0);
    assert_eq!(shown.lines().last(), stdout.lines().last());

    // The CA covers every pattern: no warning. A pattern outside it: a warning naming it.
    let (code, _, stderr) = portcullis(&["check"], dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("inspect"), "{stderr}");
    std::fs::write(
        dir.path().join("rules/agents/coder.toml"),
        AGENT.replace(
            "inspect = [\"api.github.com\",",
            "inspect = [\"pypi.org\", \"api.github.com\",",
        ),
    )
    .unwrap();
    let (code, _, stderr) = portcullis(&["check"], dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("inspect `pypi.org` is outside the CA's name constraints"),
        "{stderr}"
    );
}

#[test]
fn explain_shows_inspection_and_the_http_rule() {
    let dir = workdir(AGENT);
    let (code, stdout, stderr) = portcullis(
        &[
            "explain",
            "--agent",
            "coder",
            "https://api.github.com/repos/acme/x",
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("inspect: yes (agents/coder.toml:inspect:api.github.com)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("http:    GET /repos/acme/x: allow (agents/coder.toml:http[0])"),
        "{stdout}"
    );

    let (code, stdout, _) = portcullis(
        &[
            "explain",
            "--agent",
            "coder",
            "--method",
            "DELETE",
            "https://api.github.com/repos/acme/x",
        ],
        dir.path(),
    );
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains("http:    DELETE /repos/acme/x: deny 403"),
        "{stdout}"
    );

    let (code, stdout, _) = portcullis(
        &[
            "explain",
            "--agent",
            "coder",
            "https://api.github.com/repos/acme/..%2fother",
        ],
        dir.path(),
    );
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("refused, ambiguous path"), "{stdout}");

    let (code, stdout, _) = portcullis(
        &["explain", "--agent", "coder", "https://pypi.org/simple/"],
        dir.path(),
    );
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("inspect: no"), "{stdout}");
}
