//! Peers: what happens when the TCP transport reports a connection, a message or a
//! disconnection, the RDMA set-up rounds (offer, ready, decline), falling back to TCP and
//! trying RDMA again. Part of [`RdmaTransport`].

use std::time::Instant;

use ferroplasma_transport::{ConnectError, Event, GrantId, Identity, PeerId, ReadError, Transport};

use crate::endpoint::Endpoint;
use crate::grants::ReaderGrants;
use crate::proto::{self, Body, Decline, Ready};
use crate::{
    bump, device, Mode, Peer, Phase, RdmaTransport, ESCAPE, MAX_NOTICES, RETRY_FIRST, RETRY_MAX,
    ROUND_MIN,
};
use ferroplasma_transport::hello::FEATURE_RDMA;
use ferroplasma_transport::msg::is_transport_private;

impl RdmaTransport {
    pub(crate) fn send_private(&mut self, peer: PeerId, body: Body) {
        if let Err(e) = self.inner.send(peer, proto::encode(body)) {
            tracing::debug!(%peer, error = %e, "rdma control message not sent");
        }
    }

    /// Reports the peer to the cluster (Connected, then what was held).
    pub(crate) fn announce(&mut self, peer: PeerId) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if p.announced || p.refused {
            return;
        }
        if self.mode == Mode::Rdma && p.phase == Phase::Tcp {
            // Loud once per node (it may retry every heartbeat), quiet afterwards.
            if self.refused_nodes.insert(p.identity.node_id) {
                tracing::error!(
                    %peer, node = p.identity.node_id, reason = %p.reason,
                    "refusing a peer without RDMA (--transport rdma)"
                );
            } else {
                tracing::debug!(%peer, node = p.identity.node_id, "refusing a peer without RDMA again");
            }
            p.refused = true;
            bump(&self.stats.refused_peers, 1);
            let outbound = !p.inbound;
            let addr = p.identity.addr.clone();
            let reason = format!("no RDMA to this peer ({}) and --transport rdma", p.reason);
            self.inner.disconnect(peer);
            if outbound {
                self.ready.push_back(Event::ConnectFailed {
                    peer,
                    error: ConnectError::Refused { addr, reason },
                });
            }
            return;
        }
        p.announced = true;
        tracing::info!(
            %peer,
            node = p.identity.node_id,
            transport = if p.phase == Phase::Rdma { "rdma" } else { "tcp" },
            reason = %p.reason,
            "peer transport chosen"
        );
        self.ready.push_back(Event::Connected {
            peer,
            identity: p.identity.clone(),
            inbound: p.inbound,
        });
        self.ready.extend(p.held.drain(..));
    }

    /// Leaves RDMA for TCP on this peer: queue pairs to ERR; reads already posted finish
    /// (flushed) and then go to TCP; grants stop waiting for acknowledgements (our queue
    /// pairs serve no READ in ERR).
    pub(crate) fn fall_back(&mut self, peer: PeerId, reason: String, tell_peer: bool) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let was_rdma = p.phase == Phase::Rdma;
        if p.phase != Phase::Tcp {
            tracing::warn!(%peer, node = p.identity.node_id, %reason, "RDMA to this peer stopped: tcp from now on");
            p.reason = reason.clone();
            p.phase = Phase::Tcp;
        }
        let dropped = match p.ep.as_mut() {
            Some(ep) => {
                if !ep.failed {
                    bump(&self.stats.endpoint_failures, u64::from(was_rdma));
                }
                ep.fail(&mut self.seq)
            }
            None => Vec::new(),
        };
        let round = p.round;
        p.grants.forget_all();
        // Reads waiting for a grant's notice go over TCP now.
        let parked = if p.closing.is_none() {
            p.grants.drain_parked()
        } else {
            Vec::new()
        };
        if p.offers && !self.device_gone && p.retry_at.is_none() && p.closing.is_none() {
            let wait = RETRY_FIRST
                .saturating_mul(1 << p.retries.min(8))
                .min(RETRY_MAX);
            p.retry_at = Some(Instant::now() + wait);
            p.retries += 1;
        }
        for t in dropped {
            self.slice_done(t, false);
        }
        for op in parked {
            self.tcp_read(op);
        }
        for g in self.granted.values_mut().filter(|g| g.peer == peer) {
            g.endpoint_gone();
        }
        if tell_peer {
            self.send_private(peer, Body::Decline(Decline { reason, round }));
        }
        self.finish_revokes();
        // A peer that leaves RDMA before the cluster heard of it is reported now (over TCP).
        self.announce(peer);
    }

    /// Whether new RDMA set-ups can start here.
    pub(crate) fn usable(&self) -> bool {
        !self.device_gone && self.port_up
    }

    /// Starts set-up round `round` with `peer`: fresh queue pairs (the old, idle ones are
    /// dropped) and our offer. On failure the peer stays on TCP (declined, with the reason).
    pub(crate) fn start_setup(&mut self, peer: PeerId, round: u32) {
        let cq_id = self.next_cq;
        self.next_cq += 1;
        let local_ip = self.inner.local_ip(peer);
        let made = Endpoint::new(&self.dev, peer, self.qps, cq_id, local_ip);
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if let Some(old) = p.ep.take() {
            self.cq_peer.remove(&old.cq_id);
        }
        p.round = round;
        p.round_at = Instant::now();
        p.grants.forget_all();
        match made {
            Ok(ep) => {
                let offer = ep.offer(&self.dev, round);
                self.cq_peer.insert(cq_id, peer);
                p.ep = Some(ep);
                p.phase = Phase::Setup {
                    since: Instant::now(),
                    sent_ready: false,
                    got_ready: false,
                };
                self.send_private(peer, Body::Offer(offer));
            }
            Err(e) => {
                let reason = format!("creating queue pairs failed: {e}");
                p.reason = reason.clone();
                p.phase = Phase::Tcp;
                self.send_private(peer, Body::Decline(Decline { reason, round }));
                self.announce(peer);
            }
        }
    }

    pub(crate) fn on_connected(&mut self, peer: PeerId, identity: Identity, inbound: bool) {
        let offers = identity.features & FEATURE_RDMA != 0;
        let mut p = Peer {
            identity,
            inbound,
            phase: Phase::Tcp,
            reason: String::new(),
            ep: None,
            held: Vec::new(),
            announced: false,
            refused: false,
            grants: ReaderGrants::default(),
            closing: None,
            offers,
            round: 1,
            round_at: Instant::now(),
            retry_at: None,
            retries: 0,
        };
        if !offers || !self.usable() {
            p.reason = if !offers {
                "the peer offers no RDMA (no usable device there, or --transport tcp)".into()
            } else if self.device_gone {
                "the RDMA device of this node is gone".into()
            } else {
                "the RDMA port of this node is down".into()
            };
            if offers {
                let reason = p.reason.clone();
                self.send_private(peer, Body::Decline(Decline { reason, round: 1 }));
            }
            self.peers.insert(peer, p);
            self.announce(peer);
            return;
        }
        self.peers.insert(peer, p);
        self.start_setup(peer, 1);
    }

    pub(crate) fn on_private(&mut self, peer: PeerId, body: &[u8]) {
        let msg = match proto::decode(body) {
            Ok(m) => m,
            Err(e) => {
                let reason = format!("bogus rdma message from the peer: {e}");
                tracing::warn!(%peer, %reason, "refusing RDMA with this peer");
                self.fall_back(peer, reason, true);
                self.announce(peer);
                return;
            }
        };
        let usable = self.usable();
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        match msg {
            Body::Offer(o) => {
                let duplicate = matches!(
                    p.phase,
                    Phase::Setup {
                        sent_ready: true,
                        ..
                    }
                );
                if o.round < p.round
                    || (o.round == p.round
                        && (!matches!(p.phase, Phase::Setup { .. }) || duplicate))
                {
                    // An older round, or this round already ended (or connected) here.
                    return;
                }
                if o.round > p.round {
                    // The peer starts a round (a reconnection). Only a peer that left RDMA
                    // (its Decline came first) does, and only the next round: anything else
                    // breaks the protocol.
                    let next = p.round.checked_add(1) == Some(o.round);
                    if p.phase != Phase::Tcp || !p.announced || !next {
                        let reason = format!(
                            "the peer offered set-up round {} in round {} ({})",
                            o.round,
                            p.round,
                            if p.phase == Phase::Tcp {
                                "tcp"
                            } else {
                                "rdma or set-up"
                            }
                        );
                        tracing::warn!(%peer, %reason, "refusing RDMA with this peer");
                        self.fall_back(peer, reason, true);
                        return;
                    }
                    let busy = p.ep.as_ref().is_some_and(|e| e.in_flight() > 0);
                    let hasty = p.round_at.elapsed() < ROUND_MIN;
                    if !p.offers || !usable || busy || hasty {
                        p.round = o.round;
                        let reason = if busy {
                            "reads of the last round are still being flushed"
                        } else if hasty {
                            "set-up rounds too close together"
                        } else {
                            "the RDMA port of this node is down"
                        }
                        .to_string();
                        let round = o.round;
                        self.send_private(peer, Body::Decline(Decline { reason, round }));
                        return;
                    }
                    self.start_setup(peer, o.round);
                }
                let Some(p) = self.peers.get_mut(&peer) else {
                    return;
                };
                let Phase::Setup {
                    since, got_ready, ..
                } = p.phase
                else {
                    return;
                };
                let Some(ep) = p.ep.as_mut() else {
                    return;
                };
                let round = p.round;
                match ep.connect(&self.dev, &o) {
                    Ok(()) => {
                        p.phase = Phase::Setup {
                            since,
                            sent_ready: true,
                            got_ready,
                        };
                        self.send_private(peer, Body::Ready(Ready { round }));
                        self.maybe_up(peer);
                    }
                    Err(reason) => {
                        tracing::warn!(%peer, %reason, "RDMA connection failed");
                        self.fall_back(peer, reason, true);
                        self.announce(peer);
                    }
                }
            }
            Body::Ready(r) => {
                if let (
                    Phase::Setup {
                        since, sent_ready, ..
                    },
                    true,
                ) = (p.phase, r.round == p.round)
                {
                    p.phase = Phase::Setup {
                        since,
                        sent_ready,
                        got_ready: true,
                    };
                    self.maybe_up(peer);
                }
            }
            Body::Decline(d) => {
                if d.round < p.round {
                    return;
                }
                p.round = d.round;
                let reason = format!("the peer declined RDMA: {}", d.reason);
                self.fall_back(peer, reason, false);
                self.announce(peer);
            }
            Body::GrantNotice(n) => {
                // Notices come after the grantor's Ready, so a reader on RDMA gets them; one
                // arriving otherwise is from a round that ended: forgotten.
                if p.phase != Phase::Rdma {
                    return;
                }
                // Keys: at most one per memory region the range touches and queue pair.
                let most = p.ep.as_ref().map_or(0, |e| {
                    e.connected()
                        * e.remote
                            .as_ref()
                            .map_or(0, |t| t.regions_touched(n.offset, n.len))
                });
                if n.keys.len() > most {
                    let reason = format!(
                        "a grant notice with {} keys for a range that takes at most {most}",
                        n.keys.len()
                    );
                    self.fall_back(peer, reason, true);
                    return;
                }
                if p.grants.known_count() >= MAX_NOTICES {
                    let reason = format!("the peer sent more than {MAX_NOTICES} grant notices");
                    self.fall_back(peer, reason, true);
                    return;
                }
                for op in p.grants.notice(n) {
                    self.start_rdma(op);
                }
            }
            Body::GrantGone(r) => {
                for op in p.grants.gone(r.id) {
                    self.reads.remove(&op.token);
                    self.ready.push_back(Event::ReadDone {
                        token: op.token,
                        result: Err(ReadError::Refused {
                            peer,
                            reason: format!("no live grant {} to this node", r.id),
                        }),
                    });
                }
            }
            Body::GrantQuery(r) => {
                match self.granted.get(&GrantId(r.id)) {
                    // From now on a revoke waits for the peer's acknowledgement (it may read
                    // the grant over RDMA), unless our queue pairs are down.
                    Some(g) if g.peer == peer && !g.revoking => self.offer_grant(GrantId(r.id)),
                    _ => self.send_private(peer, Body::GrantGone(r)),
                }
            }
            Body::Revoke(r) => {
                if p.grants.revoke(r.id) {
                    self.send_private(peer, Body::RevokeAck(r));
                }
            }
            Body::RevokeAck(r) => {
                if let Some(g) = self.granted.get_mut(&GrantId(r.id)) {
                    if g.peer == peer {
                        g.acked = true;
                    }
                }
                self.finish_revokes();
            }
        }
    }

    pub(crate) fn maybe_up(&mut self, peer: PeerId) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if let Phase::Setup {
            sent_ready: true,
            got_ready: true,
            ..
        } = p.phase
        {
            p.phase = Phase::Rdma;
            p.retry_at = None;
            p.retries = 0;
            bump(&self.stats.rdma_peers, 1);
            let ep = p.ep.as_ref();
            p.reason = format!(
                "{} RC queue pairs on {} (GID index {}, MTU {})",
                ep.map_or(0, |e| e.connected()),
                self.dev.ctx.name(),
                ep.map_or(self.dev.gid_index, |e| e.gid_index),
                device::mtu_bytes(self.dev.mtu.min(ep.map_or(self.dev.mtu, |e| e.peer_mtu())))
            );
            self.announce(peer);
        }
    }

    pub(crate) fn on_disconnected(&mut self, peer: PeerId, reason: String) {
        let ev = Event::Disconnected {
            peer,
            reason: reason.clone(),
        };
        let Some(p) = self.peers.get_mut(&peer) else {
            self.ready.push_back(ev);
            return;
        };
        let by_us = p.closing.as_ref().is_some_and(|(_, us)| *us);
        p.closing = Some((Some(ev), by_us));
        let parked = p.grants.drain_parked();
        for op in parked {
            self.reads.remove(&op.token);
            self.ready.push_back(Event::ReadDone {
                token: op.token,
                result: Err(if by_us {
                    ReadError::Aborted { peer }
                } else {
                    ReadError::PeerGone {
                        peer,
                        reason: reason.clone(),
                    }
                }),
            });
        }
        if let Some(p) = self.peers.get_mut(&peer) {
            if let Some(ep) = p.ep.as_mut() {
                for t in ep.fail(&mut self.seq) {
                    self.slice_done(t, false);
                }
            }
        }
        for g in self.granted.values_mut().filter(|g| g.peer == peer) {
            g.endpoint_gone();
        }
        self.finish_revokes();
    }

    /// Peers whose connection ended and whose requests are all retired: report them gone.
    pub(crate) fn reap(&mut self) {
        let done: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                p.closing.as_ref().is_some_and(|(ev, _)| ev.is_some())
                    && p.ep.as_ref().is_none_or(|e| e.in_flight() == 0)
            })
            .map(|(id, _)| *id)
            .collect();
        for peer in done {
            let Some(mut p) = self.peers.remove(&peer) else {
                continue;
            };
            if let Some(ep) = p.ep.take() {
                self.cq_peer.retain(|_, v| *v != peer);
                drop(ep);
            }
            let Some((Some(ev), _)) = p.closing.take() else {
                continue;
            };
            if p.announced {
                self.ready.push_back(ev);
            } else if !p.inbound && !p.refused {
                self.ready.push_back(Event::ConnectFailed {
                    peer,
                    error: ConnectError::Unreachable {
                        addr: p.identity.addr.clone(),
                        reason: "the connection closed during RDMA set-up".into(),
                    },
                });
            }
        }
    }

    pub(crate) fn on_inner(&mut self, ev: Event) {
        match ev {
            Event::Connected {
                peer,
                identity,
                inbound,
            } => self.on_connected(peer, identity, inbound),
            Event::Message { peer, mut body }
                if is_transport_private(&body)
                    && self
                        .peers
                        .get(&peer)
                        .is_some_and(|p| p.identity.features & FEATURE_RDMA != 0) =>
            {
                if body.starts_with(&ESCAPE) {
                    body.drain(..ESCAPE.len());
                    self.deliver(peer, body);
                } else {
                    self.on_private(peer, &body);
                }
            }
            Event::Message { peer, body } => self.deliver(peer, body),
            Event::ReadDone { token, result } => {
                self.reads.remove(&token);
                self.ready.push_back(Event::ReadDone { token, result });
            }
            Event::Revoked { grant } => match self.granted.get_mut(&grant) {
                Some(g) => {
                    g.tcp_revoked = true;
                    g.revoking = true;
                    self.finish_revokes();
                }
                None => self.ready.push_back(Event::Revoked { grant }),
            },
            Event::Disconnected { peer, reason } => self.on_disconnected(peer, reason),
            other => self.ready.push_back(other),
        }
    }

    /// A control message for the cluster (held until the peer is announced).
    pub(crate) fn deliver(&mut self, peer: PeerId, body: Vec<u8>) {
        match self.peers.get_mut(&peer) {
            Some(p) if p.refused => {}
            Some(p) if !p.announced => p.held.push(Event::Message { peer, body }),
            _ => self.ready.push_back(Event::Message { peer, body }),
        }
    }
}
