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
    Event, GrantId, Identity, PeerId, ReadError, ReadOp, RegionHandle, Transport, TransportConfig,
    TransportError, Waker,
};

pub use ferroplasma_region::Region;

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

    /// Closes the slot, waiting for a copy into the destination to finish.
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
        }
    }

    fn conn_id(&self) -> PeerId {
        self.shared
            .next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn nonce(&self) -> [u8; 32] {
        // Distinct per hand-shake; secrecy does not matter in-process.
        let mut n = [0u8; 32];
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(self.conn_id());
        let t = h.finish();
        n[..8].copy_from_slice(&t.to_le_bytes());
        n[8..16].copy_from_slice(&self.shared.identity.node_id.to_le_bytes());
        n
    }

    fn close_link(&mut self, conn: PeerId, reason: &str, tell_remote: bool) {
        let Some(link) = self.links.remove(&conn) else {
            return;
        };
        if tell_remote {
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
                result: Err(ReadError::PeerGone {
                    peer: conn,
                    reason: reason.to_string(),
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
        let granted = self.grants.values().any(|&(p, off, len)| {
            p == conn
                && op.remote_offset >= off
                && op
                    .remote_offset
                    .checked_add(op.len)
                    .is_some_and(|end| end <= off + len)
        });
        // SAFETY: the source range lies inside a live grant (checked just above), and nothing
        // in this process writes a granted range while granted (the `Region` contract). The
        // destination is the destination of a read whose slot this function holds open
        // (`open`): the reader's transport has not reported the read, so its user does not
        // touch the range (the `Transport::read` rule), and no other copy targets it (one
        // server serves a read, once).
        let copy = || unsafe {
            self.shared
                .region
                .copy_to(op.remote_offset, &remote.region, op.local_offset, op.len)
        };
        let result = if !granted {
            Err(ReadError::Refused {
                peer: link.local_conn,
                reason: format!(
                    "range {}+{} is not granted to this connection",
                    op.remote_offset, op.len
                ),
            })
        } else if copy() {
            Ok(())
        } else {
            Err(ReadError::Refused {
                peer: link.local_conn,
                reason: "range outside a region".into(),
            })
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

    fn connect(&mut self, addr: &str) -> PeerId {
        let conn = self.conn_id();
        let fail = |reason: String| Event::ConnectFailed {
            peer: conn,
            addr: addr.to_string(),
            reason,
        };
        let target = self
            .net
            .listeners
            .lock()
            .ok()
            .and_then(|l| l.get(addr).and_then(Weak::upgrade));
        let Some(remote) = target else {
            self.local
                .push(fail("connection refused: nobody listens there".into()));
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
            self.local.push(fail(e.to_string()));
            return conn;
        }
        let remote_conn = remote
            .next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
        if body.len() > ferroplasma_transport::frame::MAX_MSG {
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

    fn read(&mut self, op: ReadOp) -> Result<(), TransportError> {
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

    fn grant(&mut self, peer: PeerId, offset: u64, len: u64) -> Result<GrantId, TransportError> {
        self.region().check(offset, len)?;
        if !self.links.contains_key(&peer) {
            return Err(TransportError::NoPeer(peer));
        }
        let id = GrantId(self.next_grant);
        self.next_grant += 1;
        self.grants.insert(id, (peer, offset, len));
        Ok(id)
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
                    if self.links.contains_key(&conn) {
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
}
