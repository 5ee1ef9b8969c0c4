//! Hand-shakes over blocking sockets, one short-lived thread per connection, and the queue
//! that hands authenticated connections to the io_uring loop.
//!
//! The byte sequence is `ferroplasma_transport::hello`'s; this module only moves it. Each
//! hand-shake has one deadline (`handshake_timeout`), applied as the socket timeouts of every
//! step. Inbound hand-shakes are capped ([`MAX_INBOUND`]) so a flood of connections cannot
//! exhaust threads.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferroplasma_transport::hello::{self, Handshake, HelloError, Role};
use ferroplasma_transport::session::Session;
use ferroplasma_transport::{ConnectError, Identity, PeerId};

/// Most inbound hand-shakes in progress at once; more connections are closed at once.
pub const MAX_INBOUND: usize = 32;

/// What a hand-shake thread reports.
#[derive(Debug)]
pub(crate) enum Handoff {
    /// Authenticated.
    Ready {
        /// The connection number (outbound); `None` for inbound (numbered on arrival).
        peer: Option<PeerId>,
        stream: TcpStream,
        identity: Identity,
        /// The connection's keys, confirmed by both Finished messages.
        session: Box<Session>,
    },
    /// An outbound connection failed.
    Failed { peer: PeerId, error: ConnectError },
}

/// The queue from hand-shake threads to the poller, with the eventfd that wakes it.
#[derive(Debug)]
pub(crate) struct Inbox {
    queue: Mutex<VecDeque<Handoff>>,
    efd: OwnedFd,
    inbound: AtomicUsize,
}

impl Inbox {
    pub(crate) fn new(efd: OwnedFd) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            efd,
            inbound: AtomicUsize::new(0),
        }
    }

    /// The eventfd the ring watches.
    pub(crate) fn efd(&self) -> &OwnedFd {
        &self.efd
    }

    /// Interrupts the poller.
    pub(crate) fn wake(&self) {
        // A blocking eventfd only blocks when the counter would overflow, which 1s cannot.
        if let Err(e) = rustix::io::write(&self.efd, &1u64.to_ne_bytes()) {
            tracing::warn!(error = %e, "waking the tcp transport failed");
        }
    }

    fn push(&self, h: Handoff) {
        if let Ok(mut q) = self.queue.lock() {
            q.push_back(h);
        }
        self.wake();
    }

    /// Everything queued so far.
    pub(crate) fn take(&self) -> VecDeque<Handoff> {
        self.queue
            .lock()
            .map(|mut q| std::mem::take(&mut *q))
            .unwrap_or_default()
    }
}

/// What a hand-shake needs to know about this node.
#[derive(Clone, Debug)]
pub(crate) struct Params {
    pub token: Vec<u8>,
    pub node_id: u64,
    pub features: u32,
    pub addr: String,
    pub timeout: Duration,
}

/// Starts connecting to `addr` on a thread; the outcome arrives in `inbox`.
pub(crate) fn spawn_connect(inbox: &Arc<Inbox>, params: &Arc<Params>, peer: PeerId, addr: &str) {
    let (inbox2, params, addr2) = (Arc::clone(inbox), Arc::clone(params), addr.to_string());
    let spawned = std::thread::Builder::new()
        .name("fp-tcp-connect".into())
        .spawn(move || {
            let h = match connect(&params, &addr2) {
                Ok((stream, identity, session)) => Handoff::Ready {
                    peer: Some(peer),
                    stream,
                    identity,
                    session,
                },
                Err(fail) => {
                    let error = fail.into_error(&addr2);
                    tracing::info!(peer = %peer, %error, "outbound connection failed");
                    Handoff::Failed { peer, error }
                }
            };
            inbox2.push(h);
        });
    if let Err(e) = spawned {
        inbox.push(Handoff::Failed {
            peer,
            error: ConnectError::Unreachable {
                addr: addr.to_string(),
                reason: format!("cannot start a hand-shake thread: {e}"),
            },
        });
    }
}

/// Runs an inbound hand-shake on a thread; nothing is reported if it fails.
pub(crate) fn spawn_accept(inbox: &Arc<Inbox>, params: &Arc<Params>, stream: TcpStream) {
    // SYNC POINT: the counter only caps thread numbers; Relaxed is enough.
    if inbox.inbound.fetch_add(1, Ordering::Relaxed) >= MAX_INBOUND {
        inbox.inbound.fetch_sub(1, Ordering::Relaxed);
        tracing::warn!(
            peer = ?stream.peer_addr().ok(),
            "too many inbound hand-shakes in progress; closing a new connection"
        );
        return;
    }
    let (inbox2, params) = (Arc::clone(inbox), Arc::clone(params));
    let spawned = std::thread::Builder::new()
        .name("fp-tcp-accept".into())
        .spawn(move || {
            let from = stream.peer_addr().ok();
            match accept(&params, stream) {
                Ok((stream, identity, session)) => inbox2.push(Handoff::Ready {
                    peer: None,
                    stream,
                    identity,
                    session,
                }),
                Err(reason) => {
                    tracing::info!(peer = ?from, %reason, "inbound hand-shake failed");
                }
            }
            inbox2.inbound.fetch_sub(1, Ordering::Relaxed);
        });
    if let Err(e) = spawned {
        inbox.inbound.fetch_sub(1, Ordering::Relaxed);
        tracing::warn!(error = %e, "cannot start a hand-shake thread; closing a new connection");
    }
}

/// Socket options of every connection. Buffer sizes are left to the kernel's autotuning:
/// fixed 4 MiB buffers measured no faster on loopback and would cap the window on links
/// with a larger bandwidth-delay product.
pub(crate) fn configure(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)
}

/// Why a hand-shake step failed, before the address is attached ([`Fail::into_error`]).
#[derive(Debug)]
enum Fail {
    /// Network or local failure before the peer had its say.
    Unreachable(String),
    /// The peer hung up.
    Closed,
    /// The deadline passed.
    TimedOut,
    /// A hand-shake message failed its check.
    Hello(HelloError),
}

impl From<HelloError> for Fail {
    fn from(e: HelloError) -> Self {
        Self::Hello(e)
    }
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreachable(r) => f.write_str(r),
            Self::Closed => f.write_str("the peer closed the connection during the hand-shake"),
            Self::TimedOut => f.write_str("hand-shake timed out"),
            Self::Hello(e) => write!(f, "{e}"),
        }
    }
}

impl Fail {
    fn into_error(self, addr: &str) -> ConnectError {
        let addr = addr.to_string();
        match self {
            Self::Unreachable(reason) => ConnectError::Unreachable { addr, reason },
            Self::Closed => ConnectError::Refused {
                addr,
                reason: Self::Closed.to_string(),
            },
            Self::TimedOut => ConnectError::TimedOut { addr },
            Self::Hello(e) => ConnectError::from_hello(&addr, &e),
        }
    }
}

fn nonce() -> Result<[u8; 32], Fail> {
    let mut n = [0u8; 32];
    let mut filled = 0;
    while filled < n.len() {
        let got = rustix::rand::getrandom(&mut n[filled..], rustix::rand::GetRandomFlags::empty())
            .map_err(|e| Fail::Unreachable(format!("getrandom: {e}")))?;
        filled += got;
    }
    Ok(n)
}

/// A blocking stream with one deadline for the whole hand-shake.
struct Timed<'a> {
    s: &'a mut TcpStream,
    deadline: Instant,
}

impl Timed<'_> {
    fn left(&self) -> Result<Duration, Fail> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Fail::TimedOut);
        }
        Ok(left)
    }

    fn send(&mut self, b: &[u8]) -> Result<(), Fail> {
        let left = self.left()?;
        self.s
            .set_write_timeout(Some(left))
            .map_err(|e| Fail::Unreachable(e.to_string()))?;
        self.s.write_all(b).map_err(|e| io_reason(&e))
    }

    fn recv(&mut self, b: &mut [u8]) -> Result<(), Fail> {
        let left = self.left()?;
        self.s
            .set_read_timeout(Some(left))
            .map_err(|e| Fail::Unreachable(e.to_string()))?;
        self.s.read_exact(b).map_err(|e| io_reason(&e))
    }

    /// Receives the peer's Ident; returns it decoded and its raw bytes (for the keys).
    fn ident(&mut self) -> Result<(Identity, Vec<u8>), Fail> {
        let mut fixed = [0u8; hello::IDENT_FIXED];
        self.recv(&mut fixed)?;
        let (node_id, n) = hello::decode_ident_fixed(&fixed)?;
        let features = hello::ident_features(&fixed);
        let mut addr = vec![0u8; n];
        self.recv(&mut addr)?;
        let raw = [fixed.as_slice(), &addr].concat();
        let addr = hello::decode_ident_addr(&addr)?;
        Ok((
            Identity {
                node_id,
                addr,
                features,
            },
            raw,
        ))
    }

    /// Sends our Ident, takes theirs, derives the session and exchanges Finished messages.
    fn finish(&mut self, hs: &Handshake) -> Result<(Identity, Box<Session>), Fail> {
        self.send(&hs.ident())?;
        let (identity, raw) = self.ident()?;
        let mut session = Box::new(hs.session(&raw)?);
        self.send(&session.sealer.finished())?;
        let mut theirs = [0u8; hello::FINISHED_LEN];
        self.recv(&mut theirs)?;
        session
            .opener
            .finished(&theirs)
            .map_err(|_| HelloError::BadFinished)?;
        Ok((identity, session))
    }

    fn done(self) -> Result<(), Fail> {
        let f = |e: std::io::Error| Fail::Unreachable(e.to_string());
        self.s.set_read_timeout(None).map_err(f)?;
        self.s.set_write_timeout(None).map_err(f)
    }
}

fn io_reason(e: &std::io::Error) -> Fail {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => Fail::Closed,
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Fail::TimedOut,
        _ => Fail::Unreachable(format!("hand-shake i/o: {e}")),
    }
}

type Established = (TcpStream, Identity, Box<Session>);

fn connect(p: &Params, addr: &str) -> Result<Established, Fail> {
    let deadline = Instant::now() + p.timeout;
    let targets: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| Fail::Unreachable(format!("bad address {addr}: {e}")))?
        .collect();
    let mut last = format!("{addr} resolves to no address");
    let mut stream = None;
    for t in targets {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match TcpStream::connect_timeout(&t, left) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = format!("connect to {t}: {e}"),
        }
    }
    let mut stream = stream.ok_or(Fail::Unreachable(last))?;
    configure(&stream).map_err(|e| Fail::Unreachable(format!("socket options: {e}")))?;
    let mut hs = Handshake::new(Role::Initiator, &p.token, nonce()?, p.node_id, &p.addr)
        .with_features(p.features);
    let mut t = Timed {
        s: &mut stream,
        deadline,
    };
    t.send(&hs.hello())?;
    let mut theirs = [0u8; hello::HELLO_LEN];
    t.recv(&mut theirs)?;
    hs.their_hello(&theirs).map_err(Fail::Hello)?;
    t.send(&hs.proof())?;
    let mut proof = [0u8; hello::PROOF_LEN];
    t.recv(&mut proof)?;
    hs.their_proof(&proof).map_err(Fail::Hello)?;
    let (identity, session) = t.finish(&hs)?;
    t.done()?;
    Ok((stream, identity, session))
}

fn accept(p: &Params, mut stream: TcpStream) -> Result<Established, Fail> {
    let deadline = Instant::now() + p.timeout;
    configure(&stream).map_err(|e| Fail::Unreachable(format!("socket options: {e}")))?;
    let mut hs = Handshake::new(Role::Acceptor, &p.token, nonce()?, p.node_id, &p.addr)
        .with_features(p.features);
    let mut t = Timed {
        s: &mut stream,
        deadline,
    };
    let mut theirs = [0u8; hello::HELLO_LEN];
    t.recv(&mut theirs)?;
    match hs.their_hello(&theirs) {
        Ok(()) => t.send(&hs.hello())?,
        // Not a ferroplasma node: say nothing.
        Err(e @ HelloError::Magic) => return Err(e.into()),
        // Another version or token setting: our hello tells the peer so, then we close.
        Err(e) => {
            let _ = t.send(&hs.hello());
            return Err(e.into());
        }
    }
    let mut proof = [0u8; hello::PROOF_LEN];
    t.recv(&mut proof)?;
    hs.their_proof(&proof).map_err(Fail::Hello)?;
    t.send(&hs.proof())?;
    let (identity, session) = t.finish(&hs)?;
    t.done()?;
    Ok((stream, identity, session))
}
