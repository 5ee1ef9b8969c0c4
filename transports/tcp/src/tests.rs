//! The conformance suite over loopback, and hostile peers on raw sockets.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use ferroplasma_transport::conformance::{self, Harness, RegionAccess};
use ferroplasma_transport::frame::{Header, HEADER_LEN};
use ferroplasma_transport::hello::{self, Handshake, Role};
use ferroplasma_transport::session::Sealer;
use ferroplasma_transport::{
    Event, GrantDescriptor, GrantId, Identity, PeerId, ReadError, ReadOp, Transport,
    TransportConfig,
};

use crate::{Region, TcpTransport};

/// Makes tcp transports; with `keyed`, every one uses keyed chunk MACs.
struct H {
    keyed: bool,
}

impl Harness for H {
    fn make(
        &mut self,
        mut cfg: TransportConfig,
        region_len: u64,
    ) -> (Box<dyn Transport>, Box<dyn RegionAccess>) {
        cfg.keyed_checksums |= self.keyed;
        let r = Region::owned(usize::try_from(region_len).expect("region"));
        let t = TcpTransport::new(cfg, "127.0.0.1:0", r.clone()).expect("transport");
        (Box::new(t), Box::new(r))
    }
}

#[test]
fn conformance() {
    conformance::run_all(&mut H { keyed: false });
}

#[test]
fn conformance_with_keyed_checksums() {
    conformance::run_all(&mut H { keyed: true });
}

fn cfg(node_id: u64) -> TransportConfig {
    TransportConfig::new(Identity::new(node_id, String::new()), b"tok".to_vec())
}

struct Node {
    t: TcpTransport,
    mem: Region,
    events: Vec<Event>,
    /// The grant `still_works` reads under.
    granted: Option<GrantDescriptor>,
}

fn node(id: u64) -> Node {
    node_with(cfg(id))
}

fn node_with(cfg: TransportConfig) -> Node {
    let mem = Region::owned(1 << 20);
    let t = TcpTransport::new(cfg, "127.0.0.1:0", mem.clone()).expect("transport");
    Node {
        t,
        mem,
        events: Vec::new(),
        granted: None,
    }
}

/// Polls both nodes until `done` finds what it wants in their events.
fn pump<T>(
    a: &mut Node,
    b: &mut Node,
    what: &str,
    mut done: impl FnMut(&mut Node, &mut Node) -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(t) = done(a, b) {
            return t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        for n in [&mut *a, &mut *b] {
            let mut ev = Vec::new();
            n.t.poll(&mut ev, Some(Duration::from_millis(1)))
                .expect("poll");
            n.events.extend(ev);
        }
    }
}

fn take<T>(n: &mut Node, mut f: impl FnMut(&Event) -> Option<T>) -> Option<T> {
    let i = n.events.iter().position(|e| f(e).is_some())?;
    let e = n.events.remove(i);
    f(&e)
}

/// Checks that `a` and `b` still exchange messages both ways and that `a` can read from `b`.
fn still_works(a: &mut Node, b: &mut Node, pa: PeerId, pb: PeerId, round: u64) {
    a.t.send(pa, format!("ping {round}").into_bytes())
        .expect("send");
    b.t.send(pb, format!("pong {round}").into_bytes())
        .expect("send");
    let token = 1000 + round;
    // SAFETY: the tests touch a's region only after this read reported done, and read
    // nothing else into 4096..8192 meanwhile (each round waits for its read).
    unsafe {
        a.t.read(ReadOp {
            token,
            peer: pa,
            grant: b.granted.expect("a grant to read under"),
            offset: 0,
            local_offset: 4096,
            len: 4096,
        })
    }
    .expect("read");
    let (mut ping, mut pong, mut done) = (false, false, None);
    pump(a, b, "traffic between the authenticated peers", |a, b| {
        ping |= take(b, |e| {
            matches!(e, Event::Message { body, .. } if body == format!("ping {round}").as_bytes())
                .then_some(())
        })
        .is_some();
        pong |= take(a, |e| {
            matches!(e, Event::Message { body, .. } if body == format!("pong {round}").as_bytes())
                .then_some(())
        })
        .is_some();
        done = done.take().or_else(|| {
            take(a, |e| match e {
                Event::ReadDone { token: t, result } if *t == token => Some(result.clone()),
                _ => None,
            })
        });
        (ping && pong && done.is_some()).then_some(())
    });
    assert_eq!(done, Some(Ok(())), "read after round {round}");
    assert_eq!(a.mem.read(4096, 4096), b.mem.read(0, 4096));
}

/// Waits until the raw socket sees the transport close it.
fn expect_closed(s: &mut TcpStream, a: &mut Node, b: &mut Node) {
    s.set_read_timeout(Some(Duration::from_millis(5)))
        .expect("timeout");
    let mut buf = [0u8; 256];
    pump(
        a,
        b,
        "the transport to close the raw connection",
        |_, _| match s.read(&mut buf) {
            Ok(0) => Some(()),
            Ok(_) => None,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(_) => Some(()),
        },
    );
}

/// A raw socket that ran a correct hand-shake with `b`; returns it, `b`'s id for it and the
/// sealer that tags what it sends.
fn authenticated_raw(a: &mut Node, b: &mut Node) -> (TcpStream, PeerId, Sealer) {
    let addr = b.t.local_addr();
    let s = off_thread(a, b, move || {
        let mut s = TcpStream::connect(&addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut hs = Handshake::new(Role::Initiator, b"tok", [7; 32], 77, "raw");
        s.write_all(&hs.hello()).expect("hello");
        let mut h = [0u8; hello::HELLO_LEN];
        s.read_exact(&mut h).expect("their hello");
        hs.their_hello(&h).expect("their hello is valid");
        s.write_all(&hs.proof()).expect("proof");
        let mut p = [0u8; hello::PROOF_LEN];
        s.read_exact(&mut p).expect("their proof");
        hs.their_proof(&p).expect("their proof is valid");
        s.write_all(&hs.ident()).expect("ident");
        let mut f = [0u8; hello::IDENT_FIXED];
        s.read_exact(&mut f).expect("their ident");
        let (node, n) = hello::decode_ident_fixed(&f).expect("ident");
        assert_eq!(node, 2);
        let mut addr_b = vec![0u8; n];
        s.read_exact(&mut addr_b).expect("their address");
        assert_eq!(hello::decode_ident_addr(&addr_b).expect("utf-8"), addr);
        let mut session = hs.session(&[f.as_slice(), &addr_b].concat()).expect("keys");
        s.write_all(&session.sealer.finished()).expect("finished");
        let mut fin = [0u8; hello::FINISHED_LEN];
        s.read_exact(&mut fin).expect("their finished");
        session
            .opener
            .finished(&fin)
            .expect("their finished is valid");
        (s, session.sealer)
    });
    let peer = pump(a, b, "the raw peer to be accepted", |_, b| {
        take(b, |e| match e {
            Event::Connected {
                peer,
                identity,
                inbound: true,
            } if identity.node_id == 77 => Some(*peer),
            _ => None,
        })
    });
    (s.0, peer, s.1)
}

/// Runs blocking raw-socket code on a thread while both nodes are polled (a transport
/// accepts and hand-shakes only while it is polled).
fn off_thread<T: Send + 'static>(
    a: &mut Node,
    b: &mut Node,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let th = std::thread::spawn(f);
    pump(a, b, "the raw socket", |_, _| {
        th.is_finished().then_some(())
    });
    th.join().expect("raw socket thread")
}

fn expect_disconnected(a: &mut Node, b: &mut Node, raw: PeerId) {
    pump(a, b, "the raw peer to be dropped", |_, b| {
        take(b, |e| {
            matches!(e, Event::Disconnected { peer, .. } if *peer == raw).then_some(())
        })
    });
}

#[test]
fn hostile_peers_are_dropped_alone() {
    let mut a = node(1);
    let mut b = node(2);
    let bytes: Vec<u8> = (0..4096u32).map(|i| (i * 7).to_le_bytes()[0]).collect();
    // SAFETY: nothing uses b's region yet.
    unsafe { b.mem.write(0, &bytes) };
    let pa = a.t.connect(&b.t.local_addr());
    let (mut ca, mut cb) = (false, None);
    let pb = pump(&mut a, &mut b, "connection", |a, b| {
        ca |= take(a, |e| {
            matches!(e, Event::Connected { peer, inbound: false, .. } if *peer == pa).then_some(())
        })
        .is_some();
        cb = cb.or_else(|| {
            take(b, |e| match e {
                Event::Connected {
                    peer,
                    inbound: true,
                    ..
                } => Some(*peer),
                _ => None,
            })
        });
        cb.filter(|_| ca)
    });
    // SAFETY: nothing writes b's region after this.
    b.granted = Some(unsafe { b.t.grant(pb, 0, 4096) }.expect("grant"));
    still_works(&mut a, &mut b, pa, pb, 0);

    // 1. Not a ferroplasma node: bad magic.
    let mut s = TcpStream::connect(b.t.local_addr()).expect("connect");
    s.write_all(&[0x55; hello::HELLO_LEN]).expect("garbage");
    expect_closed(&mut s, &mut a, &mut b);
    still_works(&mut a, &mut b, pa, pb, 1);

    // 1b. A node of wire protocol 1: our hello comes back (so it can log the version), then
    //     the connection closes; nothing is reported.
    let addr = b.t.local_addr();
    let (mut s, theirs) = off_thread(&mut a, &mut b, move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut v1 = hello::Hello {
            token: true,
            nonce: [4; 32],
        }
        .encode();
        v1[8..10].copy_from_slice(&1u16.to_le_bytes());
        s.write_all(&v1).expect("v1 hello");
        let mut h = [0u8; hello::HELLO_LEN];
        s.read_exact(&mut h).expect("their hello");
        (s, h)
    });
    assert_eq!(
        hello::Hello::decode(&theirs, true).map(|_| ()),
        Ok(()),
        "the answer is a valid hello of this version"
    );
    expect_closed(&mut s, &mut a, &mut b);
    still_works(&mut a, &mut b, pa, pb, 7);

    // 2. A valid hello, then a proof under the wrong token.
    let addr = b.t.local_addr();
    let mut s = off_thread(&mut a, &mut b, move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut hs = Handshake::new(Role::Initiator, b"wrong", [3; 32], 66, "liar");
        s.write_all(&hs.hello()).expect("hello");
        let mut h = [0u8; hello::HELLO_LEN];
        s.read_exact(&mut h).expect("their hello");
        hs.their_hello(&h).expect("valid hello");
        s.write_all(&hs.proof()).expect("proof");
        s
    });
    expect_closed(&mut s, &mut a, &mut b);
    still_works(&mut a, &mut b, pa, pb, 2);
    assert!(
        !b.events
            .iter()
            .any(|e| matches!(e, Event::Connected { .. })),
        "an unauthenticated peer was reported: {:?}",
        b.events
    );

    // 3. Authenticated, then a frame of unknown kind.
    let (mut s, raw, mut sealer) = authenticated_raw(&mut a, &mut b);
    let mut bad = Header::msg(0).encode();
    bad[0] = 9;
    sealer.seal(&mut bad).expect("seal");
    s.write_all(&bad).expect("bad frame");
    expect_disconnected(&mut a, &mut b, raw);
    expect_closed(&mut s, &mut a, &mut b);
    still_works(&mut a, &mut b, pa, pb, 3);

    // 4. Authenticated, then data for a read nobody asked for.
    let (mut s, raw, mut sealer) = authenticated_raw(&mut a, &mut b);
    let body = b"unsolicited bytes";
    let mut f = Header::read_data(424_242, 0, body, true).encode().to_vec();
    sealer.seal(&mut f).expect("seal");
    f.extend_from_slice(body);
    s.write_all(&f).expect("frame");
    expect_disconnected(&mut a, &mut b, raw);
    expect_closed(&mut s, &mut a, &mut b);
    still_works(&mut a, &mut b, pa, pb, 4);

    // 5. Authenticated, asks for an ungranted range: refused, connection kept; then a
    //    message over the control message cap drops it.
    let (mut s, raw, mut sealer) = authenticated_raw(&mut a, &mut b);
    let mut req = Header::read_req(5, 0, 10, 1).encode();
    sealer.seal(&mut req).expect("seal");
    s.write_all(&req).expect("request");
    let mut h = [0u8; HEADER_LEN];
    s.set_read_timeout(Some(Duration::from_millis(5)))
        .expect("timeout");
    let mut got = 0;
    pump(&mut a, &mut b, "the refusal", |_, _| {
        if let Ok(n) = s.read(&mut h[got..]) {
            got += n;
        }
        (got == HEADER_LEN).then_some(())
    });
    let hdr = Header::decode(&h).expect("a valid header");
    assert_eq!(
        (hdr.kind, hdr.token),
        (ferroplasma_transport::frame::Kind::ReadFail, 5)
    );
    // One byte over the control message cap: refused from the header alone.
    let over = u32::try_from(crate::MAX_CONTROL_MSG + 1).expect("small");
    let mut huge = Header::msg(0).encode();
    huge[4..8].copy_from_slice(&over.to_le_bytes());
    sealer.seal(&mut huge).expect("seal");
    s.write_all(&huge).expect("huge");
    expect_disconnected(&mut a, &mut b, raw);
    expect_closed(&mut s, &mut a, &mut b);
    still_works(&mut a, &mut b, pa, pb, 5);

    // 6. Authenticated, then a well-formed message without its tag (as v1 sent them).
    let (mut s, raw, _) = authenticated_raw(&mut a, &mut b);
    let mut f = Header::msg(4).encode().to_vec();
    f.extend_from_slice(b"v1!!");
    s.write_all(&f).expect("untagged frame");
    expect_disconnected(&mut a, &mut b, raw);
    expect_closed(&mut s, &mut a, &mut b);
    assert!(
        !b.events
            .iter()
            .any(|e| matches!(e, Event::Message { peer, .. } if *peer == raw)),
        "an untagged message was delivered"
    );
    still_works(&mut a, &mut b, pa, pb, 6);
    assert_eq!(
        b.t.stats().protocol_errors,
        3,
        "cases 3, 4 and 5 are protocol errors"
    );
    assert_eq!(b.t.stats().bad_tags, 1, "case 6 fails its tag");
    assert_eq!(a.t.stats().protocol_errors, 0);
    assert_eq!(a.t.stats().bad_tags, 0);
    assert_eq!(a.t.stats().data_received, 8 * 4096);
    assert_eq!(b.t.stats().data_sent, 8 * 4096);
}

#[test]
fn zero_copy_and_copying_sends_both_deliver() {
    for zc in [true, false] {
        let mut a = node(1);
        let mut b = node(2);
        b.t.set_zero_copy(zc);
        let pa = a.t.connect(&b.t.local_addr());
        let (mut ca, mut cb) = (false, None);
        let pb = pump(&mut a, &mut b, "connection", |a, b| {
            ca |= take(a, |e| matches!(e, Event::Connected { .. }).then_some(())).is_some();
            cb = cb.or_else(|| {
                take(b, |e| match e {
                    Event::Connected { peer, .. } => Some(*peer),
                    _ => None,
                })
            });
            cb.filter(|_| ca)
        });
        let src: Vec<u8> = (0..(512u32 << 10))
            .map(|i| (i % 251).to_le_bytes()[0])
            .collect();
        // SAFETY: nothing reads from or into b's region yet.
        unsafe { b.mem.write(0, &src) };
        // SAFETY: nothing writes b's region until the grant is reported revoked.
        let g = unsafe { b.t.grant(pb, 0, 512 << 10) }.expect("grant");
        // SAFETY: nothing touches a's region until the read reported done.
        unsafe {
            a.t.read(ReadOp {
                token: 1,
                peer: pa,
                grant: g,
                offset: 0,
                local_offset: 0,
                len: 512 << 10,
            })
        }
        .expect("read");
        let r = pump(&mut a, &mut b, "read", |a, _| {
            take(a, |e| match e {
                Event::ReadDone { result, .. } => Some(result.clone()),
                _ => None,
            })
        });
        assert_eq!(r, Ok(()));
        assert!(a.mem.read(0, src.len()) == src);
        b.t.revoke(g.id);
        pump(&mut a, &mut b, "revoked", |_, b| {
            take(b, |e| {
                matches!(e, Event::Revoked { grant } if *grant == g.id).then_some(())
            })
        });
        let st = b.t.stats();
        if zc {
            assert!(st.zero_copy_sends >= 1, "{st:?}");
        } else {
            assert_eq!(st.zero_copy_sends, 0, "{st:?}");
            assert!(st.copied_sends >= 1, "{st:?}");
        }
    }
}

#[test]
fn waker_interrupts_poll() {
    let mut a = node(1);
    let w = a.t.waker();
    let start = Instant::now();
    let th = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        w.wake();
    });
    let mut ev = Vec::new();
    a.t.poll(&mut ev, None).expect("poll");
    assert!(start.elapsed() < Duration::from_secs(10));
    th.join().expect("waker thread");
}

/// Two connected transports over regions of `len` bytes, with `chunk`-byte data frames.
fn pair(len: usize, chunk: u32) -> (Node, Node, PeerId, PeerId) {
    let make = |id| {
        let mem = Region::owned(len);
        let mut c = cfg(id);
        c.chunk = chunk;
        let t = TcpTransport::new(c, "127.0.0.1:0", mem.clone()).expect("transport");
        Node {
            t,
            mem,
            events: Vec::new(),
            granted: None,
        }
    };
    let (mut a, mut b) = (make(1), make(2));
    let pa = a.t.connect(&b.t.local_addr());
    let (mut ca, mut cb) = (false, None);
    let pb = pump(&mut a, &mut b, "connection", |a, b| {
        ca |= take(a, |e| matches!(e, Event::Connected { .. }).then_some(())).is_some();
        cb = cb.or_else(|| {
            take(b, |e| match e {
                Event::Connected { peer, .. } => Some(*peer),
                _ => None,
            })
        });
        cb.filter(|_| ca)
    });
    (a, b, pa, pb)
}

/// The reader disconnects after the first chunk of a large read has arrived, while more are
/// on their way: the read's `ReadDone` (an error) comes only once no receive into the
/// destination is in flight, so after it the destination can be reused at once and nothing
/// of the read lands there any more, however long both sides keep running.
#[test]
fn no_bytes_after_read_done_mid_transfer() {
    const LEN: usize = 16 << 20;
    let (mut a, mut b, pa, pb) = pair(LEN, 64 << 10);
    // SAFETY: nothing uses b's region yet.
    unsafe { b.mem.write(0, &vec![0xab; LEN]) };
    // SAFETY: nothing writes b's region from here on.
    let g = unsafe { b.t.grant(pb, 0, LEN as u64) }.expect("grant");
    // SAFETY: the test touches a's region only after the read's ReadDone.
    unsafe {
        a.t.read(ReadOp {
            token: 1,
            peer: pa,
            grant: g,
            offset: 0,
            local_offset: 0,
            len: LEN as u64,
        })
    }
    .expect("read");
    pump(&mut a, &mut b, "the first chunk", |a, _| {
        (a.t.stats().data_received > 0).then_some(())
    });
    a.t.disconnect(pa);
    let r = pump(&mut a, &mut b, "the abandoned read's end", |a, _| {
        take(a, |e| match e {
            Event::ReadDone { token: 1, result } => Some(result.clone()),
            _ => None,
        })
    });
    assert!(
        matches!(r, Err(ReadError::Aborted { peer }) if peer == pa),
        "{r:?}"
    );
    let received = a.t.stats().data_received;
    assert!(
        received < LEN as u64,
        "the whole read arrived: nothing tested"
    );
    let reused = vec![0x5c; LEN];
    // SAFETY: the read reported done: the range is the test's again.
    unsafe { a.mem.write(0, &reused) };
    pump(
        &mut a,
        &mut b,
        "the server to see the disconnection",
        |_, b| take(b, |e| matches!(e, Event::Disconnected { .. }).then_some(())),
    );
    for _ in 0..10 {
        let mut ev = Vec::new();
        a.t.poll(&mut ev, Some(Duration::from_millis(1)))
            .expect("poll");
    }
    assert!(
        a.mem.read(0, LEN) == reused,
        "bytes of the read landed after its ReadDone ({received} of {LEN} bytes had arrived)"
    );
}

/// Work queued outside `poll` (a send after the last poll) is reported by `has_work`, since
/// the ring's fd is not readable for it; `poll` submits it.
#[test]
fn has_work_reports_unsubmitted_sends() {
    let (mut a, mut b, pa, _) = pair(1 << 20, 1 << 16);
    let mut ev = Vec::new();
    a.t.poll(&mut ev, Some(Duration::ZERO)).expect("poll");
    a.t.send(pa, b"after the last poll".to_vec()).expect("send");
    assert!(a.t.has_work(), "a send queued outside poll is not reported");
    a.t.poll(&mut ev, Some(Duration::ZERO)).expect("poll");
    pump(&mut a, &mut b, "the message", |_, b| {
        take(b, |e| {
            matches!(e, Event::Message { body, .. } if body == b"after the last poll").then_some(())
        })
    });
}

/// A keyed reader refuses chunks without a keyed MAC even when their header tag is right
/// (the peer holds the token): the read fails as a protocol error, not a bad tag.
#[test]
fn keyed_reader_refuses_unkeyed_chunks_from_an_authenticated_peer() {
    let mut a = node(1);
    let mut cfg = cfg(2);
    cfg.set_checksum_mode(ferroplasma_transport::ChecksumMode::Keyed);
    let mut b = node_with(cfg);
    let (mut s, raw, mut sealer) = authenticated_raw(&mut a, &mut b);
    // SAFETY: nothing else touches b's region until the read's ReadDone.
    unsafe {
        b.t.read(ReadOp {
            token: 9,
            peer: raw,
            // The raw peer answers by hand; the grant is never checked.
            grant: GrantDescriptor {
                id: GrantId(1),
                addr: 0,
                len: 16,
                key: 0,
            },
            offset: 0,
            local_offset: 0,
            len: 16,
        })
    }
    .expect("read");
    // The request reaches the raw peer and asks for keyed chunks.
    let mut h = [0u8; HEADER_LEN];
    s.set_read_timeout(Some(Duration::from_millis(5)))
        .expect("timeout");
    let mut got = 0;
    pump(&mut a, &mut b, "the read request", |_, _| {
        if let Ok(n) = s.read(&mut h[got..]) {
            got += n;
        }
        (got == HEADER_LEN).then_some(())
    });
    let req = Header::decode(&h).expect("a valid header");
    assert_eq!(req.kind, ferroplasma_transport::frame::Kind::ReadReq);
    assert_ne!(req.flags & ferroplasma_transport::frame::FLAG_KEYED, 0);
    // A correctly tagged chunk with only an xxh3 checksum.
    let body = [0x5a; 16];
    let mut f = Header::read_data(9, 0, &body, true).encode().to_vec();
    sealer.seal(&mut f).expect("seal");
    f.extend_from_slice(&body);
    s.write_all(&f).expect("chunk");
    let r = pump(&mut a, &mut b, "the read to fail", |_, b| {
        take(b, |e| match e {
            Event::ReadDone { token: 9, result } => Some(result.clone()),
            _ => None,
        })
    });
    assert!(r.is_err(), "an unkeyed chunk completed a keyed read: {r:?}");
    expect_disconnected(&mut a, &mut b, raw);
    assert_eq!(b.t.stats().protocol_errors, 1);
    assert_eq!(b.t.stats().bad_tags, 0, "the chunk's header tag was right");
    assert_ne!(b.mem.read(0, 16), body.to_vec(), "the chunk landed");
}

/// A node dialling its own listener (as a man in the middle relaying its hand-shake back to
/// it would make it) is refused in the hand-shake: never reported connected.
#[test]
fn connection_to_itself_is_refused() {
    let mut a = node(1);
    let mut b = node(2);
    let addr = a.t.local_addr();
    let p = a.t.connect(&addr);
    let reason = pump(&mut a, &mut b, "the self-connection to fail", |a, _| {
        take(a, |e| match e {
            Event::ConnectFailed { peer, error } if *peer == p => Some(error.clone()),
            _ => None,
        })
    });
    assert!(
        matches!(reason, ferroplasma_transport::ConnectError::Refused { .. })
            && reason.to_string().contains("itself"),
        "{reason}"
    );
    assert!(
        !a.events
            .iter()
            .any(|e| matches!(e, Event::Connected { .. })),
        "{:?}",
        a.events
    );
}

/// tcp clamps the chunk size it was asked for to `1..=MAX_CHUNK` and applies the checksum
/// mode as asked, and says so.
#[test]
fn data_settings_are_clamped_and_reported() {
    use ferroplasma_transport::ChecksumMode;
    for (chunk, want) in [
        (0, 1),
        (1, 1),
        (1 << 16, 1 << 16),
        (u32::MAX, ferroplasma_transport::frame::MAX_CHUNK),
    ] {
        for mode in [ChecksumMode::Off, ChecksumMode::On, ChecksumMode::Keyed] {
            let mut c = cfg(1);
            c.chunk = chunk;
            c.set_checksum_mode(mode);
            let n = node_with(c);
            let got = n.t.data_settings();
            assert_eq!(got.chunk, Some(want), "asked for {chunk}");
            assert_eq!(got.checksums, mode);
        }
    }
}
