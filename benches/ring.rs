//! Ring micro-benchmarks: one push+pop on one thread, and a request/reply round trip between
//! two threads spinning on the shared cache lines (what a client and the daemon do).

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use ferroplasma::ring::{Consumer, Producer};
use ferroplasma::shm::SharedMapping;

const CAP: u64 = 1 << 16;
const RING_BYTES: u64 = CAP + 128;

fn mapping() -> Arc<SharedMapping> {
    let fd = rustix::fs::memfd_create("ring-bench", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, 2 * RING_BYTES.next_multiple_of(4096)).unwrap();
    let len = usize::try_from(2 * RING_BYTES.next_multiple_of(4096)).unwrap();
    Arc::new(SharedMapping::new(File::from(fd), len, true).unwrap())
}

fn push_pop(c: &mut Criterion) {
    let map = mapping();
    let mut p = Producer::attach(map.clone(), 0, CAP).unwrap();
    let mut q = Consumer::attach(map, 0, CAP).unwrap();
    let msg = [7u8; 100];
    let mut buf = Vec::with_capacity(256);
    c.bench_function("ring push+pop 100 B (one thread)", |b| {
        b.iter(|| {
            assert!(p.try_push(&[&msg]).unwrap());
            assert!(q.pop(&mut buf).unwrap());
        });
    });
}

fn round_trip(c: &mut Criterion) {
    let map = mapping();
    let second = RING_BYTES.next_multiple_of(4096);
    let stop = Arc::new(AtomicBool::new(false));
    let (m2, s2) = (map.clone(), stop.clone());
    let echo = std::thread::spawn(move || {
        let mut req = Consumer::attach(m2.clone(), 0, CAP).unwrap();
        let mut rep = Producer::attach(m2, second, CAP).unwrap();
        let mut buf = Vec::with_capacity(256);
        while !s2.load(Ordering::Relaxed) {
            if req.pop(&mut buf).unwrap() {
                while !rep.try_push(&[&buf]).unwrap() {}
            } else {
                std::hint::spin_loop();
            }
        }
    });
    let mut req = Producer::attach(map.clone(), 0, CAP).unwrap();
    let mut rep = Consumer::attach(map, second, CAP).unwrap();
    let msg = [1u8; 100];
    let mut buf = Vec::with_capacity(256);
    c.bench_function("ring round trip 100 B (two threads, spinning)", |b| {
        b.iter_custom(|n| {
            let t = Instant::now();
            for _ in 0..n {
                assert!(req.try_push(&[&msg]).unwrap());
                let deadline = Instant::now() + Duration::from_secs(5);
                while !rep.pop(&mut buf).unwrap() {
                    assert!(Instant::now() < deadline, "echo thread stalled");
                    std::hint::spin_loop();
                }
            }
            t.elapsed()
        });
    });
    stop.store(true, Ordering::Relaxed);
    echo.join().unwrap();
}

criterion_group!(benches, push_pop, round_trip);
criterion_main!(benches);
