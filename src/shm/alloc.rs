//! The arena allocator. It lives in the daemon only: its bookkeeping is ordinary heap memory
//! that no client can see or touch.
//!
//! Two tiers:
//! - **Slabs** for small objects: size classes 64 B to 2 KiB, each carved from 64 KiB slabs
//!   with a bitmap of slots. A slab whose last slot is freed goes back to the page tier, so
//!   churn of small objects does not pin large holes.
//! - **Pages** for everything else: best-fit over free extents kept twice (by offset, for
//!   coalescing with neighbours on free; by size, for best fit), 4096-byte granularity and
//!   alignment so that O_DIRECT I/O can run straight from an object.

use std::collections::{BTreeMap, BTreeSet};

/// Granularity and alignment of the page tier.
pub const PAGE: u64 = 4096;
/// Size of one slab of small slots.
pub const SLAB_SIZE: u64 = 64 * 1024;
/// Slot sizes of the small tier.
pub const SMALL_CLASSES: [u64; 6] = [64, 128, 256, 512, 1024, 2048];
/// Largest request served from a slab.
pub const SMALL_MAX: u64 = SMALL_CLASSES[SMALL_CLASSES.len() - 1];
#[allow(clippy::cast_possible_truncation)] // 1024, checked by the compiler at build time
const SLOTS_MAX: usize = (SLAB_SIZE / SMALL_CLASSES[0]) as usize;
const WORDS: usize = SLOTS_MAX / 64;

/// A block handed out by the allocator: `len` is what was reserved (at least what was asked).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Allocation {
    /// Offset in the arena.
    pub offset: u64,
    /// Reserved length.
    pub len: u64,
}

#[derive(Debug)]
struct Slab {
    class: usize,
    used: u32,
    bits: [u64; WORDS],
}

impl Slab {
    fn slots(&self) -> usize {
        usize::try_from(SLAB_SIZE / SMALL_CLASSES[self.class]).unwrap_or(0)
    }

    fn take(&mut self) -> Option<usize> {
        let slots = self.slots();
        for (w, word) in self.bits.iter_mut().enumerate() {
            if *word != u64::MAX {
                let bit = usize::try_from(word.trailing_ones()).ok()?;
                let slot = w * 64 + bit;
                if slot >= slots {
                    return None;
                }
                *word |= 1 << bit;
                self.used += 1;
                return Some(slot);
            }
        }
        None
    }

    fn put(&mut self, slot: usize) -> bool {
        let (w, bit) = (slot / 64, slot % 64);
        if slot >= self.slots() || self.bits[w] & (1 << bit) == 0 {
            return false;
        }
        self.bits[w] &= !(1 << bit);
        self.used -= 1;
        true
    }

    fn is_full(&self) -> bool {
        self.used as usize == self.slots()
    }
}

/// Point-in-time allocator figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// Arena size.
    pub capacity: u64,
    /// Bytes reserved by live allocations.
    pub allocated: u64,
    /// `capacity - allocated`.
    pub free: u64,
    /// The largest single allocation that would succeed now.
    pub largest_free: u64,
    /// Number of free extents in the page tier.
    pub free_extents: u64,
    /// Slabs in use.
    pub slabs: u64,
}

impl AllocStats {
    /// `1 - largest_free / free`: 0 when all free memory is one block.
    pub fn fragmentation(&self) -> f64 {
        if self.free == 0 {
            return 0.0;
        }
        #[allow(clippy::cast_precision_loss)]
        let r = self.largest_free as f64 / self.free as f64;
        1.0 - r
    }
}

/// The arena allocator. See the module docs.
#[derive(Debug)]
pub struct Allocator {
    capacity: u64,
    by_offset: BTreeMap<u64, u64>,
    by_size: BTreeSet<(u64, u64)>,
    allocated: u64,
    slabs: BTreeMap<u64, Slab>,
    partial: [BTreeSet<u64>; SMALL_CLASSES.len()],
    /// One empty slab kept per class, so that alloc/free of a lone small object does not
    /// create and destroy a slab each time. Given back when the page tier runs short.
    spare: [Option<u64>; SMALL_CLASSES.len()],
}

impl Allocator {
    /// An allocator over `capacity` bytes (rounded down to [`PAGE`]).
    pub fn new(capacity: u64) -> Self {
        let capacity = capacity / PAGE * PAGE;
        let mut a = Self {
            capacity,
            by_offset: BTreeMap::new(),
            by_size: BTreeSet::new(),
            allocated: 0,
            slabs: BTreeMap::new(),
            partial: Default::default(),
            spare: [None; SMALL_CLASSES.len()],
        };
        if capacity > 0 {
            a.insert_free(0, capacity);
        }
        a
    }

    /// Total bytes managed.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// How many bytes a request of `size` would reserve.
    pub fn reserved_len(size: u64) -> u64 {
        let size = size.max(1);
        match SMALL_CLASSES.iter().find(|&&c| c >= size) {
            Some(&c) => c,
            None => size.div_ceil(PAGE).saturating_mul(PAGE),
        }
    }

    /// Reserves at least `size` bytes (`size == 0` reserves one small slot). Small requests
    /// are 64-byte aligned, others 4096-byte aligned.
    pub fn alloc(&mut self, size: u64) -> Option<Allocation> {
        let size = size.max(1);
        if let Some(class) = SMALL_CLASSES.iter().position(|&c| c >= size) {
            return self.alloc_small(class);
        }
        let len = size.checked_next_multiple_of(PAGE)?;
        let offset = self.alloc_pages(len)?;
        self.allocated += len;
        Some(Allocation { offset, len })
    }

    /// Returns a block. Returns `false` (and changes nothing) if `a` is not a live allocation.
    pub fn free(&mut self, a: Allocation) -> bool {
        if a.len <= SMALL_MAX {
            return self.free_small(a);
        }
        if a.len % PAGE != 0
            || a.offset % PAGE != 0
            || a.offset.saturating_add(a.len) > self.capacity
        {
            return false;
        }
        // A double free would overlap a free extent.
        if self.overlaps_free(a.offset, a.len) {
            return false;
        }
        self.allocated -= a.len;
        self.free_pages(a.offset, a.len);
        true
    }

    /// Current figures.
    pub fn stats(&self) -> AllocStats {
        let largest_page = self.by_size.last().map_or(0, |&(s, _)| s);
        let largest_page = if self.spare.iter().any(Option::is_some) {
            largest_page.max(SLAB_SIZE)
        } else {
            largest_page
        };
        let largest_slot = SMALL_CLASSES
            .iter()
            .zip(&self.partial)
            .filter(|(_, p)| !p.is_empty())
            .map(|(&c, _)| c)
            .max()
            .unwrap_or(0);
        AllocStats {
            capacity: self.capacity,
            allocated: self.allocated,
            free: self.capacity - self.allocated,
            largest_free: largest_page.max(largest_slot),
            free_extents: self.by_offset.len() as u64,
            slabs: self.slabs.len() as u64,
        }
    }

    fn alloc_small(&mut self, class: usize) -> Option<Allocation> {
        let slot_size = SMALL_CLASSES[class];
        let base = match self.partial[class].first() {
            Some(&b) => b,
            None => {
                let b = self.alloc_pages(SLAB_SIZE)?;
                self.slabs.insert(
                    b,
                    Slab {
                        class,
                        used: 0,
                        bits: [0; WORDS],
                    },
                );
                self.partial[class].insert(b);
                b
            }
        };
        if self.spare[class] == Some(base) {
            self.spare[class] = None;
        }
        let slab = self.slabs.get_mut(&base)?;
        let slot = slab.take()?;
        if slab.is_full() {
            self.partial[class].remove(&base);
        }
        self.allocated += slot_size;
        Some(Allocation {
            offset: base + slot as u64 * slot_size,
            len: slot_size,
        })
    }

    fn free_small(&mut self, a: Allocation) -> bool {
        // The slab holding `a` is the one with the greatest base at or below its offset.
        let Some((&base, slab)) = self.slabs.range_mut(..=a.offset).next_back() else {
            return false;
        };
        if a.offset >= base + SLAB_SIZE {
            return false;
        }
        let slot_size = SMALL_CLASSES[slab.class];
        let rel = a.offset - base;
        if slot_size != a.len || rel % slot_size != 0 {
            return false;
        }
        let Ok(slot) = usize::try_from(rel / slot_size) else {
            return false;
        };
        if !slab.put(slot) {
            return false;
        }
        self.allocated -= slot_size;
        let class = slab.class;
        self.partial[class].insert(base);
        if slab.used == 0 {
            match self.spare[class] {
                None => self.spare[class] = Some(base),
                Some(_) => self.release_slab(class, base),
            }
        }
        true
    }

    fn release_slab(&mut self, class: usize, base: u64) {
        self.slabs.remove(&base);
        self.partial[class].remove(&base);
        self.free_pages(base, SLAB_SIZE);
    }

    /// Gives the cached empty slabs back to the page tier. Returns whether there were any.
    pub fn trim(&mut self) -> bool {
        let mut any = false;
        for class in 0..SMALL_CLASSES.len() {
            if let Some(base) = self.spare[class].take() {
                self.release_slab(class, base);
                any = true;
            }
        }
        any
    }

    fn alloc_pages(&mut self, len: u64) -> Option<u64> {
        let found = self.by_size.range((len, 0)..).next().copied();
        let (size, offset) = match found {
            Some(f) => f,
            None if self.trim() => *self.by_size.range((len, 0)..).next()?,
            None => return None,
        };
        self.remove_free(offset, size);
        if size > len {
            self.insert_free(offset + len, size - len);
        }
        Some(offset)
    }

    fn free_pages(&mut self, mut offset: u64, mut len: u64) {
        if let Some((&prev_off, &prev_len)) = self.by_offset.range(..offset).next_back() {
            if prev_off + prev_len == offset {
                self.remove_free(prev_off, prev_len);
                offset = prev_off;
                len += prev_len;
            }
        }
        if let Some(&next_len) = self.by_offset.get(&(offset + len)) {
            self.remove_free(offset + len, next_len);
            len += next_len;
        }
        self.insert_free(offset, len);
    }

    fn overlaps_free(&self, offset: u64, len: u64) -> bool {
        if let Some((&o, &l)) = self.by_offset.range(..offset + len).next_back() {
            return o + l > offset;
        }
        false
    }

    fn insert_free(&mut self, offset: u64, len: u64) {
        self.by_offset.insert(offset, len);
        self.by_size.insert((len, offset));
    }

    fn remove_free(&mut self, offset: u64, len: u64) {
        self.by_offset.remove(&offset);
        self.by_size.remove(&(len, offset));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_disjoint(live: &[Allocation], cap: u64) {
        let mut v: Vec<_> = live.to_vec();
        v.sort_by_key(|a| a.offset);
        for w in v.windows(2) {
            assert!(
                w[0].offset + w[0].len <= w[1].offset,
                "overlap {:?} {:?}",
                w[0],
                w[1]
            );
        }
        if let Some(last) = v.last() {
            assert!(last.offset + last.len <= cap);
        }
    }

    #[test]
    fn alignment_and_reuse() {
        let mut a = Allocator::new(16 << 20);
        let small = a.alloc(100).unwrap();
        assert_eq!(small.len, 128);
        assert_eq!(small.offset % 64, 0);
        let big = a.alloc(5000).unwrap();
        assert_eq!(big.len, 8192);
        assert_eq!(big.offset % PAGE, 0);
        assert!(a.free(small));
        assert!(!a.free(small), "double free must be refused");
        assert!(a.free(big));
        assert!(!a.free(big), "double free must be refused");
        a.trim();
        let s = a.stats();
        assert_eq!(s.allocated, 0);
        assert_eq!(s.largest_free, 16 << 20);
        assert_eq!(s.free_extents, 1);
    }

    #[test]
    fn full_arena_then_exact_fit() {
        let mut a = Allocator::new(1 << 20);
        let whole = a.alloc(1 << 20).unwrap();
        assert!(a.alloc(1).is_none());
        assert!(a.alloc(PAGE).is_none());
        a.free(whole);
        assert!(a.alloc((1 << 20) + 1).is_none());
        assert_eq!(a.alloc(1 << 20).unwrap().offset, 0);
    }

    #[test]
    fn spare_slab_is_reused_then_given_back_under_pressure() {
        let mut a = Allocator::new(1 << 20);
        let x = a.alloc(100).unwrap();
        assert!(a.free(x));
        assert_eq!(a.stats().slabs, 1, "the empty slab is kept");
        assert_eq!(a.alloc(100).unwrap(), x, "and reused");
        let y = a.alloc(100).unwrap();
        assert!(a.free(x) && a.free(y));
        let whole = a
            .alloc(1 << 20)
            .expect("the spare slab is trimmed when pages run out");
        assert_eq!(whole.offset, 0);
    }

    /// Random churn of mixed sizes (100 B to 24 MiB) held near a target fill: no overlaps,
    /// counts add up, everything coalesces back at the end. Prints the fragmentation figure
    /// (largest free block against free bytes) after churn, for docs/benchmarks.md.
    fn churn(target_fill: f64) -> AllocStats {
        let cap = 256u64 << 20;
        let mut a = Allocator::new(cap);
        let mut rng = fastrand::Rng::with_seed(7);
        let mut live: Vec<Allocation> = Vec::new();
        for _ in 0..60_000 {
            #[allow(clippy::cast_precision_loss)]
            let fill = a.stats().allocated as f64 / cap as f64;
            if live.is_empty() || (fill < target_fill && rng.u32(0..100) < 55) {
                let size = match rng.u32(0..10) {
                    0..=5 => rng.u64(1..=200),
                    6..=7 => rng.u64(2049..=64 << 10),
                    8 => rng.u64(64 << 10..=4 << 20),
                    _ => rng.u64(4 << 20..=24 << 20),
                };
                if let Some(x) = a.alloc(size) {
                    assert!(x.len >= size);
                    live.push(x);
                }
            } else {
                let i = rng.usize(0..live.len());
                assert!(a.free(live.swap_remove(i)));
            }
        }
        check_disjoint(&live, cap);
        let sum: u64 = live.iter().map(|x| x.len).sum();
        let s = a.stats();
        assert_eq!(s.allocated, sum);
        println!(
            "churn at {:.0}% target fill: live={} allocated={} free={} largest_free={} extents={} slabs={} fragmentation={:.3}",
            target_fill * 100.0, live.len(), s.allocated, s.free, s.largest_free, s.free_extents, s.slabs, s.fragmentation()
        );
        for x in live.drain(..) {
            assert!(a.free(x));
        }
        a.trim();
        let end = a.stats();
        assert_eq!(end.allocated, 0);
        assert_eq!(
            end.largest_free, cap,
            "everything coalesces back into one block"
        );
        assert_eq!(end.slabs, 0);
        s
    }

    #[test]
    fn churn_reports_fragmentation() {
        let half = churn(0.5);
        let full = churn(0.95);
        // At half fill a large block must remain: an allocator that stopped coalescing or
        // scattered small objects across the arena would fail this.
        assert!(half.largest_free >= 32 << 20, "{half:?}");
        assert!(full.allocated > half.allocated);
    }
}
