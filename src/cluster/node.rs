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
//!
//! This file holds the runner's state, construction, stepping, calls to the core, connections
//! and membership; `node/dispatch.rs` routes messages from peers and from the core (copy
//! reports included), `node/serve.rs` answers peers' lookups and pins (leases, grants),
//! `node/pull.rs` runs this node's pulls and probes (`Busy` backoff, reads), and
//! `node/wire.rs` holds the encoding helpers.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_queue::SegQueue;
use ferroplasma_transport::msg::{self, Body};
use ferroplasma_transport::{Event, GrantId, PeerId, Transport};

use super::directory::Directory;
use super::membership::{Change, Membership};
use crate::id::{NodeId, ObjectId};
use crate::shm::SharedMapping;
use crate::store::link::{CoreCall, ToCluster, ToCore};

mod dispatch;
mod pull;
mod serve;
mod wire;

use wire::encode_capped;
pub use wire::inline_fit;

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
                let v = self.view();
                self.push_core(ToCore::View(v));
            }
            if !busy {
                break;
            }
            any = true;
        }
        any
    }

    /// The membership view for `stat`, with how the transport reaches each member.
    fn view(&self) -> crate::protocol::ClusterView {
        let mut v = self.members.view(self.t.kind());
        for m in &mut v.members {
            let Some(&peer) = self.conns.by_node.get(&m.node_id.0) else {
                continue;
            };
            match self.t.peer_path(peer) {
                Some(p) => {
                    m.transport = p.kind.to_string();
                    m.transport_reason = p.reason;
                }
                None => m.transport = self.t.kind().to_string(),
            }
        }
        v.status = self
            .t
            .status()
            .into_iter()
            .map(|(k, val)| (k.to_string(), val))
            .collect();
        v
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
        // Each member's transport (a peer can leave RDMA for TCP) refreshes with the beat.
        self.view_dirty = true;
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
}

#[cfg(test)]
mod tests;
