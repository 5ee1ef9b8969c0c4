//! One peer's RDMA endpoint: its RC queue pairs, their completion queue, and the READs
//! queued and in flight on them.
//!
//! A read is cut into slices that never cross a memory region (ours or the peer's) and are at
//! most [`SLICE`] bytes; slices are spread over the queue pairs. Only some work requests are
//! signalled (every [`SIGNAL_EVERY`]th, and the last of each burst posted to a queue pair), so
//! a completion retires every earlier request of its queue pair (RC completes in order), and
//! no request is ever left behind without a later signalled one.

use std::collections::VecDeque;
use std::sync::Arc;

use ferroplasma_transport::PeerId;

use crate::device::{fmt_gid, mtu_bytes, Device};
use crate::proto::{Offer, RemoteTable};
use crate::verbs::{self, Cq, Qp, QpCaps, RtrParams, VerbsError, Wc};

/// Largest READ work request.
pub const SLICE: u64 = 1 << 20;
/// Work requests between two signalled ones on a queue pair.
pub const SIGNAL_EVERY: u32 = 16;
/// Send queue depth per queue pair (capped by the device): READs (at most [`MAX_WINDOW`])
/// share it with the binds and invalidations of memory windows.
pub const SQ_DEPTH: u32 = 512;
/// Most READs in flight per queue pair, whatever the devices allow: 8 MiB per queue pair
/// keeps a 100 Gb/s link busy over a fabric's round trip, and bounds the work one post
/// hands a software device (soft-RoCE runs a posted burst inside the posting call; a whole
/// 256 MiB object at once blocked the node's event loop past the peers' dead-after time).
pub const MAX_WINDOW: u32 = 8;

/// One READ work request to be posted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slice {
    /// The read it belongs to.
    pub token: u64,
    /// Local address and key.
    pub laddr: u64,
    /// Local key.
    pub lkey: u32,
    /// Remote address.
    pub raddr: u64,
    /// Remote key.
    pub rkey: u32,
    /// Bytes.
    pub len: u32,
    /// The queue pair it must go on (a memory window's rkey is valid only on the queue pair
    /// it was bound through); `None`: any.
    pub qp: Option<u16>,
    /// The index of the peer's memory region it reads from (its region table's order).
    pub region: usize,
}

/// What a posted work request is, for its completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wr {
    /// A READ slice of the read with this token.
    Read(u64),
    /// Binding a memory window for this grant.
    Bind(u64),
    /// Invalidating a memory window of this grant.
    Inv(u64),
    /// A signalled request posted after the queue pair went to ERR: its flush completion
    /// retires every earlier request (one that completed well but unsignalled leaves no
    /// completion of its own).
    Drain,
}

/// Cuts a read of `len` bytes from the peer's arena offset `remote_off` into ours at
/// `local_off` into slices. `None` when a range falls outside either table.
pub fn slices(
    token: u64,
    local: &RemoteTable,
    local_off: u64,
    remote: &RemoteTable,
    remote_off: u64,
    len: u64,
) -> Option<Vec<Slice>> {
    let mut out = Vec::new();
    let mut done = 0u64;
    while done < len {
        let left = len - done;
        let (raddr, rkey, rn, region) = remote.piece_in(remote_off.checked_add(done)?, left)?;
        let (laddr, lkey, ln) = local.piece(local_off.checked_add(done)?, left)?;
        let n = rn.min(ln).min(SLICE);
        out.push(Slice {
            token,
            laddr,
            lkey,
            raddr,
            rkey,
            len: u32::try_from(n).ok()?,
            qp: None,
            region,
        });
        done += n;
    }
    Some(out)
}

/// What a completion retired: each request with whether it succeeded.
#[derive(Debug, PartialEq, Eq)]
pub struct Retired {
    /// (request, success) per retired request, in order.
    pub wrs: Vec<(Wr, bool)>,
    /// The failure that is not a flush (the first bad completion of the endpoint).
    pub error: Option<String>,
}

/// One peer's queue pairs.
pub struct Endpoint {
    /// The connection.
    pub peer: PeerId,
    /// The name its completion queue reports under on the channel.
    pub cq_id: u64,
    /// Our GID for this connection (the RoCE v2 GID of the connection's local address, else
    /// the node's) and its index.
    pub gid: [u8; 16],
    /// The GID's index in the port's table.
    pub gid_index: u8,
    // Dropped before the CQ they complete on.
    qps: Vec<Qp>,
    cq: Arc<Cq>,
    psns: Vec<u32>,
    /// Queue pairs connected (the smaller count of both offers); 0 before.
    used: usize,
    /// Per queue pair: (sequence number, request) of each request in flight, oldest first.
    inflight: Vec<VecDeque<(u64, Wr)>>,
    /// Slices not yet posted.
    pending: VecDeque<Slice>,
    /// Per queue pair: invalidations (rkey, grant) waiting for room on its send queue.
    inv_queue: Vec<VecDeque<(u32, u64)>>,
    next_qp: usize,
    since_signal: Vec<u32>,
    sq_depth: u32,
    /// The completion queue is armed (an event will come through the channel).
    pub armed: bool,
    /// The peer's region table once it offered.
    pub remote: Option<RemoteTable>,
    /// Moved to ERR (a bad completion, a lost port, a closed connection).
    pub failed: bool,
    peer_mtu: u32,
    /// The peer's grants are memory windows (use the notices' rkeys).
    pub peer_windows: bool,
    /// When a request was last posted to an idle endpoint or last retired.
    pub last_progress: std::time::Instant,
    /// READs in flight per queue pair: what both sides negotiated (the requester's
    /// `max_rd_atomic`, at most the responder's resources), at most the send queue.
    window: u32,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("peer", &self.peer)
            .field("qps", &self.qps.len())
            .field("used", &self.used)
            .field("pending", &self.pending.len())
            .field("failed", &self.failed)
            .finish()
    }
}

/// A random 24-bit packet sequence number.
fn psn() -> u32 {
    let mut b = [0u8; 4];
    rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()).ok();
    u32::from_le_bytes(b) & 0x00ff_ffff
}

impl Endpoint {
    /// Queue pairs for `peer`, in INIT, with a completion queue named `cq_id` on the device's
    /// channel.
    pub fn new(
        dev: &Device,
        peer: PeerId,
        qps: usize,
        cq_id: u64,
        local_ip: Option<std::net::IpAddr>,
    ) -> Result<Self, VerbsError> {
        let (gid, gid_index) = dev.gid_for(local_ip);
        let max_wr = u32::try_from(dev.attr.max_qp_wr).unwrap_or(SQ_DEPTH);
        let sq_depth = SQ_DEPTH.min(max_wr.max(1));
        let cqe = i32::try_from(qps as u64 * u64::from(sq_depth) + 16).unwrap_or(i32::MAX);
        let cq = Cq::new(
            &dev.ctx,
            cqe.min(dev.attr.max_cqe.max(1)),
            Some(&dev.channel),
            cq_id,
        )?;
        let caps = QpCaps {
            max_send_wr: sq_depth,
            max_recv_wr: 1,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: 0,
        };
        let mut list = Vec::with_capacity(qps);
        for _ in 0..qps {
            let qp = Qp::new_rc(&dev.pd, &cq, &cq, caps)?;
            qp.to_init(
                dev.port,
                verbs::ACCESS_REMOTE_READ | verbs::ACCESS_LOCAL_WRITE,
            )?;
            list.push(qp);
        }
        Ok(Self {
            peer,
            cq_id,
            gid,
            gid_index,
            psns: (0..qps).map(|_| psn()).collect(),
            inflight: (0..qps).map(|_| VecDeque::new()).collect(),
            since_signal: vec![0; qps],
            inv_queue: (0..qps).map(|_| VecDeque::new()).collect(),
            qps: list,
            cq,
            used: 0,
            pending: VecDeque::new(),
            next_qp: 0,
            sq_depth,
            armed: false,
            remote: None,
            failed: false,
            peer_mtu: 0,
            peer_windows: false,
            window: 1,
            last_progress: std::time::Instant::now(),
        })
    }

    /// Our offer for this connection, for set-up round `round`.
    pub fn offer(&self, dev: &Device, round: u32) -> Offer {
        Offer {
            gid: self.gid.to_vec(),
            mtu: dev.mtu,
            qpns: self.qps.iter().map(Qp::qp_num).collect(),
            psns: self.psns.clone(),
            max_rd_atomic: u32::try_from(dev.attr.max_qp_rd_atom.clamp(1, 255)).unwrap_or(1),
            regions: dev.regions.clone(),
            region_len: dev.region_len,
            lid: u32::from(dev.lid),
            round,
            windows: dev.windows,
        }
    }

    /// Connects our queue pairs to the peer's (a checked offer): RTR, then RTS. The error
    /// names the stage, the MTU, the GIDs and the peer's QPN.
    pub fn connect(&mut self, dev: &Device, theirs: &Offer) -> Result<(), String> {
        let n = self.qps.len().min(theirs.qpns.len());
        let mtu = dev.mtu.min(theirs.mtu);
        let mut dgid = [0u8; 16];
        dgid.copy_from_slice(&theirs.gid);
        let rd_atomic = u8::try_from(
            theirs
                .max_rd_atomic
                .min(u32::try_from(dev.attr.max_qp_init_rd_atom.clamp(1, 255)).unwrap_or(1)),
        )
        .unwrap_or(1);
        let responder = u8::try_from(dev.attr.max_qp_rd_atom.clamp(1, 255)).unwrap_or(1);
        for i in 0..n {
            let qp = &self.qps[i];
            let ctx = |stage: &str, e: &VerbsError| {
                format!(
                    "queue pair {} to {stage} failed: {e} (MTU {}, local GID {} index {}, \
                     peer GID {}, peer QPN {})",
                    qp.qp_num(),
                    mtu_bytes(mtu),
                    fmt_gid(&self.gid),
                    self.gid_index,
                    fmt_gid(&dgid),
                    theirs.qpns[i]
                )
            };
            let p = RtrParams {
                port: dev.port,
                mtu,
                dest_qpn: theirs.qpns[i],
                rq_psn: theirs.psns[i],
                dgid,
                sgid_index: self.gid_index,
                max_dest_rd_atomic: responder,
                dlid: u16::try_from(theirs.lid).unwrap_or(0),
            };
            qp.to_rtr(&p).map_err(|e| ctx("RTR", &e))?;
            qp.to_rts(self.psns[i], rd_atomic)
                .map_err(|e| ctx("RTS", &e))?;
        }
        self.used = n;
        self.window = u32::from(rd_atomic).min(MAX_WINDOW).min(self.sq_depth);
        self.peer_mtu = theirs.mtu;
        self.peer_windows = theirs.windows;
        self.remote = Some(RemoteTable::new(theirs));
        Ok(())
    }

    /// Queue pairs connected.
    pub fn connected(&self) -> usize {
        self.used
    }

    /// The peer's MTU (`enum ibv_mtu`), once connected.
    pub fn peer_mtu(&self) -> u32 {
        self.peer_mtu
    }

    /// Slices queued, not posted.
    pub fn queued(&self) -> usize {
        self.pending.len()
    }

    /// Whether the queue pairs are connected and not failed.
    pub fn up(&self) -> bool {
        self.used > 0 && !self.failed
    }

    /// Queues slices.
    pub fn queue(&mut self, s: impl IntoIterator<Item = Slice>) {
        self.pending.extend(s);
    }

    /// Requests posted and not retired, plus slices queued.
    pub fn outstanding(&self) -> usize {
        self.pending.len() + self.inflight.iter().map(VecDeque::len).sum::<usize>()
    }

    /// Posts queued slices while queue pairs have room. `seq` numbers requests.
    pub fn post(&mut self, seq: &mut u64) -> Result<(), VerbsError> {
        if !self.up() {
            return Ok(());
        }
        // Invalidations that waited for room go first (a revoke waits for them).
        for q in 0..self.used {
            while self.inflight[q].len() < self.sq_depth as usize {
                let Some((rkey, grant)) = self.inv_queue[q].pop_front() else {
                    break;
                };
                if let Err(e) = self.post_inv(seq, q, rkey, grant) {
                    self.inv_queue[q].push_front((rkey, grant));
                    return Err(e);
                }
            }
        }
        let depth = self.window.max(1) as usize;
        // Assign slices to queue pairs round robin, then post each queue pair's burst with
        // its last request signalled.
        let mut bursts: Vec<Vec<Slice>> = vec![Vec::new(); self.used];
        let reads =
            |v: &VecDeque<(u64, Wr)>| v.iter().filter(|(_, w)| matches!(w, Wr::Read(_))).count();
        let mut busy: Vec<usize> = self.inflight.iter().map(reads).collect();
        let sq = self.sq_depth as usize;
        let mut full = 0;
        while full < self.used {
            let Some(s) = self.pending.front().copied() else {
                break;
            };
            let q = match s.qp {
                Some(q) if usize::from(q) < self.used => usize::from(q),
                Some(_) => break,
                None => {
                    let q = self.next_qp % self.used;
                    self.next_qp = self.next_qp.wrapping_add(1);
                    q
                }
            };
            let room = busy[q] < depth && self.inflight[q].len() + bursts[q].len() < sq;
            if !room {
                if s.qp.is_some() {
                    // Pinned to a busy queue pair: wait (in order) for its completions.
                    break;
                }
                full += 1;
                continue;
            }
            full = 0;
            busy[q] += 1;
            bursts[q].push(s);
            self.pending.pop_front();
        }
        if self.in_flight() == 0 {
            self.last_progress = std::time::Instant::now();
        }
        let mut result = Ok(());
        let mut unposted = Vec::new();
        for (q, burst) in bursts.into_iter().enumerate() {
            if result.is_err() {
                unposted.extend(burst);
                continue;
            }
            let last = burst.len();
            for (i, &s) in burst.iter().enumerate() {
                self.since_signal[q] += 1;
                let signaled = i + 1 == last || self.since_signal[q] >= SIGNAL_EVERY;
                if signaled {
                    self.since_signal[q] = 0;
                }
                *seq += 1;
                // SAFETY: the local range lies in an MR of our arena (cut by `slices` from
                // our table) and belongs to the transport until the read's ReadDone, which
                // comes only after this request is retired by a completion
                // (`Transport::read`'s contract, held by the caller).
                let r = unsafe {
                    self.qps[q].post_read(*seq, s.laddr, s.len, s.lkey, s.raddr, s.rkey, signaled)
                };
                if let Err(e) = r {
                    // Not posted, nor what follows: back to the queue, so that their reads
                    // stay accounted for (the caller fails the endpoint, which drops them;
                    // what was posted before completes, in error once the queue pair is in
                    // ERR: errors always complete, signalled or not).
                    unposted.extend_from_slice(&burst[i..]);
                    result = Err(e);
                    break;
                }
                self.inflight[q].push_back((*seq, Wr::Read(s.token)));
            }
        }
        for s in unposted.into_iter().rev() {
            self.pending.push_front(s);
        }
        result
    }

    /// Polls the completion queue and retires what the completions cover.
    pub fn complete(&mut self, wcs: &mut Vec<Wc>) -> Result<Retired, VerbsError> {
        wcs.clear();
        self.cq.poll(wcs, 64)?;
        if !wcs.is_empty() {
            self.last_progress = std::time::Instant::now();
        }
        let mut out = Retired {
            wrs: Vec::new(),
            error: None,
        };
        for wc in wcs.iter() {
            let Some(q) = self.qps.iter().position(|qp| qp.qp_num() == wc.qp_num) else {
                continue;
            };
            let ok = wc.status == verbs::WC_SUCCESS;
            // A flush on an endpoint we did not fail means the queue pair went to ERR by
            // itself: that is the endpoint's failure too.
            if !ok && (wc.status != verbs::WC_WR_FLUSH_ERR || !self.failed) && out.error.is_none() {
                out.error = Some(format!(
                    "{} on queue pair {} (vendor error {:#x})",
                    verbs::wc_status_str(wc.status),
                    wc.qp_num,
                    wc.vendor_err
                ));
            }
            while let Some(&(seq, wr)) = self.inflight[q].front() {
                if seq > wc.wr_id {
                    break;
                }
                self.inflight[q].pop_front();
                // Requests before the completed one succeeded (in-order completion); the
                // completed one carries the status; after an error everything is flushed.
                let this_ok = if seq == wc.wr_id { ok } else { !self.failed };
                out.wrs.push((wr, this_ok));
            }
        }
        Ok(out)
    }

    /// Moves every queue pair to ERR (no request touches memory once flushed) and drops the
    /// slices not posted; returns their tokens.
    pub fn fail(&mut self, seq: &mut u64) -> Vec<u64> {
        if !self.failed {
            self.failed = true;
            self.last_progress = std::time::Instant::now();
            for (q, qp) in self.qps.iter().enumerate() {
                if let Err(e) = qp.to_err() {
                    tracing::warn!(peer = %self.peer, error = %e, "moving a queue pair to ERR failed");
                }
                if self.inflight[q].is_empty() {
                    continue;
                }
                *seq += 1;
                self.last_progress = std::time::Instant::now();
                // SAFETY: a zero-length send names no memory; in ERR it is only flushed.
                match unsafe { qp.post_send(*seq, 0, 0, 0, true) } {
                    Ok(()) => self.inflight[q].push_back((*seq, Wr::Drain)),
                    Err(e) => {
                        // The stall check destroys the queue pairs if the rest never retires.
                        tracing::warn!(peer = %self.peer, error = %e, "draining a queue pair failed");
                    }
                }
            }
        }
        for q in &mut self.inv_queue {
            q.clear();
        }
        self.pending.drain(..).map(|s| s.token).collect()
    }

    /// Destroys the queue pairs (`ibv_destroy_qp`: once it returns, no request of them
    /// touches memory), for a device that is gone or requests that never retire; then every
    /// request counts as failed: returns them.
    pub fn destroy(&mut self) -> Vec<Wr> {
        self.qps.clear();
        self.abandon()
    }

    /// Whether the next queued slice can be posted now (an up endpoint with room on the
    /// queue pair it needs, or on any when it may take any): what `post` would do.
    pub fn can_post(&self) -> bool {
        let Some(front) = self.pending.front().filter(|_| self.up()) else {
            return false;
        };
        let room = |q: usize| {
            let v = &self.inflight[q];
            v.iter().filter(|(_, w)| matches!(w, Wr::Read(_))).count() < self.window.max(1) as usize
                && v.len() < self.sq_depth as usize
        };
        match front.qp {
            Some(q) => usize::from(q) < self.used && room(usize::from(q)),
            None => (0..self.used).any(room),
        }
    }

    /// Every request and queued slice, now counted as failed (after `destroy`).
    fn abandon(&mut self) -> Vec<Wr> {
        self.failed = true;
        let mut out: Vec<Wr> = self.pending.drain(..).map(|s| Wr::Read(s.token)).collect();
        for q in &mut self.inflight {
            out.extend(q.drain(..).map(|(_, w)| w));
        }
        out
    }

    /// Binds `mw` to `[addr, addr + len)` of `mr` for remote reads through queue pair `q`
    /// (signalled: the window is usable once this completes). Returns the window's rkey.
    #[allow(clippy::too_many_arguments)]
    pub fn bind(
        &mut self,
        seq: &mut u64,
        q: usize,
        mw: &mut crate::verbs::Mw,
        mr: &crate::verbs::Mr,
        addr: u64,
        len: u64,
        grant: u64,
    ) -> Result<u32, VerbsError> {
        if !self.up() || q >= self.used || self.inflight[q].len() >= self.sq_depth as usize {
            return Err(VerbsError::Unavailable {
                reason: "no room on the queue pair".into(),
            });
        }
        self.touch();
        *seq += 1;
        let key =
            self.qps[q].post_bind_mw(*seq, mw, mr, addr, len, verbs::ACCESS_REMOTE_READ, true)?;
        self.inflight[q].push_back((*seq, Wr::Bind(grant)));
        self.since_signal[q] = 0;
        Ok(key)
    }

    /// Invalidates `rkey` on queue pair `q` (signalled: no READ uses it once this completes).
    pub fn invalidate(
        &mut self,
        seq: &mut u64,
        q: usize,
        rkey: u32,
        grant: u64,
    ) -> Result<(), VerbsError> {
        if self.failed || q >= self.used {
            return Err(VerbsError::Unavailable {
                reason: "the queue pair is gone".into(),
            });
        }
        if self.inflight[q].len() >= self.sq_depth as usize {
            // No room now: posted by `post` as completions free the send queue.
            self.inv_queue[q].push_back((rkey, grant));
            return Ok(());
        }
        self.post_inv(seq, q, rkey, grant)
    }

    fn post_inv(
        &mut self,
        seq: &mut u64,
        q: usize,
        rkey: u32,
        grant: u64,
    ) -> Result<(), VerbsError> {
        self.touch();
        *seq += 1;
        self.qps[q].post_local_inv(*seq, rkey, true)?;
        self.inflight[q].push_back((*seq, Wr::Inv(grant)));
        self.since_signal[q] = 0;
        Ok(())
    }

    /// A request is posted: an idle endpoint starts its stall clock now.
    fn touch(&mut self) {
        if self.in_flight() == 0 {
            self.last_progress = std::time::Instant::now();
        }
    }

    /// Invalidations waiting for room on a send queue.
    pub fn queued_invalidations(&self) -> usize {
        self.inv_queue.iter().map(VecDeque::len).sum()
    }

    /// Moves the queue pairs to ERR and nothing else (see `RdmaTransport::break_queue_pairs`).
    pub fn break_for_test(&self) -> Result<(), VerbsError> {
        for qp in &self.qps {
            qp.to_err()?;
        }
        Ok(())
    }

    /// Requests posted and not yet retired.
    pub fn in_flight(&self) -> usize {
        self.inflight.iter().map(VecDeque::len).sum()
    }

    /// Arms the completion queue if it is not.
    pub fn arm(&mut self) -> Result<(), VerbsError> {
        if !self.armed {
            self.cq.req_notify()?;
            self.armed = true;
        }
        Ok(())
    }

    /// The queue pair numbers (for matching async events).
    pub fn owns_qp(&self, qpn: u32) -> bool {
        self.qps.iter().any(|q| q.qp_num() == qpn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::RegionEntry;

    #[test]
    fn slices_never_cross_regions_or_exceed_the_cap() {
        let remote = RemoteTable::from_entries(
            vec![
                RegionEntry {
                    addr: 0x10_0000,
                    len: 3 << 20,
                    rkey: 1,
                },
                RegionEntry {
                    addr: 0x90_0000,
                    len: 3 << 20,
                    rkey: 2,
                },
            ],
            6 << 20,
        );
        let local = RemoteTable::from_entries(
            vec![
                RegionEntry {
                    addr: 0x500_0000,
                    len: 5 << 20,
                    rkey: 7,
                },
                RegionEntry {
                    addr: 0x800_0000,
                    len: 5 << 20,
                    rkey: 8,
                },
            ],
            10 << 20,
        );
        let s = slices(9, &local, 4 << 20, &remote, 1 << 19, 5 << 20).expect("in range");
        let total: u64 = s.iter().map(|x| u64::from(x.len)).sum();
        assert_eq!(total, 5 << 20);
        for x in &s {
            assert!(u64::from(x.len) <= SLICE);
            let (r0, r1) = if x.rkey == 1 {
                (0x10_0000, 0x40_0000)
            } else {
                (0x90_0000, 0xc0_0000)
            };
            assert!(x.raddr >= r0 && x.raddr + u64::from(x.len) <= r1, "{x:?}");
            let (l0, l1) = if x.lkey == 7 {
                (0x500_0000, 0x550_0000)
            } else {
                (0x800_0000, 0x850_0000)
            };
            assert!(x.laddr >= l0 && x.laddr + u64::from(x.len) <= l1, "{x:?}");
        }
        // Contiguous in both address spaces within a region.
        assert_eq!(s[0].raddr, 0x10_0000 + (1 << 19));
        assert_eq!(s[0].laddr, 0x500_0000 + (4 << 20));
        assert!(slices(1, &local, 0, &remote, 6 << 20, 1).is_none());
        assert!(slices(1, &local, 10 << 20, &remote, 0, 1).is_none());
        assert_eq!(slices(1, &local, 0, &remote, 0, 0), Some(vec![]));
    }
}
