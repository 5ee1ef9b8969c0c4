//! Client errors: one enum per operation, each naming the object or path involved.

use std::path::PathBuf;

use crate::id::{NodeId, ObjectId};
use crate::protocol::ErrorReply;
use crate::ring::SegmentError;

/// Connecting to a node failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The socket could not be reached.
    #[error("cannot connect to the node at {path}: {source} (is `ferroplasma node` running?)")]
    Socket {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The hand-shake failed.
    #[error("hand-shake with the node at {path} failed: {reason}")]
    Handshake {
        /// Socket path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The node speaks another protocol version.
    #[error("the node at {path} speaks protocol {node}, this client {client}: upgrade required")]
    Version {
        /// Socket path.
        path: PathBuf,
        /// Node's version.
        node: u32,
        /// Ours.
        client: u32,
    },
    /// The control segment is unusable.
    #[error("control segment from {path}: {source}")]
    Segment {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: SegmentError,
    },
}

/// Failures any request can have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The node went away.
    #[error("the node closed the connection")]
    Disconnected,
    /// The node sent something this client cannot read.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The node rejected the request as malformed.
    #[error("the node rejected the request: {0}")]
    Invalid(String),
    /// More ids than one request may carry.
    #[error("{count} ids in one request; the limit is {max}")]
    TooManyIds {
        /// Ids given.
        count: usize,
        /// Limit.
        max: usize,
    },
}

/// `create` or `put` failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CreateError {
    /// The id exists already.
    #[error("object {0} already exists")]
    AlreadyExists(ObjectId),
    /// No room after eviction and waiting.
    #[error(
        "object store full: cannot fit object {id} of {requested} bytes \
         ({free} bytes free, largest free block {largest_free} bytes)"
    )]
    ObjectStoreFull {
        /// The id.
        id: ObjectId,
        /// Bytes asked for.
        requested: u64,
        /// Free bytes.
        free: u64,
        /// Largest free block.
        largest_free: u64,
    },
    /// Larger than the arena.
    #[error("object {id} of {requested} bytes can never fit (limit {max} bytes)")]
    TooLarge {
        /// The id.
        id: ObjectId,
        /// Bytes asked for.
        requested: u64,
        /// Limit.
        max: u64,
    },
    /// The id names another node as its owner.
    #[error("object {id} is owned by node {}, not this node {node}", id.owner())]
    ForeignOwner {
        /// The id.
        id: ObjectId,
        /// This node.
        node: NodeId,
    },
    /// Sealing after the write failed (put only).
    #[error(transparent)]
    Seal(#[from] SealError),
    /// Any request failure.
    #[error(transparent)]
    Request(#[from] RequestError),
}

/// `seal` or `abort` failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// No such object.
    #[error("object {0} not found")]
    NotFound(ObjectId),
    /// Already sealed.
    #[error("object {0} is already sealed")]
    AlreadySealed(ObjectId),
    /// Another client created it.
    #[error("object {0} was created by another client")]
    NotCreator(ObjectId),
    /// Any request failure.
    #[error(transparent)]
    Request(#[from] RequestError),
}

/// `get` failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GetError {
    /// Some objects were not sealed before the timeout.
    #[error("timed out waiting for {} object(s): {}", not_ready.len(), show_ids(not_ready))]
    Timeout {
        /// The ids that were not ready.
        not_ready: Vec<ObjectId>,
    },
    /// An object came back from disk damaged; it is lost.
    #[error("object {id} is corrupted on disk: {detail}")]
    ObjectCorrupted {
        /// The id.
        id: ObjectId,
        /// The spill file and what did not match.
        detail: String,
    },
    /// Reading an object back from disk failed; it stays on disk and a later get may work.
    #[error("could not read object {id} back from disk: {detail}")]
    RestoreFailed {
        /// The id.
        id: ObjectId,
        /// The I/O error.
        detail: String,
    },
    /// A remote object has no copy left anywhere in the cluster.
    #[error("object {id} is lost: {detail}")]
    ObjectLost {
        /// The id.
        id: ObjectId,
        /// What was tried.
        detail: String,
    },
    /// The node that owns a remote object is dead or unreachable.
    #[error("the owner {node} of object {id} is dead or unreachable")]
    OwnerDied {
        /// The id.
        id: ObjectId,
        /// The owner.
        node: crate::id::NodeId,
    },
    /// Any request failure.
    #[error(transparent)]
    Request(#[from] RequestError),
}

fn show_ids(ids: &[ObjectId]) -> String {
    let mut s: Vec<String> = ids.iter().take(4).map(ObjectId::to_hex).collect();
    if ids.len() > 4 {
        s.push(format!("and {} more", ids.len() - 4));
    }
    s.join(", ")
}

pub(crate) fn unexpected(e: ErrorReply) -> RequestError {
    match e {
        ErrorReply::Invalid(m) => RequestError::Invalid(m),
        other => RequestError::Protocol(format!("unexpected error reply {other:?}")),
    }
}

impl From<ErrorReply> for CreateError {
    fn from(e: ErrorReply) -> Self {
        match e {
            ErrorReply::AlreadyExists(id) => Self::AlreadyExists(id),
            ErrorReply::StoreFull {
                id,
                requested,
                free,
                largest_free,
            } => Self::ObjectStoreFull {
                id,
                requested,
                free,
                largest_free,
            },
            ErrorReply::TooLarge { id, requested, max } => Self::TooLarge { id, requested, max },
            ErrorReply::ForeignOwner { id, node } => Self::ForeignOwner { id, node },
            other => Self::Request(unexpected(other)),
        }
    }
}

impl From<ErrorReply> for SealError {
    fn from(e: ErrorReply) -> Self {
        match e {
            ErrorReply::NotFound(id) => Self::NotFound(id),
            ErrorReply::AlreadySealed(id) => Self::AlreadySealed(id),
            ErrorReply::NotCreator(id) => Self::NotCreator(id),
            other => Self::Request(unexpected(other)),
        }
    }
}

impl From<ErrorReply> for GetError {
    fn from(e: ErrorReply) -> Self {
        match e {
            ErrorReply::Timeout(not_ready) => Self::Timeout { not_ready },
            ErrorReply::Corrupted { id, detail } => Self::ObjectCorrupted { id, detail },
            ErrorReply::RestoreFailed { id, detail } => Self::RestoreFailed { id, detail },
            ErrorReply::ObjectLost { id, detail } => Self::ObjectLost { id, detail },
            ErrorReply::OwnerDied { id, node } => Self::OwnerDied { id, node },
            other => Self::Request(unexpected(other)),
        }
    }
}
