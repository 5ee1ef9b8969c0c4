//! Serving peers: their lookups and pins, answered from the core's replies, and the leases
//! (grants) a pin holds until the peer unpins.

use ferroplasma_transport::msg::{self, Body, Status};
use ferroplasma_transport::PeerId;

use super::wire::{id_from, short};
use super::{Call, Lease, Runner};
use crate::id::NodeId;
use crate::protocol::{ErrorReply, Reply};
use crate::store::link::{CoreCall, ToCore};

/// Longest a lookup waits at the owner for a seal (longer waits ask again).
const MAX_LOOKUP_WAIT_MS: u64 = 30_000;
/// Most pins one peer may hold here at once.
const MAX_LEASES_PER_PEER: usize = 4096;

impl Runner {
    pub(super) fn serve_lookup(&mut self, node: u64, peer: PeerId, l: msg::Lookup) {
        tracing::trace!(peer = %peer, req = l.req, "lookup from a peer");
        let id = match id_from(&l.id) {
            Some(id) if id.owner().0 == self.me => id,
            _ => {
                let status = Status::NotFound;
                return self.reply(
                    peer,
                    Body::LookupReply(msg::LookupReply {
                        req: l.req,
                        status: status as i32,
                        detail: "not owned by this node".into(),
                        ..Default::default()
                    }),
                );
            }
        };
        // Bounded: a peer cannot park requests here forever; the asker asks again when its
        // own caller waits longer.
        let timeout_ms = l.timeout_ms.min(MAX_LOOKUP_WAIT_MS);
        let from = Some(NodeId(node));
        if l.probe {
            self.call_for(
                from,
                CoreCall::Wait {
                    ids: vec![id],
                    timeout_ms,
                },
                Call::Probe { peer, req: l.req },
            );
        } else {
            self.call_for(
                from,
                CoreCall::Get {
                    ids: vec![id],
                    timeout_ms,
                },
                Call::Lookup {
                    peer,
                    req: l.req,
                    id,
                    // What the asker takes, and what our own cap sends.
                    inline_max: l.inline_max.min(self.inline_threshold).min(self.inline_fit),
                },
            );
        }
    }

    pub(super) fn serve_pin(&mut self, node: u64, peer: PeerId, p: msg::Pin) {
        if self.leases.values().filter(|l| l.peer == peer).count() >= MAX_LEASES_PER_PEER {
            return self.reply(
                peer,
                Body::PinReply(msg::PinReply {
                    req: p.req,
                    status: Status::Busy as i32,
                    detail: format!("more than {MAX_LEASES_PER_PEER} pins from one peer"),
                    ..Default::default()
                }),
            );
        }
        let Some(id) = id_from(&p.id) else {
            return self.reply(
                peer,
                Body::PinReply(msg::PinReply {
                    req: p.req,
                    status: Status::NotFound as i32,
                    detail: "malformed id".into(),
                    ..Default::default()
                }),
            );
        };
        self.call_for(
            Some(NodeId(node)),
            CoreCall::Get {
                ids: vec![id],
                timeout_ms: 0,
            },
            Call::Pin {
                peer,
                req: p.req,
                id,
                generation: p.generation,
            },
        );
    }

    /// The core answered one of our calls.
    pub(super) fn core_reply(&mut self, o: crate::store::Outgoing) {
        let Some(call) = self.calls.remove(&o.seq) else {
            // Not ours to use: never keep a pin nobody will release.
            if let Ok(Reply::Objects(locs)) = &o.reply {
                let handles = locs.iter().map(|l| l.handle).collect();
                self.push_core(ToCore::Call {
                    seq: 0,
                    peer: None,
                    call: CoreCall::Release { handles },
                });
            }
            return;
        };
        let loc = match &o.reply {
            Ok(Reply::Objects(locs)) => locs.first().copied(),
            _ => None,
        };
        let peer_alive = |s: &Self, p: PeerId| s.conns.node_of.contains_key(&p);
        match call {
            Call::Ignore => {
                if let Some(l) = loc {
                    self.release(l.handle);
                }
            }
            Call::Probe { peer, req } => {
                let sealed = matches!(&o.reply, Ok(Reply::Ready(f)) if f.first() == Some(&true));
                let (status, detail) = match &o.reply {
                    _ if sealed => (Status::Found, String::new()),
                    // Refused by a cap (the cluster side's calls are well-formed, so
                    // `Invalid` is a cap: too many waiting requests from that peer).
                    Err(e @ ErrorReply::Invalid(_)) => (Status::Busy, format!("{e:?}")),
                    Err(e) => (Status::Failed, format!("{e:?}")),
                    Ok(_) => (Status::Timeout, String::new()),
                };
                let detail = short(detail);
                self.reply(
                    peer,
                    Body::LookupReply(msg::LookupReply {
                        req,
                        status: status as i32,
                        detail,
                        ..Default::default()
                    }),
                );
            }
            Call::Lookup {
                peer,
                req,
                id,
                inline_max,
            } => {
                let mut r = msg::LookupReply {
                    req,
                    ..Default::default()
                };
                match (&o.reply, loc) {
                    (Ok(_), Some(l)) => {
                        r.status = Status::Found as i32;
                        r.data_size = l.data_size;
                        r.meta_size = l.meta_size;
                        r.generation = l.handle;
                        let total = l.data_size + l.meta_size;
                        if total <= inline_max {
                            if let Some(b) = self.arena.read_at(l.offset, total) {
                                r.inlined = true;
                                r.inline = b;
                            }
                        }
                        self.release(l.handle);
                        r.holders.push(self.me);
                        r.holders.extend(
                            self.dir
                                .holders(&id)
                                .into_iter()
                                .filter(|&n| self.members.is_alive(n)),
                        );
                    }
                    (Err(ErrorReply::Timeout(_)), _) => r.status = Status::Timeout as i32,
                    (Err(e @ ErrorReply::Invalid(_)), _) => {
                        r.status = Status::Busy as i32;
                        r.detail = short(format!("{e:?}"));
                    }
                    (Err(e), _) => {
                        r.status = Status::Failed as i32;
                        r.detail = short(format!("{e:?}"));
                    }
                    (Ok(_), None) => r.status = Status::Failed as i32,
                }
                if r.inlined && msg::lookup_reply_len(&r) > self.max_msg {
                    // Does not fit a control message after all: it goes as a read.
                    r.inlined = false;
                    r.inline = Vec::new();
                }
                if peer_alive(self, peer) {
                    tracing::trace!(peer = %peer, req, inlined = r.inlined, "lookup answered");
                    self.reply(peer, Body::LookupReply(r));
                }
            }
            Call::Pin {
                peer,
                req,
                id,
                generation,
            } => {
                let mut r = msg::PinReply {
                    req,
                    ..Default::default()
                };
                // Serve only the incarnation the owner named.
                let current = |s: &Self, handle: u64| {
                    if id.owner().0 == s.me {
                        handle == generation
                    } else {
                        s.copy_gen.get(&id) == Some(&generation)
                    }
                };
                let loc = match loc {
                    Some(l) if !current(self, l.handle) => {
                        self.release(l.handle);
                        None
                    }
                    other => other,
                };
                match loc {
                    Some(l) if peer_alive(self, peer) => {
                        // SAFETY: `l` is a sealed object the core pinned for this call; the
                        // pin is released only after the grant's `Revoked` (`granted` maps
                        // the grant to the handle released then). The store writes no sealed
                        // object (creates and restores write fresh allocations, inline copies
                        // before they seal) and frees no pinned one (a delete is deferred),
                        // so nothing in this process writes the range while it is granted.
                        let granted =
                            unsafe { self.t.grant(peer, l.offset, l.data_size + l.meta_size) };
                        match granted {
                            Ok(desc) => {
                                let lease = self.next_lease;
                                self.next_lease += 1;
                                let grant = desc.id;
                                self.leases.insert(lease, Lease { peer, grant });
                                self.granted.insert(grant, l.handle);
                                r.status = Status::Found as i32;
                                r.offset = l.offset;
                                r.data_size = l.data_size;
                                r.meta_size = l.meta_size;
                                r.lease = lease;
                                r.grant = desc.encode().to_vec();
                            }
                            Err(e) => {
                                self.release(l.handle);
                                r.status = Status::Failed as i32;
                                r.detail = short(e.to_string());
                            }
                        }
                    }
                    Some(l) => {
                        self.release(l.handle);
                        return;
                    }
                    None => {
                        r.status = match &o.reply {
                            Err(ErrorReply::Timeout(_)) => Status::NotFound as i32,
                            Err(ErrorReply::Invalid(_)) => Status::Busy as i32,
                            _ => Status::Failed as i32,
                        };
                        if let Err(e) = &o.reply {
                            r.detail = short(format!("{e:?}"));
                        }
                    }
                }
                self.reply(peer, Body::PinReply(r));
            }
        }
    }

    pub(super) fn release(&mut self, handle: u64) {
        self.call(
            CoreCall::Release {
                handles: vec![handle],
            },
            Call::Ignore,
        );
    }
}
