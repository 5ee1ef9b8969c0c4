//! The memory a mem transport copies from and into. The only unsafe code of this crate.

use std::sync::Arc;

/// A region: a pointer and a length kept valid by an owner held alongside.
#[derive(Clone)]
pub struct Region {
    ptr: *mut u8,
    len: usize,
    _owner: Arc<dyn Send + Sync>,
}

// SAFETY: the pointer is only dereferenced through `copy_to`/`write`/`read`, whose callers
// (the transports and the cluster logic above them) write each byte range from one place at
// a time: a read destination belongs to that read until it completes, and a granted range is
// immutable while granted. The owner keeps the memory alive and is itself Send + Sync.
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
    /// A fresh zeroed region on the heap (tests).
    pub fn owned(len: usize) -> Self {
        let mut b: Box<[std::cell::UnsafeCell<u8>]> =
            (0..len).map(|_| std::cell::UnsafeCell::new(0)).collect();
        let ptr = b.as_mut_ptr().cast::<u8>();
        Self {
            ptr,
            len,
            _owner: Arc::new(Owned(b)),
        }
    }

    /// A region over memory someone else owns.
    ///
    /// # Safety
    /// `ptr..ptr + len` must stay mapped and writable while `owner` lives, and nothing may
    /// access a range while a transport reads into it or serves it, except reads of
    /// immutable (granted) ranges.
    pub unsafe fn from_raw(ptr: *mut u8, len: usize, owner: Arc<dyn Send + Sync>) -> Self {
        Self {
            ptr,
            len,
            _owner: owner,
        }
    }

    /// Length.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn range(&self, off: u64, len: u64) -> Option<usize> {
        let end = off.checked_add(len)?;
        (end <= self.len as u64).then(|| usize::try_from(off).ok())?
    }

    /// Copies `len` bytes at `off` into `dst` at `dst_off`; `false` if either range is out
    /// of bounds.
    pub fn copy_to(&self, off: u64, dst: &Region, dst_off: u64, len: u64) -> bool {
        let (Some(s), Some(d), Ok(n)) = (
            self.range(off, len),
            dst.range(dst_off, len),
            usize::try_from(len),
        ) else {
            return false;
        };
        // SAFETY: both ranges were checked against their regions; the regions are distinct
        // allocations or, within one, the caller's ranges do not overlap (a read destination
        // is never a granted source); validity is the `Region` contract.
        unsafe { std::ptr::copy(self.ptr.add(s), dst.ptr.add(d), n) };
        true
    }
}

impl ferroplasma_transport::conformance::RegionAccess for Region {
    fn write(&self, offset: u64, bytes: &[u8]) {
        let s = self
            .range(offset, bytes.len() as u64)
            .expect("write in bounds");
        // SAFETY: bounds checked; tests write while no transfer touches the range.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(s), bytes.len()) };
    }

    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let s = self.range(offset, len as u64).expect("read in bounds");
        let mut v = vec![0u8; len];
        // SAFETY: bounds checked; tests read after transfers completed.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(s), v.as_mut_ptr(), len) };
        v
    }
}
