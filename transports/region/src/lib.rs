//! The registered memory a transport receives into and sends from (the node's arena, or a
//! heap buffer in tests). Shared by every transport; the only unsafe code they share.
//!
//! # Memory model
//!
//! A region's bytes are shared with writers outside this process's Rust code: clients map
//! the arena read-write (a hostile one writes whenever it likes, sealed or not), and the
//! kernel receives into it and sends from it. Those writers are outside Rust's memory model:
//! they can change the bytes a copy or a checksum sees (a torn copy, a wrong sum), never
//! where it reads or writes, as long as nothing builds a reference the compiler relies on.
//! So this crate never builds a reference (`&[u8]`, `&mut [u8]`) over region memory: every
//! access is a raw-pointer copy between the region and private memory (a caller's buffer, a
//! small bounce buffer for checksums).
//!
//! Between threads of this process it is different: a non-atomic write racing another
//! thread's read or write of the same bytes is a data race, undefined behaviour, raw
//! pointers or not. In-process transports copy into a region from other threads, so every
//! in-process write is `unsafe` and carries the promise that rules such races out: writing
//! (`copy_to`, `write_from`, the test trait's `write`) promises that nothing else in the
//! process reads or writes the destination range during the call, and a transport's users
//! make the same promise for a read's destination and a granted range through the `unsafe`
//! `Transport::read` and `Transport::grant`. Reading (`checksum`, `read_into`) is safe: what
//! it reads is either not being written in this process (by those promises) or written only
//! by clients and the kernel.

use std::sync::Arc;

/// Size of the stack bounce buffer [`Region::checksum`] hashes through (fits in L1 beside
/// the hasher's state).
pub const BOUNCE: usize = 4 << 10;

/// A region: a pointer and a length kept valid by an owner held alongside.
///
/// Cloning is cheap (one `Arc`); every operation that points into the region (an io_uring
/// op, an in-process copy) holds a clone, so the owner outlives any use of the memory.
///
/// Writing into a region from this process is `unsafe`: the caller promises that nothing
/// else in the process touches the range meanwhile (module doc).
///
/// ```compile_fail,E0133
/// let (a, b) = (ferroplasma_region::Region::owned(8), ferroplasma_region::Region::owned(8));
/// a.copy_to(0, &b, 0, 8);
/// ```
///
/// ```compile_fail,E0133
/// use ferroplasma_transport::conformance::RegionAccess;
/// ferroplasma_region::Region::owned(8).write(0, b"bytes");
/// ```
#[derive(Clone)]
pub struct Region {
    ptr: *mut u8,
    len: usize,
    owner: Arc<dyn Send + Sync>,
}

// SAFETY: the pointer is only dereferenced by raw-pointer copies (never through a reference,
// see the module's memory model), or handed to the kernel by a transport. Every in-process
// write is an `unsafe fn` whose caller promises that nothing else in the process accesses
// the range meanwhile (and transports write only under the promises of the `unsafe`
// `Transport::read`/`grant`), so sharing the handle between threads races nothing; the
// owner keeps the memory alive and is itself Send + Sync.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region").field("len", &self.len).finish()
    }
}

/// Heap bytes behind an owned region. A `Vec`, not a `Box`: moving a `Box` asserts unique
/// access to its contents, which would invalidate the region's pointer under Rust's aliasing
/// rules; `Vec::as_mut_ptr` promises the pointer stays valid while the `Vec` lives unchanged.
struct Owned(#[allow(dead_code)] Vec<std::cell::UnsafeCell<u8>>);
// SAFETY: the bytes are only touched through raw pointers under the rules of `Region`.
unsafe impl Sync for Owned {}

impl Region {
    /// A fresh zeroed region on the heap (tests, benchmarks).
    pub fn owned(len: usize) -> Self {
        let mut b: Vec<std::cell::UnsafeCell<u8>> =
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
    /// `ptr..ptr + len` must stay mapped and writable while `owner` lives, and nothing else
    /// in this process may access a range while a transport receives into it (a read's
    /// destination, until its [`ReadDone`](ferroplasma_transport::Event::ReadDone)) or
    /// write a range while it is granted (until its
    /// [`Revoked`](ferroplasma_transport::Event::Revoked)); a live reference over a range
    /// counts as an access (a `&mut` as a write) for as long as it lives, and no reference
    /// over any part of the memory may live while the region's methods access that part.
    /// Writers outside the process (clients) that break this only change the bytes:
    /// regions copy through raw pointers and build no references.
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

    /// The xxh3 checksum of `[off, off + len)`, if in bounds: the same digest as
    /// [`chunk_sum`](ferroplasma_transport::frame::chunk_sum) over those bytes. The bytes are
    /// copied through a [`BOUNCE`]-byte stack buffer into xxh3's streaming hasher, never
    /// read through a reference: a client writing the range meanwhile only makes the sum
    /// wrong (the receiver then rejects the chunk).
    pub fn checksum(&self, off: u64, len: u64) -> Option<u64> {
        self.checksum_through::<BOUNCE>(off, len)
    }

    /// [`Region::checksum`] through a bounce buffer of `B` bytes.
    fn checksum_through<const B: usize>(&self, off: u64, len: u64) -> Option<u64> {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        self.pieces::<B>(off, len, |b| h.update(b))
            .then(|| h.digest())
    }

    /// Hands `[off, off + len)` to `f` piece by piece, each piece first copied into a
    /// private `B`-byte stack buffer with a raw copy (the region is memory others can write:
    /// no `&[u8]` over it); `false` (nothing handed) if out of bounds.
    fn pieces<const B: usize>(&self, off: u64, len: u64, mut f: impl FnMut(&[u8])) -> bool {
        let Some((ptr, n)) = self.ptr_at(off, len) else {
            return false;
        };
        let mut bounce = [0u8; B];
        let mut done = 0;
        while done < n {
            let k = B.min(n - done);
            // SAFETY: `ptr + done .. ptr + done + k` lies inside the region (checked by
            // `ptr_at`; `done + k <= n`), which the held owner keeps mapped; the bounce
            // buffer is private and `k <= B`, so the ranges do not overlap. A raw copy
            // asserts nothing about concurrent writers (module memory model).
            unsafe {
                std::ptr::copy_nonoverlapping(ptr.add(done).cast_const(), bounce.as_mut_ptr(), k);
            }
            f(&bounce[..k]);
            done += k;
        }
        true
    }

    /// Copies `dst.len()` bytes at `off` out into `dst`; `false` (nothing copied) if the
    /// range is out of bounds.
    pub fn read_into(&self, off: u64, dst: &mut [u8]) -> bool {
        let Some((src, n)) = self.ptr_at(off, dst.len() as u64) else {
            return false;
        };
        // SAFETY: the source lies inside the region (checked), which the held owner keeps
        // mapped. `dst` is a `&mut [u8]` of `n` bytes, so it cannot overlap the source:
        // region memory is never referenced while the region is in use (`owned` keeps its
        // buffer private; `from_raw`'s contract forbids references over it). Another thread
        // of this process writes the source only under an `unsafe` promise that nothing
        // else reads it meanwhile (module doc); clients and the kernel may write it, which
        // only changes the bytes copied.
        unsafe { std::ptr::copy_nonoverlapping(src.cast_const(), dst.as_mut_ptr(), n) };
        true
    }

    /// Copies `src` into the region at `off`; `false` (nothing copied) if out of bounds.
    ///
    /// # Safety
    /// Nothing else in this process reads or writes `[off, off + src.len())` of this region
    /// during the call (it is not the destination of a read in flight, not granted, and no
    /// other thread copies into or out of it).
    pub unsafe fn write_from(&self, off: u64, src: &[u8]) -> bool {
        let Some((dst, n)) = self.ptr_at(off, src.len() as u64) else {
            return false;
        };
        // SAFETY: the destination lies inside the region (checked) and the held owner keeps
        // it mapped; `src` is private memory, so they cannot overlap; the caller promises no
        // other access to the destination meanwhile.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, n) };
        true
    }

    /// Copies `len` bytes at `off` into `dst` at `dst_off`; `false` (nothing copied) if
    /// either range is out of bounds.
    ///
    /// # Safety
    /// Nothing else in this process writes the source range, or reads or writes the
    /// destination range, during the call: for a transport, the source is granted (not
    /// written while granted) and the destination belongs to a read it has not reported
    /// done.
    pub unsafe fn copy_to(&self, off: u64, dst: &Region, dst_off: u64, len: u64) -> bool {
        let (Some((s, n)), Some((d, _))) = (self.ptr_at(off, len), dst.ptr_at(dst_off, len)) else {
            return false;
        };
        // SAFETY: both ranges lie inside their regions (checked), kept mapped by the held
        // owners; `copy` allows them to overlap; the caller promises no other access
        // meanwhile.
        unsafe { std::ptr::copy(s.cast_const(), d, n) };
        true
    }

    /// Keeps the memory alive for the rest of the process (used when the kernel may still
    /// reference it at drop).
    pub fn leak(&self) {
        std::mem::forget(Arc::clone(&self.owner));
    }

    /// Hands `[off, off + len)` to `f` in pieces of up to 64 KiB, each copied into a
    /// private bounce buffer first (no `&[u8]` over region memory); `false` if out of
    /// bounds. Used for keyed chunk MACs (BLAKE3 hashes 64 KiB pieces with its widest SIMD).
    pub fn read_through(&self, off: u64, len: u64, f: impl FnMut(&[u8])) -> bool {
        self.pieces::<{ 64 << 10 }>(off, len, f)
    }
}

impl ferroplasma_transport::conformance::RegionAccess for Region {
    unsafe fn write(&self, offset: u64, bytes: &[u8]) {
        // SAFETY: the caller's promise (`RegionAccess::write`) is `write_from`'s.
        let ok = unsafe { self.write_from(offset, bytes) };
        assert!(ok, "write in bounds");
    }

    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        assert!(self.read_into(offset, &mut v), "read in bounds");
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferroplasma_transport::conformance::RegionAccess;

    /// The bounce-buffered checksum is the one-shot xxh3 of the same bytes, for lengths
    /// around the bounce buffer's size and xxh3's internal block sizes, at odd offsets.
    #[test]
    fn checksum_matches_one_shot() {
        let r = Region::owned(4 * BOUNCE + 4096);
        let bytes: Vec<u8> = (0..r.len())
            .map(|i| (i * 7 + i / 251).to_le_bytes()[0])
            .collect();
        // SAFETY: nothing else uses this fresh region.
        unsafe { r.write(0, &bytes) };
        for len in [
            0,
            1,
            16,
            17,
            128,
            129,
            240,
            241,
            1024,
            BOUNCE - 1,
            BOUNCE,
            BOUNCE + 1,
            3 * BOUNCE + 17,
        ] {
            for off in [0usize, 1, 63, 4095] {
                let want = ferroplasma_transport::frame::chunk_sum(&bytes[off..off + len]);
                assert_eq!(
                    r.checksum(off as u64, len as u64),
                    Some(want),
                    "{len} bytes at {off}"
                );
            }
        }
        assert_eq!(r.checksum(r.len() - 1, 2), None);
        assert_eq!(r.checksum(u64::MAX, 2), None);
    }

    /// Cost of hashing through the bounce buffer against the one-shot xxh3 of a slice:
    /// `cargo test -p ferroplasma-region --release -- --ignored --nocapture checksum_cost`.
    #[test]
    #[ignore = "benchmark: prints figures, run in release"]
    fn checksum_cost() {
        use std::time::Instant;
        const CHUNK: usize = 4 << 20;
        const CHUNKS: usize = 16;
        const ROUNDS: usize = 31;
        let r = Region::owned(CHUNK * CHUNKS);
        let bytes: Vec<u8> = (0..r.len())
            .map(|i| (i * 31 + i / 7).to_le_bytes()[0])
            .collect();
        // SAFETY: nothing else uses this fresh region.
        unsafe { r.write(0, &bytes) };
        let gbs = |f: &dyn Fn(usize) -> u64| {
            let t = Instant::now();
            let mut x = 0;
            for c in 0..CHUNKS {
                x ^= f(c);
            }
            std::hint::black_box(x);
            (CHUNK * CHUNKS) as f64 / t.elapsed().as_secs_f64() / 1e9
        };
        let off = |c: usize| (c * CHUNK) as u64;
        let mut runs: [Vec<f64>; 5] = Default::default();
        for _ in 0..ROUNDS {
            runs[0].push(gbs(&|c| {
                ferroplasma_transport::frame::chunk_sum(&bytes[c * CHUNK..(c + 1) * CHUNK])
            }));
            runs[1].push(gbs(&|c| r.checksum(off(c), CHUNK as u64).unwrap_or(0)));
            runs[2].push(gbs(&|c| {
                r.checksum_through::<1024>(off(c), CHUNK as u64)
                    .unwrap_or(0)
            }));
            runs[3].push(gbs(&|c| {
                r.checksum_through::<8192>(off(c), CHUNK as u64)
                    .unwrap_or(0)
            }));
            runs[4].push(gbs(&|c| {
                r.checksum_through::<{ 16 << 10 }>(off(c), CHUNK as u64)
                    .unwrap_or(0)
            }));
        }
        let names = [
            "one-shot slice".to_string(),
            format!("bounce {} KiB", BOUNCE >> 10),
            "bounce 1 KiB".into(),
            "bounce 8 KiB".into(),
            "bounce 16 KiB".into(),
        ];
        for (name, mut v) in names.into_iter().zip(runs) {
            v.sort_by(f64::total_cmp);
            println!(
                "{name:>15}: median {:.2} GB/s (min {:.2}, max {:.2}) over {ROUNDS} x 16 x 4 MiB",
                v[v.len() / 2],
                v[0],
                v[v.len() - 1]
            );
        }
    }

    #[test]
    fn out_of_bounds_copies_do_nothing() {
        let a = Region::owned(16);
        let b = Region::owned(16);
        // SAFETY: nothing else uses these fresh regions.
        unsafe {
            assert!(!a.write_from(10, &[1; 7]));
            assert!(!a.copy_to(0, &b, 10, 7));
            assert!(!a.copy_to(u64::MAX, &b, 0, 2));
            assert!(a.write_from(0, &[9; 16]));
            assert!(a.copy_to(0, &b, 8, 8));
        }
        assert!(!b.read_into(9, &mut [0; 8]));
        assert_eq!(b.read(0, 16), [[0; 8], [9; 8]].concat());
    }
}
