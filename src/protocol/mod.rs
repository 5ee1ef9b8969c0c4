//! The client↔daemon request/reply protocol carried in ring records. Pure encoding and
//! decoding, no I/O. Byte layouts are in docs/shm-layout.md ("Messages").
//!
//! Every request starts with `op: u8, 0: u8 ×3, seq: u32`; every reply with
//! `op: u8, status: u8, 0: u8 ×2, seq: u32`. `status` 0 is success with an op-specific body,
//! anything else an [`ErrorReply`].

pub mod codec;
pub mod handshake;

pub use codec::{DecodeError, Reader, Writer};

use crate::id::{NodeId, ObjectId};

/// Most ids one request may carry (`get`, `wait`, `delete`).
pub const MAX_IDS: usize = 4096;
/// Most handles one release message may carry.
pub const MAX_RELEASES: usize = 8192;
/// Most entries one list reply carries.
pub const MAX_LIST: usize = 2048;
/// A timeout meaning "wait forever".
pub const NO_TIMEOUT: u64 = u64::MAX;

/// Operation codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Reserve an object.
    Create = 1,
    /// Make an object immutable and visible.
    Seal = 2,
    /// Drop an unsealed object.
    Abort = 3,
    /// Create + copy + seal of a small object in one message.
    Put = 4,
    /// Pin and locate sealed objects.
    Get = 5,
    /// Drop pins (no reply).
    Release = 6,
    /// Is the object sealed here?
    Contains = 7,
    /// Delete objects.
    Delete = 8,
    /// Wait for some objects to be sealed.
    Wait = 9,
    /// Page through the object table.
    List = 10,
    /// Store figures.
    Stats = 11,
    /// Cluster members as this node sees them.
    Nodes = 12,
}

impl TryFrom<u8> for Op {
    type Error = DecodeError;

    fn try_from(v: u8) -> Result<Self, DecodeError> {
        Self::from_u8(v)
    }
}

impl Op {
    fn from_u8(v: u8) -> Result<Self, DecodeError> {
        Ok(match v {
            1 => Self::Create,
            2 => Self::Seal,
            3 => Self::Abort,
            4 => Self::Put,
            5 => Self::Get,
            6 => Self::Release,
            7 => Self::Contains,
            8 => Self::Delete,
            9 => Self::Wait,
            10 => Self::List,
            11 => Self::Stats,
            12 => Self::Nodes,
            code => return Err(DecodeError::UnknownCode { what: "op", code }),
        })
    }
}

/// A decoded request. `Put` borrows its payload from the message buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    /// Reserve `data_size + meta_size` bytes for `id`.
    Create {
        /// The id.
        id: ObjectId,
        /// Data bytes.
        data_size: u64,
        /// Metadata bytes (stored after the data).
        meta_size: u64,
        /// How long to wait for room, in milliseconds.
        timeout_ms: u64,
    },
    /// Seal `id`.
    Seal {
        /// The id.
        id: ObjectId,
    },
    /// Abort the unsealed `id`.
    Abort {
        /// The id.
        id: ObjectId,
    },
    /// Create, fill and seal in one go.
    Put {
        /// The id.
        id: ObjectId,
        /// How many of `payload`'s bytes are data; the rest is metadata.
        data_len: u64,
        /// How long to wait for room, in milliseconds.
        timeout_ms: u64,
        /// Data then metadata.
        payload: &'a [u8],
    },
    /// Pin and locate `ids` once all are sealed.
    Get {
        /// The ids.
        ids: Vec<ObjectId>,
        /// Milliseconds to wait; 0 means do not wait, [`NO_TIMEOUT`] forever.
        timeout_ms: u64,
    },
    /// Drop one pin per handle.
    Release {
        /// Handles from earlier get replies.
        handles: Vec<u64>,
    },
    /// Whether `id` is sealed here.
    Contains {
        /// The id.
        id: ObjectId,
    },
    /// Delete `ids`.
    Delete {
        /// The ids.
        ids: Vec<ObjectId>,
    },
    /// Wait until `num_ready` of `ids` are sealed.
    Wait {
        /// The ids.
        ids: Vec<ObjectId>,
        /// How many must be ready.
        num_ready: u32,
        /// Milliseconds to wait.
        timeout_ms: u64,
    },
    /// Up to `max` entries with ids greater than `after`.
    List {
        /// Resume after this id.
        after: Option<ObjectId>,
        /// Page size.
        max: u32,
    },
    /// Store figures.
    Stats,
    /// Cluster members.
    Nodes,
}

impl Request<'_> {
    /// The operation code.
    pub fn op(&self) -> Op {
        match self {
            Self::Create { .. } => Op::Create,
            Self::Seal { .. } => Op::Seal,
            Self::Abort { .. } => Op::Abort,
            Self::Put { .. } => Op::Put,
            Self::Get { .. } => Op::Get,
            Self::Release { .. } => Op::Release,
            Self::Contains { .. } => Op::Contains,
            Self::Delete { .. } => Op::Delete,
            Self::Wait { .. } => Op::Wait,
            Self::List { .. } => Op::List,
            Self::Stats => Op::Stats,
            Self::Nodes => Op::Nodes,
        }
    }

    /// Encodes into `w` with sequence number `seq`.
    pub fn encode(&self, seq: u32, w: &mut Writer) {
        w.u8(self.op() as u8).u8(0).u8(0).u8(0).u32(seq);
        match self {
            Self::Create {
                id,
                data_size,
                meta_size,
                timeout_ms,
            } => {
                w.id(id).u64(*data_size).u64(*meta_size).u64(*timeout_ms);
            }
            Self::Seal { id } | Self::Abort { id } | Self::Contains { id } => {
                w.id(id);
            }
            Self::Put {
                id,
                data_len,
                timeout_ms,
                payload,
            } => {
                w.id(id).u64(*data_len).u64(*timeout_ms).bytes(payload);
            }
            Self::Get { ids, timeout_ms } => {
                w.u64(*timeout_ms).ids(ids);
            }
            Self::Release { handles } => {
                w.u32(u32::try_from(handles.len()).unwrap_or(u32::MAX));
                for h in handles {
                    w.u64(*h);
                }
            }
            Self::Delete { ids } => {
                w.ids(ids);
            }
            Self::Wait {
                ids,
                num_ready,
                timeout_ms,
            } => {
                w.u64(*timeout_ms).u32(*num_ready).ids(ids);
            }
            Self::List { after, max } => {
                match after {
                    Some(id) => w.u8(1).id(id),
                    None => w.u8(0).bytes(&[0; ObjectId::LEN]),
                };
                w.u32(*max);
            }
            Self::Stats | Self::Nodes => {}
        }
    }

    /// Decodes one request message. Never panics; every count is checked against the limits
    /// and the bytes present before anything is allocated.
    pub fn decode(buf: &[u8]) -> Result<(u32, Request<'_>), DecodeError> {
        let mut r = Reader::new(buf);
        let op = Op::from_u8(r.u8()?)?;
        let _reserved = r.bytes(3)?;
        let seq = r.u32()?;
        let req = match op {
            Op::Create => Request::Create {
                id: r.id()?,
                data_size: r.u64()?,
                meta_size: r.u64()?,
                timeout_ms: r.u64()?,
            },
            Op::Seal => Request::Seal { id: r.id()? },
            Op::Abort => Request::Abort { id: r.id()? },
            Op::Contains => Request::Contains { id: r.id()? },
            Op::Put => {
                let id = r.id()?;
                let data_len = r.u64()?;
                let timeout_ms = r.u64()?;
                let payload = r.rest();
                if data_len > payload.len() as u64 {
                    return Err(DecodeError::Invalid("put data_len exceeds payload"));
                }
                Request::Put {
                    id,
                    data_len,
                    timeout_ms,
                    payload,
                }
            }
            Op::Get => {
                let timeout_ms = r.u64()?;
                Request::Get {
                    ids: r.ids(MAX_IDS)?,
                    timeout_ms,
                }
            }
            Op::Release => {
                let n = r.count("release", MAX_RELEASES, 8)?;
                let handles = (0..n).map(|_| r.u64()).collect::<Result<_, _>>()?;
                Request::Release { handles }
            }
            Op::Delete => Request::Delete {
                ids: r.ids(MAX_IDS)?,
            },
            Op::Wait => {
                let timeout_ms = r.u64()?;
                let num_ready = r.u32()?;
                Request::Wait {
                    ids: r.ids(MAX_IDS)?,
                    num_ready,
                    timeout_ms,
                }
            }
            Op::List => {
                let has = r.u8()?;
                let id = r.id()?;
                let after = match has {
                    0 => None,
                    1 => Some(id),
                    _ => return Err(DecodeError::Invalid("list cursor flag")),
                };
                Request::List {
                    after,
                    max: r.u32()?,
                }
            }
            Op::Stats => Request::Stats,
            Op::Nodes => Request::Nodes,
        };
        r.finish()?;
        Ok((seq, req))
    }
}

/// Where a pinned object lives in the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectLoc {
    /// Pin handle, to be released.
    pub handle: u64,
    /// Offset of the data in the arena.
    pub offset: u64,
    /// Data bytes.
    pub data_size: u64,
    /// Metadata bytes, right after the data.
    pub meta_size: u64,
}

/// Object state in a listing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ObjectState {
    /// Created, being written.
    Created = 0,
    /// Sealed and readable.
    Sealed = 1,
    /// Sealed, on disk only (a get restores it).
    Spilled = 2,
}

/// One row of a listing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListEntry {
    /// The id.
    pub id: ObjectId,
    /// Data bytes.
    pub data_size: u64,
    /// Metadata bytes.
    pub meta_size: u64,
    /// State.
    pub state: ObjectState,
    /// Pins held by all clients.
    pub pins: u32,
}

/// What happened to one id of a delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum DeleteStatus {
    /// Freed now.
    Deleted = 0,
    /// Gone from the table; memory is freed when the last pin is released.
    Deferred = 1,
    /// No such object.
    NotFound = 2,
    /// Still being created: abort it from its creator instead.
    NotSealed = 3,
}

/// The I/O engine a node spills with, as it reports in [`Stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(u8)]
#[non_exhaustive]
pub enum SpillEngineInUse {
    /// Spilling is off.
    #[default]
    Off = 0,
    /// io_uring.
    IoUring = 1,
    /// `pread`/`pwrite` (asked for, or io_uring was not available).
    Pread = 2,
}

impl SpillEngineInUse {
    /// The name `ferroplasma stat` prints: `off`, `io_uring` or `pread`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::IoUring => "io_uring",
            Self::Pread => "pread",
        }
    }

    fn from_code(code: u64) -> Result<Self, DecodeError> {
        match code {
            0 => Ok(Self::Off),
            1 => Ok(Self::IoUring),
            2 => Ok(Self::Pread),
            c => Err(DecodeError::UnknownCode {
                what: "spill engine",
                code: u8::try_from(c).unwrap_or(u8::MAX),
            }),
        }
    }
}

impl std::fmt::Display for SpillEngineInUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Store figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// This node.
    pub node_id: NodeId,
    /// Arena size.
    pub arena_bytes: u64,
    /// Bytes reserved by objects.
    pub used_bytes: u64,
    /// Largest allocation that would succeed now.
    pub largest_free: u64,
    /// Objects in the table (sealed and unsealed).
    pub objects: u64,
    /// Sealed objects.
    pub sealed: u64,
    /// Objects with at least one pin.
    pub pinned_objects: u64,
    /// Pins across all clients.
    pub pins: u64,
    /// Connected clients.
    pub clients: u64,
    /// Whether hugepages back the arena.
    pub hugepages: bool,
    /// Objects evicted since start.
    pub evictions: u64,
    /// Creates waiting for room.
    pub creates_waiting: u64,
    /// Gets and waits parked at the node, waiting for their objects (last on the wire).
    pub gets_waiting: u64,
    /// Deleted objects whose memory waits for pins to drop.
    pub deferred_frees: u64,
    /// Largest object that `put` sends inline.
    pub inline_threshold: u64,
    /// Objects on disk only.
    pub spilled_objects: u64,
    /// Disk bytes they take.
    pub spilled_bytes: u64,
    /// Objects spilled since start.
    pub spills: u64,
    /// Objects restored since start.
    pub restores: u64,
    /// Spills that failed because the disk was full.
    pub spill_disk_full: u64,
    /// Whether spilling is paused (disk full or failing).
    pub spill_paused: bool,
    /// Restores that found a corrupt record.
    pub corrupted: u64,
    /// The engine spill files are written and read with (what runs, not what was asked
    /// for: a node asked for io_uring where it is forbidden spills with pread).
    pub spill_engine: SpillEngineInUse,
}

impl Stats {
    const FIELDS: usize = 23;

    fn to_array(self) -> [u64; Self::FIELDS] {
        [
            self.node_id.0,
            self.arena_bytes,
            self.used_bytes,
            self.largest_free,
            self.objects,
            self.sealed,
            self.pinned_objects,
            self.pins,
            self.clients,
            u64::from(self.hugepages),
            self.evictions,
            self.creates_waiting,
            self.deferred_frees,
            self.inline_threshold,
            self.spilled_objects,
            self.spilled_bytes,
            self.spills,
            self.restores,
            self.spill_disk_full,
            u64::from(self.spill_paused),
            self.corrupted,
            self.spill_engine as u64,
            self.gets_waiting,
        ]
    }

    fn from_array(a: [u64; Self::FIELDS]) -> Result<Self, DecodeError> {
        Ok(Self {
            node_id: NodeId(a[0]),
            arena_bytes: a[1],
            used_bytes: a[2],
            largest_free: a[3],
            objects: a[4],
            sealed: a[5],
            pinned_objects: a[6],
            pins: a[7],
            clients: a[8],
            hugepages: a[9] != 0,
            evictions: a[10],
            creates_waiting: a[11],
            deferred_frees: a[12],
            inline_threshold: a[13],
            spilled_objects: a[14],
            spilled_bytes: a[15],
            spills: a[16],
            restores: a[17],
            spill_disk_full: a[18],
            spill_paused: a[19] != 0,
            corrupted: a[20],
            spill_engine: SpillEngineInUse::from_code(a[21])?,
            gets_waiting: a[22],
        })
    }
}

/// A successful reply body.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Create: where to write.
    Created {
        /// Offset of the data in the arena.
        offset: u64,
    },
    /// Seal, abort, put: done.
    Done,
    /// Get: one location per requested id, in order.
    Objects(Vec<ObjectLoc>),
    /// Contains.
    Contains(bool),
    /// Delete: one status per id, in order.
    Deleted(Vec<DeleteStatus>),
    /// Wait: one flag per id, in order.
    Ready(Vec<bool>),
    /// List page.
    Listed {
        /// Entries in id order.
        entries: Vec<ListEntry>,
        /// Whether more entries follow the last one.
        more: bool,
    },
    /// Stats.
    Stats(Stats),
    /// Cluster members.
    Nodes(ClusterView),
}

/// Most members a nodes reply carries.
pub const MAX_MEMBERS: usize = 1024;

/// A cluster member as a node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    /// Node id.
    pub node_id: NodeId,
    /// Peer address.
    pub addr: String,
    /// Heard from within the dead-after time.
    pub alive: bool,
    /// Keeps the membership list.
    pub head: bool,
    /// The node answering.
    pub this: bool,
    /// How this node reaches it (`rdma`, `tcp`); empty for itself or when not connected.
    pub transport: String,
    /// Why that transport (for `tcp` on an RDMA node: why not RDMA).
    pub transport_reason: String,
}

/// What `Nodes` returns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterView {
    /// The transport between nodes (`tcp`, `mem`), empty for a node without a cluster.
    pub transport: String,
    /// Membership epoch (bumped by the head on every change).
    pub epoch: u64,
    /// Every member, this node included.
    pub members: Vec<MemberInfo>,
    /// Facts about the transport (`rdma_device`, `rdma_registration_ms`, …) as (key, value).
    pub status: Vec<(String, String)>,
}

/// Most transport status pairs a nodes reply carries.
pub const MAX_STATUS: usize = 64;

/// Error codes on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorReply {
    /// The id exists already.
    AlreadyExists(ObjectId),
    /// No such object.
    NotFound(ObjectId),
    /// No room even after eviction and waiting.
    StoreFull {
        /// The id.
        id: ObjectId,
        /// Bytes asked for.
        requested: u64,
        /// Free bytes at the time.
        free: u64,
        /// Largest free block at the time.
        largest_free: u64,
    },
    /// Get timed out; these ids were not sealed.
    Timeout(Vec<ObjectId>),
    /// The object is sealed already.
    AlreadySealed(ObjectId),
    /// Only the creator may seal or abort an unsealed object.
    NotCreator(ObjectId),
    /// The id names another node as owner.
    ForeignOwner {
        /// The id.
        id: ObjectId,
        /// This node.
        node: NodeId,
    },
    /// Larger than the arena (or the inline limit for put).
    TooLarge {
        /// The id.
        id: ObjectId,
        /// Bytes asked for.
        requested: u64,
        /// Limit.
        max: u64,
    },
    /// The request could not be decoded or made no sense.
    Invalid(String),
    /// The object's spill record failed its checks on restore; the object is lost.
    Corrupted {
        /// The id.
        id: ObjectId,
        /// Spill file and what did not match.
        detail: String,
    },
    /// Reading the object back from disk failed; it stays on disk for a later get.
    RestoreFailed {
        /// The id.
        id: ObjectId,
        /// The I/O error.
        detail: String,
    },
    /// Every copy of a remote object is gone (its holders died or dropped it).
    ObjectLost {
        /// The id.
        id: ObjectId,
        /// What was tried.
        detail: String,
    },
    /// The node that owns the object is dead or unreachable.
    OwnerDied {
        /// The id.
        id: ObjectId,
        /// Its owner.
        node: NodeId,
    },
}

const STATUS_OK: u8 = 0;

fn encode_text(msg: &str, w: &mut Writer) {
    let mut end = msg.len().min(1024);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let b = &msg.as_bytes()[..end];
    w.u32(count(b.len())).bytes(b);
}

fn decode_text(r: &mut Reader<'_>) -> Result<String, DecodeError> {
    let n = r.count("message byte", 1024, 1)?;
    Ok(String::from_utf8_lossy(r.bytes(n)?).into_owned())
}

/// A length as a u32 count field (every list the protocol carries is capped far below).
fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl ErrorReply {
    fn code(&self) -> u8 {
        match self {
            Self::AlreadyExists(_) => 1,
            Self::NotFound(_) => 2,
            Self::StoreFull { .. } => 3,
            Self::Timeout(_) => 4,
            Self::AlreadySealed(_) => 5,
            Self::NotCreator(_) => 6,
            Self::ForeignOwner { .. } => 7,
            Self::TooLarge { .. } => 8,
            Self::Invalid(_) => 9,
            Self::Corrupted { .. } => 10,
            Self::RestoreFailed { .. } => 11,
            Self::ObjectLost { .. } => 12,
            Self::OwnerDied { .. } => 13,
        }
    }

    fn encode_body(&self, w: &mut Writer) {
        match self {
            Self::AlreadyExists(id)
            | Self::NotFound(id)
            | Self::AlreadySealed(id)
            | Self::NotCreator(id) => {
                w.id(id);
            }
            Self::StoreFull {
                id,
                requested,
                free,
                largest_free,
            } => {
                w.id(id).u64(*requested).u64(*free).u64(*largest_free);
            }
            Self::Timeout(ids) => {
                w.ids(ids);
            }
            Self::ForeignOwner { id, node } => {
                w.id(id).u64(node.0);
            }
            Self::TooLarge { id, requested, max } => {
                w.id(id).u64(*requested).u64(*max);
            }
            Self::Invalid(msg) => encode_text(msg, w),
            Self::Corrupted { id, detail }
            | Self::RestoreFailed { id, detail }
            | Self::ObjectLost { id, detail } => {
                w.id(id);
                encode_text(detail, w);
            }
            Self::OwnerDied { id, node } => {
                w.id(id).u64(node.0);
            }
        }
    }

    fn decode_body(code: u8, r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(match code {
            1 => Self::AlreadyExists(r.id()?),
            2 => Self::NotFound(r.id()?),
            3 => Self::StoreFull {
                id: r.id()?,
                requested: r.u64()?,
                free: r.u64()?,
                largest_free: r.u64()?,
            },
            4 => Self::Timeout(r.ids(MAX_IDS)?),
            5 => Self::AlreadySealed(r.id()?),
            6 => Self::NotCreator(r.id()?),
            7 => Self::ForeignOwner {
                id: r.id()?,
                node: NodeId(r.u64()?),
            },
            8 => Self::TooLarge {
                id: r.id()?,
                requested: r.u64()?,
                max: r.u64()?,
            },
            9 => Self::Invalid(decode_text(r)?),
            10 => Self::Corrupted {
                id: r.id()?,
                detail: decode_text(r)?,
            },
            11 => Self::RestoreFailed {
                id: r.id()?,
                detail: decode_text(r)?,
            },
            12 => Self::ObjectLost {
                id: r.id()?,
                detail: decode_text(r)?,
            },
            13 => Self::OwnerDied {
                id: r.id()?,
                node: NodeId(r.u64()?),
            },
            code => {
                return Err(DecodeError::UnknownCode {
                    what: "status",
                    code,
                })
            }
        })
    }
}

/// Encodes a reply to request `seq` of kind `op`.
pub fn encode_reply(op: Op, seq: u32, reply: &Result<Reply, ErrorReply>, w: &mut Writer) {
    let status = match reply {
        Ok(_) => STATUS_OK,
        Err(e) => e.code(),
    };
    w.u8(op as u8).u8(status).u8(0).u8(0).u32(seq);
    let body = match reply {
        Ok(b) => b,
        Err(e) => return e.encode_body(w),
    };
    match body {
        Reply::Created { offset } => {
            w.u64(*offset);
        }
        Reply::Done => {}
        Reply::Objects(locs) => {
            w.u32(count(locs.len()));
            for l in locs {
                w.u64(l.handle)
                    .u64(l.offset)
                    .u64(l.data_size)
                    .u64(l.meta_size);
            }
        }
        Reply::Contains(b) => {
            w.u8(u8::from(*b));
        }
        Reply::Deleted(st) => {
            w.u32(count(st.len()));
            for s in st {
                w.u8(*s as u8);
            }
        }
        Reply::Ready(flags) => {
            w.u32(count(flags.len()));
            for f in flags {
                w.u8(u8::from(*f));
            }
        }
        Reply::Listed { entries, more } => {
            w.u8(u8::from(*more)).u32(count(entries.len()));
            for e in entries {
                w.id(&e.id)
                    .u64(e.data_size)
                    .u64(e.meta_size)
                    .u8(e.state as u8)
                    .u32(e.pins);
            }
        }
        Reply::Stats(s) => {
            for v in s.to_array() {
                w.u64(v);
            }
        }
        Reply::Nodes(v) => {
            encode_text(&v.transport, w);
            w.u64(v.epoch).u32(count(v.members.len().min(MAX_MEMBERS)));
            for m in v.members.iter().take(MAX_MEMBERS) {
                let flags = u8::from(m.alive) | u8::from(m.head) << 1 | u8::from(m.this) << 2;
                w.u64(m.node_id.0).u8(flags);
                encode_text(&m.addr, w);
                encode_text(&m.transport, w);
                encode_text(&m.transport_reason, w);
            }
            w.u32(count(v.status.len().min(MAX_STATUS)));
            for (k, val) in v.status.iter().take(MAX_STATUS) {
                encode_text(k, w);
                encode_text(val, w);
            }
        }
    }
}

/// Decodes a reply: its op, sequence number and result.
pub fn decode_reply(buf: &[u8]) -> Result<(Op, u32, Result<Reply, ErrorReply>), DecodeError> {
    let mut r = Reader::new(buf);
    let op = Op::from_u8(r.u8()?)?;
    let status = r.u8()?;
    let _ = r.bytes(2)?;
    let seq = r.u32()?;
    if status != STATUS_OK {
        let e = ErrorReply::decode_body(status, &mut r)?;
        r.finish()?;
        return Ok((op, seq, Err(e)));
    }
    let reply = match op {
        Op::Create => Reply::Created { offset: r.u64()? },
        Op::Seal | Op::Abort | Op::Put | Op::Release => Reply::Done,
        Op::Get => {
            let n = r.count("location", MAX_IDS, 32)?;
            let locs = (0..n)
                .map(|_| {
                    Ok(ObjectLoc {
                        handle: r.u64()?,
                        offset: r.u64()?,
                        data_size: r.u64()?,
                        meta_size: r.u64()?,
                    })
                })
                .collect::<Result<_, DecodeError>>()?;
            Reply::Objects(locs)
        }
        Op::Contains => Reply::Contains(r.u8()? != 0),
        Op::Delete => {
            let n = r.count("status", MAX_IDS, 1)?;
            let st = (0..n)
                .map(|_| {
                    Ok(match r.u8()? {
                        0 => DeleteStatus::Deleted,
                        1 => DeleteStatus::Deferred,
                        2 => DeleteStatus::NotFound,
                        3 => DeleteStatus::NotSealed,
                        code => {
                            return Err(DecodeError::UnknownCode {
                                what: "delete status",
                                code,
                            })
                        }
                    })
                })
                .collect::<Result<_, DecodeError>>()?;
            Reply::Deleted(st)
        }
        Op::Wait => {
            let n = r.count("flag", MAX_IDS, 1)?;
            Reply::Ready(r.bytes(n)?.iter().map(|&b| b != 0).collect())
        }
        Op::List => {
            let more = r.u8()? != 0;
            let n = r.count("entry", MAX_LIST, ObjectId::LEN + 21)?;
            let entries = (0..n)
                .map(|_| {
                    Ok(ListEntry {
                        id: r.id()?,
                        data_size: r.u64()?,
                        meta_size: r.u64()?,
                        state: match r.u8()? {
                            0 => ObjectState::Created,
                            1 => ObjectState::Sealed,
                            2 => ObjectState::Spilled,
                            code => {
                                return Err(DecodeError::UnknownCode {
                                    what: "state",
                                    code,
                                })
                            }
                        },
                        pins: r.u32()?,
                    })
                })
                .collect::<Result<_, DecodeError>>()?;
            Reply::Listed { entries, more }
        }
        Op::Stats => {
            let mut a = [0u64; Stats::FIELDS];
            for v in &mut a {
                *v = r.u64()?;
            }
            Reply::Stats(Stats::from_array(a)?)
        }
        Op::Nodes => {
            let transport = decode_text(&mut r)?;
            let epoch = r.u64()?;
            let n = r.count("member", MAX_MEMBERS, 21)?;
            let members = (0..n)
                .map(|_| {
                    let node_id = NodeId(r.u64()?);
                    let flags = r.u8()?;
                    if flags & !7 != 0 {
                        return Err(DecodeError::Invalid("member flags"));
                    }
                    Ok(MemberInfo {
                        node_id,
                        alive: flags & 1 != 0,
                        head: flags & 2 != 0,
                        this: flags & 4 != 0,
                        addr: decode_text(&mut r)?,
                        transport: decode_text(&mut r)?,
                        transport_reason: decode_text(&mut r)?,
                    })
                })
                .collect::<Result<_, DecodeError>>()?;
            let n = r.count("status pair", MAX_STATUS, 8)?;
            let status = (0..n)
                .map(|_| Ok((decode_text(&mut r)?, decode_text(&mut r)?)))
                .collect::<Result<_, DecodeError>>()?;
            Reply::Nodes(ClusterView {
                transport,
                epoch,
                members,
                status,
            })
        }
    };
    r.finish()?;
    Ok((op, seq, Ok(reply)))
}

#[cfg(test)]
mod tests;
