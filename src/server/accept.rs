//! Accepting local clients: the listener (watched by the event loop, paused at the limits)
//! and the short-lived hand-shake threads that build each client's segment and doorbell.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_queue::SegQueue;
use rustix::event::epoll::{self, EventData, EventFlags};
use rustix::event::{eventfd, EventfdFlags};
use rustix::fs::{MemfdFlags, SealFlags};

use super::conn::Conn;
use super::event_loop::{EventLoop, KEY_LISTENER};
use super::NodeConfig;
use crate::id::NodeId;
use crate::protocol::handshake::{self, Welcome, HELLO_LEN, PROTOCOL_VERSION};
use crate::ring::Segment;
use crate::shm::SharedMapping;

/// Hand-shakes in progress at once; more connections wait in the listen backlog.
const MAX_HANDSHAKES: usize = 32;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the event loop shares with the hand-shake threads.
pub(super) struct Shared {
    pub(super) cfg: NodeConfig,
    pub(super) node_id: NodeId,
    pub(super) arena: Arc<SharedMapping>,
    pub(super) hugepages: bool,
    pub(super) next_client: AtomicU64,
    pub(super) handshakes: AtomicUsize,
    pub(super) ready: SegQueue<Conn>,
    pub(super) wake: Arc<OwnedFd>,
}

impl EventLoop {
    /// Hand-shakes in progress, and whether every hand-shake or client slot is taken.
    fn at_client_limit(&self) -> (usize, bool) {
        let busy = self.shared.handshakes.load(Ordering::Acquire);
        let clients = self.conns.len() + self.shared.ready.len();
        let full = busy >= MAX_HANDSHAKES || clients + busy >= self.shared.cfg.max_clients;
        (busy, full)
    }

    pub(super) fn accept_all(&mut self) {
        loop {
            let (busy, full) = self.at_client_limit();
            if full {
                // Leave further connections in the listen backlog until a slot frees up
                // (every finished hand-shake kicks the wake eventfd).
                if !self.listener_paused {
                    tracing::warn!(
                        clients = self.conns.len(),
                        handshakes = busy,
                        "client limit reached; new connections wait"
                    );
                    let _ = epoll::delete(&self.epoll, &self.listener);
                    self.listener_paused = true;
                }
                return;
            }
            match self.listener.accept() {
                Ok((stream, _)) => {
                    self.shared.handshakes.fetch_add(1, Ordering::AcqRel);
                    let shared = self.shared.clone();
                    let spawned = std::thread::Builder::new()
                        .name("fp-handshake".into())
                        .spawn(move || {
                            match handshake_client(&shared, stream) {
                                Ok(conn) => shared.ready.push(conn),
                                Err(e) => tracing::info!(error = %e, "hand-shake failed"),
                            }
                            shared.handshakes.fetch_sub(1, Ordering::AcqRel);
                            let _ = rustix::io::write(shared.wake.as_fd(), &1u64.to_ne_bytes());
                        });
                    if spawned.is_err() {
                        self.shared.handshakes.fetch_sub(1, Ordering::AcqRel);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    return;
                }
            }
        }
    }

    /// Watches the listener again once hand-shake slots and client slots are free.
    pub(super) fn resume_listener(&mut self) {
        if !self.listener_paused {
            return;
        }
        if !self.at_client_limit().1 {
            let added = epoll::add(
                &self.epoll,
                &self.listener,
                EventData::new_u64(KEY_LISTENER),
                EventFlags::IN,
            );
            if added.is_ok() {
                self.listener_paused = false;
                self.accept_all();
            }
        }
    }
}

fn handshake_client(shared: &Shared, mut stream: UnixStream) -> io::Result<Conn> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    // One deadline for the whole hello, not per read: a client trickling bytes cannot hold a
    // hand-shake slot for longer than HANDSHAKE_TIMEOUT.
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut hello = [0u8; HELLO_LEN];
    let mut got = 0;
    while got < HELLO_LEN {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "hello not received in time",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut hello[got..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let version = handshake::decode_hello(&hello)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let layout = shared.cfg.segment;
    let mut welcome = Welcome {
        version: PROTOCOL_VERSION,
        status: 0,
        node_id: shared.node_id,
        client_id: 0,
        arena_len: shared.arena.len() as u64,
        segment_len: layout.total_len(),
        inline_threshold: shared.cfg.inline_threshold,
        hugepages: shared.hugepages,
        spin_us: u32::try_from(shared.cfg.spin.as_micros()).unwrap_or(u32::MAX),
    };
    if version != PROTOCOL_VERSION {
        welcome.status = 1;
        let _ = stream.write_all(&welcome.encode());
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("client speaks protocol {version}, node speaks {PROTOCOL_VERSION}"),
        ));
    }
    let id = shared.next_client.fetch_add(1, Ordering::Relaxed);
    welcome.client_id = id;
    let segfd = rustix::fs::memfd_create(
        "ferroplasma-client",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    rustix::fs::ftruncate(&segfd, layout.total_len())?;
    rustix::fs::fcntl_add_seals(
        &segfd,
        SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
    )?;
    let len =
        usize::try_from(layout.total_len()).map_err(|_| io::Error::other("segment too large"))?;
    let map = Arc::new(SharedMapping::new(File::from(segfd), len, true)?);
    let seg = Segment::init(map.clone(), layout).ok_or_else(|| io::Error::other("segment init"))?;
    let req = seg
        .request_consumer()
        .ok_or_else(|| io::Error::other("request ring"))?;
    let rep = seg
        .reply_producer()
        .ok_or_else(|| io::Error::other("reply ring"))?;
    let doorbell = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
    crate::shm::fdpass::send_with_fds(
        &stream,
        &welcome.encode(),
        &[shared.arena.fd(), map.fd(), doorbell.as_fd()],
    )?;
    stream.set_nonblocking(true)?;
    Ok(Conn::new(
        id,
        stream,
        seg,
        (req, rep),
        doorbell,
        shared.cfg.max_pending_per_client,
    ))
}
