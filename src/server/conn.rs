//! One client connection as the event loop sees it: its rings and doorbell, and serving it
//! (taking requests, parking it while its reply ring lacks room, pushing its replies).

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

pub(super) struct Conn {
    pub(super) id: ClientId,
    pub(super) sock: UnixStream,
    pub(super) seg: Segment,
    pub(super) req: Consumer,
    pub(super) rep: Producer,
    pub(super) doorbell: OwnedFd,
    pub(super) wake: bool,
    pub(super) broken: bool,
    /// Its reply ring lacks room for the largest reply: no requests are taken from it, and
    /// its waiting requests neither keep the loop spinning nor stop it sleeping, until the
    /// ring has room again (the client rings the doorbell after reading replies while
    /// `reply_room_wanted` is set). A client that never reads is served no more, and its
    /// hang-up is still seen.
    pub(super) parked: bool,
}

/// Takes up to [`BATCH`] requests from one client. Returns whether any was taken.
pub(super) fn serve(
    conn: &mut Conn,
    core: &mut Core<Arc<SharedMapping>>,
    buf: &mut Vec<u8>,
    w: &mut Writer,
    now: Instant,
    out: &mut Vec<Outgoing>,
) -> bool {
    if conn.broken {
        return false;
    }
    if conn.parked {
        // Reading the consumer's head is cheap; its doorbell is what wakes a sleeping loop.
        if !reply_room(conn) {
            return false;
        }
        conn.parked = false;
        conn.seg.set_reply_room_wanted(false);
    }
    let mut n = 0;
    loop {
        // Replies to this client go into its ring at once, so that the room check sees
        // them; replies to others (completed parked requests) wait in `out`.
        push_own_replies(conn, out, w);
        if n >= BATCH || conn.broken || (conn.req.has_data() && park(conn)) {
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
            Ok((seq, req)) => core.handle(conn.id, seq, req, now, out),
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
                    Some((op, seq)) => out.push(Outgoing {
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
    }
    n > 0
}

/// Whether `conn`, which has a request waiting, must wait because its reply ring lacks room
/// for the largest reply; if so it is parked and told to ring the doorbell once it has read
/// replies.
fn park(conn: &mut Conn) -> bool {
    if reply_room(conn) {
        return false;
    }
    if conn.broken {
        return true;
    }
    conn.seg.set_reply_room_wanted(true);
    // SYNC POINT: pairs with the client's fence between storing its reply ring's head and
    // reading `reply_room_wanted` (Segment::reply_room_wanted): either it sees the flag and
    // rings, or we see the room it made here.
    std::sync::atomic::fence(Ordering::SeqCst);
    if reply_room(conn) {
        conn.seg.set_reply_room_wanted(false);
        return false;
    }
    conn.parked = !conn.broken;
    true
}

/// Whether `conn`'s reply ring has room for the largest reply. A head the client corrupted
/// marks it broken (and reads as no room).
fn reply_room(conn: &mut Conn) -> bool {
    match conn.rep.check_room(REPLY_RESERVE) {
        Ok(room) => room,
        Err(e) => {
            tracing::warn!(client = conn.id, error = %e, "reply ring corrupt; dropping client");
            conn.broken = true;
            false
        }
    }
}

fn push_own_replies(conn: &mut Conn, out: &mut Vec<Outgoing>, w: &mut Writer) {
    let mut i = 0;
    while i < out.len() {
        if out[i].client == conn.id {
            let o = out.remove(i);
            push_reply(conn, &o, w);
        } else {
            i += 1;
        }
    }
}

pub(super) fn push_reply(conn: &mut Conn, o: &Outgoing, w: &mut Writer) {
    w.buf.clear();
    encode_reply(o.op, o.seq, &o.reply, w);
    match conn.rep.try_push(&[&w.buf]) {
        Ok(true) => conn.wake = true,
        Ok(false) => {
            tracing::warn!(
                client = conn.id,
                "reply ring full: client does not read its replies; dropping it"
            );
            conn.broken = true;
        }
        Err(e) => {
            tracing::warn!(client = conn.id, error = %e, "reply ring corrupt; dropping client");
            conn.broken = true;
        }
    }
}
