//! The send path: one send op per socket at a time, frames from a per-connection queue,
//! read data straight from the region (zero-copy for large chunks), and serving peers'
//! read requests inside their grants.

use ferroplasma_transport::frame::{self, Header, Kind, FLAG_CHECKSUM};
use ferroplasma_transport::{GrantId, PeerId};

use crate::conn::{Body, Cause, TxItem};
use crate::uring::{Buf, Completion};
use crate::{Tag, TcpTransport, ZERO_COPY_MIN};

/// Most frames queued on one connection when a peer's read request arrives; more means the
/// peer asks faster than it reads the answers.
const MAX_QUEUED_SERVES: usize = 4096;

/// What `kick` does next.
enum Next {
    Head(Buf),
    Body(Body),
    Idle,
}

impl TcpTransport {
    /// Starts the next send on `peer` if none is in flight.
    pub(crate) fn kick(&mut self, peer: PeerId) {
        let next = match self.next_send(peer) {
            Ok(n) => n,
            Err(what) => {
                self.close(peer, what);
                return;
            }
        };
        let Some(fd) = self.conns.get(&peer).map(|c| c.fd) else {
            return;
        };
        let pushed = match next {
            Next::Idle => return,
            Next::Head(buf) => self.ring.send(
                fd,
                buf,
                Tag::Send {
                    peer,
                    grant: None,
                    zc: false,
                },
            ),
            Next::Body(b) => {
                let (off, len) = (b.off + b.sent, b.len - b.sent);
                let Some(buf) = Buf::region(&self.region, off, len) else {
                    self.close(peer, "chunk outside the region".into());
                    return;
                };
                let zc = self.zero_copy && len >= ZERO_COPY_MIN;
                let tag = Tag::Send {
                    peer,
                    grant: Some(b.grant),
                    zc,
                };
                let r = if zc {
                    self.ring.send_zc(fd, buf, tag)
                } else {
                    self.ring.send(fd, buf, tag)
                };
                if r.is_ok() {
                    if let Some(g) = self.grants.get_mut(&b.grant) {
                        g.refs += 1;
                    }
                    if zc {
                        self.stats.zero_copy_sends += 1;
                    } else {
                        self.stats.copied_sends += 1;
                    }
                }
                r
            }
        };
        match pushed {
            Ok(()) => {
                if let Some(conn) = self.conns.get_mut(&peer) {
                    conn.ops += 1;
                    conn.tx_busy = true;
                }
            }
            Err(e) => self.close(peer, format!("cannot queue a send: {e}")),
        }
    }

    /// The next piece to send on an idle, open connection, cutting chunks from queued
    /// serves as they reach the socket.
    fn next_send(&mut self, peer: PeerId) -> Result<Next, String> {
        let chunk = u64::from(self.cfg.chunk);
        let sums = self.cfg.checksums;
        loop {
            let Some(conn) = self.conns.get_mut(&peer) else {
                return Ok(Next::Idle);
            };
            if !conn.open || conn.tx_busy {
                return Ok(Next::Idle);
            }
            if let Some(h) = conn.tx_head.take() {
                return Ok(Next::Head(h));
            }
            if let Some(b) = conn.tx_body {
                if b.sent < b.len {
                    return Ok(Next::Body(b));
                }
                conn.tx_body = None;
                self.release(b.grant);
                continue;
            }
            // Control frames (messages, read requests, refusals) go before the next data
            // chunk: a long transfer must not hold back heartbeats or other peers' answers
            // for longer than one chunk takes.
            // Frames are numbered and tagged here, in the order they reach the socket.
            if let Some(i) = conn.txq.iter().position(|t| matches!(t, TxItem::Frame(_))) {
                if let Some(TxItem::Frame(mut f)) = conn.txq.remove(i) {
                    conn.sealer.seal(&mut f).map_err(|e| e.to_string())?;
                    conn.tx_head = Some(Buf::Owned { data: f, pos: 0 });
                }
                continue;
            }
            let Some(item) = conn.txq.front_mut() else {
                return Ok(Next::Idle);
            };
            match item {
                TxItem::Frame(_) => {
                    if let Some(TxItem::Frame(mut f)) = conn.txq.pop_front() {
                        conn.sealer.seal(&mut f).map_err(|e| e.to_string())?;
                        conn.tx_head = Some(Buf::Owned { data: f, pos: 0 });
                    }
                }
                TxItem::Serve {
                    token,
                    off,
                    len,
                    done,
                    grant,
                    keyed,
                } => {
                    let n = chunk.min(*len - *done);
                    let n32 = u32::try_from(n).map_err(|_| "chunk too large".to_string())?;
                    let start = *off + *done;
                    let outside = || "granted range outside the region".to_string();
                    let hdr = if *keyed {
                        let mut mac = conn.sealer.chunk_mac(*token, *done, n32);
                        if !self.region.read_through(start, n, |b| mac.update(b)) {
                            return Err(outside());
                        }
                        Header::read_data_keyed(*token, *done, n32, mac.finish())
                    } else {
                        let sum = if sums {
                            self.region.checksum(start, n).ok_or_else(outside)?
                        } else {
                            0
                        };
                        Header {
                            kind: Kind::ReadData,
                            flags: if sums { FLAG_CHECKSUM } else { 0 },
                            len: n32,
                            token: *token,
                            a: *done,
                            b: 0,
                            sum,
                        }
                    };
                    let mut raw = hdr.encode();
                    conn.sealer.seal(&mut raw).map_err(|e| e.to_string())?;
                    *done += n;
                    let (g, finished) = (*grant, *done == *len);
                    conn.tx_head = Some(Buf::Owned {
                        data: raw.to_vec(),
                        pos: 0,
                    });
                    if n > 0 {
                        conn.tx_body = Some(Body {
                            grant: g,
                            off: start,
                            len: n,
                            sent: 0,
                        });
                        if let Some(gr) = self.grants.get_mut(&g) {
                            gr.refs += 1;
                        }
                    }
                    if finished {
                        if let Some(conn) = self.conns.get_mut(&peer) {
                            conn.txq.pop_front();
                        }
                        self.release(g);
                    }
                }
            }
        }
    }

    pub(crate) fn on_send(
        &mut self,
        peer: PeerId,
        grant: Option<GrantId>,
        zc: bool,
        c: Completion<Tag>,
    ) {
        let Some(conn) = self.conns.get_mut(&peer) else {
            return;
        };
        if c.notif {
            // The kernel no longer references the range.
            conn.ops = conn.ops.saturating_sub(1);
            if let Some(g) = grant {
                self.release(g);
            }
            self.finish_close(peer);
            return;
        }
        if !c.more {
            conn.ops = conn.ops.saturating_sub(1);
        }
        conn.tx_busy = false;
        if !c.more {
            if let Some(g) = grant {
                self.release(g);
            }
        }
        let Some(conn) = self.conns.get_mut(&peer) else {
            return;
        };
        if !conn.open {
            conn.tx_head = None;
            if let Some(b) = conn.tx_body.take() {
                self.release(b.grant);
            }
            self.finish_close(peer);
            return;
        }
        if c.res < 0 {
            if zc && matches!(-c.res, libc::EINVAL | libc::EOPNOTSUPP) {
                tracing::warn!(
                    error = %std::io::Error::from_raw_os_error(-c.res),
                    "the kernel refuses zero-copy sends; falling back to copying"
                );
                self.zero_copy = false;
                self.kick(peer);
            } else if matches!(-c.res, libc::EINTR | libc::EAGAIN | libc::ENOBUFS) {
                if let Some(h) = c.buf.filter(|_| grant.is_none()) {
                    conn.tx_head = Some(h);
                }
                self.kick(peer);
            } else {
                let e = std::io::Error::from_raw_os_error(-c.res);
                self.close(peer, format!("send failed: {e}"));
            }
            return;
        }
        let n = usize::try_from(c.res).unwrap_or(0);
        let progressed = if grant.is_some() {
            match conn.tx_body.as_mut() {
                Some(b) => {
                    let n = u64::try_from(n).unwrap_or(0).min(b.len - b.sent);
                    b.sent += n;
                    self.stats.data_sent += n;
                    n > 0 || b.sent == b.len
                }
                None => true,
            }
        } else {
            match c.buf {
                Some(mut h) => {
                    h.advance(n);
                    let p = n > 0 || h.remaining() == 0;
                    if h.remaining() > 0 {
                        conn.tx_head = Some(h);
                    }
                    p
                }
                None => true,
            }
        };
        if !progressed {
            self.close(peer, "send made no progress".into());
            return;
        }
        self.kick(peer);
    }

    /// Answers a peer's read request: chunks from the region if `grant` is a live grant to
    /// that peer and covers the range, else a refusal (a forged, stale or another
    /// connection's grant number, or a range beyond the grant).
    /// Chunks carry a keyed MAC when the reader asked (`keyed`) or this node is set so.
    pub(crate) fn serve(
        &mut self,
        peer: PeerId,
        token: u64,
        grant: GrantId,
        off: u64,
        len: u64,
        keyed: bool,
    ) {
        let keyed = keyed || self.cfg.keyed_checksums;
        let Some(conn) = self.conns.get(&peer).filter(|c| c.open) else {
            return;
        };
        let end = off.checked_add(len);
        let live = conn.grants.contains(&grant)
            && self.grants.get(&grant).is_some_and(|gr| {
                !gr.revoked
                    && gr.peer == peer
                    && off >= gr.off
                    && end.is_some_and(|e| e <= gr.off + gr.len)
            });
        let grant = live.then_some(grant);
        if conn.txq.len() >= MAX_QUEUED_SERVES {
            // A peer that asks faster than it reads the answers.
            self.stats.protocol_errors += 1;
            self.close_as(
                peer,
                Cause::Violation,
                "protocol error: too many read requests queued".into(),
            );
            return;
        }
        let item = match grant {
            Some(grant) => {
                if let Some(g) = self.grants.get_mut(&grant) {
                    g.refs += 1;
                }
                TxItem::Serve {
                    token,
                    off,
                    len,
                    done: 0,
                    grant,
                    keyed,
                }
            }
            None => {
                tracing::debug!(peer = %peer, token, off, len, "refusing an ungranted read");
                let mut reason =
                    format!("range {off}+{len} is not inside a live grant to this connection")
                        .into_bytes();
                reason.truncate(usize::try_from(frame::MAX_REASON).unwrap_or(0));
                let n = u32::try_from(reason.len()).unwrap_or(0);
                TxItem::Frame(frame::unsealed(&Header::read_fail(token, n), &reason))
            }
        };
        if let Err(e) = self.enqueue(peer, item) {
            tracing::debug!(peer = %peer, error = %e, "serving a read on a closed connection");
        }
    }
}
