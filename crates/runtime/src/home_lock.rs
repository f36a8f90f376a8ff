//! One owner per home: a process holds an exclusive lock on its home for as
//! long as any of its runtimes there is open.
//!
//! Two processes each reconciling a home against the container engine would
//! remove containers the other has just made, and each keeps sandboxes and
//! contexts in memory the other cannot see. So the first process to open a
//! home owns it; within that process, runtimes share the claim. `airlock
//! serve` then offers the home to other processes through its API socket
//! ([`API_SOCKET_FILE`]); the CLI goes through it instead of opening the home.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// The lock file in the home; it also says who holds it (a pid and a role).
pub const LOCK_FILE: &str = "runtime.lock";
/// The Unix socket `airlock serve` answers the HTTP API on, in the home: the
/// home's other users (the CLI) reach the runtime through it while the server
/// owns the home. It is as private as the home (mode 0700).
pub const API_SOCKET_FILE: &str = "api.sock";
/// Between tries of a lock another process holds.
const LOCK_RETRY: Duration = Duration::from_millis(50);
/// Longest "holder" text read from a lock file (it is ours, but bounded anyway).
const MAX_HOLDER_TEXT: u64 = 256;

/// This process's claim on a home. Clones of a runtime, and other runtimes
/// of this process on the same home, share one.
#[derive(Debug)]
pub(crate) struct HomeLock {
    file: File,
}

impl Drop for HomeLock {
    fn drop(&mut self) {
        // Closing the file releases the lock; say no one holds it. The map's
        // entry stays (a dead `Weak`): taking the map here could deadlock with
        // a claim that waits, holding it, for this very file to close.
        let _ = self.file.set_len(0);
    }
}

static HELD: Mutex<BTreeMap<PathBuf, Weak<HomeLock>>> = Mutex::new(BTreeMap::new());

/// Claims `home` (an absolute, canonical path) for this process, waiting up
/// to `wait` for another process to let it go; `role` is what a refused
/// process is told holds it (such as "airlock serve").
pub(crate) fn claim(home: &Path, role: &str, wait: Duration) -> Result<Arc<HomeLock>> {
    let mut held = HELD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(lock) = held.get(home).and_then(Weak::upgrade) {
        return Ok(lock);
    }
    let path = home.join(LOCK_FILE);
    let io_error = |source| Error::File { operation: "lock home", path: path.display().to_string(), source };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&path)
        .map_err(io_error)?;
    let started = Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(TryLockError::WouldBlock) if started.elapsed() < wait => std::thread::sleep(LOCK_RETRY),
            Err(TryLockError::WouldBlock) => {
                return Err(Error::HomeInUse { home: home.to_path_buf(), holder: holder_of(&mut file) });
            }
            Err(TryLockError::Error(source)) => return Err(io_error(source)),
        }
    }
    let stamp = format!("pid {} ({role})\n", std::process::id());
    file.set_len(0).and_then(|()| file.rewind()).and_then(|()| file.write_all(stamp.as_bytes())).map_err(io_error)?;
    let lock = Arc::new(HomeLock { file });
    held.insert(home.to_path_buf(), Arc::downgrade(&lock));
    Ok(lock)
}

fn holder_of(file: &mut File) -> String {
    let mut text = String::new();
    let _ = file.rewind().and_then(|()| file.take(MAX_HOLDER_TEXT).read_to_string(&mut text));
    match text.trim() {
        "" => "another process".to_string(),
        holder => holder.to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn one_process_shares_its_claim_and_releases_it_with_the_last_holder() {
        let home = tempfile::tempdir().unwrap();
        let first = claim(home.path(), "test", Duration::ZERO).unwrap();
        let second = claim(home.path(), "test", Duration::ZERO).unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        assert!(std::fs::read_to_string(home.path().join(LOCK_FILE)).unwrap().contains("(test)"));
        drop(first);
        drop(second);
        assert_eq!(std::fs::read_to_string(home.path().join(LOCK_FILE)).unwrap(), "");
        // Claimed again from scratch once released.
        claim(home.path(), "test", Duration::ZERO).unwrap();
    }

    #[test]
    fn a_planted_link_is_not_followed() {
        let home = tempfile::tempdir().unwrap();
        let elsewhere = home.path().join("elsewhere");
        std::fs::write(&elsewhere, "keep").unwrap();
        std::os::unix::fs::symlink(&elsewhere, home.path().join(LOCK_FILE)).unwrap();
        let error = claim(home.path(), "test", Duration::ZERO).unwrap_err();
        assert!(matches!(error, Error::File { .. }), "{error}");
        assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "keep");
    }
}
