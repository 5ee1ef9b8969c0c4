//! The per-client control segment: a small memfd shared by the daemon and one client, holding
//! a header, the wake-up words and two rings (requests client→daemon, replies daemon→client).
//!
//! Byte layout (little endian; docs/shm-layout.md has the full diagram):
//! ```text
//!    0 magic        u64  "FPLSEGM1"
//!    8 version      u32  0 while the daemon initialises, then SEGMENT_VERSION
//!   12 header_len   u32  = HEADER_LEN
//!   16 req_offset   u64  request ring (client produces)
//!   24 req_capacity u64
//!   32 rep_offset   u64  reply ring (daemon produces)
//!   40 rep_capacity u64
//!   48 checksum     u32  FNV-1a of bytes 12..48
//!  128 daemon_sleeping u32   1 while the daemon is (about to be) asleep in epoll
//!  132 reply_room_wanted u32 1 while the daemon takes no requests because the reply ring
//!                            lacks room; the client rings the doorbell after reading replies
//!  192 client_sleeping u32   1 while the client is (about to be) asleep on client_futex
//!  196 client_futex    u32   bumped by the daemon to wake the client
//! ```
//! The daemon writes the header once and never reads it back: it keeps its own copy of the
//! offsets, so a client that scribbles on the header only breaks its own connection.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustix::thread::futex;

use super::spsc::{Consumer, Producer, RING_HEADER};
use crate::shm::SharedMapping;

/// "FPLSEGM1" read as a little-endian u64.
pub const SEGMENT_MAGIC: u64 = u64::from_le_bytes(*b"FPLSEGM1");
/// Current layout version. 0 means "initialising". Version 2 added `reply_room_wanted`.
pub const SEGMENT_VERSION: u32 = 2;
/// Bytes before the first ring.
pub const HEADER_LEN: u64 = 4096;
const HEADER_LEN_USIZE: usize = 4096;
const HEADER_LEN_U32: u32 = 4096;
const _: () = assert!(HEADER_LEN_USIZE as u64 == HEADER_LEN);
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_HEADER_LEN: usize = 12;
const OFF_REQ_OFFSET: usize = 16;
const OFF_REQ_CAP: usize = 24;
const OFF_REP_OFFSET: usize = 32;
const OFF_REP_CAP: usize = 40;
const OFF_CHECKSUM: usize = 48;
const OFF_DAEMON_SLEEPING: usize = 128;
const OFF_REPLY_ROOM_WANTED: usize = 132;
const OFF_CLIENT_SLEEPING: usize = 192;
const OFF_CLIENT_FUTEX: usize = 196;

/// Ring sizes of one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentLayout {
    /// Request ring capacity (power of two).
    pub req_capacity: u64,
    /// Reply ring capacity (power of two).
    pub rep_capacity: u64,
}

impl Default for SegmentLayout {
    fn default() -> Self {
        Self {
            req_capacity: 1 << 20,
            rep_capacity: 512 << 10,
        }
    }
}

impl SegmentLayout {
    /// Offset of the request ring.
    pub fn req_offset(&self) -> u64 {
        HEADER_LEN
    }

    /// Offset of the reply ring.
    pub fn rep_offset(&self) -> u64 {
        (HEADER_LEN + RING_HEADER + self.req_capacity).next_multiple_of(4096)
    }

    /// Total segment size.
    pub fn total_len(&self) -> u64 {
        (self.rep_offset() + RING_HEADER + self.rep_capacity).next_multiple_of(4096)
    }
}

/// Why a client could not use a segment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SegmentError {
    /// Wrong magic: not a ferroplasma segment.
    #[error("not a ferroplasma control segment (magic {0:#x})")]
    BadMagic(u64),
    /// The daemon speaks another layout version: upgrade one of the two.
    #[error("control segment version {found}, this client speaks {expected}: upgrade required")]
    Version {
        /// Found.
        found: u32,
        /// Expected.
        expected: u32,
    },
    /// Header fields do not match their checksum or do not fit the segment.
    #[error("control segment header is corrupt")]
    Corrupt,
}

fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// One side's handle on a control segment.
#[derive(Debug, Clone)]
pub struct Segment {
    map: Arc<SharedMapping>,
    layout: SegmentLayout,
}

impl Segment {
    /// Daemon side: writes a fresh header into `map` (which must be `layout.total_len()` long).
    pub fn init(map: Arc<SharedMapping>, layout: SegmentLayout) -> Option<Self> {
        if (map.len() as u64) < layout.total_len() {
            return None;
        }
        let mut h = [0u8; 52];
        h[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&SEGMENT_MAGIC.to_le_bytes());
        h[OFF_HEADER_LEN..OFF_HEADER_LEN + 4].copy_from_slice(&HEADER_LEN_U32.to_le_bytes());
        h[OFF_REQ_OFFSET..OFF_REQ_OFFSET + 8].copy_from_slice(&layout.req_offset().to_le_bytes());
        h[OFF_REQ_CAP..OFF_REQ_CAP + 8].copy_from_slice(&layout.req_capacity.to_le_bytes());
        h[OFF_REP_OFFSET..OFF_REP_OFFSET + 8].copy_from_slice(&layout.rep_offset().to_le_bytes());
        h[OFF_REP_CAP..OFF_REP_CAP + 8].copy_from_slice(&layout.rep_capacity.to_le_bytes());
        let sum = fnv1a(&h[OFF_HEADER_LEN..OFF_CHECKSUM]);
        h[OFF_CHECKSUM..OFF_CHECKSUM + 4].copy_from_slice(&sum.to_le_bytes());
        let seg = Self { map, layout };
        seg.u32_at(OFF_VERSION).store(0, Ordering::Relaxed);
        seg.map.write_at(0, &h);
        // SYNC POINT: pairs with `open`'s Acquire load of the version: the header bytes above
        // are visible to the client before a non-zero version is.
        seg.u32_at(OFF_VERSION)
            .store(SEGMENT_VERSION, Ordering::Release);
        Some(seg)
    }

    /// Client side: validates the header the daemon wrote.
    pub fn open(map: Arc<SharedMapping>) -> Result<Self, SegmentError> {
        if (map.len() as u64) < HEADER_LEN {
            return Err(SegmentError::Corrupt);
        }
        let probe = Self {
            map,
            layout: SegmentLayout::default(),
        };
        // SYNC POINT: pairs with the Release store of the version in `init`.
        let version = probe.u32_at(OFF_VERSION).load(Ordering::Acquire);
        let magic = probe.u64_at(OFF_MAGIC).load(Ordering::Relaxed);
        if magic != SEGMENT_MAGIC {
            return Err(SegmentError::BadMagic(magic));
        }
        if version != SEGMENT_VERSION {
            return Err(SegmentError::Version {
                found: version,
                expected: SEGMENT_VERSION,
            });
        }
        // Copied out through a raw pointer, never borrowed: the segment is shared memory.
        let mut h = [0u8; 52];
        if !probe.map.copy_out(0, &mut h) {
            return Err(SegmentError::Corrupt);
        }
        let rd64 = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap_or_default());
        let sum = u32::from_le_bytes(
            h[OFF_CHECKSUM..OFF_CHECKSUM + 4]
                .try_into()
                .unwrap_or_default(),
        );
        if sum != fnv1a(&h[OFF_HEADER_LEN..OFF_CHECKSUM]) {
            return Err(SegmentError::Corrupt);
        }
        let layout = SegmentLayout {
            req_capacity: rd64(OFF_REQ_CAP),
            rep_capacity: rd64(OFF_REP_CAP),
        };
        if rd64(OFF_REQ_OFFSET) != layout.req_offset()
            || rd64(OFF_REP_OFFSET) != layout.rep_offset()
            || !layout.req_capacity.is_power_of_two()
            || !layout.rep_capacity.is_power_of_two()
            || layout.req_capacity > 1 << 30
            || layout.rep_capacity > 1 << 30
            || layout.total_len() > probe.map.len() as u64
        {
            return Err(SegmentError::Corrupt);
        }
        Ok(Self {
            map: probe.map,
            layout,
        })
    }

    /// The ring sizes.
    pub fn layout(&self) -> SegmentLayout {
        self.layout
    }

    fn u32_at(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off % 4 == 0 && off + 4 <= HEADER_LEN_USIZE);
        // SAFETY: every caller passes a constant offset inside the 4096-byte header, which is
        // inside the mapping (checked at construction), 4-byte aligned on a page-aligned base.
        // The peer may write it at any time, which an atomic tolerates.
        unsafe { &*self.map.as_ptr().add(off).cast::<AtomicU32>() }
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off % 8 == 0 && off + 8 <= HEADER_LEN_USIZE);
        // SAFETY: as in `u32_at`, with 8-byte alignment.
        unsafe { &*self.map.as_ptr().add(off).cast::<AtomicU64>() }
    }

    /// Request ring, producing end (client).
    pub fn request_producer(&self) -> Option<Producer> {
        Producer::attach(
            self.map.clone(),
            self.layout.req_offset(),
            self.layout.req_capacity,
        )
    }

    /// Request ring, consuming end (daemon).
    pub fn request_consumer(&self) -> Option<Consumer> {
        Consumer::attach(
            self.map.clone(),
            self.layout.req_offset(),
            self.layout.req_capacity,
        )
    }

    /// Reply ring, producing end (daemon).
    pub fn reply_producer(&self) -> Option<Producer> {
        Producer::attach(
            self.map.clone(),
            self.layout.rep_offset(),
            self.layout.rep_capacity,
        )
    }

    /// Reply ring, consuming end (client).
    pub fn reply_consumer(&self) -> Option<Consumer> {
        Consumer::attach(
            self.map.clone(),
            self.layout.rep_offset(),
            self.layout.rep_capacity,
        )
    }

    /// Daemon: announce (`true`) or withdraw the intent to sleep.
    pub fn set_daemon_sleeping(&self, sleeping: bool) {
        self.u32_at(OFF_DAEMON_SLEEPING)
            .store(u32::from(sleeping), Ordering::SeqCst);
    }

    /// Client, after publishing a request: whether the daemon needs a kick on its eventfd.
    /// SeqCst fence + load pairs with the daemon's SeqCst store + recheck of the ring.
    pub fn daemon_sleeping(&self) -> bool {
        std::sync::atomic::fence(Ordering::SeqCst);
        self.u32_at(OFF_DAEMON_SLEEPING).load(Ordering::SeqCst) != 0
    }

    /// Daemon: announce (`true`) that this client is not served until its reply ring has room
    /// again, or withdraw that. After announcing, the daemon fences and looks at the ring's
    /// head once more before it stops looking.
    pub fn set_reply_room_wanted(&self, wanted: bool) {
        self.u32_at(OFF_REPLY_ROOM_WANTED)
            .store(u32::from(wanted), Ordering::SeqCst);
    }

    /// Client, after reading replies: whether the daemon waits for reply-ring room and needs a
    /// kick on its eventfd. Not a plain getter: it first issues a SeqCst fence, which orders
    /// the head the client just stored before this load (the half of the no-lost-wake-up
    /// handshake that the client owes; see below). Call it after `Consumer::pop`.
    pub fn reply_room_wanted_fenced(&self) -> bool {
        // SYNC POINT: the fence orders the client's `head.store(Release)` (Consumer::pop)
        // before this load; it pairs with the daemon's SeqCst store of the flag, fence and
        // head load (event loop, `park`): either the daemon sees the freed room, or we see
        // the flag and ring.
        std::sync::atomic::fence(Ordering::SeqCst);
        self.u32_at(OFF_REPLY_ROOM_WANTED).load(Ordering::SeqCst) != 0
    }

    /// Client: current value of the wake-up word, read before announcing sleep.
    pub fn client_futex_value(&self) -> u32 {
        self.u32_at(OFF_CLIENT_FUTEX).load(Ordering::SeqCst)
    }

    /// Client: announce (`true`) or withdraw the intent to sleep.
    pub fn set_client_sleeping(&self, sleeping: bool) {
        self.u32_at(OFF_CLIENT_SLEEPING)
            .store(u32::from(sleeping), Ordering::SeqCst);
    }

    /// Client: sleeps until the wake-up word differs from `seen` or `timeout` passes.
    pub fn client_wait(&self, seen: u32, timeout: Duration) {
        let ts = rustix::time::Timespec {
            tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        let _ = futex::wait(
            self.u32_at(OFF_CLIENT_FUTEX),
            futex::Flags::empty(),
            seen,
            Some(&ts),
        );
    }

    /// Daemon, after publishing a reply: wakes the client if it said it sleeps.
    pub fn wake_client(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.u32_at(OFF_CLIENT_SLEEPING).load(Ordering::SeqCst) != 0 {
            self.u32_at(OFF_CLIENT_FUTEX).fetch_add(1, Ordering::SeqCst);
            let _ = futex::wake(
                self.u32_at(OFF_CLIENT_FUTEX),
                futex::Flags::empty(),
                i32::MAX as u32,
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use std::fs::File;

    fn seg_map(len: u64) -> Arc<SharedMapping> {
        let fd = rustix::fs::memfd_create("seg-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, len).unwrap();
        Arc::new(SharedMapping::new(File::from(fd), len as usize, false).unwrap())
    }

    #[test]
    fn init_then_open_and_detect_corruption() {
        let layout = SegmentLayout::default();
        let map = seg_map(layout.total_len());
        Segment::init(map.clone(), layout).unwrap();
        assert_eq!(Segment::open(map.clone()).unwrap().layout(), layout);
        let (node, client) = (
            Segment::init(map.clone(), layout).unwrap(),
            Segment::open(map.clone()).unwrap(),
        );
        assert!(!client.reply_room_wanted_fenced());
        node.set_reply_room_wanted(true);
        assert!(client.reply_room_wanted_fenced());
        assert_eq!(map.read_at(132, 4).unwrap(), 1u32.to_le_bytes());
        node.set_reply_room_wanted(false);
        assert!(!client.reply_room_wanted_fenced());
        map.write_at(24, &(1u64 << 40).to_le_bytes());
        assert_eq!(
            Segment::open(map.clone()).unwrap_err(),
            SegmentError::Corrupt
        );
        map.write_at(8, &7u32.to_le_bytes());
        assert!(matches!(
            Segment::open(map.clone()),
            Err(SegmentError::Version { found: 7, .. })
        ));
        map.write_at(0, &0u64.to_le_bytes());
        assert!(matches!(Segment::open(map), Err(SegmentError::BadMagic(0))));
    }
}
