//! A single-producer single-consumer byte ring of length-prefixed records in shared memory.
//!
//! Layout of one ring (offsets from the ring's base; see docs/shm-layout.md):
//! ```text
//!   0  tail: u64   next byte the producer will write (monotonic, never wraps)
//!  64  head: u64   next byte the consumer will read  (monotonic, never wraps)
//! 128  data: [u8; capacity]   capacity is a power of two
//! ```
//! A record is an 8-byte header `{ len: u32, kind: u32 }` and `len` payload bytes, padded to
//! 8 bytes. A record never wraps: when it does not fit before the end of the data area the
//! producer writes a `PAD` record up to the end and starts again at 0.
//!
//! The peer on the other side may be hostile. Neither side keeps a reference into the ring;
//! every index read from it is checked against the capacity and the local position before use,
//! and payloads are copied out before they are decoded.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::shm::SharedMapping;

/// Bytes of ring header before the data area.
pub const RING_HEADER: u64 = 128;
const RING_HEADER_USIZE: usize = 128;
const _: () = assert!(RING_HEADER_USIZE as u64 == RING_HEADER);
const TAIL_OFFSET: usize = 0;
const HEAD_OFFSET: usize = 64;
const RECORD_HEADER: u64 = 8;
const KIND_DATA: u32 = 0;
const KIND_PAD: u32 = 1;

/// The ring's shared state was inconsistent: the peer wrote garbage into it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RingError {
    /// Indices out of range.
    #[error("ring indices are inconsistent (head {head}, tail {tail}, capacity {capacity})")]
    BadIndices {
        /// Head as read.
        head: u64,
        /// Tail as read.
        tail: u64,
        /// Ring capacity.
        capacity: u64,
    },
    /// A record header that cannot be right.
    #[error("malformed ring record at {position}: len {len}, kind {kind}")]
    BadRecord {
        /// Position of the record.
        position: u64,
        /// Length field.
        len: u32,
        /// Kind field.
        kind: u32,
    },
    /// The message is bigger than a record can be.
    #[error("message of {len} bytes exceeds the ring's record limit of {max}")]
    TooLarge {
        /// Message length.
        len: u64,
        /// Limit.
        max: u64,
    },
}

/// Where a ring lives inside a mapping. Owns a reference to the mapping so that it outlives
/// every access.
#[derive(Debug, Clone)]
struct RingMem {
    map: Arc<SharedMapping>,
    base: usize,
    capacity: u64,
}

impl RingMem {
    fn new(map: Arc<SharedMapping>, offset: u64, capacity: u64) -> Option<Self> {
        if !capacity.is_power_of_two() || capacity < 4096 || offset % 64 != 0 {
            return None;
        }
        map.check_range(offset, RING_HEADER.checked_add(capacity)?)?;
        Some(Self {
            base: usize::try_from(offset).ok()?,
            map,
            capacity,
        })
    }

    fn atomic(&self, at: usize) -> &AtomicU64 {
        // SAFETY: `base + at` (at is 0 or 64) lies in the mapping (checked in `new`), is 8-byte
        // aligned (base is 64-aligned, the mapping page-aligned), and the mapping lives as long
        // as `self`. Shared memory may be written by the peer at any time, which is exactly
        // what an atomic tolerates.
        unsafe { &*self.map.as_ptr().add(self.base + at).cast::<AtomicU64>() }
    }

    fn tail(&self) -> &AtomicU64 {
        self.atomic(TAIL_OFFSET)
    }

    fn head(&self) -> &AtomicU64 {
        self.atomic(HEAD_OFFSET)
    }

    fn data_ptr(&self, pos: u64) -> *mut u8 {
        debug_assert!(pos < self.capacity);
        let pos = usize::try_from(pos % self.capacity).unwrap_or(0);
        // SAFETY: `pos < capacity` and the data area `base+128 .. base+128+capacity` lies in the
        // mapping (checked in `new`), so the pointer stays in bounds.
        unsafe { self.map.as_ptr().add(self.base + RING_HEADER_USIZE + pos) }
    }

    fn max_record(&self) -> u64 {
        self.capacity / 2 - RECORD_HEADER
    }

    fn write(&self, pos: u64, src: &[u8]) {
        debug_assert!(pos + src.len() as u64 <= self.capacity);
        // An empty part may sit exactly at the end of the data area: nothing to copy, and
        // `data_ptr` takes only positions inside it.
        if src.is_empty() {
            return;
        }
        // SAFETY: callers pass `pos + len <= capacity` (records never wrap), so the destination
        // is inside the data area; no reference to it exists on our side.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.data_ptr(pos), src.len()) };
    }

    fn read(&self, pos: u64, dst: &mut [u8]) {
        debug_assert!(pos + dst.len() as u64 <= self.capacity);
        if dst.is_empty() {
            return;
        }
        // SAFETY: `pos + len <= capacity` (callers check), so the source is inside the data
        // area. A misbehaving peer may write these bytes while we copy them: that is a race on
        // plain bytes we never hold a reference to, and the copy is treated as untrusted input
        // (decoded with bounds checks), so the worst outcome is a garbled message.
        unsafe { std::ptr::copy_nonoverlapping(self.data_ptr(pos), dst.as_mut_ptr(), dst.len()) };
    }
}

fn padded(len: u64) -> u64 {
    RECORD_HEADER + len.next_multiple_of(8)
}

/// The writing end of a ring. One per ring.
#[derive(Debug)]
pub struct Producer {
    mem: RingMem,
    tail: u64,
    /// The consumer's head as last read. The shared head is read again only when this copy
    /// says there is not enough room, which saves a cache-line transfer on most pushes.
    head_cache: u64,
}

impl Producer {
    /// Attaches to the ring at `offset` in `map`, continuing from its current tail.
    /// Returns `None` when the ring does not fit the mapping or the capacity is invalid.
    pub fn attach(map: Arc<SharedMapping>, offset: u64, capacity: u64) -> Option<Self> {
        let mem = RingMem::new(map, offset, capacity)?;
        let tail = mem.tail().load(Ordering::Acquire);
        let head_cache = mem.head().load(Ordering::Acquire);
        if tail.wrapping_sub(head_cache) > capacity {
            return None;
        }
        Some(Self {
            mem,
            tail,
            head_cache,
        })
    }

    /// Largest payload one record may carry.
    pub fn max_record(&self) -> u64 {
        self.mem.max_record()
    }

    /// Appends one record made of `parts` concatenated. `Ok(false)` when there is no room now.
    pub fn try_push(&mut self, parts: &[&[u8]]) -> Result<bool, RingError> {
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        if len > self.mem.max_record() {
            return Err(RingError::TooLarge {
                len,
                max: self.mem.max_record(),
            });
        }
        let cap = self.mem.capacity;
        let total = padded(len);
        let pos = self.tail % cap;
        let to_end = cap - pos;
        let need = if total <= to_end {
            total
        } else {
            to_end + total
        };
        if !self.room_for(need)? {
            return Ok(false);
        }
        let mut pos = pos;
        if total > to_end {
            let pad_len = u32::try_from(to_end - RECORD_HEADER).unwrap_or(0);
            self.mem.write(pos, &header(pad_len, KIND_PAD));
            self.tail += to_end;
            pos = 0;
        }
        let len32 = u32::try_from(len).unwrap_or(u32::MAX);
        self.mem.write(pos, &header(len32, KIND_DATA));
        let mut at = pos + RECORD_HEADER;
        for p in parts {
            self.mem.write(at, p);
            at += p.len() as u64;
        }
        self.tail += total;
        // SYNC POINT: pairs with the consumer's `tail.load(Acquire)`: the record bytes written
        // above are visible before the new tail is.
        self.mem.tail().store(self.tail, Ordering::Release);
        Ok(true)
    }

    /// Whether the consumer has read everything pushed so far.
    pub fn is_drained(&self) -> bool {
        self.mem.head().load(Ordering::Acquire) == self.tail
    }

    /// Whether at least `n` bytes are free, reading the shared head only if the cached one
    /// says no. A corrupt head reads as "no room".
    pub fn has_room(&mut self, n: u64) -> bool {
        self.room_for(n).unwrap_or(false)
    }

    /// Whether at least `n` bytes are free, like [`has_room`](Self::has_room), but a head the
    /// consumer corrupted is an error.
    pub fn check_room(&mut self, n: u64) -> Result<bool, RingError> {
        self.room_for(n)
    }

    fn room_for(&mut self, need: u64) -> Result<bool, RingError> {
        let cached = self.mem.capacity - self.tail.wrapping_sub(self.head_cache);
        if cached >= need {
            return Ok(true);
        }
        Ok(self.refresh_head()? >= need)
    }

    fn refresh_head(&mut self) -> Result<u64, RingError> {
        let cap = self.mem.capacity;
        // SYNC POINT: pairs with the consumer's `head.store(Release)` after it copied a record
        // out, so the space we are about to reuse is no longer read.
        let head = self.mem.head().load(Ordering::Acquire);
        // The head only moves forward, and never past the tail.
        let used = self.tail.wrapping_sub(head);
        if used > cap || head.wrapping_sub(self.head_cache) > cap {
            return Err(RingError::BadIndices {
                head,
                tail: self.tail,
                capacity: cap,
            });
        }
        self.head_cache = head;
        Ok(cap - used)
    }
}

fn header(len: u32, kind: u32) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&len.to_le_bytes());
    h[4..].copy_from_slice(&kind.to_le_bytes());
    h
}

/// The reading end of a ring. One per ring.
#[derive(Debug)]
pub struct Consumer {
    mem: RingMem,
    head: u64,
}

impl Consumer {
    /// Attaches to the ring at `offset` in `map`, continuing from its current head.
    pub fn attach(map: Arc<SharedMapping>, offset: u64, capacity: u64) -> Option<Self> {
        let mem = RingMem::new(map, offset, capacity)?;
        let head = mem.head().load(Ordering::Acquire);
        Some(Self { mem, head })
    }

    /// Whether a record may be waiting (cheap; one shared load).
    pub fn has_data(&self) -> bool {
        // SYNC POINT: pairs with the producer's `tail.store(Release)`.
        self.mem.tail().load(Ordering::Acquire) != self.head
    }

    /// Copies the next record's payload into `buf` (replacing its contents). `Ok(false)` when
    /// the ring is empty. An error means the ring is corrupt and the peer must be dropped.
    pub fn pop(&mut self, buf: &mut Vec<u8>) -> Result<bool, RingError> {
        let cap = self.mem.capacity;
        // A record of at most capacity/2 always fits at position 0, so an honest producer
        // never writes two pads in a row: a second one is corruption (and bounds this loop).
        let mut padded_once = false;
        loop {
            // SYNC POINT: pairs with the producer's `tail.store(Release)`: the record bytes are
            // visible once the tail that covers them is.
            let tail = self.mem.tail().load(Ordering::Acquire);
            let avail = tail.wrapping_sub(self.head);
            if avail == 0 {
                return Ok(false);
            }
            let bad_indices = RingError::BadIndices {
                head: self.head,
                tail,
                capacity: cap,
            };
            if avail > cap || avail < RECORD_HEADER {
                return Err(bad_indices);
            }
            let pos = self.head % cap;
            let mut h = [0u8; 8];
            self.mem.read(pos, &mut h);
            let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
            let kind = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
            let bad = RingError::BadRecord {
                position: self.head,
                len,
                kind,
            };
            match kind {
                KIND_PAD => {
                    let skip = cap - pos;
                    if padded_once || u64::from(len) + RECORD_HEADER != skip || skip > avail {
                        return Err(bad);
                    }
                    padded_once = true;
                    self.head += skip;
                    self.mem.head().store(self.head, Ordering::Release);
                }
                KIND_DATA => {
                    let len64 = u64::from(len);
                    let total = padded(len64);
                    if len64 > self.mem.max_record() || total > cap - pos || total > avail {
                        return Err(bad);
                    }
                    let n = len as usize;
                    buf.clear();
                    buf.resize(n, 0);
                    self.mem.read(pos + RECORD_HEADER, buf);
                    self.head += total;
                    // SYNC POINT: pairs with the producer's `head.load(Acquire)`: we are done
                    // reading the record, so its space may be reused.
                    self.mem.head().store(self.head, Ordering::Release);
                    return Ok(true);
                }
                _ => return Err(bad),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use std::fs::File;

    fn mapping(len: usize) -> Arc<SharedMapping> {
        let fd = rustix::fs::memfd_create("ring-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, len as u64).unwrap();
        Arc::new(SharedMapping::new(File::from(fd), len, false).unwrap())
    }

    #[test]
    fn wraps_with_padding_and_keeps_order() {
        let map = mapping(8192 + 4096);
        let mut p = Producer::attach(map.clone(), 0, 8192).unwrap();
        let mut c = Consumer::attach(map, 0, 8192).unwrap();
        let mut buf = Vec::new();
        let mut rng = fastrand::Rng::with_seed(1);
        let mut next_in = 0u32;
        let mut next_out = 0u32;
        for _ in 0..20_000 {
            if rng.bool() {
                let len = rng.usize(4..3000);
                let mut msg = vec![0u8; len];
                msg[..4].copy_from_slice(&next_in.to_le_bytes());
                msg[4..].fill(u8::try_from(next_in % 251).unwrap());
                if p.try_push(&[&msg[..2], &msg[2..]]).unwrap() {
                    next_in += 1;
                }
            } else if c.pop(&mut buf).unwrap() {
                let seq = u32::from_le_bytes(buf[..4].try_into().unwrap());
                assert_eq!(seq, next_out);
                assert!(buf[4..].iter().all(|&b| u32::from(b) == seq % 251));
                next_out += 1;
            }
        }
        while c.pop(&mut buf).unwrap() {
            next_out += 1;
        }
        assert_eq!(next_in, next_out);
        assert!(p.is_drained());
    }

    #[test]
    fn an_empty_last_part_at_the_end_of_the_ring() {
        // Found by the `ring_consumer` fuzz target: a record ending exactly at the end of
        // the data area with an empty last part made the producer ask for the position one
        // past the end (a debug assertion; a zero-byte copy in release builds).
        let map = mapping(8192 + 4096);
        let mut p = Producer::attach(map.clone(), 0, 4096).unwrap();
        let mut c = Consumer::attach(map, 0, 4096).unwrap();
        let max = usize::try_from(p.max_record()).unwrap();
        assert!(p.try_push(&[&vec![1u8; max]]).unwrap());
        assert!(p.try_push(&[&vec![2u8; max], &[]]).unwrap());
        let mut buf = Vec::new();
        assert!(c.pop(&mut buf).unwrap() && buf == vec![1u8; max]);
        assert!(c.pop(&mut buf).unwrap() && buf == vec![2u8; max]);
        assert!(!c.pop(&mut buf).unwrap());
    }

    #[test]
    fn oversized_message_is_refused() {
        let map = mapping(8192 + 4096);
        let mut p = Producer::attach(map, 0, 8192).unwrap();
        assert!(matches!(
            p.try_push(&[&[0u8; 5000]]),
            Err(RingError::TooLarge { .. })
        ));
    }

    #[test]
    fn hostile_indices_and_headers_are_errors_not_panics() {
        let map = mapping(8192 + 4096);
        let mut c = Consumer::attach(map.clone(), 0, 8192).unwrap();
        let mut buf = Vec::new();
        let mut rng = fastrand::Rng::with_seed(99);
        for _ in 0..50_000 {
            // Scribble random tail/head and random record headers, like a hostile client.
            let tail = match rng.u8(0..4) {
                0 => rng.u64(..),
                _ => c.head.wrapping_add(rng.u64(0..9000)),
            };
            let ring_pos = usize::try_from(c.head % 8192).unwrap();
            let mut scribble = [0u8; 8];
            rng.fill(&mut scribble);
            if rng.bool() {
                scribble[4..].copy_from_slice(&u32::from(rng.bool()).to_le_bytes());
            }
            assert!(map.write_at((RING_HEADER as usize + ring_pos) as u64, &scribble));
            assert!(map.write_at(0, &tail.to_le_bytes()));
            if let Ok(true) = c.pop(&mut buf) {
                assert!(buf.len() as u64 <= 4096);
            }
        }
    }
}
