//! Daily byte budgets per agent that survive restarts. Owns the period
//! arithmetic (UTC, from unix seconds, no date crate), the usage counters and
//! their crash-safe JSON file. Must not read the clock (callers pass
//! `now_unix`), decide limits (config does) or block traffic itself.
//!
//! Corrupt-file policy: `load` returns `BudgetError::Corrupt` and never
//! silently grants a fresh budget. The recommended reaction is
//! `Budgets::exhausted_until_next_period`, which treats every agent that has a
//! budget as exceeded until the next reset, then behaves normally.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const DAY_SECS: i64 = 24 * 60 * 60;
const FILE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error("budget reset hour {0} is not in 0..=23")]
    InvalidResetHour(u8),
    #[error("budget file {}: {op}: {source}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("budget file {} is corrupt: {source}", .path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("budget file {} has unsupported version {version}", .path.display())]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("cannot serialize budgets: {0}")]
    Serialize(#[source] serde_json::Error),
}

/// On-disk form. `reset_hour_utc` is informational: the configured hour wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    version: u32,
    reset_hour_utc: u8,
    period_start: Option<i64>,
    #[serde(default)]
    all_exhausted: bool,
    used: BTreeMap<String, u64>,
}

/// Bytes used per agent in the current budget period.
#[derive(Debug, Clone)]
pub struct Budgets {
    reset_hour_utc: u8,
    path: PathBuf,
    /// Unix seconds of the period the counters belong to; `None` = no data.
    period_start: Option<i64>,
    /// Set by the corrupt-file fallback: everyone is out of budget this period.
    all_exhausted: bool,
    used: BTreeMap<String, u64>,
}

/// Start (unix seconds) of the period containing `now_unix`: periods are
/// `[reset_hour, reset_hour + 24h)` UTC. Unix time has no leap seconds, so
/// every UTC day is exactly 86 400 s and plain arithmetic is exact.
pub fn period_start(now_unix: i64, reset_hour_utc: u8) -> i64 {
    let offset = i64::from(reset_hour_utc) * 3600;
    // div_euclid: correct for times before 1970 too (rounds toward -inf).
    now_unix.saturating_sub(offset).div_euclid(DAY_SECS) * DAY_SECS + offset
}

fn check_hour(reset_hour_utc: u8) -> Result<(), BudgetError> {
    if reset_hour_utc > 23 {
        return Err(BudgetError::InvalidResetHour(reset_hour_utc));
    }
    Ok(())
}

impl Budgets {
    /// Empty budgets (everyone has a full budget) that will save to `path`.
    pub fn new(path: impl Into<PathBuf>, reset_hour_utc: u8) -> Result<Self, BudgetError> {
        check_hour(reset_hour_utc)?;
        Ok(Self {
            reset_hour_utc,
            path: path.into(),
            period_start: None,
            all_exhausted: false,
            used: BTreeMap::new(),
        })
    }

    /// Reads `path`. Missing file → empty budgets. Unreadable, corrupt or
    /// unknown-version file → error; see the module doc for what to do then.
    /// A stale period in the file is ignored by `remaining`/`exceeded` and
    /// dropped by the next `charge`/`roll`.
    pub fn load(path: impl Into<PathBuf>, reset_hour_utc: u8) -> Result<Self, BudgetError> {
        let path = path.into();
        let mut budgets = Self::new(path.clone(), reset_hour_utc)?;
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(budgets),
            Err(source) => {
                return Err(BudgetError::Io {
                    op: "read",
                    path,
                    source,
                });
            }
        };
        let stored: Stored =
            serde_json::from_slice(&bytes).map_err(|source| BudgetError::Corrupt {
                path: path.clone(),
                source,
            })?;
        if stored.version != FILE_VERSION {
            return Err(BudgetError::UnsupportedVersion {
                path,
                version: stored.version,
            });
        }
        budgets.period_start = stored.period_start;
        budgets.all_exhausted = stored.all_exhausted;
        budgets.used = stored.used;
        Ok(budgets)
    }

    /// Fallback after a corrupt file: every agent with a budget is exceeded
    /// until the next reset. Does not touch the file; the next `save`
    /// overwrites it (copy it aside first if you want it for forensics).
    pub fn exhausted_until_next_period(
        path: impl Into<PathBuf>,
        reset_hour_utc: u8,
        now_unix: i64,
    ) -> Result<Self, BudgetError> {
        let mut budgets = Self::new(path, reset_hour_utc)?;
        budgets.period_start = Some(period_start(now_unix, reset_hour_utc));
        budgets.all_exhausted = true;
        Ok(budgets)
    }

    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
    }

    #[cfg(test)]
    pub fn reset_hour_utc(&self) -> u8 {
        self.reset_hour_utc
    }

    /// Whether the stored counters apply at `now_unix`. A `now` whose period
    /// is *earlier* than the stored one (wall clock stepped back) still uses
    /// them: a clock step must never hand out a fresh budget.
    fn current(&self, now_unix: i64) -> bool {
        self.period_start
            .is_some_and(|p| period_start(now_unix, self.reset_hour_utc) <= p)
    }

    /// Drops counters from periods that ended before `now_unix`.
    pub fn roll(&mut self, now_unix: i64) {
        if !self.current(now_unix) {
            self.used.clear();
            self.all_exhausted = false;
            self.period_start = Some(period_start(now_unix, self.reset_hour_utc));
        }
    }

    /// Adds `bytes` to `agent`'s usage for the period containing `now_unix`.
    pub fn charge(&mut self, agent: &str, bytes: u64, now_unix: i64) {
        self.roll(now_unix);
        let used = self.used.entry(agent.to_owned()).or_insert(0);
        *used = used.saturating_add(bytes);
    }

    /// Bytes `agent` used in the period containing `now_unix`.
    pub fn used(&self, agent: &str, now_unix: i64) -> u64 {
        if !self.current(now_unix) {
            return 0;
        }
        self.used.get(agent).copied().unwrap_or(0)
    }

    /// Bytes `agent` may still send this period under `limit`.
    pub fn remaining(&self, agent: &str, limit: u64, now_unix: i64) -> u64 {
        if self.current(now_unix) && self.all_exhausted {
            return 0;
        }
        limit.saturating_sub(self.used(agent, now_unix))
    }

    /// True when nothing remains (so `limit == 0` is always exceeded).
    pub fn exceeded(&self, agent: &str, limit: u64, now_unix: i64) -> bool {
        self.remaining(agent, limit, now_unix) == 0
    }

    /// Unix seconds when the current budgets reset (for Retry-After and logs).
    pub fn next_reset(&self, now_unix: i64) -> i64 {
        let now_period = period_start(now_unix, self.reset_hour_utc);
        let p = match self.period_start {
            Some(p) if p > now_period => p,
            _ => now_period,
        };
        // Stored period may be unaligned after a reset-hour change; the next
        // aligned boundary after its start is when `roll` clears it.
        period_start(p, self.reset_hour_utc).saturating_add(DAY_SECS)
    }

    #[cfg(test)]
    /// Writes the file crash-safely: [`Budgets::snapshot`], then [`Snapshot::write`].
    pub fn save(&self) -> Result<(), BudgetError> {
        self.snapshot().write()
    }

    /// The counters as the file will hold them, to be written later. Taking one is a copy
    /// of the counters (one entry per agent), so a caller that shares `Budgets` behind a
    /// lock holds it only for that, never while the disk is written and synced.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            path: self.path.clone(),
            stored: Stored {
                version: FILE_VERSION,
                reset_hour_utc: self.reset_hour_utc,
                period_start: self.period_start,
                all_exhausted: self.all_exhausted,
                used: self.used.clone(),
            },
        }
    }
}

/// The budgets at one moment, and where they go. Two snapshots are equal when they would
/// write the same file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    path: PathBuf,
    stored: Stored,
}

impl Snapshot {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the file crash-safely: temp file in the same directory, fsync,
    /// rename over the old one, fsync the directory so the rename is durable.
    pub fn write(&self) -> Result<(), BudgetError> {
        let mut json = serde_json::to_vec_pretty(&self.stored).map_err(BudgetError::Serialize)?;
        json.push(b'\n');

        let io_err = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| BudgetError::Io { op, path, source }
        };
        let file_name = self
            .path
            .file_name()
            .ok_or_else(|| {
                io_err("save", &self.path)(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "path has no file name",
                ))
            })?
            .to_string_lossy()
            .into_owned();
        let tmp = self.path.with_file_name(format!(".{file_name}.tmp"));

        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        f.write_all(&json).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
        drop(f);
        fs::rename(&tmp, &self.path).map_err(io_err("rename", &self.path))?;
        sync_parent_dir(&self.path)?;
        Ok(())
    }
}

#[cfg(unix)]
fn sync_parent_dir(path: &Path) -> Result<(), BudgetError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| BudgetError::Io {
            op: "fsync dir",
            path: dir.to_path_buf(),
            source,
        })
}

#[cfg(not(unix))]
fn sync_parent_dir(_path: &Path) -> Result<(), BudgetError> {
    // Directories cannot be opened for fsync on non-unix; rename is the best we get.
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// 2024-03-10 00:00:00 UTC.
    const MIDNIGHT: i64 = 1_710_028_800;
    const H: i64 = 3600;

    fn tmp() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("budgets.json");
        (dir, path)
    }

    #[test]
    fn period_start_arithmetic() {
        assert_eq!(period_start(MIDNIGHT, 0), MIDNIGHT);
        assert_eq!(period_start(MIDNIGHT - 1, 0), MIDNIGHT - DAY_SECS);
        assert_eq!(period_start(MIDNIGHT + 7 * H, 7), MIDNIGHT + 7 * H);
        assert_eq!(
            period_start(MIDNIGHT + 7 * H - 1, 7),
            MIDNIGHT + 7 * H - DAY_SECS
        );
        assert_eq!(period_start(MIDNIGHT + 23 * H, 7), MIDNIGHT + 7 * H);
        assert_eq!(period_start(-1, 0), -DAY_SECS);
    }

    #[test]
    fn charge_and_remaining() {
        let mut b = Budgets::new("/nonexistent/x.json", 0).unwrap();
        let now = MIDNIGHT + 5 * H;
        assert_eq!(b.remaining("a", 1000, now), 1000);
        b.charge("a", 300, now);
        b.charge("a", 200, now + 60);
        b.charge("b", 2000, now);
        assert_eq!(b.remaining("a", 1000, now), 500);
        assert_eq!(b.used("a", now), 500);
        assert!(!b.exceeded("a", 1000, now));
        assert!(b.exceeded("b", 1000, now));
        assert_eq!(b.remaining("b", 1000, now), 0);
        assert!(b.exceeded("c", 0, now), "a zero limit is always exceeded");
        b.charge("a", u64::MAX, now);
        assert_eq!(b.used("a", now), u64::MAX);
    }

    #[test]
    fn invalid_reset_hour() {
        assert!(matches!(
            Budgets::new("x", 24),
            Err(BudgetError::InvalidResetHour(24))
        ));
        let (_d, path) = tmp();
        assert!(Budgets::load(&path, 99).is_err());
    }

    fn rollover_at(reset_hour: u8) {
        let boundary = MIDNIGHT + i64::from(reset_hour) * H;
        let mut b = Budgets::new("x", reset_hour).unwrap();
        b.charge("a", 900, boundary - 10);
        assert_eq!(b.remaining("a", 1000, boundary - 1), 100);
        assert_eq!(b.next_reset(boundary - 1), boundary);
        // Exactly at the reset hour the new period starts.
        assert_eq!(b.remaining("a", 1000, boundary), 1000);
        b.charge("a", 50, boundary);
        assert_eq!(b.remaining("a", 1000, boundary), 950);
        assert_eq!(b.remaining("a", 1000, boundary + DAY_SECS - 1), 950);
        assert_eq!(b.remaining("a", 1000, boundary + DAY_SECS), 1000);
        assert_eq!(b.next_reset(boundary), boundary + DAY_SECS);
    }

    #[test]
    fn rollover_at_reset_hour_0() {
        rollover_at(0);
    }

    #[test]
    fn rollover_at_reset_hour_7() {
        rollover_at(7);
        // 03:00 with reset 7 belongs to the previous day's period.
        let mut b = Budgets::new("x", 7).unwrap();
        b.charge("a", 10, MIDNIGHT - 20 * H); // previous day 04:00 → period from day-2 07:00
        b.charge("a", 10, MIDNIGHT + 3 * H); // period from day-1 07:00: new period
        assert_eq!(b.used("a", MIDNIGHT + 3 * H), 10);
    }

    #[test]
    fn clock_stepping_back_keeps_usage() {
        let mut b = Budgets::new("x", 0).unwrap();
        b.charge("a", 700, MIDNIGHT + H);
        assert_eq!(b.remaining("a", 1000, MIDNIGHT - H), 300);
        b.charge("a", 100, MIDNIGHT - H);
        assert_eq!(b.remaining("a", 1000, MIDNIGHT + H), 200);
        assert_eq!(b.next_reset(MIDNIGHT - H), MIDNIGHT + DAY_SECS);
    }

    #[test]
    fn persistence_round_trip_and_restart() {
        let (_d, path) = tmp();
        let now = MIDNIGHT + 10 * H;
        let mut b = Budgets::load(&path, 7).unwrap();
        assert_eq!(b.remaining("a", 1000, now), 1000, "missing file is empty");
        b.charge("a", 123, now);
        b.charge("agent with spaces/ü", 5, now);
        b.save().unwrap();
        b.save().unwrap(); // overwrite works, no temp left behind
        let names: Vec<_> = fs::read_dir(_d.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
        drop(b);

        let mut b = Budgets::load(&path, 7).unwrap();
        assert_eq!(b.path(), path);
        assert_eq!(b.reset_hour_utc(), 7);
        assert_eq!(b.remaining("a", 1000, now + H), 877);
        assert_eq!(b.used("agent with spaces/ü", now), 5);
        b.charge("a", 77, now + H);
        b.save().unwrap();
        let b = Budgets::load(&path, 7).unwrap();
        assert_eq!(b.used("a", now + 2 * H), 200);
    }

    #[test]
    fn stale_period_is_dropped() {
        let (_d, path) = tmp();
        let mut b = Budgets::load(&path, 0).unwrap();
        b.charge("a", 999, MIDNIGHT - H);
        b.save().unwrap();
        let mut b = Budgets::load(&path, 0).unwrap();
        assert_eq!(b.remaining("a", 1000, MIDNIGHT + H), 1000);
        b.charge("b", 1, MIDNIGHT + H);
        assert_eq!(b.used("a", MIDNIGHT - H), 0, "old period cleared on charge");
        b.save().unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains("\"a\""), "{text}");
    }

    #[test]
    fn corrupt_file_is_an_error() {
        let (_d, path) = tmp();
        for bad in [
            "",
            "{",
            "not json",
            r#"{"version":1,"reset_hour_utc":0,"period_start":0,"used":{"a":-5}}"#,
            r#"{"version":1,"reset_hour_utc":0,"period_start":0,"used":{},"extra":1}"#,
        ] {
            fs::write(&path, bad).unwrap();
            let err = Budgets::load(&path, 0).unwrap_err();
            assert!(matches!(err, BudgetError::Corrupt { .. }), "{bad}: {err}");
        }
        fs::write(
            &path,
            r#"{"version":9,"reset_hour_utc":0,"period_start":0,"used":{}}"#,
        )
        .unwrap();
        assert!(matches!(
            Budgets::load(&path, 0),
            Err(BudgetError::UnsupportedVersion { version: 9, .. })
        ));
        // A directory where the file should be is an I/O error, not "missing".
        let dir_path = _d.path().join("dir");
        fs::create_dir(&dir_path).unwrap();
        assert!(matches!(
            Budgets::load(&dir_path, 0),
            Err(BudgetError::Io { .. })
        ));
    }

    #[test]
    fn exhausted_helper_blocks_until_next_period() {
        let (_d, path) = tmp();
        fs::write(&path, "garbage").unwrap();
        let now = MIDNIGHT + 9 * H;
        assert!(Budgets::load(&path, 7).is_err());
        let mut b = Budgets::exhausted_until_next_period(&path, 7, now).unwrap();
        assert!(b.exceeded("anyone", u64::MAX, now));
        assert_eq!(b.remaining("a", 1000, MIDNIGHT + DAY_SECS + 7 * H - 1), 0);
        assert_eq!(b.next_reset(now), MIDNIGHT + DAY_SECS + 7 * H);

        // Survives a restart once saved.
        b.charge("a", 10, now);
        b.save().unwrap();
        let mut b = Budgets::load(&path, 7).unwrap();
        assert!(b.exceeded("a", 1000, now + H));

        // At the next reset everything is normal again.
        let next = MIDNIGHT + DAY_SECS + 7 * H;
        assert_eq!(b.remaining("a", 1000, next), 1000);
        b.charge("a", 1, next);
        assert_eq!(b.remaining("b", 1000, next), 1000);
    }

    #[test]
    fn reset_hour_change_never_extends_past_new_boundary() {
        let (_d, path) = tmp();
        // Saved under reset 7 at 10:00; restarted with reset 0 at 12:00.
        let mut b = Budgets::new(&path, 7).unwrap();
        b.charge("a", 500, MIDNIGHT + 10 * H);
        b.save().unwrap();
        let b = Budgets::load(&path, 0).unwrap();
        assert_eq!(b.remaining("a", 1000, MIDNIGHT + 12 * H), 500);
        assert_eq!(b.next_reset(MIDNIGHT + 12 * H), MIDNIGHT + DAY_SECS);
        assert_eq!(b.remaining("a", 1000, MIDNIGHT + DAY_SECS), 1000);
    }

    proptest! {
        #[test]
        fn period_start_is_aligned_and_contains_now(
            now in -10_000_000_000i64..10_000_000_000,
            hour in 0u8..24,
        ) {
            let p = period_start(now, hour);
            prop_assert!(p <= now && now < p + DAY_SECS);
            prop_assert_eq!((p - i64::from(hour) * H).rem_euclid(DAY_SECS), 0);
        }
    }
}
