//! The spill file format (docs/spill-format.md). Pure encoding and checking, no I/O.
//!
//! ```text
//! file   = file header block (4096 B) , record*
//! record = inline: one 4096 B block: record header (128 B) + payload (≤ 3968 B) + zeros
//!        | extent: record header block (4096 B: header + zeros) + payload padded to 4096 B
//! ```
//! Every block is 4096-byte aligned so the whole file can be written and read with O_DIRECT,
//! extents straight from and into the arena.

use xxhash_rust::xxh3::xxh3_64;

use crate::id::{NodeId, ObjectId};

/// Alignment and block size of everything in a spill file.
pub const BLOCK: u64 = 4096;
/// [`BLOCK`] as a `usize`.
pub const BLOCK_USIZE: usize = 4096;
const BLOCK_U32: u32 = 4096;
/// File header magic.
pub const FILE_MAGIC: &[u8; 8] = b"FPSPILL1";
/// Record header magic.
pub const RECORD_MAGIC: &[u8; 8] = b"FPSPREC1";
/// Format version.
pub const VERSION: u32 = 1;
/// Bytes of a record header.
pub const RECORD_HEADER: usize = 128;
/// Largest payload stored inline, in the header's block.
pub const INLINE_MAX: u64 = BLOCK - RECORD_HEADER as u64;
const FILE_HEADER: usize = 64;

/// Record kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    /// Payload inside the header block.
    Inline = 0,
    /// Payload in the blocks after the header block.
    Extent = 1,
}

/// What a record header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// Inline or extent.
    pub kind: Kind,
    /// The object.
    pub id: ObjectId,
    /// Data bytes.
    pub data_size: u64,
    /// Metadata bytes (after the data).
    pub meta_size: u64,
    /// xxh3-64 of data then metadata.
    pub payload_checksum: u64,
}

/// Why a header or payload was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// Not a spill file or record.
    #[error("bad magic")]
    BadMagic,
    /// Written by another format version.
    #[error("spill format version {0}, this node reads {VERSION}: upgrade required")]
    Version(u32),
    /// Header checksum mismatch.
    #[error("header checksum mismatch")]
    HeaderChecksum,
    /// Payload checksum mismatch.
    #[error("payload checksum mismatch")]
    PayloadChecksum,
    /// The header names another object or other sizes than the node expected.
    #[error("record describes {found}, expected {expected}")]
    WrongRecord {
        /// What the node expected.
        expected: ObjectId,
        /// What the record says.
        found: ObjectId,
    },
    /// Impossible field values.
    #[error("invalid record field {0}")]
    Invalid(&'static str),
}

impl RecordHeader {
    /// Kind for a payload of `len` bytes.
    pub fn kind_for(len: u64) -> Kind {
        if len <= INLINE_MAX {
            Kind::Inline
        } else {
            Kind::Extent
        }
    }

    /// Payload length.
    pub fn payload_len(&self) -> u64 {
        self.data_size + self.meta_size
    }

    /// Bytes the record takes on disk.
    pub fn disk_len(&self) -> u64 {
        match self.kind {
            Kind::Inline => BLOCK,
            Kind::Extent => BLOCK + self.payload_len().next_multiple_of(BLOCK),
        }
    }

    /// Writes the header into the first [`RECORD_HEADER`] bytes of `block`.
    pub fn encode(&self, block: &mut [u8]) {
        let h = &mut block[..RECORD_HEADER];
        h.fill(0);
        h[0..8].copy_from_slice(RECORD_MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(self.kind as u32).to_le_bytes());
        h[16..40].copy_from_slice(self.id.as_bytes());
        h[40..48].copy_from_slice(&self.data_size.to_le_bytes());
        h[48..56].copy_from_slice(&self.meta_size.to_le_bytes());
        h[56..64].copy_from_slice(&self.payload_checksum.to_le_bytes());
        let sum = xxh3_64(&h[..64]);
        h[64..72].copy_from_slice(&sum.to_le_bytes());
    }

    /// Reads and checks a header.
    pub fn decode(block: &[u8]) -> Result<Self, FormatError> {
        let h = checked_header(block, RECORD_HEADER, RECORD_MAGIC, 64)?;
        let kind = match le_u32(h, 12) {
            0 => Kind::Inline,
            1 => Kind::Extent,
            _ => return Err(FormatError::Invalid("kind")),
        };
        let mut id = [0u8; ObjectId::LEN];
        id.copy_from_slice(&h[16..40]);
        let r = Self {
            kind,
            id: ObjectId::from_bytes(id),
            data_size: le_u64(h, 40),
            meta_size: le_u64(h, 48),
            payload_checksum: le_u64(h, 56),
        };
        let len = r
            .data_size
            .checked_add(r.meta_size)
            .ok_or(FormatError::Invalid("sizes"))?;
        if Self::kind_for(len) != kind {
            return Err(FormatError::Invalid("kind does not match size"));
        }
        Ok(r)
    }

    /// Checks that this header describes `id` with these sizes, and that `payload` matches.
    pub fn verify(
        &self,
        id: &ObjectId,
        data_size: u64,
        meta_size: u64,
        payload: &[u8],
    ) -> Result<(), FormatError> {
        self.verify_checksum(id, data_size, meta_size, xxh3_64(payload))
    }

    /// As [`RecordHeader::verify`], given the payload's checksum (computed by the caller,
    /// e.g. over shared memory that must not be borrowed as a slice).
    pub fn verify_checksum(
        &self,
        id: &ObjectId,
        data_size: u64,
        meta_size: u64,
        payload_checksum: u64,
    ) -> Result<(), FormatError> {
        if self.id != *id || self.data_size != data_size || self.meta_size != meta_size {
            return Err(FormatError::WrongRecord {
                expected: *id,
                found: self.id,
            });
        }
        if payload_checksum != self.payload_checksum {
            return Err(FormatError::PayloadChecksum);
        }
        Ok(())
    }
}

/// Checksum of a payload.
pub fn checksum(payload: &[u8]) -> u64 {
    xxh3_64(payload)
}

/// Writes a file header block for `node`'s file number `seq`.
pub fn encode_file_header(node: NodeId, seq: u64, block: &mut [u8]) {
    let h = &mut block[..FILE_HEADER];
    h.fill(0);
    h[0..8].copy_from_slice(FILE_MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&BLOCK_U32.to_le_bytes());
    h[16..24].copy_from_slice(&node.0.to_le_bytes());
    h[24..32].copy_from_slice(&seq.to_le_bytes());
    let sum = xxh3_64(&h[..32]);
    h[32..40].copy_from_slice(&sum.to_le_bytes());
}

/// Reads a file header: `(node, seq)`.
pub fn decode_file_header(block: &[u8]) -> Result<(NodeId, u64), FormatError> {
    let h = checked_header(block, FILE_HEADER, FILE_MAGIC, 32)?;
    Ok((NodeId(le_u64(h, 16)), le_u64(h, 24)))
}

/// The first `len` bytes of `block`, once its magic, its xxh3 checksum (stored at `sum_at`,
/// covering the bytes before it) and its version (at 8) check out, in that order.
fn checked_header<'a>(
    block: &'a [u8],
    len: usize,
    magic: &[u8; 8],
    sum_at: usize,
) -> Result<&'a [u8], FormatError> {
    let h = block
        .get(..len)
        .ok_or(FormatError::Invalid("short header"))?;
    if &h[0..8] != magic {
        return Err(FormatError::BadMagic);
    }
    if le_u64(h, sum_at) != xxh3_64(&h[..sum_at]) {
        return Err(FormatError::HeaderChecksum);
    }
    match le_u32(h, 8) {
        VERSION => Ok(h),
        v => Err(FormatError::Version(v)),
    }
}

fn le_u64(h: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(h[at..at + 8].try_into().unwrap_or_default())
}

fn le_u32(h: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(h[at..at + 4].try_into().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_header_round_trip_and_corruption() {
        let payload = vec![5u8; 5000];
        let h = RecordHeader {
            kind: RecordHeader::kind_for(5000),
            id: ObjectId::new(NodeId(1), [2; 16]),
            data_size: 4990,
            meta_size: 10,
            payload_checksum: checksum(&payload),
        };
        assert_eq!(h.kind, Kind::Extent);
        assert_eq!(h.disk_len(), 4096 + 8192);
        let mut block = vec![0u8; 4096];
        h.encode(&mut block);
        let back = RecordHeader::decode(&block).unwrap();
        assert_eq!(back, h);
        back.verify(&h.id, 4990, 10, &payload).unwrap();
        let mut bad = payload.clone();
        bad[4999] ^= 1;
        assert_eq!(
            back.verify(&h.id, 4990, 10, &bad),
            Err(FormatError::PayloadChecksum)
        );
        for i in 0..72 {
            let mut b = block.clone();
            b[i] ^= 0x40;
            assert!(
                RecordHeader::decode(&b).is_err(),
                "flip at byte {i} undetected"
            );
        }
        let mut f = vec![0u8; 4096];
        encode_file_header(NodeId(7), 3, &mut f);
        assert_eq!(decode_file_header(&f).unwrap(), (NodeId(7), 3));
        f[20] ^= 1;
        assert_eq!(decode_file_header(&f), Err(FormatError::HeaderChecksum));
    }
}
