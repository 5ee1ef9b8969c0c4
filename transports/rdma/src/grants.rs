//! What a reader knows of the grants a peer made to it over RDMA, and what a grantor waits
//! for before it reports a revoke. No I/O: the transport feeds it messages and reads.
//!
//! RDMA READs are one-sided: the peer's CPU never sees them, so the peer cannot refuse a read
//! the way the TCP server does. The grantor therefore tells the reader's transport about each
//! grant ([`crate::proto::GrantNotice`]), the reader's transport checks every read against
//! those notices exactly as the TCP server checks its requests (same refusals, the connection
//! stays up), and a revoke completes only when the reader acknowledges that no read of the
//! grant is in flight. This protects against mistakes (stale or mixed-up descriptors), not
//! against a malicious peer, which could post READs outside any grant: docs/rdma.md, "Grant
//! enforcement".

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use ferroplasma_transport::ReadOp;

use crate::proto::GrantNotice;

/// The answer to "may this read go?".
#[derive(Debug, PartialEq, Eq)]
pub enum Check {
    /// Yes: the range within the grantor's arena is `[offset, offset + len)`.
    Go {
        /// Arena offset at the grantor.
        offset: u64,
        /// The grant's memory-window rkeys per queue pair (a grantor with windows; empty:
        /// none, or read it over TCP).
        keys: Vec<u32>,
    },
    /// No, with the reason the reader reports.
    Refuse(String),
    /// Unknown grant: the read is parked until the grantor answers; `ask` says whether a
    /// query must be sent (the first read parked on this grant).
    Parked {
        /// Send a `GrantQuery`.
        ask: bool,
    },
}

/// The reader's side, for one peer.
#[derive(Debug, Default)]
pub struct ReaderGrants {
    known: HashMap<u64, GrantNotice>,
    in_flight: HashMap<u64, u32>,
    revoking: HashSet<u64>,
    parked: HashMap<u64, (Instant, Vec<ReadOp>)>,
}

impl ReaderGrants {
    /// Checks `op` against the notices; parks it when its grant is unknown.
    pub fn check(&mut self, op: ReadOp) -> Check {
        let id = op.grant.id.0;
        let Some(n) = self.known.get(&id) else {
            let (_, list) = self
                .parked
                .entry(id)
                .or_insert_with(|| (Instant::now(), Vec::new()));
            list.push(op);
            return Check::Parked {
                ask: list.len() == 1,
            };
        };
        if op.grant.addr != n.offset || op.grant.len != n.len || op.grant.key != n.key {
            return Check::Refuse(format!("the descriptor does not match grant {id}"));
        }
        match op.offset.checked_add(op.len) {
            Some(end) if end <= n.len => Check::Go {
                offset: n.offset + op.offset,
                keys: n.keys.clone(),
            },
            _ => Check::Refuse(format!(
                "range {}+{} lies outside grant {id} of {} bytes",
                op.offset, op.len, n.len
            )),
        }
    }

    /// A notice arrived: returns the reads parked on it (to check again).
    pub fn notice(&mut self, n: GrantNotice) -> Vec<ReadOp> {
        let id = n.id;
        self.known.insert(id, n);
        self.revoking.remove(&id);
        self.parked.remove(&id).map(|(_, v)| v).unwrap_or_default()
    }

    /// The grantor has no such grant: returns the reads parked on it (to refuse).
    pub fn gone(&mut self, id: u64) -> Vec<ReadOp> {
        self.parked.remove(&id).map(|(_, v)| v).unwrap_or_default()
    }

    /// Reads parked longer than `after` without an answer (a peer that does not answer
    /// queries): the caller sends them over TCP, whose server checks them itself.
    pub fn expired(&mut self, now: Instant, after: Duration) -> Vec<ReadOp> {
        let late: Vec<u64> = self
            .parked
            .iter()
            .filter(|(_, (since, _))| now.saturating_duration_since(*since) >= after)
            .map(|(id, _)| *id)
            .collect();
        late.into_iter()
            .flat_map(|id| self.parked.remove(&id).map(|(_, v)| v).unwrap_or_default())
            .collect()
    }

    /// Whether reads wait for an answer.
    pub fn any_parked(&self) -> bool {
        !self.parked.is_empty()
    }

    /// A read of grant `id` was posted.
    pub fn started(&mut self, id: u64) {
        *self.in_flight.entry(id).or_default() += 1;
    }

    /// A read of grant `id` finished (no byte of it moves any more). Returns true when a
    /// revoke of the grant waited for it: send the `RevokeAck` now.
    pub fn finished(&mut self, id: u64) -> bool {
        let left = match self.in_flight.get_mut(&id) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n
            }
            None => 0,
        };
        if left == 0 {
            self.in_flight.remove(&id);
            return self.revoking.remove(&id);
        }
        false
    }

    /// The grantor revokes `id`: later reads of it are refused. Returns true when no read
    /// of it is in flight (acknowledge at once), else the ack follows from
    /// [`ReaderGrants::finished`].
    pub fn revoke(&mut self, id: u64) -> bool {
        self.known.remove(&id);
        if self.in_flight.contains_key(&id) {
            self.revoking.insert(id);
            false
        } else {
            true
        }
    }

    /// The grantor's RDMA path failed: forget every notice (a later round asks again for
    /// what it reads; the grantor answers only for live grants) and every pending revoke
    /// (the grantor stops waiting for acknowledgements once its queue pairs are in ERR).
    pub fn forget_all(&mut self) {
        self.known.clear();
        self.revoking.clear();
    }

    /// How many notices are known.
    pub fn known_count(&self) -> usize {
        self.known.len()
    }

    /// The window rkeys of a known grant.
    pub fn keys_of(&self, id: u64) -> Option<Vec<u32>> {
        self.known.get(&id).map(|n| n.keys.clone())
    }

    /// Every parked read (the connection ended).
    pub fn drain_parked(&mut self) -> Vec<ReadOp> {
        self.parked.drain().flat_map(|(_, (_, v))| v).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferroplasma_transport::{GrantDescriptor, GrantId, PeerId};

    fn op(token: u64, id: u64, addr: u64, glen: u64, offset: u64, len: u64) -> ReadOp {
        ReadOp {
            token,
            peer: PeerId::from_raw(1),
            grant: GrantDescriptor {
                id: GrantId(id),
                addr,
                len: glen,
                key: 0,
            },
            offset,
            local_offset: 0,
            len,
        }
    }

    fn notice(id: u64, offset: u64, len: u64) -> GrantNotice {
        GrantNotice {
            id,
            offset,
            len,
            key: 0,
            keys: Vec::new(),
        }
    }

    #[test]
    fn known_grants_checked_like_the_tcp_server() {
        let mut g = ReaderGrants::default();
        assert!(g.notice(notice(1, 4096, 4096)).is_empty());
        assert_eq!(
            g.check(op(1, 1, 4096, 4096, 100, 200)),
            Check::Go {
                offset: 4196,
                keys: Vec::new()
            }
        );
        // Stretched, shifted, out of range, overflowing.
        for bad in [
            op(2, 1, 4096, 8192, 0, 10),
            op(3, 1, 8192, 4096, 0, 10),
            op(4, 1, 4096, 4096, 4000, 200),
            op(5, 1, 4096, 4096, u64::MAX - 5, 10),
        ] {
            assert!(matches!(g.check(bad), Check::Refuse(_)), "{bad:?}");
        }
    }

    #[test]
    fn unknown_grants_park_until_answered() {
        let mut g = ReaderGrants::default();
        assert_eq!(
            g.check(op(1, 9, 0, 100, 0, 10)),
            Check::Parked { ask: true }
        );
        assert_eq!(
            g.check(op(2, 9, 0, 100, 0, 10)),
            Check::Parked { ask: false }
        );
        let woken = g.notice(notice(9, 0, 100));
        assert_eq!(woken.iter().map(|o| o.token).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(
            g.check(op(3, 7, 0, 100, 0, 10)),
            Check::Parked { ask: true }
        );
        assert_eq!(g.gone(7).len(), 1);
        assert!(g.gone(7).is_empty());
        // A peer that never answers: the parked reads expire.
        assert_eq!(
            g.check(op(4, 8, 0, 100, 0, 10)),
            Check::Parked { ask: true }
        );
        assert!(g
            .expired(Instant::now(), Duration::from_secs(60))
            .is_empty());
        let late = g.expired(
            Instant::now() + Duration::from_secs(61),
            Duration::from_secs(60),
        );
        assert_eq!(late.iter().map(|o| o.token).collect::<Vec<_>>(), [4]);
        assert!(!g.any_parked());
    }

    #[test]
    fn revoke_waits_for_reads_in_flight() {
        let mut g = ReaderGrants::default();
        g.notice(notice(1, 0, 100));
        g.notice(notice(2, 0, 100));
        g.started(1);
        g.started(1);
        assert!(!g.revoke(1), "reads in flight: no ack yet");
        assert!(matches!(
            g.check(op(1, 1, 0, 100, 0, 10)),
            Check::Parked { .. }
        ));
        assert!(!g.finished(1));
        assert!(g.finished(1), "the last read done: ack");
        assert!(g.revoke(2), "nothing in flight: ack at once");
        g.started(2);
        assert!(!g.finished(2), "no revoke pending");
    }
}
