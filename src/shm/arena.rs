//! The node's shared-memory arena: one memfd, hugepage-backed when possible, fully backed by
//! real memory before the daemon accepts its first client.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::time::Instant;

use rustix::fs::{FallocateFlags, MemfdFlags};

use super::mapping::SharedMapping;
use crate::size::ByteSize;

/// Size of a huge page used for the arena.
pub const HUGEPAGE_SIZE: u64 = 2 << 20;
/// Size of a normal page.
pub const PAGE_SIZE: u64 = 4096;

/// Whether the arena uses 2 MiB hugepages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum HugepageMode {
    /// Hugepages when enough are free, else 4 KiB pages (logged).
    #[default]
    Auto,
    /// Hugepages or fail at start.
    On,
    /// 4 KiB pages.
    Off,
}

/// Errors creating the arena. Each names the size asked for.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArenaError {
    /// `--hugepages on` but not enough free hugepages.
    #[error(
        "need {needed} free 2 MiB hugepages for a {size} arena, {free} free: \
         echo {total_needed} > /proc/sys/vm/nr_hugepages (or use --hugepages auto)"
    )]
    NotEnoughHugepages {
        /// Arena size asked for.
        size: ByteSize,
        /// Pages needed.
        needed: u64,
        /// Pages free.
        free: u64,
        /// What `nr_hugepages` should be raised to.
        total_needed: u64,
    },
    /// The arena size is zero or smaller than one page.
    #[error("arena size {0} is too small: at least 2MiB")]
    TooSmall(ByteSize),
    /// The arena's memfd cannot be sealed against resizing.
    #[error("cannot seal the arena memfd against shrinking and growing (fcntl F_ADD_SEALS): {0}")]
    Seal(io::Error),
    /// The system cannot back the arena with real memory.
    #[error("cannot back a {size} arena with memory ({what}): {source}; try a smaller --memory")]
    Backing {
        /// Arena size asked for.
        size: ByteSize,
        /// Which step failed.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// What the system can give us, read from /proc and statvfs.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryFacts {
    /// Total RAM.
    pub total_ram: u64,
    /// `MemAvailable`.
    pub available_ram: u64,
    /// Free 2 MiB hugepages.
    pub free_hugepages: u64,
    /// Total 2 MiB hugepages reserved.
    pub total_hugepages: u64,
    /// Bytes available on /dev/shm, when it exists.
    pub shm_available: Option<u64>,
}

impl MemoryFacts {
    /// Reads the facts from this machine.
    pub fn read() -> Self {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |name: &str| -> Option<u64> {
            meminfo
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        };
        let sysfs = |f: &str| -> Option<u64> {
            std::fs::read_to_string(format!("/sys/kernel/mm/hugepages/hugepages-2048kB/{f}"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
        };
        let shm_available = rustix::fs::statvfs("/dev/shm")
            .ok()
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize));
        Self {
            total_ram: field("MemTotal:").unwrap_or(0) * 1024,
            available_ram: field("MemAvailable:").unwrap_or(0) * 1024,
            free_hugepages: sysfs("free_hugepages").unwrap_or(0),
            total_hugepages: sysfs("nr_hugepages").unwrap_or(0),
            shm_available,
        }
    }

    /// The default arena size: 30% of RAM, capped by what 4 KiB shared memory can back
    /// (available RAM and /dev/shm), or the free hugepages when they alone cover 30% of RAM.
    pub fn default_arena_size(&self) -> u64 {
        let want = self.total_ram / 10 * 3;
        let huge = self.free_hugepages * HUGEPAGE_SIZE;
        if huge >= want && want > 0 {
            return round_down(want, HUGEPAGE_SIZE);
        }
        let mut cap = self.available_ram / 10 * 9;
        if let Some(shm) = self.shm_available {
            cap = cap.min(shm);
        }
        round_down(want.min(cap).max(HUGEPAGE_SIZE), HUGEPAGE_SIZE)
    }
}

fn round_down(v: u64, to: u64) -> u64 {
    v / to * to
}

/// The daemon's arena: the memfd and the daemon's own mapping of it.
#[derive(Debug)]
pub struct Arena {
    mapping: SharedMapping,
    hugepages: bool,
}

impl Arena {
    /// Creates and fully backs an arena of `size` bytes (rounded down to 2 MiB).
    pub fn create(size: u64, mode: HugepageMode) -> Result<Self, ArenaError> {
        Self::create_with(size, mode, &MemoryFacts::read())
    }

    /// As [`Arena::create`], with the machine facts given (for tests of the decision).
    pub fn create_with(
        size: u64,
        mode: HugepageMode,
        facts: &MemoryFacts,
    ) -> Result<Self, ArenaError> {
        let size = round_down(size, HUGEPAGE_SIZE);
        if size == 0 {
            return Err(ArenaError::TooSmall(ByteSize(size)));
        }
        let needed = size / HUGEPAGE_SIZE;
        let use_huge = match mode {
            HugepageMode::Off => false,
            HugepageMode::On if facts.free_hugepages < needed => {
                return Err(ArenaError::NotEnoughHugepages {
                    size: ByteSize(size),
                    needed,
                    free: facts.free_hugepages,
                    total_needed: facts.total_hugepages - facts.free_hugepages + needed,
                })
            }
            HugepageMode::On => true,
            HugepageMode::Auto => {
                if facts.free_hugepages >= needed {
                    true
                } else {
                    tracing::info!(
                        needed,
                        free = facts.free_hugepages,
                        "not enough free 2 MiB hugepages for the arena; using 4 KiB pages \
                         (echo {} > /proc/sys/vm/nr_hugepages to get them)",
                        facts.total_hugepages - facts.free_hugepages + needed
                    );
                    false
                }
            }
        };
        match Self::back(size, use_huge) {
            Ok(a) => Ok(a),
            // Another process may have taken hugepages between our look and our fallocate.
            Err(e) if use_huge && mode == HugepageMode::Auto => {
                tracing::info!(error = %e, "hugepage arena failed; falling back to 4 KiB pages");
                Self::back(size, false)
            }
            Err(e) => Err(e),
        }
    }

    fn back(size: u64, huge: bool) -> Result<Self, ArenaError> {
        let err = |what, source| ArenaError::Backing {
            size: ByteSize(size),
            what,
            source,
        };
        let mut flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
        if huge {
            flags |= MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB;
        }
        let fd = rustix::fs::memfd_create("ferroplasma-arena", flags)
            .map_err(|e| err("memfd_create", e.into()))?;
        Self::back_memfd(fd, size, huge)
    }

    /// Sizes, backs, seals and maps a fresh memfd (made with `MFD_ALLOW_SEALING`).
    fn back_memfd(fd: OwnedFd, size: u64, huge: bool) -> Result<Self, ArenaError> {
        let err = |what, source| ArenaError::Backing {
            size: ByteSize(size),
            what,
            source,
        };
        rustix::fs::ftruncate(&fd, size).map_err(|e| err("ftruncate", e.into()))?;
        let started = Instant::now();
        tracing::info!(size = %ByteSize(size), huge, "backing the arena with memory");
        // Every page must exist before a client can touch it: a fault on a page that cannot be
        // allocated would be a SIGBUS in whichever process touched it. Hugepages are reserved
        // with fallocate (fails cleanly if too few are free); then all pages are faulted in
        // for writing, in parallel, which allocates the 4 KiB pages and fails cleanly too.
        if huge {
            rustix::fs::fallocate(&fd, FallocateFlags::empty(), 0, size)
                .map_err(|e| err("fallocate", e.into()))?;
        }
        // The size is fixed from here on: nobody (a client included) can shrink or grow it.
        // A client that could shrink it would make the node's next touch of the lost pages a
        // SIGBUS, so an arena that cannot be sealed is not served at all.
        // Seals do not stop a client from punching holes (fallocate PUNCH_HOLE) with the fd
        // it receives; on 4 KiB pages a later touch simply allocates a fresh page, on
        // hugepages it can fault if none is free. Clients run as the node's user and could
        // as well kill it: this is a guard against accidents, not a security boundary.
        rustix::fs::fcntl_add_seals(
            &fd,
            rustix::fs::SealFlags::SHRINK
                | rustix::fs::SealFlags::GROW
                | rustix::fs::SealFlags::SEAL,
        )
        .map_err(|e| ArenaError::Seal(e.into()))?;
        let len =
            usize::try_from(size).map_err(|_| err("size", io::ErrorKind::InvalidInput.into()))?;
        let mapping = SharedMapping::new(File::from(fd), len, false).map_err(|e| err("mmap", e))?;
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        match mapping.populate_all(threads) {
            Ok(()) => {}
            // MADV_POPULATE_WRITE arrived in Linux 5.14; before it, allocate with fallocate.
            Err(e)
                if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) && !huge =>
            {
                rustix::fs::fallocate(mapping.fd(), FallocateFlags::empty(), 0, size)
                    .map_err(|e| err("fallocate", e.into()))?;
            }
            Err(e) => return Err(err("populate", e)),
        }
        tracing::debug!(
            size = %ByteSize(size),
            huge,
            ms = started.elapsed().as_millis(),
            "arena backed and mapped"
        );
        Ok(Self {
            mapping,
            hugepages: huge,
        })
    }

    /// Arena size in bytes.
    pub fn size(&self) -> u64 {
        self.mapping.len() as u64
    }

    /// Whether 2 MiB hugepages back the arena.
    pub fn hugepages(&self) -> bool {
        self.hugepages
    }

    /// The daemon's mapping.
    pub fn mapping(&self) -> &SharedMapping {
        &self.mapping
    }

    /// Gives up the arena for its mapping (which keeps the memfd).
    pub fn into_mapping(self) -> SharedMapping {
        self.mapping
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_without_hugepages_names_the_fix() {
        let facts = MemoryFacts {
            total_ram: 8 << 30,
            available_ram: 8 << 30,
            free_hugepages: 64,
            total_hugepages: 64,
            shm_available: None,
        };
        let e = Arena::create_with(4 << 30, HugepageMode::On, &facts).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("need 2048 free 2 MiB hugepages"), "{msg}");
        assert!(msg.contains("64 free"), "{msg}");
        assert!(
            msg.contains("echo 2048 > /proc/sys/vm/nr_hugepages"),
            "{msg}"
        );
    }

    #[test]
    fn default_size_is_capped() {
        let facts = MemoryFacts {
            total_ram: 10 << 30,
            available_ram: 2 << 30,
            free_hugepages: 0,
            total_hugepages: 0,
            shm_available: Some(1 << 30),
        };
        assert_eq!(facts.default_arena_size(), 1 << 30);
        let roomy = MemoryFacts {
            available_ram: 10 << 30,
            shm_available: None,
            ..facts
        };
        assert_eq!(
            roomy.default_arena_size(),
            round_down(3 << 30, HUGEPAGE_SIZE)
        );
    }

    #[test]
    fn small_arena_is_backed_and_writable() {
        let a = Arena::create(4 << 20, HugepageMode::Off).unwrap();
        assert_eq!(a.size(), 4 << 20);
        assert!(!a.hugepages());
        assert!(a.mapping().write_at(4096, b"hello"));
        assert!(!a.mapping().write_at((4 << 20) - 2, b"hello"));
        assert_eq!(a.mapping().read_at(4096, 5).unwrap(), b"hello");
    }

    /// A memfd that cannot be sealed (made without `MFD_ALLOW_SEALING`) fails the arena's
    /// start-up with an error naming the step, instead of serving an arena a client could
    /// shrink.
    #[test]
    fn an_arena_that_cannot_be_sealed_is_an_error() {
        let fd = rustix::fs::memfd_create("fp-unsealable", MemfdFlags::CLOEXEC).unwrap();
        let e = Arena::back_memfd(fd, 4 << 20, false).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ArenaError::Seal(_)), "{msg}");
        assert!(msg.contains("cannot seal the arena"), "{msg}");
    }

    /// Nobody holding the arena's fd (every client does) can shrink or grow it.
    #[test]
    fn a_sealed_arena_cannot_be_resized() {
        let a = Arena::create(4 << 20, HugepageMode::Off).unwrap();
        let fd = a.mapping().fd();
        assert_eq!(
            rustix::fs::ftruncate(fd, 2 << 20),
            Err(rustix::io::Errno::PERM),
            "shrinking"
        );
        assert_eq!(
            rustix::fs::ftruncate(fd, 8 << 20),
            Err(rustix::io::Errno::PERM),
            "growing"
        );
        assert_eq!(rustix::fs::fstat(fd).unwrap().st_size, 4 << 20);
        // The seals themselves are sealed: they cannot be lifted or changed.
        assert!(rustix::fs::fcntl_add_seals(fd, rustix::fs::SealFlags::WRITE).is_err());
    }
}
