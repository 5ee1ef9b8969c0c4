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
