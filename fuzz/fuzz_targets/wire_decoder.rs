//! Coverage-guided fuzzing of what a peer node can send: frame headers, chunk bookkeeping,
//! hand-shake messages and control messages. Never panics on any input.
#![no_main]

use ferroplasma_transport::frame::{Header, ReadProgress, HEADER_LEN};
use ferroplasma_transport::hello::{self, Hello, HELLO_LEN, IDENT_FIXED};
use ferroplasma_transport::msg::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = <[u8; HEADER_LEN]>::try_from(data.get(..HEADER_LEN).unwrap_or(&[])) {
        if let Ok(hdr) = Header::decode(&h) {
            let mut p = ReadProgress::new(u64::from(hdr.len) * 2);
            if p.accept(&hdr).is_ok() {
                p.advance(hdr.len);
            }
            let _ = hdr.verify(&data[HEADER_LEN..]);
        }
    }
    if let Ok(h) = <[u8; HELLO_LEN]>::try_from(data.get(..HELLO_LEN).unwrap_or(&[])) {
        let _ = Hello::decode(&h, data.len() % 2 == 0);
    }
    if let Ok(f) = <[u8; IDENT_FIXED]>::try_from(data.get(..IDENT_FIXED).unwrap_or(&[])) {
        if let Ok((_, n)) = hello::decode_ident_fixed(&f) {
            if let Some(a) = data.get(IDENT_FIXED..IDENT_FIXED + n) {
                let _ = hello::decode_ident_addr(a);
            }
        }
    }
    let _ = Envelope::from_bytes(data);
});
