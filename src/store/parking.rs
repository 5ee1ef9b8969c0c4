//! Parked requests: gets of unsealed objects, waits, and creates or puts waiting for room,
//! each with its deadline, until a seal, a free or the deadline completes them.
//!
//! [`Parking`] indexes them so that no operation looks at unrelated ones: by object id (the
//! gets and waits a seal may complete), by deadline (what `tick` expires), by whom they
//! belong to (the per-client and per-peer caps, a disconnect), and the creates in arrival
//! order (what a free retries). Every index is ordered by arrival (a ticket number), so
//! answers come out in the order the requests came in, as they always did.

use std::cell::Cell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use super::core::{create_error, ArenaWrite, Core, Outgoing};
use super::link::CLUSTER_CLIENT;
use super::table::{ClientId, CreateFail};
use crate::id::{NodeId, ObjectId};
use crate::protocol::{ErrorReply, Op, Reply, NO_TIMEOUT};

/// Most bytes (ids with their index entries, and put payloads) held by parked requests of
/// all clients together.
pub const MAX_PARKED_BYTES: usize = 64 << 20;

/// What one id a parked get or wait waits on is charged against [`MAX_PARKED_BYTES`]: the id
/// in the request, and its share of the `by_id` index: a hash map entry (id, bucket and a
/// control byte) at the map's lowest load after growing (7/16, so about 2.3 slots per entry,
/// charged as 5/2), and the request's ticket in a shared bucket (a B-tree node at least half
/// full: up to 2 × 8 bytes). 24 + 5/2 × (24 + 16 + 1) + 16 = 142 bytes on 64-bit targets. An
/// id waited on by several requests is charged to each, so this bounds the real cost from
/// above for the index as for the requests. Measured: 80 bytes of resident memory per waited
/// id for 2 × 48 gets of 4096 distinct ids (`parked_id_cost_covers_the_measured_memory`).
pub const PARKED_ID_COST: usize = size_of::<ObjectId>()
    + (size_of::<(ObjectId, Waiters)>() + 1) * 5 / 2
    + 2 * size_of::<Ticket>();

/// Maps are shrunk when they fall below a quarter of their capacity, if larger than this.
const SHRINK_ABOVE: usize = 64;

/// Most parked requests the cluster side may hold for one peer (its lookups, probes and pins
/// waiting here). A local client's cap is `CoreConfig::max_pending_per_client`.
pub const MAX_PARKED_PER_PEER: usize = 4096;

/// A caller's deadline closer than this counts as reached when a remote answer comes back.
pub(super) const ASKED_SLACK: Duration = Duration::from_millis(5);

/// Who a parked request belongs to: a local client, or the cluster side on behalf of a peer
/// node (`peer` is `None` for local clients and the cluster side's own requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Parker {
    pub client: ClientId,
    pub peer: Option<NodeId>,
}

impl Parker {
    pub fn local(client: ClientId) -> Self {
        Self { client, peer: None }
    }
}

#[derive(Debug)]
pub(super) enum Parked {
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

impl Parked {
    fn bytes(&self) -> usize {
        match self {
            Parked::Get(ids) | Parked::Wait { ids, .. } => ids.len() * PARKED_ID_COST,
            Parked::Create { .. } => ObjectId::LEN,
            Parked::Put { payload, .. } => payload.len() + ObjectId::LEN,
        }
    }

    /// The ids a seal of which may complete this request.
    fn waits_on(&self) -> &[ObjectId] {
        match self {
            Parked::Get(ids) | Parked::Wait { ids, .. } => ids,
            _ => &[],
        }
    }

    fn op(&self) -> Op {
        match self {
            Parked::Get(_) => Op::Get,
            Parked::Wait { .. } => Op::Wait,
            Parked::Create { .. } => Op::Create,
            Parked::Put { .. } => Op::Put,
        }
    }
}

#[derive(Debug)]
pub(super) struct Pending {
    pub by: Parker,
    pub seq: u32,
    pub deadline: Option<Instant>,
    /// The caller's own deadline (without the grace given to objects coming from disk or
    /// from other nodes).
    pub asked: Option<Instant>,
    pub what: Parked,
    /// Seals (or restores, arrivals) of ids this get or wait waits on still to see before it
    /// can be complete: its ids are checked again only when this reaches 0. One event makes
    /// at most `spread` of its ids ready, so this is the number of ids not ready when last
    /// counted, divided by `spread` and rounded up; ids that stop being ready meanwhile
    /// (deleted, evicted, spilled) only make the true number larger, and the full count at 0
    /// sees them.
    credit: u32,
    /// Most positions of its ids one id occupies (1 unless ids repeat): 1 + repeats.
    spread: u32,
}

/// What one pass over a parked request's ids found.
#[derive(Debug, Default)]
struct Count {
    done: bool,
    all_sealed: bool,
    credit: u32,
}

/// Arrival number of a parked request.
pub(super) type Ticket = u64;

/// The gets and waits waiting on one id: almost always one, so without an allocation then.
#[derive(Debug)]
pub(super) enum Waiters {
    One(Ticket),
    // Boxed: keeps the bucket (one per waited id, in every map slot) at 16 bytes.
    #[allow(clippy::box_collection)]
    Many(Box<BTreeSet<Ticket>>),
}

impl Waiters {
    /// Adds `t`; `false` if it was there.
    fn insert(&mut self, t: Ticket) -> bool {
        match self {
            Waiters::One(u) if *u == t => false,
            Waiters::One(u) => {
                *self = Waiters::Many(Box::new(BTreeSet::from([*u, t])));
                true
            }
            Waiters::Many(set) => set.insert(t),
        }
    }

    /// Removes `t`; `true` if none is left.
    fn remove(&mut self, t: Ticket) -> bool {
        match self {
            Waiters::One(u) => *u == t,
            Waiters::Many(set) => {
                set.remove(&t);
                match set.len() {
                    0 => true,
                    1 => {
                        let last = set.first().copied().unwrap_or(t);
                        *self = Waiters::One(last);
                        false
                    }
                    _ => false,
                }
            }
        }
    }

    fn tickets(&self) -> Vec<Ticket> {
        match self {
            Waiters::One(t) => vec![*t],
            Waiters::Many(set) => set.iter().copied().collect(),
        }
    }
}

/// Gives back the memory of a map that fell below a quarter of its capacity.
fn shrink<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > SHRINK_ABOVE && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

/// The parked requests and their indexes.
#[derive(Debug, Default)]
pub(super) struct Parking {
    entries: HashMap<Ticket, Pending>,
    next: Ticket,
    /// Gets and waits by the ids they wait on.
    by_id: HashMap<ObjectId, Waiters>,
    by_deadline: BTreeSet<(Instant, Ticket)>,
    by_parker: HashMap<Parker, BTreeSet<Ticket>>,
    /// Creates and puts waiting for room.
    creates: BTreeSet<Ticket>,
    /// Gets and waits parked (`Parked::Get` and `Parked::Wait` entries).
    gets: usize,
    /// Gets whose ids were all sealed when last looked at (see `Core::wanted`).
    sealed_gets: BTreeSet<Ticket>,
    /// Gets that may wait for objects on disk (restores to start when room appears).
    restores: BTreeSet<Ticket>,
    bytes: usize,
    /// Entries looked at, for tests that bound the work per operation.
    visits: Cell<u64>,
    /// Ids of parked requests checked for readiness, likewise.
    id_checks: Cell<u64>,
}

impl Parking {
    fn insert(&mut self, mut p: Pending) -> Ticket {
        let t = self.next;
        self.next += 1;
        let mut repeats = 0u32;
        for id in p.what.waits_on() {
            let fresh = match self.by_id.entry(*id) {
                std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().insert(t),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(Waiters::One(t));
                    true
                }
            };
            repeats += u32::from(!fresh);
        }
        p.spread = repeats.saturating_add(1);
        if let Some(d) = p.deadline {
            self.by_deadline.insert((d, t));
        }
        self.by_parker.entry(p.by).or_default().insert(t);
        if matches!(p.what, Parked::Create { .. } | Parked::Put { .. }) {
            self.creates.insert(t);
        }
        if matches!(p.what, Parked::Get(_) | Parked::Wait { .. }) {
            self.gets += 1;
        }
        self.bytes += p.what.bytes();
        self.entries.insert(t, p);
        t
    }

    /// Takes a request out of every index.
    pub fn remove(&mut self, t: Ticket) -> Option<Pending> {
        let p = self.entries.remove(&t)?;
        for id in p.what.waits_on() {
            if self.by_id.get_mut(id).is_some_and(|w| w.remove(t)) {
                self.by_id.remove(id);
            }
        }
        shrink(&mut self.by_id);
        shrink(&mut self.entries);
        if let Some(d) = p.deadline {
            self.by_deadline.remove(&(d, t));
        }
        if let Some(set) = self.by_parker.get_mut(&p.by) {
            set.remove(&t);
            if set.is_empty() {
                self.by_parker.remove(&p.by);
                shrink(&mut self.by_parker);
            }
        }
        self.creates.remove(&t);
        if matches!(p.what, Parked::Get(_) | Parked::Wait { .. }) {
            self.gets -= 1;
        }
        self.sealed_gets.remove(&t);
        self.restores.remove(&t);
        self.bytes -= p.what.bytes();
        Some(p)
    }

    pub fn get(&self, t: Ticket) -> Option<&Pending> {
        self.visits.set(self.visits.get() + 1);
        self.entries.get(&t)
    }

    fn get_mut(&mut self, t: Ticket) -> Option<&mut Pending> {
        self.visits.set(self.visits.get() + 1);
        self.entries.get_mut(&t)
    }

    /// The gets and waits waiting on `id`, in arrival order.
    pub fn waiting_on(&self, id: &ObjectId) -> Vec<Ticket> {
        self.by_id.get(id).map(Waiters::tickets).unwrap_or_default()
    }

    /// Whether a parked get waits on `id` (not counted as visits: a bookkeeping check).
    pub fn has_get_on(&self, id: &ObjectId) -> bool {
        let is_get = |t: &Ticket| {
            self.entries
                .get(t)
                .is_some_and(|p| matches!(p.what, Parked::Get(_)))
        };
        match self.by_id.get(id) {
            Some(Waiters::One(t)) => is_get(t),
            Some(Waiters::Many(set)) => set.iter().any(is_get),
            None => false,
        }
    }

    /// The parked gets waiting on `id`, in arrival order.
    pub fn gets_of(&self, id: &ObjectId) -> Vec<Ticket> {
        self.waiting_on(id)
            .into_iter()
            .filter(|&t| matches!(self.get(t), Some(p) if matches!(p.what, Parked::Get(_))))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn creates_waiting(&self) -> usize {
        self.creates.len()
    }

    /// Gets and waits parked until their objects are sealed (or restored, or their deadline).
    pub fn gets_waiting(&self) -> usize {
        self.gets
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.by_deadline.first().map(|&(d, _)| d)
    }

    pub fn visits(&self) -> u64 {
        self.visits.get()
    }

    /// Slots the id index holds (tests check that it shrinks).
    #[cfg(test)]
    pub fn id_slots(&self) -> usize {
        self.by_id.capacity()
    }

    pub fn id_checks(&self) -> u64 {
        self.id_checks.get()
    }

    /// Counts `n` ids checked for readiness.
    fn checked(&self, n: usize) {
        self.id_checks.set(self.id_checks.get() + n as u64);
    }

    /// Marks the get `t` as a candidate for `Core::wanted` or for restores.
    pub fn mark(&mut self, t: Ticket, all_sealed: bool, restore: bool) {
        if all_sealed {
            self.sealed_gets.insert(t);
        }
        if restore {
            self.restores.insert(t);
        }
    }

    /// The first of the gets once seen with every id sealed for which `still` holds; the
    /// ones before it, for which it no longer holds, leave the candidates (and count their
    /// ids again at the next seal, which marks them anew if they are all sealed again).
    pub fn first_sealed_get(&mut self, still: impl Fn(&[ObjectId]) -> bool) -> Option<&[ObjectId]> {
        let mut found = None;
        while let Some(&t) = self.sealed_gets.first() {
            self.visits.set(self.visits.get() + 1);
            match self.entries.get_mut(&t) {
                Some(Pending {
                    what: Parked::Get(ids),
                    ..
                }) if still(ids) => {
                    found = Some(t);
                    break;
                }
                Some(p) => p.credit = 1,
                None => {}
            }
            self.sealed_gets.remove(&t);
        }
        match self.entries.get(&found?)?.what {
            Parked::Get(ref ids) => Some(ids.as_slice()),
            _ => None,
        }
    }

    /// Counts one event (a seal, restore or arrival of one of its ids) for `t`; `true` when
    /// its ids are to be checked again.
    fn spend(&mut self, t: Ticket) -> bool {
        self.entries.get_mut(&t).is_some_and(|p| {
            p.credit = p.credit.saturating_sub(1);
            p.credit == 0
        })
    }

    fn set_credit(&mut self, t: Ticket, credit: u32) {
        if let Some(p) = self.entries.get_mut(&t) {
            p.credit = credit.max(1);
        }
    }
}

impl<M: ArenaWrite> Core<M> {
    pub(super) fn park(
        &mut self,
        by: Parker,
        seq: u32,
        deadline: Option<Instant>,
        what: Parked,
        out: &mut Vec<Outgoing>,
    ) {
        self.park_asked(by, seq, deadline, deadline, what, out);
    }

    /// Parks `what` unless its client or peer is over its cap or the node holds too many
    /// bytes of parked requests (then it is answered with an error).
    pub(super) fn park_asked(
        &mut self,
        by: Parker,
        seq: u32,
        deadline: Option<Instant>,
        asked: Option<Instant>,
        what: Parked,
        out: &mut Vec<Outgoing>,
    ) {
        let mine = self.parking.by_parker.get(&by).map_or(0, BTreeSet::len);
        let refuse = |detail: String| Outgoing {
            client: by.client,
            op: what.op(),
            seq,
            reply: Err(ErrorReply::Invalid(detail)),
        };
        if by.client == CLUSTER_CLIENT && mine >= MAX_PARKED_PER_PEER {
            let from = by
                .peer
                .map_or_else(|| "the cluster side".into(), |n| format!("peer node {n}"));
            return out.push(refuse(format!(
                "more than {MAX_PARKED_PER_PEER} waiting requests from {from}"
            )));
        }
        if by.client != CLUSTER_CLIENT && mine >= self.cfg.max_pending_per_client {
            return out.push(refuse(format!(
                "more than {} waiting requests from one client",
                self.cfg.max_pending_per_client
            )));
        }
        if self.parking.bytes + what.bytes() > MAX_PARKED_BYTES {
            return out.push(refuse(format!(
                "the node holds {MAX_PARKED_BYTES} bytes of waiting requests already"
            )));
        }
        let is_get = matches!(what, Parked::Get(_));
        let t = self.parking.insert(Pending {
            by,
            seq,
            deadline,
            asked,
            what,
            credit: 1,
            spread: 1,
        });
        let count = self.count_ready(t);
        self.parking.set_credit(t, count.credit);
        if is_get {
            self.parking
                .mark(t, count.all_sealed, self.cfg.spill.is_some());
        }
    }

    /// Counts the ids of the parked get or wait `t` that are ready (one pass).
    fn count_ready(&self, t: Ticket) -> Count {
        let Some(p) = self.parking.entries.get(&t) else {
            return Count::default();
        };
        let spread = p.spread.max(1) as usize;
        let events = |missing: usize| u32::try_from(missing.div_ceil(spread)).unwrap_or(u32::MAX);
        match &p.what {
            Parked::Get(ids) => {
                self.parking.checked(ids.len());
                let (mut unsealed, mut away) = (0, 0);
                for id in ids {
                    if !self.table.is_sealed(id) {
                        unsealed += 1;
                    } else if !self.table.is_resident(id) {
                        away += 1;
                    }
                }
                // Until all are sealed, count seals (then it is marked for `wanted`); then
                // restores.
                Count {
                    done: unsealed + away == 0,
                    all_sealed: unsealed == 0,
                    credit: events(if unsealed > 0 { unsealed } else { away }),
                }
            }
            Parked::Wait { ids, num_ready } => {
                self.parking.checked(ids.len());
                let ready = ids.iter().filter(|id| self.is_ready(id)).count();
                let need = (*num_ready as usize).min(ids.len());
                Count {
                    done: ready >= need,
                    all_sealed: false,
                    credit: events(need.saturating_sub(ready)),
                }
            }
            _ => Count::default(),
        }
    }

    /// The parked gets and waits that are complete already (none should be: each would hang
    /// to its deadline), described for a test's failure message.
    #[cfg(test)]
    pub(crate) fn complete_but_parked(&self) -> Vec<String> {
        let mut done: Vec<String> = self
            .parking
            .entries
            .iter()
            .filter(|(_, p)| matches!(p.what, Parked::Get(_) | Parked::Wait { .. }))
            .filter(|(&t, _)| self.count_ready(t).done)
            .map(|(t, p)| format!("{t:?} by {:?} seq {}: {:?}", p.by, p.seq, p.what))
            .collect();
        done.sort();
        done
    }

    /// Answers (as expired) and removes the parked requests `tickets`.
    pub(super) fn expire_tickets(&mut self, tickets: Vec<Ticket>, out: &mut Vec<Outgoing>) {
        let mut left = Vec::new();
        for t in tickets {
            if let Some(p) = self.parking.remove(t) {
                if let Parked::Get(ids) = &p.what {
                    left.extend_from_slice(ids);
                }
                let (op, reply) = self.expired(&p.what);
                out.push(Outgoing {
                    client: p.by.client,
                    op,
                    seq: p.seq,
                    reply,
                });
            }
        }
        self.cancel_unwanted_pulls(left);
    }

    fn expired(&self, what: &Parked) -> (Op, Result<Reply, ErrorReply>) {
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

    /// The longest wait, in milliseconds from `now`, that the parked requests `tickets`
    /// asked their callers for (without grace), if any asked for longer than a moment.
    pub(super) fn longest_wait(&self, now: Instant, tickets: &[Ticket]) -> Option<u64> {
        tickets
            .iter()
            .filter_map(|&t| self.parking.get(t))
            .filter_map(|p| match p.asked {
                None => Some(NO_TIMEOUT),
                Some(a) if a > now + ASKED_SLACK => {
                    Some(u64::try_from((a - now).as_millis()).unwrap_or(u64::MAX))
                }
                Some(_) => None,
            })
            .max()
    }

    /// Expires parked requests whose deadline has passed (answers in arrival order).
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Outgoing>) {
        if self.next_deadline().is_none_or(|d| d > now) {
            return;
        }
        if self.spill_paused_until.is_some_and(|t| t <= now) {
            self.spill_paused_until = None;
            tracing::info!("retrying spilling");
            self.maybe_spill();
            self.retry_creates(now, out);
        }
        let mut due: Vec<Ticket> = self
            .parking
            .by_deadline
            .iter()
            .take_while(|&&(d, _)| d <= now)
            .map(|&(_, t)| t)
            .collect();
        due.sort_unstable();
        let expired_any = !due.is_empty();
        self.expire_tickets(due, out);
        // A queued pull whose gets expired no longer holds back the ones behind it.
        if expired_any && self.pulls_queued() {
            self.admit_pulls(now, out);
        }
    }

    /// How many requests of local client `c` wait here.
    pub fn waiting_requests(&self, c: ClientId) -> usize {
        self.parking
            .by_parker
            .get(&Parker::local(c))
            .map_or(0, BTreeSet::len)
    }

    /// Forgets the parked requests of client `c` (it went away).
    pub(super) fn forget_parked(&mut self, c: ClientId) {
        self.forget_parked_by(Parker::local(c));
    }

    /// Forgets the parked requests of `by` (a client or peer that went away), unanswered.
    pub(super) fn forget_parked_by(&mut self, by: Parker) {
        let mine = self.parking.by_parker.remove(&by);
        let mut left = Vec::new();
        for t in mine.into_iter().flatten() {
            if let Some(Pending {
                what: Parked::Get(ids),
                ..
            }) = self.parking.remove(t)
            {
                left.extend(ids);
            }
        }
        self.cancel_unwanted_pulls(left);
    }

    /// Answers every parked get waiting on `id` with `err`.
    pub(super) fn fail_waiters(
        &mut self,
        id: &ObjectId,
        err: &ErrorReply,
        out: &mut Vec<Outgoing>,
    ) {
        let mut left = Vec::new();
        for t in self.parking.gets_of(id) {
            if let Some(p) = self.parking.remove(t) {
                if let Parked::Get(ids) = &p.what {
                    left.extend(ids.iter().filter(|x| *x != id));
                }
                out.push(Outgoing {
                    client: p.by.client,
                    op: Op::Get,
                    seq: p.seq,
                    reply: Err(err.clone()),
                });
            }
        }
        // The other objects these gets waited for may be wanted by nobody now.
        self.cancel_unwanted_pulls(left);
    }

    /// Whether a parked get waits for `id`.
    pub(super) fn waited_for(&self, id: &ObjectId) -> bool {
        self.parking.has_get_on(id)
    }

    /// `id` was sealed (or restored, or arrived): complete the parked gets and waits on it
    /// that are now satisfied. Each counts the event and checks its ids only when enough
    /// events came for it to be complete (`Pending::credit`), so sealing `K` ids that `W`
    /// requests wait on checks `O(W·K)` ids, not `O(W·K²)`.
    pub(super) fn sealed(&mut self, id: &ObjectId, out: &mut Vec<Outgoing>) {
        for t in self.parking.waiting_on(id) {
            self.parking.visits.set(self.parking.visits.get() + 1);
            if !self.parking.spend(t) {
                continue;
            }
            let count = self.count_ready(t);
            if !count.done {
                self.parking.set_credit(t, count.credit);
                // Every id sealed, some still on disk: a candidate for `wanted`.
                self.parking.mark(t, count.all_sealed, false);
                continue;
            }
            let Some(p) = self.parking.remove(t) else {
                continue;
            };
            let (op, reply) = match p.what {
                Parked::Get(ids) => match self.table.get(p.by.client, &ids) {
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
                client: p.by.client,
                op,
                seq: p.seq,
                reply,
            });
        }
    }

    /// Memory was freed or became evictable: give parked creates, oldest first, another
    /// chance; then the pulls waiting for room and the gets waiting for restores.
    pub(super) fn retry_creates(&mut self, now: Instant, out: &mut Vec<Outgoing>) {
        if self.parking.is_empty() {
            return;
        }
        let node = self.table.node();
        let mut sealed_ids = Vec::new();
        let creates: Vec<Ticket> = self.parking.creates.iter().copied().collect();
        for t in creates {
            let Some(p) = self.parking.get_mut(t) else {
                continue;
            };
            let (client, seq) = (p.by.client, p.seq);
            let result = match &mut p.what {
                Parked::Create {
                    id,
                    data_size,
                    meta_size,
                } => {
                    let (id, data_size, meta_size) = (*id, *data_size, *meta_size);
                    self.table
                        .create(client, id, data_size, meta_size)
                        .map(|offset| (Op::Create, Reply::Created { offset }))
                        .map_err(|f| (Op::Create, create_error(node, id, f), f))
                }
                Parked::Put {
                    id,
                    data_len,
                    payload,
                } => {
                    let (id, data_len) = (*id, *data_len);
                    // Borrow the payload by moving it out for the attempt and back after.
                    let payload = std::mem::take(payload);
                    let r = self.put(client, id, data_len, &payload);
                    if let Some(Pending {
                        what: Parked::Put { payload: slot, .. },
                        ..
                    }) = self.parking.entries.get_mut(&t)
                    {
                        *slot = payload;
                    }
                    r.map(|()| (Op::Put, Reply::Done))
                        .map_err(|f| (Op::Put, create_error(node, id, f), f))
                }
                _ => continue,
            };
            if let Err((_, _, CreateFail::NoRoom { requested, .. })) = result {
                self.make_room(requested);
                continue;
            }
            let Some(done) = self.parking.remove(t) else {
                continue;
            };
            let (op, reply) = match result {
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
        for id in sealed_ids {
            self.sealed(&id, out);
        }
        if self.pulls_queued() {
            self.admit_pulls(now, out);
        }
        // Parked gets whose objects wait on disk for room.
        if self.cfg.spill.is_some() {
            let waiting: Vec<Ticket> = self.parking.restores.iter().copied().collect();
            for t in waiting {
                let on_disk = |c: &Self| match c.parking.get(t) {
                    Some(Pending {
                        what: Parked::Get(ids),
                        ..
                    }) => Some(c.table.on_disk(ids)),
                    _ => None,
                };
                let Some(handles) = on_disk(self) else {
                    continue;
                };
                self.restore_handles(handles);
                if on_disk(self).is_none_or(|h| h.is_empty()) {
                    self.parking.restores.remove(&t);
                }
            }
        }
    }

    /// An object went to disk: the parked gets waiting on it need it restored.
    pub(super) fn needs_restore(&mut self, id: &ObjectId) {
        for t in self.parking.gets_of(id) {
            self.parking.mark(t, false, true);
        }
    }

    /// Ids that parked gets wait for: not to be spilled while they wait.
    ///
    /// Only the oldest parked get whose ids are all sealed is protected: protecting every
    /// waiting get could leave two gets each holding what the other needs room for, or keep a
    /// producer from making room for the very object a get waits to be sealed.
    pub(super) fn wanted(&mut self) -> HashSet<ObjectId> {
        let table = &self.table;
        self.parking
            .first_sealed_get(|ids| ids.iter().all(|id| table.is_sealed(id)))
            .map(|ids| ids.iter().copied().collect())
            .unwrap_or_default()
    }
}
