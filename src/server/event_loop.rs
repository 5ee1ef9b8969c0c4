//! The daemon's event loop thread: one turn serves every client, the spill thread's and the
//! cluster side's answers, then spins or sleeps in epoll. Serving one client is in
//! [`super::conn`]; accepting clients and their hand-shakes in [`super::accept`].

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_queue::SegQueue;
use rustix::event::epoll::{self, EventData, EventFlags};

use super::accept::Shared;
use super::conn::{send, serve, Conn, MUTE_FOR};
use super::spill_thread::SpillThread;
use super::NodeConfig;
use crate::cluster::ClusterHandle;
use crate::id::NodeId;
use crate::protocol::Writer;
use crate::shm::SharedMapping;
use crate::spill::worker::Done;
use crate::store::link::{ToCluster, CLUSTER_CLIENT};
use crate::store::{ClientId, Core, CoreConfig, Outgoing, Table};

/// During sustained activity, look at sockets (hang-ups, new clients) this often.
const EPOLL_EVERY: Duration = Duration::from_millis(1);
/// While this node waits for a peer's answer (a lookup, a pin) and no object bytes are
/// moving, the loop spins this long after the last activity (a remote round trip is longer
/// than the usual spin; sleeping would add a wake-up).
const PULL_SPIN: Duration = Duration::from_micros(500);

const KEY_WAKE: u64 = 0;
/// The cluster transport's readiness descriptor (client keys never reach this value).
const KEY_CLUSTER: u64 = u64::MAX;
pub(super) const KEY_LISTENER: u64 = 1;
const KIND_SOCK: u64 = 2;
const KIND_DOORBELL: u64 = 3;

fn key(client: ClientId, kind: u64) -> u64 {
    (client << 2) | kind
}

pub(super) struct EventLoop {
    pub(super) shared: Arc<Shared>,
    pub(super) listener: UnixListener,
    pub(super) listener_paused: bool,
    pub(super) epoll: OwnedFd,
    shutdown: Arc<AtomicBool>,
    core: Core<Arc<SharedMapping>>,
    pub(super) conns: HashMap<ClientId, Conn>,
    /// Clients whose doorbell is muted (`Conn::muted_until`).
    muted: usize,
    spill: Option<SpillThread>,
    cluster: Option<ClusterHandle>,
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
            Some(sc) => Some(SpillThread::start(sc, &arena, node_id, &wake, &mut core)?),
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
            muted: 0,
            spill,
            cluster,
        })
    }

    pub(super) fn run(mut self) {
        let spin = self.shared.cfg.spin;
        let mut buf = Vec::with_capacity(64 << 10);
        let mut out: Vec<Outgoing> = Vec::new();
        let mut mine: Vec<Outgoing> = Vec::new();
        let mut w = Writer::default();
        let mut last_active = Instant::now();
        let mut last_epoll = last_active;
        while !self.shutdown.load(Ordering::Relaxed) {
            let mut active = self.adopt_new_clients();
            let now = Instant::now();
            if self.muted > 0 {
                self.unmute(now);
            }
            for conn in self.conns.values_mut() {
                let parked = conn.parked;
                let served = serve(
                    conn,
                    &mut self.core,
                    &mut buf,
                    &mut w,
                    now,
                    &mut mine,
                    &mut out,
                );
                active |= served;
                let waiting = self.core.waiting_requests(conn.id) > 0;
                if conn.turn_done(served || (parked && !conn.parked), waiting, now) {
                    // A client ringing for nothing: stop watching its doorbell for a while,
                    // so that it cannot keep the loop turning.
                    let _ = epoll::delete(&self.epoll, conn.doorbell.as_fd());
                    conn.muted_until = Some(now + MUTE_FOR);
                    self.muted += 1;
                    tracing::debug!(client = conn.id, "doorbell rung for nothing; muted");
                }
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
            // Not to parked clients: their requests are not taken anyway, and they ring when
            // they have read replies (`reply_room_wanted`).
            for c in self.conns.values().filter(|c| !c.parked) {
                c.seg.set_daemon_sleeping(true);
            }
            // SYNC POINT: pairs with the client's fence between publishing a request and
            // reading `daemon_sleeping` (Segment::daemon_sleeping): either it sees our flag and
            // kicks the doorbell, or we see its request below.
            std::sync::atomic::fence(Ordering::SeqCst);
            let raced = self.conns.values().any(Conn::has_request)
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
                let deadline = match (deadline, self.next_unmute()) {
                    (Some(d), Some(u)) => Some(d.min(u)),
                    (d, u) => d.or(u),
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
            // A wake-up is not activity: the next turn spins only if it finds work, so a
            // client ringing its doorbell for nothing costs a turn, not a spin.
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
            send(conn, o, w);
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

    /// Watches the doorbells whose mute has passed again (one that rang meanwhile wakes the
    /// next wait at once).
    fn unmute(&mut self, now: Instant) {
        for conn in self.conns.values_mut() {
            if conn.muted_until.is_some_and(|t| t <= now) {
                conn.muted_until = None;
                self.muted -= 1;
                if let Err(e) = epoll::add(
                    &self.epoll,
                    conn.doorbell.as_fd(),
                    EventData::new_u64(key(conn.id, KIND_DOORBELL)),
                    EventFlags::IN,
                ) {
                    tracing::warn!(client = conn.id, error = %e, "cannot watch client; dropping it");
                    conn.broken = true;
                }
            }
        }
    }

    /// When the first muted doorbell is to be watched again.
    fn next_unmute(&self) -> Option<Instant> {
        if self.muted == 0 {
            return None;
        }
        self.conns.values().filter_map(|c| c.muted_until).min()
    }

    fn disconnect(&mut self, id: ClientId, now: Instant, out: &mut Vec<Outgoing>) {
        let Some(conn) = self.conns.remove(&id) else {
            return;
        };
        if conn.muted_until.is_some() {
            self.muted -= 1;
        }
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
                        conn.rang = true;
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
}

fn drain_eventfd(fd: std::os::fd::BorrowedFd<'_>) {
    let mut b = [0u8; 8];
    let _ = rustix::io::read(fd, &mut b);
}
