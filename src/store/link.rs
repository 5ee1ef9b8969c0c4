//! The store's interface to the cluster side: what the core and the cluster side (stepped on
//! the event loop's thread, `cluster::node`) tell each other. The core never waits for the
//! network: it hands work to the cluster side and gets answers back as messages. Defined
//! here, beside the core, so that `store` depends on nothing of `cluster`.

use super::core::Outgoing;
use super::table::ClientId;
use crate::id::{NodeId, ObjectId};
use crate::protocol::{ClusterView, ErrorReply, Request};

/// The client number the cluster side uses for its requests to the core (pins for serving
/// peers, waits for lookups). Clients are numbered from 1 upwards, so it never collides.
/// Requests made on behalf of a peer also name the peer ([`ToCore::Call`]), and the core
/// bounds the parked requests of each peer separately.
pub const CLUSTER_CLIENT: ClientId = u64::MAX;

/// From the core to the cluster side.
#[derive(Debug)]
pub enum ToCluster {
    /// A local get waits for this remote object: fetch it. `timeout_ms` is how long the
    /// owner may wait for it to be sealed.
    Pull {
        /// The object.
        id: ObjectId,
        /// Owner-side wait.
        timeout_ms: u64,
    },
    /// A local wait needs to know whether this remote object is sealed.
    Probe {
        /// The object.
        id: ObjectId,
        /// Owner-side wait.
        timeout_ms: u64,
    },
    /// Room for a pulled object is reserved at `offset`: fetch into it.
    Allocated {
        /// The object.
        id: ObjectId,
        /// Data offset in the arena.
        offset: u64,
    },
    /// Nobody waits for the pull any more, or the object arrived another way: stop.
    Cancel {
        /// The object.
        id: ObjectId,
    },
    /// The answer to a request the cluster side made as [`CLUSTER_CLIENT`].
    Reply(Outgoing),
    /// A secondary copy is now sealed here (tell the owner).
    CopyAdded(ObjectId),
    /// Secondary copies left this node (tell their owners).
    CopiesLost(Vec<ObjectId>),
    /// Objects owned here were deleted (tell the holders of copies).
    Deleted(Vec<ObjectId>),
    /// Answer to [`ToCore::CheckCopy`].
    CopyChecked {
        /// The node that reported the copy.
        node: u64,
        /// The object.
        id: ObjectId,
        /// The copy is of the object sealed here now.
        current: bool,
    },
}

/// A request the cluster side makes to the core as [`CLUSTER_CLIENT`].
#[derive(Debug, Clone)]
pub enum CoreCall {
    /// Pin and locate (the reply carries the locations).
    Get {
        /// Objects.
        ids: Vec<ObjectId>,
        /// Milliseconds.
        timeout_ms: u64,
    },
    /// Whether sealed.
    Wait {
        /// Objects.
        ids: Vec<ObjectId>,
        /// Milliseconds.
        timeout_ms: u64,
    },
    /// Drop pins.
    Release {
        /// Handles from `Get`.
        handles: Vec<u64>,
    },
    /// Delete local copies (the owner deleted the objects).
    Forget {
        /// Objects.
        ids: Vec<ObjectId>,
    },
}

impl CoreCall {
    /// As a protocol request.
    pub fn request(&self) -> Request<'_> {
        match self {
            CoreCall::Get { ids, timeout_ms } => Request::Get {
                ids: ids.clone(),
                timeout_ms: *timeout_ms,
            },
            CoreCall::Wait { ids, timeout_ms } => Request::Wait {
                ids: ids.clone(),
                num_ready: u32::try_from(ids.len()).unwrap_or(u32::MAX),
                timeout_ms: *timeout_ms,
            },
            CoreCall::Release { handles } => Request::Release {
                handles: handles.clone(),
            },
            CoreCall::Forget { ids } => Request::Delete { ids: ids.clone() },
        }
    }
}

/// From the cluster side to the core.
#[derive(Debug)]
pub enum ToCore {
    /// A request as [`CLUSTER_CLIENT`], answered with [`ToCluster::Reply`] carrying `seq`.
    Call {
        /// Echoed in the reply.
        seq: u32,
        /// The peer node the request is made for (a lookup or pin it asked for), or `None`
        /// for the cluster side's own bookkeeping. A peer's parked requests are capped at
        /// [`MAX_PARKED_PER_PEER`](super::MAX_PARKED_PER_PEER); beyond that it is refused.
        peer: Option<NodeId>,
        /// The request.
        call: CoreCall,
    },
    /// The owner gave the size of a pulled object: reserve room for it.
    PullSized {
        /// The object.
        id: ObjectId,
        /// Data bytes.
        data_size: u64,
        /// Metadata bytes.
        meta_size: u64,
    },
    /// The owner sent a small object whole: store it as a secondary copy.
    PullInline {
        /// The object.
        id: ObjectId,
        /// Data bytes (the rest of `bytes` is metadata).
        data_size: u64,
        /// Data then metadata.
        bytes: Vec<u8>,
    },
    /// Every byte of a pulled object is in place (checked): seal it.
    PullDone {
        /// The object.
        id: ObjectId,
    },
    /// A pull failed: fail the gets waiting for it (and free its room).
    PullFailed {
        /// The object.
        id: ObjectId,
        /// What the waiting gets are told.
        error: ErrorReply,
    },
    /// The cluster side took [`ToCluster::Cancel`] for this pull: whatever it said of the
    /// pull before this is stale (the core ignores pull messages for an id between its
    /// `Cancel` and this answer, so a new pull of the id is not confused with the old).
    Cancelled {
        /// The object.
        id: ObjectId,
    },
    /// A probe's answer.
    Probed {
        /// The object.
        id: ObjectId,
        /// Sealed at its owner.
        sealed: bool,
    },
    /// The last connection to this peer node went: its parked lookups, probes and pins are
    /// forgotten, unanswered (nobody would read the answers), so they take no pins and no
    /// longer count against its cap.
    PeerGone(NodeId),
    /// The membership changed.
    View(ClusterView),
    /// A node reported a copy of an object owned here: is `generation` the sealed one?
    CheckCopy {
        /// The reporting node.
        node: u64,
        /// The object.
        id: ObjectId,
        /// The copy's generation.
        generation: u64,
    },
}
