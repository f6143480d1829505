//! The `portcullis` binary's `check` and `explain` commands, run as a user would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

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
