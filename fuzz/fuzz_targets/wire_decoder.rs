//! Coverage-guided fuzzing of what a peer node can send: frame header and body tags (checked
//! before decoding), frame headers, chunk bookkeeping, hand-shake messages and control
//! messages; and the sealer on frames of any shape. Never panics on any input.
#![no_main]

use ferroplasma_transport::frame::{Header, ReadProgress, BODY_TAG_LEN, HEADER_LEN};
use ferroplasma_transport::hello::{self, Hello, Role, HELLO_LEN, IDENT_FIXED};
use ferroplasma_transport::session::Session;
use ferroplasma_transport::msg::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut s = Session::derive(
        b"fuzzing token, 32 bytes long....",
        Role::Acceptor,
        &[1; HELLO_LEN],
        &[2; HELLO_LEN],
        b"ident i",
        b"ident a",
    );
    let _ = s.sealer.seal(&mut data.to_vec());
    if let Ok(h) = <[u8; HEADER_LEN]>::try_from(data.get(..HEADER_LEN).unwrap_or(&[])) {
        // What the receiver does first: the header tag (forgeries fail), then, for a body,
        // its tag.
        let n = s.opener.open_header(&h).unwrap_or(1);
        let rest = &data[HEADER_LEN..];
        if let Some(at) = rest.len().checked_sub(BODY_TAG_LEN) {
            if let Ok(tag) = <[u8; BODY_TAG_LEN]>::try_from(&rest[at..]) {
                let _ = s.opener.open_body(n, &rest[..at], &tag);
            }
        }
        if let Ok(hdr) = Header::decode(&h) {
            let _ = hdr.has_body_tag();
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
