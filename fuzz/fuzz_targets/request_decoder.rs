//! Coverage-guided fuzzing of the daemon's request decoder, the first code that touches bytes
//! a client wrote. Run with `cargo +nightly fuzz run request_decoder` from the repository root.
//! Invariants: never panics; whatever decodes re-encodes to a message that decodes the same.
#![no_main]

use ferroplasma::protocol::{Request, Writer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((seq, req)) = Request::decode(data) {
        let mut w = Writer::default();
        req.encode(seq, &mut w);
        let (seq2, again) = Request::decode(&w.buf).expect("re-encoded request decodes");
        assert_eq!(seq, seq2);
        assert_eq!(req, again);
    }
});
