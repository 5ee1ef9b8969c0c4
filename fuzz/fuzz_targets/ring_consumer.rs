//! Coverage-guided fuzzing of `ring::Consumer::pop` over a ring whose producer is hostile:
//! forged tails, record headers, lengths and padding, written into a real shared mapping
//! with guard bytes around the ring. Invariants (checked in `ring_check.rs`, which the
//! randomized test `tests/ring_hostile.rs` shares): never panics, never reads or writes
//! outside the ring, never returns a record longer than the limit or other bytes than the
//! record's, never moves the head past what the tail offered; an honest ring round-trips.
#![no_main]

#[path = "../ring_check.rs"]
mod ring_check;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ring_check::run(data));
