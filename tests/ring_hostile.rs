//! `ring::Consumer::pop` over hostile and honest rings, driven by fixed-seed random scripts:
//! the same checker as the fuzz target `ring_consumer` (`fuzz/ring_check.rs`), so that the
//! invariants are exercised on every `cargo test`, not only in CI's short fuzz run.

#[path = "../fuzz/ring_check.rs"]
mod ring_check;

/// A script of `len` random bytes; `mode` picks hostile/honest, the capacity and the start.
fn script(rng: &mut fastrand::Rng, mode: u8, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v[0] = mode;
    v
}

#[test]
fn hostile_rings_never_make_pop_misbehave() {
    let mut rng = fastrand::Rng::with_seed(0x5eed_0001);
    for _ in 0..1500u32 {
        let mode = rng.u8(..) & !1;
        let len = rng.usize(1..600);
        ring_check::run(&script(&mut rng, mode, len));
    }
}

#[test]
fn honest_rings_round_trip() {
    let mut rng = fastrand::Rng::with_seed(0x5eed_0002);
    for _ in 0..800u32 {
        let mode = rng.u8(..) | 1;
        let len = rng.usize(1..1200);
        ring_check::run(&script(&mut rng, mode, len));
    }
}
