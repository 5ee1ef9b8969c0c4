//! Spill policy: when to spill (watermarks), what (least recently used, unpinned, not what
//! the oldest waiting get needs), backoff after the disk filled up or failed, restores for
//! gets, and the spill thread's answers. The disk work itself is the spill thread's
//! (`spill::worker`); the core only hands out [`Job`]s.

use std::time::{Duration, Instant};

use super::core::{ArenaWrite, Core, Outgoing};
use super::table::{RestoreOutcome, Settled};
use crate::id::ObjectId;
use crate::protocol::ErrorReply;
use crate::spill::job::{Job, RestoreFail, SpillFail, SpillLoc};

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
pub(super) struct SpillCounters {
    pub spills: u64,
    pub restores: u64,
    pub disk_full: u64,
    pub failures: u64,
    pub corrupted: u64,
    /// The engine the spill thread runs (reported in stats).
    pub engine: crate::protocol::SpillEngineInUse,
}

impl<M: ArenaWrite> Core<M> {
    /// Disk work produced since the last call, for the spill thread.
    pub fn take_jobs(&mut self) -> Vec<Job> {
        std::mem::take(&mut self.jobs)
    }

    /// Spills unpinned objects, least recently used first, while use is above the high
    /// watermark, until what is not already being spilled is down to the low one. Judging by
    /// use including the spills in flight keeps the next batch queued behind the running one,
    /// so the disk does not idle between batches while creates wait for room.
    pub(super) fn maybe_spill(&mut self) {
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
    pub(super) fn make_room(&mut self, need: u64) {
        if self.cfg.spill.is_none() || self.spilling >= need {
            return;
        }
        self.spill_bytes(need - self.spilling);
        self.maybe_spill();
    }

    pub(super) fn spill_bytes(&mut self, bytes: u64) {
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
    pub(super) fn restore(&mut self, ids: &[ObjectId]) {
        if self.cfg.spill.is_none() {
            return;
        }
        let handles = self.table.on_disk(ids);
        self.restore_handles(handles);
    }

    /// Starts restores of the spilled objects `handles` (as memory allows).
    pub(super) fn restore_handles(&mut self, handles: Vec<u64>) {
        for h in handles {
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
                let id = self.table.id_of(handle);
                let settled = self.table.spill_done(handle, Some(loc));
                if let (true, Some(id)) = (settled.freed, id) {
                    // Gets parked meanwhile now wait for it to come back.
                    self.needs_restore(&id);
                }
                settled
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

    pub(super) fn settle(&mut self, settled: Settled, now: Instant, out: &mut Vec<Outgoing>) {
        if let Some(loc) = settled.dead_record {
            self.jobs.push(Job::Free(loc));
        }
        if settled.freed {
            self.retry_creates(now, out);
        }
    }
}
