//! The read path of [`RdmaTransport`]: checking a read against the grant notices, cutting it
//! into slices for the endpoint, retiring completions, reporting reads or moving them to TCP,
//! and reporting revokes once the reader has acknowledged them.

use ferroplasma_transport::{Event, PeerId, ReadError, ReadOp, Transport};

use crate::grants::Check;
use crate::proto::{Body, GrantRef};
use crate::{bump, endpoint, RdmaTransport, ReadState};

impl RdmaTransport {
    /// A work request retired (or dropped unposted; `ok` false then).
    pub(crate) fn retire(&mut self, wr: endpoint::Wr, ok: bool, live: bool) {
        match wr {
            endpoint::Wr::Read(token) => self.slice_done(token, ok),
            // Binds and invalidations of an endpoint that failed were forgotten with it.
            endpoint::Wr::Bind(g) if live => self.bind_done(g, ok, true),
            endpoint::Wr::Inv(g) if live => self.inv_done(g),
            endpoint::Wr::Bind(_) | endpoint::Wr::Inv(_) | endpoint::Wr::Drain => {}
        }
    }

    /// One slice of an RDMA read retired (or dropped unposted).
    pub(crate) fn slice_done(&mut self, token: u64, ok: bool) {
        let Some(ReadState::Rdma { left, failed, .. }) = self.reads.get_mut(&token) else {
            return;
        };
        *left = left.saturating_sub(1);
        *failed |= !ok;
        if *left == 0 {
            self.read_finished(token);
        }
    }

    /// Every slice of an RDMA read is done: report it, or hand it to TCP after a failure.
    pub(crate) fn read_finished(&mut self, token: u64) {
        let Some(ReadState::Rdma { op, failed, .. }) = self.reads.remove(&token) else {
            return;
        };
        let Some(p) = self.peers.get_mut(&op.peer) else {
            self.ready.push_back(Event::ReadDone {
                token,
                result: Err(ReadError::PeerGone {
                    peer: op.peer,
                    reason: "connection gone".into(),
                }),
            });
            return;
        };
        if p.grants.finished(op.grant.id.0) {
            self.send_private(op.peer, Body::RevokeAck(GrantRef { id: op.grant.id.0 }));
        }
        let p = &self.peers[&op.peer];
        if !failed && !p.ep.as_ref().is_some_and(|e| e.failed) {
            bump(&self.stats.rdma_reads, 1);
            bump(&self.stats.rdma_bytes, op.len);
            self.ready.push_back(Event::ReadDone {
                token,
                result: Ok(()),
            });
            return;
        }
        if let Some((_, by_us)) = p.closing {
            let result = Err(if by_us {
                ReadError::Aborted { peer: op.peer }
            } else {
                ReadError::PeerGone {
                    peer: op.peer,
                    reason: "the connection closed during an RDMA read".into(),
                }
            });
            self.ready.push_back(Event::ReadDone { token, result });
            return;
        }
        // Every request of the read is retired or flushed: no byte of it lands any more, so
        // the same destination can be written again over TCP.
        bump(&self.stats.failovers, 1);
        self.tcp_read(op);
    }

    /// Hands a read (none of whose bytes can land from RDMA any more, or that never went
    /// there) to the TCP transport, which reports it.
    pub(crate) fn tcp_read(&mut self, op: ReadOp) {
        self.reads.insert(op.token, ReadState::Tcp);
        // SAFETY: the caller's `read` contract covers the destination until this read's
        // ReadDone, which the TCP transport reports from now on.
        if let Err(e) = unsafe { self.inner.read(op) } {
            self.reads.remove(&op.token);
            self.ready.push_back(Event::ReadDone {
                token: op.token,
                result: Err(ReadError::PeerGone {
                    peer: op.peer,
                    reason: format!("the read over tcp failed: {e}"),
                }),
            });
        }
    }

    /// Starts (or refuses) a read to a peer on RDMA whose grant is known.
    pub(crate) fn start_rdma(&mut self, op: ReadOp) {
        let Some(p) = self.peers.get_mut(&op.peer) else {
            return;
        };
        let check = p.grants.check(op);
        let (offset, keys) = match check {
            Check::Go { offset, keys } => (offset, keys),
            Check::Parked { ask } => {
                self.reads.insert(op.token, ReadState::Parked);
                if ask {
                    self.send_private(op.peer, Body::GrantQuery(GrantRef { id: op.grant.id.0 }));
                }
                return;
            }
            Check::Refuse(reason) => {
                self.reads.remove(&op.token);
                self.ready.push_back(Event::ReadDone {
                    token: op.token,
                    result: Err(ReadError::Refused {
                        peer: op.peer,
                        reason,
                    }),
                });
                return;
            }
        };
        // A grantor with memory windows gives one rkey per queue pair; without them (a grant
        // across two memory regions, a failed bind) the read goes over TCP.
        let rdma = p.phase == crate::Phase::Rdma;
        let ep = p.ep.as_mut().filter(|e| {
            let n = e.connected().max(1);
            rdma && e.up() && (!e.peer_windows || (!keys.is_empty() && keys.len() % n == 0))
        });
        let Some(ep) = ep else {
            // Fell back meanwhile, or no windows for this grant.
            self.tcp_read(op);
            return;
        };
        let remote = ep
            .remote
            .as_ref()
            .expect("an endpoint that is up has the peer's table");
        let Some(mut slices) = endpoint::slices(
            op.token,
            &self.dev.local,
            op.local_offset,
            remote,
            offset,
            op.len,
        ) else {
            self.reads.remove(&op.token);
            self.ready.push_back(Event::ReadDone {
                token: op.token,
                result: Err(ReadError::Refused {
                    peer: op.peer,
                    reason: format!(
                        "grant {} lies outside the peer's registered arena",
                        op.grant.id.0
                    ),
                }),
            });
            return;
        };
        if ep.peer_windows {
            // Each window lies in one memory region and is valid on the queue pair it was
            // bound through only: keys go by (region of the grant, queue pair).
            let n = ep.connected().max(1);
            // The grant's keys start at the region of the grant's first byte (the descriptor's
            // `addr`, checked equal to the notice's offset).
            let first = remote.piece_in(op.grant.addr, 1).map_or(0, |p| p.3);
            let mut fits = true;
            for (j, s) in slices.iter_mut().enumerate() {
                let q = j % n;
                match s
                    .region
                    .checked_sub(first)
                    .and_then(|piece| keys.get(piece * n + q))
                {
                    Some(&key) => {
                        s.qp = u16::try_from(q).ok();
                        s.rkey = key;
                    }
                    None => fits = false,
                }
            }
            if !fits {
                // The notice's keys do not cover this read (a lying or confused grantor).
                self.tcp_read(op);
                return;
            }
        }
        if slices.is_empty() {
            self.reads.remove(&op.token);
            self.ready.push_back(Event::ReadDone {
                token: op.token,
                result: Ok(()),
            });
            return;
        }
        p.grants.started(op.grant.id.0);
        self.reads.insert(
            op.token,
            ReadState::Rdma {
                op,
                left: slices.len(),
                failed: false,
            },
        );
        ep.queue(slices);
    }

    pub(crate) fn complete_all(&mut self) {
        let any = self.drain_completions();
        // Busy-poll while completions come; after `SPIN` empty passes, arm the completion
        // queues so that the event loop can sleep on the channel (`ready_fd`).
        if any {
            self.empty_polls = 0;
        } else if self.any_in_flight() {
            self.empty_polls += 1;
            if self.empty_polls >= crate::SPIN {
                self.empty_polls = 0;
                if self.arm().is_ok() {
                    // Completions that came before the arming are caught here.
                    self.drain_completions();
                }
            }
        }
    }

    /// Polls every completion queue with requests in flight until it is empty and retires
    /// what the completions cover; returns whether any came.
    fn drain_completions(&mut self) -> bool {
        let mut any = false;
        let ids: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.ep.as_ref().is_some_and(|e| e.in_flight() > 0))
            .map(|(id, _)| *id)
            .collect();
        for peer in ids {
            while let Some(ep) = self.peers.get_mut(&peer).and_then(|p| p.ep.as_mut()) {
                let retired = match ep.complete(&mut self.wcs) {
                    Ok(r) => r,
                    Err(e) => {
                        let reason = format!("polling the completion queue failed: {e}");
                        self.fall_back(peer, reason, true);
                        break;
                    }
                };
                if let Some(err) = &retired.error {
                    self.fall_back(peer, format!("RDMA READ failed: {err}"), true);
                }
                if retired.wrs.is_empty() {
                    break;
                }
                any = true;
                let live = self
                    .peers
                    .get(&peer)
                    .and_then(|p| p.ep.as_ref())
                    .is_some_and(|e| !e.failed);
                for (wr, ok) in retired.wrs {
                    self.retire(wr, ok, live);
                }
            }
        }
        any
    }
}
