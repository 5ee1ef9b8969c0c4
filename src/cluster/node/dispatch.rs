//! Messages from peers and from the core, handed to membership, serving and pulls; copy
//! reports (to and from owners) are handled here.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use ferroplasma_transport::msg::{self, Body, Envelope};
use ferroplasma_transport::PeerId;

use super::wire::{id_from, IDS_PER_MSG};
use super::{Call, Phase, Pull, Redo, Runner};
use crate::id::{NodeId, ObjectId};
use crate::store::link::{CoreCall, ToCluster, ToCore};

impl Runner {
    // ---- messages from peers ----

    pub(super) fn message(&mut self, peer: PeerId, body: &[u8], now: Instant) {
        let Some(&node) = self.conns.node_of.get(&peer) else {
            return;
        };
        self.members.heard(node, now);
        let env = match Envelope::from_bytes(body) {
            Ok(Envelope { body: Some(b) }) => b,
            Ok(Envelope { body: None }) | Err(_) => {
                tracing::warn!(node = %NodeId(node), "undecodable message; dropping the peer");
                self.t.disconnect(peer);
                self.lost_peer(peer, "protocol error");
                return;
            }
        };
        match env {
            Body::Join(j) => {
                if j.addr.len() > ferroplasma_transport::hello::MAX_ADDR {
                    tracing::warn!(node = %NodeId(node), "join with an oversized address; dropping the peer");
                    self.t.disconnect(peer);
                    return;
                }
                if j.node_id != node {
                    tracing::warn!(node = %NodeId(node), "join for another node; ignored");
                    return;
                }
                let c = self.members.join(node, &j.addr, now);
                if c.changed {
                    tracing::info!(node = %NodeId(node), addr = %j.addr, "node joined");
                }
                self.membership_changed(c);
                // The joiner needs the list even when nothing changed (a repeated join).
                for m in self.members.to_msgs() {
                    self.reply(peer, Body::Members(m));
                }
            }
            Body::Members(m) => {
                // Only the head of our list speaks for the cluster; a new head only through
                // the join address, once the old one is gone.
                let from_head = self.members.head() == Some(node);
                let head_gone = self
                    .members
                    .head()
                    .is_none_or(|h| !self.members.is_alive(h));
                if from_head || (head_gone && self.conns.join_peer == Some(peer)) {
                    // A long list comes in parts (each fits a control message).
                    if let Some(m) = self.member_parts.add(node, m) {
                        let c = self.members.adopt(node, &m, now);
                        self.membership_changed(c);
                    }
                } else {
                    tracing::warn!(node = %NodeId(node), "membership list from a node that is not the head; ignored");
                }
            }
            Body::Heartbeat(_) => {}
            Body::Lookup(l) => self.serve_lookup(node, peer, l),
            Body::LookupReply(r) => self.lookup_reply(node, r, now),
            Body::Pin(p) => self.serve_pin(node, peer, p),
            Body::PinReply(r) => self.pin_reply(node, peer, r, now),
            Body::Unpin(u) => {
                if self.leases.get(&u.lease).is_some_and(|l| l.peer == peer) {
                    if let Some(l) = self.leases.remove(&u.lease) {
                        self.t.revoke(l.grant);
                    }
                }
            }
            Body::CopyAdded(ids) => {
                let gens = ids.generations.iter().copied().chain(std::iter::repeat(0));
                for (b, generation) in ids.ids.iter().zip(gens).take(crate::protocol::MAX_IDS) {
                    let Some(id) = id_from(b) else { continue };
                    if id.owner().0 == self.me {
                        // Kept only if it is a copy of the object sealed here now (a delete,
                        // or a delete and re-create, may have crossed the report).
                        self.dir.add(id, node);
                        self.push_core(ToCore::CheckCopy {
                            node,
                            id,
                            generation,
                        });
                    }
                }
            }
            Body::CopyRemoved(ids) => {
                for id in ids.ids.iter().filter_map(|b| id_from(b)) {
                    self.dir.remove(&id, node);
                }
            }
            Body::Forget(ids) => {
                // Only the owner may make us drop copies of its objects.
                let ids: Vec<ObjectId> = ids
                    .ids
                    .iter()
                    .filter_map(|b| id_from(b))
                    .filter(|id| id.owner().0 == node)
                    .take(crate::protocol::MAX_IDS)
                    .collect();
                if !ids.is_empty() {
                    self.call(CoreCall::Forget { ids }, Call::Ignore);
                }
            }
        }
    }

    // ---- messages from the core ----

    pub(super) fn core_message(&mut self, m: ToCluster) {
        match m {
            ToCluster::Reply(o) => self.core_reply(o),
            ToCluster::Pull { id, timeout_ms } => {
                if self.pulls.contains_key(&id) {
                    return;
                }
                let owner = id.owner().0;
                self.pulls.insert(
                    id,
                    Pull {
                        id,
                        timeout_ms,
                        phase: Phase::Lookup { node: owner },
                        size: None,
                        holders: Vec::new(),
                        tried: HashSet::new(),
                        lookups: 0,
                        offset: None,
                        token: 0,
                        generation: 0,
                        busy: 0,
                        backing_off: None,
                    },
                );
                self.lookup(id);
            }
            ToCluster::Probe { id, timeout_ms } => {
                if let Some(b) = self.probes.remove(&id) {
                    if let Some(at) = b.backing_off {
                        self.backoff.remove(&(at, id, Redo::Probe));
                    }
                }
                self.probe(id, timeout_ms);
            }
            ToCluster::Allocated { id, offset } => {
                let Some(p) = self.pulls.get_mut(&id) else {
                    // The pull failed meanwhile; the core learnt it already.
                    return;
                };
                p.offset = Some(offset);
                self.next_source(id);
            }
            ToCluster::Cancel { id } => {
                // Its requests in flight stay in `asked`: their answers find no pull.
                self.drop_pull(id);
                // What we said of it before is stale; this marks the end.
                self.push_core(ToCore::Cancelled { id });
            }
            ToCluster::CopyAdded(id) => {
                let owner = id.owner().0;
                let generation = self.copy_gen.get(&id).copied().unwrap_or(0);
                if self.members.is_alive(owner) {
                    self.send_to(
                        owner,
                        Body::CopyAdded(msg::Ids {
                            ids: vec![id.as_bytes().to_vec()],
                            generations: vec![generation],
                        }),
                    );
                }
            }
            ToCluster::CopyChecked { node, id, current } => {
                if !current {
                    self.dir.remove(&id, node);
                    self.send_to(
                        node,
                        Body::Forget(msg::Ids {
                            ids: vec![id.as_bytes().to_vec()],
                            generations: Vec::new(),
                        }),
                    );
                }
            }
            ToCluster::CopiesLost(ids) => {
                for id in &ids {
                    self.copy_gen.remove(id);
                }
                let mut by_owner: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
                for id in ids {
                    by_owner
                        .entry(id.owner().0)
                        .or_default()
                        .push(id.as_bytes().to_vec());
                }
                for (owner, ids) in by_owner {
                    self.send_ids(owner, ids, Body::CopyRemoved);
                }
            }
            ToCluster::Deleted(ids) => {
                let mut by_holder: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
                for id in ids {
                    for n in self.dir.take(&id) {
                        by_holder.entry(n).or_default().push(id.as_bytes().to_vec());
                    }
                }
                for (n, ids) in by_holder {
                    self.send_ids(n, ids, Body::Forget);
                }
            }
        }
    }

    /// Sends `ids` to a live `node` in messages of at most [`IDS_PER_MSG`] ids each (so that
    /// every node takes them, whatever its control-message cap).
    fn send_ids(&mut self, node: u64, mut ids: Vec<Vec<u8>>, body: fn(msg::Ids) -> Body) {
        if !self.members.is_alive(node) {
            return;
        }
        while !ids.is_empty() {
            let rest = ids.split_off(ids.len().min(IDS_PER_MSG));
            let batch = std::mem::replace(&mut ids, rest);
            self.send_to(
                node,
                body(msg::Ids {
                    ids: batch,
                    generations: Vec::new(),
                }),
            );
        }
    }
}
