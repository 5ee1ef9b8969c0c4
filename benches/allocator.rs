//! Allocator micro-benchmarks: small and large alloc/free pairs, and churn with many live
//! objects of mixed sizes.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use ferroplasma::shm::Allocator;

fn pairs(c: &mut Criterion) {
    let mut a = Allocator::new(1 << 30);
    c.bench_function("alloc+free 100 B", |b| {
        b.iter(|| {
            let x = a.alloc(100).unwrap();
            assert!(a.free(x));
        });
    });
    c.bench_function("alloc+free 1 MiB", |b| {
        b.iter(|| {
            let x = a.alloc(1 << 20).unwrap();
            assert!(a.free(x));
        });
    });
}

fn churn(c: &mut Criterion) {
    c.bench_function("churn: 10k live mixed objects, 1k alloc/free", |b| {
        b.iter_batched(
            || {
                let mut a = Allocator::new(4 << 30);
                let mut rng = fastrand::Rng::with_seed(3);
                let live: Vec<_> = (0..10_000)
                    .map(|i| {
                        a.alloc(if i % 10 == 0 {
                            rng.u64(4096..4 << 20)
                        } else {
                            rng.u64(1..2048)
                        })
                        .unwrap()
                    })
                    .collect();
                (a, live, rng)
            },
            |(mut a, mut live, mut rng)| {
                for _ in 0..1000 {
                    let i = rng.usize(0..live.len());
                    assert!(a.free(live.swap_remove(i)));
                    let size = if rng.u8(0..10) == 0 {
                        rng.u64(4096..4 << 20)
                    } else {
                        rng.u64(1..2048)
                    };
                    live.push(a.alloc(size).unwrap());
                }
                a
            },
            BatchSize::LargeInput,
        );
    });
}

criterion_group!(benches, pairs, churn);
criterion_main!(benches);
