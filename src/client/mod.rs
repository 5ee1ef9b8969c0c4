//! The client library: connect to the local node, create and seal objects in place, read
//! them with zero copies.
//!
//! A [`Client`] is `Send + Sync` and cheap to clone (it is an `Arc`). Requests from several
//! threads are serialised over the one ring pair, one in flight at a time: a `get` that waits
//! for an object holds up other threads' requests on the same client until it returns, so
//! give each thread that blocks its own client. Dropping an [`ObjectView`] never blocks: if
//! another thread is mid-request the release is queued and sent by that thread.

mod error;
mod view;

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_queue::SegQueue;

pub use error::{ConnectError, CreateError, GetError, RequestError, SealError};
pub use view::{ObjectBuilder, ObjectView};

use crate::id::{NodeId, ObjectId};
use crate::protocol::handshake::{self, Welcome, PROTOCOL_VERSION, WELCOME_LEN};
use crate::protocol::{
    decode_reply, DeleteStatus, ErrorReply, ListEntry, Reply, Request, Stats, Writer, MAX_IDS,
    MAX_LIST, MAX_RELEASES, NO_TIMEOUT,
};
use crate::ring::{Consumer, Producer, Segment};
use crate::shm::{fdpass, SharedMapping};

/// How a client waits and maps.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Fill the page tables of the whole arena at connect (`MAP_POPULATE`). Costs time at
    /// connect, saves page faults on the first touch of each page later. Off by default.
    pub populate: bool,
    /// How long to spin for a reply before sleeping on the futex.
    pub spin: Duration,
    /// How long `create` and `put` wait for room in a full store.
    pub create_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        let spin_us = std::env::var("FERROPLASMA_CLIENT_SPIN_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100);
        Self {
            populate: false,
            spin: Duration::from_micros(spin_us),
            create_timeout: Duration::from_secs(5),
        }
    }
}

/// A connection to the local node. See the module docs for threading.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    arena: SharedMapping,
    seg: Segment,
    conn: Mutex<Conn>,
    releases: SegQueue<u64>,
    doorbell: OwnedFd,
    sock: UnixStream,
    welcome: Welcome,
    next_id: AtomicU64,
    opts: ClientOptions,
    dead: AtomicBool,
    /// One bit per [`POPULATE_CHUNK`] of the arena whose page tables this process has filled.
    populated: Vec<AtomicU64>,
}

/// Granularity at which a client fills its page tables before large writes.
const POPULATE_CHUNK: u64 = 2 << 20;

#[derive(Debug)]
struct Conn {
    req: Producer,
    rep: Consumer,
    seq: u32,
    buf: Vec<u8>,
    w: Writer,
}

fn millis(t: Duration) -> u64 {
    if t >= Duration::from_secs(u64::MAX / 1000) {
        NO_TIMEOUT
    } else {
        u64::try_from(t.as_millis()).unwrap_or(NO_TIMEOUT - 1)
    }
}

impl Client {
    /// Connects with default options.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ConnectError> {
        Self::connect_with(path, ClientOptions::default())
    }

    /// Connects with the given options.
    pub fn connect_with(path: impl AsRef<Path>, opts: ClientOptions) -> Result<Self, ConnectError> {
        let path = path.as_ref();
        let sock_err = |source| ConnectError::Socket {
            path: path.to_path_buf(),
            source,
        };
        let hs_err = |reason: String| ConnectError::Handshake {
            path: path.to_path_buf(),
            reason,
        };
        let sock = UnixStream::connect(path).map_err(sock_err)?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(sock_err)?;
        sock.set_write_timeout(Some(Duration::from_secs(10)))
            .map_err(sock_err)?;
        std::io::Write::write_all(&mut &sock, &handshake::encode_hello(PROTOCOL_VERSION))
            .map_err(sock_err)?;
        let mut wbuf = [0u8; WELCOME_LEN];
        let fds = fdpass::recv_with_fds(&sock, &mut wbuf).map_err(|e| hs_err(e.to_string()))?;
        let welcome = Welcome::decode(&wbuf).map_err(|e| hs_err(e.to_string()))?;
        if welcome.status != 0 || welcome.version != PROTOCOL_VERSION {
            return Err(ConnectError::Version {
                path: path.to_path_buf(),
                node: welcome.version,
                client: PROTOCOL_VERSION,
            });
        }
        let [arena_fd, seg_fd, doorbell]: [OwnedFd; 3] = fds
            .try_into()
            .map_err(|v: Vec<OwnedFd>| hs_err(format!("expected 3 fds, got {}", v.len())))?;
        let len = |n: u64| usize::try_from(n).map_err(|_| hs_err(format!("size {n} does not fit")));
        let arena = SharedMapping::new(
            std::fs::File::from(arena_fd),
            len(welcome.arena_len)?,
            opts.populate,
        )
        .map_err(|e| hs_err(format!("mapping the arena: {e}")))?;
        let segmap =
            SharedMapping::new(std::fs::File::from(seg_fd), len(welcome.segment_len)?, true)
                .map_err(|e| hs_err(format!("mapping the control segment: {e}")))?;
        let seg = Segment::open(Arc::new(segmap)).map_err(|source| ConnectError::Segment {
            path: path.to_path_buf(),
            source,
        })?;
        let ring_err = || ConnectError::Segment {
            path: path.to_path_buf(),
            source: crate::ring::SegmentError::Corrupt,
        };
        let conn = Conn {
            req: seg.request_producer().ok_or_else(ring_err)?,
            rep: seg.reply_consumer().ok_or_else(ring_err)?,
            seq: 0,
            buf: Vec::with_capacity(4096),
            w: Writer::default(),
        };
        sock.set_nonblocking(true).map_err(sock_err)?;
        Ok(Self {
            inner: Arc::new(Inner {
                arena,
                seg,
                conn: Mutex::new(conn),
                releases: SegQueue::new(),
                doorbell,
                sock,
                welcome,
                next_id: AtomicU64::new(1),
                populated: (0..welcome.arena_len.div_ceil(POPULATE_CHUNK).div_ceil(64))
                    .map(|_| AtomicU64::new(if opts.populate { u64::MAX } else { 0 }))
                    .collect(),
                opts,
                dead: AtomicBool::new(false),
            }),
        })
    }

    /// The node this client talks to (the owner of the objects it creates).
    pub fn node_id(&self) -> NodeId {
        self.inner.welcome.node_id
    }

    /// Arena size in bytes.
    pub fn arena_len(&self) -> u64 {
        self.inner.welcome.arena_len
    }

    /// Whether hugepages back the arena.
    pub fn hugepages(&self) -> bool {
        self.inner.welcome.hugepages
    }

    /// Largest object that [`Client::put`] sends in one message.
    pub fn inline_threshold(&self) -> u64 {
        self.inner.welcome.inline_threshold
    }

    /// A fresh id owned by this node, unique without asking the node:
    /// `node id | client number | counter`.
    pub fn new_id(&self) -> ObjectId {
        let n = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut u = [0u8; 16];
        u[..8].copy_from_slice(&self.inner.welcome.client_id.to_be_bytes());
        u[8..].copy_from_slice(&n.to_be_bytes());
        ObjectId::new(self.node_id(), u)
    }

    /// An id of your choosing, owned by this node.
    pub fn id_with(&self, unique: [u8; 16]) -> ObjectId {
        ObjectId::new(self.node_id(), unique)
    }

    /// Stores `data` as a new sealed object and returns its fresh id.
    pub fn put(&self, data: &[u8]) -> Result<ObjectId, CreateError> {
        let id = self.new_id();
        self.put_with(id, data, &[])?;
        Ok(id)
    }

    /// Stores `data` and `metadata` under `id`. Objects up to the inline threshold travel in
    /// one message; larger ones are created, copied in place and sealed.
    pub fn put_with(&self, id: ObjectId, data: &[u8], metadata: &[u8]) -> Result<(), CreateError> {
        let total = data.len() as u64 + metadata.len() as u64;
        if total <= self.inline_threshold() {
            let req = Request::Put {
                id,
                data_len: data.len() as u64,
                timeout_ms: millis(self.inner.opts.create_timeout),
                payload: &[],
            };
            return match self.inner.call(&req, &[data, metadata])? {
                Ok(Reply::Done) => Ok(()),
                Ok(other) => {
                    Err(RequestError::Protocol(format!("put answered with {other:?}")).into())
                }
                Err(e) => Err(e.into()),
            };
        }
        let mut b = self.create_with(id, data.len() as u64, metadata.len() as u64)?;
        b.data_mut().copy_from_slice(data);
        b.metadata_mut().copy_from_slice(metadata);
        b.seal()?;
        Ok(())
    }

    /// Reserves a fresh object of `data_size` bytes to be written in place.
    pub fn create(&self, data_size: u64) -> Result<ObjectBuilder, CreateError> {
        self.create_with(self.new_id(), data_size, 0)
    }

    /// Reserves object `id` with `data_size` data bytes and `meta_size` metadata bytes.
    /// Write through the builder, then [`ObjectBuilder::seal`] it (dropping it aborts).
    pub fn create_with(
        &self,
        id: ObjectId,
        data_size: u64,
        meta_size: u64,
    ) -> Result<ObjectBuilder, CreateError> {
        let req = Request::Create {
            id,
            data_size,
            meta_size,
            timeout_ms: millis(self.inner.opts.create_timeout),
        };
        match self.inner.call(&req, &[])? {
            Ok(Reply::Created { offset }) => {
                let total = data_size.saturating_add(meta_size);
                if self.inner.arena.check_range(offset, total).is_none() {
                    return Err(RequestError::Protocol(format!(
                        "object {id} placed outside the arena"
                    ))
                    .into());
                }
                if total >= 1 << 20 {
                    self.inner.populate(offset, total);
                }
                Ok(ObjectBuilder::new(
                    self.inner.clone(),
                    id,
                    offset,
                    data_size,
                    meta_size,
                ))
            }
            Ok(other) => {
                Err(RequestError::Protocol(format!("create answered with {other:?}")).into())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Zero-copy views of `ids`, in order, once all are sealed. Waits up to `timeout`
    /// (`Duration::ZERO`: not at all; `Duration::MAX`: forever). On timeout the error names the
    /// ids that were not ready, and no view is returned.
    pub fn get(&self, ids: &[ObjectId], timeout: Duration) -> Result<Vec<ObjectView>, GetError> {
        check_ids(ids)?;
        let req = Request::Get {
            ids: ids.to_vec(),
            timeout_ms: millis(timeout),
        };
        match self.inner.call(&req, &[])? {
            Ok(Reply::Objects(locs)) if locs.len() == ids.len() => {
                let mut views = Vec::with_capacity(ids.len());
                for (id, loc) in ids.iter().zip(locs) {
                    // Constructed first so that its drop releases the pin even on error.
                    let v = ObjectView::new(self.inner.clone(), *id, loc);
                    if !v.in_bounds() {
                        return Err(RequestError::Protocol(format!(
                            "object {id} located outside the arena"
                        ))
                        .into());
                    }
                    views.push(v);
                }
                Ok(views)
            }
            Ok(other) => Err(RequestError::Protocol(format!("get answered with {other:?}")).into()),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether `id` is sealed on this node.
    pub fn contains(&self, id: &ObjectId) -> Result<bool, RequestError> {
        match self.inner.call(&Request::Contains { id: *id }, &[])? {
            Ok(Reply::Contains(b)) => Ok(b),
            Ok(other) => Err(RequestError::Protocol(format!(
                "contains answered with {other:?}"
            ))),
            Err(e) => Err(error::unexpected(e)),
        }
    }

    /// Deletes `ids`. A pinned object disappears at once and its memory is freed when its last
    /// view is dropped.
    pub fn delete(&self, ids: &[ObjectId]) -> Result<Vec<DeleteStatus>, RequestError> {
        check_ids(ids)?;
        match self
            .inner
            .call(&Request::Delete { ids: ids.to_vec() }, &[])?
        {
            Ok(Reply::Deleted(st)) if st.len() == ids.len() => Ok(st),
            Ok(other) => Err(RequestError::Protocol(format!(
                "delete answered with {other:?}"
            ))),
            Err(e) => Err(error::unexpected(e)),
        }
    }

    /// Waits until `num_ready` of `ids` are sealed or `timeout` passes, like `ray.wait`.
    /// Returns `(ready, not_ready)`, each in the order given. Pins nothing.
    pub fn wait(
        &self,
        ids: &[ObjectId],
        num_ready: usize,
        timeout: Duration,
    ) -> Result<(Vec<ObjectId>, Vec<ObjectId>), RequestError> {
        check_ids(ids)?;
        let req = Request::Wait {
            ids: ids.to_vec(),
            num_ready: u32::try_from(num_ready).unwrap_or(u32::MAX),
            timeout_ms: millis(timeout),
        };
        match self.inner.call(&req, &[])? {
            Ok(Reply::Ready(flags)) if flags.len() == ids.len() => {
                let (ready, not): (Vec<_>, Vec<_>) = ids.iter().zip(flags).partition(|(_, f)| *f);
                Ok((
                    ready.into_iter().map(|(id, _)| *id).collect(),
                    not.into_iter().map(|(id, _)| *id).collect(),
                ))
            }
            Ok(other) => Err(RequestError::Protocol(format!(
                "wait answered with {other:?}"
            ))),
            Err(e) => Err(error::unexpected(e)),
        }
    }

    /// Every object in the node (sealed and being created), in id order.
    pub fn list(&self) -> Result<Vec<ListEntry>, RequestError> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let req = Request::List {
                after,
                max: u32::try_from(MAX_LIST).unwrap_or(u32::MAX),
            };
            match self.inner.call(&req, &[])? {
                Ok(Reply::Listed { entries, more }) => {
                    after = entries.last().map(|e| e.id);
                    all.extend(entries);
                    if !more || after.is_none() {
                        return Ok(all);
                    }
                }
                Ok(other) => {
                    return Err(RequestError::Protocol(format!(
                        "list answered with {other:?}"
                    )))
                }
                Err(e) => return Err(error::unexpected(e)),
            }
        }
    }

    /// Node figures.
    pub fn stats(&self) -> Result<Stats, RequestError> {
        match self.inner.call(&Request::Stats, &[])? {
            Ok(Reply::Stats(s)) => Ok(s),
            Ok(other) => Err(RequestError::Protocol(format!(
                "stats answered with {other:?}"
            ))),
            Err(e) => Err(error::unexpected(e)),
        }
    }
}

impl Client {
    /// The cluster as the node sees it: the transport and every member with its state. A
    /// node without a cluster lists only itself.
    pub fn nodes(&self) -> Result<crate::protocol::ClusterView, RequestError> {
        match self.inner.call(&Request::Nodes, &[])? {
            Ok(Reply::Nodes(v)) => Ok(v),
            Ok(other) => Err(RequestError::Protocol(format!(
                "nodes answered with {other:?}"
            ))),
            Err(e) => Err(error::unexpected(e)),
        }
    }
}

/// How long a client spins for the answer to a get or wait of objects owned elsewhere.
const REMOTE_SPIN: Duration = Duration::from_micros(10);

fn check_ids(ids: &[ObjectId]) -> Result<(), RequestError> {
    if ids.len() > MAX_IDS {
        return Err(RequestError::TooManyIds {
            count: ids.len(),
            max: MAX_IDS,
        });
    }
    Ok(())
}

impl Inner {
    /// Fills this process's page tables for `offset..offset+len` once per chunk, so that a
    /// large copy into a new object runs at memory speed instead of taking a fault per page.
    /// Pages of a shared memfd stay mapped once mapped, so each chunk is done at most once.
    fn populate(&self, offset: u64, len: u64) {
        let first = offset / POPULATE_CHUNK;
        let last = (offset + len).div_ceil(POPULATE_CHUNK);
        for chunk in first..last {
            let (word, bit) = ((chunk / 64) as usize, chunk % 64);
            let Some(w) = self.populated.get(word) else {
                return;
            };
            if w.load(Ordering::Relaxed) & (1 << bit) != 0 {
                continue;
            }
            let start = chunk * POPULATE_CHUNK;
            let end = (start + POPULATE_CHUNK).min(self.arena.len() as u64);
            self.arena.prefault_write(start, end - start);
            w.fetch_or(1 << bit, Ordering::Relaxed);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Conn> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends `req` (with `extra` appended to its encoding) and waits for its reply.
    fn call(
        &self,
        req: &Request<'_>,
        extra: &[&[u8]],
    ) -> Result<Result<Reply, ErrorReply>, RequestError> {
        if self.dead.load(Ordering::Relaxed) {
            return Err(RequestError::Disconnected);
        }
        let mut conn = self.lock();
        self.flush_releases(&mut conn)?;
        conn.seq = conn.seq.wrapping_add(1);
        let seq = conn.seq;
        let mut w = std::mem::take(&mut conn.w);
        w.buf.clear();
        req.encode(seq, &mut w);
        let mut parts: Vec<&[u8]> = Vec::with_capacity(1 + extra.len());
        parts.push(&w.buf);
        parts.extend_from_slice(extra);
        let pushed = self.push(&mut conn, &parts);
        conn.w = w;
        pushed?;
        // A get or wait of objects owned by another node usually crosses the network: spin
        // only long enough to catch a local copy, then leave the CPU to the nodes (on a
        // machine with few cores a spinning client delays the very answer it waits for).
        let foreign = match req {
            Request::Get { ids, .. } | Request::Wait { ids, .. } => {
                ids.iter().any(|id| id.owner() != self.welcome.node_id)
            }
            _ => false,
        };
        let spin = if foreign {
            self.opts.spin.min(REMOTE_SPIN)
        } else {
            self.opts.spin
        };
        let result = self.await_reply(&mut conn, seq, req.op(), spin);
        if let Err(RequestError::Protocol(_)) = &result {
            // Replies and requests are out of step (or the rings are broken): no later reply
            // on this connection could be trusted.
            self.dead.store(true, Ordering::Relaxed);
        }
        drop(conn);
        self.after_unlock();
        result
    }

    fn push(&self, conn: &mut Conn, parts: &[&[u8]]) -> Result<(), RequestError> {
        let started = Instant::now();
        loop {
            match conn.req.try_push(parts) {
                Ok(true) => break,
                Ok(false) => {
                    self.kick();
                    if started.elapsed() > Duration::from_millis(10) {
                        self.check_alive()?;
                        std::thread::sleep(Duration::from_micros(50));
                    } else {
                        std::thread::yield_now();
                    }
                }
                Err(e) => return Err(RequestError::Protocol(e.to_string())),
            }
        }
        self.kick();
        Ok(())
    }

    /// Wakes the daemon if it said it sleeps.
    fn kick(&self) {
        if self.seg.daemon_sleeping() {
            let _ = rustix::io::write(self.doorbell.as_fd(), &1u64.to_ne_bytes());
        }
    }

    /// Wakes the daemon if it waits for room in our reply ring (we just made some).
    fn kick_if_room_wanted(&self) {
        if self.seg.reply_room_wanted_fenced() {
            let _ = rustix::io::write(self.doorbell.as_fd(), &1u64.to_ne_bytes());
        }
    }

    fn await_reply(
        &self,
        conn: &mut Conn,
        seq: u32,
        op: crate::protocol::Op,
        spin: Duration,
    ) -> Result<Result<Reply, ErrorReply>, RequestError> {
        let spin_until = Instant::now() + spin;
        let mut spins = 0u32;
        let mut last_check = Instant::now();
        loop {
            let mut buf = std::mem::take(&mut conn.buf);
            let got = conn.rep.pop(&mut buf);
            let popped = matches!(got, Ok(true));
            let res = match got {
                Ok(true) => {
                    Some(decode_reply(&buf).map_err(|e| RequestError::Protocol(e.to_string())))
                }
                Ok(false) => None,
                Err(e) => Some(Err(RequestError::Protocol(e.to_string()))),
            };
            conn.buf = buf;
            if popped {
                // A node that stopped taking our requests for want of reply room waits for
                // this doorbell.
                self.kick_if_room_wanted();
            }
            if let Some(r) = res {
                let (rop, rseq, reply) = r?;
                if rseq != seq || rop != op {
                    return Err(RequestError::Protocol(format!(
                        "reply {rop:?}#{rseq} does not match request {op:?}#{seq}"
                    )));
                }
                return Ok(reply);
            }
            spins += 1;
            if Instant::now() < spin_until {
                if spins % 64 == 0 {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            // Sleep on the futex, in slices so that queued releases go out and a dead node is
            // noticed.
            let seen = self.seg.client_futex_value();
            self.seg.set_client_sleeping(true);
            // SYNC POINT: pairs with the node's fence between publishing a reply and reading
            // `client_sleeping` (Segment::wake_client).
            std::sync::atomic::fence(Ordering::SeqCst);
            if !conn.rep.has_data() {
                self.seg.client_wait(seen, Duration::from_millis(10));
            }
            self.seg.set_client_sleeping(false);
            self.flush_releases(conn)?;
            // Cheap insurance against a lost doorbell: it only writes if the node sleeps.
            self.kick();
            if last_check.elapsed() >= Duration::from_millis(100) {
                last_check = Instant::now();
                self.check_alive()?;
            }
        }
    }

    /// The node never writes to the socket after the welcome: readable or hung up means it is
    /// gone.
    fn check_alive(&self) -> Result<(), RequestError> {
        use rustix::event::{poll, PollFd, PollFlags};
        let mut fds = [PollFd::new(&self.sock, PollFlags::IN | PollFlags::RDHUP)];
        let zero = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        match poll(&mut fds, Some(&zero)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => Ok(()),
            Ok(_) if fds[0].revents().is_empty() => Ok(()),
            _ => {
                self.dead.store(true, Ordering::Relaxed);
                Err(RequestError::Disconnected)
            }
        }
    }

    /// Sends queued releases (the caller holds the connection).
    fn flush_releases(&self, conn: &mut Conn) -> Result<(), RequestError> {
        while !self.releases.is_empty() {
            let mut handles = Vec::new();
            while handles.len() < MAX_RELEASES {
                match self.releases.pop() {
                    Some(h) => handles.push(h),
                    None => break,
                }
            }
            if handles.is_empty() {
                break;
            }
            let mut w = Writer::default();
            Request::Release { handles }.encode(0, &mut w);
            self.push(conn, &[&w.buf])?;
        }
        Ok(())
    }

    /// Queued releases may have arrived while we held the lock; send them if nobody else
    /// holds it now (whoever does will send them).
    fn after_unlock(&self) {
        // SYNC POINT: pairs with itself as called from `release` between its push and its
        // try_lock: either the lock holder sees the handle here, or the releasing thread's
        // try_lock sees the unlock and sends it.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.releases.is_empty() {
            return;
        }
        if let Ok(mut conn) = self.conn.try_lock() {
            let _ = self.flush_releases(&mut conn);
        }
    }

    /// Drops a pin. Never blocks on another thread's request.
    fn release(&self, handle: u64) {
        if self.dead.load(Ordering::Relaxed) {
            return;
        }
        self.releases.push(handle);
        self.after_unlock();
    }
}
