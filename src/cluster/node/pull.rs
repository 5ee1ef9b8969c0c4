//! This node's pulls of remote objects: lookup at the owner → pin at a holder → read →
//! unpin; `Busy` answers back off and ask again; probes.

use std::time::{Duration, Instant};

use ferroplasma_transport::msg::{self, Body, Status};
use ferroplasma_transport::{GrantDescriptor, PeerId, ReadOp};

use super::{Asked, BusyProbe, Phase, Pull, Redo, Runner};
use crate::id::{NodeId, ObjectId};
use crate::protocol::ErrorReply;
use crate::store::link::ToCore;

/// Lookups of one pull before the object counts as lost.
const MAX_LOOKUPS: u32 = 3;

/// The first wait before asking again after a `Busy` answer; it doubles up to
/// [`BUSY_BACKOFF_MAX`].
pub(super) const BUSY_BACKOFF: Duration = Duration::from_millis(10);
pub(super) const BUSY_BACKOFF_MAX: Duration = Duration::from_millis(640);

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

impl Runner {
    // ---- pulls ----

    /// The owner or a holder answered `Busy` (it holds as many of our waiting requests as it
    /// takes): nothing is wrong with the object, so the pull asks the owner again after a
    /// backoff, as long as anybody waits for it (the core cancels it when its gets expire).
    /// A local get never sees the refusal.
    pub(super) fn busy(&mut self, id: ObjectId, now: Instant) {
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
    pub(super) fn probe_busy(&mut self, id: ObjectId, timeout_ms: u64, now: Instant) {
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
    pub(super) fn ask_again(&mut self, now: Instant) {
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
    pub(super) fn probe(&mut self, id: ObjectId, timeout_ms: u64) {
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
    pub(super) fn drop_pull(&mut self, id: ObjectId) -> Option<Pull> {
        let p = self.pulls.remove(&id)?;
        if let Some(at) = p.backing_off {
            self.backoff.remove(&(at, id, Redo::Pull));
        }
        Some(p)
    }

    /// Forgets the requests made for the pull of `id`.
    pub(super) fn forget_asked(&mut self, id: ObjectId) {
        self.asked
            .retain(|_, a| !matches!(a, Asked::Lookup(x) | Asked::Pin(x) if *x == id));
    }

    pub(super) fn fail_pull(&mut self, id: ObjectId, error: ErrorReply) {
        self.forget_asked(id);
        if self.drop_pull(id).is_some() {
            tracing::debug!(%id, ?error, "pull failed");
            self.push_core(ToCore::PullFailed { id, error });
        }
    }

    /// Looks the object up at its owner (again): spends one of the pull's lookups.
    pub(super) fn lookup(&mut self, id: ObjectId) {
        if let Some(p) = self.pulls.get_mut(&id) {
            p.lookups += 1;
        }
        self.ask_owner(id);
    }

    /// Sends the pull's lookup to the owner (a first lookup, a repeated one, or a re-ask
    /// after `Busy`, which spends no lookup), leaving any backoff.
    pub(super) fn ask_owner(&mut self, id: ObjectId) {
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

    pub(super) fn lookup_reply(&mut self, node: u64, r: msg::LookupReply, now: Instant) {
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
                    .take(crate::cluster::directory::MAX_HOLDERS)
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
    pub(super) fn next_source(&mut self, id: ObjectId) {
        let Some(p) = self.pulls.get_mut(&id) else {
            return;
        };
        let owner = id.owner().0;
        // Prefer copies over the owner; pick among them by the object's bytes so that
        // different objects spread over different holders.
        let Some(node) = p
            .holders
            .iter()
            .copied()
            .filter(|n| !p.tried.contains(n) && self.members.is_alive(*n))
            .min_by_key(|&n| (n == owner, n ^ u64::from(id.as_bytes()[23])))
        else {
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

    pub(super) fn source_failed(&mut self, id: ObjectId, node: u64, why: &str) {
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

    pub(super) fn pin_reply(&mut self, node: u64, peer: PeerId, r: msg::PinReply, now: Instant) {
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

    pub(super) fn read_done(
        &mut self,
        token: u64,
        result: Result<(), ferroplasma_transport::ReadError>,
    ) {
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
