//! The interface between ferroplasma's cluster logic and the transports that move bytes
//! between nodes, with the parts of the wire protocol that need no I/O:
//!
//! - [`Transport`]: connect to peers, exchange control messages, and pull byte ranges from a
//!   peer's registered region straight into this node's registered region (one-sided reads,
//!   as RDMA does them; TCP emulates them with a request and data frames).
//! - [`RegionHandle`] and grants: a transport is built over one registered region (the arena).
//!   A peer may read only ranges this node granted to it.
//! - [`frame`]: the framing of a stream transport, [`hello`]: the authenticated hand-shake,
//!   [`session`]: the session keys it derives and the tags every frame carries after it,
//!   [`msg`]: the control messages (prost).
//! - [`conformance`]: one test suite every transport must pass.
//!
//! Byte layouts are in docs/wire-protocol.md.

#![deny(unsafe_code)]

// The suite writes test patterns through `RegionAccess::write` and starts reads and grants
// through `Transport::read`/`grant`, `unsafe fn`s (memory a transport may be using); the only
// other unsafe code here is the declaration of those two trait methods.
#[allow(unsafe_code)]
pub mod conformance;
pub mod frame;
pub mod grant;
pub mod hello;
pub mod msg;
pub mod session;

use std::sync::Arc;
use std::time::Duration;

pub use grant::{DescriptorError, GrantDescriptor, DESCRIPTOR_LEN};

/// The smallest control message cap a transport may have ([`Transport::max_control_msg`]), in
/// bytes: every transport sends and accepts control messages of this size, so a message that
/// must reach any node (member lists, id batches) is sized to fit it. Small enough that a
/// receiver can pre-post buffers for a window of them (RDMA receives).
pub const MIN_CONTROL_MSG: usize = 4096;

/// A connection to a peer, as numbered by the local transport: a handle, not who the peer
/// is. Who it is (its node id, [`Identity::node_id`]) arrives with [`Event::Connected`]; the
/// two are different types so that a connection number can never be used as a node id or the
/// other way round. Several connections may lead to the same node, and a node that
/// reconnects gets a new `PeerId`.
///
/// ```compile_fail,E0308
/// let node_id: u64 = 7;
/// let peer: ferroplasma_transport::PeerId = node_id;
/// ```
///
/// ```compile_fail,E0308
/// fn node_of(p: ferroplasma_transport::PeerId) -> u64 { p }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(u64);

impl PeerId {
    /// The connection numbered `n` by a transport. Only transports make these (each numbers
    /// its own connections); the cluster logic receives them in events and hands them back.
    pub const fn from_raw(n: u64) -> Self {
        Self(n)
    }

    /// The transport's number for the connection (for logs and a transport's own tables).
    pub const fn raw(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "conn#{}", self.0)
    }
}

/// The region a transport reads into and serves reads from (the node's arena). A handle
/// only: the transport holds the mapping, the cluster logic holds offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionHandle {
    /// Length in bytes.
    pub len: u64,
}

impl RegionHandle {
    /// Whether `[offset, offset + len)` lies inside the region.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.len)
    }

    /// [`TransportError::OutOfRegion`] unless `[offset, offset + len)` lies inside.
    pub fn check(&self, offset: u64, len: u64) -> Result<(), TransportError> {
        if self.contains(offset, len) {
            Ok(())
        } else {
            Err(TransportError::OutOfRegion {
                offset,
                len,
                region: self.len,
            })
        }
    }
}

/// Permission for one peer to read one range of the local region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GrantId(pub u64);

/// Who is at the other end of a connection, as it said after authenticating.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Its node id, as the cluster numbers nodes (not a [`PeerId`]: the cluster converts
    /// this field into its own node type in exactly one place, where it handles
    /// [`Event::Connected`]).
    pub node_id: u64,
    /// The address it listens on.
    pub addr: String,
    /// Feature bits it offers on this connection ([`hello::FEATURE_RDMA`]); for this node's
    /// own identity, what its transport offers.
    pub features: u32,
}

impl Identity {
    /// An identity without feature bits.
    pub fn new(node_id: u64, addr: impl Into<String>) -> Self {
        Self {
            node_id,
            addr: addr.into(),
            features: 0,
        }
    }
}

/// A one-sided read: copy `len` bytes at `offset` within the range the peer granted us (named
/// by the descriptor its `grant` returned, which reached us in a control message) to
/// `local_offset` in the local region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadOp {
    /// Names the read in its [`Event::ReadDone`].
    pub token: u64,
    /// From whom.
    pub peer: PeerId,
    /// The grant, as the peer described it. The reader's transport does not trust or check
    /// it beyond arithmetic: the peer refuses a read that does not lie inside a live grant it
    /// made to this connection with this number.
    pub grant: GrantDescriptor,
    /// Where within the granted range.
    pub offset: u64,
    /// Where in the local region.
    pub local_offset: u64,
    /// How many bytes.
    pub len: u64,
}

/// Why a read failed, in terms any transport can report (a verbs transport maps its
/// completion statuses onto these, tcp its connection's fate). Every variant names the
/// connection the read was made on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The connection to the peer failed or the peer closed it before the read completed
    /// (the peer died, the network failed).
    #[error("peer {peer} went away: {reason}")]
    PeerGone {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// This node gave up on the connection ([`Transport::disconnect`]) before the read
    /// completed.
    #[error("the connection to peer {peer} was closed by this node")]
    Aborted {
        /// The peer.
        peer: PeerId,
    },
    /// The peer refused this read (the descriptor names no live grant of it to us, or the
    /// range lies outside that grant); the connection stays up.
    #[error("peer {peer} refused the read: {reason}")]
    Refused {
        /// The peer.
        peer: PeerId,
        /// Its words.
        reason: String,
    },
    /// The peer broke the protocol on this connection (a malformed or unauthenticated frame,
    /// data for a read it was not asked for, more than it was asked for): the connection is
    /// dropped and every read on it fails so.
    #[error("peer {peer} broke the protocol: {reason}")]
    ProtocolViolation {
        /// The peer.
        peer: PeerId,
        /// What it did.
        reason: String,
    },
    /// A chunk of this read failed its integrity check (the connection is dropped too).
    #[error("chunk at {offset} from peer {peer} failed its checksum")]
    Corrupt {
        /// The peer.
        peer: PeerId,
        /// Offset of the chunk within the read.
        offset: u64,
    },
    /// The transport's own deadline for the read passed (a transport with one: rdma's
    /// retry counters); the connection is dropped.
    #[error("the read from peer {peer} timed out")]
    TimedOut {
        /// The peer.
        peer: PeerId,
    },
}

impl ReadError {
    /// The connection the read was made on.
    pub fn peer(&self) -> PeerId {
        match self {
            Self::PeerGone { peer, .. }
            | Self::Aborted { peer }
            | Self::Refused { peer, .. }
            | Self::ProtocolViolation { peer, .. }
            | Self::Corrupt { peer, .. }
            | Self::TimedOut { peer } => *peer,
        }
    }
}

/// Why a connection could not be made, in terms any transport can report. Every variant
/// names the address dialled (no identity is known yet).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// Nothing answered there, or the network failed before the hand-shake completed.
    #[error("cannot reach {addr}: {reason}")]
    Unreachable {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The peer answered and refused us, or we refused it: another cluster token (or none),
    /// another protocol version, a connection to this node itself, or it hung up during
    /// the hand-shake.
    #[error("{addr} refused the connection: {reason}")]
    Refused {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// What answered is not a ferroplasma node, or the hand-shake was altered on the path.
    #[error("{addr} broke the hand-shake: {reason}")]
    ProtocolViolation {
        /// The address.
        addr: String,
        /// What happened.
        reason: String,
    },
    /// The hand-shake did not finish within [`TransportConfig::handshake_timeout`].
    #[error("the hand-shake with {addr} timed out")]
    TimedOut {
        /// The address.
        addr: String,
    },
    /// This node gave up ([`Transport::disconnect`]) before the hand-shake finished.
    #[error("the connection to {addr} was abandoned by this node")]
    Aborted {
        /// The address.
        addr: String,
    },
}

impl ConnectError {
    /// The address dialled.
    pub fn addr(&self) -> &str {
        match self {
            Self::Unreachable { addr, .. }
            | Self::Refused { addr, .. }
            | Self::ProtocolViolation { addr, .. }
            | Self::TimedOut { addr }
            | Self::Aborted { addr } => addr,
        }
    }

    /// How a failed hand-shake step reads: refusals (token, version, self-connection) or
    /// violations (not our protocol, altered on the path).
    pub fn from_hello(addr: &str, e: &hello::HelloError) -> Self {
        use hello::HelloError as H;
        let (addr, reason) = (addr.to_string(), e.to_string());
        match e {
            H::Version(_) | H::TokenPresence { .. } | H::BadProof | H::SelfConnection { .. } => {
                Self::Refused { addr, reason }
            }
            H::Magic | H::BadFinished | H::Ident(_) => Self::ProtocolViolation { addr, reason },
        }
    }
}

/// Errors of transport calls.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// No such connection (never made, or gone).
    #[error("no connection {0}")]
    NoPeer(PeerId),
    /// A range outside the local region.
    #[error("range {offset}+{len} is outside the registered region of {region} bytes")]
    OutOfRegion {
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
        /// Region length.
        region: u64,
    },
    /// A control message larger than the transport's [`Transport::max_control_msg`].
    #[error("message of {0} bytes is too large")]
    TooLarge(usize),
    /// The token is already used by a read in flight.
    #[error("read token {0} is already in flight")]
    DuplicateToken(u64),
    /// An operating-system error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// What a transport reports from [`Transport::poll`].
#[derive(Debug)]
pub enum Event {
    /// A connection finished its hand-shake (ours, or a peer's to us when `inbound`).
    Connected {
        /// The connection.
        peer: PeerId,
        /// Who it is.
        identity: Identity,
        /// Whether the peer connected to us.
        inbound: bool,
    },
    /// A connection we asked for could not be made or authenticated.
    ConnectFailed {
        /// The connection number [`Transport::connect`] returned.
        peer: PeerId,
        /// What happened (it names the address).
        error: ConnectError,
    },
    /// A control message.
    Message {
        /// From whom.
        peer: PeerId,
        /// Its bytes.
        body: Vec<u8>,
    },
    /// A read finished: on success every byte is in the local region. Success or failure, no
    /// byte of the read lands any more once this is reported: the destination may be reused
    /// at once.
    ReadDone {
        /// The read's token.
        token: u64,
        /// The result.
        result: Result<(), ReadError>,
    },
    /// A grant was revoked (by [`Transport::revoke`] or because its peer went away) and no
    /// send from its range is in flight any more: the range may be reused.
    Revoked {
        /// The grant.
        grant: GrantId,
    },
    /// A connection ended. Every read in flight on it was reported failed first, exactly
    /// once ([`ReadError::Aborted`] when this node closed it, else [`ReadError::PeerGone`],
    /// [`ReadError::ProtocolViolation`], …), and none is reported after this; its grants are
    /// revoked (each reported by [`Event::Revoked`]).
    Disconnected {
        /// The connection.
        peer: PeerId,
        /// Why.
        reason: String,
    },
}

/// Wakes a thread blocked in [`Transport::poll`] from any thread.
#[derive(Clone)]
pub struct Waker(Arc<dyn Fn() + Send + Sync>);

impl Waker {
    /// A waker that calls `f`.
    pub fn new(f: impl Fn() + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// Wakes the poller.
    pub fn wake(&self) {
        (self.0)();
    }
}

impl std::fmt::Debug for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Waker")
    }
}

/// Settings every transport takes. `token`, `identity` and `handshake_timeout` every
/// transport honours; the data settings (`chunk`, `checksums`, `keyed_checksums`) are
/// requests that each transport may clamp or ignore as its medium needs, and
/// [`Transport::data_settings`] says what it applies:
///
/// | transport | `chunk` | checksums |
/// |---|---|---|
/// | `tcp` | clamped to `1..=`[`frame::MAX_CHUNK`] | honoured (xxh3 or keyed MAC per chunk) |
/// | `mem` | ignored: a read is one copy | ignored: nothing crosses a wire |
/// | `rdma` (planned) | the NIC segments; ignored | the link's ICRC; keyed not offered |
///
/// The cluster passes them through from its flags and assumes nothing about them.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// The cluster token (empty: no token; peers must have none either).
    pub token: Vec<u8>,
    /// This node's identity, sent to peers after authentication.
    pub identity: Identity,
    /// Largest data frame asked for (a stream transport sends a read as chunks of at most
    /// this size).
    pub chunk: u32,
    /// Whether data chunks carry an xxh3 checksum (the receiver verifies any chunk that has
    /// one). Detects accidents, not attackers.
    pub checksums: bool,
    /// Whether data chunks carry a keyed MAC under the session key instead (BLAKE3, bound to
    /// the frame number, read and offset): reads this node makes ask for it and refuse chunks
    /// without it, and reads it serves send it. Takes precedence over `checksums`.
    pub keyed_checksums: bool,
    /// How long a hand-shake may take.
    pub handshake_timeout: Duration,
    /// A cap on control messages smaller than the transport's own, for transports that can
    /// take one (`mem`, to simulate a transport with pre-posted receive buffers); raised to
    /// at least [`MIN_CONTROL_MSG`]. `None`: the transport's own. `tcp` ignores it (its cap is
    /// its frame limit). What applies: [`Transport::max_control_msg`].
    pub max_control_msg: Option<usize>,
}

impl TransportConfig {
    /// Defaults: 4 MiB chunks with checksums, 5 s hand-shakes.
    pub fn new(identity: Identity, token: Vec<u8>) -> Self {
        Self {
            token,
            identity,
            chunk: 4 << 20,
            checksums: true,
            keyed_checksums: false,
            handshake_timeout: Duration::from_secs(5),
            max_control_msg: None,
        }
    }
}

/// The data settings a transport applies, after clamping or ignoring what its
/// [`TransportConfig`] asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataSettings {
    /// The largest piece a read travels in, when the transport cuts reads itself; `None`
    /// when it does not (one copy, or the NIC segments).
    pub chunk: Option<u32>,
    /// What this transport checks on data in flight ([`ChecksumMode::Off`] where nothing
    /// crosses a wire or the medium checks it below the transport).
    pub checksums: ChecksumMode,
}

/// What protects data chunks (`--checksums`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ChecksumMode {
    /// Nothing: the frame tags still cover chunk headers, not bodies.
    Off,
    /// xxh3-64 per chunk: detects corruption, not an attacker.
    #[default]
    On,
    /// A keyed MAC per chunk under the session key: detects tampering too.
    Keyed,
}

impl ChecksumMode {
    /// The flag value (`on`, `off`, `keyed`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::On => "on",
            Self::Keyed => "keyed",
        }
    }
}

impl TransportConfig {
    /// Sets [`TransportConfig::checksums`] and [`TransportConfig::keyed_checksums`] from a mode.
    pub fn set_checksum_mode(&mut self, mode: ChecksumMode) {
        self.checksums = mode == ChecksumMode::On;
        self.keyed_checksums = mode == ChecksumMode::Keyed;
    }

    /// The mode the two switches amount to.
    pub fn checksum_mode(&self) -> ChecksumMode {
        if self.keyed_checksums {
            ChecksumMode::Keyed
        } else if self.checksums {
            ChecksumMode::On
        } else {
            ChecksumMode::Off
        }
    }
}

/// Moves control messages and object bytes between nodes.
///
/// A transport is single-threaded: one thread calls every method and [`Transport::poll`]s
/// for events; other threads may only use its [`Waker`]. Every call returns without
/// blocking; outcomes arrive as [`Event`]s.
pub trait Transport: Send {
    /// A short name (`tcp`, `mem`, …).
    fn kind(&self) -> &'static str;
    /// The address peers connect to.
    fn local_addr(&self) -> String;
    /// The registered local region.
    fn region(&self) -> RegionHandle;
    /// The data settings in force (see [`TransportConfig`] for what each transport does
    /// with what it was asked).
    fn data_settings(&self) -> DataSettings;
    /// Starts connecting to `addr`; returns the connection number that its
    /// [`Event::Connected`] or [`Event::ConnectFailed`] will carry.
    fn connect(&mut self, addr: &str) -> PeerId;
    /// The largest control message this transport sends and accepts, in bytes (at least
    /// [`MIN_CONTROL_MSG`]). [`Transport::send`] refuses a larger one
    /// ([`TransportError::TooLarge`]); a larger one received from a peer is a protocol
    /// violation and the connection is dropped. Peers may have different caps (a mixed
    /// cluster): a message meant for any node fits [`MIN_CONTROL_MSG`], a larger one only what
    /// the receiver said it takes (the cluster's lookups carry that as `inline_max`). `tcp`:
    /// its frame limit, 80 KiB; `mem`: the same unless configured smaller; RDMA will return
    /// its pre-posted receive size, a few KiB.
    fn max_control_msg(&self) -> usize;
    /// Queues a control message to `peer` (at most [`Transport::max_control_msg`] bytes).
    /// Messages to one peer arrive in order.
    fn send(&mut self, peer: PeerId, body: Vec<u8>) -> Result<(), TransportError>;
    /// Starts a one-sided read. The peer must have granted the range to us, else the read
    /// fails with [`ReadError::Refused`].
    ///
    /// Every transport keeps this rule: after the read's [`Event::ReadDone`], success or
    /// error (a refusal, a lost peer, a local [`Transport::disconnect`]), no byte of the read
    /// lands in the region any more, so a transport that fails a read while bytes may still
    /// be on their way (a receive in the kernel, a copy by the serving side) first makes sure
    /// they cannot land. Tested by [`conformance::no_bytes_after_read_done`] and each
    /// transport's own interleavings.
    ///
    /// Unsafe because the transport writes the destination from another thread (an
    /// in-process copy) or lets the kernel write it, with no reference the compiler could
    /// check: only the caller knows that nothing else in the process uses the range.
    ///
    /// ```compile_fail,E0133
    /// fn pull(t: &mut dyn ferroplasma_transport::Transport, op: ferroplasma_transport::ReadOp) {
    ///     let _ = t.read(op);
    /// }
    /// ```
    ///
    /// # Safety
    /// The destination range `[op.local_offset, op.local_offset + op.len)` of the local
    /// region belongs to the transport from this call until the read's `ReadDone` (if this
    /// call returns an error, until it returns; if the transport is dropped before it
    /// reports the read, until the drop returns): nothing else in this process reads or
    /// writes it meanwhile — no thread, no reference held over it, no other transport — and
    /// it overlaps no other in-flight read's destination and no granted range (of any
    /// transport over the same memory). Writers outside the process (clients mapping the
    /// memory, the kernel) are outside Rust's model: they can change the bytes that land,
    /// never where they land.
    #[allow(unsafe_code)]
    unsafe fn read(&mut self, op: ReadOp) -> Result<(), TransportError>;
    /// Lets `peer` read `[offset, offset + len)` of the local region until revoked. Returns
    /// the descriptor the peer names the grant by in its reads ([`ReadOp::grant`]; send it
    /// with [`GrantDescriptor::encode`]). A read is served only if the descriptor's grant
    /// number is a live grant of this transport to that same connection and the read lies
    /// inside that grant's range: a forged, stale or other peer's descriptor is refused
    /// ([`ReadError::Refused`] at the reader).
    ///
    /// Unsafe because the transport reads the range from another thread (an in-process
    /// copy into the peer's region) while the grant lasts.
    ///
    /// ```compile_fail,E0133
    /// fn share(t: &mut dyn ferroplasma_transport::Transport, peer: ferroplasma_transport::PeerId) {
    ///     let _ = t.grant(peer, 0, 8);
    /// }
    /// ```
    ///
    /// # Safety
    /// Nothing in this process writes `[offset, offset + len)` from this call until the
    /// grant's [`Event::Revoked`] (or, if this call returns an error, until it returns): no
    /// thread, no `&mut` over it, and it is no in-flight read's destination (of any transport
    /// over the same memory). Reading it meanwhile is fine.
    #[allow(unsafe_code)]
    unsafe fn grant(
        &mut self,
        peer: PeerId,
        offset: u64,
        len: u64,
    ) -> Result<GrantDescriptor, TransportError>;
    /// Withdraws a grant. Sends from the range already in flight finish first; then
    /// [`Event::Revoked`] says the transport no longer touches the range, and every read
    /// under the grant's descriptor from then on is refused. Between this call and
    /// `Revoked` a read may still be served (a one-sided transport learns of the revoke
    /// from a message; the range is not reused before `Revoked`, so such a read still gets
    /// the granted bytes).
    fn revoke(&mut self, grant: GrantId);
    /// Closes a connection.
    fn disconnect(&mut self, peer: PeerId);
    /// Does pending work and appends what happened to `events`, waiting up to `timeout` (or
    /// until woken) when there is nothing to report.
    fn poll(
        &mut self,
        events: &mut Vec<Event>,
        timeout: Option<Duration>,
    ) -> Result<(), TransportError>;
    /// A handle that interrupts [`Transport::poll`] from another thread.
    fn waker(&self) -> Waker;
    /// A file descriptor that becomes readable when [`Transport::poll`] has work (events to
    /// report, completions to process), so that the caller can sleep in its own `epoll`
    /// together with other descriptors and call `poll` with a zero timeout when it fires.
    /// It may stay quiet while [`Transport::has_work`] is `true`: check that before sleeping.
    /// `None`: block in `poll` to wait.
    fn ready_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
    /// Whether [`Transport::poll`] has work that [`Transport::ready_fd`] may not show: events
    /// queued by calls made outside `poll` (a refused connect, a local disconnect),
    /// operations queued but not yet started (a send made after the last `poll`), or
    /// completions the transport took off its queue and holds. A caller that sleeps on the
    /// descriptor checks this first and calls `poll` instead while it is `true`.
    fn has_work(&self) -> bool {
        false
    }
    /// How this transport reaches `peer`, for transports that choose per peer (`rdma` falls
    /// back to `tcp` where RDMA cannot serve, and says why). `None`: every peer is reached
    /// by [`Transport::kind`], or no such connection.
    fn peer_path(&self, peer: PeerId) -> Option<PeerPath> {
        let _ = peer;
        None
    }
    /// Facts about the transport worth showing in `ferroplasma stat` (`rdma`: the device, the
    /// registration time, whether grants are enforced by the NIC), as (key, value) pairs.
    fn status(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }
}

/// How a transport reaches one peer ([`Transport::peer_path`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerPath {
    /// The medium (`rdma`, `tcp`).
    pub kind: &'static str,
    /// Why this one (for `rdma`: the queue pairs connected; for `tcp`: why not RDMA).
    pub reason: String,
}
