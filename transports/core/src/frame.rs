//! Framing of a stream transport after the hand-shake: every frame is a 56-byte header,
//! then `len` body bytes; a Msg or ReadFail body is followed by its 16-byte body tag. All
//! integers little endian.
//!
//! ```text
//! 0   u8   kind      1 Msg, 2 ReadReq, 3 ReadData, 4 ReadFail
//! 1   u8   flags     ReadData: bit 0 `sum` is the xxh3-64 of the body, bit 1 `b‖sum` is the
//!                    keyed chunk MAC; ReadReq: bit 1 asks for keyed chunks; else 0
//! 2   u16  0
//! 4   u32  len       body length
//! 8   u64  token     the read (ReadReq, ReadData, ReadFail); 0 for Msg
//! 16  u64  a         ReadReq: offset in the server's region; ReadData: offset within the read
//! 24  u64  b         ReadReq: bytes to read; keyed ReadData: MAC bytes 0..8; otherwise 0
//! 32  u64  sum       xxh3 of the body, keyed ReadData: MAC bytes 8..16, or 0
//! 40  [16] tag       the header tag (`session`): HMAC-SHA256 truncated to 128 bits over the
//!                    frame number and bytes 0..40, checked before the header is decoded
//! then len bytes     the body
//! then [16] body tag Msg and ReadFail with len > 0: HMAC over the frame number and the body
//! ```
//!
//! The receiver checks the header tag ([`crate::session::Opener::open_header`]) before it
//! decodes anything; decoding then checks everything a peer could lie about: the kind, the
//! flags, zero fields, and the body length against the limit for the kind. A header that
//! fails is a protocol error: the connection is dropped.

/// Header length.
pub const HEADER_LEN: usize = TAG_AT + crate::session::TAG_LEN;
/// Length of the header fields a tag covers (everything before the tag).
pub const FIELDS_LEN: usize = 40;
/// Where the tag sits in the header.
pub const TAG_AT: usize = FIELDS_LEN;
/// Largest control message body (80 KiB): a 64 KiB inline object and the reply around it fit.
/// A stream transport over this framing has this as its
/// [`Transport::max_control_msg`](crate::Transport::max_control_msg).
pub const MAX_MSG: usize = MAX_MSG_U32 as usize;
const MAX_MSG_U32: u32 = 80 << 10;
const _: () = assert!(MAX_MSG >= crate::MIN_CONTROL_MSG);
/// Largest data chunk body.
pub const MAX_CHUNK: u32 = 64 << 20;
/// Length of the tag after a Msg or ReadFail body.
pub const BODY_TAG_LEN: usize = crate::session::TAG_LEN;
/// Largest failure reason.
pub const MAX_REASON: u32 = 4096;
/// Flag: the chunk carries a checksum.
pub const FLAG_CHECKSUM: u8 = 1;
/// Flag: the chunk carries a keyed MAC in `b‖sum` (ReadData), or the reader asks for keyed
/// chunks (ReadReq).
pub const FLAG_KEYED: u8 = 2;

/// Frame kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A control message.
    Msg = 1,
    /// Please send me a range of your region.
    ReadReq = 2,
    /// A chunk of a read.
    ReadData = 3,
    /// A read is refused; the body says why.
    ReadFail = 4,
}

/// A decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Kind.
    pub kind: Kind,
    /// Flags.
    pub flags: u8,
    /// Body length.
    pub len: u32,
    /// Read token.
    pub token: u64,
    /// Kind-specific.
    pub a: u64,
    /// Kind-specific.
    pub b: u64,
    /// Body checksum.
    pub sum: u64,
}

/// Why a header is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Unknown kind byte.
    #[error("unknown frame kind {0}")]
    Kind(u8),
    /// Flags or reserved bytes set where they must not be.
    #[error("bad flags or reserved bytes in a {0:?} frame")]
    Reserved(Kind),
    /// Body longer than allowed for the kind.
    #[error("{kind:?} frame of {len} bytes exceeds {max}")]
    TooLong {
        /// Kind.
        kind: Kind,
        /// Claimed.
        len: u32,
        /// Limit.
        max: u32,
    },
}

impl Header {
    /// A control message header.
    pub fn msg(len: u32) -> Self {
        Self {
            kind: Kind::Msg,
            flags: 0,
            len,
            token: 0,
            a: 0,
            b: 0,
            sum: 0,
        }
    }

    /// A read request of `[offset, offset + len)` of the server's region under the grant
    /// the server numbered `grant` (carried in `sum`).
    pub fn read_req(token: u64, offset: u64, len: u64, grant: u64) -> Self {
        Self {
            kind: Kind::ReadReq,
            flags: 0,
            len: 0,
            token,
            a: offset,
            b: len,
            sum: grant,
        }
    }

    /// A data chunk, checksummed when `checksum` is on.
    pub fn read_data(token: u64, offset: u64, body: &[u8], checksum: bool) -> Self {
        Self {
            kind: Kind::ReadData,
            flags: if checksum { FLAG_CHECKSUM } else { 0 },
            len: u32::try_from(body.len()).unwrap_or(u32::MAX),
            token,
            a: offset,
            b: 0,
            sum: if checksum { chunk_sum(body) } else { 0 },
        }
    }

    /// A data chunk with a keyed MAC of its body.
    pub fn read_data_keyed(token: u64, offset: u64, len: u32, mac: [u8; 16]) -> Self {
        let (lo, hi) = mac.split_at(8);
        Self {
            kind: Kind::ReadData,
            flags: FLAG_KEYED,
            len,
            token,
            a: offset,
            b: u64::from_le_bytes(lo.try_into().unwrap_or([0; 8])),
            sum: u64::from_le_bytes(hi.try_into().unwrap_or([0; 8])),
        }
    }

    /// The keyed MAC a keyed data chunk carries.
    pub fn keyed_mac(&self) -> [u8; 16] {
        let mut m = [0u8; 16];
        m[..8].copy_from_slice(&self.b.to_le_bytes());
        m[8..].copy_from_slice(&self.sum.to_le_bytes());
        m
    }

    /// A refusal.
    pub fn read_fail(token: u64, len: u32) -> Self {
        Self {
            kind: Kind::ReadFail,
            flags: 0,
            len,
            token,
            a: 0,
            b: 0,
            sum: 0,
        }
    }

    /// The header bytes, with a zero tag (the sender's [`crate::session::Sealer`] fills it).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0] = self.kind as u8;
        h[1] = self.flags;
        h[4..8].copy_from_slice(&self.len.to_le_bytes());
        h[8..16].copy_from_slice(&self.token.to_le_bytes());
        h[16..24].copy_from_slice(&self.a.to_le_bytes());
        h[24..32].copy_from_slice(&self.b.to_le_bytes());
        h[32..40].copy_from_slice(&self.sum.to_le_bytes());
        h
    }

    /// Decodes and checks a header received from a peer.
    pub fn decode(h: &[u8; HEADER_LEN]) -> Result<Self, FrameError> {
        let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let kind = match h[0] {
            1 => Kind::Msg,
            2 => Kind::ReadReq,
            3 => Kind::ReadData,
            4 => Kind::ReadFail,
            k => return Err(FrameError::Kind(k)),
        };
        let hdr = Self {
            kind,
            flags: h[1],
            len: u32_at(4),
            token: u64_at(8),
            a: u64_at(16),
            b: u64_at(24),
            sum: u64_at(32),
        };
        let reserved_ok = h[2] == 0
            && h[3] == 0
            && match kind {
                Kind::Msg => {
                    hdr.flags == 0 && hdr.token == 0 && hdr.a == 0 && hdr.b == 0 && hdr.sum == 0
                }
                Kind::ReadReq => hdr.flags & !FLAG_KEYED == 0 && hdr.len == 0,
                Kind::ReadData => match hdr.flags {
                    0 => hdr.b == 0 && hdr.sum == 0,
                    FLAG_CHECKSUM => hdr.b == 0,
                    FLAG_KEYED => true,
                    _ => false,
                },
                Kind::ReadFail => hdr.flags == 0 && hdr.a == 0 && hdr.b == 0 && hdr.sum == 0,
            };
        if !reserved_ok {
            return Err(FrameError::Reserved(kind));
        }
        let max = match kind {
            Kind::Msg => MAX_MSG_U32,
            Kind::ReadReq => 0,
            Kind::ReadData => MAX_CHUNK,
            Kind::ReadFail => MAX_REASON,
        };
        if hdr.len > max {
            return Err(FrameError::TooLong {
                kind,
                len: hdr.len,
                max,
            });
        }
        Ok(hdr)
    }

    /// Whether `body` matches the xxh3 checksum, if the frame has one (keyed MACs are checked
    /// with the session's [`crate::session::ChunkMac`]).
    pub fn verify(&self, body: &[u8]) -> bool {
        self.flags & FLAG_CHECKSUM == 0 || chunk_sum(body) == self.sum
    }
}

/// A Msg or ReadFail frame ready for [`crate::session::Sealer::seal`]: the header, then, when
/// `body` is not empty, the body and a zeroed slot for its body tag. `hdr.len` must be
/// `body.len()`.
pub fn unsealed(hdr: &Header, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(HEADER_LEN + body.len() + BODY_TAG_LEN);
    f.extend_from_slice(&hdr.encode());
    if !body.is_empty() {
        f.extend_from_slice(body);
        f.extend_from_slice(&[0; BODY_TAG_LEN]);
    }
    f
}

impl Header {
    /// Whether the body is followed by a body tag (a Msg or ReadFail with a body): the bytes
    /// that follow the header on the wire are then `len + BODY_TAG_LEN`.
    pub fn has_body_tag(&self) -> bool {
        matches!(self.kind, Kind::Msg | Kind::ReadFail) && self.len > 0
    }
}

/// The checksum of a data chunk: xxh3-64.
pub fn chunk_sum(body: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(body)
}

/// Tracks the chunks of one read on the receiving side: they must arrive in order, inside
/// the read, and add up to its length exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadProgress {
    /// Bytes the read asks for.
    pub len: u64,
    /// Bytes received so far.
    pub got: u64,
}

impl ReadProgress {
    /// A read of `len` bytes.
    pub fn new(len: u64) -> Self {
        Self { len, got: 0 }
    }

    /// Checks the next chunk's header against the read; `Err` names the lie.
    pub fn accept(&self, hdr: &Header) -> Result<(), &'static str> {
        if hdr.a != self.got {
            return Err("chunk out of order");
        }
        if u64::from(hdr.len) > self.len - self.got {
            return Err("chunk beyond the end of the read");
        }
        if hdr.len == 0 && self.len != 0 {
            return Err("empty chunk");
        }
        Ok(())
    }

    /// Records a received chunk; returns whether the read is complete.
    pub fn advance(&mut self, n: u32) -> bool {
        self.got += u64::from(n);
        self.got == self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_checks() {
        let body = b"hello chunk";
        let h = Header::read_data(7, 4096, body, true);
        let d = Header::decode(&h.encode()).unwrap();
        assert_eq!(d, h);
        assert!(d.verify(body));
        assert!(!d.verify(b"hellO chunk"));
        let mut bad = h.encode();
        bad[0] = 9;
        assert_eq!(Header::decode(&bad), Err(FrameError::Kind(9)));
        let mut bad = h.encode();
        bad[1] = FLAG_CHECKSUM | FLAG_KEYED;
        assert!(matches!(Header::decode(&bad), Err(FrameError::Reserved(_))));
        let mut bad = h.encode();
        bad[24] = 1; // `b` set in an xxh3 chunk
        assert!(matches!(Header::decode(&bad), Err(FrameError::Reserved(_))));
        let k = Header::read_data_keyed(7, 0, 3, [9; 16]);
        let d = Header::decode(&k.encode()).unwrap();
        assert_eq!((d, d.keyed_mac()), (k, [9; 16]));
        let mut r = Header::read_req(1, 2, 3, 4);
        r.flags = FLAG_KEYED;
        assert_eq!(Header::decode(&r.encode()).unwrap(), r);
        r.flags = FLAG_CHECKSUM;
        assert!(Header::decode(&r.encode()).is_err());
        let big = Header::msg(MAX_MSG_U32 + 1).encode();
        assert!(matches!(
            Header::decode(&big),
            Err(FrameError::TooLong { .. })
        ));
        let r = Header::read_req(1, 2, 3, 4);
        assert_eq!(Header::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn progress_refuses_lies() {
        let mut p = ReadProgress::new(10);
        let chunk = |off: u64, len: u32| Header {
            len,
            ..Header::read_data(1, off, &[], false)
        };
        assert!(p.accept(&chunk(1, 4)).is_err());
        assert!(p.accept(&chunk(0, 11)).is_err());
        assert!(p.accept(&chunk(0, 0)).is_err());
        assert!(p.accept(&chunk(0, 6)).is_ok());
        assert!(!p.advance(6));
        assert!(p.accept(&chunk(6, 5)).is_err());
        assert!(p.accept(&chunk(6, 4)).is_ok());
        assert!(p.advance(4));
    }

    #[test]
    fn random_headers_never_panic() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..100_000 {
            let mut h = [0u8; HEADER_LEN];
            for b in &mut h {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x.to_le_bytes()[0];
                if x & 0x300 == 0 {
                    *b = 0;
                }
            }
            h[0] %= 6;
            let _ = Header::decode(&h);
        }
    }
}
