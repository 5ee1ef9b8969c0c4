//! A shared mapping of a memfd, and the only place that turns its addresses into slices.
//!
//! Every process that maps the arena can write to it (clients write object data in place), so
//! the daemon never keeps its own bookkeeping in this memory and never reads structure out of
//! it. Object bytes are handed out as slices under the store's contract: an unsealed object is
//! written only by its creator, a sealed one by nobody.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use memmap2::{MmapOptions, MmapRaw};

/// Bytes [`SharedMapping::checksum`] copies out at a time.
const BOUNCE: usize = 4096;

/// A `MAP_SHARED` read-write mapping of a whole shared-memory file.
#[derive(Debug)]
pub struct SharedMapping {
    map: MmapRaw,
    file: File,
}

impl SharedMapping {
    /// Maps all `len` bytes of `file`. With `populate`, page tables are filled now
    /// (`MAP_POPULATE`) so that first touches do not fault later.
    pub fn new(file: File, len: usize, populate: bool) -> io::Result<Self> {
        let mut opts = MmapOptions::new();
        opts.len(len);
        if populate {
            opts.populate();
        }
        let map = opts.map_raw(&file)?;
        Ok(Self { map, file })
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the mapping is empty (never, for a valid arena).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// The backing file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The backing file descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Base address, for code that builds its own typed views (rings, segment headers).
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Checks that `offset..offset+len` lies inside the mapping.
    pub fn check_range(&self, offset: u64, len: u64) -> Option<(usize, usize)> {
        let off = usize::try_from(offset).ok()?;
        let len = usize::try_from(len).ok()?;
        let end = off.checked_add(len)?;
        (end <= self.len()).then_some((off, len))
    }

    /// Asks the kernel to fill page tables for a range that is about to be written, so that
    /// the copy that follows runs at memory speed. Errors are ignored: this is only a hint.
    pub fn prefault_write(&self, offset: u64, len: u64) {
        let Some((off, len)) = self.check_range(offset, len) else {
            return;
        };
        let page = 4096;
        let start = off & !(page - 1);
        let end = (off + len).div_ceil(page) * page;
        let end = end.min(self.len());
        if end <= start {
            return;
        }
        // SAFETY: `start..end` lies within our own live mapping (checked above), and
        // MADV_POPULATE_WRITE only faults pages in; it never changes their contents.
        let _ = unsafe {
            rustix::mm::madvise(
                self.as_ptr().add(start).cast(),
                end - start,
                rustix::mm::Advice::LinuxPopulateWrite,
            )
        };
    }

    /// Faults in every page of the mapping for writing (allocating the backing pages of the
    /// file), split over `threads` threads. Unlike `prefault_write` this reports failure:
    /// an error means the memory could not be provided.
    pub fn populate_all(&self, threads: usize) -> io::Result<()> {
        let page = 2 << 20;
        let len = self.len();
        let per = len.div_ceil(threads.max(1)).next_multiple_of(page);
        let base = self.as_ptr() as usize;
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..len.div_ceil(per))
                .map(|i| {
                    let start = i * per;
                    let n = per.min(len - start);
                    s.spawn(move || {
                        // SAFETY: `start..start + n` lies inside this live mapping (chunks of
                        // `len` split between the workers), which outlives the scope; the
                        // advice only faults pages in and never changes their contents.
                        unsafe {
                            rustix::mm::madvise(
                                (base + start) as *mut std::ffi::c_void,
                                n,
                                rustix::mm::Advice::LinuxPopulateWrite,
                            )
                        }
                    })
                })
                .collect();
            for w in workers {
                w.join()
                    .map_err(|_| io::Error::other("populate thread panicked"))??;
            }
            Ok(())
        })
    }

    /// A shared view of `len` bytes at `offset`, or `None` when out of bounds.
    ///
    /// # Safety
    /// Nobody may write the range while the returned slice lives. The store guarantees this
    /// for sealed objects that are pinned; any other use must guarantee it itself.
    pub unsafe fn slice(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let (off, len) = self.check_range(offset, len)?;
        // SAFETY: the range is inside the mapping (checked), the mapping lives as long as
        // `self`, and the caller guarantees that no one writes it meanwhile.
        Some(unsafe { std::slice::from_raw_parts(self.as_ptr().add(off), len) })
    }

    /// A mutable view of `len` bytes at `offset`, or `None` when out of bounds.
    ///
    /// # Safety
    /// The caller must be the only one reading or writing the range while the returned slice
    /// lives. The store guarantees this to the creator of an unsealed object.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, offset: u64, len: u64) -> Option<&mut [u8]> {
        let (off, len) = self.check_range(offset, len)?;
        // SAFETY: as in `slice`, plus exclusivity guaranteed by the caller.
        Some(unsafe { std::slice::from_raw_parts_mut(self.as_ptr().add(off), len) })
    }

    /// Copies `src` into the mapping at `offset`. Returns `false` when out of bounds.
    pub fn write_at(&self, offset: u64, src: &[u8]) -> bool {
        let Some((off, len)) = self.check_range(offset, src.len() as u64) else {
            return false;
        };
        // SAFETY: the destination range is inside the mapping (checked). It is raw shared
        // memory, so a concurrent writer could only scramble bytes of an object it may already
        // write; no Rust reference into it exists on our side.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.as_ptr().add(off), len) };
        true
    }

    /// Copies `dst.len()` bytes at `offset` out of the mapping into `dst`. Returns `false`
    /// (and leaves `dst` alone) when out of bounds.
    pub fn copy_out(&self, offset: u64, dst: &mut [u8]) -> bool {
        let Some((off, len)) = self.check_range(offset, dst.len() as u64) else {
            return false;
        };
        // SAFETY: the source range is inside the mapping (checked) and `dst` is valid for
        // `len` bytes. `dst` may itself lie in the mapping (a `slice_mut` view), even over the
        // source range, so the copy is `ptr::copy`, which allows overlap. A concurrent writer
        // could only make the copy meaningless (no reference into the source is made).
        unsafe { std::ptr::copy(self.as_ptr().add(off), dst.as_mut_ptr(), len) };
        true
    }

    /// The xxh3-64 digest of `len` bytes at `offset` (the same value as `xxh3_64` over those
    /// bytes), or `None` when out of bounds. The bytes are copied through a 4 KiB stack
    /// bounce buffer (it stays in L1: about twice the speed of a 64 KiB heap buffer here)
    /// into the streaming hasher: no reference to the shared memory is ever made, so a
    /// client writing the range meanwhile only changes the digest.
    pub fn checksum(&self, offset: u64, len: u64) -> Option<u64> {
        self.checksum_through::<BOUNCE>(offset, len)
    }

    /// [`SharedMapping::checksum`] through a bounce buffer of `B` bytes.
    fn checksum_through<const B: usize>(&self, offset: u64, len: u64) -> Option<u64> {
        let end = offset.checked_add(len)?;
        self.check_range(offset, len)?;
        let mut bounce = [0u8; B];
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut at = offset;
        while at < end {
            let n = usize::try_from((end - at).min(B as u64)).ok()?;
            // In bounds: the whole range was checked above.
            if !self.copy_out(at, &mut bounce[..n]) {
                return None;
            }
            hasher.update(&bounce[..n]);
            at += n as u64;
        }
        Some(hasher.digest())
    }

    /// Copies `len` bytes at `offset` out of the mapping, or `None` when out of bounds.
    pub fn read_at(&self, offset: u64, len: u64) -> Option<Vec<u8>> {
        let (off, len) = self.check_range(offset, len)?;
        let mut v = vec![0u8; len];
        // SAFETY: the source range is inside the mapping (checked) and `v` is a fresh buffer
        // of `len` bytes. The bytes are raw shared memory: a concurrent writer could only make
        // the copy meaningless, never unsound (no reference into the range exists).
        unsafe { std::ptr::copy_nonoverlapping(self.as_ptr().add(off), v.as_mut_ptr(), len) };
        Some(v)
    }
}

// SAFETY: the mapping is process-wide memory; handing the handle to another thread changes
// nothing about who may access which bytes, and all access goes through the methods above.
unsafe impl Send for SharedMapping {}
// SAFETY: as above; `&SharedMapping` only exposes raw pointers and bounds-checked copies.
unsafe impl Sync for SharedMapping {}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(len: usize) -> SharedMapping {
        let fd =
            rustix::fs::memfd_create("fp-mapping-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, len as u64).unwrap();
        SharedMapping::new(File::from(fd), len, false).unwrap()
    }

    /// The bounce-buffer checksum is exactly xxh3-64 of the bytes (what the spill format
    /// stores), for lengths around the bounce buffer's size and at unaligned offsets.
    #[test]
    fn checksum_through_the_bounce_buffer_equals_one_shot_xxh3() {
        let len = 4 << 20;
        let m = mapping(len);
        let mut bytes = vec![0u8; len];
        fastrand::Rng::with_seed(5).fill(&mut bytes);
        assert!(m.write_at(0, &bytes));
        let k = BOUNCE;
        for (off, n) in [
            (0, 0),
            (0, 1),
            (3, 4095),
            (3, 4096),
            (4095, 4097),
            (0, k - 1),
            (0, k),
            (1, k + 1),
            (4096, 3 * k + 17),
            (0, len),
            (len - 5, 5),
        ] {
            assert_eq!(
                m.checksum(off as u64, n as u64),
                Some(xxhash_rust::xxh3::xxh3_64(&bytes[off..off + n])),
                "offset {off}, length {n}"
            );
        }
        assert_eq!(m.checksum(len as u64 - 5, 6), None);
        assert_eq!(m.checksum(u64::MAX, 2), None);
        let mut out = vec![0u8; 100];
        assert!(m.copy_out(7, &mut out));
        assert_eq!(out, bytes[7..107]);
        assert!(!m.copy_out(len as u64 - 99, &mut out));
    }

    /// Memory clients can write is never borrowed by the node: outside the client's own
    /// views (`client/view.rs`) and the client's check of its control segment header
    /// (`ring/segment.rs`), no code in the crate builds a slice over a `SharedMapping`.
    #[test]
    fn only_client_code_borrows_shared_memory() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let allowed = ["client/view.rs", "ring/segment.rs", "shm/mapping.rs"];
        let mut stack = vec![root.clone()];
        let mut offenders = Vec::new();
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap() {
                let path = e.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let rel = path
                    .strip_prefix(&root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                if path.extension().is_none_or(|x| x != "rs") || allowed.contains(&rel.as_str()) {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                for (n, line) in text.lines().enumerate() {
                    if line.contains(".slice(") || line.contains(".slice_mut(") {
                        offenders.push(format!("src/{rel}:{}: {}", n + 1, line.trim()));
                    }
                }
            }
        }
        assert!(offenders.is_empty(), "{offenders:#?}");
    }

    /// Speed of the bounce-buffer checksum by buffer size, against one-shot xxh3 of a slice:
    /// `cargo test -p ferroplasma --release --lib -- --ignored --nocapture checksum_speed`.
    #[test]
    #[ignore = "benchmark: prints figures, run in release"]
    fn checksum_speed() {
        use std::time::Instant;
        let len = 64 << 20;
        let m = mapping(len);
        let mut bytes = vec![0u8; len];
        fastrand::Rng::with_seed(9).fill(&mut bytes);
        assert!(m.write_at(0, &bytes));
        let gbs = |f: &dyn Fn() -> u64| {
            let mut best = 0f64;
            for _ in 0..15 {
                let t = Instant::now();
                std::hint::black_box(f());
                best = best.max(len as f64 / t.elapsed().as_secs_f64() / 1e9);
            }
            best
        };
        let n = len as u64;
        println!(
            "one-shot slice   {:5.1} GB/s",
            gbs(&|| xxhash_rust::xxh3::xxh3_64(&bytes))
        );
        println!(
            "4 KiB stack      {:5.1} GB/s",
            gbs(&|| m.checksum_through::<4096>(0, n).unwrap())
        );
        println!(
            "16 KiB stack     {:5.1} GB/s",
            gbs(&|| m.checksum_through::<16384>(0, n).unwrap())
        );
        println!(
            "64 KiB stack     {:5.1} GB/s",
            gbs(&|| m.checksum_through::<65536>(0, n).unwrap())
        );
    }
}
