//! The Unix-socket hand-shake's messages (encoding and decoding only; the sockets and the fd
//! passing are in `shm::fdpass`): the client says hello, the daemon answers with a welcome and
//! three file descriptors (arena memfd, control segment memfd, doorbell eventfd). After that
//! the socket carries nothing; it stays open so each side notices when the other dies.
//!
//! ```text
//! hello   (16 bytes): magic "FPHELLO1" | version u32 | flags u32 (0)
//! welcome (64 bytes): magic "FPWELCOM" | version u32 | status u32 (0 ok, 1 version mismatch)
//!                     | node_id u64 | client_id u64 | arena_len u64 | segment_len u64
//!                     | inline_threshold u64 | hugepages u32 | spin_us u32
//! ```

use crate::id::NodeId;
use crate::protocol::{DecodeError, Reader, Writer};

/// Hello magic.
pub const HELLO_MAGIC: &[u8; 8] = b"FPHELLO1";
/// Welcome magic.
pub const WELCOME_MAGIC: &[u8; 8] = b"FPWELCOM";
/// Protocol version spoken over the rings.
pub const PROTOCOL_VERSION: u32 = 3;
/// Hello length.
pub const HELLO_LEN: usize = 16;
/// Welcome length.
pub const WELCOME_LEN: usize = 64;

/// What the daemon tells a new client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// Protocol version of the daemon.
    pub version: u32,
    /// 0: accepted; 1: version mismatch (no fds follow).
    pub status: u32,
    /// The node.
    pub node_id: NodeId,
    /// This client's number.
    pub client_id: u64,
    /// Arena size in bytes.
    pub arena_len: u64,
    /// Control segment size in bytes.
    pub segment_len: u64,
    /// Largest inline put.
    pub inline_threshold: u64,
    /// Whether hugepages back the arena.
    pub hugepages: bool,
    /// How long the daemon spins after activity, in microseconds (a hint for clients).
    pub spin_us: u32,
}

/// Encodes a hello.
pub fn encode_hello(version: u32) -> [u8; HELLO_LEN] {
    let mut b = [0u8; HELLO_LEN];
    b[..8].copy_from_slice(HELLO_MAGIC);
    b[8..12].copy_from_slice(&version.to_le_bytes());
    b
}

/// Decodes a hello into its version.
pub fn decode_hello(b: &[u8]) -> Result<u32, DecodeError> {
    let mut r = Reader::new(b);
    if r.bytes(8)? != HELLO_MAGIC {
        return Err(DecodeError::Invalid("hello magic"));
    }
    let v = r.u32()?;
    let _flags = r.u32()?;
    r.finish()?;
    Ok(v)
}

impl Welcome {
    /// Encodes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.bytes(WELCOME_MAGIC)
            .u32(self.version)
            .u32(self.status)
            .u64(self.node_id.0)
            .u64(self.client_id)
            .u64(self.arena_len)
            .u64(self.segment_len)
            .u64(self.inline_threshold)
            .u32(u32::from(self.hugepages))
            .u32(self.spin_us);
        w.buf
    }

    /// Decodes.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(b);
        if r.bytes(8)? != WELCOME_MAGIC {
            return Err(DecodeError::Invalid("welcome magic"));
        }
        let w = Self {
            version: r.u32()?,
            status: r.u32()?,
            node_id: NodeId(r.u64()?),
            client_id: r.u64()?,
            arena_len: r.u64()?,
            segment_len: r.u64()?,
            inline_threshold: r.u64()?,
            hugepages: r.u32()? != 0,
            spin_us: r.u32()?,
        };
        r.finish()?;
        Ok(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_and_welcome_round_trip() {
        assert_eq!(decode_hello(&encode_hello(7)).unwrap(), 7);
        assert!(decode_hello(b"FPHELLO2\0\0\0\0\0\0\0\0").is_err());
        let w = Welcome {
            version: 1,
            status: 0,
            node_id: NodeId(3),
            client_id: 4,
            arena_len: 5,
            segment_len: 6,
            inline_threshold: 7,
            hugepages: true,
            spin_us: 9,
        };
        let b = w.encode();
        assert_eq!(b.len(), WELCOME_LEN);
        assert_eq!(Welcome::decode(&b).unwrap(), w);
    }
}
