//! The receive path: headers into a small buffer, messages into a `Vec`, read data straight
//! into the region at the read's destination. A header's tag is checked before it is decoded
//! (so nothing is allocated or looked up for an injected header), a Msg or ReadFail body's
//! tag before the body is used. Anything a peer could lie about is checked before the bytes
//! land; a lie drops the connection.

use ferroplasma_transport::frame::{
    Header, Kind, BODY_TAG_LEN, FLAG_CHECKSUM, FLAG_KEYED, HEADER_LEN,
};
use ferroplasma_transport::session::BadTag;
use ferroplasma_transport::{Event, GrantId, PeerId, ReadError};

use crate::conn::{Cause, Rx};
use crate::uring::{Buf, Completion};
use crate::{Tag, TcpTransport};

impl TcpTransport {
    /// Submits a receive for the next part of the current frame.
    fn submit_recv(&mut self, peer: PeerId, buf: Buf) {
        let Some(conn) = self.conns.get_mut(&peer) else {
            return;
        };
        match self.ring.recv(conn.fd, buf, true, Tag::Recv(peer)) {
            Ok(()) => {
                conn.ops += 1;
                conn.rx_busy = true;
            }
            Err(e) => self.close(peer, format!("cannot queue a receive: {e}")),
        }
    }

    /// Starts receiving the next frame header (reusing `buf` if it is a header buffer).
    pub(crate) fn recv_header(&mut self, peer: PeerId, buf: Option<Buf>) {
        let data = match buf {
            Some(Buf::Owned { mut data, .. }) if data.capacity() >= HEADER_LEN => {
                data.clear();
                data.resize(HEADER_LEN, 0);
                data
            }
            _ => vec![0; HEADER_LEN],
        };
        if let Some(c) = self.conns.get_mut(&peer) {
            c.rx = Rx::Header;
        }
        self.submit_recv(peer, Buf::Owned { data, pos: 0 });
    }

    fn protocol_error(&mut self, peer: PeerId, what: &str) {
        tracing::warn!(peer = %peer, what, "protocol error; dropping the connection");
        self.stats.protocol_errors += 1;
        self.close_as(peer, Cause::Violation, format!("protocol error: {what}"));
    }

    pub(crate) fn on_recv(&mut self, peer: PeerId, c: Completion<Tag>) {
        let Some(conn) = self.conns.get_mut(&peer) else {
            return;
        };
        conn.ops = conn.ops.saturating_sub(1);
        conn.rx_busy = false;
        if !conn.open {
            self.finish_close(peer);
            return;
        }
        let Some(mut buf) = c.buf else {
            self.close(peer, "receive lost its buffer".into());
            return;
        };
        if c.res < 0 {
            if matches!(-c.res, libc::EINTR | libc::EAGAIN | libc::ENOBUFS) {
                self.submit_recv(peer, buf);
            } else {
                let e = std::io::Error::from_raw_os_error(-c.res);
                self.close(peer, format!("receive failed: {e}"));
            }
            return;
        }
        let n = usize::try_from(c.res).unwrap_or(0);
        if n == 0 {
            self.close(peer, "the peer closed the connection".into());
            return;
        }
        buf.advance(n);
        if buf.remaining() > 0 {
            self.submit_recv(peer, buf);
            return;
        }
        match conn.rx {
            Rx::Header => self.on_header(peer, buf),
            Rx::Msg { n } => {
                let Buf::Owned { data, .. } = buf else {
                    self.close(peer, "message buffer lost".into());
                    return;
                };
                if let Some(body) = self.open_body(peer, n, data) {
                    self.events.push(Event::Message { peer, body });
                    self.recv_header(peer, None);
                }
            }
            Rx::Fail { token, n } => {
                let Buf::Owned { data, .. } = buf else {
                    self.close(peer, "refusal buffer lost".into());
                    return;
                };
                if let Some(body) = self.open_body(peer, n, data) {
                    let reason = String::from_utf8_lossy(&body).into_owned();
                    self.refused(token, peer, reason);
                    self.recv_header(peer, None);
                }
            }
            Rx::Data { hdr, dst, n } => self.on_chunk(peer, hdr, dst, n),
        }
    }

    /// Checks the header tag of the peer's next frame, before anything of the header is
    /// decoded; on failure drops the connection (and only it) and returns `None`.
    fn open_header(&mut self, peer: PeerId, raw: &[u8; HEADER_LEN]) -> Option<u64> {
        let r = self.conns.get_mut(&peer)?.opener.open_header(raw);
        r.map_err(|e| self.bad_tag(peer, e)).ok()
    }

    /// Checks the body tag (the last `BODY_TAG_LEN` bytes of `data`) of frame `n`; returns
    /// the body without it, or drops the connection and returns `None`.
    fn open_body(&mut self, peer: PeerId, n: u64, mut data: Vec<u8>) -> Option<Vec<u8>> {
        let at = data.len().checked_sub(BODY_TAG_LEN)?;
        let mut tag = [0u8; BODY_TAG_LEN];
        tag.copy_from_slice(&data[at..]);
        let r = self
            .conns
            .get(&peer)?
            .opener
            .open_body(n, &data[..at], &tag);
        match r {
            Ok(()) => {
                data.truncate(at);
                Some(data)
            }
            Err(e) => {
                self.bad_tag(peer, e);
                None
            }
        }
    }

    fn bad_tag(&mut self, peer: PeerId, e: BadTag) {
        if let Some(conn) = self.conns.get(&peer) {
            tracing::warn!(
                peer = %peer,
                node = conn.identity.node_id,
                addr = %conn.identity.addr,
                frame = e.n,
                "frame failed its authentication tag; dropping the connection"
            );
        }
        self.stats.bad_tags += 1;
        self.close_as(peer, Cause::Violation, e.to_string());
    }

    /// Receives a body and its tag (`len + BODY_TAG_LEN` bytes, allocated only now that the
    /// header is authenticated).
    fn recv_tagged_body(&mut self, peer: PeerId, rx: Rx, len: usize) {
        self.set_rx(peer, rx);
        self.submit_recv(
            peer,
            Buf::Owned {
                data: vec![0; len.saturating_add(BODY_TAG_LEN)],
                pos: 0,
            },
        );
    }

    fn refused(&mut self, token: u64, peer: PeerId, reason: String) {
        if self.reads.remove(&token).is_some() {
            self.events.push(Event::ReadDone {
                token,
                result: Err(ReadError::Refused { peer, reason }),
            });
        }
    }

    fn on_header(&mut self, peer: PeerId, buf: Buf) {
        let raw: Option<[u8; HEADER_LEN]> = match &buf {
            Buf::Owned { data, .. } => data.get(..HEADER_LEN).and_then(|s| s.try_into().ok()),
            _ => None,
        };
        let Some(raw) = raw else {
            self.close(peer, "header buffer lost".into());
            return;
        };
        let Some(n) = self.open_header(peer, &raw) else {
            return;
        };
        let hdr = match Header::decode(&raw) {
            Ok(h) => h,
            Err(e) => {
                self.protocol_error(peer, &e.to_string());
                return;
            }
        };
        let len = usize::try_from(hdr.len).unwrap_or(usize::MAX);
        match hdr.kind {
            Kind::Msg => {
                if len == 0 {
                    self.events.push(Event::Message {
                        peer,
                        body: Vec::new(),
                    });
                    self.recv_header(peer, Some(buf));
                } else {
                    self.recv_tagged_body(peer, Rx::Msg { n }, len);
                }
            }
            Kind::ReadReq => {
                let keyed = hdr.flags & FLAG_KEYED != 0;
                self.serve(peer, hdr.token, GrantId(hdr.sum), hdr.a, hdr.b, keyed);
                self.recv_header(peer, Some(buf));
            }
            Kind::ReadFail => {
                if self.reads.get(&hdr.token).is_none_or(|r| r.peer != peer) {
                    self.protocol_error(peer, "refusal for a read not asked of this peer");
                } else if len == 0 {
                    self.refused(hdr.token, peer, String::new());
                    self.recv_header(peer, Some(buf));
                } else {
                    let token = hdr.token;
                    self.recv_tagged_body(peer, Rx::Fail { token, n }, len);
                }
            }
            Kind::ReadData => {
                let Some(read) = self.reads.get(&hdr.token).filter(|r| r.peer == peer) else {
                    self.protocol_error(peer, "data for a read not asked of this peer");
                    return;
                };
                if let Err(e) = read.progress.accept(&hdr) {
                    self.protocol_error(peer, e);
                    return;
                }
                if self.cfg.keyed_checksums && hdr.flags & FLAG_KEYED == 0 {
                    self.protocol_error(peer, "a chunk without a keyed MAC for a keyed read");
                    return;
                }
                let dst = read.local_offset.checked_add(hdr.a);
                let body = dst.and_then(|d| Buf::region(&self.region, d, u64::from(hdr.len)));
                match (dst, body) {
                    (Some(_), _) if hdr.len == 0 => {
                        // Only a zero-length read has an empty chunk.
                        self.chunk_done(peer, hdr);
                        self.recv_header(peer, Some(buf));
                    }
                    (Some(dst), Some(body)) => {
                        self.set_rx(peer, Rx::Data { hdr, dst, n });
                        self.submit_recv(peer, body);
                    }
                    _ => self.protocol_error(peer, "chunk outside the region"),
                }
            }
        }
    }

    fn set_rx(&mut self, peer: PeerId, rx: Rx) {
        if let Some(c) = self.conns.get_mut(&peer) {
            c.rx = rx;
        }
    }

    /// A whole chunk is in the region: check it, count it.
    fn on_chunk(&mut self, peer: PeerId, hdr: Header, dst: u64, n: u64) {
        let len = u64::from(hdr.len);
        let intact = if hdr.flags & FLAG_KEYED != 0 {
            self.conns.get(&peer).is_some_and(|c| {
                let mut mac = c.opener.chunk_mac(n, hdr.token, hdr.a, hdr.len);
                self.region.read_through(dst, len, |b| mac.update(b))
                    && mac.matches(&hdr.keyed_mac())
            })
        } else {
            hdr.flags & FLAG_CHECKSUM == 0 || self.region.checksum(dst, len) == Some(hdr.sum)
        };
        if !intact {
            tracing::warn!(
                peer = %peer,
                token = hdr.token,
                offset = hdr.a,
                "chunk failed its checksum"
            );
            self.stats.protocol_errors += 1;
            if self.reads.remove(&hdr.token).is_some() {
                self.events.push(Event::ReadDone {
                    token: hdr.token,
                    result: Err(ReadError::Corrupt {
                        peer,
                        offset: hdr.a,
                    }),
                });
            }
            self.close_as(
                peer,
                Cause::Violation,
                format!(
                    "chunk at {} of read {} failed its checksum",
                    hdr.a, hdr.token
                ),
            );
            return;
        }
        self.stats.data_received += u64::from(hdr.len);
        self.chunk_done(peer, hdr);
        self.recv_header(peer, None);
    }

    fn chunk_done(&mut self, _peer: PeerId, hdr: Header) {
        let complete = self
            .reads
            .get_mut(&hdr.token)
            .is_some_and(|r| r.progress.advance(hdr.len));
        if complete {
            self.reads.remove(&hdr.token);
            self.events.push(Event::ReadDone {
                token: hdr.token,
                result: Ok(()),
            });
        }
    }
}
