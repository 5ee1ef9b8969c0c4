//! Faults over a real RDMA device (soft-RoCE in CI): queue pairs that break in the middle of
//! reads (the reads finish over TCP with every byte correct), and a hostile peer that claims
//! RDMA and sends bogus queue pair data (refused, logged, the node keeps serving).
//!
//! Without an RDMA device these tests print `SKIPPED: no RDMA device` and pass.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ferroplasma_region::Region;
use ferroplasma_transport::hello::FEATURE_RDMA;
use ferroplasma_transport::msg::is_transport_private;
use ferroplasma_transport::{
    Event, GrantDescriptor, Identity, PeerId, ReadOp, Transport, TransportConfig,
};
use ferroplasma_transport_rdma::proto::{self, Body, Offer, RegionEntry};
use ferroplasma_transport_rdma::{verbs, RdmaConfig, RdmaTransport};
use ferroplasma_transport_tcp::TcpTransport;

const LIMIT: Duration = Duration::from_secs(60);

fn device_or_skip(test: &str) -> bool {
    // RUST_LOG=ferroplasma_transport_rdma=debug shows the transport's decisions.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    match verbs::no_device() {
        None => true,
        Some(why) => {
            println!("SKIPPED: no RDMA device ({test}: {why})");
            false
        }
    }
}

fn cfg(node_id: u64) -> TransportConfig {
    TransportConfig::new(Identity::new(node_id, ""), b"fault tests".to_vec())
}

fn rdma(node_id: u64, len: usize) -> (RdmaTransport, Region) {
    let r = Region::owned(len);
    let t = RdmaTransport::new(
        cfg(node_id),
        "127.0.0.1:0",
        r.clone(),
        &RdmaConfig::default(),
    )
    .expect("rdma transport");
    (t, r)
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// Polls every transport until `done` holds; collects their events.
fn pump(
    ts: &mut [&mut dyn Transport],
    evs: &mut [Vec<Event>],
    what: &str,
    mut done: impl FnMut(&mut [Vec<Event>]) -> bool,
) {
    let start = Instant::now();
    while !done(evs) {
        assert!(start.elapsed() < LIMIT, "timed out waiting for {what}");
        for (t, e) in ts.iter_mut().zip(evs.iter_mut()) {
            t.poll(e, Some(Duration::from_millis(1))).expect("poll");
        }
    }
}

fn connected(e: &[Event]) -> Option<PeerId> {
    e.iter().find_map(|e| match e {
        Event::Connected { peer, .. } => Some(*peer),
        _ => None,
    })
}

/// Connects `a` to `b`; returns (a's peer for b, b's peer for a).
fn connect(a: &mut dyn Transport, b: &mut dyn Transport) -> (PeerId, PeerId) {
    let addr = b.local_addr();
    a.connect(&addr);
    let mut evs = vec![Vec::new(), Vec::new()];
    pump(&mut [a, b], &mut evs, "connection", |e| {
        connected(&e[0]).is_some() && connected(&e[1]).is_some()
    });
    (connected(&evs[0]).unwrap(), connected(&evs[1]).unwrap())
}

fn done_tokens(e: &[Event]) -> Vec<(u64, bool)> {
    e.iter()
        .filter_map(|e| match e {
            Event::ReadDone { token, result } => Some((*token, result.is_ok())),
            _ => None,
        })
        .collect()
}

/// Reads 16 MiB in four reads, breaks queue pairs (the reader's own, or the grantor's) once
/// they are posted, and checks that every read completes with the right bytes, over TCP
/// after the failure, and that both sides report the peer on TCP.
fn reads_survive_broken_queue_pairs(break_grantor: bool) {
    const LEN: usize = 16 << 20;
    let (mut a, ra) = rdma(1, LEN);
    let (mut b, rb) = rdma(2, LEN);
    let (pa, pb) = connect(&mut a, &mut b);
    assert_eq!(a.peer_path(pa).expect("path").kind, "rdma");
    let src = pattern(7, LEN);
    // SAFETY: nothing uses b's region yet.
    assert!(unsafe { rb.write_from(0, &src) });
    // SAFETY: nothing in this test writes b's region from here on.
    let g: GrantDescriptor = unsafe { b.grant(pb, 0, LEN as u64) }.expect("grant");
    // One read over RDMA first: the grant is known and the queue pairs carry data.
    let mut evs = vec![Vec::new(), Vec::new()];
    // SAFETY: nothing else touches a's region until the read is reported.
    unsafe {
        a.read(ReadOp {
            token: 100,
            peer: pa,
            grant: g,
            offset: 0,
            local_offset: 0,
            len: 4096,
        })
    }
    .expect("read");
    pump(&mut [&mut a, &mut b], &mut evs, "the first read", |e| {
        done_tokens(&e[0]).contains(&(100, true))
    });
    assert_eq!(
        a.stats().rdma_reads.load(Ordering::Relaxed),
        1,
        "the first read went over RDMA"
    );
    evs[0].clear();
    // The NIC (or the peer's) fails: the queue pairs go to ERR without the transport
    // knowing. Its next READs meet that as a bad completion (or a refused post).
    let posted = if break_grantor {
        b.break_queue_pairs(pb)
    } else {
        a.break_queue_pairs(pa)
    }
    .expect("queue pairs to ERR");
    assert_eq!(posted, 0, "nothing in flight at the break");
    let quarter = (LEN / 4) as u64;
    for i in 0..4u64 {
        // SAFETY: disjoint destinations; nothing else touches a's region until every read
        // reported done.
        unsafe {
            a.read(ReadOp {
                token: i + 1,
                peer: pa,
                grant: g,
                offset: i * quarter,
                local_offset: i * quarter,
                len: quarter,
            })
        }
        .expect("read");
    }
    let t0 = Instant::now();
    pump(
        &mut [&mut a, &mut b],
        &mut evs,
        "reads after the break",
        |e| done_tokens(&e[0]).len() == 4,
    );
    let done = done_tokens(&evs[0]);
    println!("4 reads after the break done in {:?}", t0.elapsed());
    assert!(
        done.iter().all(|(_, ok)| *ok),
        "every read succeeds: {done:?}"
    );
    let mut got = vec![0u8; LEN];
    assert!(ra.read_into(0, &mut got));
    assert!(got == src, "bytes differ after the fall-back");
    let stats = a.stats();
    let failovers = stats.failovers.load(Ordering::Relaxed);
    assert_eq!(failovers, 4, "every read after the break went to TCP");
    println!(
        "break_grantor={break_grantor}: {} reads over RDMA, {failovers} moved to TCP; a→b: {:?}",
        stats.rdma_reads.load(Ordering::Relaxed),
        a.peer_path(pa)
    );
    let path = a.peer_path(pa).expect("path");
    assert_eq!(path.kind, "tcp", "the reader left RDMA: {path:?}");
    assert!(path.reason.contains("RDMA"), "{path:?}");
    // The grantor hears of it (Decline) and leaves RDMA too.
    pump(
        &mut [&mut a, &mut b],
        &mut evs,
        "the grantor to leave RDMA",
        |_| true,
    );
    let start = Instant::now();
    while b.peer_path(pb).expect("path").kind != "tcp" {
        assert!(start.elapsed() < LIMIT, "the grantor stays on RDMA");
        b.poll(&mut evs[1], Some(Duration::from_millis(1)))
            .expect("poll");
        a.poll(&mut evs[0], Some(Duration::from_millis(1)))
            .expect("poll");
    }
    // Later reads go over TCP and land.
    let dst = LEN as u64 / 2;
    // SAFETY: every earlier read reported done.
    unsafe {
        a.read(ReadOp {
            token: 9,
            peer: pa,
            grant: g,
            offset: 4096,
            local_offset: dst,
            len: 8192,
        })
    }
    .expect("read");
    pump(&mut [&mut a, &mut b], &mut evs, "a read over TCP", |e| {
        done_tokens(&e[0]).iter().any(|(t, _)| *t == 9)
    });
    assert!(done_tokens(&evs[0]).contains(&(9, true)));
    let mut got = vec![0u8; 8192];
    assert!(ra.read_into(dst, &mut got));
    assert!(got[..] == src[4096..4096 + 8192]);
}

#[test]
fn reads_fall_back_to_tcp_when_the_readers_queue_pairs_break() {
    if device_or_skip("reader's queue pairs") {
        reads_survive_broken_queue_pairs(false);
    }
}

#[test]
fn reads_fall_back_to_tcp_when_the_grantors_queue_pairs_break() {
    if device_or_skip("grantor's queue pairs") {
        reads_survive_broken_queue_pairs(true);
    }
}

/// A hostile peer: a TCP transport that claims RDMA in its Ident and then sends offers.
/// Malformed ones (checked fields) and well-formed lies (queue pairs and a region table that
/// lead nowhere) both end with the peer on TCP, reads correct, and the node serving an
/// honest RDMA peer as before.
#[test]
fn a_peer_with_bogus_queue_pair_data_is_refused_and_the_node_keeps_serving() {
    if !device_or_skip("bogus offers") {
        return;
    }
    const LEN: usize = 1 << 20;
    let (mut a, ra) = rdma(1, LEN);
    // A lie that passes every check and the queue pair transitions: this device's own GID,
    // queue pair numbers nobody has, a region table of made-up keys.
    let gid = verbs::devices()
        .ok()
        .and_then(|d| d.first().map(|d| d.name.clone()))
        .map(|name| verbs::gid_table(&name, 1))
        .and_then(|t| verbs::preferred_roce_v2_gid(&t).map(|g| g.gid))
        .expect("a RoCE v2 GID");
    let good_offer = Offer {
        gid: gid.to_vec(),
        mtu: 3,
        qpns: vec![0xfff0, 0xfff1],
        psns: vec![1, 2],
        max_rd_atomic: 16,
        regions: vec![RegionEntry {
            addr: 0x1000,
            len: LEN as u64,
            rkey: 0x1234,
        }],
        region_len: LEN as u64,
        lid: 0,
        round: 1,
        windows: false,
    };
    let malformed = Offer {
        region_len: 12,
        ..good_offer.clone()
    };
    for (what, offer, lie) in [("malformed", malformed, false), ("lying", good_offer, true)] {
        let hr = Region::owned(LEN);
        let mut hc = cfg(66);
        hc.identity.features = FEATURE_RDMA;
        let mut h = TcpTransport::new(hc, "127.0.0.1:0", hr.clone()).expect("tcp");
        // The hostile side sends its offer as soon as it is connected; the node reports the
        // peer once it has judged it.
        a.connect(&h.local_addr());
        let mut evs = vec![Vec::new(), Vec::new()];
        pump(
            &mut [&mut a, &mut h],
            &mut evs,
            "the hostile side connected",
            |e| connected(&e[1]).is_some(),
        );
        let ph = connected(&evs[1]).expect("connected");
        h.send(ph, proto::encode(Body::Offer(offer))).expect("send");
        if lie {
            h.send(ph, proto::encode(Body::Ready(proto::Ready { round: 1 })))
                .expect("send");
        }
        let t0 = Instant::now();
        pump(
            &mut [&mut a, &mut h],
            &mut evs,
            "the node to report the peer",
            |e| connected(&e[0]).is_some(),
        );
        let pa = connected(&evs[0]).expect("connected");
        println!(
            "{what} offer judged in {:?}: {:?}",
            t0.elapsed(),
            a.peer_path(pa)
        );
        // Wait for the node's verdict: a decline for the malformed offer; for the lie, the
        // first read (below) fails over RDMA and ends on TCP.
        let src = pattern(3, 8192);
        // SAFETY: nothing uses h's region yet.
        assert!(unsafe { hr.write_from(0, &src) });
        // SAFETY: nothing writes h's region from here on.
        let g = unsafe { h.grant(ph, 0, 8192) }.expect("grant");
        pump(
            &mut [&mut a, &mut h],
            &mut evs,
            "the offer to be handled",
            |_| true,
        );
        // SAFETY: nothing else touches a's region until the read is reported.
        unsafe {
            a.read(ReadOp {
                token: 1,
                peer: pa,
                grant: g,
                offset: 0,
                local_offset: 0,
                len: 8192,
            })
        }
        .expect("read");
        pump(&mut [&mut a, &mut h], &mut evs, "the read", |e| {
            !done_tokens(&e[0]).is_empty()
        });
        assert_eq!(
            done_tokens(&evs[0]),
            [(1, true)],
            "{what}: the read over TCP"
        );
        let mut got = vec![0u8; 8192];
        assert!(ra.read_into(0, &mut got));
        assert!(got == src, "{what}: bytes");
        let path = a.peer_path(pa).expect("path");
        println!("{what} offer: {path:?}");
        assert_eq!(path.kind, "tcp", "{what}");
        if !lie {
            assert!(path.reason.contains("bogus"), "{what}: {path:?}");
            assert!(
                evs[1].iter().any(
                    |e| matches!(e, Event::Message { body, .. } if is_transport_private(body))
                ),
                "{what}: the node told the peer (Decline)"
            );
        }
        // Clear the destination for the next round.
        // SAFETY: no read is in flight.
        assert!(unsafe { ra.write_from(0, &[0; 8192]) });
    }
    // An honest peer still gets RDMA.
    let (mut c, _rc) = rdma(3, LEN);
    let (pc, _) = connect(&mut c, &mut a);
    assert_eq!(c.peer_path(pc).expect("path").kind, "rdma");
}

/// Waits until `a` reaches `pa` over `kind`, polling both.
fn wait_path(a: &mut RdmaTransport, b: &mut RdmaTransport, pa: PeerId, kind: &str) {
    let start = Instant::now();
    let mut evs = [Vec::new(), Vec::new()];
    while a.peer_path(pa).expect("path").kind != kind {
        assert!(
            start.elapsed() < LIMIT,
            "{pa} not on {kind}: {:?}",
            a.peer_path(pa)
        );
        a.poll(&mut evs[0], Some(Duration::from_millis(5)))
            .expect("poll");
        b.poll(&mut evs[1], Some(Duration::from_millis(5)))
            .expect("poll");
    }
}

/// A legitimate read of `g` (which makes `a` learn the grant's current window keys).
fn good_read(
    a: &mut RdmaTransport,
    b: &mut RdmaTransport,
    pa: PeerId,
    g: GrantDescriptor,
    token: u64,
) {
    // SAFETY: nothing else touches a's region until the read is reported.
    unsafe {
        a.read(ReadOp {
            token,
            peer: pa,
            grant: g,
            offset: 0,
            local_offset: 0,
            len: g.len,
        })
    }
    .expect("read");
    let mut evs = vec![Vec::new(), Vec::new()];
    pump(&mut [a, b], &mut evs, "a good read", |e| {
        done_tokens(&e[0]).contains(&(token, true))
    });
}

/// What a malicious peer could try with its own verbs, refused by the NIC because grants are
/// memory windows: a READ under the region table's rkey (the memory regions have no remote
/// access) and a READ under a window rkey after its grant's `Revoked`. Each fails at the reader's NIC with a remote access
/// error, no byte lands, and the connection falls back to TCP (and comes back to RDMA).
#[test]
fn memory_windows_make_the_nic_refuse_reads_outside_live_grants() {
    if !device_or_skip("memory windows") {
        return;
    }
    const LEN: usize = 1 << 20;
    let (mut a, ra) = rdma(1, LEN);
    let (mut b, rb) = rdma(2, LEN);
    if !b.windows() {
        println!("SKIPPED: no type-2 memory windows on this device");
        return;
    }
    let (pa, pb) = connect(&mut a, &mut b);
    let src = pattern(11, LEN);
    // SAFETY: nothing uses b's region yet.
    assert!(unsafe { rb.write_from(0, &src) });
    // SAFETY: nothing in this test writes b's region from here on.
    let g = unsafe { b.grant(pb, 8192, 8192) }.expect("grant");
    good_read(&mut a, &mut b, pa, g, 1);
    let mut got = vec![0u8; 8192];
    assert!(ra.read_into(0, &mut got));
    assert!(got[..] == src[8192..16384], "the granted bytes");
    assert_eq!(a.stats().rdma_reads.load(Ordering::Relaxed), 1);
    let dst = 512 << 10;
    let mut token = 100;
    let mut attempt =
        |a: &mut RdmaTransport, b: &mut RdmaTransport, what: &str, off: u64, key: u32| {
            token += 1;
            let failures = a.stats().endpoint_failures.load(Ordering::Relaxed);
            // SAFETY: nothing else touches a's region until the read is reported.
            unsafe { a.read_raw(token, pa, off, key, 0, dst, 4096) }.expect("post");
            let mut evs = vec![Vec::new(), Vec::new()];
            pump(&mut [a, b], &mut evs, what, |e| {
                done_tokens(&e[0]).iter().any(|(t, _)| *t == token)
            });
            assert!(
                done_tokens(&evs[0]).contains(&(token, false)),
                "{what}: the read must fail"
            );
            let path = a.peer_path(pa).expect("path");
            println!("{what}: {path:?}");
            assert!(
                path.reason.contains("REM_ACCESS_ERR"),
                "{what}: refused by the NIC: {path:?}"
            );
            assert_eq!(
                a.stats().endpoint_failures.load(Ordering::Relaxed),
                failures + 1
            );
            let mut got = vec![0u8; 4096];
            assert!(ra.read_into(dst, &mut got));
            assert_eq!(got, vec![0; 4096], "{what}: no byte landed");
            // RDMA comes back (a new set-up round, after the back-off).
            wait_path(a, b, pa, "rdma");
        };
    let mr_key = a.region_rkey(pa).expect("region table");
    attempt(&mut a, &mut b, "the region table's rkey", 0, mr_key);
    // The windows of the old round died with its queue pairs: a good read binds new ones.
    // (A READ beyond the window but inside its memory region is not tried: soft-RoCE checks
    // such a READ against the memory region's bounds only, hardware against the window's;
    // docs/rdma.md.)
    good_read(&mut a, &mut b, pa, g, 3);
    let keys = a.notice_keys(pa, g.id).expect("the grant's notice");
    b.revoke(g.id);
    let mut evs = vec![Vec::new(), Vec::new()];
    pump(&mut [&mut a, &mut b], &mut evs, "the revoke", |e| {
        e[1].iter()
            .any(|e| matches!(e, Event::Revoked { grant } if *grant == g.id))
    });
    attempt(&mut a, &mut b, "a window rkey after Revoked", 8192, keys[0]);
}
