//! Durable kill state: the JSON file format (`"version": 2`; version 1 files, which had no
//! revive guard, still load), a fail-closed loader and an atomic, fsynced writer.
//!
//! The revive guard (used TOTP step, accepted request ids, failed-attempt counts) lives in the
//! same file, so one atomic write covers a revive and what stops it being replayed.
//!
//! Must not: decide policy beyond "unreadable means killed" (callers act on [`Loaded`]),
//! read the clock, or ever report "not killed" for a file it could not fully understand.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The on-disk format version written.
pub const VERSION: u64 = 2;
/// The version before the revive guard: read, never written.
const VERSION_1: u64 = 1;
/// A state file is a few KiB; anything this big is not ours, and reading it all would hurt.
const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;
/// Exactly these top-level keys; serde alone would let a missing `all` default to "not killed".
const TOP_LEVEL_KEYS: [&str; 4] = ["version", "all", "agents", "guard"];
const TOP_LEVEL_KEYS_V1: [&str; 3] = ["version", "all", "agents"];

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state path {0} has no file name")]
    NoFileName(PathBuf),
    #[error("cannot serialize kill state: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillState {
    /// Set when every agent is cut off.
    pub all: Option<KillEntry>,
    /// Agents cut off individually, by agent name.
    pub agents: BTreeMap<String, KillEntry>,
    /// What stops a revive from being guessed or replayed, across restarts too.
    pub guard: Guard,
}

/// The durable half of revive's anti-replay and anti-guessing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guard {
    /// The last TOTP time step a revive used: no code of this step or an earlier one is
    /// accepted again, so a captured revive cannot be replayed after a restart either.
    pub totp_last_step: Option<u64>,
    /// Ids of accepted kills and revives (id → webhook timestamp) still inside the replay
    /// window, so a restart does not forget them.
    pub ids: BTreeMap<String, i64>,
    /// Failed revive attempts and the lock-outs they earned.
    pub attempts: super::attempts::Attempts,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillEntry {
    pub reason: String,
    pub at_unix: i64,
    /// Webhook id of the kill request, or "cli".
    pub by: String,
}

impl KillState {
    pub fn is_killed(&self, agent: &str) -> bool {
        self.all.is_some() || self.agents.contains_key(agent)
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_none() && self.agents.is_empty()
    }
}

/// Outcome of [`load`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loaded {
    /// No state file: nothing was ever killed.
    Fresh,
    State(KillState),
    /// The file exists but cannot be trusted; the caller must treat every agent as killed.
    Corrupt(String),
}

impl Loaded {
    /// The fail-closed reading in one place: `Corrupt` kills everyone.
    pub fn is_killed(&self, agent: &str) -> bool {
        match self {
            Loaded::Fresh => false,
            Loaded::State(state) => state.is_killed(agent),
            Loaded::Corrupt(_) => true,
        }
    }
}

#[derive(Serialize)]
struct OnDiskRef<'a> {
    version: u64,
    all: &'a Option<KillEntry>,
    agents: &'a BTreeMap<String, KillEntry>,
    guard: &'a Guard,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    #[expect(
        dead_code,
        reason = "judged from the JSON value first; declared so deny_unknown_fields accepts it"
    )]
    version: u64,
    all: Option<KillEntry>,
    agents: BTreeMap<String, KillEntry>,
    /// Absent only in version 1 files (checked before this is read).
    #[serde(default)]
    guard: Guard,
}

/// Read the state at `path`. Missing → `Fresh`; anything else short of a fully valid
/// version-1 document → `Corrupt`.
pub fn load(path: &Path) -> Loaded {
    let bytes = match read_capped(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // A leftover temp file with no state means a first store died before its rename:
            // someone was killing, so do not come up "not killed".
            let tmp = match tmp_path(path) {
                Ok(tmp) => tmp,
                Err(e) => return Loaded::Corrupt(e.to_string()),
            };
            return match fs::symlink_metadata(&tmp) {
                Ok(_) => Loaded::Corrupt(format!(
                    "{} is missing but {} exists (interrupted write)",
                    path.display(),
                    tmp.display()
                )),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Loaded::Fresh,
                Err(e) => Loaded::Corrupt(format!("checking {}: {e}", tmp.display())),
            };
        }
        Err(e) => return Loaded::Corrupt(format!("reading {}: {e}", path.display())),
    };
    match parse(&bytes) {
        Ok(state) => Loaded::State(state),
        Err(why) => Loaded::Corrupt(format!("{}: {why}", path.display())),
    }
}

fn read_capped(path: &Path) -> io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(io::Error::other("file too large"));
    }
    Ok(bytes)
}

fn parse(bytes: &[u8]) -> Result<KillState, String> {
    // Via `Value` first so the version is judged before field shapes (a future format should
    // say "unsupported version", not some field error) and so every key must be present.
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("invalid JSON: {e}"))?;
    let object = value.as_object().ok_or("top level is not an object")?;
    let keys: &[&str] = match object.get("version") {
        Some(v) if v.as_u64() == Some(VERSION) => &TOP_LEVEL_KEYS,
        Some(v) if v.as_u64() == Some(VERSION_1) => {
            if object.contains_key("guard") {
                return Err("unknown field \"guard\" in a version 1 file".to_owned());
            }
            &TOP_LEVEL_KEYS_V1
        }
        Some(v) => return Err(format!("unsupported version {v}")),
        None => return Err("missing version".to_owned()),
    };
    for key in keys {
        if !object.contains_key(*key) {
            return Err(format!("missing field {key:?}"));
        }
    }
    let on_disk: OnDisk =
        serde_json::from_value(value).map_err(|e| format!("invalid state: {e}"))?;
    Ok(KillState {
        all: on_disk.all,
        agents: on_disk.agents,
        guard: on_disk.guard,
    })
}

/// `<path>.tmp`, beside the target so the rename stays on one filesystem.
fn tmp_path(path: &Path) -> Result<PathBuf, StateError> {
    let name = path
        .file_name()
        .ok_or_else(|| StateError::NoFileName(path.to_path_buf()))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(".tmp");
    Ok(path.with_file_name(tmp_name))
}

/// Write `state` atomically and durably: temp file (0600) → fsync → rename → fsync parent.
/// On success the new state survives a crash; on failure the old file is untouched.
pub fn store(path: &Path, state: &KillState) -> Result<(), StateError> {
    let tmp = tmp_path(path)?;
    let mut json = serde_json::to_vec_pretty(&OnDiskRef {
        version: VERSION,
        all: &state.all,
        agents: &state.agents,
        guard: &state.guard,
    })?;
    json.push(b'\n');

    crate::sys::durable::replace(path, &tmp, &json).map_err(|e| StateError::Io {
        op: e.op,
        path: e.path,
        source: e.source,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn entry(by: &str) -> KillEntry {
        KillEntry {
            reason: "runaway agent".to_owned(),
            at_unix: 1_700_000_000,
            by: by.to_owned(),
        }
    }

    fn sample() -> KillState {
        let mut agents = BTreeMap::new();
        agents.insert("agent-7".to_owned(), entry("msg_abc"));
        agents.insert("ünïcode agent".to_owned(), entry("cli"));
        let mut guard = Guard {
            totp_last_step: Some(56_666_666),
            ..Guard::default()
        };
        guard.ids.insert("msg_abc".to_owned(), 1_700_000_000);
        guard.attempts.failed("key:webhook.secret", 1_700_000_000);
        KillState {
            all: Some(entry("cli")),
            agents,
            guard,
        }
    }

    fn dir() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kill.json");
        (d, p)
    }

    fn assert_corrupt(loaded: Loaded) -> String {
        match loaded {
            Loaded::Corrupt(why) => why,
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn round_trip() {
        let (_d, p) = dir();
        for state in [KillState::default(), sample()] {
            store(&p, &state).unwrap();
            assert_eq!(load(&p), Loaded::State(state));
        }
    }

    #[test]
    fn file_format_is_versioned_json() {
        let (_d, p) = dir();
        store(&p, &sample()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
        assert_eq!(v["version"], 2);
        assert_eq!(v["all"]["by"], "cli");
        assert_eq!(v["agents"]["agent-7"]["by"], "msg_abc");
        assert_eq!(v["guard"]["totp_last_step"], 56_666_666);
        assert_eq!(v["guard"]["ids"]["msg_abc"], 1_700_000_000);
        assert_eq!(
            v["guard"]["attempts"]["senders"]["key:webhook.secret"]["failures"],
            1
        );
    }

    #[test]
    fn missing_is_fresh() {
        let (_d, p) = dir();
        assert_eq!(load(&p), Loaded::Fresh);
        assert!(!load(&p).is_killed("any"));
    }

    #[test]
    fn missing_with_leftover_tmp_is_corrupt() {
        let (_d, p) = dir();
        fs::write(tmp_path(&p).unwrap(), b"{\"vers").unwrap();
        assert!(assert_corrupt(load(&p)).contains("interrupted"));
    }

    #[test]
    fn garbage_is_corrupt() {
        let (_d, p) = dir();
        fs::write(&p, b"not json at all").unwrap();
        let loaded = load(&p);
        assert!(loaded.is_killed("anyone"));
        assert_corrupt(loaded);
    }

    #[test]
    fn truncated_is_corrupt() {
        let (_d, p) = dir();
        store(&p, &sample()).unwrap();
        let full = fs::read(&p).unwrap();
        for cut in [0, 1, full.len() / 2, full.len() - 3] {
            fs::write(&p, &full[..cut]).unwrap();
            assert_corrupt(load(&p));
        }
    }

    #[test]
    fn directory_at_path_is_corrupt() {
        let (_d, p) = dir();
        fs::create_dir(&p).unwrap();
        assert_corrupt(load(&p));
    }

    #[test]
    fn invalid_utf8_is_corrupt() {
        let (_d, p) = dir();
        fs::write(
            &p,
            b"{\"version\":1,\"all\":null,\"agents\":{\"\xff\xfe\":null}}",
        )
        .unwrap();
        assert_corrupt(load(&p));
    }

    #[test]
    fn wrong_or_missing_version_is_corrupt() {
        let (_d, p) = dir();
        for doc in [
            r#"{"version":3,"all":null,"agents":{},"guard":{}}"#,
            r#"{"version":0,"all":null,"agents":{}}"#,
            r#"{"version":"1","all":null,"agents":{}}"#,
            r#"{"version":1.0,"all":null,"agents":{}}"#,
            r#"{"all":null,"agents":{}}"#,
        ] {
            fs::write(&p, doc).unwrap();
            assert!(assert_corrupt(load(&p)).contains("version"), "{doc}");
        }
    }

    #[test]
    fn unknown_or_missing_fields_are_corrupt() {
        let (_d, p) = dir();
        for doc in [
            r#"{"version":1,"all":null,"agents":{},"extra":true}"#,
            r#"{"version":1,"agents":{}}"#,
            r#"{"version":1,"all":null}"#,
            r#"{"version":1,"all":{"reason":"r","at_unix":1,"by":"cli","x":1},"agents":{}}"#,
            r#"{"version":1,"all":{"reason":"r","at_unix":1},"agents":{}}"#,
            r#"{"version":1,"all":null,"agents":{"a":null}}"#,
            r#"{"version":1,"all":null,"agents":[]}"#,
            // Version 2 needs its guard, whole; version 1 has none.
            r#"{"version":2,"all":null,"agents":{}}"#,
            r#"{"version":1,"all":null,"agents":{},"guard":{"totp_last_step":null,"ids":{},"attempts":{"global":{"failures":0,"locked_until":null},"senders":{}}}}"#,
            r#"{"version":2,"all":null,"agents":{},"guard":{"totp_last_step":null}}"#,
            r#"{"version":2,"all":null,"agents":{},"guard":{"totp_last_step":-1,"ids":{},"attempts":{"global":{"failures":0,"locked_until":null},"senders":{}}}}"#,
            r#"{"version":2,"all":null,"agents":{},"guard":{"totp_last_step":null,"ids":{},"attempts":{"global":{"failures":0,"locked_until":null},"senders":{}},"x":1}}"#,
            r#"[1]"#,
            r#"null"#,
        ] {
            fs::write(&p, doc).unwrap();
            assert_corrupt(load(&p));
        }
    }

    #[test]
    fn minimal_valid_document_loads() {
        let (_d, p) = dir();
        fs::write(&p, r#"{"version":1,"all":null,"agents":{}}"#).unwrap();
        assert_eq!(load(&p), Loaded::State(KillState::default()));
        let v2 = r#"{"version":2,"all":null,"agents":{},"guard":{"totp_last_step":null,"ids":{},"attempts":{"global":{"failures":0,"locked_until":null},"senders":{}}}}"#;
        fs::write(&p, v2).unwrap();
        assert_eq!(load(&p), Loaded::State(KillState::default()));
    }

    #[test]
    fn store_replaces_atomically_and_leaves_no_tmp() {
        let (d, p) = dir();
        store(&p, &sample()).unwrap();
        store(&p, &KillState::default()).unwrap();
        assert_eq!(load(&p), Loaded::State(KillState::default()));
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("kill.json")]);
    }

    #[test]
    fn store_clears_stale_tmp() {
        let (_d, p) = dir();
        let tmp = tmp_path(&p).unwrap();
        fs::write(&tmp, b"stale").unwrap();
        store(&p, &sample()).unwrap();
        assert!(!tmp.exists());
        assert_eq!(load(&p), Loaded::State(sample()));
    }

    #[test]
    fn failed_store_keeps_old_state() {
        let (d, p) = dir();
        store(&p, &sample()).unwrap();
        // A directory where the temp file must go cannot be removed as a file.
        let tmp = tmp_path(&p).unwrap();
        fs::create_dir(&tmp).unwrap();
        assert!(store(&p, &KillState::default()).is_err());
        assert_eq!(load(&p), Loaded::State(sample()));
        drop(d);
    }

    #[test]
    fn store_into_missing_dir_fails() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("nope").join("kill.json");
        assert!(matches!(store(&p, &sample()), Err(StateError::Io { .. })));
    }

    #[test]
    fn path_without_file_name_is_refused() {
        assert!(matches!(
            store(Path::new("/"), &sample()),
            Err(StateError::NoFileName(_))
        ));
        assert_corrupt(load(Path::new("/")));
    }

    #[cfg(unix)]
    #[test]
    fn stored_file_is_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let (_d, p) = dir();
        store(&p, &sample()).unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn is_killed_all_vs_one() {
        let mut s = KillState::default();
        assert!(s.is_empty());
        assert!(!s.is_killed("a"));

        s.agents.insert("a".to_owned(), entry("cli"));
        assert!(!s.is_empty());
        assert!(s.is_killed("a"));
        assert!(!s.is_killed("b"));

        s.all = Some(entry("msg_1"));
        assert!(s.is_killed("a"));
        assert!(s.is_killed("b"));

        s.agents.clear();
        assert!(!s.is_empty());
        assert!(s.is_killed("b"));
    }

    #[test]
    fn loaded_is_killed_fails_closed() {
        assert!(!Loaded::Fresh.is_killed("a"));
        assert!(Loaded::Corrupt("x".into()).is_killed("a"));
        assert!(!Loaded::State(KillState::default()).is_killed("a"));
    }
}
