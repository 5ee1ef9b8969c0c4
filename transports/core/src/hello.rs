//! The hand-shake of a stream connection, before any frame. Both sides prove they hold the
//! cluster token without sending it (HMAC-SHA256 challenge–response), and only then say who
//! they are. An unauthenticated peer learns the protocol version and whether a token is set;
//! an initiator's proof, sent to whoever answers, lets its receiver guess the token offline,
//! which is why nodes require tokens of at least 16 random bytes. A peer whose Ident carries
//! our own node id is refused (a connection to ourselves, e.g. relayed by a man in the middle).
//!
//! ```text
//! initiator → acceptor   Hello   (48 bytes)
//! acceptor  → initiator  Hello   (48 bytes)
//! initiator → acceptor   Proof   (32 bytes)  HMAC(token, "FPAUTH1" ‖ 'I' ‖ hello_i ‖ hello_a)
//! acceptor checks it, closes on mismatch
//! acceptor  → initiator  Proof   (32 bytes)  HMAC(token, "FPAUTH1" ‖ 'A' ‖ hello_i ‖ hello_a)
//! initiator checks it, closes on mismatch
//! both                   Ident   (24 + addr bytes)
//! both                   Finished (16 bytes)  tag under the sender's session key
//! each checks the other's Finished, closes on mismatch
//! ```
//!
//! Both sides then derive the connection's session keys from the token, both hellos and both
//! Idents ([`crate::session`]); the Finished exchange confirms that they agree, so an Ident
//! changed on the path ends the hand-shake, and every frame after it carries a tag.
//!
//! Hello: `magic "FPLWIRE1" (8) | version u16 | flags u16 (bit 0: a token is set) |
//! 0 u32 | nonce (32)`. Ident: `magic "FPIDENT1" (8) | node_id u64 | addr_len u16 | 0 u16 |
//! features u32 | addr (addr_len ≤ 256, UTF-8)`. Integers little endian. Features: bit 0
//! ([`FEATURE_RDMA`]) the node offers RDMA on this connection; other bits must be 0.
//!
//! The nonces are fresh random bytes per connection, so a recorded proof is useless on
//! another connection. Without a token the proof is an HMAC under the empty key: it still
//! checks that both sides speak the same protocol, and nodes refuse to listen beyond
//! loopback that way unless told `--insecure`.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::session::Session;

/// Hello magic.
pub const MAGIC: [u8; 8] = *b"FPLWIRE1";
/// Ident magic.
pub const IDENT_MAGIC: [u8; 8] = *b"FPIDENT1";
/// Wire protocol version (2: session keys, a tag on every frame, keyed chunk MACs; 3: a
/// read request names the grant it reads under; 4: the Ident carries feature bits).
pub const VERSION: u16 = 4;
/// Ident feature bit: this node offers RDMA to the peer (its transport sets up queue pairs
/// after the hand-shake; docs/rdma.md).
pub const FEATURE_RDMA: u32 = 1;
/// Every feature bit this version knows.
pub const KNOWN_FEATURES: u32 = FEATURE_RDMA;
/// Hello length.
pub const HELLO_LEN: usize = 48;
/// Proof length.
pub const PROOF_LEN: usize = 32;
/// Fixed part of an Ident.
pub const IDENT_FIXED: usize = 24;
/// Finished length.
pub const FINISHED_LEN: usize = crate::session::TAG_LEN;
/// Longest address in an Ident.
pub const MAX_ADDR: usize = 256;
const FLAG_TOKEN: u16 = 1;
const DOMAIN: &[u8] = b"FPAUTH1";

/// Which end of the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The side that connected.
    Initiator,
    /// The side that accepted.
    Acceptor,
}

impl Role {
    pub(crate) fn byte(self) -> u8 {
        match self {
            Role::Initiator => b'I',
            Role::Acceptor => b'A',
        }
    }

    /// The other end.
    pub fn peer(self) -> Role {
        match self {
            Role::Initiator => Role::Acceptor,
            Role::Acceptor => Role::Initiator,
        }
    }
}

/// Why a hand-shake failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// Not a ferroplasma peer.
    #[error("bad magic: not a ferroplasma node")]
    Magic,
    /// Another protocol version.
    #[error("peer speaks wire protocol {0}, this node {VERSION}")]
    Version(u16),
    /// One side has a token and the other has none.
    #[error("token mismatch: this node {} a cluster token, the peer {}", if *.ours { "has" } else { "has no" }, if *.ours { "has none" } else { "has one" })]
    TokenPresence {
        /// Whether this node has a token.
        ours: bool,
    },
    /// The proof does not match: another token.
    #[error("authentication failed: the peer does not hold this cluster's token")]
    BadProof,
    /// The Finished message does not match: the session keys differ, so something on the
    /// path changed the hand-shake (an Ident).
    #[error("hand-shake altered on the path: the session keys do not match")]
    BadFinished,
    /// A malformed Ident.
    #[error("malformed identity: {0}")]
    Ident(&'static str),
    /// The peer's Ident carries this node's own id: the connection reaches this node itself
    /// (a man in the middle relaying our hand-shake to our own listener, or a join address
    /// that points back here).
    #[error("the peer claims this node's own id {node_id:#x}: refusing a connection to itself")]
    SelfConnection {
        /// This node's id.
        node_id: u64,
    },
}

/// One side's hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Whether the sender has a token.
    pub token: bool,
    /// Fresh random bytes.
    pub nonce: [u8; 32],
}

impl Hello {
    /// Encodes.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&VERSION.to_le_bytes());
        let flags = if self.token { FLAG_TOKEN } else { 0 };
        b[10..12].copy_from_slice(&flags.to_le_bytes());
        b[16..48].copy_from_slice(&self.nonce);
        b
    }

    /// Decodes a peer's hello and checks it against ours.
    pub fn decode(b: &[u8; HELLO_LEN], ours: bool) -> Result<Self, HelloError> {
        if b[..8] != MAGIC {
            return Err(HelloError::Magic);
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != VERSION {
            return Err(HelloError::Version(version));
        }
        let flags = u16::from_le_bytes([b[10], b[11]]);
        if flags & !FLAG_TOKEN != 0 || b[12..16] != [0; 4] {
            return Err(HelloError::Magic);
        }
        let token = flags & FLAG_TOKEN != 0;
        if token != ours {
            return Err(HelloError::TokenPresence { ours });
        }
        let mut nonce = [0u8; 32];
        nonce.copy_from_slice(&b[16..48]);
        Ok(Self { token, nonce })
    }
}

fn mac(
    token: &[u8],
    role: Role,
    hello_i: &[u8; HELLO_LEN],
    hello_a: &[u8; HELLO_LEN],
) -> Hmac<Sha256> {
    // HMAC takes keys of any length, the empty one included.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(token).unwrap_or_else(|_| {
        <Hmac<Sha256> as Mac>::new_from_slice(&[]).expect("HMAC accepts an empty key")
    });
    m.update(DOMAIN);
    m.update(&[role.byte()]);
    m.update(hello_i);
    m.update(hello_a);
    m
}

/// The proof `role` sends.
pub fn proof(
    token: &[u8],
    role: Role,
    hello_i: &[u8; HELLO_LEN],
    hello_a: &[u8; HELLO_LEN],
) -> [u8; PROOF_LEN] {
    mac(token, role, hello_i, hello_a)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks the proof the peer in `role` sent, in constant time.
pub fn verify(
    token: &[u8],
    role: Role,
    hello_i: &[u8; HELLO_LEN],
    hello_a: &[u8; HELLO_LEN],
    got: &[u8; PROOF_LEN],
) -> Result<(), HelloError> {
    mac(token, role, hello_i, hello_a)
        .verify_slice(got)
        .map_err(|_| HelloError::BadProof)
}

/// Encodes an identity without feature bits.
pub fn encode_ident(node_id: u64, addr: &str) -> Vec<u8> {
    encode_ident_with(node_id, 0, addr)
}

/// Encodes an identity with feature bits ([`FEATURE_RDMA`]).
pub fn encode_ident_with(node_id: u64, features: u32, addr: &str) -> Vec<u8> {
    let addr = &addr.as_bytes()[..addr.len().min(MAX_ADDR)];
    let mut b = Vec::with_capacity(IDENT_FIXED + addr.len());
    b.extend_from_slice(&IDENT_MAGIC);
    b.extend_from_slice(&node_id.to_le_bytes());
    b.extend_from_slice(&u16::try_from(addr.len()).unwrap_or(0).to_le_bytes());
    b.extend_from_slice(&[0; 2]);
    b.extend_from_slice(&features.to_le_bytes());
    b.extend_from_slice(addr);
    b
}

/// Reads the fixed part of an Ident: returns the node id and how many address bytes follow
/// (the feature bits: [`ident_features`]).
pub fn decode_ident_fixed(b: &[u8; IDENT_FIXED]) -> Result<(u64, usize), HelloError> {
    if b[..8] != IDENT_MAGIC {
        return Err(HelloError::Ident("magic"));
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&b[8..16]);
    let len = usize::from(u16::from_le_bytes([b[16], b[17]]));
    if len > MAX_ADDR || b[18..20] != [0; 2] {
        return Err(HelloError::Ident("address length or reserved bytes"));
    }
    if ident_features(b) & !KNOWN_FEATURES != 0 {
        return Err(HelloError::Ident("unknown feature bits"));
    }
    Ok((u64::from_le_bytes(id), len))
}

/// The feature bits of an Ident's fixed part (checked by [`decode_ident_fixed`]).
pub fn ident_features(b: &[u8; IDENT_FIXED]) -> u32 {
    u32::from_le_bytes([b[20], b[21], b[22], b[23]])
}

/// Checks the address part of an Ident.
pub fn decode_ident_addr(b: &[u8]) -> Result<String, HelloError> {
    String::from_utf8(b.to_vec()).map_err(|_| HelloError::Ident("address is not UTF-8"))
}

/// The hand-shake as a state machine over byte counts, for transports that read into fixed
/// buffers: what to send at each step and how many bytes to expect next.
#[derive(Debug)]
pub struct Handshake {
    role: Role,
    token: Vec<u8>,
    ours: [u8; HELLO_LEN],
    theirs: Option<[u8; HELLO_LEN]>,
    node_id: u64,
    features: u32,
    addr: String,
}

impl Handshake {
    /// Starts a hand-shake with a fresh nonce.
    pub fn new(role: Role, token: &[u8], nonce: [u8; 32], node_id: u64, addr: &str) -> Self {
        let ours = Hello {
            token: !token.is_empty(),
            nonce,
        }
        .encode();
        Self {
            role,
            token: token.to_vec(),
            ours,
            theirs: None,
            node_id,
            features: 0,
            addr: addr.to_string(),
        }
    }

    /// Sets the feature bits our Ident carries ([`FEATURE_RDMA`]).
    pub fn with_features(mut self, features: u32) -> Self {
        self.features = features & KNOWN_FEATURES;
        self
    }

    /// Our hello.
    pub fn hello(&self) -> [u8; HELLO_LEN] {
        self.ours
    }

    fn pair(&self) -> Option<([u8; HELLO_LEN], [u8; HELLO_LEN])> {
        let t = self.theirs?;
        Some(match self.role {
            Role::Initiator => (self.ours, t),
            Role::Acceptor => (t, self.ours),
        })
    }

    /// Takes the peer's hello.
    pub fn their_hello(&mut self, b: &[u8; HELLO_LEN]) -> Result<(), HelloError> {
        Hello::decode(b, !self.token.is_empty())?;
        self.theirs = Some(*b);
        Ok(())
    }

    /// Our proof (after their hello).
    pub fn proof(&self) -> [u8; PROOF_LEN] {
        let (i, a) = self.pair().unwrap_or(([0; HELLO_LEN], [0; HELLO_LEN]));
        proof(&self.token, self.role, &i, &a)
    }

    /// Checks the peer's proof (after their hello).
    pub fn their_proof(&self, got: &[u8; PROOF_LEN]) -> Result<(), HelloError> {
        let (i, a) = self.pair().ok_or(HelloError::BadProof)?;
        verify(&self.token, self.role.peer(), &i, &a, got)
    }

    /// Our identity bytes (sent once authenticated).
    pub fn ident(&self) -> Vec<u8> {
        encode_ident_with(self.node_id, self.features, &self.addr)
    }

    /// The connection's session keys, from the peer's whole Ident (after both hellos).
    /// Send `session.sealer.finished()` and check theirs with `session.opener.finished`.
    /// Refuses an Ident with this node's own id ([`HelloError::SelfConnection`]).
    pub fn session(&self, their_ident: &[u8]) -> Result<Session, HelloError> {
        let (i, a) = self.pair().ok_or(HelloError::BadProof)?;
        let fixed: &[u8; IDENT_FIXED] = their_ident
            .get(..IDENT_FIXED)
            .and_then(|b| b.try_into().ok())
            .ok_or(HelloError::Ident("short"))?;
        if decode_ident_fixed(fixed)?.0 == self.node_id {
            return Err(HelloError::SelfConnection {
                node_id: self.node_id,
            });
        }
        let ours = self.ident();
        let (ii, ia) = match self.role {
            Role::Initiator => (ours.as_slice(), their_ident),
            Role::Acceptor => (their_ident, ours.as_slice()),
        };
        Ok(Session::derive(&self.token, self.role, &i, &a, ii, ia))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(tok_i: &[u8], tok_a: &[u8]) -> Result<(), HelloError> {
        let i = Handshake::new(Role::Initiator, tok_i, [1; 32], 1, "127.0.0.1:1");
        let mut a = Handshake::new(Role::Acceptor, tok_a, [2; 32], 2, "127.0.0.1:2");
        let mut i = i;
        a.their_hello(&i.hello())?;
        i.their_hello(&a.hello())?;
        a.their_proof(&i.proof())?;
        i.their_proof(&a.proof())?;
        let mut si = i.session(&a.ident())?;
        let mut sa = a.session(&i.ident())?;
        sa.opener
            .finished(&si.sealer.finished())
            .map_err(|_| HelloError::BadFinished)?;
        si.opener
            .finished(&sa.sealer.finished())
            .map_err(|_| HelloError::BadFinished)?;
        Ok(())
    }

    #[test]
    fn altered_ident_fails_finished() {
        let mut i = Handshake::new(Role::Initiator, b"t", [1; 32], 1, "127.0.0.1:1");
        let mut a = Handshake::new(Role::Acceptor, b"t", [2; 32], 2, "127.0.0.1:2");
        a.their_hello(&i.hello()).unwrap();
        i.their_hello(&a.hello()).unwrap();
        a.their_proof(&i.proof()).unwrap();
        i.their_proof(&a.proof()).unwrap();
        // The acceptor sees the initiator claim node 3.
        let forged = encode_ident(3, "127.0.0.1:1");
        let mut si = i.session(&a.ident()).unwrap();
        let mut sa = a.session(&forged).unwrap();
        assert!(sa.opener.finished(&si.sealer.finished()).is_err());
        assert!(si.opener.finished(&sa.sealer.finished()).is_err());
    }

    /// A relayed hand-shake to our own listener passes every proof; the Ident gives it away.
    #[test]
    fn connection_to_itself_is_refused() {
        let mut i = Handshake::new(Role::Initiator, b"t", [1; 32], 5, "127.0.0.1:1");
        let mut a = Handshake::new(Role::Acceptor, b"t", [2; 32], 5, "127.0.0.1:1");
        i.their_hello(&a.hello()).unwrap();
        a.their_hello(&i.hello()).unwrap();
        a.their_proof(&i.proof()).unwrap();
        i.their_proof(&a.proof()).unwrap();
        let want = Err(HelloError::SelfConnection { node_id: 5 });
        assert_eq!(i.session(&a.ident()).map(|_| ()), want);
        assert_eq!(a.session(&i.ident()).map(|_| ()), want);
        assert_eq!(
            i.session(b"short").map(|_| ()),
            Err(HelloError::Ident("short"))
        );
    }

    #[test]
    fn old_version_is_refused() {
        let mut h = Hello {
            token: true,
            nonce: [0; 32],
        }
        .encode();
        h[8..10].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(Hello::decode(&h, true), Err(HelloError::Version(1)));
    }

    #[test]
    fn same_token_passes_other_fails() {
        assert_eq!(run(b"secret", b"secret"), Ok(()));
        assert_eq!(run(b"", b""), Ok(()));
        assert_eq!(run(b"secret", b"Secret"), Err(HelloError::BadProof));
        assert_eq!(
            run(b"secret", b""),
            Err(HelloError::TokenPresence { ours: false })
        );
    }

    #[test]
    fn proof_is_bound_to_role_and_nonces() {
        let hi = Hello {
            token: true,
            nonce: [1; 32],
        }
        .encode();
        let ha = Hello {
            token: true,
            nonce: [2; 32],
        }
        .encode();
        let p = proof(b"k", Role::Initiator, &hi, &ha);
        assert!(verify(b"k", Role::Initiator, &hi, &ha, &p).is_ok());
        assert!(verify(b"k", Role::Acceptor, &hi, &ha, &p).is_err());
        let hx = Hello {
            token: true,
            nonce: [3; 32],
        }
        .encode();
        assert!(verify(b"k", Role::Initiator, &hi, &hx, &p).is_err());
    }

    #[test]
    fn ident_round_trip_and_bad_input() {
        let b = encode_ident(42, "10.0.0.1:7000");
        let mut f = [0u8; IDENT_FIXED];
        f.copy_from_slice(&b[..IDENT_FIXED]);
        let (id, n) = decode_ident_fixed(&f).unwrap();
        assert_eq!((id, n), (42, 13));
        assert_eq!(
            decode_ident_addr(&b[IDENT_FIXED..]).unwrap(),
            "10.0.0.1:7000"
        );
        assert_eq!(ident_features(&f), 0);
        let with = encode_ident_with(42, FEATURE_RDMA, "x");
        let mut g = [0u8; IDENT_FIXED];
        g.copy_from_slice(&with[..IDENT_FIXED]);
        assert_eq!(decode_ident_fixed(&g).unwrap(), (42, 1));
        assert_eq!(ident_features(&g), FEATURE_RDMA);
        g[23] = 0x80;
        assert!(decode_ident_fixed(&g).is_err(), "unknown feature bits");
        f[16] = 0xff;
        f[17] = 0xff;
        assert!(decode_ident_fixed(&f).is_err());
        let mut h = Hello {
            token: false,
            nonce: [0; 32],
        }
        .encode();
        h[8] = 9;
        assert_eq!(Hello::decode(&h, false), Err(HelloError::Version(9)));
    }
}
