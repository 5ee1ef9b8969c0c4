//! Object and node identifiers.
//!
//! An [`ObjectId`] is 24 bytes: the owner [`NodeId`] (8 bytes, big endian, so the
//! hex form of an id starts with its owner's hex) followed by 16
//! bytes chosen by whoever names the object. The node that creates an object owns it, and the
//! owner is readable from the id alone so that cluster code can route a lookup without asking
//! anybody.

use std::fmt;
use std::str::FromStr;

/// Identifies one node daemon for the lifetime of its process.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct NodeId(pub u64);

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({:016x})", self.0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Fixed-size object identifier; see the module docs for its layout.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId([u8; ObjectId::LEN]);

impl ObjectId {
    /// Size of an id in bytes, on the wire and in memory.
    pub const LEN: usize = 24;

    /// Builds an id owned by `owner` with a caller-chosen 16-byte suffix.
    pub fn new(owner: NodeId, unique: [u8; 16]) -> Self {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&owner.0.to_be_bytes());
        b[8..].copy_from_slice(&unique);
        Self(b)
    }

    /// Reinterprets 24 raw bytes as an id.
    pub const fn from_bytes(bytes: [u8; Self::LEN]) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; Self::LEN] {
        &self.0
    }

    /// The node that created (owns) this object.
    pub fn owner(&self) -> NodeId {
        let mut o = [0u8; 8];
        o.copy_from_slice(&self.0[..8]);
        NodeId(u64::from_be_bytes(o))
    }

    /// The 16 bytes after the owner.
    pub fn unique(&self) -> [u8; 16] {
        let mut u = [0u8; 16];
        u.copy_from_slice(&self.0[8..]);
        u
    }

    /// Lower-case hex, 48 characters.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(Self::LEN * 2);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        s
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({})", self.to_hex())
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Error parsing an [`ObjectId`] from hex.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an object id is {} hex digits, got {input:?}", ObjectId::LEN * 2)]
pub struct ParseIdError {
    input: String,
}

impl FromStr for ObjectId {
    type Err = ParseIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseIdError {
            input: s.chars().take(64).collect(),
        };
        let bytes = s.as_bytes();
        if bytes.len() != Self::LEN * 2 {
            return Err(err());
        }
        let mut out = [0u8; Self::LEN];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = hex_val(pair[0]).ok_or_else(err)?;
            let lo = hex_val(pair[1]).ok_or_else(err)?;
            out[i] = (hi << 4) | lo;
        }
        Ok(Self(out))
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_owner() {
        let id = ObjectId::new(NodeId(0xdead_beef_0123_4567), [7; 16]);
        assert_eq!(id.owner(), NodeId(0xdead_beef_0123_4567));
        assert_eq!(id.unique(), [7; 16]);
        assert!(id.to_hex().starts_with("deadbeef01234567"));
        let parsed: ObjectId = id.to_hex().parse().unwrap();
        assert_eq!(parsed, id);
        assert!("abc".parse::<ObjectId>().is_err());
        assert!("zz".repeat(24).parse::<ObjectId>().is_err());
    }
}
