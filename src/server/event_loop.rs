//! The daemon's event loop thread and the hand-shake threads that feed it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_queue::SegQueue;
use rustix::event::epoll::{self, EventData, EventFlags};
use rustix::event::{eventfd, EventfdFlags};
use rustix::fs::{MemfdFlags, SealFlags};

use super::NodeConfig;
use crate::cluster::ClusterHandle;
use crate::id::NodeId;
use crate::protocol::handshake::{self, Welcome, HELLO_LEN, PROTOCOL_VERSION};
use crate::protocol::{encode_reply, Request, Writer};
use crate::ring::{Consumer, Producer, Segment};
use crate::shm::SharedMapping;
use crate::spill::worker::{Done, Job, SpillWorker};
use crate::store::link::{ToCluster, CLUSTER_CLIENT};
use crate::store::{ClientId, Core, CoreConfig, Outgoing, Table};

/// Room a reply ring must have before we take another request from that client: the largest
/// reply (a full get or list) plus a possible wrap-around pad.
pub(super) const REPLY_RESERVE: u64 = 2 * (32 * crate::protocol::MAX_IDS as u64 + 64);
/// Requests taken from one client per turn before looking at the next: every client with
/// requests gets this budget in each turn of the loop, so one busy client cannot starve others.
const BATCH: usize = 64;
/// During sustained activity, look at sockets (hang-ups, new clients) this often.
const EPOLL_EVERY: Duration = Duration::from_millis(1);
/// While this node waits for a peer's answer (a lookup, a pin) and no object bytes are
/// moving, the loop spins this long after the last activity (a remote round trip is longer
/// than the usual spin; sleeping would add a wake-up).
const PULL_SPIN: Duration = Duration::from_micros(500);
/// Hand-shakes in progress at once; more connections wait in the listen backlog.
const MAX_HANDSHAKES: usize = 32;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

const KEY_WAKE: u64 = 0;
/// The cluster transport's readiness descriptor (client keys never reach this value).
const KEY_CLUSTER: u64 = u64::MAX;
const KEY_LISTENER: u64 = 1;
const KIND_SOCK: u64 = 2;
const KIND_DOORBELL: u64 = 3;

fn key(client: ClientId, kind: u64) -> u64 {
    (client << 2) | kind
}

struct Conn {
    id: ClientId,
    sock: UnixStream,
    seg: Segment,
    req: Consumer,
    rep: Producer,
    doorbell: OwnedFd,
    wake: bool,
    broken: bool,
    /// Its reply ring lacks room for the largest reply: no requests are taken from it, and
    /// its waiting requests neither keep the loop spinning nor stop it sleeping, until the
    /// ring has room again (the client rings the doorbell after reading replies while
    /// `reply_room_wanted` is set). A client that never reads is served no more, and its
    /// hang-up is still seen.
    parked: bool,
}

struct Shared {
    cfg: NodeConfig,
    node_id: NodeId,
    arena: Arc<SharedMapping>,
    hugepages: bool,
    next_client: AtomicU64,
    handshakes: AtomicUsize,
    ready: SegQueue<Conn>,
    wake: Arc<OwnedFd>,
}

pub(super) struct EventLoop {
    shared: Arc<Shared>,
    listener: UnixListener,
    listener_paused: bool,
    epoll: OwnedFd,
    shutdown: Arc<AtomicBool>,
    core: Core<Arc<SharedMapping>>,
    conns: HashMap<ClientId, Conn>,
    spill: Option<SpillThread>,
    cluster: Option<ClusterHandle>,
}

struct SpillThread {
    jobs: std::sync::mpsc::Sender<Job>,
    done: Arc<SegQueue<Done>>,
    thread: std::thread::JoinHandle<()>,
}

impl EventLoop {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        cfg: NodeConfig,
        node_id: NodeId,
        arena: Arc<SharedMapping>,
        hugepages: bool,
        listener: UnixListener,
        wake: Arc<OwnedFd>,
        shutdown: Arc<AtomicBool>,
        cluster: Option<ClusterHandle>,
    ) -> io::Result<Self> {
        let size = arena.len() as u64;
        let mut core = Core::new(
            Table::new(node_id, size),
            arena.clone(),
            CoreConfig {
                inline_threshold: cfg.inline_threshold,
                hugepages,
                max_pending_per_client: cfg.max_pending_per_client,
                spill: cfg.spill.as_ref().map(|s| s.policy),
                cluster: cluster.is_some(),
            },
        );
        let spill = match &cfg.spill {
            None => None,
            Some(sc) => {
                let io: Box<dyn crate::spill::SpillIo + Send> = match sc.engine {
                    super::SpillEngine::Uring => match crate::spill::UringIo::new(sc.queue_depth) {
                        Ok(mut u) => {
                            let started = Instant::now();
                            // SAFETY: the engine goes into the spill worker, which also holds
                            // an Arc of the arena mapping and drops the engine first (field
                            // order), so the arena stays mapped while it is registered.
                            match unsafe { u.register_region(arena.as_ptr(), arena.len()) } {
                                Ok(()) => tracing::info!(
                                    ms = started.elapsed().as_millis(),
                                    "arena registered as io_uring fixed buffers"
                                ),
                                Err(e) => tracing::warn!(
                                    error = %e,
                                    "cannot register the arena as io_uring fixed buffers; spilling without"
                                ),
                            }
                            Box::new(u)
                        }
                        // Containers and hardened kernels may forbid io_uring.
                        Err(e) if io_uring_forbidden(&e) => {
                            tracing::warn!(error = %e, "io_uring is not available; spilling with pread/pwrite");
                            Box::new(crate::spill::PlainIo)
                        }
                        Err(e) => return Err(e),
                    },
                    super::SpillEngine::Plain => Box::new(crate::spill::PlainIo),
                };
                core.set_spill_engine(io.engine());
                let worker =
                    SpillWorker::new(io, arena.clone(), node_id, sc.dirs.clone(), sc.file_size);
                let (tx, rx) = std::sync::mpsc::channel();
                let done = Arc::new(SegQueue::new());
                let (done2, wake2) = (done.clone(), wake.clone());
                let thread =
                    std::thread::Builder::new()
                        .name("fp-spill".into())
                        .spawn(move || {
                            worker.run(rx, done2, move || {
                                let _ = rustix::io::write(wake2.as_fd(), &1u64.to_ne_bytes());
                            });
                        })?;
                Some(SpillThread {
                    jobs: tx,
                    done,
                    thread,
                })
            }
        };
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        epoll::add(
            &epoll,
            wake.as_fd(),
            EventData::new_u64(KEY_WAKE),
            EventFlags::IN,
        )?;
        epoll::add(
            &epoll,
            &listener,
            EventData::new_u64(KEY_LISTENER),
            EventFlags::IN,
        )?;
        // The transport lives as long as this event loop, which drops it after its last
        // epoll wait.
        if let Some(fd) = cluster.as_ref().and_then(ClusterHandle::ready_fd) {
            epoll::add(&epoll, fd, EventData::new_u64(KEY_CLUSTER), EventFlags::IN)?;
        }
        Ok(Self {
            shared: Arc::new(Shared {
                cfg,
                node_id,
                arena,
                hugepages,
                next_client: AtomicU64::new(1),
                handshakes: AtomicUsize::new(0),
                ready: SegQueue::new(),
                wake,
            }),
            listener,
            listener_paused: false,
            epoll,
            shutdown,
            core,
            conns: HashMap::new(),
            spill,
            cluster,
        })
    }

    pub(super) fn run(mut self) {
        let spin = self.shared.cfg.spin;
        let mut buf = Vec::with_capacity(64 << 10);
        let mut out: Vec<Outgoing> = Vec::new();
        let mut w = Writer::default();
        let mut last_active = Instant::now();
        let mut last_epoll = last_active;
        while !self.shutdown.load(Ordering::Relaxed) {
            let mut active = self.adopt_new_clients();
            let now = Instant::now();
            for conn in self.conns.values_mut() {
                active |= serve(conn, &mut self.core, &mut buf, &mut w, now, &mut out);
            }
            active |= self.spill_answers(now, &mut out);
            // Answering peers does not keep the loop spinning (with few cores a node that
            // spins after answering takes the CPU the asking node needs); waiting for our own
            // pulls, and moving object bytes, do (below).
            let cluster_active = self.cluster_answers(now, &mut out);
            let moving = self
                .cluster
                .as_ref()
                .is_some_and(ClusterHandle::transferring);
            let awaiting = self.core.awaiting_cluster();
            active |= cluster_active && (moving || awaiting);
            if self.core.next_deadline().is_some_and(|d| d <= now) {
                self.core.tick(now, &mut out);
            }
            if !out.is_empty() {
                self.deliver(&mut out, &mut w);
            }
            self.wake_clients();
            self.drop_broken(now, &mut out);
            self.send_jobs();
            self.send_cluster_jobs();
            if active {
                last_active = now;
            }
            // Spin longer only while waiting for a small answer from a peer; while object
            // bytes move, the kernel's network work and io_uring's workers need the CPU.
            let spin_for = if awaiting && !moving {
                spin.max(PULL_SPIN)
            } else {
                spin
            };
            if now.duration_since(last_active) < spin_for {
                if now.duration_since(last_epoll) >= EPOLL_EVERY {
                    last_epoll = now;
                    self.poll_events(Some(Duration::ZERO));
                }
                std::hint::spin_loop();
                continue;
            }
            // Idle: announce sleep, look once more (a request may have raced the
            // announcement), then sleep until kicked, a socket event, or a deadline.
            for c in self.conns.values() {
                c.seg.set_daemon_sleeping(true);
            }
            // SYNC POINT: pairs with the client's fence between publishing a request and
            // reading `daemon_sleeping` (Segment::daemon_sleeping): either it sees our flag and
            // kicks the doorbell, or we see its request below.
            std::sync::atomic::fence(Ordering::SeqCst);
            let raced = self.conns.values().any(|c| !c.parked && c.req.has_data())
                || !self.shared.ready.is_empty()
                || self.spill.as_ref().is_some_and(|s| !s.done.is_empty())
                || self
                    .cluster
                    .as_ref()
                    .is_some_and(|c| !c.to_core.is_empty() || c.has_work());
            if !raced {
                let deadline = match (&self.cluster, self.core.next_deadline()) {
                    (Some(c), Some(d)) => Some(d.min(c.next_deadline())),
                    (Some(c), None) => Some(c.next_deadline()),
                    (None, d) => d,
                };
                let mut timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                if let Some(c) = &mut self.cluster {
                    if c.ready_fd().is_none() {
                        // A transport we cannot watch: look at it often.
                        timeout = Some(timeout.unwrap_or(EPOLL_EVERY).min(EPOLL_EVERY));
                        c.wait(Duration::ZERO);
                    }
                }
                self.poll_events(timeout);
                last_epoll = Instant::now();
            } else if now.duration_since(last_epoll) >= EPOLL_EVERY {
                // However often requests race the announcement, sockets (hang-ups, new
                // clients) are looked at.
                last_epoll = now;
                self.poll_events(Some(Duration::ZERO));
            }
            for c in self.conns.values() {
                c.seg.set_daemon_sleeping(false);
            }
            last_active = Instant::now();
        }
        let now = Instant::now();
        let ids: Vec<ClientId> = self.conns.keys().copied().collect();
        for id in ids {
            self.disconnect(id, now, &mut out);
        }
        // Dropping the cluster side closes its connections.
        drop(self.cluster.take());
        if let Some(s) = self.spill.take() {
            // Closing the job channel ends the spill thread, which removes its files.
            drop(s.jobs);
            let _ = s.thread.join();
        }
        let _ = std::fs::remove_file(&self.shared.cfg.socket);
        tracing::info!(socket = %self.shared.cfg.socket.display(), "node stopped");
    }

    /// Feeds the spill thread's answers to the core. Returns whether there were any.
    fn spill_answers(&mut self, now: Instant, out: &mut Vec<Outgoing>) -> bool {
        let Some(s) = &self.spill else { return false };
        let mut any = false;
        while let Some(d) = s.done.pop() {
            any = true;
            match d {
                Done::Spilled { handle, result } => self.core.spill_done(handle, result, now, out),
                Done::Restored { handle, result } => {
                    self.core.restore_done(handle, result, now, out)
                }
            }
        }
        any
    }

    /// Steps the cluster side (network in, the core's work out) and feeds its messages to
    /// the core. Returns whether anything happened.
    fn cluster_answers(&mut self, now: Instant, out: &mut Vec<Outgoing>) -> bool {
        let Some(c) = &mut self.cluster else {
            return false;
        };
        c.send(self.core.take_cluster_jobs());
        let mut any = c.step();
        while let Some(m) = c.to_core.pop() {
            any = true;
            self.core.cluster_event(m, now, out);
        }
        any
    }

    /// Hands the core's cluster work (and replies to the cluster side) over.
    fn send_cluster_jobs(&mut self) {
        let Some(c) = &self.cluster else { return };
        c.send(self.core.take_cluster_jobs());
    }

    /// Hands the core's disk work to the spill thread.
    fn send_jobs(&mut self) {
        let jobs = self.core.take_jobs();
        if jobs.is_empty() {
            return;
        }
        let Some(s) = &self.spill else { return };
        for j in jobs {
            if s.jobs.send(j).is_err() {
                tracing::error!("the spill thread is gone");
                break;
            }
        }
    }

    fn adopt_new_clients(&mut self) -> bool {
        let mut any = false;
        while let Some(conn) = self.shared.ready.pop() {
            any = true;
            let id = conn.id;
            let reg = epoll::add(
                &self.epoll,
                &conn.sock,
                EventData::new_u64(key(id, KIND_SOCK)),
                EventFlags::IN | EventFlags::RDHUP | EventFlags::HUP,
            )
            .and_then(|()| {
                epoll::add(
                    &self.epoll,
                    conn.doorbell.as_fd(),
                    EventData::new_u64(key(id, KIND_DOORBELL)),
                    EventFlags::IN,
                )
            });
            if let Err(e) = reg {
                tracing::warn!(client = id, error = %e, "cannot watch client; dropping it");
                continue;
            }
            self.core.connect(id);
            tracing::debug!(client = id, "client connected");
            self.conns.insert(id, conn);
        }
        any
    }

    fn deliver(&mut self, out: &mut Vec<Outgoing>, w: &mut Writer) {
        for o in out.drain(..) {
            if o.client == CLUSTER_CLIENT {
                if let Some(c) = &self.cluster {
                    c.send([ToCluster::Reply(o)]);
                }
                continue;
            }
            let Some(conn) = self.conns.get_mut(&o.client) else {
                continue;
            };
            push_reply(conn, &o, w);
        }
    }

    fn wake_clients(&mut self) {
        for c in self.conns.values_mut() {
            if std::mem::take(&mut c.wake) {
                c.seg.wake_client();
            }
        }
    }

    fn drop_broken(&mut self, now: Instant, out: &mut Vec<Outgoing>) {
        if !self.conns.values().any(|c| c.broken) {
            return;
        }
        let broken: Vec<ClientId> = self
            .conns
            .values()
            .filter(|c| c.broken)
            .map(|c| c.id)
            .collect();
        for id in broken {
            self.disconnect(id, now, out);
        }
    }

    fn disconnect(&mut self, id: ClientId, now: Instant, out: &mut Vec<Outgoing>) {
        let Some(conn) = self.conns.remove(&id) else {
            return;
        };
        let _ = epoll::delete(&self.epoll, &conn.sock);
        let _ = epoll::delete(&self.epoll, conn.doorbell.as_fd());
        self.core.disconnect(id, now, out);
        self.resume_listener();
        tracing::debug!(client = id, "client disconnected");
        // Freed memory may have completed other clients' parked creates.
        let mut w = Writer::default();
        self.deliver(out, &mut w);
        self.wake_clients();
    }

    fn poll_events(&mut self, timeout: Option<Duration>) {
        let mut events = Vec::with_capacity(64);
        let ts = timeout.map(|t| rustix::time::Timespec {
            tv_sec: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(t.subsec_nanos()),
        });
        match epoll::wait(
            &self.epoll,
            rustix::buffer::spare_capacity(&mut events),
            ts.as_ref(),
        ) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return,
            Err(e) => {
                tracing::error!(error = %e, "epoll_wait failed");
                std::thread::sleep(Duration::from_millis(10));
                return;
            }
        }
        for ev in events {
            let k = ev.data.u64();
            match k {
                KEY_WAKE => {
                    drain_eventfd(self.shared.wake.as_fd());
                    self.resume_listener();
                }
                KEY_LISTENER => self.accept_all(),
                // The next turn steps the cluster side.
                KEY_CLUSTER => {}
                _ => {
                    let id = k >> 2;
                    let Some(conn) = self.conns.get_mut(&id) else {
                        continue;
                    };
                    if k & 3 == KIND_DOORBELL {
                        drain_eventfd(conn.doorbell.as_fd());
                        continue;
                    }
                    // Nothing may arrive on the socket after the hello: readable means the
                    // client closed it, died, or broke the protocol. Any of them ends it.
                    let mut b = [0u8; 64];
                    match (&conn.sock).read(&mut b) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Ok(n) if n > 0 => {
                            tracing::warn!(
                                client = id,
                                "client wrote to its socket after the hand-shake; dropping it"
                            );
                            conn.broken = true;
                        }
                        _ => conn.broken = true,
                    }
                }
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            let busy = self.shared.handshakes.load(Ordering::Acquire);
            let clients = self.conns.len() + self.shared.ready.len();
            if busy >= MAX_HANDSHAKES || clients + busy >= self.shared.cfg.max_clients {
                // Leave further connections in the listen backlog until a slot frees up
                // (every finished hand-shake kicks the wake eventfd).
                if !self.listener_paused {
                    tracing::warn!(
                        clients = self.conns.len(),
                        handshakes = busy,
                        "client limit reached; new connections wait"
                    );
                    let _ = epoll::delete(&self.epoll, &self.listener);
                    self.listener_paused = true;
                }
                return;
            }
            match self.listener.accept() {
                Ok((stream, _)) => {
                    self.shared.handshakes.fetch_add(1, Ordering::AcqRel);
                    let shared = self.shared.clone();
                    let spawned = std::thread::Builder::new()
                        .name("fp-handshake".into())
                        .spawn(move || {
                            match handshake_client(&shared, stream) {
                                Ok(conn) => shared.ready.push(conn),
                                Err(e) => tracing::info!(error = %e, "hand-shake failed"),
                            }
                            shared.handshakes.fetch_sub(1, Ordering::AcqRel);
                            let _ = rustix::io::write(shared.wake.as_fd(), &1u64.to_ne_bytes());
                        });
                    if spawned.is_err() {
                        self.shared.handshakes.fetch_sub(1, Ordering::AcqRel);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    return;
                }
            }
        }
    }

    /// Watches the listener again once hand-shake slots and client slots are free.
    fn resume_listener(&mut self) {
        if !self.listener_paused {
            return;
        }
        let busy = self.shared.handshakes.load(Ordering::Acquire);
        let clients = self.conns.len() + self.shared.ready.len();
        if busy < MAX_HANDSHAKES && clients + busy < self.shared.cfg.max_clients {
            let added = epoll::add(
                &self.epoll,
                &self.listener,
                EventData::new_u64(KEY_LISTENER),
                EventFlags::IN,
            );
            if added.is_ok() {
                self.listener_paused = false;
                self.accept_all();
            }
        }
    }
}

/// Takes up to [`BATCH`] requests from one client. Returns whether any was taken.
fn serve(
    conn: &mut Conn,
    core: &mut Core<Arc<SharedMapping>>,
    buf: &mut Vec<u8>,
    w: &mut Writer,
    now: Instant,
    out: &mut Vec<Outgoing>,
) -> bool {
    if conn.broken {
        return false;
    }
    if conn.parked {
        // Reading the consumer's head is cheap; its doorbell is what wakes a sleeping loop.
        if !reply_room(conn) {
            return false;
        }
        conn.parked = false;
        conn.seg.set_reply_room_wanted(false);
    }
    let mut n = 0;
    loop {
        // Replies to this client go into its ring at once, so that the room check sees
        // them; replies to others (completed parked requests) wait in `out`.
        push_own_replies(conn, out, w);
        if n >= BATCH || conn.broken || (conn.req.has_data() && park(conn)) {
            break;
        }
        match conn.req.pop(buf) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                tracing::warn!(client = conn.id, error = %e, "request ring corrupt; dropping client");
                conn.broken = true;
                break;
            }
        }
        n += 1;
        match Request::decode(buf) {
            Ok((seq, req)) => core.handle(conn.id, seq, req, now, out),
            Err(e) => {
                // A reply needs a known op and a sequence number; without them (or for a
                // release, which has no reply) the only answer is to hang up.
                let header = buf.get(..8).and_then(|h| {
                    let op = crate::protocol::Op::try_from(h[0]).ok()?;
                    (op != crate::protocol::Op::Release)
                        .then(|| (op, u32::from_le_bytes([h[4], h[5], h[6], h[7]])))
                });
                tracing::debug!(client = conn.id, error = %e, "malformed request");
                match header {
                    Some((op, seq)) => out.push(Outgoing {
                        client: conn.id,
                        op,
                        seq,
                        reply: Err(crate::protocol::ErrorReply::Invalid(e.to_string())),
                    }),
                    None => {
                        tracing::warn!(client = conn.id, error = %e, "undecodable request; dropping client");
                        conn.broken = true;
                        break;
                    }
                }
            }
        }
    }
    n > 0
}

/// Whether `conn`, which has a request waiting, must wait because its reply ring lacks room
/// for the largest reply; if so it is parked and told to ring the doorbell once it has read
/// replies.
fn park(conn: &mut Conn) -> bool {
    if reply_room(conn) {
        return false;
    }
    if conn.broken {
        return true;
    }
    conn.seg.set_reply_room_wanted(true);
    // SYNC POINT: pairs with the client's fence between storing its reply ring's head and
    // reading `reply_room_wanted` (Segment::reply_room_wanted): either it sees the flag and
    // rings, or we see the room it made here.
    std::sync::atomic::fence(Ordering::SeqCst);
    if reply_room(conn) {
        conn.seg.set_reply_room_wanted(false);
        return false;
    }
    conn.parked = !conn.broken;
    true
}

/// Whether `conn`'s reply ring has room for the largest reply. A head the client corrupted
/// marks it broken (and reads as no room).
fn reply_room(conn: &mut Conn) -> bool {
    match conn.rep.check_room(REPLY_RESERVE) {
        Ok(room) => room,
        Err(e) => {
            tracing::warn!(client = conn.id, error = %e, "reply ring corrupt; dropping client");
            conn.broken = true;
            false
        }
    }
}

fn push_own_replies(conn: &mut Conn, out: &mut Vec<Outgoing>, w: &mut Writer) {
    let mut i = 0;
    while i < out.len() {
        if out[i].client == conn.id {
            let o = out.remove(i);
            push_reply(conn, &o, w);
        } else {
            i += 1;
        }
    }
}

fn push_reply(conn: &mut Conn, o: &Outgoing, w: &mut Writer) {
    w.buf.clear();
    encode_reply(o.op, o.seq, &o.reply, w);
    match conn.rep.try_push(&[&w.buf]) {
        Ok(true) => conn.wake = true,
        Ok(false) => {
            tracing::warn!(
                client = conn.id,
                "reply ring full: client does not read its replies; dropping it"
            );
            conn.broken = true;
        }
        Err(e) => {
            tracing::warn!(client = conn.id, error = %e, "reply ring corrupt; dropping client");
            conn.broken = true;
        }
    }
}

fn io_uring_forbidden(e: &io::Error) -> bool {
    use rustix::io::Errno;
    [Errno::NOSYS, Errno::PERM]
        .map(Errno::raw_os_error)
        .iter()
        .any(|&c| e.raw_os_error() == Some(c))
}

fn drain_eventfd(fd: std::os::fd::BorrowedFd<'_>) {
    let mut b = [0u8; 8];
    let _ = rustix::io::read(fd, &mut b);
}

fn handshake_client(shared: &Shared, mut stream: UnixStream) -> io::Result<Conn> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    // One deadline for the whole hello, not per read: a client trickling bytes cannot hold a
    // hand-shake slot for longer than HANDSHAKE_TIMEOUT.
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut hello = [0u8; HELLO_LEN];
    let mut got = 0;
    while got < HELLO_LEN {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "hello not received in time",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut hello[got..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let version = handshake::decode_hello(&hello)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let layout = shared.cfg.segment;
    let mut welcome = Welcome {
        version: PROTOCOL_VERSION,
        status: 0,
        node_id: shared.node_id,
        client_id: 0,
        arena_len: shared.arena.len() as u64,
        segment_len: layout.total_len(),
        inline_threshold: shared.cfg.inline_threshold,
        hugepages: shared.hugepages,
        spin_us: u32::try_from(shared.cfg.spin.as_micros()).unwrap_or(u32::MAX),
    };
    if version != PROTOCOL_VERSION {
        welcome.status = 1;
        let _ = stream.write_all(&welcome.encode());
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("client speaks protocol {version}, node speaks {PROTOCOL_VERSION}"),
        ));
    }
    let id = shared.next_client.fetch_add(1, Ordering::Relaxed);
    welcome.client_id = id;
    let segfd = rustix::fs::memfd_create(
        "ferroplasma-client",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    rustix::fs::ftruncate(&segfd, layout.total_len())?;
    rustix::fs::fcntl_add_seals(
        &segfd,
        SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
    )?;
    let len =
        usize::try_from(layout.total_len()).map_err(|_| io::Error::other("segment too large"))?;
    let map = Arc::new(SharedMapping::new(File::from(segfd), len, true)?);
    let seg = Segment::init(map.clone(), layout).ok_or_else(|| io::Error::other("segment init"))?;
    let req = seg
        .request_consumer()
        .ok_or_else(|| io::Error::other("request ring"))?;
    let rep = seg
        .reply_producer()
        .ok_or_else(|| io::Error::other("reply ring"))?;
    let doorbell = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
    crate::shm::fdpass::send_with_fds(
        &stream,
        &welcome.encode(),
        &[shared.arena.fd(), map.fd(), doorbell.as_fd()],
    )?;
    stream.set_nonblocking(true)?;
    Ok(Conn {
        id,
        sock: stream,
        seg,
        req,
        rep,
        doorbell,
        wake: false,
        broken: false,
        parked: false,
    })
}
