//! The cluster side of a node: drives a [`Transport`], keeps membership and the owner
//! directory, serves peers' lookups and pins, and runs this node's pulls. The event loop
//! steps it on its own thread (one thread per node: every hand-over between threads costs a
//! wake-up, which dominates remote-get latency); it talks to the core only through the
//! [`link`](super::link) messages, so the core never waits for the network.
//!
//! A pull: lookup at the owner (small objects come back inline: one round trip) → the core
//! reserves room (admission) → pin at a holder, which grants us a read of the object's range
//! → one-sided read straight into the reserved room → unpin → the core seals it and wakes
//! the waiting gets → the owner is told we hold a copy. A holder that fails is skipped for
//! the next; when none is left the owner is asked again once, then the object is lost.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_queue::SegQueue;
use ferroplasma_transport::msg::{self, Body, Envelope, Status};
use ferroplasma_transport::{Event, GrantDescriptor, GrantId, PeerId, ReadOp, Transport};

use super::directory::Directory;
use super::membership::{Change, Membership};
use crate::id::{NodeId, ObjectId};
use crate::protocol::{ErrorReply, Reply};
use crate::shm::SharedMapping;
use crate::store::link::{CoreCall, ToCluster, ToCore};

/// Lookups of one pull before the object counts as lost.
const MAX_LOOKUPS: u32 = 3;
/// Longest a lookup waits at the owner for a seal (longer waits ask again).
const MAX_LOOKUP_WAIT_MS: u64 = 30_000;
/// Most pins one peer may hold here at once.
const MAX_LEASES_PER_PEER: usize = 4096;
/// A read that makes no progress for this long (at 10 MB/s or better) is abandoned.
const READ_STALL: Duration = Duration::from_secs(30);

/// Everything the cluster side needs (it runs on the event loop's thread).
pub struct Runner {
    t: Box<dyn Transport>,
    arena: Arc<SharedMapping>,
    me: u64,
    inline_threshold: u64,
    /// The transport's control message cap ([`Transport::max_control_msg`]).
    max_msg: usize,
    /// Largest object a lookup reply carries inline within `max_msg` ([`inline_fit`]).
    inline_fit: u64,
    heartbeat: Duration,
    join: Option<String>,
    members: Membership,
    dir: Directory,
    to_core: Arc<SegQueue<ToCore>>,
    from_core: Arc<SegQueue<ToCluster>>,
    conns: Conns,
    pulls: HashMap<ObjectId, Pull>,
    /// Our requests to peers awaiting answers: request number → what for.
    asked: HashMap<u64, Asked>,
    next_req: u64,
    /// Pulls and probes to ask the owner again for (after a `Busy` answer), by when: each
    /// entry matches its pull's or probe's `backing_off` (entries are removed with them).
    backoff: BTreeSet<(Instant, ObjectId, Redo)>,
    /// Probes refused `Busy`, asking again until their deadline.
    probes: HashMap<ObjectId, BusyProbe>,
    /// Backoff entries looked at (a test hook for the cost of `ask_again` and `next_beat`).
    backoff_visits: std::cell::Cell<u64>,
    /// Our requests to the core awaiting answers: seq → what for.
    calls: HashMap<u32, Call>,
    next_seq: u32,
    /// Pins we hold for peers.
    leases: HashMap<u64, Lease>,
    /// Grant → pin handle to release once the transport lets go of the range.
    granted: HashMap<GrantId, u64>,
    next_lease: u64,
    next_beat: Instant,
    view_dirty: bool,
    /// The owner's generation of each copy held here.
    copy_gen: HashMap<ObjectId, u64>,
    /// Events polled but not handled yet.
    events: Vec<Event>,
    /// A member list arriving in parts.
    member_parts: super::membership::Assembly,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("me", &NodeId(self.me))
            .field("pulls", &self.pulls.len())
            .finish()
    }
}

/// Connections by node.
#[derive(Default)]
struct Conns {
    /// An authenticated connection per node.
    by_node: HashMap<u64, PeerId>,
    /// Node behind each authenticated connection.
    node_of: HashMap<PeerId, u64>,
    /// Outgoing connections being made: connection → node (None: the join address).
    dialing: HashMap<PeerId, Option<u64>>,
    /// Messages for nodes we are connecting to.
    queued: HashMap<u64, Vec<Vec<u8>>>,
    /// The connection that carries our join.
    join_peer: Option<PeerId>,
}

/// What a backoff entry asks again for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Redo {
    Pull,
    Probe,
}

/// A probe the owner refused `Busy`: it asks again after a backoff until `deadline`.
#[derive(Debug)]
struct BusyProbe {
    deadline: Instant,
    busy: u32,
    backing_off: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
enum Asked {
    Lookup(ObjectId),
    /// A probe and how long it asked the owner to wait.
    Probe(ObjectId, u64),
    Pin(ObjectId),
}

#[derive(Debug)]
enum Call {
    Lookup {
        peer: PeerId,
        req: u64,
        id: ObjectId,
        inline_max: u64,
    },
    Probe {
        peer: PeerId,
        req: u64,
    },
    Pin {
        peer: PeerId,
        req: u64,
        id: ObjectId,
        generation: u64,
    },
    Ignore,
}

#[derive(Debug)]
struct Lease {
    peer: PeerId,
    grant: GrantId,
}

#[derive(Debug)]
enum Phase {
    /// Waiting for the owner's lookup answer over `peer` (None: still connecting).
    Lookup { node: u64 },
    /// Waiting for the core to reserve room.
    Admission,
    /// Waiting for a holder's pin answer.
    Pin { node: u64 },
    /// Reading from a holder.
    Read {
        node: u64,
        peer: PeerId,
        lease: u64,
        since: Instant,
    },
}

#[derive(Debug)]
struct Pull {
    id: ObjectId,
    timeout_ms: u64,
    phase: Phase,
    /// The object's (data, metadata) sizes once the owner described it.
    size: Option<(u64, u64)>,
    holders: Vec<u64>,
    tried: HashSet<u64>,
    lookups: u32,
    offset: Option<u64>,
    token: u64,
    /// The owner's generation of the object.
    generation: u64,
    /// `Busy` answers so far (the backoff doubles with each; re-asks after `Busy` are not
    /// counted in `lookups`), and when it asks again if it waits in `Runner::backoff`.
    busy: u32,
    backing_off: Option<Instant>,
}

/// The first wait before asking again after a `Busy` answer; it doubles up to
/// [`BUSY_BACKOFF_MAX`].
const BUSY_BACKOFF: Duration = Duration::from_millis(10);
const BUSY_BACKOFF_MAX: Duration = Duration::from_millis(640);

/// The wait before asking again after the `busy`-th `Busy` answer (counting from 0) for
/// `id`: [`BUSY_BACKOFF`] doubled per answer up to [`BUSY_BACKOFF_MAX`], less a jitter of up
/// to half, drawn from the id and the count so that requests refused together spread out.
fn busy_delay(id: &ObjectId, busy: u32) -> Duration {
    let full = BUSY_BACKOFF
        .saturating_mul(1 << busy.min(6))
        .min(BUSY_BACKOFF_MAX);
    // splitmix64 over the id's bytes and the count.
    let mut h = u64::from(busy);
    for chunk in id.as_bytes().chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        h ^= u64::from_le_bytes(w);
        h = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^= h >> 31;
    }
    let half = full / 2;
    let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    full - Duration::from_nanos(h % nanos.max(1))
}

/// Largest object a lookup reply can carry inline in a control message of `cap` bytes
/// ([`Transport::max_control_msg`](ferroplasma_transport::Transport::max_control_msg)): the
/// cap less the reply's envelope, measured on the largest reply a node sends with an empty
/// `inline` field (every number at its longest varint, the owner and
/// [`MAX_HOLDERS`](super::directory::MAX_HOLDERS) holders, no detail), plus the `inline`
/// field's key (1 byte) and its length varint, and the growth of the body's own length
/// varint (each at most 10 bytes). tcp (80 KiB): 80 KiB less about 600 bytes; 4 KiB: about
/// 3.5 KiB.
pub fn inline_fit(cap: usize) -> u64 {
    let worst = msg::LookupReply {
        req: u64::MAX,
        status: Status::Busy as i32,
        data_size: u64::MAX,
        meta_size: u64::MAX,
        inlined: true,
        inline: Vec::new(),
        holders: vec![u64::MAX; super::directory::MAX_HOLDERS + 1],
        detail: String::new(),
        generation: u64::MAX,
    };
    let envelope = msg::len_of(&Envelope::of(Body::LookupReply(worst)));
    let overhead = envelope + 1 + 2 * MAX_VARINT;
    u64::try_from(cap.saturating_sub(overhead)).unwrap_or(0)
}

/// Longest protobuf varint.
const MAX_VARINT: usize = 10;
/// Messages that go to any node (member list parts, id batches) fit
/// [`MIN_CONTROL_MSG`](ferroplasma_transport::MIN_CONTROL_MSG), which every transport takes,
/// whatever this node's own cap: caps may differ between nodes.
const ANY_NODE_MSG: usize = ferroplasma_transport::MIN_CONTROL_MSG;
/// Object ids per `CopyRemoved` or `Forget` message (26 bytes each with key and length:
/// 2.6 KiB, within [`ANY_NODE_MSG`]).
const IDS_PER_MSG: usize = 100;
const _: () = assert!(IDS_PER_MSG * 26 + 64 <= ANY_NODE_MSG);
/// Longest `detail` text sent to a peer.
const MAX_DETAIL: usize = 512;

/// `s` cut to at most [`MAX_DETAIL`] bytes (on a character boundary).
fn short(mut s: String) -> String {
    if s.len() > MAX_DETAIL {
        let mut end = MAX_DETAIL;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// The message's bytes, or `None` (logged: a bug, not a peer's doing) when it exceeds the
/// transport's control message cap `cap`.
fn encode_capped(body: Body, cap: usize) -> Option<Vec<u8>> {
    let bytes = Envelope::of(body).to_bytes();
    if bytes.len() > cap {
        tracing::error!(
            len = bytes.len(),
            cap,
            "a control message exceeds the cap; not sent"
        );
        return None;
    }
    Some(bytes)
}

fn id_from(b: &[u8]) -> Option<ObjectId> {
    let a: [u8; ObjectId::LEN] = b.try_into().ok()?;
    Some(ObjectId::from_bytes(a))
}

impl Runner {
    /// A runner over `t`, joining the head if `cfg` says so.
    pub fn new(
        t: Box<dyn Transport>,
        arena: Arc<SharedMapping>,
        me: NodeId,
        inline_threshold: u64,
        cfg: &super::ClusterConfig,
        to_core: Arc<SegQueue<ToCore>>,
        from_core: Arc<SegQueue<ToCluster>>,
    ) -> Self {
        let now = Instant::now();
        let addr = t.local_addr();
        let members = Membership::new(me, &addr, cfg.join.is_none(), cfg.dead_after, now);
        // Chunking and checksums are the transport's business: logged as it applies them.
        let data = t.data_settings();
        let max_msg = t.max_control_msg();
        tracing::info!(
            %addr,
            transport = t.kind(),
            chunk = ?data.chunk,
            checksums = data.checksums.as_str(),
            max_control_msg = max_msg,
            head = cfg.join.is_none(),
            "cluster transport listening"
        );
        let mut r = Self {
            t,
            arena,
            me: me.0,
            inline_threshold,
            max_msg,
            inline_fit: inline_fit(max_msg),
            heartbeat: cfg.heartbeat,
            join: cfg.join.clone(),
            members,
            dir: Directory::default(),
            to_core,
            from_core,
            conns: Conns::default(),
            pulls: HashMap::new(),
            asked: HashMap::new(),
            next_req: 1,
            backoff: BTreeSet::new(),
            probes: HashMap::new(),
            backoff_visits: std::cell::Cell::new(0),
            calls: HashMap::new(),
            next_seq: 1,
            leases: HashMap::new(),
            granted: HashMap::new(),
            next_lease: 1,
            next_beat: now,
            view_dirty: true,
            copy_gen: HashMap::new(),
            events: Vec::new(),
            member_parts: super::membership::Assembly::default(),
        };
        if let Some(j) = r.join.clone() {
            r.dial_join(&j);
        }
        r
    }

    /// Does everything that can be done now without waiting: transport events, the core's
    /// messages, heartbeats. Returns whether anything happened.
    pub fn step(&mut self) -> bool {
        let mut any = false;
        // Handling events can queue more (a refused connect, a revoked grant): go round
        // until quiet, within reason.
        for _ in 0..64 {
            let mut events = std::mem::take(&mut self.events);
            if let Err(e) = self.t.poll(&mut events, Some(Duration::ZERO)) {
                tracing::error!(error = %e, "transport poll failed");
            }
            let now = Instant::now();
            let busy = !events.is_empty() || !self.from_core.is_empty();
            for ev in events.drain(..) {
                self.event(ev, now);
            }
            self.events = events;
            while let Some(m) = self.from_core.pop() {
                self.core_message(m);
            }
            self.ask_again(now);
            if now >= self.next_beat {
                self.next_beat = now + self.heartbeat;
                self.beat(now);
            }
            if std::mem::take(&mut self.view_dirty) {
                self.push_core(ToCore::View(self.members.view(self.t.kind())));
            }
            if !busy {
                break;
            }
            any = true;
        }
        any
    }

    /// Whether object bytes are moving: pins held for peers' reads, or our own reads.
    pub fn transferring(&self) -> bool {
        !self.leases.is_empty()
            || self
                .pulls
                .values()
                .any(|p| matches!(p.phase, Phase::Read { .. }))
    }

    /// When the next heartbeat is due.
    pub fn next_beat(&self) -> Instant {
        match self.backoff.first() {
            Some(&(at, _, _)) => {
                self.backoff_visits.set(self.backoff_visits.get() + 1);
                at.min(self.next_beat)
            }
            None => self.next_beat,
        }
    }

    /// The transport's readiness descriptor (see [`Transport::ready_fd`]).
    pub fn ready_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.t.ready_fd()
    }

    /// Whether the transport has work its descriptor may not show (see
    /// [`Transport::has_work`]): step before sleeping.
    pub fn transport_has_work(&self) -> bool {
        self.t.has_work()
    }

    /// Blocks in the transport until it has work or `timeout` passes (for transports
    /// without a readiness descriptor).
    pub fn wait(&mut self, timeout: Duration) {
        let mut events = std::mem::take(&mut self.events);
        if let Err(e) = self.t.poll(&mut events, Some(timeout)) {
            tracing::error!(error = %e, "transport poll failed");
        }
        self.events = events;
    }

    /// Where peers reach this node.
    pub fn local_addr(&self) -> String {
        self.t.local_addr()
    }

    /// The transport's name.
    pub fn kind(&self) -> &'static str {
        self.t.kind()
    }

    fn push_core(&self, m: ToCore) {
        self.to_core.push(m);
    }

    fn call(&mut self, call: CoreCall, what: Call) {
        self.call_for(None, call, what);
    }

    /// A call to the core on behalf of `peer` (the core caps each peer's parked requests).
    fn call_for(&mut self, peer: Option<NodeId>, call: CoreCall, what: Call) {
        // A release has no reply: nothing to remember.
        if matches!(call, CoreCall::Release { .. }) {
            return self.push_core(ToCore::Call { seq: 0, peer, call });
        }
        let mut seq = self.next_seq;
        // Skip numbers still waiting for an answer (a lookup parked for long).
        while seq == 0 || self.calls.contains_key(&seq) {
            seq = seq.wrapping_add(1);
        }
        self.next_seq = seq.wrapping_add(1);
        self.calls.insert(seq, what);
        self.push_core(ToCore::Call { seq, peer, call });
    }

    /// Sends a request to `node`, remembering what it was for; `false` (and nothing
    /// remembered) if it cannot be sent.
    fn ask(&mut self, node: u64, what: Asked, body: impl FnOnce(u64) -> Body) -> bool {
        let req = self.next_req;
        self.next_req += 1;
        self.asked.insert(req, what);
        let sent = self.send_to(node, body(req));
        if !sent {
            self.asked.remove(&req);
        }
        sent
    }

    // ---- connections ----

    fn dial_join(&mut self, addr: &str) {
        if self.conns.join_peer.is_some() {
            return;
        }
        let p = self.t.connect(addr);
        self.conns.dialing.insert(p, None);
        self.conns.join_peer = Some(p);
    }

    /// Sends to a node, connecting first when needed. `false` if the node is unknown.
    fn send_to(&mut self, node: u64, body: Body) -> bool {
        let Some(bytes) = encode_capped(body, self.max_msg) else {
            return false;
        };
        if let Some(&p) = self.conns.by_node.get(&node) {
            let Err(e) = self.t.send(p, bytes.clone()) else {
                return true;
            };
            // The connection is gone or broken: close it (its Disconnected event cleans up)
            // and dial again below.
            tracing::debug!(node = %NodeId(node), error = %e, "send failed; reconnecting");
            self.t.disconnect(p);
            self.conns.by_node.remove(&node);
            self.conns.node_of.remove(&p);
        }
        let Some(addr) = self.members.addr_of(node).map(str::to_string) else {
            return false;
        };
        let dialing = self.conns.dialing.values().any(|n| *n == Some(node));
        self.conns.queued.entry(node).or_default().push(bytes);
        if !dialing {
            let p = self.t.connect(&addr);
            self.conns.dialing.insert(p, Some(node));
        }
        true
    }

    fn reply(&mut self, peer: PeerId, body: Body) {
        if let Some(bytes) = encode_capped(body, self.max_msg) {
            let _ = self.t.send(peer, bytes);
        }
    }

    fn event(&mut self, ev: Event, now: Instant) {
        match ev {
            Event::Connected {
                peer,
                identity,
                inbound,
            } => {
                // The one place a transport's words become a node: the identity the peer
                // proved in the hand-shake names the node; `peer` only names the connection.
                let node = identity.node_id;
                let expected = self.conns.dialing.remove(&peer).flatten();
                // Transports refuse this in the hand-shake; checked again before anything
                // else so that a connection to ourselves never declares the node we dialled
                // unreachable.
                if node == self.me {
                    tracing::warn!(addr = %identity.addr, "connected to myself; closing");
                    self.t.disconnect(peer);
                    return;
                }
                if let Some(e) = expected.filter(|&e| e != node) {
                    // The address now answers as another node (it restarted): the one we
                    // wanted is gone.
                    tracing::info!(wanted = %NodeId(e), found = %NodeId(node), "another node at that address");
                    self.conns.queued.remove(&e);
                    self.node_unreachable(e);
                }
                self.conns.node_of.insert(peer, node);
                self.conns.by_node.entry(node).or_insert(peer);
                tracing::debug!(peer = %peer, node = %NodeId(node), inbound, "peer connected");
                if self.conns.join_peer == Some(peer) {
                    let addr = self.t.local_addr();
                    self.members.head_back(now);
                    self.reply(
                        peer,
                        Body::Join(msg::Join {
                            node_id: self.me,
                            addr,
                        }),
                    );
                }
                if let Some(q) = self.conns.queued.remove(&node) {
                    if let Some(&p) = self.conns.by_node.get(&node) {
                        for m in q {
                            let _ = self.t.send(p, m);
                        }
                    }
                }
            }
            Event::ConnectFailed { peer, error } => {
                let (addr, reason) = (error.addr(), &error);
                let node = self.conns.dialing.remove(&peer).flatten();
                if self.conns.join_peer == Some(peer) {
                    self.conns.join_peer = None;
                    tracing::warn!(%addr, %reason, "cannot reach the head; retrying");
                }
                if let Some(node) = node {
                    tracing::info!(node = %NodeId(node), %addr, %reason, "cannot connect to peer");
                    self.conns.queued.remove(&node);
                    if !self.conns.by_node.contains_key(&node) {
                        self.node_unreachable(node);
                    }
                }
            }
            Event::Message { peer, body } => self.message(peer, &body, now),
            Event::ReadDone { token, result } => self.read_done(token, result),
            Event::Revoked { grant } => {
                if let Some(handle) = self.granted.remove(&grant) {
                    self.call(
                        CoreCall::Release {
                            handles: vec![handle],
                        },
                        Call::Ignore,
                    );
                }
            }
            Event::Disconnected { peer, reason } => {
                tracing::debug!(peer = %peer, %reason, "peer disconnected");
                self.lost_peer(peer, &reason);
            }
        }
    }

    fn lost_peer(&mut self, peer: PeerId, reason: &str) {
        if self.conns.join_peer == Some(peer) {
            self.conns.join_peer = None;
        }
        self.leases.retain(|_, l| l.peer != peer);
        let Some(node) = self.conns.node_of.remove(&peer) else {
            return;
        };
        if self.conns.by_node.get(&node) == Some(&peer) {
            self.conns.by_node.remove(&node);
            // Another connection to the same node may remain.
            if let Some((&p, _)) = self.conns.node_of.iter().find(|(_, &n)| n == node) {
                self.conns.by_node.insert(node, p);
            }
        }
        tracing::info!(node = %NodeId(node), %reason, "connection to peer lost");
        if !self.conns.by_node.contains_key(&node) {
            // Its parked lookups, probes and pins will never be answered: the core forgets
            // them (they stop counting against its cap), and so do we. A reply the core sent
            // before it heard finds no call and releases its pin.
            self.push_core(ToCore::PeerGone(NodeId(node)));
            let live = &self.conns.node_of;
            self.calls.retain(|_, c| match c {
                Call::Lookup { peer, .. } | Call::Probe { peer, .. } | Call::Pin { peer, .. } => {
                    live.contains_key(peer)
                }
                Call::Ignore => true,
            });
            self.node_unreachable(node);
        }
    }

    /// Requests waiting on `node` will not be answered.
    fn node_unreachable(&mut self, node: u64) {
        let ids: Vec<ObjectId> = self
            .pulls
            .values()
            .filter(|p| match p.phase {
                Phase::Lookup { node: n } | Phase::Pin { node: n } => n == node,
                _ => false,
            })
            .map(|p| p.id)
            .collect();
        // Forget requests to it (answers would find no pull in the right phase anyway).
        for id in ids {
            self.source_failed(id, node, "the node is unreachable");
        }
        let probes: Vec<(u64, ObjectId)> = self
            .asked
            .iter()
            .filter_map(|(&r, a)| match a {
                Asked::Probe(id, _) if id.owner().0 == node => Some((r, *id)),
                _ => None,
            })
            .collect();
        for (r, id) in probes {
            self.asked.remove(&r);
            self.push_core(ToCore::Probed { id, sealed: false });
        }
    }

    // ---- heartbeats and membership ----

    fn beat(&mut self, now: Instant) {
        let hb = Body::Heartbeat(msg::Heartbeat {
            node_id: self.me,
            epoch: self.members.epoch(),
        });
        if self.members.is_head() {
            for n in self.members.others() {
                if self.conns.by_node.contains_key(&n) {
                    self.send_to(n, hb.clone());
                }
            }
        } else if let Some(h) = self
            .members
            .head()
            .filter(|h| self.conns.by_node.contains_key(h))
        {
            self.send_to(h, hb);
        } else if let Some(j) = self.join.clone() {
            // Not connected to the head: (re)join.
            self.dial_join(&j);
        }
        let c = self.members.tick(now);
        self.membership_changed(c);
        // Reads that stall: closing the connection fails them once no byte can land any
        // more, and the pull moves on to another holder.
        let stalled: Vec<PeerId> = self
            .pulls
            .values()
            .filter_map(|p| match p.phase {
                Phase::Read { peer, since, .. } => {
                    let budget = READ_STALL
                        + Duration::from_millis(p.size.map_or(0, |(d, m)| d + m) / 10_000);
                    (now.saturating_duration_since(since) > budget).then_some(peer)
                }
                _ => None,
            })
            .collect();
        for peer in stalled {
            tracing::warn!(peer = %peer, "a read stalled; closing its connection");
            self.t.disconnect(peer);
        }
    }

    fn membership_changed(&mut self, c: Change) {
        for &n in &c.died {
            tracing::warn!(node = %NodeId(n), "node declared dead");
            self.dir.forget_node(n);
            if let Some(p) = self.conns.by_node.get(&n).copied() {
                self.t.disconnect(p);
                self.lost_peer(p, "declared dead");
            }
            self.node_unreachable(n);
        }
        if c.changed {
            self.view_dirty = true;
            if self.members.is_head() {
                let parts = self.members.to_msgs();
                for n in self.members.others() {
                    for m in &parts {
                        self.send_to(n, Body::Members(m.clone()));
                    }
                }
            }
        }
    }

    // ---- messages from peers ----

    fn message(&mut self, peer: PeerId, body: &[u8], now: Instant) {
        let Some(&node) = self.conns.node_of.get(&peer) else {
            return;
        };
        self.members.heard(node, now);
        let env = match Envelope::from_bytes(body) {
            Ok(Envelope { body: Some(b) }) => b,
            Ok(Envelope { body: None }) | Err(_) => {
                tracing::warn!(node = %NodeId(node), "undecodable message; dropping the peer");
                self.t.disconnect(peer);
                self.lost_peer(peer, "protocol error");
                return;
            }
        };
        match env {
            Body::Join(j) => {
                if j.addr.len() > ferroplasma_transport::hello::MAX_ADDR {
                    tracing::warn!(node = %NodeId(node), "join with an oversized address; dropping the peer");
                    self.t.disconnect(peer);
                    return;
                }
                if j.node_id != node {
                    tracing::warn!(node = %NodeId(node), "join for another node; ignored");
                    return;
                }
                let c = self.members.join(node, &j.addr, now);
                if c.changed {
                    tracing::info!(node = %NodeId(node), addr = %j.addr, "node joined");
                }
                self.membership_changed(c);
                // The joiner needs the list even when nothing changed (a repeated join).
                for m in self.members.to_msgs() {
                    self.reply(peer, Body::Members(m));
                }
            }
            Body::Members(m) => {
                // Only the head of our list speaks for the cluster; a new head only through
                // the join address, once the old one is gone.
                let from_head = self.members.head() == Some(node);
                let head_gone = self
                    .members
                    .head()
                    .is_none_or(|h| !self.members.is_alive(h));
                if from_head || (head_gone && self.conns.join_peer == Some(peer)) {
                    // A long list comes in parts (each fits a control message).
                    if let Some(m) = self.member_parts.add(node, m) {
                        let c = self.members.adopt(node, &m, now);
                        self.membership_changed(c);
                    }
                } else {
                    tracing::warn!(node = %NodeId(node), "membership list from a node that is not the head; ignored");
                }
            }
            Body::Heartbeat(_) => {}
            Body::Lookup(l) => self.serve_lookup(node, peer, l),
            Body::LookupReply(r) => self.lookup_reply(node, r, now),
            Body::Pin(p) => self.serve_pin(node, peer, p),
            Body::PinReply(r) => self.pin_reply(node, peer, r, now),
            Body::Unpin(u) => {
                if self.leases.get(&u.lease).is_some_and(|l| l.peer == peer) {
                    if let Some(l) = self.leases.remove(&u.lease) {
                        self.t.revoke(l.grant);
                    }
                }
            }
            Body::CopyAdded(ids) => {
                let gens = ids.generations.iter().copied().chain(std::iter::repeat(0));
                for (b, generation) in ids.ids.iter().zip(gens).take(crate::protocol::MAX_IDS) {
                    let Some(id) = id_from(b) else { continue };
                    if id.owner().0 == self.me {
                        // Kept only if it is a copy of the object sealed here now (a delete,
                        // or a delete and re-create, may have crossed the report).
                        self.dir.add(id, node);
                        self.push_core(ToCore::CheckCopy {
                            node,
                            id,
                            generation,
                        });
                    }
                }
            }
            Body::CopyRemoved(ids) => {
                for id in ids.ids.iter().filter_map(|b| id_from(b)) {
                    self.dir.remove(&id, node);
                }
            }
            Body::Forget(ids) => {
                // Only the owner may make us drop copies of its objects.
                let ids: Vec<ObjectId> = ids
                    .ids
                    .iter()
                    .filter_map(|b| id_from(b))
                    .filter(|id| id.owner().0 == node)
                    .take(crate::protocol::MAX_IDS)
                    .collect();
                if !ids.is_empty() {
                    self.call(CoreCall::Forget { ids }, Call::Ignore);
                }
            }
        }
    }

    fn serve_lookup(&mut self, node: u64, peer: PeerId, l: msg::Lookup) {
        tracing::trace!(peer = %peer, req = l.req, "lookup from a peer");
        let id = match id_from(&l.id) {
            Some(id) if id.owner().0 == self.me => id,
            _ => {
                let status = Status::NotFound;
                return self.reply(
                    peer,
                    Body::LookupReply(msg::LookupReply {
                        req: l.req,
                        status: status as i32,
                        detail: "not owned by this node".into(),
                        ..Default::default()
                    }),
                );
            }
        };
        // Bounded: a peer cannot park requests here forever; the asker asks again when its
        // own caller waits longer.
        let timeout_ms = l.timeout_ms.min(MAX_LOOKUP_WAIT_MS);
        let from = Some(NodeId(node));
        if l.probe {
            self.call_for(
                from,
                CoreCall::Wait {
                    ids: vec![id],
                    timeout_ms,
                },
                Call::Probe { peer, req: l.req },
            );
        } else {
            self.call_for(
                from,
                CoreCall::Get {
                    ids: vec![id],
                    timeout_ms,
                },
                Call::Lookup {
                    peer,
                    req: l.req,
                    id,
                    // What the asker takes, and what our own cap sends.
                    inline_max: l.inline_max.min(self.inline_threshold).min(self.inline_fit),
                },
            );
        }
    }

    fn serve_pin(&mut self, node: u64, peer: PeerId, p: msg::Pin) {
        if self.leases.values().filter(|l| l.peer == peer).count() >= MAX_LEASES_PER_PEER {
            return self.reply(
                peer,
                Body::PinReply(msg::PinReply {
                    req: p.req,
                    status: Status::Busy as i32,
                    detail: format!("more than {MAX_LEASES_PER_PEER} pins from one peer"),
                    ..Default::default()
                }),
            );
        }
        let Some(id) = id_from(&p.id) else {
            return self.reply(
                peer,
                Body::PinReply(msg::PinReply {
                    req: p.req,
                    status: Status::NotFound as i32,
                    detail: "malformed id".into(),
                    ..Default::default()
                }),
            );
        };
        self.call_for(
            Some(NodeId(node)),
            CoreCall::Get {
                ids: vec![id],
                timeout_ms: 0,
            },
            Call::Pin {
                peer,
                req: p.req,
                id,
                generation: p.generation,
            },
        );
    }

    /// The core answered one of our calls.
    fn core_reply(&mut self, o: crate::store::Outgoing) {
        let Some(call) = self.calls.remove(&o.seq) else {
            // Not ours to use: never keep a pin nobody will release.
            if let Ok(Reply::Objects(locs)) = &o.reply {
                let handles = locs.iter().map(|l| l.handle).collect();
                self.push_core(ToCore::Call {
                    seq: 0,
                    peer: None,
                    call: CoreCall::Release { handles },
                });
            }
            return;
        };
        let loc = match &o.reply {
            Ok(Reply::Objects(locs)) => locs.first().copied(),
            _ => None,
        };
        let peer_alive = |s: &Self, p: PeerId| s.conns.node_of.contains_key(&p);
        match call {
            Call::Ignore => {
                if let Some(l) = loc {
                    self.release(l.handle);
                }
            }
            Call::Probe { peer, req } => {
                let sealed = matches!(&o.reply, Ok(Reply::Ready(f)) if f.first() == Some(&true));
                let (status, detail) = match &o.reply {
                    _ if sealed => (Status::Found, String::new()),
                    // Refused by a cap (the cluster side's calls are well-formed, so
                    // `Invalid` is a cap: too many waiting requests from that peer).
                    Err(e @ ErrorReply::Invalid(_)) => (Status::Busy, format!("{e:?}")),
                    Err(e) => (Status::Failed, format!("{e:?}")),
                    Ok(_) => (Status::Timeout, String::new()),
                };
                let detail = short(detail);
                self.reply(
                    peer,
                    Body::LookupReply(msg::LookupReply {
                        req,
                        status: status as i32,
                        detail,
                        ..Default::default()
                    }),
                );
            }
            Call::Lookup {
                peer,
                req,
                id,
                inline_max,
            } => {
                let mut r = msg::LookupReply {
                    req,
                    ..Default::default()
                };
                match (&o.reply, loc) {
                    (Ok(_), Some(l)) => {
                        r.status = Status::Found as i32;
                        r.data_size = l.data_size;
                        r.meta_size = l.meta_size;
                        r.generation = l.handle;
                        let total = l.data_size + l.meta_size;
                        if total <= inline_max {
                            if let Some(b) = self.arena.read_at(l.offset, total) {
                                r.inlined = true;
                                r.inline = b;
                            }
                        }
                        self.release(l.handle);
                        r.holders.push(self.me);
                        r.holders.extend(
                            self.dir
                                .holders(&id)
                                .into_iter()
                                .filter(|&n| self.members.is_alive(n)),
                        );
                    }
                    (Err(ErrorReply::Timeout(_)), _) => r.status = Status::Timeout as i32,
                    (Err(e @ ErrorReply::Invalid(_)), _) => {
                        r.status = Status::Busy as i32;
                        r.detail = short(format!("{e:?}"));
                    }
                    (Err(e), _) => {
                        r.status = Status::Failed as i32;
                        r.detail = short(format!("{e:?}"));
                    }
                    (Ok(_), None) => r.status = Status::Failed as i32,
                }
                if r.inlined
                    && msg::len_of(&Envelope::of(Body::LookupReply(r.clone()))) > self.max_msg
                {
                    // Does not fit a control message after all: it goes as a read.
                    r.inlined = false;
                    r.inline = Vec::new();
                }
                if peer_alive(self, peer) {
                    tracing::trace!(peer = %peer, req, inlined = r.inlined, "lookup answered");
                    self.reply(peer, Body::LookupReply(r));
                }
            }
            Call::Pin {
                peer,
                req,
                id,
                generation,
            } => {
                let mut r = msg::PinReply {
                    req,
                    ..Default::default()
                };
                // Serve only the incarnation the owner named.
                let current = |s: &Self, handle: u64| {
                    if id.owner().0 == s.me {
                        handle == generation
                    } else {
                        s.copy_gen.get(&id) == Some(&generation)
                    }
                };
                let loc = match loc {
                    Some(l) if !current(self, l.handle) => {
                        self.release(l.handle);
                        None
                    }
                    other => other,
                };
                match loc {
                    Some(l) if peer_alive(self, peer) => {
                        // SAFETY: `l` is a sealed object the core pinned for this call; the
                        // pin is released only after the grant's `Revoked` (`granted` maps
                        // the grant to the handle released then). The store writes no sealed
                        // object (creates and restores write fresh allocations, inline copies
                        // before they seal) and frees no pinned one (a delete is deferred),
                        // so nothing in this process writes the range while it is granted.
                        let granted =
                            unsafe { self.t.grant(peer, l.offset, l.data_size + l.meta_size) };
                        match granted {
                            Ok(desc) => {
                                let lease = self.next_lease;
                                self.next_lease += 1;
                                let grant = desc.id;
                                self.leases.insert(lease, Lease { peer, grant });
                                self.granted.insert(grant, l.handle);
                                r.status = Status::Found as i32;
                                r.offset = l.offset;
                                r.data_size = l.data_size;
                                r.meta_size = l.meta_size;
                                r.lease = lease;
                                r.grant = desc.encode().to_vec();
                            }
                            Err(e) => {
                                self.release(l.handle);
                                r.status = Status::Failed as i32;
                                r.detail = short(e.to_string());
                            }
                        }
                    }
                    Some(l) => {
                        self.release(l.handle);
                        return;
                    }
                    None => {
                        r.status = match &o.reply {
                            Err(ErrorReply::Timeout(_)) => Status::NotFound as i32,
                            Err(ErrorReply::Invalid(_)) => Status::Busy as i32,
                            _ => Status::Failed as i32,
                        };
                        if let Err(e) = &o.reply {
                            r.detail = short(format!("{e:?}"));
                        }
                    }
                }
                self.reply(peer, Body::PinReply(r));
            }
        }
    }

    fn release(&mut self, handle: u64) {
        self.call(
            CoreCall::Release {
                handles: vec![handle],
            },
            Call::Ignore,
        );
    }

    // ---- messages from the core ----

    fn core_message(&mut self, m: ToCluster) {
        match m {
            ToCluster::Reply(o) => self.core_reply(o),
            ToCluster::Pull { id, timeout_ms } => {
                if self.pulls.contains_key(&id) {
                    return;
                }
                let owner = id.owner().0;
                self.pulls.insert(
                    id,
                    Pull {
                        id,
                        timeout_ms,
                        phase: Phase::Lookup { node: owner },
                        size: None,
                        holders: Vec::new(),
                        tried: HashSet::new(),
                        lookups: 0,
                        offset: None,
                        token: 0,
                        generation: 0,
                        busy: 0,
                        backing_off: None,
                    },
                );
                self.lookup(id);
            }
            ToCluster::Probe { id, timeout_ms } => {
                if let Some(b) = self.probes.remove(&id) {
                    if let Some(at) = b.backing_off {
                        self.backoff.remove(&(at, id, Redo::Probe));
                    }
                }
                self.probe(id, timeout_ms);
            }
            ToCluster::Allocated { id, offset } => {
                let Some(p) = self.pulls.get_mut(&id) else {
                    // The pull failed meanwhile; the core learnt it already.
                    return;
                };
                p.offset = Some(offset);
                self.next_source(id);
            }
            ToCluster::Cancel { id } => {
                // Its requests in flight stay in `asked`: their answers find no pull.
                self.drop_pull(id);
                // What we said of it before is stale; this marks the end.
                self.push_core(ToCore::Cancelled { id });
            }
            ToCluster::CopyAdded(id) => {
                let owner = id.owner().0;
                let generation = self.copy_gen.get(&id).copied().unwrap_or(0);
                if self.members.is_alive(owner) {
                    self.send_to(
                        owner,
                        Body::CopyAdded(msg::Ids {
                            ids: vec![id.as_bytes().to_vec()],
                            generations: vec![generation],
                        }),
                    );
                }
            }
            ToCluster::CopyChecked { node, id, current } => {
                if !current {
                    self.dir.remove(&id, node);
                    self.send_to(
                        node,
                        Body::Forget(msg::Ids {
                            ids: vec![id.as_bytes().to_vec()],
                            generations: Vec::new(),
                        }),
                    );
                }
            }
            ToCluster::CopiesLost(ids) => {
                for id in &ids {
                    self.copy_gen.remove(id);
                }
                let mut by_owner: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
                for id in ids {
                    by_owner
                        .entry(id.owner().0)
                        .or_default()
                        .push(id.as_bytes().to_vec());
                }
                for (owner, ids) in by_owner {
                    if self.members.is_alive(owner) {
                        for batch in ids.chunks(IDS_PER_MSG) {
                            self.send_to(
                                owner,
                                Body::CopyRemoved(msg::Ids {
                                    ids: batch.to_vec(),
                                    generations: Vec::new(),
                                }),
                            );
                        }
                    }
                }
            }
            ToCluster::Deleted(ids) => {
                let mut by_holder: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
                for id in ids {
                    for n in self.dir.take(&id) {
                        by_holder.entry(n).or_default().push(id.as_bytes().to_vec());
                    }
                }
                for (n, ids) in by_holder {
                    if self.members.is_alive(n) {
                        for batch in ids.chunks(IDS_PER_MSG) {
                            self.send_to(
                                n,
                                Body::Forget(msg::Ids {
                                    ids: batch.to_vec(),
                                    generations: Vec::new(),
                                }),
                            );
                        }
                    }
                }
            }
        }
    }

    // ---- pulls ----

    /// The owner or a holder answered `Busy` (it holds as many of our waiting requests as it
    /// takes): nothing is wrong with the object, so the pull asks the owner again after a
    /// backoff, as long as anybody waits for it (the core cancels it when its gets expire).
    /// A local get never sees the refusal.
    fn busy(&mut self, id: ObjectId, now: Instant) {
        // The answer's request is out of `asked` already (the caller took it).
        let Some(p) = self.pulls.get_mut(&id) else {
            return;
        };
        let at = now + busy_delay(&id, p.busy);
        p.busy = p.busy.saturating_add(1);
        if let Some(old) = p.backing_off.replace(at) {
            self.backoff.remove(&(old, id, Redo::Pull));
        }
        p.phase = Phase::Lookup { node: id.owner().0 };
        self.backoff.insert((at, id, Redo::Pull));
    }

    /// A probe was refused `Busy`: ask again after a backoff, or answer "not sealed" once its
    /// wait is over.
    fn probe_busy(&mut self, id: ObjectId, timeout_ms: u64, now: Instant) {
        let b = self.probes.entry(id).or_insert_with(|| BusyProbe {
            deadline: now + Duration::from_millis(timeout_ms),
            busy: 0,
            backing_off: None,
        });
        let at = now + busy_delay(&id, b.busy);
        if at >= b.deadline {
            self.probes.remove(&id);
            return self.push_core(ToCore::Probed { id, sealed: false });
        }
        b.busy = b.busy.saturating_add(1);
        if let Some(old) = b.backing_off.replace(at) {
            self.backoff.remove(&(old, id, Redo::Probe));
        }
        self.backoff.insert((at, id, Redo::Probe));
    }

    /// Asks again for the pulls and probes whose backoff after a `Busy` answer is over:
    /// `O(due + log n)` (every entry belongs to a live pull or probe).
    fn ask_again(&mut self, now: Instant) {
        while let Some(&(at, id, redo)) = self.backoff.first() {
            self.backoff_visits.set(self.backoff_visits.get() + 1);
            if at > now {
                return;
            }
            self.backoff.pop_first();
            match redo {
                Redo::Pull => {
                    let again = self
                        .pulls
                        .get_mut(&id)
                        .is_some_and(|p| p.backing_off == Some(at));
                    if again {
                        self.ask_owner(id);
                    }
                }
                Redo::Probe => {
                    let again = self.probes.get(&id).filter(|b| b.backing_off == Some(at));
                    if let Some(b) = again {
                        let left = b.deadline.saturating_duration_since(now);
                        let ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
                        if let Some(b) = self.probes.get_mut(&id) {
                            b.backing_off = None;
                        }
                        self.probe(id, ms.max(1));
                    }
                }
            }
        }
    }

    /// Asks the owner whether `id` is sealed (waiting up to `timeout_ms` there).
    fn probe(&mut self, id: ObjectId, timeout_ms: u64) {
        let owner = id.owner().0;
        let sent = self.members.is_alive(owner)
            && self.ask(owner, Asked::Probe(id, timeout_ms), |req| {
                Body::Lookup(msg::Lookup {
                    req,
                    id: id.as_bytes().to_vec(),
                    timeout_ms,
                    probe: true,
                    inline_max: 0,
                })
            });
        if !sent {
            self.probes.remove(&id);
            self.push_core(ToCore::Probed { id, sealed: false });
        }
    }

    /// Forgets the pull of `id` and its backoff entry; returns it.
    fn drop_pull(&mut self, id: ObjectId) -> Option<Pull> {
        let p = self.pulls.remove(&id)?;
        if let Some(at) = p.backing_off {
            self.backoff.remove(&(at, id, Redo::Pull));
        }
        Some(p)
    }

    /// Forgets the requests made for the pull of `id`.
    fn forget_asked(&mut self, id: ObjectId) {
        self.asked
            .retain(|_, a| !matches!(a, Asked::Lookup(x) | Asked::Pin(x) if *x == id));
    }

    fn fail_pull(&mut self, id: ObjectId, error: ErrorReply) {
        self.forget_asked(id);
        if self.drop_pull(id).is_some() {
            tracing::debug!(%id, ?error, "pull failed");
            self.push_core(ToCore::PullFailed { id, error });
        }
    }

    /// Looks the object up at its owner (again): spends one of the pull's lookups.
    fn lookup(&mut self, id: ObjectId) {
        if let Some(p) = self.pulls.get_mut(&id) {
            p.lookups += 1;
        }
        self.ask_owner(id);
    }

    /// Sends the pull's lookup to the owner (a first lookup, a repeated one, or a re-ask
    /// after `Busy`, which spends no lookup), leaving any backoff.
    fn ask_owner(&mut self, id: ObjectId) {
        let Some(p) = self.pulls.get_mut(&id) else {
            return;
        };
        let owner = id.owner().0;
        p.phase = Phase::Lookup { node: owner };
        if let Some(at) = p.backing_off.take() {
            self.backoff.remove(&(at, id, Redo::Pull));
        }
        let timeout_ms = p.timeout_ms;
        if !self.members.is_alive(owner) {
            return self.fail_pull(
                id,
                ErrorReply::OwnerDied {
                    id,
                    node: NodeId(owner),
                },
            );
        }
        // What our transport takes in a reply (the owner applies its own cap too).
        let inline_max = self.inline_threshold.min(self.inline_fit);
        let sent = self.ask(owner, Asked::Lookup(id), |req| {
            tracing::trace!(%id, req, "lookup sent");
            Body::Lookup(msg::Lookup {
                req,
                id: id.as_bytes().to_vec(),
                timeout_ms,
                probe: false,
                inline_max,
            })
        });
        if !sent {
            self.fail_pull(
                id,
                ErrorReply::OwnerDied {
                    id,
                    node: NodeId(owner),
                },
            );
        }
    }

    fn lookup_reply(&mut self, node: u64, r: msg::LookupReply, now: Instant) {
        tracing::trace!(node = %NodeId(node), req = r.req, "lookup reply");
        let asked = self.asked.remove(&r.req);
        if let Some(Asked::Probe(id, timeout_ms)) = asked {
            if id.owner().0 == node {
                if r.status == Status::Busy as i32 {
                    return self.probe_busy(id, timeout_ms, now);
                }
                self.probes.remove(&id);
                let sealed = r.status == Status::Found as i32;
                self.push_core(ToCore::Probed { id, sealed });
            }
            return;
        }
        let Some(Asked::Lookup(id)) = asked else {
            return;
        };
        if id.owner().0 != node {
            return;
        }
        let Some(p) = self.pulls.get_mut(&id) else {
            return;
        };
        if !matches!(p.phase, Phase::Lookup { .. }) {
            return;
        }
        let arena = self.arena.len() as u64;
        match Status::try_from(r.status) {
            Ok(Status::Found) => {
                let total = r.data_size.checked_add(r.meta_size);
                if total.is_none_or(|t| t > arena) {
                    let requested = total.unwrap_or(u64::MAX);
                    return self.fail_pull(
                        id,
                        ErrorReply::TooLarge {
                            id,
                            requested,
                            max: arena,
                        },
                    );
                }
                if p.offset.is_some()
                    && (r.inlined
                        || p.size != Some((r.data_size, r.meta_size))
                        || p.generation != r.generation)
                {
                    // A repeated lookup must describe the object whose room is reserved.
                    return self.fail_pull(
                        id,
                        ErrorReply::ObjectLost {
                            id,
                            detail: "the owner now reports another object under this id".into(),
                        },
                    );
                }
                if r.inlined {
                    if r.inline.len() as u64 != total.unwrap_or(0) {
                        return self.fail_pull(
                            id,
                            ErrorReply::ObjectLost {
                                id,
                                detail: "the owner sent an inline object of the wrong size".into(),
                            },
                        );
                    }
                    self.drop_pull(id);
                    self.forget_asked(id);
                    self.copy_gen.insert(id, r.generation);
                    self.push_core(ToCore::PullInline {
                        id,
                        data_size: r.data_size,
                        bytes: r.inline,
                    });
                    return;
                }
                if p.size.is_some_and(|s| s != (r.data_size, r.meta_size)) {
                    return self.fail_pull(
                        id,
                        ErrorReply::ObjectLost {
                            id,
                            detail: "the owner reports another size than before".into(),
                        },
                    );
                }
                p.size = Some((r.data_size, r.meta_size));
                p.generation = r.generation;
                p.holders = r
                    .holders
                    .into_iter()
                    .filter(|&n| n != self.me)
                    .take(super::directory::MAX_HOLDERS)
                    .collect();
                if p.offset.is_some() {
                    // A repeated lookup: the room is reserved already.
                    self.next_source(id);
                } else {
                    p.phase = Phase::Admission;
                    self.push_core(ToCore::PullSized {
                        id,
                        data_size: r.data_size,
                        meta_size: r.meta_size,
                    });
                }
            }
            Ok(Status::Timeout) => self.fail_pull(id, ErrorReply::Timeout(vec![id])),
            Ok(Status::Busy) => self.busy(id, now),
            Ok(Status::NotFound) => self.fail_pull(
                id,
                ErrorReply::ObjectLost {
                    id,
                    detail: format!("its owner does not have it: {}", r.detail),
                },
            ),
            Ok(Status::Failed) | Err(_) => self.fail_pull(
                id,
                ErrorReply::RestoreFailed {
                    id,
                    detail: format!("at its owner {}: {}", NodeId(node), r.detail),
                },
            ),
        }
    }

    /// Pins the object at the next holder not tried yet (copies before the owner, to spread
    /// load), or asks the owner again, or gives up.
    fn next_source(&mut self, id: ObjectId) {
        let Some(p) = self.pulls.get_mut(&id) else {
            return;
        };
        let owner = id.owner().0;
        let mut cands: Vec<u64> = p
            .holders
            .iter()
            .copied()
            .filter(|n| !p.tried.contains(n) && self.members.is_alive(*n))
            .collect();
        // Prefer copies over the owner; pick among them by the object's bytes so that
        // different objects spread over different holders.
        cands.sort_by_key(|&n| (n == owner, n ^ u64::from(id.as_bytes()[23])));
        let Some(&node) = cands.first() else {
            if p.lookups < MAX_LOOKUPS && self.members.is_alive(owner) {
                p.tried.clear();
                return self.lookup(id);
            }
            let tried: Vec<String> = p.tried.iter().map(|n| NodeId(*n).to_string()).collect();
            let error = if self.members.is_alive(owner) {
                ErrorReply::ObjectLost {
                    id,
                    detail: format!("no holder could serve it (tried {})", tried.join(", ")),
                }
            } else {
                ErrorReply::OwnerDied {
                    id,
                    node: NodeId(owner),
                }
            };
            return self.fail_pull(id, error);
        };
        p.phase = Phase::Pin { node };
        let generation = p.generation;
        let sent = self.ask(node, Asked::Pin(id), |req| {
            Body::Pin(msg::Pin {
                req,
                id: id.as_bytes().to_vec(),
                generation,
            })
        });
        if !sent {
            self.source_failed(id, node, "not reachable");
        }
    }

    fn source_failed(&mut self, id: ObjectId, node: u64, why: &str) {
        let Some(p) = self.pulls.get_mut(&id) else {
            return;
        };
        tracing::info!(%id, node = %NodeId(node), why, "source failed; trying another");
        match p.phase {
            Phase::Lookup { .. } => {
                if p.lookups < MAX_LOOKUPS && self.members.is_alive(node) {
                    self.lookup(id);
                } else {
                    self.fail_pull(
                        id,
                        ErrorReply::OwnerDied {
                            id,
                            node: NodeId(node),
                        },
                    );
                }
            }
            _ => {
                p.tried.insert(node);
                self.next_source(id);
            }
        }
    }

    fn pin_reply(&mut self, node: u64, peer: PeerId, r: msg::PinReply, now: Instant) {
        let Some(Asked::Pin(id)) = self.asked.remove(&r.req) else {
            return;
        };
        let Some(p) = self.pulls.get_mut(&id) else {
            // Nobody wants it any more: let the holder go.
            if r.status == Status::Found as i32 {
                self.reply(peer, Body::Unpin(msg::Unpin { lease: r.lease }));
            }
            return;
        };
        if !matches!(p.phase, Phase::Pin { node: n } if n == node) {
            if r.status == Status::Found as i32 {
                self.reply(peer, Body::Unpin(msg::Unpin { lease: r.lease }));
            }
            return;
        }
        if r.status == Status::Busy as i32 {
            return self.busy(id, now);
        }
        if r.status != Status::Found as i32 {
            return self.source_failed(id, node, "it does not hold the object");
        }
        let Some((data_size, meta_size)) = p.size else {
            self.reply(peer, Body::Unpin(msg::Unpin { lease: r.lease }));
            return self.source_failed(id, node, "pinned before the owner gave a size");
        };
        if (r.data_size, r.meta_size) != (data_size, meta_size) {
            self.reply(peer, Body::Unpin(msg::Unpin { lease: r.lease }));
            return self.source_failed(id, node, "it reports another size");
        }
        let Some(local) = p.offset else {
            self.reply(peer, Body::Unpin(msg::Unpin { lease: r.lease }));
            return;
        };
        let total = data_size + meta_size;
        // The holder's word for the grant; its transport checks our reads against it, ours
        // only that it is well-formed and long enough.
        let grant = match GrantDescriptor::decode(&r.grant) {
            Ok(g) if g.len >= total => g,
            Ok(_) => {
                self.reply(peer, Body::Unpin(msg::Unpin { lease: r.lease }));
                return self.source_failed(id, node, "its grant is shorter than the object");
            }
            Err(e) => {
                self.reply(peer, Body::Unpin(msg::Unpin { lease: r.lease }));
                let why = format!("its pin reply has no usable grant: {e}");
                return self.source_failed(id, node, &why);
            }
        };
        let token = self.next_req;
        self.next_req += 1;
        p.token = token;
        p.phase = Phase::Read {
            node,
            peer,
            lease: r.lease,
            since: Instant::now(),
        };
        let op = ReadOp {
            token,
            peer,
            grant,
            offset: 0,
            local_offset: local,
            len: total,
        };
        // SAFETY: `local` is room the core reserved for this pull alone (`Allocated`): an
        // unsealed copy created by the cluster client, which no client can see, the store
        // neither writes nor frees (no delete or eviction of unsealed objects) until this side
        // reports `PullDone` or `PullFailed`, and a pull in `Phase::Read` reports either only
        // from `read_done`, after the read's `ReadDone`. So the range is no other read's
        // destination and no granted range (grants are sealed objects).
        if let Err(e) = unsafe { self.t.read(op) } {
            tracing::warn!(%id, error = %e, "cannot start a read");
            self.reply(peer, Body::Unpin(msg::Unpin { lease: r.lease }));
            self.source_failed(id, node, "read refused locally");
        }
    }

    fn read_done(&mut self, token: u64, result: Result<(), ferroplasma_transport::ReadError>) {
        let Some(id) = self
            .pulls
            .values()
            .find(|p| p.token == token && matches!(p.phase, Phase::Read { .. }))
            .map(|p| p.id)
        else {
            return;
        };
        let Some(Phase::Read {
            node, peer, lease, ..
        }) = self.pulls.get(&id).map(|p| &p.phase)
        else {
            return;
        };
        let (node, peer, lease) = (*node, *peer, *lease);
        if self.conns.node_of.contains_key(&peer) {
            self.reply(peer, Body::Unpin(msg::Unpin { lease }));
        }
        match result {
            Ok(()) => {
                let generation = self.drop_pull(id).map_or(0, |p| p.generation);
                self.forget_asked(id);
                self.copy_gen.insert(id, generation);
                self.push_core(ToCore::PullDone { id });
            }
            Err(e) => {
                let why = e.to_string();
                self.source_failed(id, node, &why);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A head node's runner over the in-process transport that knows node 7 as a live member
    /// (reached through an address nobody listens on: nothing is answered unless a test
    /// feeds the answers in).
    fn runner() -> Runner {
        use super::super::{ClusterConfig, CustomTransport, TransportChoice};
        use crate::shm::arena::{Arena, HugepageMode};
        let arena = Arena::create(2 << 20, HugepageMode::Off).expect("arena");
        let arena = Arc::new(arena.into_mapping());
        let mut cfg = ClusterConfig::new("mem:runner-test");
        let net = ferroplasma_transport_mem::MemNetwork::new();
        cfg.transport = TransportChoice::Custom(CustomTransport::new(move |t, listen, r| {
            Ok(Box::new(ferroplasma_transport_mem::MemTransport::new(
                &net,
                Some(listen),
                t,
                r,
            )))
        }));
        let mut r = super::super::start(&cfg, NodeId(1), arena, 0)
            .expect("cluster side")
            .runner;
        r.members.join(OWNER, "mem:nobody-listens", Instant::now());
        // No heartbeat in these tests: `next_beat` shows only the backoff.
        r.next_beat = Instant::now() + Duration::from_secs(3600);
        r
    }

    const OWNER: u64 = 7;

    fn id_of(n: u32) -> ObjectId {
        let mut u = [0u8; 16];
        u[..4].copy_from_slice(&n.to_le_bytes());
        ObjectId::new(NodeId(OWNER), u)
    }

    /// The requests the runner has out for `id`'s pull or probe.
    fn asked_for(r: &Runner, id: ObjectId) -> Vec<u64> {
        let mut v: Vec<u64> = r
            .asked
            .iter()
            .filter(|(_, a)| {
                matches!(a, Asked::Lookup(x) | Asked::Probe(x, _) | Asked::Pin(x) if *x == id)
            })
            .map(|(&req, _)| req)
            .collect();
        v.sort_unstable();
        v
    }

    fn answer(r: &mut Runner, req: u64, status: Status, now: Instant) {
        let reply = msg::LookupReply {
            req,
            status: status as i32,
            data_size: 0,
            meta_size: 0,
            inlined: false,
            inline: Vec::new(),
            holders: Vec::new(),
            detail: String::new(),
            generation: 0,
        };
        r.lookup_reply(OWNER, reply, now);
    }

    /// Starts a pull of `id` and answers its lookup `Busy`.
    fn pull_refused_busy(r: &mut Runner, id: ObjectId, now: Instant) {
        r.core_message(ToCluster::Pull {
            id,
            timeout_ms: 60_000,
        });
        let req = *asked_for(r, id).last().expect("a lookup sent");
        answer(r, req, Status::Busy, now);
        assert!(
            asked_for(r, id).is_empty(),
            "the refused lookup is forgotten"
        );
    }

    fn drain(q: &SegQueue<ToCore>) -> Vec<ToCore> {
        std::iter::from_fn(|| q.pop()).collect()
    }

    /// Asking again after `Busy` costs `O(due + log n)`: with many pulls backing off, a step
    /// where none is due looks at one entry, and so does `next_beat`; the pulls refused
    /// together ask again at different times (jitter).
    #[test]
    fn backoff_work_does_not_grow_with_the_pulls_backing_off() {
        let mut r = runner();
        let now = Instant::now();
        const N: u32 = 2000;
        for n in 0..N {
            pull_refused_busy(&mut r, id_of(n), now);
        }
        r.backoff_visits.set(0);
        r.ask_again(now);
        let beat = r.next_beat();
        assert!(beat > now, "nothing is due yet");
        assert!(
            r.backoff_visits.get() <= 2,
            "a step with nothing due looked at {} backoff entries",
            r.backoff_visits.get()
        );
        // Half the first backoff at most is jitter: some pulls are due before the full 10 ms.
        let later = now + BUSY_BACKOFF * 3 / 4;
        r.backoff_visits.set(0);
        let before = r.asked.len();
        r.ask_again(later);
        let due = (r.asked.len() - before) as u64;
        assert!(
            due > 0 && due < u64::from(N),
            "jitter spreads the re-asks: {due} due"
        );
        assert!(
            r.backoff_visits.get() <= due + 1,
            "{} entries looked at for {due} due",
            r.backoff_visits.get()
        );
    }

    /// A pull whose owner connection fails during its backoff asks again at once, and not a
    /// second time when the backoff ends; a finished or cancelled pull leaves no wake-up.
    #[test]
    fn a_pull_leaves_its_backoff_when_it_asks_again_or_ends() {
        let mut r = runner();
        let now = Instant::now();
        let id = id_of(1);
        pull_refused_busy(&mut r, id, now);
        assert!(
            r.next_beat() < now + BUSY_BACKOFF_MAX,
            "the backoff wakes the loop"
        );
        r.source_failed(id, OWNER, "the connection dropped");
        assert_eq!(asked_for(&r, id).len(), 1, "asked again at once");
        r.ask_again(now + Duration::from_secs(5));
        assert_eq!(
            asked_for(&r, id).len(),
            1,
            "and not again when the backoff ends"
        );
        assert_eq!(r.pulls[&id].lookups, 2, "the Busy answer spent no lookup");

        let other = id_of(2);
        pull_refused_busy(&mut r, other, now);
        r.core_message(ToCluster::Cancel { id: other });
        assert!(r.backoff.is_empty(), "a cancelled pull leaves its backoff");
        assert!(
            drain(&r.to_core)
                .iter()
                .any(|m| matches!(m, ToCore::Cancelled { id: x } if *x == other)),
            "the core hears the cancel was taken"
        );
        assert_eq!(r.next_beat(), r.next_beat, "no wake-up for it");
    }

    /// A probe (a wait) answered `Busy` asks again after a backoff instead of reporting
    /// "not sealed" at once, and reports it only once its wait is over.
    #[test]
    fn a_probe_refused_busy_asks_again() {
        let mut r = runner();
        let now = Instant::now();
        let id = id_of(3);
        r.core_message(ToCluster::Probe {
            id,
            timeout_ms: 10_000,
        });
        let req = *asked_for(&r, id).last().expect("a probe sent");
        answer(&mut r, req, Status::Busy, now);
        let told = drain(&r.to_core);
        assert!(
            !told.iter().any(|m| matches!(m, ToCore::Probed { .. })),
            "a Busy probe is not an answer: {told:?}"
        );
        r.ask_again(now + BUSY_BACKOFF);
        let again = asked_for(&r, id);
        assert_eq!(again.len(), 1, "probed again");
        answer(&mut r, again[0], Status::Found, now + BUSY_BACKOFF);
        let told = drain(&r.to_core);
        assert!(
            told.iter()
                .any(|m| matches!(m, ToCore::Probed { id: x, sealed: true } if *x == id)),
            "{told:?}"
        );
        // Refused until its wait is over: then "not sealed".
        r.core_message(ToCluster::Probe { id, timeout_ms: 50 });
        let mut t = now;
        for _ in 0..10 {
            if let Some(&req) = asked_for(&r, id).last() {
                answer(&mut r, req, Status::Busy, t);
            }
            t += BUSY_BACKOFF_MAX;
            r.ask_again(t);
        }
        let told = drain(&r.to_core);
        assert!(
            told.iter()
                .any(|m| matches!(m, ToCore::Probed { id: x, sealed: false } if *x == id)),
            "{told:?}"
        );
        assert!(r.probes.is_empty() && r.backoff.is_empty());
    }

    /// The largest reply a node sends, with an object of [`inline_fit`] bytes inline, fits the
    /// cap it was computed for; tcp's cap fits a 64 KiB object, the smallest cap does not.
    #[test]
    fn inline_fit_leaves_room_for_the_largest_reply() {
        for cap in [
            ferroplasma_transport::MIN_CONTROL_MSG,
            ferroplasma_transport_tcp::MAX_CONTROL_MSG,
        ] {
            let fit = usize::try_from(inline_fit(cap)).expect("small");
            let r = msg::LookupReply {
                req: u64::MAX,
                status: Status::Found as i32,
                data_size: u64::MAX,
                meta_size: u64::MAX,
                inlined: true,
                inline: vec![0xa5; fit],
                holders: vec![u64::MAX; super::super::directory::MAX_HOLDERS + 1],
                detail: String::new(),
                generation: u64::MAX,
            };
            let len = Envelope::of(Body::LookupReply(r)).to_bytes().len();
            assert!(
                len <= cap,
                "cap {cap}: a reply inlining {fit} bytes is {len}"
            );
            assert!(
                len + 64 > cap,
                "cap {cap}: {fit} bytes wastes {}",
                cap - len
            );
        }
        assert!(inline_fit(ferroplasma_transport_tcp::MAX_CONTROL_MSG) >= 64 << 10);
        assert!(inline_fit(ferroplasma_transport::MIN_CONTROL_MSG) < 4 << 10);
    }
}
