//! One pass of [`RdmaTransport`]'s poll: TCP events, the completion channel, async events,
//! completions, posting, timers (set-up timeouts, stalls, retries, unanswered grant queries),
//! and arming the completion queues before the event loop sleeps.

use std::time::{Duration, Instant};

use ferroplasma_transport::{PeerId, Transport};

use crate::endpoint::Endpoint;
use crate::{events, Phase, RdmaTransport, STALL};
use ferroplasma_transport::TransportError;

impl RdmaTransport {
    /// Everything that can be done now without waiting.
    pub(crate) fn step(&mut self) -> Result<(), TransportError> {
        let mut evs = Vec::new();
        self.inner.poll(&mut evs, Some(Duration::ZERO))?;
        for ev in evs {
            self.on_inner(ev);
        }
        // Completion channel: which CQs fired (they are disarmed now).
        loop {
            match self.dev.channel.next_event() {
                Ok(Some(cq)) => {
                    if let Some(p) = self.cq_peer.get(&cq).and_then(|id| self.peers.get_mut(id)) {
                        if let Some(ep) = p.ep.as_mut() {
                            ep.armed = false;
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the completion channel failed");
                    break;
                }
            }
        }
        self.async_events();
        self.complete_all();
        // Post what is queued.
        let mut failed = Vec::new();
        for (id, p) in &mut self.peers {
            if let Some(ep) = p.ep.as_mut() {
                if let Err(e) = ep.post(&mut self.seq) {
                    failed.push((*id, format!("posting RDMA READs failed: {e}")));
                }
            }
        }
        for (peer, reason) in failed {
            self.fall_back(peer, reason, true);
        }
        // The timers (stalls, unacknowledged revokes, set-up timeouts, retries, unanswered
        // queries) count in seconds: looked at every `TIMERS` rather than on every pass.
        let now = Instant::now();
        if now >= self.next_timers {
            self.next_timers = now + crate::TIMERS;
            self.timers(now);
        }
        self.reap();
        Ok(())
    }

    /// The timed checks of [`RdmaTransport::step`].
    fn timers(&mut self, now: Instant) {
        let stalled: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                p.ep.as_ref().is_some_and(|e| {
                    !e.failed && e.in_flight() > 0 && now.duration_since(e.last_progress) > STALL
                })
            })
            .map(|(id, _)| *id)
            .collect();
        for peer in stalled {
            let reason = format!("RDMA READs made no progress for {} s", STALL.as_secs());
            self.fall_back(peer, reason, true);
        }
        // A failed endpoint whose requests never all retire (a flush that does not come):
        // destroy its queue pairs, after which none of them touches memory.
        let stuck: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                p.ep.as_ref().is_some_and(|e| {
                    e.failed && e.in_flight() > 0 && now.duration_since(e.last_progress) > STALL
                })
            })
            .map(|(id, _)| *id)
            .collect();
        for peer in stuck {
            tracing::warn!(%peer, "flushed requests did not complete: destroying the queue pairs");
            let wrs = self
                .peers
                .get_mut(&peer)
                .and_then(|p| p.ep.as_mut())
                .map(Endpoint::destroy)
                .unwrap_or_default();
            for wr in wrs {
                self.retire(wr, false, false);
            }
        }
        // Revokes the peer does not acknowledge: our queue pairs to it go to ERR, after which
        // no READ of the range can pass them.
        let deaf: Vec<PeerId> = self
            .granted
            .values()
            .filter(|g| {
                g.revoking
                    && g.rdma
                    && !g.acked
                    && g.revoke_since
                        .is_some_and(|t| now.duration_since(t) > STALL)
            })
            .map(|g| g.peer)
            .collect();
        for peer in deaf {
            self.fall_back(peer, "the peer did not acknowledge a revoke".into(), true);
        }
        // Set-ups that took too long.
        let late: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                matches!(p.phase, Phase::Setup { since, .. } if since.elapsed() > self.setup_timeout)
            })
            .map(|(id, _)| *id)
            .collect();
        for peer in late {
            self.fall_back(peer, "RDMA set-up timed out".into(), true);
            self.announce(peer);
        }
        // RDMA again with peers that fell back, when their time comes.
        if self.usable() {
            let due: Vec<PeerId> = self
                .peers
                .iter()
                .filter(|(_, p)| {
                    p.phase == Phase::Tcp
                        && p.announced
                        && p.closing.is_none()
                        && p.retry_at.is_some_and(|t| t <= now)
                })
                .map(|(id, _)| *id)
                .collect();
            for peer in due {
                let Some(p) = self.peers.get_mut(&peer) else {
                    continue;
                };
                if p.ep.as_ref().is_some_and(|e| e.in_flight() > 0) {
                    // The last round's requests are still being flushed.
                    p.retry_at = Some(now + Duration::from_millis(100));
                    continue;
                }
                p.retry_at = None;
                let round = p.round + 1;
                tracing::info!(%peer, node = p.identity.node_id, round, "trying RDMA again");
                self.start_setup(peer, round);
            }
        }
        // Reads whose grant query went unanswered go over TCP (its server checks them).
        let mut expired = Vec::new();
        for p in self.peers.values_mut() {
            if p.grants.any_parked() {
                expired.extend(p.grants.expired(now, self.setup_timeout));
            }
        }
        let mut silent: Vec<PeerId> = expired.iter().map(|op| op.peer).collect();
        silent.sort_unstable();
        silent.dedup();
        for peer in silent {
            // An rdma transport answers every query at once: this peer is broken or lying.
            self.fall_back(peer, "the peer does not answer grant queries".into(), true);
        }
        for op in expired {
            tracing::debug!(peer = %op.peer, grant = op.grant.id.0, "grant query unanswered: reading over tcp");
            self.tcp_read(op);
        }
    }

    pub(crate) fn async_events(&mut self) {
        loop {
            let ev = match self.dev.ctx.next_async_event() {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "reading RDMA async events failed");
                    break;
                }
            };
            let name = events::name(ev.kind);
            tracing::warn!(event = name, qp = ?ev.qp_num, port = ?ev.port, "RDMA async event");
            let hit: Vec<PeerId> = match ev.qp_num {
                Some(qpn) if events::qp_fatal(ev.kind) => self
                    .peers
                    .iter()
                    .filter(|(_, p)| p.ep.as_ref().is_some_and(|e| e.owns_qp(qpn)))
                    .map(|(id, _)| *id)
                    .collect(),
                _ if events::device_fatal(ev.kind) => self.peers.keys().copied().collect(),
                _ => Vec::new(),
            };
            if ev.kind == events::PORT_ERR {
                self.port_up = false;
            }
            if ev.kind == events::PORT_ACTIVE {
                self.port_up = true;
                let now = Instant::now();
                for p in self.peers.values_mut() {
                    if p.phase == Phase::Tcp && p.offers {
                        p.retry_at = Some(now);
                    }
                }
            }
            let gone = ev.kind == events::DEVICE_FATAL;
            for peer in hit {
                self.fall_back(peer, format!("RDMA async event {name}"), true);
                if gone {
                    let tokens = self
                        .peers
                        .get_mut(&peer)
                        .and_then(|p| p.ep.as_mut())
                        .map(Endpoint::destroy)
                        .unwrap_or_default();
                    for wr in tokens {
                        self.retire(wr, false, false);
                    }
                }
            }
            if gone {
                self.device_gone = true;
            }
        }
    }

    pub(crate) fn any_in_flight(&self) -> bool {
        self.peers
            .values()
            .any(|p| p.ep.as_ref().is_some_and(|e| e.in_flight() > 0))
    }

    /// Arms every CQ with requests in flight; true when all are armed (sleeping is safe
    /// after one more pass over the CQs).
    pub(crate) fn arm(&mut self) -> Result<(), TransportError> {
        let mut failed = Vec::new();
        for (id, p) in &mut self.peers {
            if let Some(ep) = p.ep.as_mut().filter(|e| e.in_flight() > 0) {
                if let Err(e) = ep.arm() {
                    failed.push((*id, format!("arming the completion queue failed: {e}")));
                }
            }
        }
        for (peer, reason) in failed {
            self.fall_back(peer, reason, true);
        }
        Ok(())
    }

    /// Slices queued on an endpoint that is up (posting them is work).
    pub(crate) fn has_posting_work(&self) -> bool {
        self.peers
            .values()
            .any(|p| p.ep.as_ref().is_some_and(Endpoint::can_post))
    }
}
