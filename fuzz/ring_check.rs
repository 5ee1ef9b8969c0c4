//! A hostile-ring checker for `ring::Consumer::pop`, shared by the libFuzzer target
//! `ring_consumer` and the randomized test `tests/ring_hostile.rs` (included in both with
//! `#[path]`). It uses only the library's public API.
//!
//! `run(input)` reads a script from `input` (missing bytes read as zero) and plays it on a
//! ring of 4 or 8 KiB inside a mapping with guard bytes on both sides:
//!
//! - **hostile** (first byte even): the test is the producer and writes anything: tails, record
//!   headers (real, padding, or any kind and length), payload bytes, valid records, at any
//!   position. After every `pop` it checks against the ring as it was before the call: nothing
//!   in the mapping changed but the head; the head moved forward by at most what the tail
//!   offered; an empty answer only for an empty ring; a record only if the bytes before the new
//!   head are one valid record (optionally after one valid pad) lying inside the data area,
//!   its length within the record limit, and the returned bytes are exactly its payload. So a
//!   read outside the ring, a record longer than the limit or a panic all fail.
//! - **honest** (first byte odd): a real `Producer` and `Consumer` from a chosen starting
//!   index; records of chosen lengths (split into parts) must come out in order and intact,
//!   an empty ring must always take a record, and no call may report corruption.
//!
//! Indices start below 2^62: a consumer's head starts at a fresh segment's 0 and moves by
//! what it consumed, so the u64 indices never wrap in practice.

use std::collections::VecDeque;
use std::sync::Arc;

use ferroplasma::ring::spsc::RING_HEADER;
use ferroplasma::ring::{Consumer, Producer};
use ferroplasma::shm::SharedMapping;

/// Bytes before the ring's header and after its data area.
const GUARD: u64 = 4096;
const GUARD_BYTE: u8 = 0xA5;
const HEAD_AT: u64 = GUARD + 64;
const TAIL_AT: u64 = GUARD;
const DATA_AT: u64 = GUARD + RING_HEADER;
const KIND_DATA: u32 = 0;
const KIND_PAD: u32 = 1;
const MAX_OPS: usize = 256;

/// Mappings for the two capacities, made once per thread (a memfd per input would dominate
/// the time; one per thread keeps parallel tests apart).
fn mapping(cap: u64) -> Arc<SharedMapping> {
    thread_local! {
        static MAPS: [Arc<SharedMapping>; 2] = [4096u64, 8192].map(|c| {
            let len = GUARD + RING_HEADER + c + GUARD;
            let fd = rustix::fs::memfd_create("ring-check", rustix::fs::MemfdFlags::CLOEXEC)
                .expect("memfd");
            rustix::fs::ftruncate(&fd, len).expect("ftruncate");
            let len = usize::try_from(len).expect("small");
            Arc::new(SharedMapping::new(std::fs::File::from(fd), len, false).expect("mmap"))
        });
    }
    MAPS.with(|m| m[usize::from(cap == 8192)].clone())
}

/// Reads the script; past the end of the input every read is zero.
struct Script<'a> {
    bytes: &'a [u8],
}

impl Script<'_> {
    fn u8(&mut self) -> u8 {
        match self.bytes.split_first() {
            Some((&b, rest)) => {
                self.bytes = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }

    fn done(&self) -> bool {
        self.bytes.is_empty()
    }

    /// A record length: often near the interesting edges, sometimes anything.
    fn len(&mut self, cap: u64) -> u32 {
        let max = cap / 2 - 8;
        let edges = [
            0,
            1,
            7,
            8,
            max - 1,
            max,
            max + 1,
            cap - 8,
            cap,
            u64::from(u32::MAX),
        ];
        let v = match self.u8() % 4 {
            0 => edges[usize::from(self.u8()) % edges.len()],
            1 => u64::from(self.u32()),
            _ => u64::from(self.u16()) % (max + 1),
        };
        u32::try_from(v).unwrap_or(u32::MAX)
    }
}

fn padded(len: u64) -> u64 {
    8 + len.next_multiple_of(8)
}

fn header(len: u32, kind: u32) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&len.to_le_bytes());
    h[4..].copy_from_slice(&kind.to_le_bytes());
    h
}

fn write(map: &SharedMapping, at: u64, bytes: &[u8]) {
    assert!(map.write_at(at, bytes), "test write out of the mapping");
}

fn load(map: &SharedMapping, at: u64) -> u64 {
    let b = map.read_at(at, 8).expect("in the mapping");
    u64::from_le_bytes(b.try_into().expect("8 bytes"))
}

/// Plays `input` as one script; panics when `pop` breaks its contract.
pub fn run(input: &[u8]) {
    let mut s = Script { bytes: input };
    let mode = s.u8();
    let cap = if mode & 2 == 0 { 4096 } else { 8192 };
    let map = mapping(cap);
    let total = usize::try_from(GUARD + RING_HEADER + cap + GUARD).expect("small");
    write(&map, 0, &vec![GUARD_BYTE; total]);
    // Honest indices are 8-aligned: every record is padded to 8 bytes.
    let start = s.u64() & ((1 << 62) - 8);
    let start = if mode & 4 == 0 {
        start % (4 * cap)
    } else {
        start
    };
    if mode & 1 == 0 {
        hostile(&mut s, &map, cap, start);
    } else {
        honest(&mut s, &map, cap, start);
    }
}

fn hostile(s: &mut Script<'_>, map: &Arc<SharedMapping>, cap: u64, start: u64) {
    // The data area starts as one repeated byte, the indices at `start`.
    let fill = s.u8();
    write(
        map,
        DATA_AT,
        &vec![fill; usize::try_from(cap).expect("small")],
    );
    write(map, TAIL_AT, &start.to_le_bytes());
    write(map, HEAD_AT, &start.to_le_bytes());
    let mut c = Consumer::attach(map.clone(), GUARD, cap).expect("attach");
    // Where the test's next valid record goes (it may also lie about the tail).
    let mut tail = start;
    let mut buf = Vec::new();
    for _ in 0..MAX_OPS {
        if s.done() {
            break;
        }
        let head = load(map, HEAD_AT);
        match s.u8() % 8 {
            // A record header, often where the consumer reads next, else anywhere (8-aligned
            // or not), of any kind and length.
            0 => {
                let any = u64::from(s.u16()) % cap;
                let pos = match s.u8() % 4 {
                    0 | 1 => head % cap,
                    2 => any & !7,
                    _ => any,
                };
                let len = s.len(cap);
                let kind = match s.u8() % 4 {
                    0 | 1 => KIND_DATA,
                    2 => KIND_PAD,
                    _ => s.u32(),
                };
                let h = header(len, kind);
                let n = usize::try_from((cap - pos).min(8)).expect("small");
                write(map, DATA_AT + pos, &h[..n]);
            }
            // Payload bytes anywhere.
            1 => {
                let pos = u64::from(s.u16()) % cap;
                let n = (u64::from(s.u8()) + 1).min(cap - pos);
                let b = s.u8();
                write(
                    map,
                    DATA_AT + pos,
                    &vec![b; usize::try_from(n).expect("small")],
                );
            }
            // The tail near the head (maybe behind it, maybe beyond the capacity).
            2 => {
                let d = u64::from(s.u16()) % (2 * cap + 16);
                tail = if s.u8() & 1 == 0 {
                    head.wrapping_add(d)
                } else {
                    head.wrapping_sub(d)
                };
                write(map, TAIL_AT, &tail.to_le_bytes());
            }
            // Any tail at all.
            3 => {
                tail = s.u64();
                write(map, TAIL_AT, &tail.to_le_bytes());
            }
            // A valid record at the test's tail (with a valid pad first if it would not fit
            // before the end), published or not.
            4 => {
                let len = u64::from(s.u16()) % (cap / 2 - 8 + 1);
                let fill = s.u8();
                // Records start 8-aligned (a forged tail may not be).
                tail = tail.wrapping_add(7) & !7;
                let mut pos = tail % cap;
                if padded(len) > cap - pos {
                    let pad = u32::try_from(cap - pos - 8).expect("small");
                    write(map, DATA_AT + pos, &header(pad, KIND_PAD));
                    tail = tail.wrapping_add(cap - pos);
                    pos = 0;
                }
                write(
                    map,
                    DATA_AT + pos,
                    &header(u32::try_from(len).expect("small"), KIND_DATA),
                );
                let payload = vec![fill; usize::try_from(len).expect("small")];
                write(map, DATA_AT + pos + 8, &payload);
                tail = tail.wrapping_add(padded(len));
                if s.u8() % 4 != 0 {
                    write(map, TAIL_AT, &tail.to_le_bytes());
                }
            }
            // The consumer was dropped after an error; a new one attaches where it stopped.
            5 => c = Consumer::attach(map.clone(), GUARD, cap).expect("attach"),
            _ => pop_checked(&mut c, map, cap, &mut buf),
        }
    }
    pop_checked(&mut c, map, cap, &mut buf);
}

/// One `pop` on a ring the test wrote, checked against the ring as it was.
fn pop_checked(c: &mut Consumer, map: &SharedMapping, cap: u64, buf: &mut Vec<u8>) {
    let len = u64::try_from(map.len()).expect("small");
    let before = map.read_at(0, len).expect("whole mapping");
    let word = |at: u64| {
        let at = usize::try_from(at).expect("small");
        u64::from_le_bytes(before[at..at + 8].try_into().expect("8 bytes"))
    };
    let (head, tail) = (word(HEAD_AT), word(TAIL_AT));
    let data = |pos: u64, n: u64| {
        assert!(pos + n <= cap, "checker reads outside the data area");
        let at = usize::try_from(DATA_AT + pos).expect("small");
        &before[at..at + usize::try_from(n).expect("small")]
    };
    let hdr = |pos: u64| {
        let h = data(pos, 8);
        (
            u32::from_le_bytes(h[..4].try_into().expect("4")),
            u32::from_le_bytes(h[4..].try_into().expect("4")),
        )
    };
    buf.clear();
    buf.extend_from_slice(b"stale");
    let r = c.pop(buf);
    let after = map.read_at(0, len).expect("whole mapping");
    let new_head = load(map, HEAD_AT);
    // pop writes nothing but the head.
    let h = usize::try_from(HEAD_AT).expect("small");
    assert!(
        before[..h] == after[..h] && before[h + 8..] == after[h + 8..],
        "pop wrote into the ring or outside it"
    );
    let avail = tail.wrapping_sub(head);
    let moved = new_head.wrapping_sub(head);
    assert!(
        moved <= avail && moved <= cap,
        "head moved by {moved} with {avail} offered (head {head}, tail {tail})"
    );
    // A move is only ever past one valid pad (on error) or a pad and/or one record.
    let pos = head % cap;
    let pad_skip = {
        let (l, k) = hdr(pos);
        (k == KIND_PAD && u64::from(l) + 8 == cap - pos && cap - pos <= avail).then_some(cap - pos)
    };
    match r {
        // Empty, or empty after a valid pad that ends where the tail is.
        Ok(false) => assert!(
            (moved == 0 && avail == 0) || (Some(moved) == pad_skip && moved == avail),
            "an empty answer for a ring with {avail} bytes, head moved by {moved}"
        ),
        Ok(true) => {
            let n = u64::try_from(buf.len()).expect("small");
            assert!(n <= cap / 2 - 8, "a record of {n} bytes, over the limit");
            let rec = moved
                .checked_sub(padded(n))
                .expect("head moved past the record");
            assert!(
                rec == 0 || Some(rec) == pad_skip,
                "a record after {rec} skipped bytes"
            );
            let rpos = head.wrapping_add(rec) % cap;
            assert!(
                rpos + padded(n) <= cap,
                "a record across the end of the ring"
            );
            assert_eq!(hdr(rpos), (u32::try_from(n).expect("small"), KIND_DATA));
            assert!(
                buf[..] == *data(rpos + 8, n),
                "payload differs from the ring's bytes"
            );
        }
        Err(_) => assert!(
            moved == 0 || Some(moved) == pad_skip,
            "an error after moving the head by {moved}"
        ),
    }
}

fn honest(s: &mut Script<'_>, map: &Arc<SharedMapping>, cap: u64, start: u64) {
    write(map, TAIL_AT, &start.to_le_bytes());
    write(map, HEAD_AT, &start.to_le_bytes());
    let mut p = Producer::attach(map.clone(), GUARD, cap).expect("attach");
    let mut c = Consumer::attach(map.clone(), GUARD, cap).expect("attach");
    let max = p.max_record();
    let mut queue: VecDeque<Vec<u8>> = VecDeque::new();
    let mut buf = Vec::new();
    let mut n = 0u32;
    let pop = |c: &mut Consumer, queue: &mut VecDeque<Vec<u8>>, buf: &mut Vec<u8>| {
        let got = c.pop(buf).expect("an honest ring is never corrupt");
        match queue.pop_front() {
            Some(want) => assert!(got && *buf == want, "record out of order or damaged"),
            None => assert!(!got, "a record that was never pushed"),
        }
    };
    for _ in 0..MAX_OPS {
        if s.done() {
            break;
        }
        if s.u8() % 3 == 0 {
            pop(&mut c, &mut queue, &mut buf);
            continue;
        }
        let len = usize::from(s.u16()) % (usize::try_from(max).expect("small") + 1);
        // Parts split anywhere, empty ones first or last included.
        let split = match s.u8() % 4 {
            0 => 0,
            1 => len,
            _ => usize::from(s.u16()) % (len + 1),
        };
        n = n.wrapping_add(1);
        let msg: Vec<u8> = (0..len)
            .map(|i| i.to_le_bytes()[0].wrapping_mul(31) ^ n.to_le_bytes()[i % 4])
            .collect();
        let pushed = p
            .try_push(&[&msg[..split], &msg[split..]])
            .expect("a record within the limit");
        if pushed {
            queue.push_back(msg);
        } else {
            assert!(!queue.is_empty(), "an empty ring refused {len} bytes");
        }
    }
    while !queue.is_empty() {
        pop(&mut c, &mut queue, &mut buf);
    }
    pop(&mut c, &mut queue, &mut buf);
    assert!(p.is_drained());
}
