//! Replacing a state file so that a crash leaves either the old content or the new, never
//! a mix: the kill state, the cluster's events.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A step of [`replace`] that failed: what was being done, to which path.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct WriteError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

fn at(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> WriteError {
    let path = path.to_path_buf();
    move |source| WriteError { op, path, source }
}

/// Replace `path` with `bytes` atomically and durably: `tmp` (a stale one from a crash
/// removed first; created new, mode 0600, never through a planted file) → fsync → rename
/// over `path` → fsync the directory. On failure the old file is untouched and `tmp` is
/// removed (best effort).
pub fn replace(path: &Path, tmp: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    // A stale temp file from a crash would make create_new fail forever.
    match fs::remove_file(tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(at("removing stale", tmp)(e)),
    }
    let written = write_synced(tmp, bytes)
        .map_err(at("writing", tmp))
        .and_then(|()| fs::rename(tmp, path).map_err(at("renaming over", path)));
    if let Err(e) = written {
        // Best effort: the error being returned matters more than a failed cleanup.
        let _ = fs::remove_file(tmp);
        return Err(e);
    }
    // The rename is only durable once the directory entry itself is on disk.
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(at("syncing directory", parent))
}

fn write_synced(tmp: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut options = OpenOptions::new();
    // create_new: never follow a symlink or reuse a file someone else planted.
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // State files name agents and reasons; nobody else needs to read them.
        options.mode(0o600);
    }
    let mut file = options.open(tmp)?;
    file.write_all(bytes)?;
    file.sync_all()
}
