//! ferroplasma's node-to-node transport over TCP, with io_uring for the data path.
//!
//! - **Hand-shake** (`handshake`): each connection authenticates on a short-lived thread with
//!   blocking sockets (the byte sequence of [`ferroplasma_transport::hello`]), then the
//!   socket is handed to the poller through a queue and an eventfd. Inbound hand-shakes are
//!   capped; a peer that fails authentication is never reported.
//! - **Data path** (`uring`): one io_uring per transport, driven by [`Transport::poll`].
//!   Every byte after the hand-shake is a frame ([`ferroplasma_transport::frame`]), tagged
//!   with the connection's session key ([`ferroplasma_transport::session`]): frames are
//!   numbered and tagged as they reach the socket and checked in order as they arrive; a bad
//!   tag drops the connection before anything of the frame is used. Headers
//!   and control messages go through small heap buffers; read data is received straight
//!   into the region at the read's destination and sent straight from the region (zero-copy
//!   `SEND_ZC` for chunks of 64 KiB and more), so object bytes are never copied in user
//!   space.
//! - **Grants**: a peer's read request is served only inside one live grant to that peer. A
//!   revoked grant is reported ([`Event::Revoked`]) only once no queued or in-flight send
//!   (zero-copy notifications included) still refers to its range.
//!
//! One send op is in flight per socket at a time, so frames never interleave; each
//! connection queues the rest. Control frames jump ahead of data: between two data chunks,
//! every queued message goes first, so a long transfer delays heartbeats and answers by one
//! chunk at most. Reads in flight on a connection are served in request order.
//!
//! ```no_run
//! use ferroplasma_transport::{Identity, Transport, TransportConfig};
//! use ferroplasma_transport_tcp::{Region, TcpTransport};
//!
//! let cfg = TransportConfig::new(Identity::new(1, ""), b"token".to_vec());
//! let mut t = TcpTransport::new(cfg, "127.0.0.1:0", Region::owned(1 << 20))?;
//! let peer = t.connect("127.0.0.1:7000");
//! let mut events = Vec::new();
//! t.poll(&mut events, Some(std::time::Duration::from_millis(10)))?;
//! # let _ = peer;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod conn;
mod handshake;
mod rx;
mod tx;
mod uring;

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferroplasma_transport::frame::{self, Header, ReadProgress};
use ferroplasma_transport::{
    ConnectError, DataSettings, Event, GrantDescriptor, GrantId, Identity, PeerId, ReadError,
    ReadOp, RegionHandle, Transport, TransportConfig, TransportError, Waker,
};

use crate::conn::{Cause, Conn, TxItem};
use crate::handshake::{Handoff, Inbox, Params};
use crate::uring::{Buf, Completion, Ring};

pub use ferroplasma_region::Region;
pub use handshake::MAX_INBOUND;

/// tcp's control message cap ([`Transport::max_control_msg`]), 80 KiB: the frame limit on
/// `Msg` bodies ([`frame::MAX_MSG`]; a larger announced length drops the connection), large
/// enough for a 64 KiB object inline in a lookup reply with the reply around it.
/// [`TransportConfig::max_control_msg`] is ignored.
pub const MAX_CONTROL_MSG: usize = frame::MAX_MSG;

/// Ring submission slots.
const RING_ENTRIES: u32 = 256;
/// How long drop waits for the kernel to finish with in-flight ops.
const DROP_DRAIN: Duration = Duration::from_secs(2);

/// What a ring op is for.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Tag {
    /// The eventfd read.
    Wake,
    /// The listener's accept.
    Accept,
    /// A receive on a connection.
    Recv(PeerId),
    /// A send on a connection; `grant` when it sends from the region.
    Send {
        peer: PeerId,
        grant: Option<GrantId>,
        zc: bool,
    },
    /// Cancellation at drop.
    Cancel,
}

/// A grant and the sends that still refer to it.
#[derive(Debug)]
pub(crate) struct Grant {
    pub peer: PeerId,
    pub off: u64,
    pub len: u64,
    /// Queued serves, chunks being sent and ops in flight (until their last completion).
    pub refs: u32,
    /// Withdrawn: no new serve may use it; reported once `refs` is zero.
    pub revoked: bool,
}

/// A read this node asked for.
#[derive(Debug)]
pub(crate) struct PendingRead {
    pub peer: PeerId,
    pub local_offset: u64,
    pub progress: ReadProgress,
}

/// The TCP transport. See the crate docs.
pub struct TcpTransport {
    cfg: TransportConfig,
    region: Region,
    ring: Ring<Tag>,
    listener: TcpListener,
    local_addr: String,
    inbox: Arc<Inbox>,
    params: Arc<Params>,
    conns: HashMap<PeerId, Conn>,
    /// Outbound connections whose hand-shake runs.
    connecting: HashMap<PeerId, String>,
    next_peer: u64,
    grants: HashMap<GrantId, Grant>,
    next_grant: u64,
    reads: HashMap<u64, PendingRead>,
    events: Vec<Event>,
    /// Whether to use `SEND_ZC` for large chunks (off after the kernel refused it).
    zero_copy: bool,
    woken: bool,
    completions: Vec<Completion<Tag>>,
    stats: Stats,
}

impl std::fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport")
            .field("addr", &self.local_addr)
            .field("conns", &self.conns.len())
            .field("reads", &self.reads.len())
            .field("grants", &self.grants.len())
            .finish()
    }
}

/// Counters of the data path (hot-path figures; no log lines there).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Chunk bodies (or their remainders) handed to the kernel with `SEND_ZC`.
    pub zero_copy_sends: u64,
    /// Chunk bodies (or their remainders) handed to the kernel with a copying send.
    pub copied_sends: u64,
    /// Bytes of read data the sockets took from the region.
    pub data_sent: u64,
    /// Bytes of read data received into the region (checked chunks only).
    pub data_received: u64,
    /// Connections dropped for a protocol error or a corrupt chunk.
    pub protocol_errors: u64,
    /// Connections dropped for a frame that failed its authentication tag.
    pub bad_tags: u64,
}

/// Chunks of at least this size go out with `SEND_ZC`; smaller ones are copied.
pub const ZERO_COPY_MIN: u64 = 64 << 10;

impl TcpTransport {
    /// A transport listening on `listen` (`ip:port`, port 0 picks one) over `region`.
    ///
    /// If `cfg.identity.addr` is empty, peers are told the bound address.
    pub fn new(cfg: TransportConfig, listen: &str, region: Region) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen)?;
        let local_addr = listener.local_addr()?.to_string();
        let efd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)?;
        let inbox = Arc::new(Inbox::new(efd));
        let addr = if cfg.identity.addr.is_empty() {
            local_addr.clone()
        } else {
            cfg.identity.addr.clone()
        };
        let params = Arc::new(Params {
            token: cfg.token.clone(),
            node_id: cfg.identity.node_id,
            features: cfg.identity.features,
            addr,
            timeout: cfg.handshake_timeout,
        });
        let mut ring = Ring::new(RING_ENTRIES)?;
        ring.accept(listener.as_raw_fd(), Tag::Accept)?;
        ring.read(
            inbox.efd().as_raw_fd(),
            Buf::Owned {
                data: vec![0; 8],
                pos: 0,
            },
            Tag::Wake,
        )?;
        let mut cfg = cfg;
        cfg.chunk = cfg.chunk.clamp(1, frame::MAX_CHUNK);
        tracing::debug!(addr = %local_addr, "tcp transport listening");
        Ok(Self {
            cfg,
            region,
            ring,
            listener,
            local_addr,
            inbox,
            params,
            conns: HashMap::new(),
            connecting: HashMap::new(),
            next_peer: 1,
            grants: HashMap::new(),
            next_grant: 1,
            reads: HashMap::new(),
            events: Vec::new(),
            zero_copy: true,
            woken: false,
            completions: Vec::new(),
            stats: Stats::default(),
        })
    }

    /// Turns zero-copy sends (`SEND_ZC`) for large chunks on or off (on by default; it
    /// turns itself off if the kernel refuses it).
    pub fn set_zero_copy(&mut self, on: bool) {
        self.zero_copy = on;
    }

    /// The data-path counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// This node's address on the connection to `peer` (what the peer dialled, or what we
    /// dialled from).
    pub fn local_ip(&self, peer: PeerId) -> Option<std::net::IpAddr> {
        let c = self.conns.get(&peer).filter(|c| c.open)?;
        c.stream.local_addr().ok().map(|a| a.ip())
    }

    /// The identity a connected peer gave, if connected.
    pub fn identity(&self, peer: PeerId) -> Option<&Identity> {
        self.conns
            .get(&peer)
            .filter(|c| c.open)
            .map(|c| &c.identity)
    }

    fn open_conn(&mut self, peer: PeerId) -> Result<&mut Conn, TransportError> {
        self.conns
            .get_mut(&peer)
            .filter(|c| c.open)
            .ok_or(TransportError::NoPeer(peer))
    }

    /// Queues a frame on an open connection and starts sending.
    fn enqueue(&mut self, peer: PeerId, item: TxItem) -> Result<(), TransportError> {
        self.open_conn(peer)?.txq.push_back(item);
        self.kick(peer);
        Ok(())
    }

    fn take_handoffs(&mut self) {
        for h in self.inbox.take() {
            match h {
                Handoff::Ready {
                    peer: Some(peer),
                    stream,
                    identity,
                    session,
                } => {
                    if self.connecting.remove(&peer).is_some() {
                        self.add_conn(peer, Conn::new(stream, identity, *session), false);
                    }
                }
                Handoff::Ready {
                    peer: None,
                    stream,
                    identity,
                    session,
                } => {
                    let peer = PeerId::from_raw(self.next_peer);
                    self.next_peer += 1;
                    self.add_conn(peer, Conn::new(stream, identity, *session), true);
                }
                Handoff::Failed { peer, error } => {
                    if self.connecting.remove(&peer).is_some() {
                        self.events.push(Event::ConnectFailed { peer, error });
                    }
                }
            }
        }
    }

    fn add_conn(&mut self, peer: PeerId, conn: Conn, inbound: bool) {
        let identity = conn.identity.clone();
        tracing::debug!(peer = %peer, node = identity.node_id, addr = %identity.addr, inbound, "connected");
        self.conns.insert(peer, conn);
        self.events.push(Event::Connected {
            peer,
            identity,
            inbound,
        });
        self.recv_header(peer, None);
    }

    /// Starts closing a connection: shuts the socket down (in-flight ops complete soon),
    /// drops queued frames, and reports once no receive can still write into a read's
    /// destination.
    pub(crate) fn close(&mut self, peer: PeerId, reason: String) {
        self.close_as(peer, Cause::Gone, reason);
    }

    /// As [`TcpTransport::close`], saying who ended the connection.
    pub(crate) fn close_as(&mut self, peer: PeerId, cause: Cause, reason: String) {
        let Some(conn) = self.conns.get_mut(&peer) else {
            return;
        };
        if !conn.open {
            return;
        }
        tracing::debug!(peer = %peer, %reason, "closing connection");
        conn.open = false;
        conn.reason = reason;
        conn.cause = cause;
        if let Err(e) = rustix::net::shutdown(&conn.stream, rustix::net::Shutdown::Both) {
            tracing::debug!(peer = %peer, error = %e, "shutdown");
        }
        let mut released = Vec::new();
        for item in conn.txq.drain(..) {
            if let TxItem::Serve { grant, .. } = item {
                released.push(grant);
            }
        }
        if !conn.tx_busy {
            conn.tx_head = None;
            if let Some(b) = conn.tx_body.take() {
                released.push(b.grant);
            }
        }
        for g in released {
            self.release(g);
        }
        self.finish_close(peer);
    }

    /// Reports a closing connection once no receive is in flight, and forgets it once no op
    /// refers to it.
    pub(crate) fn finish_close(&mut self, peer: PeerId) {
        let Some(conn) = self.conns.get_mut(&peer) else {
            return;
        };
        if conn.open {
            return;
        }
        if !conn.reported && !conn.rx_busy {
            conn.reported = true;
            let (reason, cause) = (conn.reason.clone(), conn.cause);
            let grants: Vec<GrantId> = conn.grants.drain().collect();
            let mut failed: Vec<u64> = self
                .reads
                .iter()
                .filter(|(_, r)| r.peer == peer)
                .map(|(t, _)| *t)
                .collect();
            failed.sort_unstable();
            for token in failed {
                self.reads.remove(&token);
                self.events.push(Event::ReadDone {
                    token,
                    result: Err(match cause {
                        Cause::Gone => ReadError::PeerGone {
                            peer,
                            reason: reason.clone(),
                        },
                        Cause::Local => ReadError::Aborted { peer },
                        Cause::Violation => ReadError::ProtocolViolation {
                            peer,
                            reason: reason.clone(),
                        },
                    }),
                });
            }
            for g in grants {
                self.revoke(g);
            }
            self.events.push(Event::Disconnected { peer, reason });
        }
        if let Some(conn) = self.conns.get(&peer) {
            if conn.reported && conn.ops == 0 {
                self.conns.remove(&peer);
            }
        }
    }

    /// Drops a reference on a grant; reports it revoked when it was the last one.
    pub(crate) fn release(&mut self, g: GrantId) {
        if let Some(gr) = self.grants.get_mut(&g) {
            gr.refs = gr.refs.saturating_sub(1);
            if gr.refs == 0 && gr.revoked {
                self.grants.remove(&g);
                self.events.push(Event::Revoked { grant: g });
            }
        }
    }

    fn on_completion(&mut self, c: Completion<Tag>) {
        match c.tag {
            Tag::Wake => {
                self.woken = true;
                let buf = match c.buf {
                    Some(Buf::Owned { data, .. }) => Buf::Owned { data, pos: 0 },
                    _ => Buf::Owned {
                        data: vec![0; 8],
                        pos: 0,
                    },
                };
                if let Err(e) = self.ring.read(self.inbox.efd().as_raw_fd(), buf, Tag::Wake) {
                    tracing::error!(error = %e, "cannot re-arm the waker");
                }
            }
            Tag::Accept => {
                if let Some(fd) = c.fd {
                    handshake::spawn_accept(&self.inbox, &self.params, TcpStream::from(fd));
                } else if c.res != -libc::ECANCELED {
                    tracing::warn!(error = %std::io::Error::from_raw_os_error(-c.res), "accept");
                }
                if c.res != -libc::ECANCELED {
                    if let Err(e) = self.ring.accept(self.listener.as_raw_fd(), Tag::Accept) {
                        tracing::error!(error = %e, "cannot re-arm accept");
                    }
                }
            }
            Tag::Recv(peer) => self.on_recv(peer, c),
            Tag::Send { peer, grant, zc } => self.on_send(peer, grant, zc, c),
            Tag::Cancel => {}
        }
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        for conn in self.conns.values() {
            let _ = rustix::net::shutdown(&conn.stream, rustix::net::Shutdown::Both);
        }
        let leaked = self.ring.shutdown(Tag::Cancel, DROP_DRAIN);
        if leaked > 0 {
            tracing::warn!(
                leaked,
                "tcp transport dropped with ring ops pending (zero-copy sends the peer has not \
                 read); their buffers and the region are kept alive"
            );
        }
    }
}

impl Transport for TcpTransport {
    fn kind(&self) -> &'static str {
        "tcp"
    }

    fn local_addr(&self) -> String {
        self.local_addr.clone()
    }

    fn region(&self) -> RegionHandle {
        RegionHandle {
            len: self.region.len(),
        }
    }

    fn data_settings(&self) -> DataSettings {
        DataSettings {
            chunk: Some(self.cfg.chunk),
            checksums: self.cfg.checksum_mode(),
        }
    }

    fn max_control_msg(&self) -> usize {
        MAX_CONTROL_MSG
    }

    fn connect(&mut self, addr: &str) -> PeerId {
        let peer = PeerId::from_raw(self.next_peer);
        self.next_peer += 1;
        self.connecting.insert(peer, addr.to_string());
        handshake::spawn_connect(&self.inbox, &self.params, peer, addr);
        peer
    }

    fn send(&mut self, peer: PeerId, body: Vec<u8>) -> Result<(), TransportError> {
        if body.len() > MAX_CONTROL_MSG {
            return Err(TransportError::TooLarge(body.len()));
        }
        let len = u32::try_from(body.len()).map_err(|_| TransportError::TooLarge(body.len()))?;
        let f = frame::unsealed(&Header::msg(len), &body);
        self.enqueue(peer, TxItem::Frame(f))
    }

    unsafe fn read(&mut self, op: ReadOp) -> Result<(), TransportError> {
        self.region().check(op.local_offset, op.len)?;
        self.open_conn(op.peer)?;
        if self.reads.contains_key(&op.token) {
            return Err(TransportError::DuplicateToken(op.token));
        }
        self.reads.insert(
            op.token,
            PendingRead {
                peer: op.peer,
                local_offset: op.local_offset,
                progress: ReadProgress::new(op.len),
            },
        );
        // Not checked against the descriptor here: the server checks the read against the
        // grant it names (a sum past the end of the address space fails there too).
        let remote = op.grant.addr.saturating_add(op.offset);
        let mut req = Header::read_req(op.token, remote, op.len, op.grant.id.0);
        if self.cfg.keyed_checksums {
            req.flags = frame::FLAG_KEYED;
        }
        let req = req.encode().to_vec();
        self.enqueue(op.peer, TxItem::Frame(req))
    }

    unsafe fn grant(
        &mut self,
        peer: PeerId,
        offset: u64,
        len: u64,
    ) -> Result<GrantDescriptor, TransportError> {
        self.region().check(offset, len)?;
        let id = GrantId(self.next_grant);
        self.open_conn(peer)?.grants.insert(id);
        self.next_grant += 1;
        self.grants.insert(
            id,
            Grant {
                peer,
                off: offset,
                len,
                refs: 0,
                revoked: false,
            },
        );
        Ok(GrantDescriptor {
            id,
            addr: offset,
            len,
            key: 0,
        })
    }

    fn revoke(&mut self, grant: GrantId) {
        let Some(g) = self.grants.get_mut(&grant) else {
            return;
        };
        if g.revoked {
            return;
        }
        g.revoked = true;
        let (peer, refs) = (g.peer, g.refs);
        if let Some(c) = self.conns.get_mut(&peer) {
            c.grants.remove(&grant);
        }
        if refs == 0 {
            self.grants.remove(&grant);
            self.events.push(Event::Revoked { grant });
        }
    }

    fn disconnect(&mut self, peer: PeerId) {
        if let Some(addr) = self.connecting.remove(&peer) {
            self.events.push(Event::ConnectFailed {
                peer,
                error: ConnectError::Aborted { addr },
            });
            return;
        }
        self.close_as(peer, Cause::Local, "closed by this node".into());
    }

    fn poll(
        &mut self,
        events: &mut Vec<Event>,
        timeout: Option<Duration>,
    ) -> Result<(), TransportError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        self.woken = false;
        loop {
            self.take_handoffs();
            let wait = if !self.events.is_empty() || self.woken {
                Some(Duration::ZERO)
            } else {
                deadline.map(|d| d.saturating_duration_since(Instant::now()))
            };
            self.ring.submit_and_wait(wait)?;
            let mut cs = std::mem::take(&mut self.completions);
            self.ring.complete(&mut cs);
            for c in cs.drain(..) {
                self.on_completion(c);
            }
            self.completions = cs;
            self.take_handoffs();
            let expired = deadline.is_some_and(|d| Instant::now() >= d);
            if !self.events.is_empty() || self.woken || expired {
                break;
            }
        }
        // Start the kernel on whatever the completions queued.
        self.ring.submit_and_wait(Some(Duration::ZERO))?;
        events.append(&mut self.events);
        Ok(())
    }

    fn ready_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        // Readable while the kernel's completion queue holds entries; not for completions
        // the ring moved to its backlog, nor for ops queued but not yet submitted (a send
        // made after the last `poll`): `has_work` reports those.
        Some(self.ring.fd())
    }

    fn has_work(&self) -> bool {
        !self.events.is_empty() || self.ring.has_work()
    }

    fn waker(&self) -> Waker {
        let inbox = Arc::downgrade(&self.inbox);
        Waker::new(move || {
            if let Some(i) = inbox.upgrade() {
                i.wake();
            }
        })
    }
}

#[cfg(test)]
mod tests;
