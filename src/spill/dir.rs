//! Exclusive use of a spill directory. At start a node removes the spill files it finds in
//! its directories, so two live nodes must never share one: each directory holds a lock file
//! that the node keeps `flock`ed (exclusive, non-blocking) for as long as it runs, and that
//! names the holder (pid and socket) so that a second node can say who is in the way.
//!
//! Spill directories must support `flock` (local file systems do; NFS and some FUSE file
//! systems may refuse it, and then the node does not start).
//!
//! The lock file is never removed: removing it would let a node lock a fresh file while
//! another still holds the old, unlinked one. The kernel drops the lock when the holder's
//! file is closed, which includes the holder dying.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
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
///
/// The default spill directory lives in world-writable `/var/tmp` under a predictable name,
/// so nothing here trusts a path someone else could have prepared: directories this makes
/// are private (0700); the spill directory must be a real directory (not a symlink) of our
/// user that nobody else may write, in a directory of ours or root's that others may write
/// only if it is sticky (as `/var/tmp` itself); the lock file is opened without following a
/// symlink and must be a regular file of ours. Anything else is refused, naming the path.
pub fn lock_dir(dir: &Path, socket: &Path) -> Result<DirLock, LockError> {
    let io_err = |source| LockError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    private_dir(dir).map_err(io_err)?;
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        // Never through a symlink; never blocking on a planted FIFO.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                refused(&path, "is a symlink; refusing to follow it")
            } else {
                e
            }
        })
        .map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if !meta.file_type().is_file() {
        return Err(io_err(refused(&path, "is not a regular file")));
    }
    check_owner(&path, &meta).map_err(io_err)?;
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

/// Makes `dir` (and missing parents) with mode 0700 and checks, without following symlinks,
/// that it is ours alone; checks that its parent is ours or root's and, if others may write
/// it, sticky (so nobody else can rename or replace `dir`).
fn private_dir(dir: &Path) -> io::Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if std::fs::symlink_metadata(parent).is_err() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    let pm = std::fs::metadata(parent)?;
    if pm.uid() != my_uid() && pm.uid() != 0 {
        return Err(refused(parent, &format!("is owned by uid {}", pm.uid())));
    }
    if pm.mode() & 0o022 != 0 && pm.mode() & 0o1000 == 0 {
        return Err(refused(
            parent,
            &format!(
                "is writable by others and not sticky (mode {:o})",
                pm.mode() & 0o7777
            ),
        ));
    }
    match DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let m = std::fs::symlink_metadata(dir)?;
    if m.file_type().is_symlink() {
        return Err(refused(dir, "is a symlink; give the directory itself"));
    }
    if !m.is_dir() {
        return Err(refused(dir, "is not a directory"));
    }
    check_owner(dir, &m)?;
    if m.mode() & 0o022 != 0 {
        return Err(refused(
            dir,
            &format!("is writable by others (mode {:o})", m.mode() & 0o7777),
        ));
    }
    Ok(())
}

fn my_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

fn check_owner(path: &Path, m: &std::fs::Metadata) -> io::Result<()> {
    if m.uid() == my_uid() {
        Ok(())
    } else {
        Err(refused(
            path,
            &format!("is owned by uid {}, not by us (uid {})", m.uid(), my_uid()),
        ))
    }
}

fn refused(path: &Path, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("{} {why}", path.display()),
    )
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

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fp-spill-lock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A lock file that is a symlink (planted by someone who could write the directory) is
    /// refused, and the file it points to is neither truncated nor written.
    #[test]
    fn a_symlinked_lock_file_is_refused_and_its_target_untouched() {
        let base = scratch("symlink");
        let dir = base.join("spill");
        std::fs::create_dir(&dir).unwrap();
        let victim = base.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join(LOCK_FILE)).unwrap();
        let e = lock_dir(&dir, Path::new("/run/a.sock")).expect_err("a symlinked lock file");
        let msg = e.to_string();
        assert!(msg.contains(LOCK_FILE), "{msg}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// Whether this process may give files away (root, as the tests run in CI); says so
    /// when it cannot.
    fn can_chown() -> bool {
        let root = rustix::process::geteuid().is_root();
        if !root {
            eprintln!("SKIPPED: needs root to make files owned by another user");
        }
        root
    }

    const NOBODY: u32 = 65534;

    fn chown(p: &Path, uid: u32) {
        std::os::unix::fs::lchown(p, Some(uid), None).unwrap();
    }

    #[test]
    fn a_lock_file_of_another_user_is_refused() {
        if !can_chown() {
            return;
        }
        let base = scratch("owner-file");
        let dir = base.join("spill");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(LOCK_FILE), b"someone else's").unwrap();
        chown(&dir.join(LOCK_FILE), NOBODY);
        let e = lock_dir(&dir, Path::new("/run/a.sock")).expect_err("a lock file of another user");
        assert!(e.to_string().contains("owned by uid 65534"), "{e}");
        assert_eq!(
            std::fs::read(dir.join(LOCK_FILE)).unwrap(),
            b"someone else's"
        );
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// The spill directory itself, or the directory it is made in (the per-user directory in
    /// world-writable /var/tmp that the default spill directory lives in, which anybody
    /// could have made first), owned by another user: refused.
    #[test]
    fn a_directory_of_another_user_is_refused() {
        if !can_chown() {
            return;
        }
        let base = scratch("owner-dir");
        let dir = base.join("spill");
        std::fs::create_dir(&dir).unwrap();
        chown(&dir, NOBODY);
        let e = lock_dir(&dir, Path::new("/run/a.sock")).expect_err("a directory of another user");
        assert!(e.to_string().contains("owned by uid 65534"), "{e}");
        assert!(!dir.join(LOCK_FILE).exists());

        let parent = base.join("ferroplasma-0");
        std::fs::create_dir(&parent).unwrap();
        chown(&parent, NOBODY);
        let dir = parent.join("node.sock.spill");
        let e = lock_dir(&dir, Path::new("/run/a.sock")).expect_err("a parent of another user");
        assert!(e.to_string().contains("owned by uid 65534"), "{e}");
        assert!(
            !dir.exists(),
            "nothing is made inside another user's directory"
        );
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// A spill directory that others may write, or a symlink where the directory should
    /// be: refused. Directories made here are private (0700).
    #[test]
    fn a_writable_or_symlinked_directory_is_refused_and_new_ones_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let base = scratch("mode");
        let dir = base.join("open");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = lock_dir(&dir, Path::new("/run/a.sock")).expect_err("a world-writable directory");
        assert!(e.to_string().contains("writable by others"), "{e}");

        let link = base.join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let e = lock_dir(&link, Path::new("/run/a.sock")).expect_err("a symlinked directory");
        assert!(e.to_string().contains("symlink"), "{e}");

        let fresh = base.join("a").join("b");
        let l = lock_dir(&fresh, Path::new("/run/a.sock")).unwrap();
        for d in [base.join("a"), fresh.clone()] {
            let mode = std::fs::symlink_metadata(&d).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "{}", d.display());
        }
        drop(l);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
