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

    /// The list as the head sends it, in as many messages as it takes for each to fit a
    /// control message (see [`split`]).
    pub fn to_msgs(&self) -> Vec<Members> {
        split(self.to_msg())
    }

    /// The list as one message (it may exceed a control message: send [`Self::to_msgs`]).
    pub fn to_msg(&self) -> Members {
        Members {
            part: 0,
            parts: 0,
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
                    transport: String::new(),
                    transport_reason: String::new(),
                })
                .collect(),
            status: Vec::new(),
        }
    }
}

/// Room for one member list part: the smallest control message cap any transport has
/// ([`MIN_CONTROL_MSG`](ferroplasma_transport::MIN_CONTROL_MSG), so that every node takes it
/// whatever its own cap) less the envelope around it (the `Envelope` and `Members` keys,
/// lengths, epoch and part numbers take < 40 bytes).
const PART_BUDGET: usize = ferroplasma_transport::MIN_CONTROL_MSG - 64;
/// Most parts a list may come in (1024 members of 256-byte addresses take ~80).
pub const MAX_PARTS: u32 = 256;

/// Cuts a member list into parts that each fit a control message: the whole list as one
/// message (`parts` 0) when it fits, else parts numbered from 0 with `parts` set in each.
pub fn split(m: Members) -> Vec<Members> {
    use ferroplasma_transport::msg::len_of;
    if len_of(&m) <= PART_BUDGET {
        return vec![m];
    }
    let mut parts: Vec<Vec<Member>> = vec![Vec::new()];
    let mut used = 0;
    for member in m.members {
        // The member, its key and its length prefix.
        let n = len_of(&member) + 4;
        if used + n > PART_BUDGET && parts.last().is_some_and(|p| !p.is_empty()) {
            parts.push(Vec::new());
            used = 0;
        }
        used += n;
        if let Some(p) = parts.last_mut() {
            p.push(member);
        }
    }
    let total = u32::try_from(parts.len()).unwrap_or(u32::MAX);
    parts
        .into_iter()
        .enumerate()
        .map(|(i, members)| Members {
            epoch: m.epoch,
            members,
            part: u32::try_from(i).unwrap_or(u32::MAX),
            parts: total,
        })
        .collect()
}

/// Puts a member list sent in parts together again. Parts of one list come in order over
/// one connection; anything else (a part out of order, another sender or epoch, too many
/// parts or members) drops what was gathered.
#[derive(Debug, Default)]
pub struct Assembly {
    /// Sender, epoch, parts expected, members so far, parts so far.
    pending: Option<(u64, u64, u32, Vec<Member>, u32)>,
}

impl Assembly {
    /// Takes one message from `from`; returns a whole list when it has one.
    pub fn add(&mut self, from: u64, m: Members) -> Option<Members> {
        if m.parts <= 1 {
            self.pending = None;
            return Some(m);
        }
        if m.parts > MAX_PARTS || m.part >= m.parts {
            self.pending = None;
            return None;
        }
        if m.part == 0 {
            self.pending = Some((from, m.epoch, m.parts, Vec::new(), 0));
        }
        let (f, epoch, parts, mut members, got) = self.pending.take()?;
        if (f, epoch, parts, got) != (from, m.epoch, m.parts, m.part)
            || members.len() + m.members.len() > MAX_MEMBERS_IN_LIST
        {
            return None;
        }
        members.extend(m.members);
        if got + 1 == parts {
            return Some(Members {
                epoch,
                members,
                part: 0,
                parts: 0,
            });
        }
        self.pending = Some((f, epoch, parts, members, got + 1));
        None
    }
}

/// Most members a list may name (the head keeps at most
/// [`crate::protocol::MAX_MEMBERS`]; a little slack).
const MAX_MEMBERS_IN_LIST: usize = 2 * crate::protocol::MAX_MEMBERS;

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

    /// A full list of long addresses does not fit one control message: it goes in parts
    /// that each fit, and comes back whole; a short list stays one message.
    #[test]
    fn long_lists_go_in_parts_that_fit_a_control_message() {
        let long = Members {
            epoch: 9,
            members: (0..crate::protocol::MAX_MEMBERS as u64)
                .map(|n| Member {
                    node_id: n + 1,
                    addr: format!("{n:0>256}"),
                    state: MemberState::Alive as i32,
                    head: n == 0,
                })
                .collect(),
            part: 0,
            parts: 0,
        };
        assert!(ferroplasma_transport::msg::len_of(&long) > ferroplasma_transport::MIN_CONTROL_MSG);
        let parts = split(long.clone());
        assert!(parts.len() > 1 && parts.len() <= MAX_PARTS as usize);
        let mut asm = Assembly::default();
        let mut whole = None;
        for (i, p) in parts.into_iter().enumerate() {
            let body = ferroplasma_transport::msg::Envelope::of(
                ferroplasma_transport::msg::Body::Members(p.clone()),
            )
            .to_bytes();
            assert!(
                body.len() <= ferroplasma_transport::MIN_CONTROL_MSG,
                "part {i} is {} bytes",
                body.len()
            );
            assert!(whole.is_none(), "a list came back before its last part");
            whole = asm.add(1, p);
        }
        assert_eq!(whole, Some(long));
        let short = Membership::new(NodeId(1), "h", true, DEAD, Instant::now()).to_msgs();
        assert_eq!(short.len(), 1);
        assert_eq!(short[0].parts, 0);
        assert_eq!(asm.add(1, short[0].clone()), Some(short[0].clone()));
    }

    /// Parts out of order, from another sender or of another epoch are dropped.
    #[test]
    fn parts_that_do_not_follow_are_dropped() {
        let part = |part, parts, epoch| Members {
            epoch,
            members: vec![Member {
                node_id: u64::from(part) + 1,
                addr: "a".into(),
                state: 0,
                head: false,
            }],
            part,
            parts,
        };
        let mut asm = Assembly::default();
        assert_eq!(asm.add(1, part(0, 3, 5)), None);
        assert_eq!(asm.add(1, part(2, 3, 5)), None, "skipped part 1");
        assert_eq!(asm.add(1, part(1, 3, 5)), None, "the list was dropped");
        assert_eq!(asm.add(1, part(0, 2, 5)), None);
        assert_eq!(asm.add(2, part(1, 2, 5)), None, "another sender");
        assert_eq!(asm.add(1, part(0, 2, 5)), None);
        assert_eq!(asm.add(1, part(1, 2, 6)), None, "another epoch");
        assert_eq!(asm.add(1, part(0, 2, 5)), None);
        assert!(asm
            .add(1, part(1, 2, 5))
            .is_some_and(|m| m.members.len() == 2));
        assert_eq!(asm.add(1, part(0, MAX_PARTS + 1, 5)), None);
        assert_eq!(asm.add(1, part(3, 3, 5)), None);
    }
}
