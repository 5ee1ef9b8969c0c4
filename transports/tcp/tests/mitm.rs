//! A man in the middle on an established, authenticated connection: a proxy on 127.0.0.1
//! between two TCP transports forwards the hand-shake untouched, then injects, flips,
//! replays or rewrites frames. Every such frame must drop that connection (and only it)
//! before its content reaches the event stream.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferroplasma_transport::conformance::RegionAccess;
use ferroplasma_transport::frame::{self, Header, HEADER_LEN};
use ferroplasma_transport::{
    ChecksumMode, Event, GrantDescriptor, GrantId, Identity, PeerId, ReadError, ReadOp, Transport,
    TransportConfig,
};
use ferroplasma_transport_tcp::{Region, TcpTransport};

/// What a tap does to the next whole frame it forwards (then it forwards untouched again).
type Rewrite = Box<dyn FnOnce(Vec<u8>) -> Vec<u8> + Send>;

/// One direction of the proxy.
struct Tap {
    /// The socket towards the receiver (the test injects through it too).
    to: Mutex<TcpStream>,
    /// Armed rewrite of the next frame, and the bytes of that frame gathered so far.
    next: Mutex<Option<(Rewrite, Vec<u8>)>>,
    /// A byte of the hand-shake to flip: its offset in this direction's stream.
    flip: Option<usize>,
    /// Bytes forwarded so far (counted while `flip` is pending).
    seen: Mutex<usize>,
}

impl Tap {
    /// Rewrites the next frame. Arm only while the direction is idle (at a frame boundary).
    fn arm(&self, f: impl FnOnce(Vec<u8>) -> Vec<u8> + Send + 'static) {
        *self.next.lock().expect("tap") = Some((Box::new(f), Vec::new()));
    }

    /// Writes bytes the sender never sent. Only while the direction is idle.
    fn inject(&self, bytes: &[u8]) {
        self.to
            .lock()
            .expect("tap")
            .write_all(bytes)
            .expect("inject");
    }

    /// Forwards `buf`, rewriting the armed frame once it is whole.
    fn forward(&self, buf: &[u8]) -> std::io::Result<()> {
        let mut owned;
        let mut buf = buf;
        if let Some(at) = self.flip {
            let mut seen = self.seen.lock().expect("tap");
            if let Some(i) = at.checked_sub(*seen).filter(|i| *i < buf.len()) {
                owned = buf.to_vec();
                owned[i] ^= 0x01;
                buf = &owned;
            }
            *seen += buf.len();
        }
        let mut next = self.next.lock().expect("tap");
        let Some((_, pending)) = next.as_mut() else {
            drop(next);
            return self.to.lock().expect("tap").write_all(buf);
        };
        pending.extend_from_slice(buf);
        if pending.len() < HEADER_LEN {
            return Ok(());
        }
        let len = u32::from_le_bytes(pending[4..8].try_into().expect("4 bytes"));
        let len = usize::try_from(len).expect("fits");
        // Msg (1) and ReadFail (4) bodies are followed by their body tag.
        let body_tag = if matches!(pending[0], 1 | 4) && len > 0 {
            frame::BODY_TAG_LEN
        } else {
            0
        };
        let whole = HEADER_LEN + len + body_tag;
        if pending.len() < whole {
            return Ok(());
        }
        let (f, mut pending) = next.take().expect("armed");
        let rest = pending.split_off(whole);
        let mut out = f(pending);
        out.extend_from_slice(&rest);
        drop(next);
        self.to.lock().expect("tap").write_all(&out)
    }
}

/// The a → b and b → a taps of the proxied connection, once `a` connected.
type Taps = Arc<Mutex<Option<(Arc<Tap>, Arc<Tap>)>>>;

/// A proxy for one connection: `a` connects to it, it connects to `b`.
struct Proxy {
    addr: String,
    conn: Taps,
}

impl Proxy {
    fn new(target: String) -> Self {
        Self::flipping(target, None)
    }

    /// A proxy that flips the byte at offset `at` of the a → b stream (in the hand-shake).
    fn flipping(target: String, at: Option<usize>) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let conn = Arc::new(Mutex::new(None));
        let conn2 = Arc::clone(&conn);
        std::thread::spawn(move || {
            let (from_a, _) = l.accept().expect("accept");
            let to_b = TcpStream::connect(&target).expect("connect to b");
            from_a.set_nodelay(true).expect("nodelay");
            to_b.set_nodelay(true).expect("nodelay");
            let ab = Arc::new(Tap {
                to: Mutex::new(to_b.try_clone().expect("clone")),
                next: Mutex::new(None),
                flip: at,
                seen: Mutex::new(0),
            });
            let ba = Arc::new(Tap {
                to: Mutex::new(from_a.try_clone().expect("clone")),
                next: Mutex::new(None),
                flip: None,
                seen: Mutex::new(0),
            });
            *conn2.lock().expect("proxy") = Some((Arc::clone(&ab), Arc::clone(&ba)));
            pipe(from_a, ab);
            pipe(to_b, ba);
        });
        Self { addr, conn }
    }

    /// The a → b and b → a taps, once a connected.
    fn taps(&self) -> (Arc<Tap>, Arc<Tap>) {
        self.conn.lock().expect("proxy").clone().expect("connected")
    }
}

fn pipe(mut from: TcpStream, tap: Arc<Tap>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tap.forward(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = tap.to.lock().map(|s| s.shutdown(std::net::Shutdown::Both));
        let _ = from.shutdown(std::net::Shutdown::Both);
    });
}

struct Node {
    t: TcpTransport,
    mem: Region,
    events: Vec<Event>,
}

fn node(id: u64, tweak: impl FnOnce(&mut TransportConfig)) -> Node {
    let mut cfg = TransportConfig::new(Identity::new(id, String::new()), b"cluster token".to_vec());
    tweak(&mut cfg);
    let mem = Region::owned(1 << 20);
    let t = TcpTransport::new(cfg, "127.0.0.1:0", mem.clone()).expect("transport");
    Node {
        t,
        mem,
        events: Vec::new(),
    }
}

/// Polls every node until `done` finds what it wants.
fn pump<T>(
    ns: &mut [&mut Node],
    what: &str,
    mut done: impl FnMut(&mut [&mut Node]) -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(t) = done(ns) {
            return t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        for n in ns.iter_mut() {
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

/// Connects `a` to `b` (through `via` if given); returns (a's peer id, b's peer id).
fn connect(a: &mut Node, b: &mut Node, via: Option<&str>) -> (PeerId, PeerId) {
    let b_addr = b.t.local_addr();
    let pa = a.t.connect(via.unwrap_or(&b_addr));
    let (mut ca, mut cb) = (false, None);
    let pb = pump(&mut [a, b], "connection", |ns| {
        ca |= take(ns[0], |e| {
            matches!(e, Event::Connected { peer, .. } if *peer == pa).then_some(())
        })
        .is_some();
        cb = cb.or_else(|| {
            take(ns[1], |e| match e {
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
    (pa, pb)
}

/// Pumps until `b` reports `pb` disconnected; fails if any message of `pb` arrives first.
fn expect_dropped_without_message(a: &mut Node, b: &mut Node, pb: PeerId) {
    let msg = pump(&mut [a, b], "the tampered connection to end", |ns| {
        if let Some(m) = take(ns[1], |e| match e {
            Event::Message { peer, body } if *peer == pb => Some(Some(body.clone())),
            _ => None,
        }) {
            return Some(m);
        }
        take(ns[1], |e| {
            matches!(e, Event::Disconnected { peer, .. } if *peer == pb).then_some(None)
        })
    });
    assert_eq!(
        msg.map(|m| String::from_utf8_lossy(&m).into_owned()),
        None,
        "a tampered frame reached the event stream"
    );
}

/// A third node `c` connected straight to `b` still talks to it.
fn still_talks(b: &mut Node, c: &mut Node, pc: PeerId) {
    c.t.send(pc, b"still here".to_vec()).expect("send");
    pump(&mut [b, c], "the untouched connection to deliver", |ns| {
        take(ns[0], |e| {
            matches!(e, Event::Message { body, .. } if body == b"still here").then_some(())
        })
    });
}

#[test]
fn injected_control_frame_drops_the_connection() {
    let mut a = node(1, |_| {});
    let mut b = node(2, |_| {});
    let mut c = node(3, |_| {});
    let (pc, _) = connect(&mut c, &mut b, None);
    let proxy = Proxy::new(b.t.local_addr());
    let (_, pb) = connect(&mut a, &mut b, Some(&proxy.addr));
    let (ab, _) = proxy.taps();
    let body = b"injected by the man in the middle";
    let f = frame::unsealed(
        &Header::msg(u32::try_from(body.len()).expect("short")),
        body,
    );
    ab.inject(&f);
    expect_dropped_without_message(&mut a, &mut b, pb);
    still_talks(&mut b, &mut c, pc);
}

#[test]
fn flipped_control_byte_drops_the_connection() {
    let mut a = node(1, |_| {});
    let mut b = node(2, |_| {});
    let proxy = Proxy::new(b.t.local_addr());
    let (pa, pb) = connect(&mut a, &mut b, Some(&proxy.addr));
    let (ab, _) = proxy.taps();
    ab.arm(|mut f| {
        f[HEADER_LEN + 2] ^= 0x20;
        f
    });
    a.t.send(pa, b"hello world".to_vec()).expect("send");
    expect_dropped_without_message(&mut a, &mut b, pb);
}

#[test]
fn replayed_control_frame_drops_the_connection() {
    let mut a = node(1, |_| {});
    let mut b = node(2, |_| {});
    let proxy = Proxy::new(b.t.local_addr());
    let (pa, pb) = connect(&mut a, &mut b, Some(&proxy.addr));
    let (ab, _) = proxy.taps();
    ab.arm(|f| [f.clone(), f].concat());
    a.t.send(pa, b"pay once".to_vec()).expect("send");
    let (mut got, mut gone) = (0, false);
    pump(
        &mut [&mut a, &mut b],
        "the replay to end the connection",
        |ns| {
            while take(ns[1], |e| {
                matches!(e, Event::Message { peer, .. } if *peer == pb).then_some(())
            })
            .is_some()
            {
                got += 1;
            }
            gone |= take(ns[1], |e| {
                matches!(e, Event::Disconnected { peer, .. } if *peer == pb).then_some(())
            })
            .is_some();
            (gone || got > 1).then_some(())
        },
    );
    assert_eq!(got, 1, "the replayed message was delivered twice");
    assert!(gone);
}

/// Starts a read by `a` of 64 KiB that `b` grants, with `b → a` armed by `rewrite`; returns
/// the read's result.
fn tampered_read(
    tweak: impl Fn(&mut TransportConfig),
    rewrite: impl FnOnce(Vec<u8>) -> Vec<u8> + Send + 'static,
) -> Result<(), ReadError> {
    tampered_read_between(&tweak, &tweak, rewrite)
}

/// As [`tampered_read`], with the reader `a` and the server `b` set apart.
fn tampered_read_between(
    tweak_a: impl Fn(&mut TransportConfig),
    tweak_b: impl Fn(&mut TransportConfig),
    rewrite: impl FnOnce(Vec<u8>) -> Vec<u8> + Send + 'static,
) -> Result<(), ReadError> {
    let mut a = node(1, &tweak_a);
    let mut b = node(2, &tweak_b);
    let proxy = Proxy::new(b.t.local_addr());
    let (pa, pb) = connect(&mut a, &mut b, Some(&proxy.addr));
    let (_, ba) = proxy.taps();
    let len = 64u64 << 10;
    let src: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    // SAFETY: nothing reads or writes b's region yet (no grant, no read in flight).
    unsafe { b.mem.write(0, &src) };
    // SAFETY: nothing writes b's region after this.
    let g = unsafe { b.t.grant(pb, 0, len) }.expect("grant");
    ba.arm(rewrite);
    // SAFETY: nothing touches a's region until the read reported done.
    unsafe {
        a.t.read(ReadOp {
            token: 7,
            peer: pa,
            grant: g,
            offset: 0,
            local_offset: 0,
            len,
        })
    }
    .expect("read");
    let r = pump(&mut [&mut a, &mut b], "the read", |ns| {
        take(ns[0], |e| match e {
            Event::ReadDone { token: 7, result } => Some(result.clone()),
            _ => None,
        })
    });
    if r.is_ok() {
        assert!(
            a.mem.read(0, src.len()) == src,
            "a tampered chunk was accepted"
        );
    }
    r
}

#[test]
fn chunk_rewritten_with_a_fresh_checksum_fails_the_read() {
    // An on-path attacker can recompute an unkeyed checksum; the header tag covers it.
    let r = tampered_read(
        |_| {},
        |mut f| {
            f[HEADER_LEN + 5] ^= 1;
            let sum = frame::chunk_sum(&f[HEADER_LEN..]);
            f[32..40].copy_from_slice(&sum.to_le_bytes());
            f
        },
    );
    assert!(r.is_err(), "{r:?}");
}

fn keyed(c: &mut TransportConfig) {
    c.set_checksum_mode(ChecksumMode::Keyed);
}

#[test]
fn flipped_chunk_byte_fails_a_keyed_read() {
    let flip = |mut f: Vec<u8>| {
        f[HEADER_LEN + 5] ^= 1;
        f
    };
    // Both keyed.
    let r = tampered_read(keyed, flip);
    assert!(
        matches!(r, Err(ReadError::Corrupt { offset: 0, .. })),
        "{r:?}"
    );
    // Only the reader keyed: it asks for keyed chunks and gets them.
    let r = tampered_read_between(keyed, |_| {}, flip);
    assert!(matches!(r, Err(ReadError::Corrupt { .. })), "{r:?}");
    // Untouched, keyed reads complete.
    assert_eq!(tampered_read(keyed, |f| f), Ok(()));
    assert_eq!(tampered_read_between(keyed, |_| {}, |f| f), Ok(()));
    assert_eq!(tampered_read_between(|_| {}, keyed, |f| f), Ok(()));
}

#[test]
fn keyed_flag_cannot_be_stripped() {
    // Turning a keyed chunk into an unchecked one (flags and MAC bytes cleared) breaks the
    // header tag, and a keyed reader refuses unkeyed chunks anyway.
    let r = tampered_read(keyed, |mut f| {
        f[1] = 0;
        f[24..40].fill(0);
        f[HEADER_LEN + 5] ^= 1;
        f
    });
    assert!(r.is_err(), "{r:?}");
}

/// An injected header is refused on its tag before it is decoded or its body allocated: a
/// header announcing a 16 MiB message drops the connection at once, with no body sent, and
/// counts as a bad tag (not a protocol error), as does an undecodable one.
#[test]
fn injected_header_is_refused_before_its_body() {
    for (kind, len) in [(1u8, 16u32 << 20), (4, 4096), (9, 0)] {
        let mut a = node(1, |_| {});
        let mut b = node(2, |_| {});
        let proxy = Proxy::new(b.t.local_addr());
        let (_, pb) = connect(&mut a, &mut b, Some(&proxy.addr));
        let (ab, _) = proxy.taps();
        let mut h = Header::msg(len).encode();
        h[0] = kind;
        h[frame::TAG_AT..].fill(0x33);
        ab.inject(&h);
        expect_dropped_without_message(&mut a, &mut b, pb);
        assert_eq!(
            (b.t.stats().bad_tags, b.t.stats().protocol_errors),
            (1, 0),
            "kind {kind}"
        );
    }
}

/// Reads `len` bytes at `off` of `b` that `b` never granted, with `b → a` armed by
/// `rewrite`; returns the read's result and `a`'s bad tag count.
fn refused_read(
    rewrite: impl FnOnce(Vec<u8>) -> Vec<u8> + Send + 'static,
) -> (Result<(), ReadError>, u64) {
    let mut a = node(1, |_| {});
    let mut b = node(2, |_| {});
    let proxy = Proxy::new(b.t.local_addr());
    let (pa, _) = connect(&mut a, &mut b, Some(&proxy.addr));
    let (_, ba) = proxy.taps();
    ba.arm(rewrite);
    // SAFETY: the test touches a's region only after the read's ReadDone.
    unsafe {
        a.t.read(ReadOp {
            token: 8,
            peer: pa,
            // Names no grant of b's.
            grant: GrantDescriptor {
                id: GrantId(1),
                addr: 0,
                len: 100,
                key: 0,
            },
            offset: 0,
            local_offset: 0,
            len: 100,
        })
    }
    .expect("read");
    let r = pump(&mut [&mut a, &mut b], "the refusal", |ns| {
        take(ns[0], |e| match e {
            Event::ReadDone { token: 8, result } => Some(result.clone()),
            _ => None,
        })
    });
    (r, a.t.stats().bad_tags)
}

#[test]
fn altered_refusal_reason_fails_its_body_tag() {
    let (r, bad) = refused_read(|f| f);
    assert!(matches!(r, Err(ReadError::Refused { .. })), "{r:?}");
    assert_eq!(bad, 0);
    let (r, bad) = refused_read(|mut f| {
        f[HEADER_LEN] ^= 0x20;
        f
    });
    assert!(
        matches!(r, Err(ReadError::ProtocolViolation { .. })),
        "an altered refusal was delivered, or not failed as a violation: {r:?}"
    );
    assert_eq!(bad, 1);
}

#[test]
fn keyed_flag_cannot_be_stripped_from_a_request() {
    // A keyed reader asks a plain server for keyed chunks; clearing that bit on the way
    // breaks the request's header tag at the server.
    let mut a = node(1, keyed);
    let mut b = node(2, |_| {});
    let proxy = Proxy::new(b.t.local_addr());
    let (pa, pb) = connect(&mut a, &mut b, Some(&proxy.addr));
    let (ab, _) = proxy.taps();
    // SAFETY: nothing writes b's region while the grant stands.
    let g = unsafe { b.t.grant(pb, 0, 4096) }.expect("grant");
    ab.arm(|mut f| {
        assert_eq!(f[0], 2, "the next a → b frame is the read request");
        assert_eq!(f[1], frame::FLAG_KEYED);
        f[1] = 0;
        f
    });
    // SAFETY: the test touches a's region only after the read's ReadDone.
    unsafe {
        a.t.read(ReadOp {
            token: 5,
            peer: pa,
            grant: g,
            offset: 0,
            local_offset: 0,
            len: 4096,
        })
    }
    .expect("read");
    let r = pump(&mut [&mut a, &mut b], "the read", |ns| {
        take(ns[0], |e| match e {
            Event::ReadDone { token: 5, result } => Some(result.clone()),
            _ => None,
        })
    });
    assert!(r.is_err(), "{r:?}");
    assert_eq!((b.t.stats().bad_tags, b.t.stats().data_sent), (1, 0));
}

/// Flips one byte of `a`'s side of the hand-shake on the way to `b`: `b` never reports the
/// connection, and `a` does not keep one. Returns how `a`'s attempt ended: `Ok(reason)` for a
/// failed connect, `Err(reason)` for a connection that was reported and then lost.
fn altered_handshake(at: impl FnOnce(usize) -> usize) -> Result<String, String> {
    let mut a = node(1, |_| {});
    let mut b = node(2, |_| {});
    // a's stream: Hello (48), Proof (32), Ident (24 + its address), Finished (16).
    let a_addr_len = a.t.local_addr().len();
    let proxy = Proxy::flipping(b.t.local_addr(), Some(at(a_addr_len)));
    let pa = a.t.connect(&proxy.addr);
    let end = pump(
        &mut [&mut a, &mut b],
        "a's connection to fail or end",
        |ns| {
            take(ns[0], |e| match e {
                Event::ConnectFailed { peer, error } if *peer == pa => Some(Ok(error.to_string())),
                Event::Disconnected { peer, reason } if *peer == pa => Some(Err(reason.clone())),
                _ => None,
            })
        },
    );
    assert!(
        !b.events
            .iter()
            .any(|e| matches!(e, Event::Connected { .. } | Event::Message { .. })),
        "b reported an altered hand-shake: {:?}",
        b.events
    );
    end
}

#[test]
fn altered_ident_in_flight_fails_the_handshake() {
    // The low byte of a's node id: the two sides derive different keys, and a refuses b's
    // Finished.
    let end = altered_handshake(|_| 48 + 32 + 8);
    assert!(
        matches!(&end, Ok(r) if r.contains("altered on the path")),
        "{end:?}"
    );
}

#[test]
fn altered_finished_in_flight_fails_the_handshake() {
    // The last byte of a's Finished: b refuses it and closes; a, which had accepted b's
    // Finished, loses the connection.
    let end = altered_handshake(|addr| 48 + 32 + 24 + addr + 15);
    assert!(
        end.is_err() || end.as_ref().is_ok_and(|r| r.contains("closed")),
        "{end:?}"
    );
}
