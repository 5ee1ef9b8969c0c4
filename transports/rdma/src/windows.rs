//! The grantor's side of grants on the RDMA path: announcing them to the reader's transport,
//! and, where the device has type-2 memory windows, binding one window per queue pair (and per
//! memory region the range touches) over each granted range (the NIC then refuses every READ outside live grants) and invalidating
//! them on revoke. Part of [`RdmaTransport`].
//!
//! A grant's notice goes out only once its windows are bound (a READ may arrive the moment
//! the reader has the rkey); a reader that got the descriptor first parks its read and asks
//! (`GrantQuery`), and is answered then. `Revoked` waits for the TCP transport, the reader's
//! acknowledgement, and the invalidation of every window of the grant.

use ferroplasma_transport::{Event, GrantId, PeerId};

use crate::endpoint::Endpoint;
use crate::proto::{Body, GrantNotice, GrantRef};
use crate::{verbs, Phase, RdmaTransport};

/// Most unbound windows kept for reuse.
const POOL: usize = 1024;

/// A grant this node made.
#[derive(Debug)]
pub(crate) struct Granted {
    pub(crate) peer: PeerId,
    /// Announced to the peer for RDMA reads: a revoke waits for its acknowledgement.
    pub(crate) rdma: bool,
    pub(crate) tcp_revoked: bool,
    pub(crate) acked: bool,
    pub(crate) revoking: bool,
    /// The range.
    pub(crate) offset: u64,
    pub(crate) len: u64,
    /// Its windows and their rkeys: one per memory region the range touches and per queue
    /// pair (index = piece × `qps` + queue pair).
    pub(crate) mws: Vec<verbs::Mw>,
    pub(crate) keys: Vec<u32>,
    /// Queue pairs the windows were bound on.
    pub(crate) qps: usize,
    /// The set-up round the windows were bound in (they die with its queue pairs).
    pub(crate) round: u32,
    /// Binds and invalidations posted and not completed.
    pub(crate) binding: usize,
    pub(crate) invalidating: usize,
    /// A bind failed: the grant is read over TCP.
    pub(crate) bind_failed: bool,
    /// Send the notice when the binds complete.
    pub(crate) notify: bool,
    /// When `revoke` was called (an acknowledgement that does not come fails the endpoint).
    pub(crate) revoke_since: Option<std::time::Instant>,
    /// A notice of it was sent (a revoke then tells the reader, whatever the path).
    pub(crate) announced: bool,
}

impl Granted {
    pub(crate) fn new(peer: PeerId, offset: u64, len: u64) -> Self {
        Self {
            peer,
            rdma: false,
            tcp_revoked: false,
            acked: false,
            revoking: false,
            offset,
            len,
            mws: Vec::new(),
            keys: Vec::new(),
            qps: 0,
            round: 0,
            binding: 0,
            invalidating: 0,
            bind_failed: false,
            notify: false,
            revoke_since: None,
            announced: false,
        }
    }

    /// The endpoint of its round failed: its windows died with the queue pairs (nothing can
    /// read through them), and the reader forgot the grant.
    pub(crate) fn endpoint_gone(&mut self) {
        self.rdma = false;
        self.acked = true;
        self.mws.clear();
        self.keys.clear();
        self.binding = 0;
        self.invalidating = 0;
        self.notify = false;
        self.bind_failed = false;
    }

    /// Whether `Revoked` may be reported.
    pub(crate) fn revoked(&self) -> bool {
        self.revoking
            && self.tcp_revoked
            && (self.acked || !self.rdma)
            && self.binding == 0
            && self.invalidating == 0
    }
}

impl RdmaTransport {
    fn notice_of(g: &mut Granted, id: GrantId, keys: Vec<u32>) -> GrantNotice {
        g.announced = true;
        GrantNotice {
            id: id.0,
            offset: g.offset,
            len: g.len,
            key: 0,
            keys,
        }
    }

    /// Makes grant `id` readable by its peer over RDMA and tells the peer's transport (now,
    /// or once its windows are bound). Called when the grant is made on an RDMA path and when
    /// the peer asks about it.
    pub(crate) fn offer_grant(&mut self, id: GrantId) {
        let Some(g) = self.granted.get_mut(&id) else {
            return;
        };
        let peer = g.peer;
        if g.revoking {
            self.send_private(peer, Body::GrantGone(GrantRef { id: id.0 }));
            return;
        }
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let ep =
            p.ep.as_mut()
                .filter(|e| p.phase == Phase::Rdma && Endpoint::up(e));
        let Some(ep) = ep else {
            // Our queue pairs to the peer are not up: the reader reads over TCP (a notice
            // without keys says so to a reader of a grantor with windows). Queue pairs being
            // set up may carry its READs later (without windows): then a revoke waits for the
            // reader's acknowledgement; failed or none: nothing passes them.
            let setting_up = p.ep.as_ref().is_some_and(|e| !e.failed);
            g.rdma = setting_up && !self.dev.windows;
            g.acked = !g.rdma;
            let n = Self::notice_of(g, id, Vec::new());
            self.send_private(peer, Body::GrantNotice(n));
            return;
        };
        g.rdma = true;
        g.acked = false;
        if !self.dev.windows {
            let n = Self::notice_of(g, id, Vec::new());
            self.send_private(peer, Body::GrantNotice(n));
            return;
        }
        if g.round == p.round && !g.keys.is_empty() {
            if g.binding == 0 {
                let keys = g.keys.clone();
                let n = Self::notice_of(g, id, keys);
                self.send_private(peer, Body::GrantNotice(n));
            } else {
                g.notify = true;
            }
            return;
        }
        // Windows of an older round died with its queue pairs.
        g.mws.clear();
        g.keys.clear();
        g.bind_failed = false;
        g.round = p.round;
        // One window per memory region the range touches and per queue pair, in that order
        // (a window lies in one memory region and is valid on one queue pair).
        let pieces = self.dev.mr_pieces(g.offset, g.len);
        if pieces.is_empty() {
            let n = Self::notice_of(g, id, Vec::new());
            self.send_private(peer, Body::GrantNotice(n));
            return;
        }
        let n = ep.connected();
        'bind: for (mr, addr, len) in pieces {
            for q in 0..n {
                let mw = match self.mw_pool.pop() {
                    Some(mw) => Ok(mw),
                    None => verbs::Mw::new(&self.dev.pd),
                };
                let bound = mw.and_then(|mut mw| {
                    ep.bind(&mut self.seq, q, &mut mw, mr, addr, len, id.0)
                        .map(|key| (mw, key))
                });
                match bound {
                    Ok((mw, key)) => {
                        g.mws.push(mw);
                        g.keys.push(key);
                        g.binding += 1;
                    }
                    Err(e) => {
                        tracing::debug!(%peer, grant = id.0, error = %e, "binding a memory window failed: the grant is read over tcp");
                        g.bind_failed = true;
                        break 'bind;
                    }
                }
            }
        }
        g.qps = n;
        g.notify = true;
        if g.binding == 0 {
            self.bind_done(id.0, true, false);
        }
    }

    /// A bind of grant `grant` completed (`counted`: it was posted; `ok`: it succeeded).
    pub(crate) fn bind_done(&mut self, grant: u64, ok: bool, counted: bool) {
        let id = GrantId(grant);
        let Some(g) = self.granted.get_mut(&id) else {
            return;
        };
        if counted {
            g.binding = g.binding.saturating_sub(1);
        }
        g.bind_failed |= !ok;
        if g.binding == 0 && g.notify && g.revoking {
            // Revoked while its windows were being bound: the reader was told (Revoke), a
            // notice now would bring back what it forgot.
            g.notify = false;
            let peer = g.peer;
            self.send_private(peer, Body::GrantGone(GrantRef { id: grant }));
        } else if g.binding == 0 && g.notify {
            g.notify = false;
            let keys = if g.bind_failed || g.keys.is_empty() {
                Vec::new()
            } else {
                g.keys.clone()
            };
            let n = Self::notice_of(g, id, keys);
            let peer = g.peer;
            self.send_private(peer, Body::GrantNotice(n));
        }
        self.finish_revokes();
    }

    /// An invalidation of a window of grant `grant` completed.
    pub(crate) fn inv_done(&mut self, grant: u64) {
        if let Some(g) = self.granted.get_mut(&GrantId(grant)) {
            g.invalidating = g.invalidating.saturating_sub(1);
        }
        self.finish_revokes();
    }

    /// On revoke: invalidates the grant's windows on the queue pairs they were bound through
    /// (if those are still up; otherwise they died with them).
    pub(crate) fn invalidate_grant(&mut self, id: GrantId) {
        let Some(g) = self.granted.get_mut(&id) else {
            return;
        };
        if g.mws.is_empty() {
            return;
        }
        let Some(p) = self.peers.get_mut(&g.peer) else {
            return;
        };
        let Some(ep) = p.ep.as_mut().filter(|e| !e.failed && p.round == g.round) else {
            g.mws.clear();
            return;
        };
        let peer = g.peer;
        let mut failed = None;
        let n = g.qps.max(1);
        for (i, mw) in g.mws.iter().enumerate() {
            match ep.invalidate(&mut self.seq, i % n, mw.rkey(), id.0) {
                Ok(()) => g.invalidating += 1,
                Err(e) => {
                    failed = Some(format!("invalidating a memory window failed: {e}"));
                    break;
                }
            }
        }
        if let Some(reason) = failed {
            // The queue pairs go to ERR: no READ passes them any more.
            self.fall_back(peer, reason, true);
        }
    }

    /// Reports the revokes that are complete; their windows (invalidated) go back to the pool.
    pub(crate) fn finish_revokes(&mut self) {
        let done: Vec<GrantId> = self
            .granted
            .iter()
            .filter(|(_, g)| g.revoked())
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            if let Some(g) = self.granted.remove(&id) {
                let room = POOL.saturating_sub(self.mw_pool.len());
                self.mw_pool.extend(g.mws.into_iter().take(room));
            }
            self.ready.push_back(Event::Revoked { grant: id });
        }
    }
}
