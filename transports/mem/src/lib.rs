//! An in-process transport: "addresses" are names in a [`MemNetwork`], messages go through
//! queues, and a read is one copy from the server's region straight into the reader's
//! region, made by the server when it polls (as a NIC would). It runs the real hand-shake
//! (token proofs) and enforces grants exactly like the network transports, so the cluster
//! logic can be tested without sockets.

use std::collections::{HashMap, VecDeque};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use ferroplasma_transport::hello::{Handshake, HelloError, Role};
use ferroplasma_transport::{
    ChecksumMode, ConnectError, DataSettings, Event, GrantDescriptor, GrantId, Identity, PeerId,
    ReadError, ReadOp, RegionHandle, Transport, TransportConfig, TransportError, Waker,
};

pub use ferroplasma_region::Region;

/// mem's control message cap unless configured smaller
/// ([`TransportConfig::max_control_msg`]): the same as tcp's (80 KiB), so the cluster behaves
/// over mem as over tcp.
pub const MAX_CONTROL_MSG: usize = ferroplasma_transport::frame::MAX_MSG;

/// A namespace of in-process listeners.
#[derive(Clone, Debug, Default)]
pub struct MemNetwork {
    listeners: Arc<Mutex<HashMap<String, Weak<Shared>>>>,
    next: Arc<std::sync::atomic::AtomicU64>,
}

impl MemNetwork {
    /// An empty network.
    pub fn new() -> Self {
        Self::default()
    }
}

enum Incoming {
    /// A peer authenticated and opened a connection to us.
    Accepted {
        link: Link,
        identity: Identity,
    },
    Msg {
        conn: PeerId,
        body: Vec<u8>,
    },
    ReadReq {
        conn: PeerId,
        op: ReadOp,
        slot: ReadSlot,
    },
    ReadDone {
        token: u64,
        slot: ReadSlot,
        result: Result<(), ReadError>,
    },
    Closed {
        conn: PeerId,
        reason: String,
    },
}

struct Shared {
    addr: String,
    token: Vec<u8>,
    identity: Identity,
    region: Region,
    inbox: Mutex<VecDeque<Incoming>>,
    ready: Condvar,
    next_conn: std::sync::atomic::AtomicU64,
    /// Copies this side started serving reads (tests wait on it).
    copies: std::sync::atomic::AtomicU64,
    /// Readable while the inbox may hold something (for callers sleeping in epoll).
    notify_rx: UnixDatagram,
    notify_tx: UnixDatagram,
}

impl Shared {
    fn push(&self, m: Incoming) {
        if let Ok(mut q) = self.inbox.lock() {
            q.push_back(m);
        }
        self.notify();
    }

    fn notify(&self) {
        self.ready.notify_all();
        // A full socket buffer already signals readiness: nothing is lost.
        let _ = self.notify_tx.send(&[1]);
    }

    fn drain_notifications(&self) {
        let mut b = [0u8; 64];
        while matches!(self.notify_rx.recv(&mut b), Ok(n) if n > 0) {}
    }
}

/// Who ended a link: what its reads in flight fail with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cause {
    /// This side closed it (`Aborted`).
    Local,
    /// The other side is gone (`PeerGone`).
    Gone,
    /// The other side broke the protocol (`ProtocolViolation`).
    Violation,
}

/// A read's claim on its destination, shared by the reader and the server. The server copies
/// only while holding the lock and seeing the read open; the reader closes it under the lock
/// before it reports a failure, so once its `ReadDone` is out no copy can start, and none is
/// still running.
#[derive(Clone)]
struct ReadSlot(Arc<Mutex<bool>>);

impl ReadSlot {
    fn open() -> Self {
        Self(Arc::new(Mutex::new(true)))
    }

    /// Closes the slot, waiting for a copy into the destination to finish. That blocks the
    /// reader's thread for up to one whole read's copy on the serving thread (fine for a
    /// transport made for tests; a real one would cancel in smaller steps).
    fn close(&self) {
        let mut open = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *open = false;
    }

    fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

#[derive(Clone)]
struct Link {
    /// The other side.
    remote: Weak<Shared>,
    /// Our connection number at the other side.
    remote_conn: PeerId,
    /// The other side's connection number for this link, at our side.
    local_conn: PeerId,
}

/// The in-process transport.
pub struct MemTransport {
    net: MemNetwork,
    shared: Arc<Shared>,
    links: HashMap<PeerId, Link>,
    grants: HashMap<GrantId, (PeerId, u64, u64)>,
    next_grant: u64,
    /// Reads we asked for: token → connection and the read's slot.
    reads: HashMap<u64, (PeerId, ReadSlot)>,
    local: Vec<Event>,
    /// The control message cap ([`Transport::max_control_msg`]).
    max_msg: usize,
}

impl std::fmt::Debug for MemTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemTransport")
            .field("addr", &self.shared.addr)
            .field("links", &self.links.len())
            .finish()
    }
}

impl MemTransport {
    /// A transport listening on a fresh name in `net` (`mem:<n>`; `listen` picks the name if
    /// given), over `region`.
    ///
    /// # Panics
    /// If the process cannot create a socket pair (out of file descriptors).
    pub fn new(
        net: &MemNetwork,
        listen: Option<&str>,
        cfg: TransportConfig,
        region: Region,
    ) -> Self {
        let (notify_rx, notify_tx) = UnixDatagram::pair().expect("a socket pair for notifications");
        notify_rx.set_nonblocking(true).expect("nonblocking socket");
        notify_tx.set_nonblocking(true).expect("nonblocking socket");
        let n = net.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let addr = listen.map_or_else(|| format!("mem:{n}"), str::to_string);
        let mut identity = cfg.identity.clone();
        if identity.addr.is_empty() {
            identity.addr = addr.clone();
        }
        let shared = Arc::new(Shared {
            addr: addr.clone(),
            token: cfg.token.clone(),
            identity,
            region,
            inbox: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            next_conn: std::sync::atomic::AtomicU64::new(1),
            copies: std::sync::atomic::AtomicU64::new(0),
            notify_rx,
            notify_tx,
        });
        if let Ok(mut l) = net.listeners.lock() {
            l.insert(addr, Arc::downgrade(&shared));
        }
        Self {
            net: net.clone(),
            shared,
            links: HashMap::new(),
            grants: HashMap::new(),
            next_grant: 1,
            reads: HashMap::new(),
            local: Vec::new(),
            max_msg: cfg.max_control_msg.map_or(MAX_CONTROL_MSG, |m| {
                m.clamp(ferroplasma_transport::MIN_CONTROL_MSG, MAX_CONTROL_MSG)
            }),
        }
    }

    fn conn_id(&self) -> PeerId {
        PeerId::from_raw(
            self.shared
                .next_conn
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        )
    }

    fn nonce(&self) -> [u8; 32] {
        // Distinct per hand-shake; secrecy does not matter in-process.
        let mut n = [0u8; 32];
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(self.conn_id().raw());
        let t = h.finish();
        n[..8].copy_from_slice(&t.to_le_bytes());
        n[8..16].copy_from_slice(&self.shared.identity.node_id.to_le_bytes());
        n
    }

    /// Closes a link: `tell_remote` when this side closes it (its reads fail `Aborted`),
    /// else the other side is gone (`PeerGone`).
    fn close_link(&mut self, conn: PeerId, reason: &str, tell_remote: bool) {
        let cause = if tell_remote {
            Cause::Local
        } else {
            Cause::Gone
        };
        self.close_link_as(conn, reason, cause);
    }

    /// Closes a link for `cause`; tells the other side unless it is the one gone.
    fn close_link_as(&mut self, conn: PeerId, reason: &str, cause: Cause) {
        let Some(link) = self.links.remove(&conn) else {
            return;
        };
        if cause != Cause::Gone {
            if let Some(r) = link.remote.upgrade() {
                r.push(Incoming::Closed {
                    conn: link.remote_conn,
                    reason: "peer closed the connection".into(),
                });
            }
        }
        let failed: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, (c, _))| *c == conn)
            .map(|(t, _)| *t)
            .collect();
        for token in failed {
            if let Some((_, slot)) = self.reads.remove(&token) {
                // From here on the server copies nothing into the destination.
                slot.close();
            }
            self.local.push(Event::ReadDone {
                token,
                result: Err(match cause {
                    Cause::Local => ReadError::Aborted { peer: conn },
                    Cause::Gone => ReadError::PeerGone {
                        peer: conn,
                        reason: reason.to_string(),
                    },
                    Cause::Violation => ReadError::ProtocolViolation {
                        peer: conn,
                        reason: reason.to_string(),
                    },
                }),
            });
        }
        let gone: Vec<GrantId> = self
            .grants
            .iter()
            .filter(|(_, g)| g.0 == conn)
            .map(|(id, _)| *id)
            .collect();
        for grant in gone {
            self.grants.remove(&grant);
            self.local.push(Event::Revoked { grant });
        }
        self.local.push(Event::Disconnected {
            peer: conn,
            reason: reason.to_string(),
        });
    }

    fn serve_read(&mut self, conn: PeerId, op: ReadOp, slot: ReadSlot) {
        let Some(link) = self.links.get(&conn) else {
            return;
        };
        let Some(remote) = link.remote.upgrade() else {
            return;
        };
        // Held until the copy is done: the reader cannot report the read over before.
        let open = slot
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !*open {
            // The reader gave up on the read (and reported it); its destination may be
            // reused already.
            return;
        }
        // Checked against the grant the descriptor names, as issued to this connection, with
        // the range as this side recorded it (the descriptor's own range is the peer's word).
        let remote_offset = op.grant.addr.saturating_add(op.offset);
        let granted = self.grants.get(&op.grant.id).is_some_and(|&(p, off, len)| {
            p == conn
                && remote_offset >= off
                && remote_offset
                    .checked_add(op.len)
                    .is_some_and(|end| end <= off + len)
        });
        let result = if !granted {
            Err(ReadError::Refused {
                // The reader's number for this connection.
                peer: link.remote_conn,
                reason: format!(
                    "range {}+{} is not inside a live grant to this connection",
                    remote_offset, op.len
                ),
            })
        } else {
            self.shared
                .copies
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // SAFETY: the source lies inside a live grant to this connection (checked just
            // above): by `Transport::grant`'s contract nothing in this process writes it until
            // its `Revoked`, which this transport reports only from `revoke` or a closed link,
            // both on this thread, so not during this copy. The destination is the read's
            // destination, and this function holds its slot open (`open`): the reader closes
            // the slot before it reports a failure and learns of success only from the
            // `ReadDone` pushed below, so its `ReadDone` is not out yet, and by
            // `Transport::read`'s contract nothing else in this process reads or writes the
            // range until then, and it overlaps no other in-flight read's destination (so no
            // other copy writes it) and no granted range (so no copy reads it). The request
            // was taken off the inbox once, so this is the only copy for this read.
            let copied = unsafe {
                self.shared
                    .region
                    .copy_to(remote_offset, &remote.region, op.local_offset, op.len)
            };
            if copied {
                Ok(())
            } else {
                Err(ReadError::Refused {
                    peer: link.remote_conn,
                    reason: "range outside a region".into(),
                })
            }
        };
        drop(open);
        remote.push(Incoming::ReadDone {
            token: op.token,
            slot,
            result,
        });
    }
}

impl Drop for MemTransport {
    fn drop(&mut self) {
        // The region may be reused once the transport is gone: no server may copy into it.
        for (_, slot) in self.reads.values() {
            slot.close();
        }
        if let Ok(mut l) = self.net.listeners.lock() {
            l.remove(&self.shared.addr);
        }
        for link in self.links.values() {
            if let Some(r) = link.remote.upgrade() {
                r.push(Incoming::Closed {
                    conn: link.remote_conn,
                    reason: "peer is gone".into(),
                });
            }
        }
    }
}

impl Transport for MemTransport {
    fn kind(&self) -> &'static str {
        "mem"
    }

    fn local_addr(&self) -> String {
        self.shared.addr.clone()
    }

    fn region(&self) -> RegionHandle {
        RegionHandle {
            len: self.shared.region.len(),
        }
    }

    fn data_settings(&self) -> DataSettings {
        // A read is one copy between regions in one process: nothing to cut or check.
        DataSettings {
            chunk: None,
            checksums: ChecksumMode::Off,
        }
    }

    fn max_control_msg(&self) -> usize {
        self.max_msg
    }

    fn connect(&mut self, addr: &str) -> PeerId {
        let conn = self.conn_id();
        let fail = |error: ConnectError| Event::ConnectFailed { peer: conn, error };
        let target = self
            .net
            .listeners
            .lock()
            .ok()
            .and_then(|l| l.get(addr).and_then(Weak::upgrade));
        let Some(remote) = target else {
            self.local.push(fail(ConnectError::Unreachable {
                addr: addr.to_string(),
                reason: "nobody listens there".into(),
            }));
            return conn;
        };
        let mut hi = Handshake::new(
            Role::Initiator,
            &self.shared.token,
            self.nonce(),
            self.shared.identity.node_id,
            &self.shared.identity.addr,
        );
        // The acceptor's half runs on the acceptor's own state (its token).
        let mut ha = Handshake::new(
            Role::Acceptor,
            &remote.token,
            self.nonce().map(|b| b ^ 0x5a),
            remote.identity.node_id,
            &remote.identity.addr,
        );
        let outcome = ha
            .their_hello(&hi.hello())
            .and_then(|()| hi.their_hello(&ha.hello()))
            .and_then(|()| ha.their_proof(&hi.proof()))
            .and_then(|()| hi.their_proof(&ha.proof()))
            .and_then(|()| {
                // Keys and Finished as on a socket; messages in-process need no tags.
                let mut si = hi.session(&ha.ident())?;
                let mut sa = ha.session(&hi.ident())?;
                let bad = |_| HelloError::BadFinished;
                sa.opener.finished(&si.sealer.finished()).map_err(bad)?;
                si.opener.finished(&sa.sealer.finished()).map_err(bad)
            });
        if let Err(e) = outcome {
            self.local.push(fail(ConnectError::from_hello(addr, &e)));
            return conn;
        }
        let remote_conn = PeerId::from_raw(
            remote
                .next_conn
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        );
        self.links.insert(
            conn,
            Link {
                remote: Arc::downgrade(&remote),
                remote_conn,
                local_conn: conn,
            },
        );
        remote.push(Incoming::Accepted {
            link: Link {
                remote: Arc::downgrade(&self.shared),
                remote_conn: conn,
                local_conn: remote_conn,
            },
            identity: self.shared.identity.clone(),
        });
        self.local.push(Event::Connected {
            peer: conn,
            identity: remote.identity.clone(),
            inbound: false,
        });
        conn
    }

    fn send(&mut self, peer: PeerId, body: Vec<u8>) -> Result<(), TransportError> {
        if body.len() > self.max_msg {
            return Err(TransportError::TooLarge(body.len()));
        }
        let link = self.links.get(&peer).ok_or(TransportError::NoPeer(peer))?;
        let remote = link.remote.upgrade().ok_or(TransportError::NoPeer(peer))?;
        remote.push(Incoming::Msg {
            conn: link.remote_conn,
            body,
        });
        Ok(())
    }

    unsafe fn read(&mut self, op: ReadOp) -> Result<(), TransportError> {
        self.region().check(op.local_offset, op.len)?;
        if self.reads.contains_key(&op.token) {
            return Err(TransportError::DuplicateToken(op.token));
        }
        let link = self
            .links
            .get(&op.peer)
            .ok_or(TransportError::NoPeer(op.peer))?;
        let remote = link
            .remote
            .upgrade()
            .ok_or(TransportError::NoPeer(op.peer))?;
        let slot = ReadSlot::open();
        self.reads.insert(op.token, (op.peer, slot.clone()));
        remote.push(Incoming::ReadReq {
            conn: link.remote_conn,
            op,
            slot,
        });
        Ok(())
    }

    unsafe fn grant(
        &mut self,
        peer: PeerId,
        offset: u64,
        len: u64,
    ) -> Result<GrantDescriptor, TransportError> {
        self.region().check(offset, len)?;
        if !self.links.contains_key(&peer) {
            return Err(TransportError::NoPeer(peer));
        }
        let id = GrantId(self.next_grant);
        self.next_grant += 1;
        self.grants.insert(id, (peer, offset, len));
        Ok(GrantDescriptor {
            id,
            addr: offset,
            len,
            key: 0,
        })
    }

    fn revoke(&mut self, grant: GrantId) {
        // Copies happen inside poll, so none is in flight now.
        if self.grants.remove(&grant).is_some() {
            self.local.push(Event::Revoked { grant });
        }
    }

    fn disconnect(&mut self, peer: PeerId) {
        self.close_link(peer, "closed by this node", true);
    }

    fn poll(
        &mut self,
        events: &mut Vec<Event>,
        timeout: Option<Duration>,
    ) -> Result<(), TransportError> {
        let mut batch: VecDeque<Incoming> = {
            let mut q = self
                .shared
                .inbox
                .lock()
                .map_err(|_| std::io::Error::other("mem transport inbox poisoned"))?;
            if q.is_empty() && self.local.is_empty() {
                let t = timeout.unwrap_or(Duration::from_secs(3600));
                if !t.is_zero() {
                    q = self
                        .shared
                        .ready
                        .wait_timeout(q, t)
                        .map_err(|_| std::io::Error::other("mem transport inbox poisoned"))?
                        .0;
                }
            }
            self.shared.drain_notifications();
            std::mem::take(&mut *q)
        };
        while let Some(m) = batch.pop_front() {
            match m {
                Incoming::Accepted { link, identity } => {
                    let conn = link.local_conn;
                    self.links.insert(conn, link);
                    self.local.push(Event::Connected {
                        peer: conn,
                        identity,
                        inbound: true,
                    });
                }
                Incoming::Msg { conn, body } => {
                    if body.len() > self.max_msg {
                        // `send` refuses these; checked on receipt too, as every transport
                        // does.
                        let why = format!(
                            "protocol error: a control message of {} bytes (cap {})",
                            body.len(),
                            self.max_msg
                        );
                        self.close_link_as(conn, &why, Cause::Violation);
                    } else if self.links.contains_key(&conn) {
                        self.local.push(Event::Message { peer: conn, body });
                    }
                }
                Incoming::ReadReq { conn, op, slot } => self.serve_read(conn, op, slot),
                Incoming::ReadDone {
                    token,
                    slot,
                    result,
                } => {
                    // Only the answer to this very read: a failed read's token may be in
                    // use by a newer one already.
                    if self.reads.get(&token).is_some_and(|(_, s)| s.same(&slot)) {
                        self.reads.remove(&token);
                        self.local.push(Event::ReadDone { token, result });
                    }
                }
                Incoming::Closed { conn, reason } => self.close_link(conn, &reason, false),
            }
        }
        events.append(&mut self.local);
        Ok(())
    }

    fn waker(&self) -> Waker {
        let s = Arc::downgrade(&self.shared);
        Waker::new(move || {
            if let Some(s) = s.upgrade() {
                // Taking the lock orders the wake after any waiter's emptiness check.
                drop(s.inbox.lock());
                s.notify();
            }
        })
    }

    fn ready_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        Some(self.shared.notify_rx.as_fd())
    }

    fn has_work(&self) -> bool {
        // Events of calls made outside `poll` (a connect, a disconnect, a revoke) do not make
        // the descriptor readable.
        !self.local.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferroplasma_transport::conformance::{self, Harness, RegionAccess};

    struct H(MemNetwork);

    impl Harness for H {
        fn make(
            &mut self,
            cfg: TransportConfig,
            region_len: u64,
        ) -> (Box<dyn Transport>, Box<dyn RegionAccess>) {
            let r = Region::owned(usize::try_from(region_len).expect("region"));
            let t = MemTransport::new(&self.0, None, cfg, r.clone());
            (Box::new(t), Box::new(r))
        }
    }

    #[test]
    fn conformance() {
        conformance::run_all(&mut H(MemNetwork::new()));
    }

    /// A control message over the cap that reaches the inbox (only a buggy or hostile
    /// sender could put it there: `send` refuses it) is not delivered: the link is dropped
    /// as a protocol violation on both sides.
    #[test]
    fn oversized_control_message_received_drops_the_link() {
        let net = MemNetwork::new();
        let mut a = MemTransport::new(&net, None, cfg(1), Region::owned(4096));
        let mut b = MemTransport::new(&net, None, cfg(2), Region::owned(4096));
        a.connect(&b.local_addr());
        let pb = until(&mut b, "the connection", |e| match e {
            Event::Connected { peer, .. } => Some(*peer),
            _ => None,
        });
        let big = vec![1u8; b.max_control_msg() + 1];
        b.shared.push(Incoming::Msg {
            conn: pb,
            body: big,
        });
        let mut ev = Vec::new();
        let start = std::time::Instant::now();
        while !ev
            .iter()
            .any(|e| matches!(e, Event::Disconnected { peer, .. } if *peer == pb))
        {
            assert!(start.elapsed() < conformance::LIMIT, "the link was kept");
            b.poll(&mut ev, Some(Duration::from_millis(1)))
                .expect("poll");
        }
        assert!(
            !ev.iter().any(|e| matches!(e, Event::Message { .. })),
            "an oversized control message was delivered"
        );
    }

    /// mem ignores the chunk size and checksums it is asked for (a read is one copy), and
    /// says so.
    #[test]
    fn data_settings_are_ignored_and_reported() {
        let mut c = cfg(1);
        c.chunk = 1 << 16;
        c.set_checksum_mode(ferroplasma_transport::ChecksumMode::Keyed);
        let t = MemTransport::new(&MemNetwork::new(), None, c, Region::owned(4096));
        let got = t.data_settings();
        assert_eq!(got.chunk, None);
        assert_eq!(got.checksums, ferroplasma_transport::ChecksumMode::Off);
    }

    fn cfg(node_id: u64) -> TransportConfig {
        TransportConfig::new(Identity::new(node_id, String::new()), b"t".to_vec())
    }

    /// Polls `t` until `f` picks something out of its events, for at most
    /// [`conformance::LIMIT`].
    fn until<R>(t: &mut MemTransport, what: &str, mut f: impl FnMut(&Event) -> Option<R>) -> R {
        let start = std::time::Instant::now();
        let mut ev = Vec::new();
        loop {
            t.poll(&mut ev, Some(Duration::from_millis(1)))
                .expect("poll");
            if let Some(r) = ev.iter().find_map(&mut f) {
                return r;
            }
            ev.clear();
            assert!(start.elapsed() < conformance::LIMIT, "timed out: {what}");
        }
    }

    /// The reader gives up on a large read from another thread while the serving thread
    /// copies it (it disconnects, or drops its transport), reuses both ends of the
    /// destination at once, and after the serving side has finished nothing of the read
    /// landed there: `ReadDone` (or the drop) waits for a running copy.
    #[test]
    fn no_bytes_after_read_done_while_copying() {
        const LEN: usize = 32 << 20;
        const END: usize = 4096;
        for drop_reader in [false, true] {
            let net = MemNetwork::new();
            let (ra, rb) = (Region::owned(LEN), Region::owned(LEN));
            // SAFETY: nothing uses the fresh region yet.
            unsafe { rb.write(0, &vec![0xab; LEN]) };
            let mut a = MemTransport::new(&net, None, cfg(1), ra.clone());
            let mut b = MemTransport::new(&net, None, cfg(2), rb);
            let pa = a.connect(&b.local_addr());
            let pb = until(&mut b, "the connection", |e| match e {
                Event::Connected { peer, .. } => Some(*peer),
                _ => None,
            });
            // SAFETY: nothing writes b's region from here on.
            let g = unsafe { b.grant(pb, 0, LEN as u64) }.expect("grant");
            let shared = Arc::clone(&b.shared);
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let stop2 = Arc::clone(&stop);
            let server = std::thread::spawn(move || {
                let mut ev = Vec::new();
                while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                    b.poll(&mut ev, Some(Duration::from_millis(1)))
                        .expect("poll");
                    ev.clear();
                }
            });
            // SAFETY: the test touches a's region only after the read is over (its ReadDone,
            // or a's drop).
            unsafe {
                a.read(ReadOp {
                    token: 1,
                    peer: pa,
                    grant: g,
                    offset: 0,
                    local_offset: 0,
                    len: LEN as u64,
                })
            }
            .expect("read");
            let start = std::time::Instant::now();
            while shared.copies.load(std::sync::atomic::Ordering::Relaxed) == 0 {
                assert!(
                    start.elapsed() < conformance::LIMIT,
                    "the copy never started"
                );
                std::hint::spin_loop();
            }
            // The copy runs (or just ran) on the server's thread: give up on the read.
            if drop_reader {
                drop(a);
            } else {
                a.disconnect(pa);
                let r = until(&mut a, "the abandoned read's end", |e| match e {
                    Event::ReadDone { token: 1, result } => Some(result.clone()),
                    _ => None,
                });
                assert!(matches!(r, Err(ReadError::Aborted { .. })), "{r:?}");
            }
            let reused = vec![0x5c; END];
            // SAFETY: the read is over, so the range is the test's again.
            unsafe {
                ra.write(0, &reused);
                ra.write((LEN - END) as u64, &reused);
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            server.join().expect("server thread");
            assert!(
                ra.read(0, END) == reused && ra.read((LEN - END) as u64, END) == reused,
                "bytes of the read landed after it was over (drop_reader: {drop_reader})"
            );
        }
    }
}
