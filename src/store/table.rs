//! The object table: objects, their states, pins and LRU order, over the arena allocator.
//! Plain bookkeeping: no I/O, no clocks, no shared memory.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::id::{NodeId, ObjectId};
use crate::protocol::{DeleteStatus, ListEntry, ObjectLoc, ObjectState};
use crate::shm::{AllocStats, Allocation, Allocator};
use crate::spill::job::{RestoreReq, SpillItem, SpillLoc};

/// A connected client, as the daemon numbers them.
pub type ClientId = u64;

/// Why a create failed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateFail {
    /// The id is in the table.
    Exists,
    /// The id names another node as owner.
    Foreign,
    /// Bigger than the whole arena.
    TooLarge {
        /// Bytes asked for.
        requested: u64,
        /// Arena size.
        max: u64,
    },
    /// No room even after evicting everything evictable.
    NoRoom {
        /// Bytes asked for.
        requested: u64,
        /// Free bytes.
        free: u64,
        /// Largest free block.
        largest_free: u64,
    },
}

/// Why a seal or abort failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishFail {
    /// No such object.
    NotFound,
    /// Sealed already.
    AlreadySealed,
    /// Another client created it.
    NotCreator,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Created { creator: ClientId },
    Sealed,
}

/// Where a sealed object's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Residence {
    /// In the arena.
    Memory,
    /// In the arena and being written to disk: frozen until the spill answers.
    Spilling,
    /// On disk only.
    Disk(SpillLoc),
    /// Being read back into a fresh allocation, invisible until done.
    Restoring(SpillLoc),
}

#[derive(Debug)]
struct Entry {
    id: ObjectId,
    /// The arena allocation; `None` while the object lives on disk only.
    alloc: Option<Allocation>,
    residence: Residence,
    data_size: u64,
    meta_size: u64,
    state: State,
    pins: u64,
    /// Position in the LRU while sealed, unpinned and not deleted.
    lru: Option<u64>,
    /// Removed from the id map; freed when the last pin goes.
    deleted: bool,
    /// A secondary copy of an object owned by another node: evicted, never spilled.
    copy: bool,
}

#[derive(Debug, Default)]
struct ClientState {
    pins: HashMap<u64, u64>,
    creating: HashSet<u64>,
}

/// The object table. Handles are unique for the life of the table, so a release can never
/// hit a later object that reused an id.
#[derive(Debug)]
pub struct Table {
    node: NodeId,
    alloc: Allocator,
    ids: HashMap<ObjectId, u64>,
    entries: HashMap<u64, Entry>,
    lru: BTreeMap<u64, u64>,
    /// Bytes reserved by the objects in `lru` (what eviction could free).
    lru_bytes: u64,
    /// The part of `lru_bytes` held by secondary copies.
    copy_lru_bytes: u64,
    /// Secondary copies that left the table since the last `take_lost_copies`.
    lost_copies: Vec<ObjectId>,
    /// In a cluster, objects owned here are never evicted (other nodes may need them).
    cluster: bool,
    tick: u64,
    next_handle: u64,
    clients: HashMap<ClientId, ClientState>,
    evictions: u64,
    /// With spilling on, objects are never evicted: they go to disk instead.
    spilling: bool,
}

/// How a restore ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreOutcome {
    /// Every byte is in and checked.
    Restored,
    /// The record failed its checks: the object is lost.
    Corrupted,
    /// An I/O error: the record may be fine; try again later.
    Failed,
}

/// What a finished spill or restore leaves for the caller to do.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Arena memory was freed.
    pub freed: bool,
    /// This disk record is dead and its space can be given back.
    pub dead_record: Option<SpillLoc>,
    /// The object is readable in memory again.
    pub resident: bool,
}

impl Table {
    /// An empty table over an arena of `capacity` bytes owned by `node`.
    pub fn new(node: NodeId, capacity: u64) -> Self {
        Self {
            node,
            alloc: Allocator::new(capacity),
            ids: HashMap::new(),
            entries: HashMap::new(),
            lru: BTreeMap::new(),
            lru_bytes: 0,
            copy_lru_bytes: 0,
            lost_copies: Vec::new(),
            cluster: false,
            tick: 0,
            next_handle: 1,
            clients: HashMap::new(),
            evictions: 0,
            spilling: false,
        }
    }

    /// With spilling on, `create` never evicts; the caller spills instead.
    pub fn set_spilling(&mut self, on: bool) {
        self.spilling = on;
    }

    /// In a cluster, objects owned here are kept until deleted (spilled when spilling is on,
    /// never evicted); only secondary copies are evicted.
    pub fn set_cluster(&mut self, on: bool) {
        self.cluster = on;
    }

    /// Secondary copies evicted or deleted since the last call (their owners are told).
    pub fn take_lost_copies(&mut self) -> Vec<ObjectId> {
        std::mem::take(&mut self.lost_copies)
    }

    /// Whether `id` is a secondary copy here.
    pub fn is_copy(&self, id: &ObjectId) -> bool {
        self.ids
            .get(id)
            .and_then(|h| self.entries.get(h))
            .is_some_and(|e| e.copy)
    }

    /// Whether `id` is in the table in any state.
    pub fn contains(&self, id: &ObjectId) -> bool {
        self.ids.contains_key(id)
    }

    fn primaries_evictable(&self) -> bool {
        !self.spilling && !self.cluster
    }

    /// This node.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Starts tracking a client.
    pub fn add_client(&mut self, c: ClientId) {
        self.clients.entry(c).or_default();
    }

    /// Connected clients.
    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    /// Forgets a client: drops all its pins and aborts what it was creating. Returns whether
    /// any memory was freed or became evictable.
    pub fn remove_client(&mut self, c: ClientId) -> bool {
        let Some(state) = self.clients.remove(&c) else {
            return false;
        };
        let mut freed = false;
        for h in state.creating {
            freed |= self.drop_entry(h);
        }
        for (h, n) in state.pins {
            freed |= self.unpin(h, n);
        }
        freed
    }

    /// Reserves room for `id`, evicting unpinned sealed objects in LRU order if needed.
    /// Returns the data offset.
    pub fn create(
        &mut self,
        c: ClientId,
        id: ObjectId,
        data_size: u64,
        meta_size: u64,
    ) -> Result<u64, CreateFail> {
        if id.owner() != self.node {
            return Err(CreateFail::Foreign);
        }
        self.create_entry(c, id, data_size, meta_size, false)
    }

    /// Reserves room for a secondary copy of `id` (owned by another node), being pulled by
    /// `c`. Returns the data offset.
    pub fn create_copy(
        &mut self,
        c: ClientId,
        id: ObjectId,
        data_size: u64,
        meta_size: u64,
    ) -> Result<u64, CreateFail> {
        self.create_entry(c, id, data_size, meta_size, id.owner() != self.node)
    }

    fn create_entry(
        &mut self,
        c: ClientId,
        id: ObjectId,
        data_size: u64,
        meta_size: u64,
        copy: bool,
    ) -> Result<u64, CreateFail> {
        if self.ids.contains_key(&id) {
            return Err(CreateFail::Exists);
        }
        let requested = data_size.saturating_add(meta_size);
        if Allocator::reserved_len(requested) > self.alloc.capacity() {
            return Err(CreateFail::TooLarge {
                requested,
                max: self.alloc.capacity(),
            });
        }
        let alloc = loop {
            if let Some(a) = self.alloc.alloc(requested) {
                break a;
            }
            // Evict only when eviction could make room at all: a create that cannot fit even
            // with every evictable object gone must not empty the cache for nothing.
            let evictable = if self.primaries_evictable() {
                self.lru_bytes
            } else {
                self.copy_lru_bytes
            };
            let could_free = self.alloc.stats().free.saturating_add(evictable);
            if could_free < Allocator::reserved_len(requested) || !self.evict_one() {
                let s = self.alloc.stats();
                return Err(CreateFail::NoRoom {
                    requested,
                    free: s.free,
                    largest_free: s.largest_free,
                });
            }
        };
        let h = self.next_handle;
        self.next_handle += 1;
        self.entries.insert(
            h,
            Entry {
                id,
                alloc: Some(alloc),
                residence: Residence::Memory,
                data_size,
                meta_size,
                state: State::Created { creator: c },
                pins: 0,
                lru: None,
                deleted: false,
                copy,
            },
        );
        self.ids.insert(id, h);
        self.clients.entry(c).or_default().creating.insert(h);
        Ok(alloc.offset)
    }

    fn creating(&self, c: ClientId, id: &ObjectId) -> Result<u64, FinishFail> {
        let h = *self.ids.get(id).ok_or(FinishFail::NotFound)?;
        match self.entries.get(&h).map(|e| e.state) {
            Some(State::Created { creator }) if creator == c => Ok(h),
            Some(State::Created { .. }) => Err(FinishFail::NotCreator),
            Some(State::Sealed) => Err(FinishFail::AlreadySealed),
            None => Err(FinishFail::NotFound),
        }
    }

    /// Makes `id` immutable and readable.
    pub fn seal(&mut self, c: ClientId, id: &ObjectId) -> Result<(), FinishFail> {
        let h = self.creating(c, id)?;
        if let Some(cs) = self.clients.get_mut(&c) {
            cs.creating.remove(&h);
        }
        if let Some(e) = self.entries.get_mut(&h) {
            e.state = State::Sealed;
        }
        self.touch_lru(h);
        Ok(())
    }

    /// Drops an unsealed object and frees its memory.
    pub fn abort(&mut self, c: ClientId, id: &ObjectId) -> Result<(), FinishFail> {
        let h = self.creating(c, id)?;
        if let Some(cs) = self.clients.get_mut(&c) {
            cs.creating.remove(&h);
        }
        self.drop_entry(h);
        Ok(())
    }

    /// Whether `id` is sealed and in the table.
    pub fn is_sealed(&self, id: &ObjectId) -> bool {
        self.ids
            .get(id)
            .and_then(|h| self.entries.get(h))
            .is_some_and(|e| e.state == State::Sealed)
    }

    /// Whether `id` is sealed and its bytes are in the arena (readable now).
    pub fn is_resident(&self, id: &ObjectId) -> bool {
        self.ids
            .get(id)
            .and_then(|h| self.entries.get(h))
            .is_some_and(|e| {
                e.state == State::Sealed
                    && matches!(e.residence, Residence::Memory | Residence::Spilling)
            })
    }

    /// Handles of the sealed objects among `ids` that are on disk only (not yet restoring).
    pub fn on_disk(&self, ids: &[ObjectId]) -> Vec<u64> {
        let mut v: Vec<u64> = ids
            .iter()
            .filter_map(|id| self.ids.get(id))
            .filter(|h| {
                self.entries
                    .get(h)
                    .is_some_and(|e| matches!(e.residence, Residence::Disk(_)))
            })
            .copied()
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Pins every id for `c` and returns their locations, if all are sealed and in memory;
    /// else `None` and nothing changes.
    pub fn get(&mut self, c: ClientId, ids: &[ObjectId]) -> Option<Vec<ObjectLoc>> {
        if !ids.iter().all(|id| self.is_resident(id)) {
            return None;
        }
        let mut locs = Vec::with_capacity(ids.len());
        for id in ids {
            let h = *self.ids.get(id)?;
            let e = self.entries.get_mut(&h)?;
            e.pins += 1;
            let alloc = e.alloc?;
            if let Some(t) = e.lru.take() {
                self.lru.remove(&t);
                sub_lru(
                    &mut self.lru_bytes,
                    &mut self.copy_lru_bytes,
                    alloc.len,
                    e.copy,
                );
            }
            *self
                .clients
                .entry(c)
                .or_default()
                .pins
                .entry(h)
                .or_insert(0) += 1;
            locs.push(ObjectLoc {
                handle: h,
                offset: alloc.offset,
                data_size: e.data_size,
                meta_size: e.meta_size,
            });
        }
        Some(locs)
    }

    /// The ids among `ids` that are not sealed.
    pub fn not_ready(&self, ids: &[ObjectId]) -> Vec<ObjectId> {
        ids.iter()
            .filter(|id| !self.is_sealed(id))
            .copied()
            .collect()
    }

    /// Drops one pin of `c` on `handle`. Unknown handles are ignored (returns `false`).
    /// Returns whether memory was freed or became evictable.
    pub fn release(&mut self, c: ClientId, handle: u64) -> bool {
        let Some(cs) = self.clients.get_mut(&c) else {
            return false;
        };
        let Some(n) = cs.pins.get_mut(&handle) else {
            return false;
        };
        *n -= 1;
        if *n == 0 {
            cs.pins.remove(&handle);
        }
        self.unpin(handle, 1)
    }

    /// Deletes `ids`. Pinned objects (and objects being spilled or restored) leave the table
    /// at once and are freed when the last pin goes or the disk I/O ends. Returns the statuses
    /// and the disk records that are now dead.
    pub fn delete(&mut self, ids: &[ObjectId]) -> (Vec<DeleteStatus>, Vec<SpillLoc>) {
        let mut dead = Vec::new();
        let st = ids
            .iter()
            .map(|id| {
                let Some(&h) = self.ids.get(id) else {
                    return DeleteStatus::NotFound;
                };
                let Some(e) = self.entries.get_mut(&h) else {
                    return DeleteStatus::NotFound;
                };
                if e.state != State::Sealed {
                    return DeleteStatus::NotSealed;
                }
                self.ids.remove(id);
                if e.copy {
                    self.lost_copies.push(*id);
                }
                let busy = matches!(e.residence, Residence::Spilling | Residence::Restoring(_));
                if e.pins > 0 || busy {
                    e.deleted = true;
                    if let Some(t) = e.lru.take() {
                        self.lru.remove(&t);
                        let len = e.alloc.map_or(0, |a| a.len);
                        sub_lru(&mut self.lru_bytes, &mut self.copy_lru_bytes, len, e.copy);
                    }
                    DeleteStatus::Deferred
                } else {
                    if let Residence::Disk(loc) = e.residence {
                        dead.push(loc);
                    }
                    self.drop_entry(h);
                    DeleteStatus::Deleted
                }
            })
            .collect();
        (st, dead)
    }

    /// Picks unpinned sealed objects in memory, least recently used first, until `bytes` are
    /// chosen, and freezes them for spilling.
    pub fn pick_spill(&mut self, bytes: u64, skip: impl Fn(&ObjectId) -> bool) -> Vec<SpillItem> {
        let mut picked = Vec::new();
        let mut total = 0;
        let mut cursor = 0;
        while total < bytes {
            let Some((&t, &h)) = self.lru.range(cursor..).next() else {
                break;
            };
            cursor = t + 1;
            let Some(e) = self.entries.get_mut(&h) else {
                continue;
            };
            let Some(alloc) = e.alloc else { continue };
            // Secondary copies are evicted instead: the owner still has the object.
            if e.copy || skip(&e.id) {
                continue;
            }
            self.lru.remove(&t);
            e.lru = None;
            sub_lru(
                &mut self.lru_bytes,
                &mut self.copy_lru_bytes,
                alloc.len,
                false,
            );
            e.residence = Residence::Spilling;
            total += alloc.len;
            picked.push(SpillItem {
                handle: h,
                id: e.id,
                offset: alloc.offset,
                data_size: e.data_size,
                meta_size: e.meta_size,
            });
        }
        picked
    }

    /// A spill ended. On success the memory is freed and the object lives on disk; on
    /// failure it stays in memory and becomes evictable (spillable) again.
    pub fn spill_done(&mut self, h: u64, result: Option<SpillLoc>) -> Settled {
        let mut out = Settled::default();
        let Some(e) = self.entries.get_mut(&h) else {
            out.dead_record = result;
            return out;
        };
        if e.residence != Residence::Spilling {
            return out;
        }
        match result {
            Some(loc) if e.deleted => {
                out.dead_record = Some(loc);
                e.residence = Residence::Memory;
                out.freed = e.pins == 0 && self.drop_entry(h);
            }
            Some(loc) if e.pins == 0 => {
                e.residence = Residence::Disk(loc);
                if let Some(a) = e.alloc.take() {
                    let ok = self.alloc.free(a);
                    debug_assert!(ok);
                    out.freed = true;
                }
            }
            // Pinned while spilling (a get raced the spill): keep it in memory and drop the
            // copy on disk.
            Some(loc) => {
                e.residence = Residence::Memory;
                out.dead_record = Some(loc);
            }
            None => {
                e.residence = Residence::Memory;
                if e.deleted && e.pins == 0 {
                    out.freed = self.drop_entry(h);
                } else {
                    self.touch_lru(h);
                }
            }
        }
        out
    }

    /// Reserves memory to restore `h` from disk. `Ok(None)`: nothing to do (not on disk).
    /// `Err(requested)`: no room now.
    pub fn start_restore(&mut self, h: u64) -> Result<Option<RestoreReq>, u64> {
        let Some(e) = self.entries.get(&h) else {
            return Ok(None);
        };
        let Residence::Disk(loc) = e.residence else {
            return Ok(None);
        };
        let (id, data_size, meta_size) = (e.id, e.data_size, e.meta_size);
        let need = data_size + meta_size;
        let Some(alloc) = self.alloc.alloc(need) else {
            return Err(need);
        };
        if let Some(e) = self.entries.get_mut(&h) {
            e.alloc = Some(alloc);
            e.residence = Residence::Restoring(loc);
        }
        Ok(Some(RestoreReq {
            handle: h,
            id,
            loc,
            dest: alloc.offset,
            data_size,
            meta_size,
        }))
    }

    /// A restore ended. Restored: the object is in memory (and its disk record dead).
    /// Corrupted: the object is lost and leaves the table. Failed (an I/O error): the memory
    /// is freed and the object stays on disk for a later get.
    pub fn restore_done(&mut self, h: u64, outcome: RestoreOutcome) -> Settled {
        let mut out = Settled::default();
        let Some(e) = self.entries.get_mut(&h) else {
            return out;
        };
        let Residence::Restoring(loc) = e.residence else {
            return out;
        };
        if outcome == RestoreOutcome::Failed && !e.deleted {
            e.residence = Residence::Disk(loc);
            if let Some(a) = e.alloc.take() {
                let ok = self.alloc.free(a);
                debug_assert!(ok);
                out.freed = true;
            }
            return out;
        }
        out.dead_record = Some(loc);
        e.residence = Residence::Memory;
        if outcome != RestoreOutcome::Restored || e.deleted {
            out.freed = self.drop_entry(h);
            return out;
        }
        out.resident = true;
        self.touch_lru(h);
        out
    }

    /// The handle `id` names now, if any.
    pub fn handle_of(&self, id: &ObjectId) -> Option<u64> {
        self.ids.get(id).copied()
    }

    /// The id of handle `h`, if it is in the table.
    pub fn id_of(&self, h: u64) -> Option<ObjectId> {
        self.entries.get(&h).map(|e| e.id)
    }

    /// Objects on disk only, and the disk bytes they take.
    pub fn spilled(&self) -> (u64, u64) {
        self.entries
            .values()
            .filter_map(|e| match e.residence {
                Residence::Disk(loc) | Residence::Restoring(loc) => Some(loc.disk_len),
                _ => None,
            })
            .fold((0, 0), |(n, b), l| (n + 1, b + l))
    }

    /// Up to `max` live objects with ids greater than `after`, in id order, and whether more
    /// follow.
    pub fn list(&self, after: Option<&ObjectId>, max: usize) -> (Vec<ListEntry>, bool) {
        let mut ids: Vec<&ObjectId> = self
            .ids
            .keys()
            .filter(|id| after.is_none_or(|a| *id > a))
            .collect();
        ids.sort_unstable();
        let more = ids.len() > max;
        let entries = ids
            .into_iter()
            .take(max)
            .filter_map(|id| {
                let e = self.entries.get(self.ids.get(id)?)?;
                Some(ListEntry {
                    id: *id,
                    data_size: e.data_size,
                    meta_size: e.meta_size,
                    state: match (e.state, e.residence) {
                        (State::Created { .. }, _) => ObjectState::Created,
                        (State::Sealed, Residence::Disk(_) | Residence::Restoring(_)) => {
                            ObjectState::Spilled
                        }
                        (State::Sealed, _) => ObjectState::Sealed,
                    },
                    pins: u32::try_from(e.pins).unwrap_or(u32::MAX),
                })
            })
            .collect();
        (entries, more)
    }

    /// Checks the table's internal invariants (for tests): LRU membership and byte count,
    /// id map and entries agree, allocator totals match the entries.
    pub fn check_invariants(&self) {
        let mut lru_bytes = 0;
        let mut copy_lru_bytes = 0;
        let mut allocated = 0;
        for (&h, e) in &self.entries {
            allocated += e.alloc.map_or(0, |a| a.len);
            assert_eq!(
                e.alloc.is_none(),
                matches!(e.residence, Residence::Disk(_)),
                "allocation of {} vs {:?}",
                e.id,
                e.residence
            );
            let evictable = e.state == State::Sealed
                && e.pins == 0
                && !e.deleted
                && e.residence == Residence::Memory;
            assert_eq!(e.lru.is_some(), evictable, "lru membership of {}", e.id);
            if let Some(t) = e.lru {
                assert_eq!(self.lru.get(&t), Some(&h));
                lru_bytes += e.alloc.map_or(0, |a| a.len);
                if e.copy {
                    copy_lru_bytes += e.alloc.map_or(0, |a| a.len);
                }
            }
            assert_eq!(
                self.ids.get(&e.id) == Some(&h),
                !e.deleted,
                "id map of {}",
                e.id
            );
        }
        assert_eq!(
            self.lru.len(),
            self.entries.values().filter(|e| e.lru.is_some()).count()
        );
        assert_eq!(lru_bytes, self.lru_bytes);
        assert_eq!(copy_lru_bytes, self.copy_lru_bytes);
        assert_eq!(allocated, self.alloc.stats().allocated);
        let client_pins: u64 = self.clients.values().flat_map(|c| c.pins.values()).sum();
        assert_eq!(
            client_pins,
            self.entries.values().map(|e| e.pins).sum::<u64>()
        );
    }

    /// Allocator figures.
    pub fn alloc_stats(&self) -> AllocStats {
        self.alloc.stats()
    }

    /// Counts: (live objects, sealed, pinned objects, pins, deferred frees, evictions).
    pub fn counts(&self) -> (u64, u64, u64, u64, u64, u64) {
        let mut sealed = 0;
        let mut pinned = 0;
        let mut pins = 0;
        let mut deferred = 0;
        for e in self.entries.values() {
            if e.deleted {
                deferred += 1;
            } else if e.state == State::Sealed {
                sealed += 1;
            }
            if e.pins > 0 {
                pinned += 1;
            }
            pins += e.pins;
        }
        (
            self.ids.len() as u64,
            sealed,
            pinned,
            pins,
            deferred,
            self.evictions,
        )
    }

    fn touch_lru(&mut self, h: u64) {
        let Some(e) = self.entries.get_mut(&h) else {
            return;
        };
        let len = e.alloc.map_or(0, |a| a.len);
        if let Some(t) = e.lru.take() {
            self.lru.remove(&t);
            sub_lru(&mut self.lru_bytes, &mut self.copy_lru_bytes, len, e.copy);
        }
        if e.state == State::Sealed && e.pins == 0 && !e.deleted && e.residence == Residence::Memory
        {
            self.tick += 1;
            e.lru = Some(self.tick);
            self.lru.insert(self.tick, h);
            self.lru_bytes += len;
            if e.copy {
                self.copy_lru_bytes += len;
            }
        }
    }

    fn unpin(&mut self, h: u64, n: u64) -> bool {
        let Some(e) = self.entries.get_mut(&h) else {
            return false;
        };
        e.pins = e.pins.saturating_sub(n);
        if e.pins > 0 {
            return false;
        }
        if e.deleted {
            if matches!(e.residence, Residence::Spilling | Residence::Restoring(_)) {
                return false;
            }
            return self.drop_entry(h);
        }
        self.touch_lru(h);
        true
    }

    /// Evicts the least recently used evictable object: any, or only secondary copies when
    /// objects owned here must stay.
    fn evict_one(&mut self) -> bool {
        let all = self.primaries_evictable();
        let victim = self
            .lru
            .iter()
            .find(|(_, h)| all || self.entries.get(h).is_some_and(|e| e.copy))
            .map(|(&t, &h)| (t, h));
        let Some((t, h)) = victim else {
            return false;
        };
        self.lru.remove(&t);
        if let Some(e) = self.entries.get_mut(&h) {
            e.lru = None;
            let len = e.alloc.map_or(0, |a| a.len);
            sub_lru(&mut self.lru_bytes, &mut self.copy_lru_bytes, len, e.copy);
            tracing::debug!(id = %e.id, bytes = len, copy = e.copy, "evicting");
            let id = e.id;
            if e.copy {
                self.lost_copies.push(id);
            }
            self.ids.remove(&id);
        }
        self.evictions += 1;
        self.drop_entry(h)
    }

    fn drop_entry(&mut self, h: u64) -> bool {
        let Some(e) = self.entries.remove(&h) else {
            return false;
        };
        if let Some(t) = e.lru {
            self.lru.remove(&t);
            let len = e.alloc.map_or(0, |a| a.len);
            sub_lru(&mut self.lru_bytes, &mut self.copy_lru_bytes, len, e.copy);
        }
        if self.ids.get(&e.id) == Some(&h) {
            self.ids.remove(&e.id);
        }
        match e.alloc {
            Some(a) => {
                let ok = self.alloc.free(a);
                debug_assert!(ok, "table freed an allocation the allocator did not know");
                true
            }
            None => false,
        }
    }
}

fn sub_lru(lru_bytes: &mut u64, copy_lru_bytes: &mut u64, len: u64, copy: bool) {
    *lru_bytes -= len;
    if copy {
        *copy_lru_bytes -= len;
    }
}
