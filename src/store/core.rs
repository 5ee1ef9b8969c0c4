//! The daemon's request handling as a state machine: decoded requests and the clock go in,
//! replies come out. Waiting requests (gets of unsealed objects, waits, creates that need
//! room) are parked here with their deadlines. No I/O: the server moves bytes, this decides.

use std::time::{Duration, Instant};

use std::collections::{HashMap, HashSet, VecDeque};

use super::table::{ClientId, CreateFail, FinishFail, RestoreOutcome, Table};
use crate::cluster::link::{ToCluster, ToCore, CLUSTER_CLIENT};
use crate::id::ObjectId;
use crate::protocol::{
    ClusterView, ErrorReply, MemberInfo, Op, Reply, Request, SpillEngineInUse, Stats, MAX_LIST,
    NO_TIMEOUT,
};
use crate::spill::worker::{Job, RestoreFail, SpillFail, SpillLoc};

/// How long a get waits for objects to come back from disk when it would not wait otherwise.
pub const RESTORE_GRACE: Duration = Duration::from_secs(30);
/// How long spilling pauses after the disk filled up or failed.
pub const SPILL_BACKOFF: Duration = Duration::from_secs(1);

/// When to spill.
#[derive(Debug, Clone, Copy)]
pub struct SpillPolicy {
    /// Start spilling when arena use passes this fraction.
    pub high_watermark: f64,
    /// Spill down to this fraction.
    pub low_watermark: f64,
}

impl Default for SpillPolicy {
    fn default() -> Self {
        Self {
            high_watermark: 0.8,
            low_watermark: 0.6,
        }
    }
}

/// Spill activity counters.
#[derive(Debug, Default, Clone, Copy)]
struct SpillCounters {
    spills: u64,
    restores: u64,
    disk_full: u64,
    failures: u64,
    corrupted: u64,
    /// The engine the spill thread runs (reported in stats).
    engine: SpillEngineInUse,
}

/// Where `put` payloads are written: the arena, or a plain buffer in tests.
pub trait ArenaWrite {
    /// Copies `bytes` to `offset`; `false` if out of bounds.
    fn write(&self, offset: u64, bytes: &[u8]) -> bool;
}

impl ArenaWrite for crate::shm::SharedMapping {
    fn write(&self, offset: u64, bytes: &[u8]) -> bool {
        self.write_at(offset, bytes)
    }
}

impl<T: ArenaWrite> ArenaWrite for std::sync::Arc<T> {
    fn write(&self, offset: u64, bytes: &[u8]) -> bool {
        (**self).write(offset, bytes)
    }
}

/// A reply to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// To whom.
    pub client: ClientId,
    /// Reply to which op.
    pub op: Op,
    /// Reply to which request.
    pub seq: u32,
    /// The result.
    pub reply: Result<Reply, ErrorReply>,
}

/// Static settings of the core.
#[derive(Debug, Clone, Copy)]
pub struct CoreConfig {
    /// Largest object `put` may carry inline.
    pub inline_threshold: u64,
    /// Whether hugepages back the arena (reported in stats).
    pub hugepages: bool,
    /// Most parked requests per client.
    pub max_pending_per_client: usize,
    /// Spill to disk under memory pressure (`None`: evict instead).
    pub spill: Option<SpillPolicy>,
    /// Part of a cluster: gets of objects owned elsewhere pull them, objects owned here are
    /// never evicted.
    pub cluster: bool,
}

#[derive(Debug)]
enum Parked {
    Get(Vec<ObjectId>),
    Wait {
        ids: Vec<ObjectId>,
        num_ready: u32,
    },
    Create {
        id: ObjectId,
        data_size: u64,
        meta_size: u64,
    },
    Put {
        id: ObjectId,
        data_len: u64,
        payload: Vec<u8>,
    },
}

#[derive(Debug)]
struct Pending {
    client: ClientId,
    seq: u32,
    deadline: Option<Instant>,
    /// The caller's own deadline (without the grace given to objects coming from disk or
    /// from other nodes).
    asked: Option<Instant>,
    what: Parked,
}

/// A pulled object waiting for room in the arena (first come, first served).
#[derive(Debug)]
struct QueuedPull {
    id: ObjectId,
    data_size: u64,
    meta_size: u64,
    inline: Option<Vec<u8>>,
}

/// The core's side of the cluster: pulls in progress and what the cluster thread is to do.
#[derive(Debug, Default)]
struct ClusterSide {
    view: ClusterView,
    /// Objects being pulled; `true` once their room is reserved.
    pulls: HashMap<ObjectId, bool>,
    queued: VecDeque<QueuedPull>,
    /// Probes in flight and when they started.
    probes: HashMap<ObjectId, Instant>,
    /// Remote objects known to be sealed at their owner (for waits).
    remote_sealed: HashSet<ObjectId>,
    outbox: Vec<ToCluster>,
    /// `admit_pulls` is running (it seals objects, which retries creates, which admits
    /// pulls: the inner call leaves the work to the outer loop).
    admitting: bool,
}

/// A caller's deadline closer than this counts as reached when a remote answer comes back.
const ASKED_SLACK: Duration = Duration::from_millis(5);

/// Most remote objects remembered as sealed for waits.
const MAX_REMOTE_SEALED: usize = 1 << 16;

/// Most bytes (ids and put payloads) held by parked requests of all clients together.
pub const MAX_PARKED_BYTES: usize = 64 << 20;

/// The request-handling state machine.
#[derive(Debug)]
pub struct Core<M> {
    table: Table,
    mem: M,
    cfg: CoreConfig,
    pending: Vec<Pending>,
    /// Earliest deadline and total bytes of `pending`, refreshed whenever it changes (the
    /// event loop asks for the deadline on every turn).
    next_deadline: Option<Instant>,
    parked_bytes: usize,
    /// Disk work for the spill thread.
    jobs: Vec<Job>,
    /// Bytes frozen by spills in flight.
    spilling: u64,
    spilling_items: std::collections::HashMap<u64, u64>,
    spill_paused_until: Option<Instant>,
    counters: SpillCounters,
    cluster: Option<ClusterSide>,
}

impl Parked {
    fn bytes(&self) -> usize {
        match self {
            Parked::Get(ids) | Parked::Wait { ids, .. } => ids.len() * ObjectId::LEN,
            Parked::Create { .. } => ObjectId::LEN,
            Parked::Put { payload, .. } => payload.len() + ObjectId::LEN,
        }
    }

    fn waits_for(&self, id: &ObjectId) -> bool {
        match self {
            Parked::Get(ids) | Parked::Wait { ids, .. } => ids.contains(id),
            _ => false,
        }
    }
}

fn deadline(now: Instant, timeout_ms: u64) -> Option<Instant> {
    if timeout_ms == NO_TIMEOUT {
        return None;
    }
    now.checked_add(Duration::from_millis(timeout_ms))
}

impl<M: ArenaWrite> Core<M> {
    /// A core over `table`, writing put payloads into `mem`.
    pub fn new(mut table: Table, mem: M, cfg: CoreConfig) -> Self {
        table.set_spilling(cfg.spill.is_some());
        table.set_cluster(cfg.cluster);
        if cfg.cluster {
            table.add_client(CLUSTER_CLIENT);
        }
        Self {
            table,
            mem,
            cfg,
            pending: Vec::new(),
            next_deadline: None,
            parked_bytes: 0,
            jobs: Vec::new(),
            spilling: 0,
            spilling_items: std::collections::HashMap::new(),
            spill_paused_until: None,
            counters: SpillCounters::default(),
            cluster: cfg.cluster.then(ClusterSide::default),
        }
    }

    /// Work for the cluster thread produced since the last call.
    pub fn take_cluster_jobs(&mut self) -> Vec<ToCluster> {
        let Some(cl) = &mut self.cluster else {
            return Vec::new();
        };
        let lost = self.table.take_lost_copies();
        if !lost.is_empty() {
            cl.outbox.push(ToCluster::CopiesLost(lost));
        }
        std::mem::take(&mut cl.outbox)
    }

    /// Whether gets or waits here wait for answers from other nodes.
    pub fn awaiting_cluster(&self) -> bool {
        self.cluster
            .as_ref()
            .is_some_and(|cl| !cl.pulls.is_empty() || !cl.probes.is_empty())
    }

    /// Whether `id` would be pulled from another node by a get here.
    fn remote(&self, id: &ObjectId) -> bool {
        self.cluster.is_some() && id.owner() != self.table.node() && !self.table.contains(id)
    }

    /// Asks the cluster thread to pull the remote objects among `ids` not already coming.
    fn pull_missing(&mut self, ids: &[ObjectId], timeout_ms: u64) {
        let missing: Vec<ObjectId> = ids.iter().filter(|id| self.remote(id)).copied().collect();
        let Some(cl) = &mut self.cluster else { return };
        for id in missing {
            if let std::collections::hash_map::Entry::Vacant(e) = cl.pulls.entry(id) {
                e.insert(false);
                cl.outbox.push(ToCluster::Pull { id, timeout_ms });
            }
        }
    }

    /// Asks the cluster thread whether the remote objects among `ids` are sealed.
    fn probe_missing(&mut self, ids: &[ObjectId], timeout_ms: u64, now: Instant) {
        let missing: Vec<ObjectId> = ids.iter().filter(|id| self.remote(id)).copied().collect();
        let Some(cl) = &mut self.cluster else { return };
        for id in missing {
            if !cl.remote_sealed.contains(&id) && cl.probes.insert(id, now).is_none() {
                cl.outbox.push(ToCluster::Probe { id, timeout_ms });
            }
        }
    }

    fn waited_for(&self, id: &ObjectId) -> bool {
        self.pending
            .iter()
            .any(|p| matches!(&p.what, Parked::Get(ids) if ids.contains(id)))
    }

    /// A message from the cluster thread.
    pub fn cluster_event(&mut self, ev: ToCore, now: Instant, out: &mut Vec<Outgoing>) {
        if self.cluster.is_none() {
            return;
        }
        match ev {
            ToCore::Call { seq, call } => {
                self.handle(CLUSTER_CLIENT, seq, call.request(), now, out)
            }
            ToCore::PullSized {
                id,
                data_size,
                meta_size,
            } => {
                if let Some(cl) = &mut self.cluster {
                    cl.queued.push_back(QueuedPull {
                        id,
                        data_size,
                        meta_size,
                        inline: None,
                    });
                }
                self.admit_pulls(now, out);
            }
            ToCore::PullInline {
                id,
                data_size,
                bytes,
            } => {
                let meta_size = bytes.len() as u64 - data_size.min(bytes.len() as u64);
                if let Some(cl) = &mut self.cluster {
                    cl.queued.push_back(QueuedPull {
                        id,
                        data_size: data_size.min(bytes.len() as u64),
                        meta_size,
                        inline: Some(bytes),
                    });
                }
                self.admit_pulls(now, out);
            }
            ToCore::PullDone { id } => {
                if let Some(cl) = &mut self.cluster {
                    cl.pulls.remove(&id);
                }
                if self.table.seal(CLUSTER_CLIENT, &id).is_ok() {
                    self.copy_sealed(id, now, out);
                }
            }
            ToCore::PullFailed { id, error } => {
                let reserved = self
                    .cluster
                    .as_mut()
                    .and_then(|cl| cl.pulls.remove(&id))
                    .unwrap_or(false);
                if let Some(cl) = &mut self.cluster {
                    cl.queued.retain(|q| q.id != id);
                }
                if reserved && self.table.abort(CLUSTER_CLIENT, &id).is_ok() {
                    self.retry_creates(now, out);
                }
                self.pull_failed(id, &error, now, out);
            }
            ToCore::Probed { id, sealed } => {
                let mut started = now;
                if let Some(cl) = &mut self.cluster {
                    started = cl.probes.remove(&id).unwrap_or(now);
                    if sealed {
                        if cl.remote_sealed.len() >= MAX_REMOTE_SEALED {
                            cl.remote_sealed.clear();
                        }
                        cl.remote_sealed.insert(id);
                    }
                }
                if sealed {
                    self.sealed(&id, out);
                } else {
                    // Waits that asked for longer than the owner waited ask again.
                    let longer = self.longest_wait(now, |w| w.waits_for(&id));
                    // Only after the owner waited (a quick failure means it is unreachable:
                    // asking again at once would spin).
                    let waited = now.saturating_duration_since(started) >= Duration::from_secs(1);
                    if let (Some(ms), true) = (longer, waited) {
                        self.probe_missing(&[id], ms, now);
                    }
                }
            }
            ToCore::CheckCopy {
                node,
                id,
                generation,
            } => {
                let current =
                    self.table.is_sealed(&id) && self.table.handle_of(&id) == Some(generation);
                if let Some(cl) = &mut self.cluster {
                    cl.outbox.push(ToCluster::CopyChecked { node, id, current });
                }
            }
            ToCore::View(v) => {
                if let Some(cl) = &mut self.cluster {
                    cl.view = v;
                }
            }
        }
    }

    /// A pull failed with `error`. Gets that asked to wait longer than the owner did (a
    /// timeout) pull again; the others get the error.
    fn pull_failed(
        &mut self,
        id: ObjectId,
        error: &ErrorReply,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        if matches!(error, ErrorReply::Timeout(_)) {
            let gets = |w: &Parked| matches!(w, Parked::Get(ids) if ids.contains(&id));
            let longer = self.longest_wait(now, gets);
            let soon = now + ASKED_SLACK;
            if self.expire_where(out, |p| gets(&p.what) && p.asked.is_some_and(|a| a <= soon)) {
                self.refresh_pending();
            }
            if let Some(ms) = longer {
                self.pull_missing(&[id], ms);
            }
            return;
        }
        self.fail_waiters(&id, error, out);
    }

    /// Reserves room for queued pulls, oldest first; a pull that does not fit makes room and
    /// holds back the ones behind it (no overtaking, no overcommit).
    fn admit_pulls(&mut self, now: Instant, out: &mut Vec<Outgoing>) {
        match &mut self.cluster {
            Some(cl) if !cl.admitting => cl.admitting = true,
            _ => return,
        }
        self.admit_queued(now, out);
        if let Some(cl) = &mut self.cluster {
            cl.admitting = false;
        }
    }

    fn admit_queued(&mut self, now: Instant, out: &mut Vec<Outgoing>) {
        loop {
            let Some(q) = self.cluster.as_mut().and_then(|cl| cl.queued.pop_front()) else {
                return;
            };
            if !self.waited_for(&q.id) || self.table.contains(&q.id) {
                // Nobody waits any more (timed out), or it arrived another way.
                if let Some(cl) = &mut self.cluster {
                    cl.pulls.remove(&q.id);
                    cl.outbox.push(ToCluster::Cancel { id: q.id });
                }
                continue;
            }
            match self
                .table
                .create_copy(CLUSTER_CLIENT, q.id, q.data_size, q.meta_size)
            {
                Ok(offset) => match q.inline {
                    Some(bytes) => {
                        let wrote = self.mem.write(offset, &bytes);
                        debug_assert!(wrote, "allocator handed out an offset outside the arena");
                        if let Some(cl) = &mut self.cluster {
                            cl.pulls.remove(&q.id);
                        }
                        if self.table.seal(CLUSTER_CLIENT, &q.id).is_ok() {
                            self.copy_sealed(q.id, now, out);
                        }
                    }
                    None => {
                        if let Some(cl) = &mut self.cluster {
                            cl.pulls.insert(q.id, true);
                            cl.outbox.push(ToCluster::Allocated { id: q.id, offset });
                        }
                        self.maybe_spill();
                    }
                },
                Err(CreateFail::NoRoom { requested, .. }) => {
                    self.make_room(requested);
                    if let Some(cl) = &mut self.cluster {
                        cl.queued.push_front(q);
                    }
                    return;
                }
                Err(f) => {
                    let node = self.table.node();
                    if let Some(cl) = &mut self.cluster {
                        cl.pulls.remove(&q.id);
                        cl.outbox.push(ToCluster::Cancel { id: q.id });
                    }
                    self.fail_waiters(&q.id, &create_error(node, q.id, f), out);
                }
            }
        }
    }

    fn copy_sealed(&mut self, id: ObjectId, now: Instant, out: &mut Vec<Outgoing>) {
        if let Some(cl) = &mut self.cluster {
            cl.outbox.push(ToCluster::CopyAdded(id));
        }
        self.sealed(&id, out);
        self.retry_creates(now, out);
    }

    /// Disk work produced since the last call, for the spill thread.
    pub fn take_jobs(&mut self) -> Vec<Job> {
        std::mem::take(&mut self.jobs)
    }

    fn refresh_pending(&mut self) {
        self.next_deadline = self
            .pending
            .iter()
            .filter_map(|p| p.deadline)
            .chain(self.spill_paused_until)
            .min();
        self.parked_bytes = self.pending.iter().map(|p| p.what.bytes()).sum();
    }

    /// The object table (read-only).
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// Where put payloads go.
    pub fn mem(&self) -> &M {
        &self.mem
    }

    /// A client connected.
    pub fn connect(&mut self, c: ClientId) {
        self.table.add_client(c);
    }

    /// A client went away (closed, crashed or was dropped): its pins go, its unsealed objects
    /// are aborted, its parked requests are forgotten.
    pub fn disconnect(&mut self, c: ClientId, now: Instant, out: &mut Vec<Outgoing>) {
        self.pending.retain(|p| p.client != c);
        self.refresh_pending();
        if self.table.remove_client(c) {
            self.retry_creates(now, out);
        }
    }

    /// The earliest deadline of a parked request.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.next_deadline
    }

    /// Number of parked requests.
    pub fn parked(&self) -> usize {
        self.pending.len()
    }

    /// Handles one request from `c`. Replies (to `c`, and to others whose parked requests
    /// this completes) are appended to `out`.
    pub fn handle(
        &mut self,
        c: ClientId,
        seq: u32,
        req: Request<'_>,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        let op = req.op();
        let mut reply = |reply| {
            out.push(Outgoing {
                client: c,
                op,
                seq,
                reply,
            });
        };
        match req {
            Request::Create {
                id,
                data_size,
                meta_size,
                timeout_ms,
            } => match self.table.create(c, id, data_size, meta_size) {
                Ok(offset) => {
                    reply(Ok(Reply::Created { offset }));
                    self.maybe_spill();
                }
                Err(CreateFail::NoRoom { requested, .. }) if timeout_ms > 0 => {
                    self.make_room(requested);
                    self.park(
                        c,
                        seq,
                        deadline(now, timeout_ms),
                        Parked::Create {
                            id,
                            data_size,
                            meta_size,
                        },
                        out,
                    );
                }
                Err(f) => {
                    if let CreateFail::NoRoom { requested, .. } = f {
                        self.make_room(requested);
                    }
                    reply(Err(create_error(self.table.node(), id, f)));
                }
            },
            Request::Put {
                id,
                data_len,
                timeout_ms,
                payload,
            } => {
                if payload.len() as u64 > self.cfg.inline_threshold {
                    return reply(Err(ErrorReply::TooLarge {
                        id,
                        requested: payload.len() as u64,
                        max: self.cfg.inline_threshold,
                    }));
                }
                match self.put(c, id, data_len, payload) {
                    Ok(()) => {
                        reply(Ok(Reply::Done));
                        self.sealed(&id, out);
                        self.retry_creates(now, out);
                    }
                    Err(CreateFail::NoRoom { requested, .. }) if timeout_ms > 0 => {
                        self.make_room(requested);
                        self.park(
                            c,
                            seq,
                            deadline(now, timeout_ms),
                            Parked::Put {
                                id,
                                data_len,
                                payload: payload.to_vec(),
                            },
                            out,
                        );
                    }
                    Err(f) => reply(Err(create_error(self.table.node(), id, f))),
                }
            }
            Request::Seal { id } => match self.table.seal(c, &id) {
                Ok(()) => {
                    reply(Ok(Reply::Done));
                    self.sealed(&id, out);
                    // The sealed object is evictable: a parked create may fit now.
                    self.retry_creates(now, out);
                }
                Err(f) => reply(Err(finish_error(id, f))),
            },
            Request::Abort { id } => match self.table.abort(c, &id) {
                Ok(()) => {
                    reply(Ok(Reply::Done));
                    self.retry_creates(now, out);
                }
                Err(f) => reply(Err(finish_error(id, f))),
            },
            Request::Get { ids, timeout_ms } => match self.table.get(c, &ids) {
                Some(locs) => reply(Ok(Reply::Objects(locs))),
                None => {
                    // The cluster thread's own gets (serving peers) never pull.
                    let pulls = c != CLUSTER_CLIENT;
                    let all_sealed = ids
                        .iter()
                        .all(|id| self.table.is_sealed(id) || (pulls && self.remote(id)));
                    let asked = deadline(now, timeout_ms);
                    if timeout_ms == 0 && !all_sealed {
                        reply(Err(ErrorReply::Timeout(self.table.not_ready(&ids))));
                    } else {
                        // Parked first, so that making room for the restores below does not
                        // pick this get's own resident objects.
                        let restore_ids = ids.clone();
                        // Objects coming back from disk are not "not ready": give them time
                        // even when the caller would not wait for a seal.
                        // Objects on other nodes: a caller that would not wait for a seal
                        // still gets them fetched if they exist; any other timeout bounds the
                        // whole get, transfer included.
                        let any_remote = pulls && ids.iter().any(|id| self.remote(id));
                        let ms = if all_sealed && !(any_remote && timeout_ms > 0) {
                            timeout_ms
                                .max(u64::try_from(RESTORE_GRACE.as_millis()).unwrap_or(u64::MAX))
                        } else {
                            timeout_ms
                        };
                        self.park_asked(c, seq, deadline(now, ms), asked, Parked::Get(ids), out);
                        self.restore(&restore_ids);
                        if pulls {
                            self.pull_missing(&restore_ids, timeout_ms);
                        }
                    }
                }
            },
            Request::Release { handles } => {
                let mut freed = false;
                for h in handles {
                    freed |= self.table.release(c, h);
                }
                if freed {
                    self.retry_creates(now, out);
                }
            }
            Request::Contains { id } => reply(Ok(Reply::Contains(self.table.is_sealed(&id)))),
            Request::Delete { ids } => {
                let owned: Vec<ObjectId> = ids
                    .iter()
                    .filter(|id| id.owner() == self.table.node() && self.table.is_sealed(id))
                    .copied()
                    .collect();
                if let (Some(cl), false) = (&mut self.cluster, owned.is_empty()) {
                    cl.outbox.push(ToCluster::Deleted(owned));
                }
                let (st, dead) = self.table.delete(&ids);
                self.jobs.extend(dead.into_iter().map(Job::Free));
                reply(Ok(Reply::Deleted(st)));
                self.retry_creates(now, out);
            }
            Request::Wait {
                ids,
                num_ready,
                timeout_ms,
            } => {
                let flags = self.ready_flags(&ids);
                let ready = flags.iter().filter(|&&f| f).count();
                let need = (num_ready as usize).min(ids.len());
                if ready >= need || timeout_ms == 0 {
                    reply(Ok(Reply::Ready(flags)));
                } else {
                    if c != CLUSTER_CLIENT {
                        self.probe_missing(&ids, timeout_ms, now);
                    }
                    self.park(
                        c,
                        seq,
                        deadline(now, timeout_ms),
                        Parked::Wait { ids, num_ready },
                        out,
                    );
                }
            }
            Request::List { after, max } => {
                let max = (max as usize).clamp(1, MAX_LIST);
                let (entries, more) = self.table.list(after.as_ref(), max);
                reply(Ok(Reply::Listed { entries, more }));
            }
            Request::Stats => reply(Ok(Reply::Stats(self.stats()))),
            Request::Nodes => reply(Ok(Reply::Nodes(self.view()))),
        }
    }

    /// Answers (as expired) and removes the parked requests `hit` picks. Returns whether
    /// there were any; the caller refreshes the pending summary.
    fn expire_where(&mut self, out: &mut Vec<Outgoing>, hit: impl Fn(&Pending) -> bool) -> bool {
        let before = self.pending.len();
        let mut i = 0;
        while i < self.pending.len() {
            if hit(&self.pending[i]) {
                let p = self.pending.remove(i);
                let (op, reply) = self.expire(&p.what);
                out.push(Outgoing {
                    client: p.client,
                    op,
                    seq: p.seq,
                    reply,
                });
            } else {
                i += 1;
            }
        }
        self.pending.len() != before
    }

    /// The longest wait, in milliseconds from `now`, that a parked request `which` picks
    /// asked its caller for (without grace), if any asked for longer than a moment.
    fn longest_wait(&self, now: Instant, which: impl Fn(&Parked) -> bool) -> Option<u64> {
        self.pending
            .iter()
            .filter(|p| which(&p.what))
            .filter_map(|p| match p.asked {
                None => Some(NO_TIMEOUT),
                Some(a) if a > now + ASKED_SLACK => {
                    Some(u64::try_from((a - now).as_millis()).unwrap_or(u64::MAX))
                }
                Some(_) => None,
            })
            .max()
    }

    /// Expires parked requests whose deadline has passed.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Outgoing>) {
        if self.next_deadline.is_none_or(|d| d > now) {
            return;
        }
        if self.spill_paused_until.is_some_and(|t| t <= now) {
            self.spill_paused_until = None;
            tracing::info!("retrying spilling");
            self.maybe_spill();
            self.retry_creates(now, out);
        }
        let expired_any = self.expire_where(out, |p| p.deadline.is_some_and(|d| d <= now));
        self.refresh_pending();
        // A queued pull whose gets expired no longer holds back the ones behind it.
        if expired_any
            && self
                .cluster
                .as_ref()
                .is_some_and(|cl| !cl.queued.is_empty())
        {
            self.admit_pulls(now, out);
        }
    }

    /// Records which engine the spill thread runs, for [`Core::stats`].
    pub fn set_spill_engine(&mut self, engine: SpillEngineInUse) {
        self.counters.engine = engine;
    }

    /// Current figures.
    pub fn stats(&self) -> Stats {
        let a = self.table.alloc_stats();
        let (spilled_objects, spilled_bytes) = self.table.spilled();
        let (objects, sealed, pinned_objects, pins, deferred_frees, evictions) =
            self.table.counts();
        Stats {
            node_id: self.table.node(),
            arena_bytes: a.capacity,
            used_bytes: a.allocated,
            largest_free: a.largest_free,
            objects,
            sealed,
            pinned_objects,
            pins,
            // The cluster thread's pseudo-client is not a client.
            clients: self.table.client_count() as u64 - u64::from(self.cluster.is_some()),
            hugepages: self.cfg.hugepages,
            evictions,
            creates_waiting: self
                .pending
                .iter()
                .filter(|p| matches!(p.what, Parked::Create { .. } | Parked::Put { .. }))
                .count() as u64,
            deferred_frees,
            inline_threshold: self.cfg.inline_threshold,
            spilled_objects,
            spilled_bytes,
            spills: self.counters.spills,
            restores: self.counters.restores,
            spill_disk_full: self.counters.disk_full,
            spill_paused: self.spill_paused_until.is_some(),
            corrupted: self.counters.corrupted,
            spill_engine: self.counters.engine,
        }
    }

    /// Spills unpinned objects, least recently used first, while use is above the high
    /// watermark, until what is not already being spilled is down to the low one. Judging by
    /// use including the spills in flight keeps the next batch queued behind the running one,
    /// so the disk does not idle between batches while creates wait for room.
    fn maybe_spill(&mut self) {
        let Some(policy) = self.cfg.spill else { return };
        let stats = self.table.alloc_stats();
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let (high, low) = (
            (stats.capacity as f64 * policy.high_watermark) as u64,
            (stats.capacity as f64 * policy.low_watermark) as u64,
        );
        if stats.allocated > high {
            let staying = stats.allocated.saturating_sub(self.spilling);
            self.spill_bytes(staying.saturating_sub(low));
        }
    }

    /// Makes room for a create or restore of `need` bytes that did not fit.
    fn make_room(&mut self, need: u64) {
        if self.cfg.spill.is_none() || self.spilling >= need {
            return;
        }
        self.spill_bytes(need - self.spilling);
        self.maybe_spill();
    }

    fn spill_bytes(&mut self, bytes: u64) {
        if self.spill_paused_until.is_some() || bytes == 0 {
            return;
        }
        let wanted = self.wanted();
        let items = self.table.pick_spill(bytes, |id| wanted.contains(id));
        if items.is_empty() {
            return;
        }
        for it in &items {
            let len = crate::shm::Allocator::reserved_len(it.data_size + it.meta_size);
            self.spilling += len;
            self.spilling_items.insert(it.handle, len);
        }
        self.jobs.push(Job::Spill(items));
    }

    /// Starts restores for the spilled objects among `ids` (as memory allows).
    fn restore(&mut self, ids: &[ObjectId]) {
        if self.cfg.spill.is_none() {
            return;
        }
        for h in self.table.on_disk(ids) {
            match self.table.start_restore(h) {
                Ok(Some(r)) => {
                    self.jobs.push(Job::Restore(r));
                    self.maybe_spill();
                }
                Ok(None) => {}
                Err(need) => self.make_room(need),
            }
        }
    }

    /// The spill thread finished writing object `handle`.
    pub fn spill_done(
        &mut self,
        handle: u64,
        result: Result<SpillLoc, SpillFail>,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        if let Some(len) = self.spilling_items.remove(&handle) {
            self.spilling -= len;
        }
        let settled = match result {
            Ok(loc) => {
                self.counters.spills += 1;
                self.table.spill_done(handle, Some(loc))
            }
            Err(fail) => {
                if self.spill_paused_until.is_none() {
                    match &fail {
                        SpillFail::DiskFull => tracing::warn!(
                            "spill disk full: spilling paused, objects stay in memory; creates that need room wait and then fail with ObjectStoreFull"
                        ),
                        SpillFail::Io(e) => tracing::error!(error = %e, "spilling failed; paused"),
                    }
                }
                match fail {
                    SpillFail::DiskFull => self.counters.disk_full += 1,
                    SpillFail::Io(_) => self.counters.failures += 1,
                }
                self.spill_paused_until = Some(now + SPILL_BACKOFF);
                self.refresh_pending();
                self.table.spill_done(handle, None)
            }
        };
        self.settle(settled, now, out);
        if !settled.freed {
            // Nothing was freed (the spill failed, or a reader pinned the object meanwhile),
            // but the bytes in flight dropped: waiting creates and restores may now ask for
            // other objects to be spilled.
            self.retry_creates(now, out);
        }
    }

    /// The spill thread finished restoring object `handle`.
    pub fn restore_done(
        &mut self,
        handle: u64,
        result: Result<(), RestoreFail>,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        let any_id = self.table.id_of(handle);
        // A deleted entry's id may already name a new object: leave that one's waiters alone.
        let live_id = any_id.filter(|id| self.table.handle_of(id) == Some(handle));
        let outcome = match &result {
            Ok(()) => RestoreOutcome::Restored,
            Err(RestoreFail::Corrupted { .. }) => RestoreOutcome::Corrupted,
            Err(RestoreFail::Io(_)) => RestoreOutcome::Failed,
        };
        let settled = self.table.restore_done(handle, outcome);
        match result {
            Ok(()) => {
                self.counters.restores += 1;
                self.settle(settled, now, out);
                if let (true, Some(id)) = (settled.resident, live_id) {
                    self.sealed(&id, out);
                }
            }
            Err(fail) => {
                let error = |id: ObjectId| match &fail {
                    RestoreFail::Corrupted { file, reason } => ErrorReply::Corrupted {
                        id,
                        detail: format!("{}: {reason}", file.display()),
                    },
                    RestoreFail::Io(e) => ErrorReply::RestoreFailed {
                        id,
                        detail: e.clone(),
                    },
                };
                match &fail {
                    RestoreFail::Corrupted { .. } => self.counters.corrupted += 1,
                    RestoreFail::Io(_) => self.counters.failures += 1,
                }
                if let Some(id) = any_id {
                    tracing::error!(%id, error = ?fail, "restore failed");
                }
                if let Some(id) = live_id {
                    self.fail_waiters(&id, &error(id), out);
                }
                self.settle(settled, now, out);
            }
        }
    }

    fn settle(
        &mut self,
        settled: crate::store::table::Settled,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        if let Some(loc) = settled.dead_record {
            self.jobs.push(Job::Free(loc));
        }
        if settled.freed {
            self.retry_creates(now, out);
        }
    }

    /// Answers every parked get waiting on `id` with `err`.
    fn fail_waiters(&mut self, id: &ObjectId, err: &ErrorReply, out: &mut Vec<Outgoing>) {
        let before = self.pending.len();
        let mut i = 0;
        while i < self.pending.len() {
            if matches!(&self.pending[i].what, Parked::Get(ids) if ids.contains(id)) {
                let p = self.pending.remove(i);
                out.push(Outgoing {
                    client: p.client,
                    op: Op::Get,
                    seq: p.seq,
                    reply: Err(err.clone()),
                });
            } else {
                i += 1;
            }
        }
        if self.pending.len() != before {
            self.refresh_pending();
        }
    }

    fn put(
        &mut self,
        c: ClientId,
        id: ObjectId,
        data_len: u64,
        payload: &[u8],
    ) -> Result<(), CreateFail> {
        let meta = payload.len() as u64 - data_len;
        let offset = self.table.create(c, id, data_len, meta)?;
        let wrote = self.mem.write(offset, payload);
        debug_assert!(wrote, "allocator handed out an offset outside the arena");
        let sealed = self.table.seal(c, &id);
        debug_assert!(sealed.is_ok());
        self.maybe_spill();
        Ok(())
    }

    /// The ids a get still waits for: not sealed, or sealed but not back from disk.
    fn not_resident(&self, ids: &[ObjectId]) -> Vec<ObjectId> {
        ids.iter()
            .filter(|id| !self.table.is_resident(id))
            .copied()
            .collect()
    }

    /// Ids that parked gets wait for: not to be spilled while they wait.
    ///
    /// Only the oldest parked get whose ids are all sealed is protected: protecting every
    /// waiting get could leave two gets each holding what the other needs room for, or keep a
    /// producer from making room for the very object a get waits to be sealed.
    fn wanted(&self) -> std::collections::HashSet<ObjectId> {
        self.pending
            .iter()
            .find_map(|p| match &p.what {
                Parked::Get(ids) if ids.iter().all(|id| self.table.is_sealed(id)) => Some(ids),
                _ => None,
            })
            .map(|ids| ids.iter().copied().collect())
            .unwrap_or_default()
    }

    fn ready_flags(&self, ids: &[ObjectId]) -> Vec<bool> {
        ids.iter().map(|id| self.is_ready(id)).collect()
    }

    /// Sealed here, or (for waits) known to be sealed at its owner.
    fn is_ready(&self, id: &ObjectId) -> bool {
        self.table.is_sealed(id)
            || self
                .cluster
                .as_ref()
                .is_some_and(|cl| cl.remote_sealed.contains(id))
    }

    /// The cluster as this node sees it (just itself without a cluster).
    pub fn view(&self) -> ClusterView {
        match &self.cluster {
            Some(cl) if !cl.view.members.is_empty() => cl.view.clone(),
            other => ClusterView {
                transport: other
                    .as_ref()
                    .map(|cl| cl.view.transport.clone())
                    .unwrap_or_default(),
                epoch: 0,
                members: vec![MemberInfo {
                    node_id: self.table.node(),
                    addr: String::new(),
                    alive: true,
                    head: true,
                    this: true,
                }],
            },
        }
    }

    fn park(
        &mut self,
        c: ClientId,
        seq: u32,
        deadline: Option<Instant>,
        what: Parked,
        out: &mut Vec<Outgoing>,
    ) {
        self.park_asked(c, seq, deadline, deadline, what, out);
    }

    fn park_asked(
        &mut self,
        c: ClientId,
        seq: u32,
        deadline: Option<Instant>,
        asked: Option<Instant>,
        what: Parked,
        out: &mut Vec<Outgoing>,
    ) {
        let mine = self.pending.iter().filter(|p| p.client == c).count();
        // The cluster thread parks on behalf of every peer; the global byte bound still holds.
        if c != CLUSTER_CLIENT && mine >= self.cfg.max_pending_per_client {
            let op = parked_op(&what);
            out.push(Outgoing {
                client: c,
                op,
                seq,
                reply: Err(ErrorReply::Invalid(format!(
                    "more than {} waiting requests from one client",
                    self.cfg.max_pending_per_client
                ))),
            });
            return;
        }
        if self.parked_bytes + what.bytes() > MAX_PARKED_BYTES {
            out.push(Outgoing {
                client: c,
                op: parked_op(&what),
                seq,
                reply: Err(ErrorReply::Invalid(format!(
                    "the node holds {MAX_PARKED_BYTES} bytes of waiting requests already"
                ))),
            });
            return;
        }
        self.pending.push(Pending {
            client: c,
            seq,
            deadline,
            asked,
            what,
        });
        self.refresh_pending();
    }

    fn expire(&self, what: &Parked) -> (Op, Result<Reply, ErrorReply>) {
        match what {
            Parked::Get(ids) => (Op::Get, Err(ErrorReply::Timeout(self.not_resident(ids)))),
            Parked::Wait { ids, .. } => (Op::Wait, Ok(Reply::Ready(self.ready_flags(ids)))),
            Parked::Create {
                id,
                data_size,
                meta_size,
            } => (
                Op::Create,
                Err(self.full_error(*id, data_size.saturating_add(*meta_size))),
            ),
            Parked::Put { id, payload, .. } => {
                (Op::Put, Err(self.full_error(*id, payload.len() as u64)))
            }
        }
    }

    fn full_error(&self, id: ObjectId, requested: u64) -> ErrorReply {
        let a = self.table.alloc_stats();
        ErrorReply::StoreFull {
            id,
            requested,
            free: a.free,
            largest_free: a.largest_free,
        }
    }

    /// `id` was sealed: complete the parked gets and waits on it that are now satisfied.
    fn sealed(&mut self, id: &ObjectId, out: &mut Vec<Outgoing>) {
        if self.pending.is_empty() {
            return;
        }
        let before = self.pending.len();
        let mut i = 0;
        while i < self.pending.len() {
            let p = &self.pending[i];
            if !p.what.waits_for(id) {
                i += 1;
                continue;
            }
            let done = match &p.what {
                Parked::Get(ids) => ids.iter().all(|id| self.table.is_resident(id)),
                Parked::Wait { ids, num_ready } => {
                    let ready = ids.iter().filter(|id| self.is_ready(id)).count();
                    ready >= (*num_ready as usize).min(ids.len())
                }
                _ => false,
            };
            if !done {
                i += 1;
                continue;
            }
            let p = self.pending.remove(i);
            let (op, reply) = match p.what {
                Parked::Get(ids) => match self.table.get(p.client, &ids) {
                    Some(locs) => (Op::Get, Ok(Reply::Objects(locs))),
                    None => (
                        Op::Get,
                        Err(ErrorReply::Timeout(self.table.not_ready(&ids))),
                    ),
                },
                Parked::Wait { ids, .. } => (Op::Wait, Ok(Reply::Ready(self.ready_flags(&ids)))),
                _ => continue,
            };
            out.push(Outgoing {
                client: p.client,
                op,
                seq: p.seq,
                reply,
            });
        }
        if self.pending.len() != before {
            self.refresh_pending();
        }
    }

    /// Memory was freed or became evictable: give parked creates, oldest first, another
    /// chance.
    fn retry_creates(&mut self, now: Instant, out: &mut Vec<Outgoing>) {
        if self.pending.is_empty() {
            return;
        }
        let node = self.table.node();
        let before = self.pending.len();
        let mut sealed_ids = Vec::new();
        let mut i = 0;
        while i < self.pending.len() {
            let p = &self.pending[i];
            let (client, seq) = (p.client, p.seq);
            let result = match &p.what {
                Parked::Create {
                    id,
                    data_size,
                    meta_size,
                } => Some(
                    self.table
                        .create(client, *id, *data_size, *meta_size)
                        .map(|offset| (Op::Create, Reply::Created { offset }))
                        .map_err(|f| (Op::Create, create_error(node, *id, f), f)),
                ),
                Parked::Put { id, data_len, .. } => {
                    let (id, data_len) = (*id, *data_len);
                    // Borrow the payload by moving it out for the attempt and back after.
                    let payload = match &mut self.pending[i].what {
                        Parked::Put { payload, .. } => std::mem::take(payload),
                        _ => Vec::new(),
                    };
                    let r = self.put(client, id, data_len, &payload);
                    if let Parked::Put { payload: slot, .. } = &mut self.pending[i].what {
                        *slot = payload;
                    }
                    Some(
                        r.map(|()| (Op::Put, Reply::Done))
                            .map_err(|f| (Op::Put, create_error(node, id, f), f)),
                    )
                }
                _ => None,
            };
            match result {
                Some(Err((_, _, CreateFail::NoRoom { requested, .. }))) => {
                    self.make_room(requested);
                    i += 1;
                }
                None => i += 1,
                Some(r) => {
                    let done = self.pending.remove(i);
                    let (op, reply) = match r {
                        Ok((op, rep)) => {
                            if let Parked::Put { id, .. } = &done.what {
                                sealed_ids.push(*id);
                            }
                            (op, Ok(rep))
                        }
                        Err((op, e, _)) => (op, Err(e)),
                    };
                    out.push(Outgoing {
                        client,
                        op,
                        seq,
                        reply,
                    });
                }
            }
        }
        if self.pending.len() != before {
            self.refresh_pending();
        }
        for id in sealed_ids {
            self.sealed(&id, out);
        }
        if self
            .cluster
            .as_ref()
            .is_some_and(|cl| !cl.queued.is_empty())
        {
            self.admit_pulls(now, out);
        }
        // Parked gets whose objects wait on disk for room.
        if self.cfg.spill.is_some() {
            let waiting: Vec<Vec<ObjectId>> = self
                .pending
                .iter()
                .filter_map(|p| match &p.what {
                    Parked::Get(ids) => Some(ids.clone()),
                    _ => None,
                })
                .collect();
            for ids in waiting {
                self.restore(&ids);
            }
        }
    }
}

fn parked_op(what: &Parked) -> Op {
    match what {
        Parked::Get(_) => Op::Get,
        Parked::Wait { .. } => Op::Wait,
        Parked::Create { .. } => Op::Create,
        Parked::Put { .. } => Op::Put,
    }
}

fn create_error(node: crate::id::NodeId, id: ObjectId, f: CreateFail) -> ErrorReply {
    match f {
        CreateFail::Exists => ErrorReply::AlreadyExists(id),
        CreateFail::Foreign => ErrorReply::ForeignOwner { id, node },
        CreateFail::TooLarge { requested, max } => ErrorReply::TooLarge { id, requested, max },
        CreateFail::NoRoom {
            requested,
            free,
            largest_free,
        } => ErrorReply::StoreFull {
            id,
            requested,
            free,
            largest_free,
        },
    }
}

fn finish_error(id: ObjectId, f: FinishFail) -> ErrorReply {
    match f {
        FinishFail::NotFound => ErrorReply::NotFound(id),
        FinishFail::AlreadySealed => ErrorReply::AlreadySealed(id),
        FinishFail::NotCreator => ErrorReply::NotCreator(id),
    }
}
