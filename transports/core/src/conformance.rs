//! The test suite every transport passes. A transport crate's tests call [`run_all`] with a
//! [`Harness`] that builds its transport over a test region; the suite drives the transports
//! only through the [`Transport`] trait and checks bytes through [`RegionAccess`].
//!
//! Everything here panics on failure (it is test code) and gives up after [`LIMIT`].

use std::time::{Duration, Instant};

use crate::{
    Event, GrantDescriptor, GrantId, Identity, PeerId, ReadError, ReadOp, Transport,
    TransportConfig,
};

/// How long any single step may take before the suite fails.
pub const LIMIT: Duration = Duration::from_secs(30);

/// Reads and writes a transport's test region.
pub trait RegionAccess {
    /// Writes `bytes` at `offset`.
    ///
    /// # Safety
    /// No transport may be using the range (it is not the destination of a read in flight,
    /// not granted), and nothing else reads or writes it during the call.
    unsafe fn write(&self, offset: u64, bytes: &[u8]);
    /// Reads `len` bytes at `offset` (a copy). Writers outside the process (clients, the
    /// kernel) meanwhile only change the bytes copied; a racing write from another thread of
    /// this process is undefined behaviour, which the `unsafe` contracts of
    /// [`RegionAccess::write`], [`Transport::read`] and [`Transport::grant`] rule out.
    fn read(&self, offset: u64, len: usize) -> Vec<u8>;
}

/// Builds transports for the suite.
pub trait Harness {
    /// A transport listening on a fresh address, over a fresh zeroed region of `region_len`
    /// bytes.
    fn make(
        &mut self,
        cfg: TransportConfig,
        region_len: u64,
    ) -> (Box<dyn Transport>, Box<dyn RegionAccess>);
}

struct Side {
    id: u64,
    t: Box<dyn Transport>,
    mem: Box<dyn RegionAccess>,
    events: Vec<Event>,
}

fn cfg(node_id: u64, token: &[u8], chunk: u32, checksums: bool) -> TransportConfig {
    let mut c = TransportConfig::new(Identity::new(node_id, String::new()), token.to_vec());
    c.chunk = chunk;
    c.checksums = checksums;
    c
}

fn make(
    h: &mut dyn Harness,
    node_id: u64,
    token: &[u8],
    region: u64,
    chunk: u32,
    sums: bool,
) -> Side {
    let (t, mem) = h.make(cfg(node_id, token, chunk, sums), region);
    Side {
        id: node_id,
        t,
        mem,
        events: Vec::new(),
    }
}

/// Polls every side until `done` says so, failing after [`LIMIT`].
fn pump(sides: &mut [&mut Side], what: &str, mut done: impl FnMut(&mut [&mut Side]) -> bool) {
    let start = Instant::now();
    loop {
        if done(sides) {
            return;
        }
        assert!(start.elapsed() < LIMIT, "timed out waiting for {what}");
        for s in sides.iter_mut() {
            let mut ev = Vec::new();
            s.t.poll(&mut ev, Some(Duration::from_millis(1)))
                .expect("poll");
            s.events.extend(ev);
        }
    }
}

fn take<T>(s: &mut Side, mut f: impl FnMut(&Event) -> Option<T>) -> Option<T> {
    let i = s.events.iter().position(|e| f(e).is_some())?;
    let e = s.events.remove(i);
    f(&e)
}

/// Connects `a` to `b`; returns (a's peer id for b, b's peer id for a).
fn connect(a: &mut Side, b: &mut Side) -> (PeerId, PeerId) {
    let addr = b.t.local_addr();
    let pa = a.t.connect(&addr);
    let mut got_a = None;
    let mut got_b = None;
    pump(&mut [a, b], "connection", |s| {
        if got_a.is_none() {
            got_a = take(s[0], |e| match e {
                Event::Connected {
                    peer,
                    identity,
                    inbound: false,
                } if *peer == pa => Some(identity.clone()),
                Event::ConnectFailed { error, .. } => panic!("connect failed: {error}"),
                _ => None,
            });
        }
        if got_b.is_none() {
            got_b = take(s[1], |e| match e {
                Event::Connected {
                    peer,
                    identity,
                    inbound: true,
                } => Some((*peer, identity.clone())),
                _ => None,
            });
        }
        got_a.is_some() && got_b.is_some()
    });
    let ida = got_a.unwrap_or_else(|| unreachable!());
    let (pb, idb) = got_b.unwrap_or_else(|| unreachable!());
    assert_eq!(ida.node_id, b.id, "initiator learns the acceptor's node id");
    assert_eq!(idb.node_id, a.id, "acceptor learns the initiator's node id");
    (pa, pb)
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect()
}

fn read_result(s: &mut Side, token: u64) -> Option<Result<(), ReadError>> {
    take(s, |e| match e {
        Event::ReadDone { token: t, result } if *t == token => Some(result.clone()),
        _ => None,
    })
}

/// Control messages arrive complete and in order, both ways.
pub fn messages_in_order(h: &mut dyn Harness) {
    let mut a = make(h, 1, b"tok", 1 << 20, 1 << 16, true);
    let mut b = make(h, 2, b"tok", 1 << 20, 1 << 16, true);
    let (pa, pb) = connect(&mut a, &mut b);
    let cap = a.t.max_control_msg().min(b.t.max_control_msg());
    let sizes = [0usize, 1, 100, 1000, crate::MIN_CONTROL_MSG, cap];
    let mut sent = Vec::new();
    for i in 0..200u64 {
        let m = pattern(i, sizes[usize::try_from(i).unwrap_or(0) % sizes.len()]);
        a.t.send(pa, m.clone()).expect("send a→b");
        b.t.send(pb, m.clone()).expect("send b→a");
        sent.push(m);
    }
    let (mut ra, mut rb) = (Vec::new(), Vec::new());
    pump(&mut [&mut a, &mut b], "200 messages each way", |s| {
        for e in s[0].events.drain(..) {
            if let Event::Message { body, .. } = e {
                ra.push(body);
            }
        }
        for e in s[1].events.drain(..) {
            if let Event::Message { body, .. } = e {
                rb.push(body);
            }
        }
        ra.len() >= sent.len() && rb.len() >= sent.len()
    });
    assert!(ra == sent, "b→a messages differ or are out of order");
    assert!(rb == sent, "a→b messages differ or are out of order");
}

/// Control messages are capped at the transport's own [`Transport::max_control_msg`] (at least
/// [`crate::MIN_CONTROL_MSG`]): one of exactly that size goes through, a larger one is refused
/// by `send` (`TooLarge`) and the connection keeps working. When the transport takes a smaller
/// cap from its configuration ([`TransportConfig::max_control_msg`]), a receiver with the
/// smaller cap drops a peer that sends it one byte more than that cap.
pub fn control_messages_capped(h: &mut dyn Harness) {
    let mut a = make(h, 1, b"c", 1 << 16, 1 << 16, true);
    let mut b = make(h, 2, b"c", 1 << 16, 1 << 16, true);
    let (pa, _) = connect(&mut a, &mut b);
    let cap = a.t.max_control_msg();
    assert!(
        cap >= crate::MIN_CONTROL_MSG,
        "{}: a cap of {cap} bytes is below the minimum",
        a.t.kind()
    );
    assert_eq!(cap, b.t.max_control_msg(), "same transport, same settings");
    for n in [cap + 1, cap * 2, cap + (1 << 20)] {
        let r = a.t.send(pa, vec![7; n]);
        assert!(
            matches!(r, Err(crate::TransportError::TooLarge(m)) if m == n),
            "{}: a {n}-byte control message was not refused: {r:?}",
            a.t.kind()
        );
    }
    let full = pattern(77, cap);
    a.t.send(pa, full.clone()).expect("a message of the cap");
    let mut got = None;
    pump(&mut [&mut a, &mut b], "the message of the cap", |s| {
        got = got.take().or_else(|| {
            take(s[1], |e| match e {
                Event::Message { body, .. } => Some(body.clone()),
                _ => None,
            })
        });
        got.is_some()
    });
    assert!(got == Some(full), "the message of the cap differs");

    // A receiver configured with a smaller cap (if this transport takes one).
    let mut small = cfg(3, b"c", 1 << 16, true);
    small.max_control_msg = Some(crate::MIN_CONTROL_MSG);
    let (t, mem) = h.make(small, 1 << 16);
    let mut c = Side {
        id: 3,
        t,
        mem,
        events: Vec::new(),
    };
    let small_cap = c.t.max_control_msg();
    if small_cap >= cap {
        // Configured caps are ignored (tcp): nothing smaller to check.
        eprintln!(
            "SKIPPED: a smaller control-message cap (this transport ignores \
             max_control_msg: {small_cap} >= {cap})"
        );
        return;
    }
    assert_eq!(small_cap, crate::MIN_CONTROL_MSG, "the configured cap");
    let (pa, pc) = connect(&mut a, &mut c);
    let r = c.t.send(pc, vec![1; small_cap + 1]);
    assert!(
        matches!(r, Err(crate::TransportError::TooLarge(_))),
        "the smaller cap applies to sends: {r:?}"
    );
    a.t.send(pa, pattern(5, small_cap)).expect("at c's cap");
    a.t.send(pa, pattern(6, small_cap + 1))
        .expect("within a's cap");
    let mut sizes = Vec::new();
    let mut dropped = false;
    pump(
        &mut [&mut a, &mut c],
        "the over-cap message dropping the link",
        |s| {
            while let Some(n) = take(s[1], |e| match e {
                Event::Message { body, .. } => Some(body.len()),
                _ => None,
            }) {
                sizes.push(n);
            }
            dropped = dropped
                || take(s[1], |e| match e {
                    Event::Disconnected { peer, .. } if *peer == pc => Some(()),
                    _ => None,
                })
                .is_some();
            dropped
        },
    );
    assert_eq!(
        sizes,
        vec![small_cap],
        "only the message within the receiver's cap is delivered"
    );
}

/// Granted ranges land byte for byte at the destination, over chunk boundaries, and nothing
/// around the destination changes.
pub fn reads_land_exactly(h: &mut dyn Harness) {
    for sums in [true, false] {
        let chunk = 1 << 16;
        let mut a = make(h, 1, b"", 8 << 20, chunk, sums);
        let mut b = make(h, 2, b"", 8 << 20, chunk, sums);
        let (pa, pb) = connect(&mut a, &mut b);
        let src = pattern(7, 3 << 20);
        // SAFETY: nothing uses b's region yet.
        unsafe { b.mem.write(4096, &src) };
        // SAFETY: nothing in this test writes b's region from here on.
        let g = unsafe { b.t.grant(pb, 4096, src.len() as u64) }.expect("grant");
        let c = u64::from(chunk);
        let lens = [1u64, c - 1, c, c + 1, 3 * c + 5, src.len() as u64];
        let mut dst_off = 8192u64;
        let mut want = Vec::new();
        for (i, &len) in lens.iter().enumerate() {
            let op = ReadOp {
                token: 100 + i as u64,
                peer: pa,
                grant: g,
                offset: 0,
                local_offset: dst_off,
                len,
            };
            // SAFETY: the destinations are disjoint (4 KiB apart), in a's region, which
            // nothing else touches until every read reported done.
            unsafe { a.t.read(op) }.expect("read");
            want.push((op, dst_off));
            dst_off += len + 4096;
        }
        let mut results = Vec::new();
        pump(&mut [&mut a, &mut b], "reads", |s| {
            while let Some(r) = take(s[0], |e| match e {
                Event::ReadDone { token, result } => Some((*token, result.clone())),
                _ => None,
            }) {
                results.push(r);
            }
            results.len() == lens.len()
        });
        for (tok, r) in &results {
            assert_eq!(r, &Ok(()), "read {tok} failed");
        }
        for (op, off) in &want {
            let got = a.mem.read(*off, usize::try_from(op.len).unwrap_or(0));
            assert!(
                got == src[..got.len()],
                "read of {} bytes differs (checksums {sums})",
                op.len
            );
            let before = a.mem.read(off - 1, 1);
            let after = a.mem.read(off + op.len, 1);
            assert_eq!(
                (before[0], after[0]),
                (0, 0),
                "bytes around the destination changed"
            );
        }
        b.t.revoke(g.id);
        pump(&mut [&mut a, &mut b], "revoked", |s| {
            take(s[1], |e| {
                matches!(e, Event::Revoked { grant } if *grant == g.id).then_some(())
            })
            .is_some()
        });
    }
}

/// Polls both sides until `grantor` reports `grant` revoked.
fn wait_revoked(reader: &mut Side, grantor: &mut Side, grant: GrantId) {
    pump(&mut [reader, grantor], "revoked", |s| {
        take(s[1], |e| {
            matches!(e, Event::Revoked { grant: g } if *g == grant).then_some(())
        })
        .is_some()
    });
}

/// Reads of ranges not granted (never, partly, or after revocation) are refused, and the
/// connection keeps working.
pub fn ungranted_reads_refused(h: &mut dyn Harness) {
    let mut a = make(h, 1, b"t", 1 << 20, 1 << 16, true);
    let mut b = make(h, 2, b"t", 1 << 20, 1 << 16, true);
    let (pa, pb) = connect(&mut a, &mut b);
    // SAFETY: nothing uses b's region yet.
    unsafe { b.mem.write(0, &pattern(1, 8192)) };
    // SAFETY: nothing in this test writes b's region from here on.
    let g = unsafe { b.t.grant(pb, 0, 4096) }.expect("grant");
    // (token, offset within the grant, length, local offset): disjoint destinations.
    let ops = [
        (1, 0u64, 8192u64, 16384u64),
        (2, 4096, 10, 32768),
        (3, u64::MAX - 10, 20, 49152),
        (4, 100, 100, 0),
    ];
    for (token, off, len, local_offset) in ops {
        // SAFETY: the destinations are disjoint and nothing else touches a's region until
        // every read reported done.
        unsafe {
            a.t.read(ReadOp {
                token,
                peer: pa,
                grant: g,
                offset: off,
                local_offset,
                len,
            })
        }
        .expect("read");
    }
    let mut res = std::collections::HashMap::new();
    pump(&mut [&mut a, &mut b], "refusals", |s| {
        while let Some((t, r)) = take(s[0], |e| match e {
            Event::ReadDone { token, result } => Some((*token, result.clone())),
            _ => None,
        }) {
            res.insert(t, r);
        }
        res.len() == ops.len()
    });
    for t in 1..=3 {
        assert!(
            matches!(res[&t], Err(ReadError::Refused { .. })),
            "read {t} should be refused: {:?}",
            res[&t]
        );
    }
    assert_eq!(res[&4], Ok(()));
    assert_eq!(a.mem.read(0, 100), pattern(1, 8192)[100..200].to_vec());
    assert_eq!(
        a.mem.read(16384, 8192),
        vec![0; 8192],
        "a refused read landed"
    );
    b.t.revoke(g.id);
    // A descriptor is stale once its grant's `Revoked` is reported (a one-sided transport
    // learns of a revoke from a message: a read issued before that may still be served).
    wait_revoked(&mut a, &mut b, g.id);
    // SAFETY: every earlier read reported done; nothing else touches a's region until this
    // one does.
    unsafe {
        a.t.read(ReadOp {
            token: 5,
            peer: pa,
            grant: g,
            offset: 0,
            local_offset: 0,
            len: 10,
        })
    }
    .expect("read");
    let mut r = None;
    pump(&mut [&mut a, &mut b], "refusal after revoke", |s| {
        r = r.take().or_else(|| read_result(s[0], 5));
        r.is_some()
    });
    assert!(
        matches!(r, Some(Err(ReadError::Refused { .. }))),
        "read after revoke: {r:?}"
    );
    // Still connected.
    a.t.send(pa, b"still here".to_vec()).expect("send");
    pump(&mut [&mut a, &mut b], "message after refusals", |s| {
        take(s[1], |e| {
            matches!(e, Event::Message { body, .. } if body == b"still here").then_some(())
        })
        .is_some()
    });
}

/// Runs reads from `r` (token, descriptor, offset, length, local offset) and returns each
/// token's result.
fn run_reads(
    r: &mut Side,
    others: &mut [&mut Side],
    peer: PeerId,
    ops: &[(u64, GrantDescriptor, u64, u64, u64)],
) -> std::collections::HashMap<u64, Result<(), ReadError>> {
    for &(token, grant, offset, len, local_offset) in ops {
        // SAFETY: the callers' destinations are disjoint and nothing else touches the
        // reader's region until every read reported done.
        unsafe {
            r.t.read(ReadOp {
                token,
                peer,
                grant,
                offset,
                local_offset,
                len,
            })
        }
        .expect("read");
    }
    let mut res = std::collections::HashMap::new();
    let start = Instant::now();
    while res.len() < ops.len() {
        assert!(start.elapsed() < LIMIT, "timed out waiting for reads");
        for s in others.iter_mut() {
            let mut ev = Vec::new();
            s.t.poll(&mut ev, Some(Duration::from_millis(1)))
                .expect("poll");
            s.events.extend(ev);
        }
        let mut ev = Vec::new();
        r.t.poll(&mut ev, Some(Duration::from_millis(1)))
            .expect("poll");
        for e in ev {
            match e {
                Event::ReadDone { token, result } => {
                    assert!(
                        res.insert(token, result).is_none(),
                        "read {token} reported twice"
                    );
                }
                e => r.events.push(e),
            }
        }
    }
    res
}

/// The serving side checks every read against the grant its descriptor names, as issued to
/// that connection: a forged grant number, another peer's grant, a descriptor stretched
/// beyond its grant or shifted onto another grant of the same peer, and a revoked one are
/// all refused, no byte of them lands, and the connection keeps working.
pub fn forged_descriptors_refused(h: &mut dyn Harness) {
    let mut a = make(h, 1, b"f", 1 << 20, 1 << 16, true);
    let mut b = make(h, 2, b"f", 1 << 20, 1 << 16, true);
    let mut c = make(h, 3, b"f", 1 << 20, 1 << 16, true);
    let (pa, pba) = connect(&mut a, &mut b);
    let (pc, pbc) = connect(&mut c, &mut b);
    let src = pattern(31, 16384);
    // SAFETY: nothing uses b's region yet.
    unsafe { b.mem.write(0, &src) };
    // SAFETY: nothing in this test writes b's region from here on.
    let (ga1, ga2, gc) = unsafe {
        (
            b.t.grant(pba, 0, 4096).expect("grant"),
            b.t.grant(pba, 8192, 4096).expect("grant"),
            b.t.grant(pbc, 4096, 4096).expect("grant"),
        )
    };
    let forged_id = GrantDescriptor {
        id: GrantId(ga1.id.0 ^ 0x5a5a_0000),
        ..ga1
    };
    let stretched = GrantDescriptor { len: 8192, ..ga1 };
    let shifted = GrantDescriptor {
        addr: ga2.addr,
        ..ga1
    };
    let k = 16384u64;
    let res = run_reads(
        &mut a,
        &mut [&mut b, &mut c],
        pa,
        &[
            (1, forged_id, 0, 4096, 0),
            (2, gc, 0, 4096, k),
            (3, stretched, 0, 8192, 2 * k),
            (4, shifted, 0, 4096, 3 * k),
            (5, ga2, 0, 4096, 4 * k),
        ],
    );
    for t in 1..=4 {
        assert!(
            matches!(res[&t], Err(ReadError::Refused { peer, .. }) if peer == pa),
            "read {t} with a bad descriptor: {:?}",
            res[&t]
        );
        assert_eq!(
            a.mem.read((t - 1) * k, 8192),
            vec![0; 8192],
            "bytes of refused read {t} landed"
        );
    }
    assert_eq!(res[&5], Ok(()), "a read under a good descriptor");
    assert!(
        a.mem.read(4 * k, 4096) == src[8192..12288],
        "good read differs"
    );
    // The other peer's descriptor is good for that peer.
    let rc = run_reads(&mut c, &mut [&mut b], pc, &[(1, gc, 0, 4096, 0)]);
    assert_eq!(rc[&1], Ok(()), "c's read under its own grant");
    assert!(c.mem.read(0, 4096) == src[4096..8192], "c's read differs");
    // A revoked grant's descriptor is stale.
    b.t.revoke(ga1.id);
    wait_revoked(&mut a, &mut b, ga1.id);
    let res = run_reads(&mut a, &mut [&mut b], pa, &[(6, ga1, 0, 4096, 5 * k)]);
    assert!(
        matches!(res[&6], Err(ReadError::Refused { .. })),
        "read under a revoked grant: {:?}",
        res[&6]
    );
    assert_eq!(
        a.mem.read(5 * k, 4096),
        vec![0; 4096],
        "a stale read landed"
    );
}

/// A descriptor for reads that must fail before they reach the peer.
const ANY_GRANT: GrantDescriptor = GrantDescriptor {
    id: GrantId(1),
    addr: 0,
    len: 1,
    key: 0,
};

/// A read whose destination is outside the local region is refused at once.
pub fn local_bounds_checked(h: &mut dyn Harness) {
    let mut a = make(h, 1, b"", 1 << 20, 1 << 16, true);
    let mut b = make(h, 2, b"", 1 << 20, 1 << 16, true);
    let (pa, _) = connect(&mut a, &mut b);
    for (off, len) in [(1u64 << 20, 1u64), ((1 << 20) - 10, 11), (u64::MAX, 2)] {
        // SAFETY: nothing else touches a's region (and the call is expected to fail).
        let r = unsafe {
            a.t.read(ReadOp {
                token: 1,
                peer: pa,
                grant: ANY_GRANT,
                offset: 0,
                local_offset: off,
                len,
            })
        };
        assert!(
            r.is_err(),
            "destination {off}+{len} outside a 1 MiB region was accepted"
        );
    }
    // SAFETY: as above.
    let r = unsafe {
        a.t.read(ReadOp {
            token: 1,
            peer: PeerId::from_raw(999_999),
            grant: ANY_GRANT,
            offset: 0,
            local_offset: 0,
            len: 1,
        })
    };
    assert!(r.is_err(), "read from an unknown peer was accepted");
}

/// A wrong token (or a missing one) fails the connection on both sides, and the acceptor
/// reports no peer.
pub fn wrong_token_refused(h: &mut dyn Harness) {
    for (ta, tb) in [(&b"one"[..], &b"two"[..]), (b"", b"two"), (b"one", b"")] {
        let mut a = make(h, 1, ta, 1 << 16, 1 << 16, true);
        let mut b = make(h, 2, tb, 1 << 16, 1 << 16, true);
        let pa = a.t.connect(&b.t.local_addr());
        pump(&mut [&mut a, &mut b], "refused connection", |s| {
            take(s[0], |e| match e {
                Event::ConnectFailed { peer, .. } if *peer == pa => Some(()),
                Event::Connected { .. } => panic!("connected with a wrong token"),
                _ => None,
            })
            .is_some()
        });
        // Give the acceptor time to misbehave.
        let until = Instant::now() + Duration::from_millis(100);
        pump(&mut [&mut a, &mut b], "quiet", |_| Instant::now() >= until);
        assert!(
            !b.events
                .iter()
                .any(|e| matches!(e, Event::Connected { .. } | Event::Message { .. })),
            "the acceptor reported an unauthenticated peer"
        );
    }
}

/// Several reads in flight from two peers at once, in both directions.
pub fn concurrent_reads(h: &mut dyn Harness) {
    let region = 16u64 << 20;
    let mut a = make(h, 1, b"k", region, 1 << 18, true);
    let mut b = make(h, 2, b"k", region, 1 << 18, true);
    let (pa, pb) = connect(&mut a, &mut b);
    let half = (region / 2) as usize;
    let sa = pattern(11, half);
    let sb = pattern(12, half);
    // SAFETY: nothing uses either region yet.
    unsafe {
        a.mem.write(0, &sa);
        b.mem.write(0, &sb);
    }
    // SAFETY: nothing in this test writes the first halves from here on; reads land in the
    // second halves only.
    let (ga, gb) = unsafe {
        (
            a.t.grant(pa, 0, half as u64).expect("grant"),
            b.t.grant(pb, 0, half as u64).expect("grant"),
        )
    };
    let n = 8u64;
    let piece = half as u64 / n;
    for i in 0..n {
        let op = |peer, grant, token| ReadOp {
            token,
            peer,
            grant,
            offset: i * piece,
            local_offset: half as u64 + i * piece,
            len: piece,
        };
        // SAFETY: eight disjoint pieces of each second half, untouched by anything else
        // until every read reported done, and granted nowhere.
        unsafe {
            a.t.read(op(pa, gb, i)).expect("read");
            b.t.read(op(pb, ga, i)).expect("read");
        }
    }
    let (mut da, mut db) = (0, 0);
    pump(&mut [&mut a, &mut b], "16 reads", |s| {
        while let Some(r) = take(s[0], |e| match e {
            Event::ReadDone { result, .. } => Some(result.clone()),
            _ => None,
        }) {
            assert_eq!(r, Ok(()));
            da += 1;
        }
        while let Some(r) = take(s[1], |e| match e {
            Event::ReadDone { result, .. } => Some(result.clone()),
            _ => None,
        }) {
            assert_eq!(r, Ok(()));
            db += 1;
        }
        da == n && db == n
    });
    assert!(
        a.mem.read(half as u64, half) == sb,
        "a's copy of b's bytes differs"
    );
    assert!(
        b.mem.read(half as u64, half) == sa,
        "b's copy of a's bytes differs"
    );
}

/// When the serving side goes away, reads in flight fail (or completed whole) and the
/// reader learns of the disconnection; nothing hangs.
pub fn peer_death_fails_reads(h: &mut dyn Harness) {
    let region = 32u64 << 20;
    let mut a = make(h, 1, b"", region, 1 << 16, true);
    let mut b = make(h, 2, b"", region, 1 << 16, true);
    let (pa, pb) = connect(&mut a, &mut b);
    let region_bytes = usize::try_from(region).unwrap_or(0);
    let src = pattern(5, region_bytes);
    // SAFETY: nothing uses b's region yet.
    unsafe { b.mem.write(0, &src) };
    // SAFETY: nothing in this test writes b's region from here on.
    let g = unsafe { b.t.grant(pb, 0, region) }.expect("grant");
    // SAFETY: nothing else touches a's region until the read reported done.
    unsafe {
        a.t.read(ReadOp {
            token: 1,
            peer: pa,
            grant: g,
            offset: 0,
            local_offset: 0,
            len: region,
        })
    }
    .expect("read");
    // Let some bytes flow, then kill b.
    for _ in 0..3 {
        let mut ev = Vec::new();
        b.t.poll(&mut ev, Some(Duration::ZERO)).expect("poll");
        a.t.poll(&mut ev, Some(Duration::ZERO)).expect("poll");
        a.events.extend(
            ev.into_iter()
                .filter(|e| !matches!(e, Event::Revoked { .. })),
        );
    }
    drop(b);
    let mut r = None;
    let mut gone = false;
    pump(&mut [&mut a], "failure after peer death", |s| {
        r = r.take().or_else(|| read_result(s[0], 1));
        gone |= take(s[0], |e| {
            matches!(e, Event::Disconnected { peer, .. } if *peer == pa).then_some(())
        })
        .is_some();
        r.is_some() && (gone || r == Some(Ok(())))
    });
    match r {
        Some(Ok(())) => assert!(a.mem.read(0, region_bytes) == src, "completed read differs"),
        Some(Err(ReadError::PeerGone { .. })) => {}
        other => panic!("read after peer death: {other:?}"),
    }
    // Sending to a gone peer is an error, not a panic.
    let until = Instant::now() + Duration::from_millis(50);
    pump(&mut [&mut a], "quiet", |_| Instant::now() >= until);
    assert!(a.t.send(pa, vec![1]).is_err() || gone);
}

/// A failed endpoint fails every read on it: with several reads in flight (the serving side
/// never gets to them), closing the connection here fails each with [`ReadError::Aborted`],
/// and the serving side going away fails each with [`ReadError::PeerGone`]; each read is
/// reported exactly once, naming the connection, before the connection's
/// [`Event::Disconnected`], none after, and no byte of them lands.
pub fn failed_endpoint_fails_every_read(h: &mut dyn Harness) {
    for local in [true, false] {
        let mut a = make(h, 1, b"e", 1 << 20, 1 << 14, true);
        let mut b = make(h, 2, b"e", 1 << 20, 1 << 14, true);
        let (pa, pb) = connect(&mut a, &mut b);
        // SAFETY: nothing uses b's region yet.
        unsafe { b.mem.write(0, &pattern(41, 65536)) };
        // SAFETY: nothing in this test writes b's region from here on.
        let g = unsafe { b.t.grant(pb, 0, 65536) }.expect("grant");
        let n = 5u64;
        for t in 1..=n {
            // SAFETY: disjoint destinations in a's region, untouched until every read
            // reported done.
            unsafe {
                a.t.read(ReadOp {
                    token: t,
                    peer: pa,
                    grant: g,
                    offset: 0,
                    local_offset: (t - 1) * 16384,
                    len: 8192,
                })
            }
            .expect("read");
        }
        // From here on b never polls: no read is served.
        let _b = if local {
            a.t.disconnect(pa);
            Some(b)
        } else {
            drop(b);
            None
        };
        let mut done: Vec<(u64, Result<(), ReadError>)> = Vec::new();
        let mut gone = false;
        let start = Instant::now();
        // Until the disconnection, then a little longer to catch late reports.
        let mut quiet_until: Option<Instant> = None;
        while quiet_until.is_none_or(|q| Instant::now() < q) {
            assert!(
                start.elapsed() < LIMIT,
                "timed out waiting for the disconnection"
            );
            let mut ev = Vec::new();
            a.t.poll(&mut ev, Some(Duration::from_millis(1)))
                .expect("poll");
            for e in ev {
                match e {
                    Event::ReadDone { token, result } => {
                        assert!(!gone, "read {token} reported after Disconnected");
                        done.push((token, result));
                    }
                    Event::Disconnected { peer, .. } if peer == pa => {
                        assert!(!gone, "Disconnected reported twice");
                        gone = true;
                        quiet_until = Some(Instant::now() + Duration::from_millis(50));
                    }
                    _ => {}
                }
            }
        }
        done.sort_by_key(|d| d.0);
        let tokens: Vec<u64> = done.iter().map(|d| d.0).collect();
        assert_eq!(
            tokens,
            (1..=n).collect::<Vec<_>>(),
            "every read reported exactly once (local close: {local})"
        );
        for (t, r) in &done {
            let ok = match r {
                Err(ReadError::Aborted { peer }) => local && *peer == pa,
                Err(ReadError::PeerGone { peer, .. }) => !local && *peer == pa,
                _ => false,
            };
            assert!(ok, "read {t} (local close: {local}): {r:?}");
        }
        assert_eq!(
            a.mem.read(0, 16384 * 5),
            vec![0; 16384 * 5],
            "bytes of a failed read landed"
        );
    }
}

/// After a read's [`Event::ReadDone`], success or failure, no byte of that read lands any
/// more: the reader may reuse the destination at once. Here the reader gives up on a read the
/// serving side has not answered yet (it disconnects), reuses the destination, and the serving
/// side then runs until it has seen the disconnection. One interleaving, on one thread; the
/// transports' own tests add others (`mem`: the reader gives up from another thread while
/// the server copies; `tcp`: the reader disconnects after the first chunk arrived).
pub fn no_bytes_after_read_done(h: &mut dyn Harness) {
    let len = 64u64 << 10;
    let mut a = make(h, 1, b"", 1 << 20, 1 << 14, true);
    let mut b = make(h, 2, b"", 1 << 20, 1 << 14, true);
    let (pa, pb) = connect(&mut a, &mut b);
    let n = usize::try_from(len).unwrap_or(0);
    // SAFETY: nothing uses b's region yet.
    unsafe { b.mem.write(0, &pattern(21, n)) };
    // SAFETY: nothing in this test writes b's region from here on.
    let g = unsafe { b.t.grant(pb, 0, len) }.expect("grant");
    // SAFETY: nothing else touches a's region until the read reported done.
    unsafe {
        a.t.read(ReadOp {
            token: 1,
            peer: pa,
            grant: g,
            offset: 0,
            local_offset: 4096,
            len,
        })
    }
    .expect("read");
    a.t.disconnect(pa);
    let mut r = None;
    pump(&mut [&mut a], "the abandoned read's end", |s| {
        r = r.take().or_else(|| read_result(s[0], 1));
        r.is_some()
    });
    // The destination is free again: a local object takes it.
    let reused = pattern(22, n);
    // SAFETY: the read reported done, so by the rule under test no transport touches the
    // range any more (a transport that breaks it races this write on one thread: the check
    // below sees the bytes it wrote).
    unsafe { a.mem.write(4096, &reused) };
    pump(
        &mut [&mut a, &mut b],
        "the server to see the disconnection",
        |s| {
            take(s[1], |e| {
                matches!(e, Event::Disconnected { peer, .. } if *peer == pb).then_some(())
            })
            .is_some()
        },
    );
    for _ in 0..3 {
        let mut ev = Vec::new();
        a.t.poll(&mut ev, Some(Duration::ZERO)).expect("poll");
    }
    assert!(
        a.mem.read(4096, n) == reused,
        "bytes of a read landed after its ReadDone ({r:?})"
    );
}

/// A transport applies the chunk size it was asked for, clamped or ignored as its medium
/// needs, and says so: a chunk it cuts reads into is at least 1 byte and never more than
/// asked (or [`crate::frame::MAX_CHUNK`]). (What each transport does with the checksum
/// settings is its own tests': a harness may fix them, as tcp's keyed run does.)
pub fn data_settings_within_request(h: &mut dyn Harness) {
    for chunk in [0u32, 1, 1 << 14, 4 << 20, u32::MAX] {
        let (t, _) = h.make(cfg(1, b"settings", chunk, true), 1 << 16);
        let got = t.data_settings();
        if let Some(n) = got.chunk {
            let most = chunk.clamp(1, crate::frame::MAX_CHUNK);
            assert!(
                (1..=most).contains(&n),
                "{}: asked for {chunk}-byte chunks, applies {n}",
                t.kind()
            );
        }
    }
}

/// Runs the whole suite.
pub fn run_all(h: &mut dyn Harness) {
    messages_in_order(h);
    control_messages_capped(h);
    reads_land_exactly(h);
    ungranted_reads_refused(h);
    forged_descriptors_refused(h);
    local_bounds_checked(h);
    wrong_token_refused(h);
    concurrent_reads(h);
    peer_death_fails_reads(h);
    failed_endpoint_fails_every_read(h);
    no_bytes_after_read_done(h);
    data_settings_within_request(h);
}
