//! What a grant gives the reader: a [`GrantDescriptor`], made by the granting transport,
//! carried to the reader inside a control message (the cluster's `PinReply.grant`) and handed
//! back to the reader's transport in [`crate::ReadOp::grant`]. The serving side checks every
//! read against the grant the descriptor names; the reader treats it as opaque.
//!
//! Encoded as [`DESCRIPTOR_LEN`] bytes (docs/wire-protocol.md, "Grant descriptor"):
//!
//! ```text
//!  0  1  kind      1: an address range of the grantor's region
//!  1  3  reserved  0
//!  4  4  key       u32 LE: tcp, mem: 0; rdma: the rkey of the memory window
//!  8  8  grant     u64 LE: the grantor's grant number (GrantId)
//! 16  8  addr      u64 LE: tcp, mem: offset of the range in the grantor's region;
//!                          rdma: its remote virtual address
//! 24  8  len       u64 LE: length of the range
//! ```

use crate::GrantId;

/// Length of an encoded [`GrantDescriptor`].
pub const DESCRIPTOR_LEN: usize = 32;
/// The only kind of descriptor so far.
const KIND_RANGE: u8 = 1;

/// Names one grant of one range of the grantor's region, for the peer it was granted to.
/// A transport's `grant` makes it; the reader sends it back with every read of the range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GrantDescriptor {
    /// The grantor's number for the grant (what the grantor checks reads against, and what
    /// [`crate::Transport::revoke`] and [`crate::Event::Revoked`] name).
    pub id: GrantId,
    /// Where the range starts: an offset in the grantor's region (tcp, mem) or a remote
    /// address (rdma).
    pub addr: u64,
    /// Length of the range.
    pub len: u64,
    /// A transport key (rdma: the rkey); 0 where unused.
    pub key: u32,
}

/// Why bytes are not a grant descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DescriptorError {
    /// Not [`DESCRIPTOR_LEN`] bytes.
    #[error("a grant descriptor is {DESCRIPTOR_LEN} bytes, not {0}")]
    Length(usize),
    /// An unknown kind, or reserved bytes not zero.
    #[error("unknown grant descriptor kind {0} or reserved bytes set")]
    Kind(u8),
    /// `addr + len` overflows.
    #[error("grant descriptor range overflows")]
    Range,
}

impl GrantDescriptor {
    /// The encoded form.
    pub fn encode(&self) -> [u8; DESCRIPTOR_LEN] {
        let mut b = [0u8; DESCRIPTOR_LEN];
        b[0] = KIND_RANGE;
        b[4..8].copy_from_slice(&self.key.to_le_bytes());
        b[8..16].copy_from_slice(&self.id.0.to_le_bytes());
        b[16..24].copy_from_slice(&self.addr.to_le_bytes());
        b[24..32].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decodes bytes a peer sent; checks length, kind, reserved bytes and that the range does
    /// not overflow. That the grant exists is the grantor's to check.
    pub fn decode(b: &[u8]) -> Result<Self, DescriptorError> {
        let b: &[u8; DESCRIPTOR_LEN] =
            b.try_into().map_err(|_| DescriptorError::Length(b.len()))?;
        if b[0] != KIND_RANGE || b[1..4] != [0, 0, 0] {
            return Err(DescriptorError::Kind(b[0]));
        }
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        let mut key = [0u8; 4];
        key.copy_from_slice(&b[4..8]);
        let d = Self {
            id: GrantId(u64_at(8)),
            addr: u64_at(16),
            len: u64_at(24),
            key: u32::from_le_bytes(key),
        };
        d.addr.checked_add(d.len).ok_or(DescriptorError::Range)?;
        Ok(d)
    }

    /// The range `[addr + offset, addr + offset + len)` when it lies inside the descriptor's
    /// range.
    pub fn slice(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        Some((self.addr.checked_add(offset)?, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_layout() {
        let d = GrantDescriptor {
            id: GrantId(0x0102_0304_0506_0708),
            addr: 4096,
            len: 77,
            key: 0xdead_beef,
        };
        let b = d.encode();
        assert_eq!(b[0], 1);
        assert_eq!(&b[4..8], &0xdead_beef_u32.to_le_bytes());
        assert_eq!(&b[8..16], &0x0102_0304_0506_0708_u64.to_le_bytes());
        assert_eq!(&b[16..24], &4096u64.to_le_bytes());
        assert_eq!(&b[24..32], &77u64.to_le_bytes());
        assert_eq!(GrantDescriptor::decode(&b), Ok(d));
    }

    #[test]
    fn bad_bytes_are_refused() {
        let d = GrantDescriptor {
            id: GrantId(1),
            addr: 0,
            len: 1,
            key: 0,
        };
        let b = d.encode();
        assert_eq!(
            GrantDescriptor::decode(&b[..31]),
            Err(DescriptorError::Length(31))
        );
        assert_eq!(
            GrantDescriptor::decode(&[0u8; 33]),
            Err(DescriptorError::Length(33))
        );
        let mut k = b;
        k[0] = 2;
        assert!(GrantDescriptor::decode(&k).is_err());
        let mut r = b;
        r[2] = 1;
        assert!(GrantDescriptor::decode(&r).is_err());
        let mut o = b;
        o[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(GrantDescriptor::decode(&o), Err(DescriptorError::Range));
    }

    #[test]
    fn slices_stay_inside() {
        let d = GrantDescriptor {
            id: GrantId(1),
            addr: 100,
            len: 50,
            key: 0,
        };
        assert_eq!(d.slice(0, 50), Some((100, 50)));
        assert_eq!(d.slice(10, 40), Some((110, 40)));
        assert_eq!(d.slice(10, 41), None);
        assert_eq!(d.slice(u64::MAX, 2), None);
    }
}
