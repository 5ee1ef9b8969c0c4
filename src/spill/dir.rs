//! Exclusive use of a spill directory. At start a node removes the spill files it finds in
//! its directories, so two live nodes must never share one: each directory holds a lock file
//! that the node keeps `flock`ed (exclusive, non-blocking) for as long as it runs, and that
//! names the holder (pid and socket) so that a second node can say who is in the way.
//!
//! The lock file is never removed: removing it would let a node lock a fresh file while
//! another still holds the old, unlinked one. The kernel drops the lock when the holder's
//! file is closed, which includes the holder dying.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;

/// The lock file's name inside each spill directory.
pub const LOCK_FILE: &str = "ferroplasma.lock";

/// A locked spill directory; the lock lasts as long as this value.
#[derive(Debug)]
pub struct DirLock {
    dir: PathBuf,
    _file: File,
}

impl DirLock {
    /// The locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Why a spill directory could not be locked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// Another live node holds the directory.
    #[error(
        "spill directory {} is in use by a running node ({holder}); give each node its own --spill-dir",
        dir.display()
    )]
    Held {
        /// The directory.
        dir: PathBuf,
        /// Who holds it, as its lock file says (`pid N, socket PATH`).
        holder: String,
    },
    /// The directory or its lock file could not be made or locked.
    #[error("cannot lock spill directory {}: {source}", dir.display())]
    Io {
        /// The directory.
        dir: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Creates `dir` if needed and locks it for a node listening on `socket`, or says who holds
/// it. Never blocks.
pub fn lock_dir(dir: &Path, socket: &Path) -> Result<DirLock, LockError> {
    let io_err = |source| LockError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io_err)?;
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io_err)?;
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            return Err(LockError::Held {
                dir: dir.to_path_buf(),
                holder: holder(&file),
            })
        }
        Err(e) => return Err(io_err(e.into())),
    }
    let me = format!("pid {}\nsocket {}\n", std::process::id(), socket.display());
    file.set_len(0).map_err(io_err)?;
    file.write_all_at(me.as_bytes(), 0).map_err(io_err)?;
    Ok(DirLock {
        dir: dir.to_path_buf(),
        _file: file,
    })
}

/// What a held lock file says about its holder, on one line.
fn holder(mut file: &File) -> String {
    let mut text = String::new();
    // A holder writes its name right after locking; an empty or unreadable file means it is
    // between the two, or was not written by us.
    let _ = file.by_ref().take(4096).read_to_string(&mut text);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        "holder unknown: its lock file is empty".to_string()
    } else {
        lines.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_locked_directory_names_its_holder_until_released() {
        let dir = std::env::temp_dir().join(format!("fp-spill-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = lock_dir(&dir, Path::new("/run/a.sock")).unwrap();
        assert_eq!(a.dir(), dir);
        match lock_dir(&dir, Path::new("/run/b.sock")) {
            Err(e @ LockError::Held { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(&format!("pid {}", std::process::id())),
                    "{msg}"
                );
                assert!(msg.contains("socket /run/a.sock"), "{msg}");
            }
            other => panic!("expected Held, got {other:?}"),
        }
        drop(a);
        let b = lock_dir(&dir, Path::new("/run/b.sock")).unwrap();
        let text = std::fs::read_to_string(dir.join(LOCK_FILE)).unwrap();
        assert!(text.contains("socket /run/b.sock"), "{text}");
        drop(b);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
