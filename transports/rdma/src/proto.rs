//! The messages the rdma transport exchanges with its counterpart on a peer, over the
//! authenticated TCP connection (transport-private control messages: the cluster never sees
//! them; [`ferroplasma_transport::msg::TRANSPORT_FIELD`]). No I/O here: encoding, decoding
//! and the checks every field a peer sends must pass. Byte layout: docs/rdma.md, "Set-up
//! messages".
//!
//! A connection whose both Idents carry `FEATURE_RDMA` runs this exchange before the cluster
//! hears of it:
//!
//! ```text
//! each side   Offer  (GID, MTU, queue pair numbers and PSNs, reads it accepts at once,
//!                     the region table: its arena as memory regions with their rkeys)
//! each side   Ready  once its queue pairs reached RTS   — or Decline with the reason
//! ```
//!
//! After that, grants of the RDMA path are announced (`GrantNotice`, sent before the cluster
//! message that carries the descriptor, so it arrives first), asked about when a read names
//! an unknown one (`GrantQuery` → `GrantNotice` or `GrantGone`), and withdrawn with `Revoke`,
//! which the reader answers with `RevokeAck` once no read of it is in flight.

use ferroplasma_transport::msg::TRANSPORT_PREFIX;
use prost::Message;

/// Most queue pairs per peer a node offers or accepts.
pub const MAX_QPS: usize = 16;
/// Most memory regions in a region table.
pub const MAX_REGIONS: usize = 2048;
/// Longest reason a Decline carries.
pub const MAX_REASON: usize = 512;
/// Largest region a peer may announce (256 TiB).
pub const MAX_REGION_LEN: u64 = 1 << 48;

/// One transport-private message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RdmaMsg {
    /// What it says.
    #[prost(oneof = "Body", tags = "1, 2, 3, 4, 5, 6, 7, 8")]
    pub body: Option<Body>,
}

/// The messages.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Body {
    /// Queue pairs and regions of the sender, for this connection.
    #[prost(message, tag = "1")]
    Offer(Offer),
    /// The sender's queue pairs are connected (RTS).
    #[prost(message, tag = "2")]
    Ready(Ready),
    /// The sender will not use RDMA on this connection.
    #[prost(message, tag = "3")]
    Decline(Decline),
    /// A grant the receiver may read over RDMA.
    #[prost(message, tag = "4")]
    GrantNotice(GrantNotice),
    /// The receiver is asked for the notice of this grant.
    #[prost(message, tag = "5")]
    GrantQuery(GrantRef),
    /// No such live grant to the receiver.
    #[prost(message, tag = "6")]
    GrantGone(GrantRef),
    /// The grant is withdrawn: stop reading it, then acknowledge.
    #[prost(message, tag = "7")]
    Revoke(GrantRef),
    /// No read of the grant is in flight any more.
    #[prost(message, tag = "8")]
    RevokeAck(GrantRef),
}

/// What a node offers for one connection.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Offer {
    /// Its GID (16 bytes).
    #[prost(bytes = "vec", tag = "1")]
    pub gid: Vec<u8>,
    /// Its port's active MTU (`enum ibv_mtu`: 1 = 256 … 5 = 4096 bytes).
    #[prost(uint32, tag = "2")]
    pub mtu: u32,
    /// Its queue pair numbers (24 bits each).
    #[prost(fixed32, repeated, tag = "3")]
    pub qpns: Vec<u32>,
    /// The first packet sequence number of each queue pair (24 bits).
    #[prost(fixed32, repeated, tag = "4")]
    pub psns: Vec<u32>,
    /// How many RDMA READs it serves at once per queue pair (responder resources).
    #[prost(uint32, tag = "5")]
    pub max_rd_atomic: u32,
    /// Its arena as memory regions, in order from offset 0.
    #[prost(message, repeated, tag = "6")]
    pub regions: Vec<RegionEntry>,
    /// The arena's length (the sum of the regions' lengths).
    #[prost(fixed64, tag = "7")]
    pub region_len: u64,
    /// Its port's LID (0 on RoCE).
    #[prost(uint32, tag = "8")]
    pub lid: u32,
    /// The set-up round (1 at connection; each reconnection after a failure takes the next
    /// number, and messages of older rounds are ignored).
    #[prost(uint32, tag = "9")]
    pub round: u32,
    /// Its grants are memory windows: the region table's rkeys give no remote access (the
    /// memory regions have no REMOTE_READ), reads use the rkeys of the grant notices.
    #[prost(bool, tag = "10")]
    pub windows: bool,
}

/// One registered memory region of an arena.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct RegionEntry {
    /// Its virtual address at the owner.
    #[prost(fixed64, tag = "1")]
    pub addr: u64,
    /// Its length.
    #[prost(fixed64, tag = "2")]
    pub len: u64,
    /// Its remote key.
    #[prost(fixed32, tag = "3")]
    pub rkey: u32,
}

/// Queue pairs connected.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Ready {
    /// The set-up round.
    #[prost(uint32, tag = "1")]
    pub round: u32,
}

/// RDMA declined on this connection.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Decline {
    /// Why (for the peer's log and `stat`).
    #[prost(string, tag = "1")]
    pub reason: String,
    /// The set-up round it ends (or declines).
    #[prost(uint32, tag = "2")]
    pub round: u32,
}

/// A grant readable over RDMA.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GrantNotice {
    /// The grant number (as in the descriptor).
    #[prost(fixed64, tag = "1")]
    pub id: u64,
    /// Offset of the range in the grantor's arena.
    #[prost(fixed64, tag = "2")]
    pub offset: u64,
    /// Its length.
    #[prost(fixed64, tag = "3")]
    pub len: u64,
    /// The descriptor's key (0: the region table's rkeys apply).
    #[prost(fixed32, tag = "4")]
    pub key: u32,
    /// From a grantor with memory windows: the rkeys of the grant's windows, one per memory
    /// region the range touches and per queue pair (index = (region − the grant's first
    /// region) × queue pairs + queue pair); empty: read this grant over TCP.
    #[prost(fixed32, repeated, tag = "5")]
    pub keys: Vec<u32>,
}

/// Names a grant.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct GrantRef {
    /// The grant number.
    #[prost(fixed64, tag = "1")]
    pub id: u64,
}

/// Why a transport-private message is refused (the connection is dropped).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// Not a transport-private message, or its length prefix is wrong.
    #[error("bad transport message framing")]
    Framing,
    /// prost could not parse it, or it carries no body.
    #[error("undecodable transport message")]
    Decode,
    /// A field a peer could lie about is out of range.
    #[error("bad {0} in an rdma offer")]
    Offer(&'static str),
    /// A grant notice whose range overflows.
    #[error("grant notice {0} overflows")]
    Grant(u64),
    /// A decline reason too long.
    #[error("decline reason too long")]
    Reason,
}

/// Encodes a message with the transport-private prefix.
pub fn encode(body: Body) -> Vec<u8> {
    let m = RdmaMsg { body: Some(body) };
    let inner = m.encode_to_vec();
    let mut out = Vec::with_capacity(inner.len() + 11);
    out.push(TRANSPORT_PREFIX);
    prost::encoding::encode_varint(inner.len() as u64, &mut out);
    out.extend_from_slice(&inner);
    out
}

/// Decodes and checks a transport-private message from a peer.
pub fn decode(b: &[u8]) -> Result<Body, ProtoError> {
    let rest = b
        .strip_prefix(&[TRANSPORT_PREFIX])
        .ok_or(ProtoError::Framing)?;
    let mut cur = rest;
    let len = prost::encoding::decode_varint(&mut cur).map_err(|_| ProtoError::Framing)?;
    if u64::try_from(cur.len()).ok() != Some(len) {
        return Err(ProtoError::Framing);
    }
    let body = RdmaMsg::decode(cur)
        .map_err(|_| ProtoError::Decode)?
        .body
        .ok_or(ProtoError::Decode)?;
    match &body {
        Body::Offer(o) => check_offer(o)?,
        Body::GrantNotice(g)
            if g.offset.checked_add(g.len).is_none() || g.keys.len() > MAX_QPS * MAX_REGIONS =>
        {
            return Err(ProtoError::Grant(g.id));
        }
        Body::Decline(d) if d.reason.len() > MAX_REASON => return Err(ProtoError::Reason),
        _ => {}
    }
    Ok(body)
}

/// The checks an offer passes before any field is used.
pub fn check_offer(o: &Offer) -> Result<(), ProtoError> {
    if o.gid.len() != 16 {
        return Err(ProtoError::Offer("GID length"));
    }
    if !(1..=5).contains(&o.mtu) {
        return Err(ProtoError::Offer("MTU"));
    }
    if o.qpns.is_empty() || o.qpns.len() > MAX_QPS || o.qpns.len() != o.psns.len() {
        return Err(ProtoError::Offer("queue pair count"));
    }
    if o.qpns.iter().any(|&q| q == 0 || q >= 1 << 24) {
        return Err(ProtoError::Offer("queue pair number"));
    }
    if o.psns.iter().any(|&p| p >= 1 << 24) {
        return Err(ProtoError::Offer("PSN"));
    }
    if !(1..=255).contains(&o.max_rd_atomic) {
        return Err(ProtoError::Offer("outstanding reads"));
    }
    if o.round == 0 {
        return Err(ProtoError::Offer("round"));
    }
    if o.lid > u32::from(u16::MAX) {
        return Err(ProtoError::Offer("LID"));
    }
    if o.regions.is_empty() || o.regions.len() > MAX_REGIONS {
        return Err(ProtoError::Offer("region count"));
    }
    if o.region_len == 0 || o.region_len > MAX_REGION_LEN {
        return Err(ProtoError::Offer("region length"));
    }
    let mut sum = 0u64;
    for r in &o.regions {
        if r.len == 0 || r.addr.checked_add(r.len).is_none() {
            return Err(ProtoError::Offer("region entry"));
        }
        sum = sum
            .checked_add(r.len)
            .ok_or(ProtoError::Offer("region table"))?;
    }
    if sum != o.region_len {
        return Err(ProtoError::Offer("region table"));
    }
    Ok(())
}

/// A peer's arena as its region table describes it: maps arena offsets to (remote address,
/// rkey) and cuts ranges at region boundaries.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteTable {
    /// (start offset in the arena, entry), sorted by offset.
    entries: Vec<(u64, RegionEntry)>,
    len: u64,
}

impl RemoteTable {
    /// From a checked offer.
    pub fn new(o: &Offer) -> Self {
        let mut at = 0u64;
        let entries = o
            .regions
            .iter()
            .map(|r| {
                let e = (at, *r);
                at += r.len;
                e
            })
            .collect();
        Self {
            entries,
            len: o.region_len,
        }
    }

    /// From entries in arena order and their total length.
    pub fn from_entries(list: Vec<RegionEntry>, len: u64) -> Self {
        Self::new(&Offer {
            regions: list,
            region_len: len,
            ..Default::default()
        })
    }

    /// The arena's length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the table is empty (never, for a checked offer).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The piece of `[offset, offset + len)` that starts at `offset` and stays in one region:
    /// (remote address, rkey, length of the piece); `None` when `offset` lies outside.
    pub fn piece(&self, offset: u64, len: u64) -> Option<(u64, u32, u64)> {
        self.piece_in(offset, len).map(|(a, k, n, _)| (a, k, n))
    }

    /// How many regions `[offset, offset + len)` touches (0 when it lies outside).
    pub fn regions_touched(&self, offset: u64, len: u64) -> usize {
        let (Some(first), Some(end)) = (self.piece_in(offset, 1), offset.checked_add(len)) else {
            return 0;
        };
        let last = end
            .checked_sub(1)
            .and_then(|l| self.piece_in(l, 1))
            .map_or(first.3, |p| p.3);
        last.saturating_sub(first.3) + 1
    }

    /// As [`RemoteTable::piece`], with the index of the region it lies in.
    pub fn piece_in(&self, offset: u64, len: u64) -> Option<(u64, u32, u64, usize)> {
        let i = self.entries.partition_point(|(start, _)| *start <= offset);
        let idx = i.checked_sub(1)?;
        let (start, e) = self.entries.get(idx)?;
        let within = offset - start;
        if within >= e.len {
            return None;
        }
        Some((e.addr + within, e.rkey, len.min(e.len - within), idx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer() -> Offer {
        Offer {
            gid: vec![0xfe; 16],
            mtu: 3,
            qpns: vec![17, 18],
            psns: vec![1, 2],
            max_rd_atomic: 16,
            regions: vec![
                RegionEntry {
                    addr: 0x1000_0000,
                    len: 4096,
                    rkey: 7,
                },
                RegionEntry {
                    addr: 0x9000_0000,
                    len: 8192,
                    rkey: 9,
                },
            ],
            region_len: 12288,
            lid: 0,
            round: 1,
            windows: false,
        }
    }

    #[test]
    fn round_trip_and_prefix() {
        let b = encode(Body::Offer(offer()));
        assert!(ferroplasma_transport::msg::is_transport_private(&b));
        assert_eq!(decode(&b), Ok(Body::Offer(offer())));
        let g = encode(Body::GrantNotice(GrantNotice {
            id: 5,
            offset: 10,
            len: 20,
            key: 0,
            keys: vec![7, 8],
        }));
        assert!(matches!(decode(&g), Ok(Body::GrantNotice(n)) if n.id == 5));
        // A cluster envelope never starts with the prefix.
        assert!(!ferroplasma_transport::msg::is_transport_private(
            &ferroplasma_transport::msg::Envelope {
                body: Some(ferroplasma_transport::msg::Body::Heartbeat(
                    Default::default()
                ))
            }
            .encode_to_vec()
        ));
    }

    #[test]
    fn bogus_offers_refused() {
        type Tweak = Box<dyn Fn(&mut Offer)>;
        let cases: Vec<(&str, Tweak)> = vec![
            ("short gid", Box::new(|o| o.gid.truncate(4))),
            ("mtu 0", Box::new(|o| o.mtu = 0)),
            ("mtu 9", Box::new(|o| o.mtu = 9)),
            ("no qps", Box::new(|o| o.qpns.clear())),
            (
                "qpn/psn mismatch",
                Box::new(|o| o.psns.pop().map(drop).unwrap_or(())),
            ),
            ("qpn 0", Box::new(|o| o.qpns[0] = 0)),
            ("qpn 25 bits", Box::new(|o| o.qpns[0] = 1 << 24)),
            ("psn 25 bits", Box::new(|o| o.psns[1] = 1 << 24)),
            ("rd_atomic 0", Box::new(|o| o.max_rd_atomic = 0)),
            (
                "too many qps",
                Box::new(|o| {
                    o.qpns = vec![1; MAX_QPS + 1];
                    o.psns = vec![1; MAX_QPS + 1];
                }),
            ),
            ("no regions", Box::new(|o| o.regions.clear())),
            ("empty region", Box::new(|o| o.regions[0].len = 0)),
            ("sum mismatch", Box::new(|o| o.region_len += 1)),
            (
                "addr overflow",
                Box::new(|o| o.regions[1].addr = u64::MAX - 10),
            ),
            (
                "len overflow",
                Box::new(|o| {
                    o.regions[1].len = u64::MAX;
                    o.region_len = u64::MAX;
                }),
            ),
            ("lid", Box::new(|o| o.lid = 1 << 16)),
            ("round 0", Box::new(|o| o.round = 0)),
        ];
        for (what, f) in cases {
            let mut o = offer();
            f(&mut o);
            assert!(
                decode(&encode(Body::Offer(o))).is_err(),
                "{what} should be refused"
            );
        }
        let long = Decline {
            reason: "x".repeat(MAX_REASON + 1),
            round: 1,
        };
        assert_eq!(
            decode(&encode(Body::Decline(long))),
            Err(ProtoError::Reason)
        );
        let bad = GrantNotice {
            id: 1,
            offset: u64::MAX,
            len: 2,
            key: 0,
            keys: Vec::new(),
        };
        assert_eq!(
            decode(&encode(Body::GrantNotice(bad))),
            Err(ProtoError::Grant(1))
        );
        // Framing: a wrong length prefix, trailing bytes, no body.
        let mut b = encode(Body::Ready(Ready { round: 1 }));
        b.push(0);
        assert_eq!(decode(&b), Err(ProtoError::Framing));
        assert_eq!(decode(&[TRANSPORT_PREFIX, 0]), Err(ProtoError::Decode));
        assert_eq!(decode(&[1, 2, 3]), Err(ProtoError::Framing));
    }

    #[test]
    fn table_cuts_at_region_boundaries() {
        let t = RemoteTable::new(&offer());
        assert_eq!(t.piece(0, 100), Some((0x1000_0000, 7, 100)));
        assert_eq!(t.piece(4000, 500), Some((0x1000_0000 + 4000, 7, 96)));
        assert_eq!(t.piece(4096, 500), Some((0x9000_0000, 9, 500)));
        assert_eq!(
            t.piece(12000, 1000),
            Some((0x9000_0000 + 12000 - 4096, 9, 288))
        );
        assert_eq!(t.piece(12288, 1), None);
        assert_eq!(t.regions_touched(0, 4096), 1);
        assert_eq!(t.regions_touched(4000, 200), 2);
        assert_eq!(t.regions_touched(4096, 8192), 1);
        assert_eq!(t.regions_touched(20000, 1), 0);
        assert_eq!(t.piece(u64::MAX, 1), None);
    }
}
