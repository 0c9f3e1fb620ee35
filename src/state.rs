//! State on disk (SPEC §12): the directories one process owns (`audit.path`,
//! `consent.journal`, later the sync outbox).
//!
//! - [`DirLock`] takes an exclusive advisory lock on `DIR/.lock` before anything
//!   in the directory is written, and records the holder (pid and host) in it, so a
//!   second process sharing the directory fails at start naming who has it instead
//!   of forking the audit chain or interleaving journal lines. The lock is the
//!   kernel's (`flock`), so a crashed holder never leaves a stale lock behind.
//! - [`private_dir`] creates a directory 0700 and tightens an existing looser one;
//!   [`private_file_options`] opens files 0600; [`tighten_file`] fixes an existing
//!   file. Journal and audit files hold pseudonymous but linkable data (hashes,
//!   external ids), so group and other get nothing.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The lock file inside an owned directory.
pub(crate) const LOCK_FILE: &str = ".lock";

/// An exclusive lock on a state directory, held for as long as the value lives.
#[derive(Debug)]
pub(crate) struct DirLock {
    // Keeping the file open keeps the flock; dropping it releases the lock.
    _file: File,
}

impl DirLock {
    /// Lock `dir` (created 0700 when missing). `what` names the directory in
    /// errors, e.g. `audit.path`. Fails at once, naming the holder, when another
    /// process has it.
    pub(crate) fn acquire(dir: &Path, what: &str) -> Result<DirLock, String> {
        private_dir(dir).map_err(|e| format!("{what} {}: {e}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        let mut file = private_file_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| format!("{what} {}: {e}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() {
                    "another process"
                } else {
                    holder
                };
                return Err(format!(
                    "{what} {} is locked by {holder} (lock file {}); one process owns a state \
                     directory: give this instance its own {what}",
                    dir.display(),
                    path.display()
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(format!("{what} {}: cannot lock: {e}", path.display()))
            }
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let me = format!("pid {} on {}", std::process::id(), host.trim());
        let written = file
            .set_len(0)
            .and_then(|_| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(me.as_bytes()))
            .and_then(|_| file.sync_data());
        if let Err(e) = written {
            // The lock holds without the note; only the message to a second process is poorer.
            tracing::warn!(path = %path.display(), error = %e, "could not record the lock holder");
        }
        Ok(DirLock { _file: file })
    }
}

/// Create `dir` (and parents) with mode 0700, or tighten an existing directory
/// that group or other can read, with a log line.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        tracing::info!(path = %dir.display(), "created state directory (mode 0700)");
        return Ok(());
    }
    tighten(dir, 0o700)
}

/// Options that create files 0600 (an existing file keeps its mode: see [`tighten_file`]).
pub(crate) fn private_file_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(0o600);
    o
}

/// Tighten an existing file to 0600 if group or other have any access, with a log line.
pub(crate) fn tighten_file(path: &Path) -> std::io::Result<()> {
    tighten(path, 0o600)
}

fn tighten(path: &Path, mode: u32) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    let current = meta.permissions().mode() & 0o777;
    if current & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        tracing::warn!(
            path = %path.display(),
            was = format!("{current:o}"),
            now = format!("{mode:o}"),
            "state file or directory was readable by others; permissions tightened"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_fails_naming_the_holder_and_is_free_after_drop() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("audit");
        let first = DirLock::acquire(&d, "audit.path").unwrap();
        let err = DirLock::acquire(&d, "audit.path").unwrap_err();
        assert!(err.contains("audit.path"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        DirLock::acquire(&d, "audit.path").unwrap();
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn loose_modes_are_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("j");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        let f = d.join("x");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        private_dir(&d).unwrap();
        tighten_file(&f).unwrap();
        assert_eq!(
            std::fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
