//! Loopback throughput of one 1 GiB read between two transports, each polled on its own
//! thread, with checksums on and off and with zero-copy or copying sends. Figures only, no
//! assertions on timing:
//!
//! ```text
//! cargo test -p ferroplasma-transport-tcp --release --test throughput -- --ignored --nocapture
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ferroplasma_transport::conformance::RegionAccess;
use ferroplasma_transport::{Event, Identity, ReadOp, Transport, TransportConfig};
use ferroplasma_transport_tcp::{Region, TcpTransport};

const LEN: u64 = 1 << 30;
const ROUNDS: usize = 3;

fn cfg(node_id: u64, checksums: bool) -> TransportConfig {
    let mut c = TransportConfig::new(Identity::new(node_id, String::new()), b"bench".to_vec());
    c.checksums = checksums;
    c
}

/// Runs `ROUNDS` reads of `LEN` bytes; returns the seconds each took.
fn run(src: &Region, dst: &Region, checksums: bool, zero_copy: bool) -> (Vec<f64>, String) {
    let stop = Arc::new(AtomicBool::new(false));
    let (addr_tx, addr_rx) = mpsc::channel();
    let (grant_tx, grant_rx) = mpsc::channel();
    let (src2, stop2) = (src.clone(), Arc::clone(&stop));
    let server = std::thread::spawn(move || {
        let mut b = TcpTransport::new(cfg(2, checksums), "127.0.0.1:0", src2).expect("server");
        b.set_zero_copy(zero_copy);
        addr_tx.send((b.local_addr(), b.waker())).expect("addr");
        let mut ev = Vec::new();
        while !stop2.load(Ordering::Relaxed) {
            b.poll(&mut ev, Some(Duration::from_millis(100)))
                .expect("poll");
            for e in ev.drain(..) {
                if let Event::Connected { peer, .. } = e {
                    // SAFETY: the source region is written before the server starts and
                    // never again.
                    let g = unsafe { b.grant(peer, 0, LEN) }.expect("grant");
                    grant_tx.send(g).expect("grant descriptor");
                }
            }
        }
        format!("{:?}", b.stats())
    });
    let (addr, server_waker) = addr_rx.recv().expect("server address");
    let mut a = TcpTransport::new(cfg(1, checksums), "127.0.0.1:0", dst.clone()).expect("client");
    let peer = a.connect(&addr);
    let mut ev = Vec::new();
    let start = Instant::now();
    'conn: loop {
        a.poll(&mut ev, Some(Duration::from_millis(10)))
            .expect("poll");
        for e in ev.drain(..) {
            match e {
                Event::Connected { .. } => break 'conn,
                Event::ConnectFailed { error, .. } => panic!("connect: {error}"),
                _ => {}
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "connect timed out"
        );
    }
    // The server grants when it sees the connection and hands over the descriptor (in a
    // cluster it travels in the pin reply).
    let grant = grant_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the server's grant");
    let mut secs = Vec::new();
    for round in 0..ROUNDS {
        let token = u64::try_from(round).unwrap_or(0);
        let t = Instant::now();
        // SAFETY: the destination region is touched only after each read reported done,
        // and one read is in flight at a time.
        unsafe {
            a.read(ReadOp {
                token,
                peer,
                grant,
                offset: 0,
                local_offset: 0,
                len: LEN,
            })
        }
        .expect("read");
        'read: loop {
            a.poll(&mut ev, None).expect("poll");
            for e in ev.drain(..) {
                if let Event::ReadDone { token: t2, result } = e {
                    assert_eq!(t2, token);
                    assert_eq!(result, Ok(()));
                    break 'read;
                }
            }
        }
        secs.push(t.elapsed().as_secs_f64());
    }
    stop.store(true, Ordering::Relaxed);
    server_waker.wake();
    let server_stats = server.join().expect("server thread");
    (secs, server_stats)
}

#[test]
#[ignore = "benchmark: prints figures, run in release"]
fn loopback_1gib_read() {
    let n = usize::try_from(LEN).expect("64-bit");
    let src = Region::owned(n);
    let dst = Region::owned(n);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let piece: Vec<u8> = (0..(1usize << 20))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect();
    for i in 0..(LEN >> 20) {
        // SAFETY: no transport uses the region yet.
        unsafe { src.write(i << 20, &piece) };
    }
    println!("1 GiB read over loopback, 4 MiB chunks, {ROUNDS} rounds each");
    for (checksums, zero_copy) in [(true, true), (true, false), (false, true), (false, false)] {
        let (secs, stats) = run(&src, &dst, checksums, zero_copy);
        let gbs: Vec<String> = secs
            .iter()
            .map(|s| format!("{:.2}", (LEN as f64) / s / 1e9))
            .collect();
        println!(
            "checksums {:<5} send {:<7} GB/s per round: {}   (server {stats})",
            checksums,
            if zero_copy { "SEND_ZC" } else { "copy" },
            gbs.join(", ")
        );
        assert!(
            dst.read(LEN - (1 << 20), 1 << 20) == piece,
            "the last MiB differs"
        );
        assert!(dst.read(0, 1 << 20) == piece, "the first MiB differs");
    }
}

/// Round trip of a small message between two transports on loopback, each blocked in
/// `poll` on its own thread (figures only).
#[test]
#[ignore = "prints figures; run in release with --ignored --nocapture"]
fn message_round_trip() {
    let (addr_tx, addr_rx) = mpsc::channel();
    let server = std::thread::spawn(move || {
        let mut b =
            TcpTransport::new(cfg(2, true), "127.0.0.1:0", Region::owned(1 << 16)).expect("server");
        addr_tx.send(b.local_addr()).expect("addr");
        let mut ev = Vec::new();
        // Echo until the client goes away.
        loop {
            b.poll(&mut ev, Some(Duration::from_millis(100)))
                .expect("poll");
            for e in ev.drain(..) {
                match e {
                    Event::Message { peer, body } => b.send(peer, body).expect("echo"),
                    Event::Disconnected { .. } => return,
                    _ => {}
                }
            }
        }
    });
    let addr = addr_rx.recv().expect("addr");
    let mut a =
        TcpTransport::new(cfg(1, true), "127.0.0.1:0", Region::owned(1 << 16)).expect("client");
    let peer = a.connect(&addr);
    let mut ev = Vec::new();
    loop {
        a.poll(&mut ev, Some(Duration::from_millis(10)))
            .expect("poll");
        if ev.drain(..).any(|e| matches!(e, Event::Connected { .. })) {
            break;
        }
    }
    let mut lat = Vec::new();
    for i in 0..2000 {
        let t = Instant::now();
        a.send(peer, vec![7u8; 100]).expect("send");
        'wait: loop {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "echo {i} never came back"
            );
            a.poll(&mut ev, Some(Duration::from_millis(100)))
                .expect("poll");
            for e in ev.drain(..) {
                if matches!(e, Event::Message { .. }) {
                    break 'wait;
                }
            }
        }
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "100-byte message round trip: p50 {:.1} us, p99 {:.1} us",
        lat[1000], lat[1980]
    );
    drop(a);
    server.join().expect("server");
}
