//! Per-connection state: what is being received, what waits to be sent, and how many ring
//! ops still refer to the connection.

use std::collections::{HashSet, VecDeque};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};

use ferroplasma_transport::frame::Header;
use ferroplasma_transport::session::{Opener, Sealer, Session};
use ferroplasma_transport::{GrantId, Identity};

use crate::uring::Buf;

/// What the next received bytes are.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Rx {
    /// A frame header (56 bytes, into a small heap buffer).
    Header,
    /// A control message body and its body tag (into a `Vec`), of the frame numbered `n`
    /// (header tag already checked); the body tag is checked once it is in.
    Msg {
        /// Its frame number.
        n: u64,
    },
    /// A refusal reason and its body tag (into a `Vec`), like `Msg`.
    Fail {
        /// The refused read.
        token: u64,
        /// Its frame number.
        n: u64,
    },
    /// A data chunk (header tag already checked), straight into the region at the read's
    /// destination.
    Data {
        /// Its header.
        hdr: Header,
        /// Where in the region it lands.
        dst: u64,
        /// Its frame number (bound into a keyed chunk MAC).
        n: u64,
    },
}

/// Who ended a connection: what its reads in flight fail with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cause {
    /// The peer or the network ([`ferroplasma_transport::ReadError::PeerGone`]).
    Gone,
    /// This node ([`ferroplasma_transport::ReadError::Aborted`]).
    Local,
    /// The peer broke the protocol
    /// ([`ferroplasma_transport::ReadError::ProtocolViolation`]).
    Violation,
}

/// A frame waiting to be sent.
#[derive(Debug)]
pub(crate) enum TxItem {
    /// Encoded header and body.
    Frame(Vec<u8>),
    /// A read to serve from the region, cut into chunks when they reach the socket. Holds a
    /// reference on its grant while queued.
    Serve {
        /// The reader's token.
        token: u64,
        /// Start of the range in the region.
        off: u64,
        /// Its length.
        len: u64,
        /// Bytes already cut into chunks.
        done: u64,
        /// The grant that allows it.
        grant: GrantId,
        /// Chunks carry a keyed MAC (the reader asked, or this node is set so).
        keyed: bool,
    },
}

/// The region part of the chunk being sent; holds a reference on its grant.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Body {
    /// The grant.
    pub grant: GrantId,
    /// Start in the region.
    pub off: u64,
    /// Length.
    pub len: u64,
    /// Bytes the socket took.
    pub sent: u64,
}

/// One TCP connection after its hand-shake.
#[derive(Debug)]
pub(crate) struct Conn {
    /// The socket (closed when the `Conn` is dropped, after its last op completed).
    pub stream: TcpStream,
    /// Its fd, for ring ops.
    pub fd: RawFd,
    /// Who it is.
    pub identity: Identity,
    /// Not closing.
    pub open: bool,
    /// Why it closed.
    pub reason: String,
    /// Who closed it, for the reads that fail with it.
    pub cause: Cause,
    /// Whether its closing was reported (reads failed, grants revoked, `Disconnected`).
    pub reported: bool,
    /// Ring ops (including zero-copy notifications) still referring to it.
    pub ops: u32,
    /// What is being received.
    pub rx: Rx,
    /// A receive is in flight.
    pub rx_busy: bool,
    /// Frames waiting to be sent: control frames in order, ahead of data chunks; reads
    /// served in order.
    pub txq: VecDeque<TxItem>,
    /// Header bytes of the frame being sent, when no op holds them.
    pub tx_head: Option<Buf>,
    /// The region part of the frame being sent.
    pub tx_body: Option<Body>,
    /// A send is in flight (one at a time keeps frames whole and in order).
    pub tx_busy: bool,
    /// Grants to this peer.
    pub grants: HashSet<GrantId>,
    /// Tags what this side sends, in wire order.
    pub sealer: Sealer,
    /// Checks the peer's frames, in wire order.
    pub opener: Opener,
}

impl Conn {
    /// A fresh connection.
    pub(crate) fn new(stream: TcpStream, identity: Identity, session: Session) -> Self {
        let fd = stream.as_raw_fd();
        Self {
            stream,
            fd,
            identity,
            open: true,
            reason: String::new(),
            cause: Cause::Gone,
            reported: false,
            ops: 0,
            rx: Rx::Header,
            rx_busy: false,
            txq: VecDeque::new(),
            tx_head: None,
            tx_body: None,
            tx_busy: false,
            grants: HashSet::new(),
            sealer: session.sealer,
            opener: session.opener,
        }
    }
}
