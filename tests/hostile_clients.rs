//! A client that breaks the protocol gets an error or is disconnected; the node keeps serving
//! everyone else. These tests speak the hand-shake by hand and write into the rings directly.

mod common;

use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{connect, pattern, start};
use ferroplasma::protocol::handshake::{self, Welcome, PROTOCOL_VERSION, WELCOME_LEN};
use ferroplasma::protocol::{decode_reply, ErrorReply, Op, Request, Writer};
use ferroplasma::ring::{Consumer, Producer, Segment};
use ferroplasma::shm::fdpass;
use ferroplasma::shm::SharedMapping;

struct Raw {
    sock: UnixStream,
    seg_map: Arc<SharedMapping>,
    req: Producer,
    rep: Consumer,
    doorbell: OwnedFd,
    welcome: Welcome,
}

fn raw_connect(path: &std::path::Path) -> Raw {
    let sock = UnixStream::connect(path).unwrap();
    (&sock)
        .write_all(&handshake::encode_hello(PROTOCOL_VERSION))
        .unwrap();
    let mut w = [0u8; WELCOME_LEN];
    let fds = fdpass::recv_with_fds(&sock, &mut w).unwrap();
    let welcome = Welcome::decode(&w).unwrap();
    let [_arena, seg, doorbell]: [OwnedFd; 3] = fds.try_into().unwrap();
    let seg_map = Arc::new(
        SharedMapping::new(
            std::fs::File::from(seg),
            usize::try_from(welcome.segment_len).unwrap(),
            true,
        )
        .unwrap(),
    );
    let s = Segment::open(seg_map.clone()).unwrap();
    Raw {
        sock,
        req: s.request_producer().unwrap(),
        rep: s.reply_consumer().unwrap(),
        seg_map,
        doorbell,
        welcome,
    }
}

impl Raw {
    fn send(&mut self, bytes: &[u8]) {
        assert!(self.req.try_push(&[bytes]).unwrap());
        rustix::io::write(&self.doorbell, &1u64.to_ne_bytes()).unwrap();
    }

    fn reply(&mut self) -> Option<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = Vec::new();
        while Instant::now() < deadline {
            if self.rep.pop(&mut buf).unwrap() {
                return Some(buf);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }

    /// Whether the node hung up on us within a few seconds.
    fn hung_up(&self) -> bool {
        self.sock
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut b = [0u8; 1];
        matches!(std::io::Read::read(&mut &self.sock, &mut b), Ok(0))
    }
}

fn assert_node_healthy(node: &ferroplasma::server::Node) {
    let c = connect(node);
    let id = c.put(&pattern(3, 70_000)).unwrap();
    assert_eq!(
        &*c.get(&[id], Duration::ZERO).unwrap()[0],
        &pattern(3, 70_000)[..]
    );
}

#[test]
fn malformed_bodies_get_invalid_replies_and_the_connection_lives() {
    let node = start("badbody", 8 << 20);
    let mut raw = raw_connect(&node.info().socket);
    // A create whose body is truncated.
    let mut w = Writer::default();
    Request::Create {
        id: ferroplasma::ObjectId::new(raw.welcome.node_id, [1; 16]),
        data_size: 10,
        meta_size: 0,
        timeout_ms: 0,
    }
    .encode(41, &mut w);
    raw.send(&w.buf[..w.buf.len() - 3]);
    let (op, seq, r) = decode_reply(&raw.reply().unwrap()).unwrap();
    assert_eq!((op, seq), (Op::Create, 41));
    assert!(matches!(r, Err(ErrorReply::Invalid(_))), "{r:?}");
    // A get claiming four billion ids.
    let mut m = vec![Op::Get as u8, 0, 0, 0];
    m.extend_from_slice(&42u32.to_le_bytes());
    m.extend_from_slice(&0u64.to_le_bytes());
    m.extend_from_slice(&u32::MAX.to_le_bytes());
    raw.send(&m);
    let (_, seq, r) = decode_reply(&raw.reply().unwrap()).unwrap();
    assert_eq!(seq, 42);
    assert!(matches!(r, Err(ErrorReply::Invalid(_))), "{r:?}");
    // A put whose data length exceeds its payload.
    let mut m = vec![Op::Put as u8, 0, 0, 0];
    m.extend_from_slice(&43u32.to_le_bytes());
    m.extend_from_slice(ferroplasma::ObjectId::new(raw.welcome.node_id, [2; 16]).as_bytes());
    m.extend_from_slice(&u64::MAX.to_le_bytes());
    m.extend_from_slice(&0u64.to_le_bytes());
    m.extend_from_slice(b"abc");
    raw.send(&m);
    let (_, seq, r) = decode_reply(&raw.reply().unwrap()).unwrap();
    assert_eq!(seq, 43);
    assert!(matches!(r, Err(ErrorReply::Invalid(_))), "{r:?}");
    // Releasing handles it never held is ignored; a valid request still works after all that.
    let mut w = Writer::default();
    Request::Release {
        handles: vec![1, 2, u64::MAX],
    }
    .encode(0, &mut w);
    raw.send(&w.buf);
    let mut w = Writer::default();
    Request::Stats.encode(44, &mut w);
    raw.send(&w.buf);
    let (op, seq, r) = decode_reply(&raw.reply().unwrap()).unwrap();
    assert_eq!((op, seq), (Op::Stats, 44));
    assert!(r.is_ok());
    assert_node_healthy(&node);
}

#[test]
fn undecodable_requests_disconnect_only_that_client() {
    let node = start("undecodable", 8 << 20);
    let good = connect(&node);
    let kept = good.put(b"still here").unwrap();
    for garbage in [vec![0xffu8; 16], vec![1u8, 2], vec![]] {
        let mut raw = raw_connect(&node.info().socket);
        raw.send(&garbage);
        assert!(
            raw.hung_up(),
            "garbage {garbage:?} should end the connection"
        );
    }
    assert_eq!(
        &*good.get(&[kept], Duration::ZERO).unwrap()[0],
        b"still here"
    );
    assert_node_healthy(&node);
}

#[test]
fn scribbled_ring_indices_disconnect_only_that_client() {
    let node = start("scribble", 8 << 20);
    let good = connect(&node);
    let mut rng = fastrand::Rng::with_seed(5);
    for round in 0..20 {
        let mut raw = raw_connect(&node.info().socket);
        // Hold a pin and an unsealed object so that cleanup has work to do.
        let mut w = Writer::default();
        Request::Create {
            id: ferroplasma::ObjectId::new(raw.welcome.node_id, [round; 16]),
            data_size: 100_000,
            meta_size: 0,
            timeout_ms: 0,
        }
        .encode(1, &mut w);
        raw.send(&w.buf);
        assert!(raw.reply().is_some());
        // Request ring tail at offset 4096 of the segment; its data area at 4096 + 128.
        let req_ring = 4096u64;
        let tail: u64 = match round % 3 {
            0 => rng.u64(..),
            1 => 1 << 40,
            _ => 64,
        };
        if round % 3 == 2 {
            // A plausible tail over a record header that lies about its length.
            let mut hdr = [0u8; 8];
            hdr[..4].copy_from_slice(&(rng.u32(1 << 20..u32::MAX)).to_le_bytes());
            raw.seg_map.write_at(req_ring + 128 + 64, &hdr);
            let head_now = 64u64;
            raw.seg_map.write_at(req_ring + 64, &head_now.to_le_bytes());
            raw.seg_map
                .write_at(req_ring, &(head_now + 64).to_le_bytes());
        } else {
            raw.seg_map.write_at(req_ring, &tail.to_le_bytes());
        }
        rustix::io::write(&raw.doorbell, &1u64.to_ne_bytes()).unwrap();
        assert!(
            raw.hung_up(),
            "round {round}: corrupt ring should end the connection"
        );
    }
    let s = good.stats().unwrap();
    assert_eq!(
        (s.objects, s.clients),
        (0, 1),
        "unsealed objects of dropped clients are aborted"
    );
    assert_eq!(s.used_bytes, 0);
    assert_node_healthy(&node);
}

#[test]
fn writing_to_the_socket_after_the_handshake_disconnects() {
    let node = start("chatty", 8 << 20);
    let raw = raw_connect(&node.info().socket);
    (&raw.sock).write_all(b"hello again").unwrap();
    assert!(raw.hung_up());
    assert_node_healthy(&node);
}

#[test]
fn bad_hellos_are_refused() {
    let node = start("badhello", 8 << 20);
    // Wrong magic.
    let s = UnixStream::connect(&node.info().socket).unwrap();
    (&s).write_all(b"GET / HTTP/1.1\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 64];
    assert!(matches!(std::io::Read::read(&mut &s, &mut b), Ok(0)));
    // Wrong version: a welcome with status 1 and no fds.
    let s = UnixStream::connect(&node.info().socket).unwrap();
    (&s).write_all(&handshake::encode_hello(PROTOCOL_VERSION + 7))
        .unwrap();
    let fds = fdpass::recv_with_fds(&s, &mut [0u8; WELCOME_LEN]);
    if let Ok(fds) = fds {
        assert!(fds.is_empty());
    }
    // Silent clients time out without blocking others.
    let _silent = UnixStream::connect(&node.info().socket).unwrap();
    assert_node_healthy(&node);
}

#[test]
fn more_silent_connections_than_handshake_slots_delay_but_do_not_refuse_clients() {
    let node = start("slots", 8 << 20);
    // Hold every hand-shake slot (and more) with connections that never say hello.
    let silent: Vec<UnixStream> = (0..40)
        .map(|_| UnixStream::connect(&node.info().socket).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    let c = connect(&node);
    // The silent ones time out after 2 s; the real client waits in the backlog meanwhile.
    assert!(started.elapsed() < Duration::from_secs(8));
    c.put(b"served").unwrap();
    drop(silent);
}
