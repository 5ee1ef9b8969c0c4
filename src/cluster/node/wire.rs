//! Encoding helpers: what fits a control message, capped encoding, short details, ids.

use ferroplasma_transport::msg::{self, Body, Envelope, Status};

use crate::id::ObjectId;

/// Largest object a lookup reply can carry inline in a control message of `cap` bytes
/// ([`Transport::max_control_msg`](ferroplasma_transport::Transport::max_control_msg)): the
/// cap less the reply's envelope, measured on the largest reply a node sends with an empty
/// `inline` field (every number at its longest varint, the owner and
/// [`MAX_HOLDERS`](crate::cluster::directory::MAX_HOLDERS) holders, no detail), plus the `inline`
/// field's key (1 byte) and its length varint, and the growth of the body's own length
/// varint (each at most 10 bytes). tcp (80 KiB): 80 KiB less about 600 bytes; 4 KiB: about
/// 3.5 KiB.
pub fn inline_fit(cap: usize) -> u64 {
    let worst = msg::LookupReply {
        req: u64::MAX,
        status: Status::Busy as i32,
        data_size: u64::MAX,
        meta_size: u64::MAX,
        inlined: true,
        inline: Vec::new(),
        holders: vec![u64::MAX; crate::cluster::directory::MAX_HOLDERS + 1],
        detail: String::new(),
        generation: u64::MAX,
    };
    let envelope = msg::len_of(&Envelope::of(Body::LookupReply(worst)));
    let overhead = envelope + 1 + 2 * MAX_VARINT;
    u64::try_from(cap.saturating_sub(overhead)).unwrap_or(0)
}

/// Longest protobuf varint.
const MAX_VARINT: usize = 10;
/// Messages that go to any node (member list parts, id batches) fit
/// [`MIN_CONTROL_MSG`](ferroplasma_transport::MIN_CONTROL_MSG), which every transport takes,
/// whatever this node's own cap: caps may differ between nodes.
const ANY_NODE_MSG: usize = ferroplasma_transport::MIN_CONTROL_MSG;
/// Object ids per `CopyRemoved` or `Forget` message (26 bytes each with key and length:
/// 2.6 KiB, within [`ANY_NODE_MSG`]).
pub(super) const IDS_PER_MSG: usize = 100;
const _: () = assert!(IDS_PER_MSG * 26 + 64 <= ANY_NODE_MSG);
/// Longest `detail` text sent to a peer.
const MAX_DETAIL: usize = 512;

/// `s` cut to at most [`MAX_DETAIL`] bytes (on a character boundary).
pub(super) fn short(mut s: String) -> String {
    if s.len() > MAX_DETAIL {
        let mut end = MAX_DETAIL;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// The message's bytes, or `None` (logged: a bug, not a peer's doing) when it exceeds the
/// transport's control message cap `cap`.
pub(super) fn encode_capped(body: Body, cap: usize) -> Option<Vec<u8>> {
    let bytes = Envelope::of(body).to_bytes();
    if bytes.len() > cap {
        tracing::error!(
            len = bytes.len(),
            cap,
            "a control message exceeds the cap; not sent"
        );
        return None;
    }
    Some(bytes)
}

pub(super) fn id_from(b: &[u8]) -> Option<ObjectId> {
    let a: [u8; ObjectId::LEN] = b.try_into().ok()?;
    Some(ObjectId::from_bytes(a))
}
