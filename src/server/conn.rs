//! One client connection as the event loop sees it: its rings and doorbell, and serving it
//! (taking requests, parking it while its reply ring lacks room, pushing its replies).

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::protocol::{encode_reply, Request, Writer};
use crate::ring::{Consumer, Producer, Segment};
use crate::shm::SharedMapping;
use crate::store::{ClientId, Core, Outgoing};

/// Room a reply ring must have before we take another request from that client: the largest
/// reply (a full get or list) plus a possible wrap-around pad.
pub(super) const REPLY_RESERVE: u64 = 2 * (32 * crate::protocol::MAX_IDS as u64 + 64);
/// Requests taken from one client per turn before looking at the next: every client with
/// requests gets this budget in each turn of the loop, so one busy client cannot starve others.
const BATCH: usize = 64;
/// Doorbell rings in a row after which the node found nothing to do for the client (no request
/// taken, not unparked) before its doorbell is ignored for [`MUTE_FOR`]. A client that follows
/// the protocol rings once per request it publishes while the node sleeps, and after reading
/// replies while the node waits for room, so it is served between two rings.
const MUTE_AFTER: u32 = 8;
/// How long a muted doorbell is not watched. The client's requests are still taken on every
/// turn the loop runs meanwhile; they wait at most this long for a sleeping loop.
pub(super) const MUTE_FOR: std::time::Duration = std::time::Duration::from_millis(1);
/// A client blocked on a reply rings about every 10 ms while the node sleeps, in case a
/// doorbell was lost (`client::Inner::await_reply`). While it has a request waiting in the
/// store, a ring this long or longer after its previous ring is that insurance, not idle.
const INSURANCE_GAP: std::time::Duration = std::time::Duration::from_millis(5);

/// Counts a client's doorbell rings that found nothing to do (see [`MUTE_AFTER`]).
#[derive(Debug, Default)]
pub(super) struct Rings {
    /// Rings in a row that found nothing to do.
    idle: u32,
    /// When it last rang.
    last: Option<Instant>,
}

impl Rings {
    /// Accounts one turn in which the client rang (`rang`) or not. `progress`: requests were
    /// taken, it was unparked, or replies waiting for room went into its ring (it made room);
    /// `waiting_in_store`: a request of its waits in the store, so it is blocked on a reply.
    /// Returns whether its doorbell should now be muted.
    pub(super) fn turn(
        &mut self,
        rang: bool,
        progress: bool,
        waiting_in_store: bool,
        now: Instant,
    ) -> bool {
        if progress {
            self.idle = 0;
        }
        if !rang {
            return false;
        }
        let previous = self.last.replace(now);
        if progress {
            return false;
        }
        let insurance =
            waiting_in_store && previous.is_none_or(|p| now.duration_since(p) >= INSURANCE_GAP);
        if insurance {
            return false;
        }
        self.idle += 1;
        if self.idle >= MUTE_AFTER {
            self.idle = 0;
            return true;
        }
        false
    }
}

/// A client's connection: its control segment, rings and doorbell, and the replies that
/// wait for room in its reply ring.
pub(super) struct Conn {
    pub(super) id: ClientId,
    pub(super) sock: UnixStream,
    pub(super) seg: Segment,
    req: Consumer,
    rep: Producer,
    pub(super) doorbell: OwnedFd,
    /// Replies were pushed since the client was last woken.
    pub(super) wake: bool,
    pub(super) broken: bool,
    /// No requests are taken from it: its reply ring lacks room for the largest reply, or
    /// replies wait in `backlog`. Its waiting requests neither keep the loop spinning nor
    /// stop it sleeping, and the loop does not ask it to ring when it sends (no
    /// `daemon_sleeping`), until it reads replies and rings the doorbell because
    /// `reply_room_wanted` is set. A client that never reads is served no more, and its
    /// hang-up is still seen.
    pub(super) parked: bool,
    /// Replies that did not fit its reply ring, oldest first; pushed before anything else.
    /// Only completions of requests taken earlier land here (requests are not taken while
    /// it is not empty), so it holds at most `backlog_cap` replies.
    backlog: VecDeque<Outgoing>,
    /// `max_pending_per_client + 1`: every request it has waiting in the store, plus the
    /// reply to the request that completed them. Beyond that the client is dropped.
    backlog_cap: usize,
    /// Its doorbell rang since the last turn.
    pub(super) rang: bool,
    /// Its rings that found nothing to do (see [`MUTE_AFTER`]).
    rings: Rings,
    /// Replies from `backlog` went into its reply ring since the last turn.
    flushed: bool,
    /// While set, its doorbell is not watched (until then).
    pub(super) muted_until: Option<Instant>,
}

impl Conn {
    /// A new connection; `max_pending` is the store's cap on a client's waiting requests.
    pub(super) fn new(
        id: ClientId,
        sock: UnixStream,
        seg: Segment,
        (req, rep): (Consumer, Producer),
        doorbell: OwnedFd,
        max_pending: usize,
    ) -> Self {
        Self {
            id,
            sock,
            seg,
            req,
            rep,
            doorbell,
            wake: false,
            broken: false,
            parked: false,
            backlog: VecDeque::new(),
            backlog_cap: max_pending.saturating_add(1),
            rang: false,
            rings: Rings::default(),
            flushed: false,
            muted_until: None,
        }
    }

    /// Accounts one turn: `served` when requests were taken or the client was unparked;
    /// replies pushed from its backlog count too (see [`Rings::turn`]). Returns whether its
    /// doorbell should now be muted for [`MUTE_FOR`]: it rang [`MUTE_AFTER`] times in a row
    /// with nothing to do.
    pub(super) fn turn_done(&mut self, served: bool, waiting_in_store: bool, now: Instant) -> bool {
        let rang = std::mem::take(&mut self.rang);
        let progress = served || std::mem::take(&mut self.flushed);
        self.rings.turn(rang, progress, waiting_in_store, now)
    }

    /// Whether a request waits in its ring (for the loop's last look before it sleeps).
    pub(super) fn has_request(&self) -> bool {
        !self.parked && self.req.has_data()
    }
}

/// Takes up to [`BATCH`] requests from one client. Returns whether any was taken. Replies
/// to this client go to it at once; replies to others (completed requests of theirs) are
/// appended to `others`. `mine` is scratch space, empty between calls.
#[allow(clippy::too_many_arguments)]
pub(super) fn serve(
    conn: &mut Conn,
    core: &mut Core<Arc<SharedMapping>>,
    buf: &mut Vec<u8>,
    w: &mut Writer,
    now: Instant,
    mine: &mut Vec<Outgoing>,
    others: &mut Vec<Outgoing>,
) -> bool {
    if conn.broken {
        return false;
    }
    if conn.parked {
        // Waiting replies first, then the room check. Reading the consumer's head is cheap;
        // its doorbell is what wakes a sleeping loop.
        if !has_room(conn, w) {
            return false;
        }
        conn.parked = false;
        conn.seg.set_reply_room_wanted(false);
    }
    let mut n = 0;
    loop {
        if n >= BATCH || conn.broken || conn.parked || (conn.req.has_data() && park(conn, w)) {
            break;
        }
        match conn.req.pop(buf) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                tracing::warn!(client = conn.id, error = %e, "request ring corrupt; dropping client");
                conn.broken = true;
                break;
            }
        }
        n += 1;
        match Request::decode(buf) {
            Ok((seq, req)) => core.handle(conn.id, seq, req, now, mine),
            Err(e) => {
                // A reply needs a known op and a sequence number; without them (or for a
                // release, which has no reply) the only answer is to hang up.
                let header = buf.get(..8).and_then(|h| {
                    let op = crate::protocol::Op::try_from(h[0]).ok()?;
                    (op != crate::protocol::Op::Release)
                        .then(|| (op, u32::from_le_bytes([h[4], h[5], h[6], h[7]])))
                });
                tracing::debug!(client = conn.id, error = %e, "malformed request");
                match header {
                    Some((op, seq)) => mine.push(Outgoing {
                        client: conn.id,
                        op,
                        seq,
                        reply: Err(crate::protocol::ErrorReply::Invalid(e.to_string())),
                    }),
                    None => {
                        tracing::warn!(client = conn.id, error = %e, "undecodable request; dropping client");
                        conn.broken = true;
                        break;
                    }
                }
            }
        }
        // Replies to this client go into its ring at once, so that the room check sees
        // them; replies to others wait for the end of the turn.
        for o in mine.drain(..) {
            if o.client == conn.id {
                send(conn, o, w);
            } else {
                others.push(o);
            }
        }
    }
    n > 0
}

/// Whether `conn` must wait because replies wait for room or its reply ring lacks room for
/// the largest reply; if so it is parked and told to ring the doorbell once it has read
/// replies.
fn park(conn: &mut Conn, w: &mut Writer) -> bool {
    if has_room(conn, w) {
        return false;
    }
    if conn.broken {
        return true;
    }
    conn.seg.set_reply_room_wanted(true);
    // SYNC POINT: pairs with the client's fence between storing its reply ring's head and
    // reading `reply_room_wanted` (Segment::reply_room_wanted_fenced): either it sees the flag and
    // rings, or we see the room it made here.
    std::sync::atomic::fence(Ordering::SeqCst);
    if has_room(conn, w) {
        conn.seg.set_reply_room_wanted(false);
        return false;
    }
    conn.parked = !conn.broken;
    true
}

/// Pushes the waiting replies, then says whether `conn` may take a request: nothing waits
/// and its reply ring has room for the largest reply. A head the client corrupted marks it
/// broken (and reads as no room).
fn has_room(conn: &mut Conn, w: &mut Writer) -> bool {
    if !flush(conn, w) {
        return false;
    }
    match conn.rep.check_room(REPLY_RESERVE) {
        Ok(room) => room,
        Err(e) => {
            tracing::warn!(client = conn.id, error = %e, "reply ring corrupt; dropping client");
            conn.broken = true;
            false
        }
    }
}

/// Pushes the waiting replies into the reply ring, oldest first, as far as they fit.
/// Returns whether none is left.
fn flush(conn: &mut Conn, w: &mut Writer) -> bool {
    while let Some(o) = conn.backlog.pop_front() {
        if conn.broken || !push(conn, &o, w) {
            conn.backlog.push_front(o);
            return false;
        }
        conn.flushed = true;
    }
    true
}

/// Sends one reply: into the reply ring if nothing waits before it and it fits, else to the
/// end of the backlog (which parks the client). A client past its backlog bound is dropped.
pub(super) fn send(conn: &mut Conn, o: Outgoing, w: &mut Writer) {
    if conn.broken || (conn.backlog.is_empty() && push(conn, &o, w)) {
        return;
    }
    if conn.backlog.len() >= conn.backlog_cap {
        tracing::warn!(
            client = conn.id,
            waiting = conn.backlog.len(),
            "more replies wait for room than the client has requests waiting; dropping it"
        );
        conn.broken = true;
        return;
    }
    conn.backlog.push_back(o);
    if !conn.parked {
        park(conn, w);
    }
}

/// Pushes one reply into the reply ring. Returns whether it went in; a corrupt ring marks
/// the client broken.
fn push(conn: &mut Conn, o: &Outgoing, w: &mut Writer) -> bool {
    w.buf.clear();
    encode_reply(o.op, o.seq, &o.reply, w);
    match conn.rep.try_push(&[&w.buf]) {
        Ok(true) => {
            conn.wake = true;
            true
        }
        Ok(false) => false,
        Err(e) => {
            tracing::warn!(client = conn.id, error = %e, "reply ring corrupt; dropping client");
            conn.broken = true;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A client draining a long backlog of replies rings after each read; the turns that
    /// push its replies but cannot unpark it yet are progress, not idle rings.
    #[test]
    fn draining_a_backlog_is_not_ringing_for_nothing() {
        let mut r = Rings::default();
        let t = Instant::now();
        for k in 0..100u32 {
            let now = t + Duration::from_micros(u64::from(k) * 50);
            assert!(!r.turn(true, true, false, now), "muted at ring {k}");
        }
    }

    /// A client blocked in a long get rings about every 10 ms as insurance: never muted.
    /// Rings faster than that with nothing to do still are.
    #[test]
    fn insurance_rings_of_a_blocked_client_are_not_idle() {
        let mut r = Rings::default();
        let t = Instant::now();
        for k in 0..100u32 {
            let now = t + Duration::from_millis(u64::from(k) * 10);
            assert!(!r.turn(true, false, true, now), "muted at ring {k}");
        }
        let mut r = Rings::default();
        let muted = (0..MUTE_AFTER + 1).any(|k| {
            r.turn(
                true,
                false,
                true,
                t + Duration::from_micros(u64::from(k) * 10),
            )
        });
        assert!(muted, "a client ringing in a tight loop is muted");
        let mut r = Rings::default();
        let muted = (0..MUTE_AFTER).any(|k| {
            r.turn(
                true,
                false,
                false,
                t + Duration::from_millis(u64::from(k) * 10),
            )
        });
        assert!(muted, "rings with nothing waiting are idle");
    }
}
