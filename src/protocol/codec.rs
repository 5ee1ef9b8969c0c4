//! Bounds-checked little-endian reader and writer for ring messages.

use crate::id::ObjectId;

/// Why a message could not be decoded. The daemon answers a request that fails to decode
/// with an `Invalid` error reply; it never panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Ran out of bytes.
    #[error("message truncated: needed {needed} more bytes at offset {at}")]
    Truncated {
        /// Offset of the read.
        at: usize,
        /// Bytes it needed.
        needed: usize,
    },
    /// Unknown operation or reply code.
    #[error("unknown {what} code {code}")]
    UnknownCode {
        /// Which field.
        what: &'static str,
        /// The code.
        code: u8,
    },
    /// A count larger than allowed.
    #[error("{what} count {count} exceeds the limit of {max}")]
    TooMany {
        /// Which field.
        what: &'static str,
        /// Count read.
        count: u64,
        /// Limit.
        max: u64,
    },
    /// Bytes left over after the message.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    /// A field has a value that makes no sense.
    #[error("invalid field {0}")]
    Invalid(&'static str),
}

/// Reads fields from a byte slice, never past its end.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    /// Starts at the beginning of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, at: 0 }
    }

    /// Takes `n` raw bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(DecodeError::Truncated {
                at: self.at,
                needed: n,
            })?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_le_bytes)
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        self.array().map(u64::from_le_bytes)
    }

    /// An object id.
    pub fn id(&mut self) -> Result<ObjectId, DecodeError> {
        self.array().map(ObjectId::from_bytes)
    }

    /// A u32 count, checked against `max` and against the bytes left (`each` bytes per item)
    /// before anything is allocated for it.
    pub fn count(
        &mut self,
        what: &'static str,
        max: usize,
        each: usize,
    ) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(DecodeError::TooMany {
                what,
                count: n as u64,
                max: max as u64,
            });
        }
        let need = n.saturating_mul(each);
        if need > self.remaining() {
            return Err(DecodeError::Truncated {
                at: self.at,
                needed: need,
            });
        }
        Ok(n)
    }

    /// A counted list of ids.
    pub fn ids(&mut self, max: usize) -> Result<Vec<ObjectId>, DecodeError> {
        let n = self.count("id", max, ObjectId::LEN)?;
        (0..n).map(|_| self.id()).collect()
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.at
    }

    /// The rest of the buffer.
    pub fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.at..];
        self.at = self.buf.len();
        s
    }

    /// Fails if anything is left.
    pub fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

/// Appends fields to a byte vector.
#[derive(Debug, Default)]
pub struct Writer {
    /// The encoded bytes.
    pub buf: Vec<u8>,
}

impl Writer {
    /// Starts from an empty, reused buffer.
    pub fn reuse(mut buf: Vec<u8>) -> Self {
        buf.clear();
        Self { buf }
    }

    /// One byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    /// A little-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// A little-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// An object id.
    pub fn id(&mut self, id: &ObjectId) -> &mut Self {
        self.buf.extend_from_slice(id.as_bytes());
        self
    }

    /// A counted list of ids.
    pub fn ids(&mut self, ids: &[ObjectId]) -> &mut Self {
        self.u32(u32::try_from(ids.len()).unwrap_or(u32::MAX));
        for id in ids {
            self.id(id);
        }
        self
    }

    /// Raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }
}
