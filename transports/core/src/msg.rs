//! Control messages between nodes, encoded with prost (protobuf) inside `Msg` frames. Every
//! field a peer sends is checked by the receiver (ids must be 24 bytes, sizes must fit the
//! arena, …); prost only guarantees the message parses.

use prost::Message;

/// The `Envelope` field number kept for messages a transport exchanges with its counterpart
/// on the peer (the rdma transport's queue-pair set-up and grant notices): the cluster never
/// sends it, and a transport that uses it takes such messages out before the cluster sees
/// them. A transport-private message is [`TRANSPORT_PREFIX`], a varint length, and the
/// transport's own encoding.
pub const TRANSPORT_FIELD: u32 = 15;
/// First byte of every transport-private message: field [`TRANSPORT_FIELD`], length-delimited.
pub const TRANSPORT_PREFIX: u8 = (15 << 3) | 2;

/// Whether a control message is transport-private ([`TRANSPORT_FIELD`]).
pub fn is_transport_private(body: &[u8]) -> bool {
    body.first() == Some(&TRANSPORT_PREFIX)
}

/// One control message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Envelope {
    /// What it says.
    #[prost(oneof = "Body", tags = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11")]
    pub body: Option<Body>,
}

/// The messages.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Body {
    /// A node asks the head to join.
    #[prost(message, tag = "1")]
    Join(Join),
    /// The head's membership list, sent on every change and with heartbeats.
    #[prost(message, tag = "2")]
    Members(Members),
    /// Liveness, every heartbeat interval, both ways between the head and each node.
    #[prost(message, tag = "3")]
    Heartbeat(Heartbeat),
    /// Where is this object? (to its owner)
    #[prost(message, tag = "4")]
    Lookup(Lookup),
    /// The owner's answer.
    #[prost(message, tag = "5")]
    LookupReply(LookupReply),
    /// Pin this object and grant me a read of it (to a node holding a copy).
    #[prost(message, tag = "6")]
    Pin(Pin),
    /// The holder's answer.
    #[prost(message, tag = "7")]
    PinReply(PinReply),
    /// Done reading: drop the pin and the grant.
    #[prost(message, tag = "8")]
    Unpin(Unpin),
    /// I now hold copies of these objects (to their owner).
    #[prost(message, tag = "9")]
    CopyAdded(Ids),
    /// I no longer hold copies of these objects (to their owner).
    #[prost(message, tag = "10")]
    CopyRemoved(Ids),
    /// The owner deleted these objects: drop your copies.
    #[prost(message, tag = "11")]
    Forget(Ids),
}

/// Join request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Join {
    /// The joining node.
    #[prost(fixed64, tag = "1")]
    pub node_id: u64,
    /// Where it listens.
    #[prost(string, tag = "2")]
    pub addr: String,
}

/// State of a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum MemberState {
    /// Heard from recently.
    Alive = 0,
    /// Silent for longer than the dead-after time, or gone.
    Dead = 1,
}

/// One member.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Member {
    /// Node id.
    #[prost(fixed64, tag = "1")]
    pub node_id: u64,
    /// Listen address.
    #[prost(string, tag = "2")]
    pub addr: String,
    /// Its state.
    #[prost(enumeration = "MemberState", tag = "3")]
    pub state: i32,
    /// Whether it is the head.
    #[prost(bool, tag = "4")]
    pub head: bool,
}

/// The membership list.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Members {
    /// Bumped on every change.
    #[prost(uint64, tag = "1")]
    pub epoch: u64,
    /// Everyone, the head included (or, in a list sent in parts, this part's share).
    #[prost(message, repeated, tag = "2")]
    pub members: Vec<Member>,
    /// Which part of the list this is, from 0, when it is sent in parts (a long list does not
    /// fit one control message of [`crate::MIN_CONTROL_MSG`] bytes, the cap every transport takes).
    #[prost(uint32, tag = "3")]
    pub part: u32,
    /// How many parts the list is sent in; 0 or 1: this message is the whole list.
    #[prost(uint32, tag = "4")]
    pub parts: u32,
}

/// Liveness.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Heartbeat {
    /// Sender.
    #[prost(fixed64, tag = "1")]
    pub node_id: u64,
    /// The membership epoch the sender knows.
    #[prost(uint64, tag = "2")]
    pub epoch: u64,
}

/// Location lookup at the owner.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Lookup {
    /// Request number, echoed.
    #[prost(uint64, tag = "1")]
    pub req: u64,
    /// Object id (24 bytes).
    #[prost(bytes = "vec", tag = "2")]
    pub id: Vec<u8>,
    /// How long the owner may wait for the object to be sealed.
    #[prost(uint64, tag = "3")]
    pub timeout_ms: u64,
    /// Only whether it is sealed (for `wait`): no data, no pin.
    #[prost(bool, tag = "4")]
    pub probe: bool,
    /// Largest object the asker takes inline in the reply.
    #[prost(uint64, tag = "5")]
    pub inline_max: u64,
}

/// Outcome of a lookup or pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum Status {
    /// Found and sealed.
    Found = 0,
    /// The owner does not have it (never created, or deleted).
    NotFound = 1,
    /// Not sealed within the timeout.
    Timeout = 2,
    /// The owner has it but cannot serve it (restore from disk failed, …); see `detail`.
    Failed = 3,
    /// The owner holds as many waiting requests from the asking node as it takes (or as many
    /// bytes of waiting requests as it takes from everybody): nothing is wrong with the
    /// object; ask again later. A node that does not know this value reads it as `Failed`.
    Busy = 4,
}

/// The owner's answer to a lookup.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LookupReply {
    /// Echo of the request number.
    #[prost(uint64, tag = "1")]
    pub req: u64,
    /// Outcome.
    #[prost(enumeration = "Status", tag = "2")]
    pub status: i32,
    /// Data bytes.
    #[prost(uint64, tag = "3")]
    pub data_size: u64,
    /// Metadata bytes.
    #[prost(uint64, tag = "4")]
    pub meta_size: u64,
    /// Whether `inline` holds the object (data then metadata).
    #[prost(bool, tag = "5")]
    pub inlined: bool,
    /// The object, when small enough.
    #[prost(bytes = "vec", tag = "6")]
    pub inline: Vec<u8>,
    /// Nodes holding a sealed copy, the owner first when it has one.
    #[prost(fixed64, repeated, tag = "7")]
    pub holders: Vec<u64>,
    /// Why, for `Failed`.
    #[prost(string, tag = "8")]
    pub detail: String,
    /// Which incarnation of the id this is (the owner's table handle: unique for the life
    /// of the owner's store, so a deleted and re-created id gets a new one).
    #[prost(uint64, tag = "9")]
    pub generation: u64,
}

/// Pin request to a holder.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Pin {
    /// Request number, echoed.
    #[prost(uint64, tag = "1")]
    pub req: u64,
    /// Object id (24 bytes).
    #[prost(bytes = "vec", tag = "2")]
    pub id: Vec<u8>,
    /// The generation the owner named: a holder with another one refuses.
    #[prost(uint64, tag = "3")]
    pub generation: u64,
}

/// A holder's answer to a pin.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PinReply {
    /// Echo.
    #[prost(uint64, tag = "1")]
    pub req: u64,
    /// Outcome.
    #[prost(enumeration = "Status", tag = "2")]
    pub status: i32,
    /// Where the object starts in the holder's region (data, then metadata).
    #[prost(uint64, tag = "3")]
    pub offset: u64,
    /// Data bytes.
    #[prost(uint64, tag = "4")]
    pub data_size: u64,
    /// Metadata bytes.
    #[prost(uint64, tag = "5")]
    pub meta_size: u64,
    /// Names the pin in `Unpin`.
    #[prost(uint64, tag = "6")]
    pub lease: u64,
    /// Why, for `Failed`.
    #[prost(string, tag = "7")]
    pub detail: String,
    /// `Found`: the grant of the object's range to the asker, as its transport describes it
    /// ([`crate::GrantDescriptor::encode`], [`crate::DESCRIPTOR_LEN`] bytes); the asker's
    /// reads name it.
    #[prost(bytes = "vec", tag = "8")]
    pub grant: Vec<u8>,
}

/// Drop a pin.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Unpin {
    /// The lease from `PinReply`.
    #[prost(uint64, tag = "1")]
    pub lease: u64,
}

/// A list of object ids.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ids {
    /// 24 bytes each.
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub ids: Vec<Vec<u8>>,
    /// `CopyAdded` only: the generation of each copy, in the order of `ids`.
    #[prost(uint64, repeated, tag = "2")]
    pub generations: Vec<u64>,
}

/// Encoded length of a message (to size control messages against
/// [`crate::Transport::max_control_msg`] without depending on prost).
pub fn len_of<M: Message>(m: &M) -> usize {
    m.encoded_len()
}

/// Encoded length of `Envelope::of(Body::LookupReply(r))`, without building it (a reply can
/// carry up to the control-message cap of inline object bytes).
pub fn lookup_reply_len(r: &LookupReply) -> usize {
    // The envelope's only field is the `Body` oneof; a lookup reply is its tag 5.
    prost::encoding::message::encoded_len(5, r)
}

impl Envelope {
    /// Wraps a body.
    pub fn of(body: Body) -> Self {
        Self { body: Some(body) }
    }

    /// Encodes to bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    /// Decodes bytes from a peer.
    pub fn from_bytes(b: &[u8]) -> Result<Self, prost::DecodeError> {
        Self::decode(b)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn lookup_reply_len_is_the_envelopes() {
        for n in [0usize, 1, 127, 128, 300, 70_000] {
            let r = super::LookupReply {
                req: 7,
                inline: vec![3; n],
                inlined: n > 0,
                ..Default::default()
            };
            let env = super::Envelope::of(super::Body::LookupReply(r.clone()));
            assert_eq!(
                super::lookup_reply_len(&r),
                super::len_of(&env),
                "{n} bytes inline"
            );
        }
    }

    use super::*;

    #[test]
    fn round_trip() {
        let e = Envelope::of(Body::LookupReply(LookupReply {
            req: 9,
            status: Status::Found as i32,
            data_size: 5,
            meta_size: 1,
            inlined: true,
            inline: b"hello!".to_vec(),
            holders: vec![1, 2],
            detail: String::new(),
            generation: 7,
        }));
        assert_eq!(Envelope::from_bytes(&e.to_bytes()).unwrap(), e);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut x = 12345u64;
        for n in 0..20_000usize {
            let len = n % 97;
            let b: Vec<u8> = (0..len)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (x >> 56) as u8
                })
                .collect();
            let _ = Envelope::from_bytes(&b);
        }
    }
}
