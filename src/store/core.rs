//! The daemon's request handling as a state machine: decoded requests and the clock go in,
//! replies come out. No I/O: the server moves bytes, this decides. This file dispatches
//! requests and counts; waiting requests are parked by `parking`, spilling is decided in
//! `spilling`, pulls from other nodes are admitted in `admission`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::admission::ClusterSide;
use super::link::{ToCluster, CLUSTER_CLIENT};
use super::parking::{Parked, Parker, Parking};
use super::spilling::{SpillCounters, SpillPolicy};
use super::table::{ClientId, CreateFail, FinishFail, Table};
use crate::id::ObjectId;
use crate::protocol::{
    ErrorReply, Op, Reply, Request, SpillEngineInUse, Stats, MAX_LIST, NO_TIMEOUT,
};
use crate::spill::job::Job;

/// How long a get waits for objects to come back from disk when it would not wait otherwise.
pub const RESTORE_GRACE: Duration = Duration::from_secs(30);

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

/// The request-handling state machine.
#[derive(Debug)]
pub struct Core<M> {
    pub(super) table: Table,
    pub(super) mem: M,
    pub(super) cfg: CoreConfig,
    pub(super) parking: Parking,
    /// Disk work for the spill thread.
    pub(super) jobs: Vec<Job>,
    /// Bytes frozen by spills in flight.
    pub(super) spilling: u64,
    pub(super) spilling_items: HashMap<u64, u64>,
    pub(super) spill_paused_until: Option<Instant>,
    pub(super) counters: SpillCounters,
    pub(super) cluster: Option<ClusterSide>,
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
            parking: Parking::default(),
            jobs: Vec::new(),
            spilling: 0,
            spilling_items: HashMap::new(),
            spill_paused_until: None,
            counters: SpillCounters::default(),
            cluster: cfg.cluster.then(ClusterSide::default),
        }
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
        self.forget_parked(c);
        if self.table.remove_client(c) {
            self.retry_creates(now, out);
        }
    }

    /// The earliest deadline of a parked request.
    pub fn next_deadline(&self) -> Option<Instant> {
        match (self.parking.next_deadline(), self.spill_paused_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Parked requests looked at so far (tests bound the work of an operation with it).
    pub fn parked_visits(&self) -> u64 {
        self.parking.visits()
    }

    /// Ids of parked requests checked for readiness so far (tests bound the work of a seal
    /// with it).
    pub fn parked_id_checks(&self) -> u64 {
        self.parking.id_checks()
    }

    /// Slots of the index of parked requests by id.
    #[cfg(test)]
    pub(crate) fn parked_id_slots(&self) -> usize {
        self.parking.id_slots()
    }

    /// Number of parked requests.
    pub fn parked(&self) -> usize {
        self.parking.len()
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
        self.dispatch(Parker::local(c), seq, req, now, out);
    }

    /// Handles one request from `by` (a local client, or the cluster side for a peer).
    pub(super) fn dispatch(
        &mut self,
        by: Parker,
        seq: u32,
        req: Request<'_>,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        let c = by.client;
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
                        by,
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
                            by,
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
                    // The cluster side's own gets (serving peers) never pull.
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
                        self.park_asked(by, seq, deadline(now, ms), asked, Parked::Get(ids), out);
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
                        by,
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
            // The cluster side's pseudo-client is not a client.
            clients: self.table.client_count() as u64 - u64::from(self.cluster.is_some()),
            hugepages: self.cfg.hugepages,
            evictions,
            creates_waiting: self.parking.creates_waiting() as u64,
            gets_waiting: self.parking.gets_waiting() as u64,
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

    pub(super) fn put(
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
    pub(super) fn not_resident(&self, ids: &[ObjectId]) -> Vec<ObjectId> {
        ids.iter()
            .filter(|id| !self.table.is_resident(id))
            .copied()
            .collect()
    }

    pub(super) fn ready_flags(&self, ids: &[ObjectId]) -> Vec<bool> {
        ids.iter().map(|id| self.is_ready(id)).collect()
    }

    /// Sealed here, or (for waits) known to be sealed at its owner.
    pub(super) fn is_ready(&self, id: &ObjectId) -> bool {
        self.table.is_sealed(id)
            || self
                .cluster
                .as_ref()
                .is_some_and(|cl| cl.remote_sealed.contains(id))
    }
}

pub(super) fn create_error(node: crate::id::NodeId, id: ObjectId, f: CreateFail) -> ErrorReply {
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
