//! The core's side of the cluster: pulls of remote objects (one per object however many gets
//! wait), their admission into the arena (in arrival order, no overcommit: allocating is
//! admission), probes for waits, and the messages to and from the cluster side.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::core::{create_error, ArenaWrite, Core, Outgoing};
use super::link::{ToCluster, ToCore, CLUSTER_CLIENT};
use super::parking::{Parker, Ticket, ASKED_SLACK};
use super::table::CreateFail;
use crate::id::ObjectId;
use crate::protocol::{ClusterView, ErrorReply, MemberInfo};

/// A pulled object waiting for room in the arena (first come, first served).
#[derive(Debug)]
pub(super) struct QueuedPull {
    id: ObjectId,
    data_size: u64,
    meta_size: u64,
    inline: Option<Vec<u8>>,
}

/// The core's side of the cluster: pulls in progress and what the cluster side is to do.
#[derive(Debug, Default)]
pub(super) struct ClusterSide {
    pub view: ClusterView,
    /// Objects being pulled; `true` once their room is reserved.
    pub pulls: HashMap<ObjectId, bool>,
    pub queued: VecDeque<QueuedPull>,
    /// Pulls cancelled whose [`ToCore::Cancelled`] has not come back yet (how many
    /// cancels): messages about these pulls are stale.
    pub cancelling: HashMap<ObjectId, u32>,
    /// Probes in flight and when they started.
    pub probes: HashMap<ObjectId, Instant>,
    /// Remote objects known to be sealed at their owner (for waits).
    pub remote_sealed: HashSet<ObjectId>,
    pub outbox: Vec<ToCluster>,
    /// `admit_pulls` is running (it seals objects, which retries creates, which admits
    /// pulls: the inner call leaves the work to the outer loop).
    pub admitting: bool,
}

impl ClusterSide {
    /// Tells the cluster side to stop pulling `id`.
    fn cancel(&mut self, id: ObjectId) {
        *self.cancelling.entry(id).or_insert(0) += 1;
        self.outbox.push(ToCluster::Cancel { id });
    }

    /// Whether a message about the pull of `id` predates its cancel.
    fn stale(&self, ev: &ToCore) -> bool {
        match ev {
            ToCore::PullSized { id, .. }
            | ToCore::PullInline { id, .. }
            | ToCore::PullDone { id }
            | ToCore::PullFailed { id, .. } => self.cancelling.contains_key(id),
            _ => false,
        }
    }
}

/// Most remote objects remembered as sealed for waits.
const MAX_REMOTE_SEALED: usize = 1 << 16;

impl<M: ArenaWrite> Core<M> {
    /// Work for the cluster side produced since the last call.
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
    pub(super) fn remote(&self, id: &ObjectId) -> bool {
        self.cluster.is_some() && id.owner() != self.table.node() && !self.table.contains(id)
    }

    /// Asks the cluster side to pull the remote objects among `ids` not already coming.
    pub(super) fn pull_missing(&mut self, ids: &[ObjectId], timeout_ms: u64) {
        let missing: Vec<ObjectId> = ids.iter().filter(|id| self.remote(id)).copied().collect();
        let Some(cl) = &mut self.cluster else { return };
        for id in missing {
            if let std::collections::hash_map::Entry::Vacant(e) = cl.pulls.entry(id) {
                e.insert(false);
                cl.outbox.push(ToCluster::Pull { id, timeout_ms });
            }
        }
    }

    /// Asks the cluster side whether the remote objects among `ids` are sealed.
    pub(super) fn probe_missing(&mut self, ids: &[ObjectId], timeout_ms: u64, now: Instant) {
        let missing: Vec<ObjectId> = ids.iter().filter(|id| self.remote(id)).copied().collect();
        let Some(cl) = &mut self.cluster else { return };
        for id in missing {
            if !cl.remote_sealed.contains(&id) && cl.probes.insert(id, now).is_none() {
                cl.outbox.push(ToCluster::Probe { id, timeout_ms });
            }
        }
    }

    /// A message from the cluster side.
    pub fn cluster_event(&mut self, ev: ToCore, now: Instant, out: &mut Vec<Outgoing>) {
        match &self.cluster {
            Some(cl) if !cl.stale(&ev) => {}
            _ => return,
        }
        match ev {
            ToCore::Cancelled { id } => {
                if let Some(cl) = &mut self.cluster {
                    if let Some(n) = cl.cancelling.get_mut(&id) {
                        *n -= 1;
                        if *n == 0 {
                            cl.cancelling.remove(&id);
                        }
                    }
                }
            }
            ToCore::Call { seq, peer, call } => {
                let by = Parker {
                    client: CLUSTER_CLIENT,
                    peer,
                };
                self.dispatch(by, seq, call.request(), now, out);
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
                    let longer = self.longest_wait(now, &self.parking.waiting_on(&id));
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
            ToCore::PeerGone(node) => self.forget_parked_by(Parker {
                client: CLUSTER_CLIENT,
                peer: Some(node),
            }),
            ToCore::View(v) => {
                if let Some(cl) = &mut self.cluster {
                    cl.view = v;
                }
            }
        }
    }

    /// A pull failed with `error`. Gets that asked to wait longer than the owner did (a
    /// timeout) pull again; the others get the error.
    pub(super) fn pull_failed(
        &mut self,
        id: ObjectId,
        error: &ErrorReply,
        now: Instant,
        out: &mut Vec<Outgoing>,
    ) {
        if matches!(error, ErrorReply::Timeout(_)) {
            let gets = self.parking.gets_of(&id);
            let longer = self.longest_wait(now, &gets);
            let soon = now + ASKED_SLACK;
            let due: Vec<Ticket> = gets
                .into_iter()
                .filter(|&t| {
                    self.parking
                        .get(t)
                        .is_some_and(|p| p.asked.is_some_and(|a| a <= soon))
                })
                .collect();
            self.expire_tickets(due, out);
            if let Some(ms) = longer {
                self.pull_missing(&[id], ms);
            }
            return;
        }
        self.fail_waiters(&id, error, out);
    }

    /// Cancels the pulls of `ids` that no parked get waits for any more (their gets expired,
    /// failed or left), whatever their phase before their room is reserved: the cluster side
    /// stops asking (a pull refused `Busy` would ask again for nobody) and forgets it. A pull
    /// whose room is reserved finishes (its read writes there; the copy stays).
    pub(super) fn cancel_unwanted_pulls(&mut self, ids: Vec<ObjectId>) {
        if ids.is_empty() || self.cluster.as_ref().is_none_or(|cl| cl.pulls.is_empty()) {
            return;
        }
        let mut gone = HashSet::new();
        for id in ids {
            let unreserved = self
                .cluster
                .as_ref()
                .is_some_and(|cl| cl.pulls.get(&id) == Some(&false));
            if !unreserved || self.parking.has_get_on(&id) {
                continue;
            }
            if let Some(cl) = &mut self.cluster {
                cl.pulls.remove(&id);
                cl.cancel(id);
            }
            gone.insert(id);
        }
        if let Some(cl) = &mut self.cluster {
            if !gone.is_empty() {
                cl.queued.retain(|q| !gone.contains(&q.id));
            }
        }
    }

    /// Reserves room for queued pulls, oldest first; a pull that does not fit makes room and
    /// holds back the ones behind it (no overtaking, no overcommit).
    pub(super) fn admit_pulls(&mut self, now: Instant, out: &mut Vec<Outgoing>) {
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
                    cl.cancel(q.id);
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
                        cl.cancel(q.id);
                    }
                    self.fail_waiters(&q.id, &create_error(node, q.id, f), out);
                }
            }
        }
    }

    pub(super) fn copy_sealed(&mut self, id: ObjectId, now: Instant, out: &mut Vec<Outgoing>) {
        if let Some(cl) = &mut self.cluster {
            cl.outbox.push(ToCluster::CopyAdded(id));
        }
        self.sealed(&id, out);
        self.retry_creates(now, out);
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
                    transport: String::new(),
                    transport_reason: String::new(),
                }],
                status: Vec::new(),
            },
        }
    }

    /// Whether pulled objects wait for room.
    pub(super) fn pulls_queued(&self) -> bool {
        self.cluster
            .as_ref()
            .is_some_and(|cl| !cl.queued.is_empty())
    }
}
