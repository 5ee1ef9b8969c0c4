//! The registered memory a transport receives into and sends from (the node's arena, or a
//! heap buffer in tests). Shared by every transport; the only unsafe code they share.

use std::sync::Arc;

/// A region: a pointer and a length kept valid by an owner held alongside.
///
/// Cloning is cheap (one `Arc`); every operation that points into the region (an io_uring
/// op, an in-process copy) holds a clone, so the owner outlives any use of the memory.
#[derive(Clone)]
pub struct Region {
    ptr: *mut u8,
    len: usize,
    owner: Arc<dyn Send + Sync>,
}

// SAFETY: the pointer is only dereferenced through `checksum`, `copy_to` and the
// `RegionAccess` test methods, or handed to the kernel by a transport; callers write each byte
// range from one place at a time (a read destination belongs to that read until it
// completes, a granted range is immutable while granted), which is the `from_raw` contract.
// The owner keeps the memory alive and is itself Send + Sync.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region").field("len", &self.len).finish()
    }
}

struct Owned(#[allow(dead_code)] Box<[std::cell::UnsafeCell<u8>]>);
// SAFETY: the bytes are only touched through raw pointers under the rules of `Region`.
unsafe impl Sync for Owned {}

impl Region {
    /// A fresh zeroed region on the heap (tests, benchmarks).
    pub fn owned(len: usize) -> Self {
        let mut b: Box<[std::cell::UnsafeCell<u8>]> =
            (0..len).map(|_| std::cell::UnsafeCell::new(0)).collect();
        let ptr = b.as_mut_ptr().cast::<u8>();
        Self {
            ptr,
            len,
            owner: Arc::new(Owned(b)),
        }
    }

    /// A region over memory someone else owns (the arena).
    ///
    /// # Safety
    /// `ptr..ptr + len` must stay mapped and writable while `owner` lives, and nothing may
    /// access a range while a transport receives into it (a read's destination, until its
    /// [`ReadDone`](ferroplasma_transport::Event::ReadDone)) or writes a range while it is
    /// granted (until its [`Revoked`](ferroplasma_transport::Event::Revoked)).
    pub unsafe fn from_raw(ptr: *mut u8, len: usize, owner: Arc<dyn Send + Sync>) -> Self {
        Self { ptr, len, owner }
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        u64::try_from(self.len).unwrap_or(u64::MAX)
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The start index of `[off, off + len)` if it lies inside the region.
    fn range(&self, off: u64, len: u64) -> Option<usize> {
        let end = off.checked_add(len)?;
        if end > self.len() {
            return None;
        }
        usize::try_from(off).ok()
    }

    /// A pointer to `[off, off + len)` and its length, if the range lies inside the region.
    /// Producing the pointer is harmless; a transport hands it to the kernel under the
    /// `from_raw` contract.
    pub fn ptr_at(&self, off: u64, len: u64) -> Option<(*mut u8, usize)> {
        let start = self.range(off, len)?;
        let n = usize::try_from(len).ok()?;
        // `wrapping_add` keeps this safe; `start + n <= self.len`, so it stays in bounds.
        Some((self.ptr.wrapping_add(start), n))
    }

    /// The xxh3 checksum of `[off, off + len)`, if in bounds. The range must be a granted
    /// range or a read destination the transport finished writing.
    pub fn checksum(&self, off: u64, len: u64) -> Option<u64> {
        let (ptr, n) = self.ptr_at(off, len)?;
        // SAFETY: in bounds of a live mapping (the owner is held by `self`); the caller
        // checksums either a granted range (immutable while granted) or a read destination
        // whose bytes are all in (its last receive completed), so nothing writes the bytes
        // while the slice lives.
        let bytes = unsafe { std::slice::from_raw_parts(ptr.cast_const(), n) };
        Some(ferroplasma_transport::frame::chunk_sum(bytes))
    }

    /// Copies `len` bytes at `off` into `dst` at `dst_off`; `false` if either range is out
    /// of bounds.
    pub fn copy_to(&self, off: u64, dst: &Region, dst_off: u64, len: u64) -> bool {
        let (Some((s, n)), Some((d, _))) = (self.ptr_at(off, len), dst.ptr_at(dst_off, len)) else {
            return false;
        };
        // SAFETY: both ranges were checked against their regions; the regions are distinct
        // allocations or, within one, the caller's ranges do not overlap (a read destination
        // is never a granted source); validity is the `from_raw` contract.
        unsafe { std::ptr::copy(s.cast_const(), d, n) };
        true
    }

    /// Keeps the memory alive for the rest of the process (used when the kernel may still
    /// reference it at drop).
    pub fn leak(&self) {
        std::mem::forget(Arc::clone(&self.owner));
    }

    /// Hands `[off, off + len)` to `f` piece by piece, each piece copied into a private
    /// bounce buffer first (the region is memory others can write: no `&[u8]` over it);
    /// `false` if out of bounds. Used for keyed chunk MACs.
    pub fn read_through(&self, off: u64, len: u64, mut f: impl FnMut(&[u8])) -> bool {
        const PIECE: usize = 64 << 10;
        let Some((ptr, n)) = self.ptr_at(off, len) else {
            return false;
        };
        let mut bounce = vec![0u8; PIECE.min(n)];
        let mut done = 0;
        while done < n {
            let k = PIECE.min(n - done);
            // SAFETY: `ptr..ptr + n` is in bounds of a live mapping (checked by `ptr_at`; the
            // owner is held by `self`) and `done + k <= n`; the bounce buffer is our own and
            // holds `k` bytes. A concurrent writer can change what is copied, never where.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr.add(done).cast_const(), bounce.as_mut_ptr(), k);
            }
            f(&bounce[..k]);
            done += k;
        }
        true
    }
}

impl ferroplasma_transport::conformance::RegionAccess for Region {
    fn write(&self, offset: u64, bytes: &[u8]) {
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        let (ptr, n) = self.ptr_at(offset, len).expect("write in bounds");
        // SAFETY: bounds checked; tests write while no transfer touches the range.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr, n) };
    }

    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let l = u64::try_from(len).unwrap_or(u64::MAX);
        let (ptr, n) = self.ptr_at(offset, l).expect("read in bounds");
        let mut v = vec![0u8; n];
        // SAFETY: bounds checked; tests read after transfers completed.
        unsafe { std::ptr::copy_nonoverlapping(ptr.cast_const(), v.as_mut_ptr(), n) };
        v
    }
}
