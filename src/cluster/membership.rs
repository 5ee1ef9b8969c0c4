//! Who is in the cluster. The head (the node started without `--join`) keeps the list:
//! nodes join it, it tells everyone the list on every change, and it declares a node dead
//! when nothing was heard from it for the dead-after time. Every other node follows the
//! head's list and watches the head itself the same way. Pure bookkeeping: no I/O, the
//! clock comes in as an argument.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ferroplasma_transport::msg::{Member, MemberState, Members};

use crate::id::NodeId;
use crate::protocol::{ClusterView, MemberInfo};

#[derive(Debug, Clone)]
struct Rec {
    addr: String,
    alive: bool,
    head: bool,
    last_heard: Instant,
}

/// The membership list as one node knows it.
#[derive(Debug)]
pub struct Membership {
    me: u64,
    is_head: bool,
    head: Option<u64>,
    members: BTreeMap<u64, Rec>,
    epoch: u64,
    dead_after: Duration,
}

/// What changed in a call.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// The list changed (the head broadcasts it; others republish their view).
    pub changed: bool,
    /// Nodes newly declared dead.
    pub died: Vec<u64>,
}

impl Membership {
    /// A node's view: the head's own list, or a joiner's (empty but for itself until the
    /// head answers).
    pub fn new(me: NodeId, addr: &str, is_head: bool, dead_after: Duration, now: Instant) -> Self {
        let mut members = BTreeMap::new();
        members.insert(
            me.0,
            Rec {
                addr: addr.to_string(),
                alive: true,
                head: is_head,
                last_heard: now,
            },
        );
        Self {
            me: me.0,
            is_head,
            head: is_head.then_some(me.0),
            members,
            epoch: 1,
            dead_after,
        }
    }

    /// Whether this node is the head.
    pub fn is_head(&self) -> bool {
        self.is_head
    }

    /// The head's node id, once known.
    pub fn head(&self) -> Option<u64> {
        self.head
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Where `node` listens.
    pub fn addr_of(&self, node: u64) -> Option<&str> {
        self.members.get(&node).map(|r| r.addr.as_str())
    }

    /// Whether `node` is a live member.
    pub fn is_alive(&self, node: u64) -> bool {
        self.members.get(&node).is_some_and(|r| r.alive)
    }

    /// Live members other than this node.
    pub fn others(&self) -> Vec<u64> {
        self.members
            .iter()
            .filter(|(&n, r)| n != self.me && r.alive)
            .map(|(&n, _)| n)
            .collect()
    }

    /// (Head) A node joins, or rejoins after being declared dead.
    pub fn join(&mut self, node: u64, addr: &str, now: Instant) -> Change {
        if !self.is_head || node == self.me {
            return Change::default();
        }
        if !self.members.contains_key(&node) && self.members.len() >= crate::protocol::MAX_MEMBERS {
            tracing::warn!(node = %NodeId(node), "membership list full; join refused");
            return Change::default();
        }
        // A node that restarted comes back with a new id at the same address: the old id is
        // gone for good.
        let replaced: Vec<u64> = self
            .members
            .iter()
            .filter(|(&n, r)| n != node && n != self.me && r.addr == addr)
            .map(|(&n, _)| n)
            .collect();
        let mut died = Vec::new();
        for n in replaced {
            if self.members.remove(&n).is_some_and(|r| r.alive) {
                died.push(n);
            }
        }
        let rec = Rec {
            addr: addr.to_string(),
            alive: true,
            head: false,
            last_heard: now,
        };
        let changed = !died.is_empty()
            || match self.members.get(&node) {
                Some(r) => !r.alive || r.addr != addr,
                None => true,
            };
        self.members.insert(node, rec);
        if changed {
            self.epoch += 1;
        }
        Change { changed, died }
    }

    /// Something arrived from `node`: it is alive.
    pub fn heard(&mut self, node: u64, now: Instant) -> Change {
        let Some(r) = self.members.get_mut(&node) else {
            return Change::default();
        };
        r.last_heard = now;
        // Only the head brings a dead member back (through a new join); others wait for
        // its list, so that every node agrees.
        Change::default()
    }

    /// (Non-head) The head's list arrived from `from`.
    pub fn adopt(&mut self, from: u64, m: &Members, now: Instant) -> Change {
        if self.is_head || m.members.iter().all(|x| !x.head || x.node_id != from) {
            return Change::default();
        }
        if self.head == Some(from) && m.epoch < self.epoch {
            return Change::default();
        }
        let mut died = Vec::new();
        let mut next = BTreeMap::new();
        for x in m.members.iter().take(crate::protocol::MAX_MEMBERS) {
            let alive = x.state == MemberState::Alive as i32;
            let prev = self.members.get(&x.node_id);
            if prev.is_some_and(|p| p.alive) && !alive {
                died.push(x.node_id);
            }
            next.insert(
                x.node_id,
                Rec {
                    addr: x.addr.clone(),
                    alive: alive || x.node_id == self.me,
                    head: x.head,
                    last_heard: prev.map_or(now, |p| p.last_heard),
                },
            );
        }
        if let Some(me) = self.members.get(&self.me).cloned() {
            next.entry(self.me).or_insert(me);
        }
        if let Some(h) = next.get_mut(&from) {
            h.last_heard = now;
        }
        for (&n, r) in &self.members {
            if r.alive && !next.contains_key(&n) && n != self.me {
                died.push(n);
            }
        }
        let changed = self.head != Some(from) || m.epoch != self.epoch || !died.is_empty();
        self.head = Some(from);
        self.epoch = m.epoch;
        self.members = next;
        Change { changed, died }
    }

    /// Declares silent nodes dead: every member, for the head; the head, for the others.
    pub fn tick(&mut self, now: Instant) -> Change {
        let mut died = Vec::new();
        for (&n, r) in &mut self.members {
            let watched = n != self.me && (self.is_head || Some(n) == self.head);
            if watched && r.alive && now.saturating_duration_since(r.last_heard) > self.dead_after {
                r.alive = false;
                died.push(n);
            }
        }
        // The head forgets members dead for long (node ids are fresh on every start, so
        // they never come back under the same id).
        let before = self.members.len();
        if self.is_head {
            let forget = self.dead_after * 10;
            self.members.retain(|&n, r| {
                n == self.me || r.alive || now.saturating_duration_since(r.last_heard) <= forget
            });
        }
        let changed = !died.is_empty() || self.members.len() != before;
        if changed && self.is_head {
            self.epoch += 1;
        }
        Change { changed, died }
    }

    /// (Non-head) The head is reachable again: forget that it was declared dead until its
    /// list says otherwise.
    pub fn head_back(&mut self, now: Instant) {
        if let Some(r) = self.head.and_then(|h| self.members.get_mut(&h)) {
            r.alive = true;
            r.last_heard = now;
        }
    }

    /// The list as the head sends it.
    pub fn to_msg(&self) -> Members {
        Members {
            epoch: self.epoch,
            members: self
                .members
                .iter()
                .map(|(&n, r)| Member {
                    node_id: n,
                    addr: r.addr.clone(),
                    state: if r.alive {
                        MemberState::Alive as i32
                    } else {
                        MemberState::Dead as i32
                    },
                    head: r.head,
                })
                .collect(),
        }
    }

    /// The list for `ferroplasma stat`.
    pub fn view(&self, transport: &str) -> ClusterView {
        ClusterView {
            transport: transport.to_string(),
            epoch: self.epoch,
            members: self
                .members
                .iter()
                .map(|(&n, r)| MemberInfo {
                    node_id: NodeId(n),
                    addr: r.addr.clone(),
                    alive: r.alive,
                    head: r.head,
                    this: n == self.me,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEAD: Duration = Duration::from_secs(3);

    #[test]
    fn join_broadcast_and_death() {
        let t0 = Instant::now();
        let mut head = Membership::new(NodeId(1), "h", true, DEAD, t0);
        let mut b = Membership::new(NodeId(2), "b", false, DEAD, t0);
        assert!(head.join(2, "b", t0).changed);
        assert!(
            !head.join(2, "b", t0).changed,
            "a repeated join changes nothing"
        );
        let c = b.adopt(1, &head.to_msg(), t0);
        assert!(c.changed);
        assert_eq!(b.head(), Some(1));
        assert!(b.is_alive(1) && b.is_alive(2));
        assert_eq!(b.others(), vec![1]);
        // b keeps talking, so it stays alive.
        let t1 = t0 + Duration::from_secs(2);
        head.heard(2, t1);
        assert_eq!(
            head.tick(t1 + Duration::from_secs(2)).died,
            Vec::<u64>::new()
        );
        // Then it goes silent.
        let t2 = t1 + DEAD + Duration::from_millis(1);
        let c = head.tick(t2);
        assert_eq!(c.died, vec![2]);
        assert!(c.changed);
        assert!(!head.is_alive(2));
        // A third node learns that b is dead from the list.
        let mut c3 = Membership::new(NodeId(3), "c", false, DEAD, t0);
        head.join(3, "c", t2);
        c3.adopt(1, &head.to_msg(), t2);
        assert!(!c3.is_alive(2));
        assert!(c3.is_alive(3), "a node never believes itself dead");
        // b rejoins.
        assert!(head.join(2, "b", t2).changed);
        assert!(head.is_alive(2));
        // b restarts with a new id at the same address: the old id is gone.
        let c = head.join(4, "b", t2);
        assert_eq!(c.died, vec![2]);
        assert!(head.addr_of(2).is_none() && head.is_alive(4));
        // Long-dead members are forgotten.
        head.join(5, "e", t2);
        let t3 = t2 + DEAD + Duration::from_millis(1);
        for n in [3, 4] {
            head.heard(n, t3);
        }
        assert_eq!(head.tick(t3).died, vec![5]);
        assert!(
            head.addr_of(5).is_some(),
            "a dead member is listed for a while"
        );
        let t4 = t2 + DEAD * 11;
        for n in [3, 4] {
            head.heard(n, t4);
        }
        assert!(head.tick(t4).changed);
        assert!(head.addr_of(5).is_none(), "a long-dead member is forgotten");
        assert!(head.is_alive(3) && head.is_alive(4));
    }

    #[test]
    fn followers_watch_the_head_and_ignore_strangers() {
        let t0 = Instant::now();
        let mut head = Membership::new(NodeId(1), "h", true, DEAD, t0);
        let mut b = Membership::new(NodeId(2), "b", false, DEAD, t0);
        head.join(2, "b", t0);
        b.adopt(1, &head.to_msg(), t0);
        // A list from a node that is not its head is ignored.
        let fake = Membership::new(NodeId(9), "x", false, DEAD, t0).to_msg();
        assert_eq!(b.adopt(9, &fake, t0), Change::default());
        // An old epoch from the head is ignored.
        let old = head.to_msg();
        head.join(3, "c", t0);
        b.adopt(1, &head.to_msg(), t0);
        assert!(!b.adopt(1, &old, t0).changed);
        assert!(b.is_alive(3));
        let c = b.tick(t0 + DEAD + Duration::from_millis(1));
        assert_eq!(c.died, vec![1], "followers declare a silent head dead");
        b.head_back(t0 + DEAD * 2);
        assert!(b.is_alive(1));
    }
}
