//! Coverage-guided fuzzing of the client's reply decoder. Never panics on any input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ferroplasma::protocol::decode_reply(data);
});
