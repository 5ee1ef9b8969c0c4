//! ferroplasma's RDMA transport: one-sided RDMA READs between registered arenas over RC
//! queue pairs, with libibverbs loaded at run time (no build-time dependency on rdma-core),
//! and the TCP transport underneath for bootstrap, control messages, liveness and fall-back.
//!
//! - [`RdmaTransport`] wraps a [`TcpTransport`]. Every connection starts as TCP with the
//!   authenticated hand-shake; when both Idents carry [`FEATURE_RDMA`], the two transports
//!   exchange queue pair numbers, GIDs, MTUs and region tables over that authenticated
//!   connection ([`proto`]) and connect RC queue pairs before the cluster hears of the peer.
//!   Reads from such a peer are RDMA READs straight into the local arena; anything that stops
//!   RDMA (a declined offer, a failed queue pair transition, a bad completion, a lost port)
//!   leaves the peer on TCP, said in the log and in [`Transport::peer_path`].
//! - [`build`] is what a node calls: `auto` gives an `RdmaTransport` when a device is usable
//!   and a plain `TcpTransport` otherwise; `rdma` fails without a device.
//!
//! Design, grant enforcement and how to run on real NICs: docs/rdma.md.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferroplasma_region::Region;
use ferroplasma_transport::hello::FEATURE_RDMA;
use ferroplasma_transport::msg::is_transport_private;
use ferroplasma_transport::{
    ConnectError, DataSettings, Event, GrantDescriptor, GrantId, Identity, PeerId, PeerPath,
    ReadError, ReadOp, RegionHandle, Transport, TransportConfig, TransportError, Waker,
};
use ferroplasma_transport_tcp::TcpTransport;
use rustix::event::epoll;

pub mod device;
pub mod endpoint;
mod events;
pub mod grants;
pub mod proto;
#[allow(unsafe_code)]
mod sys;
#[allow(unsafe_code)]
pub mod verbs;

pub use device::{DeviceChoice, DeviceError};

use device::Device;
use endpoint::Endpoint;
use grants::{Check, ReaderGrants};
use proto::{Body, Decline, GrantNotice, GrantRef, Ready};

/// Between two rdma transports, a control message of the cluster that starts with the
/// transport-private byte travels behind these two bytes (a private message never has a 0
/// after that byte: its length is at least 1). Cluster envelopes never start with it; this
/// keeps arbitrary message bytes intact all the same.
const ESCAPE: [u8; 2] = [ferroplasma_transport::msg::TRANSPORT_PREFIX, 0];

/// Which transport a node uses between nodes (`--transport`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// RDMA to each peer where both ends can, TCP otherwise.
    #[default]
    Auto,
    /// RDMA only: no start without a device, peers that cannot are refused.
    Rdma,
    /// TCP only.
    Tcp,
}

impl Mode {
    /// The flag value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Rdma => "rdma",
            Self::Tcp => "tcp",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "rdma" => Ok(Self::Rdma),
            "tcp" => Ok(Self::Tcp),
            _ => Err(format!("unknown transport {s:?} (auto, rdma or tcp)")),
        }
    }
}

/// RDMA settings of a node.
#[derive(Clone, Debug)]
pub struct RdmaConfig {
    /// `--transport`.
    pub mode: Mode,
    /// `--rdma-device`, `--rdma-gid-index`, and the listen address.
    pub device: DeviceChoice,
    /// RC queue pairs per peer (`--rdma-qps`).
    pub qps: usize,
    /// The arena is on 2 MiB hugepages (memory regions are cut at 2 MiB multiples).
    pub hugepages: bool,
    /// Zero-copy sends for the TCP transport underneath.
    pub tcp_zero_copy: bool,
}

/// Default queue pairs per peer.
pub const DEFAULT_QPS: usize = 2;

impl Default for RdmaConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Auto,
            device: DeviceChoice::default(),
            qps: DEFAULT_QPS,
            hugepages: false,
            tcp_zero_copy: false,
        }
    }
}

/// Why an RDMA transport could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The device (required by `--transport rdma`, or asked for by name) is not usable.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The TCP transport underneath, or the event descriptor, failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The transport a node runs with `mode`: an [`RdmaTransport`] where a device is usable, a
/// plain [`TcpTransport`] for `tcp`, and for `auto` without a device (one log line says why).
pub fn build(
    cfg: TransportConfig,
    listen: &str,
    region: Region,
    rcfg: &RdmaConfig,
) -> Result<Box<dyn Transport>, BuildError> {
    let tcp = |mut cfg: TransportConfig, region| -> std::io::Result<Box<dyn Transport>> {
        cfg.identity.features = 0;
        let mut t = TcpTransport::new(cfg, listen, region)?;
        t.set_zero_copy(rcfg.tcp_zero_copy);
        Ok(Box::new(t))
    };
    if rcfg.mode == Mode::Tcp {
        return Ok(tcp(cfg, region)?);
    }
    match Device::open(&rcfg.device, &region, rcfg.hugepages) {
        Ok(dev) => Ok(Box::new(RdmaTransport::with_device(
            cfg, listen, region, dev, rcfg,
        )?)),
        Err(e) if rcfg.mode == Mode::Auto && rcfg.device.device.is_none() => {
            if matches!(e, DeviceError::Unavailable(_)) {
                tracing::info!(reason = %e, "no RDMA: every peer over tcp");
            } else {
                // A device is there but cannot be used (memlock, registration): say it loudly.
                tracing::warn!(reason = %e, "RDMA device unusable: every peer over tcp");
            }
            Ok(tcp(cfg, region)?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Where a peer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Queue pairs being connected; the cluster has not heard of the peer yet.
    Setup {
        since: Instant,
        sent_ready: bool,
        got_ready: bool,
    },
    /// Reads go over RDMA.
    Rdma,
    /// Reads go over TCP.
    Tcp,
}

#[derive(Debug)]
struct Peer {
    identity: Identity,
    inbound: bool,
    phase: Phase,
    reason: String,
    ep: Option<Endpoint>,
    /// Events about the peer held until the cluster hears of it.
    held: Vec<Event>,
    announced: bool,
    /// Refused (`--transport rdma` and the peer cannot): nothing about it is reported.
    refused: bool,
    grants: ReaderGrants,
    /// The TCP connection ended (or we closed it): (the held Disconnected, closed by us).
    closing: Option<(Option<Event>, bool)>,
    /// Its Ident offers RDMA.
    offers: bool,
    /// The set-up round (see `proto::Offer::round`).
    round: u32,
    /// When to try RDMA again after a failure, and how many tries so far (back-off).
    retry_at: Option<Instant>,
    retries: u32,
}

/// Requests in flight with no completion for this long fail the endpoint (a NIC or peer that
/// neither answers nor reports an error must not hold reads forever; the reads then go over
/// TCP). The RC retry counters normally report a dead responder long before.
pub const STALL: Duration = Duration::from_secs(10);

/// First wait before RDMA is tried again after a failure; doubled per try up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(2);
/// Longest wait between two tries.
const RETRY_MAX: Duration = Duration::from_secs(60);

#[derive(Debug)]
enum ReadState {
    /// Handed to the TCP transport (from the start or after an RDMA failure).
    Tcp,
    /// Parked until the grantor answers a query.
    Parked,
    /// Slices queued or in flight on the endpoint.
    Rdma {
        op: ReadOp,
        left: usize,
        failed: bool,
    },
}

#[derive(Debug)]
struct Granted {
    peer: PeerId,
    /// Announced to the peer for RDMA reads: a revoke waits for its acknowledgement.
    rdma: bool,
    tcp_revoked: bool,
    acked: bool,
    revoking: bool,
    /// What the peer was told.
    notice: GrantNotice,
}

/// The RDMA transport (see the crate documentation).
pub struct RdmaTransport {
    // Field order is drop order: queue pairs and CQs, then the device (its MRs), then the
    // TCP transport and the region whose mapping the MRs cover.
    peers: HashMap<PeerId, Peer>,
    dev: Device,
    inner: TcpTransport,
    region: Region,
    mode: Mode,
    qps: usize,
    reads: HashMap<u64, ReadState>,
    granted: HashMap<GrantId, Granted>,
    ready: VecDeque<Event>,
    epoll: OwnedFd,
    seq: u64,
    next_cq: u64,
    cq_peer: HashMap<u64, PeerId>,
    setup_timeout: Duration,
    wcs: Vec<verbs::Wc>,
    stats: Arc<Stats>,
    /// The device reported itself gone: new peers get TCP.
    device_gone: bool,
    /// The port is up (PORT_ERR clears it, PORT_ACTIVE sets it).
    port_up: bool,
}

/// Counters of the RDMA transport, readable from other threads ([`RdmaTransport::stats`]).
#[derive(Debug, Default)]
pub struct Stats {
    /// Bytes read over RDMA.
    pub rdma_bytes: AtomicU64,
    /// Reads that completed over RDMA.
    pub rdma_reads: AtomicU64,
    /// Reads moved to TCP after an RDMA failure.
    pub failovers: AtomicU64,
    /// Endpoints failed.
    pub endpoint_failures: AtomicU64,
    /// Peers whose queue pairs connected.
    pub rdma_peers: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl std::fmt::Debug for RdmaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaTransport")
            .field("dev", &self.dev)
            .field("peers", &self.peers.len())
            .field("reads", &self.reads.len())
            .finish()
    }
}

fn epoll_add(ep: &OwnedFd, fd: BorrowedFd<'_>, key: u64) -> std::io::Result<()> {
    epoll::add(
        ep,
        fd,
        epoll::EventData::new_u64(key),
        epoll::EventFlags::IN,
    )?;
    Ok(())
}

impl RdmaTransport {
    /// An RDMA transport over an opened device (the region must be the one the device
    /// registered).
    pub fn with_device(
        mut cfg: TransportConfig,
        listen: &str,
        region: Region,
        dev: Device,
        rcfg: &RdmaConfig,
    ) -> std::io::Result<Self> {
        cfg.identity.features |= FEATURE_RDMA;
        let setup_timeout = cfg.handshake_timeout;
        let mut inner = TcpTransport::new(cfg, listen, region.clone())?;
        inner.set_zero_copy(rcfg.tcp_zero_copy);
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        if let Some(fd) = inner.ready_fd() {
            epoll_add(&epoll, fd, 0)?;
        }
        epoll_add(&epoll, dev.channel.fd(), 1)?;
        epoll_add(&epoll, dev.ctx.async_fd(), 2)?;
        Ok(Self {
            peers: HashMap::new(),
            dev,
            inner,
            region,
            mode: rcfg.mode,
            qps: rcfg.qps.clamp(1, proto::MAX_QPS),
            reads: HashMap::new(),
            granted: HashMap::new(),
            ready: VecDeque::new(),
            epoll,
            seq: 0,
            next_cq: 1,
            cq_peer: HashMap::new(),
            setup_timeout,
            wcs: Vec::with_capacity(64),
            stats: Arc::default(),
            device_gone: false,
            port_up: true,
        })
    }

    /// Opens the device (as `build` does) and makes the transport; for tests and tools that
    /// need RDMA and nothing else.
    pub fn new(
        cfg: TransportConfig,
        listen: &str,
        region: Region,
        rcfg: &RdmaConfig,
    ) -> Result<Self, BuildError> {
        let dev = Device::open(&rcfg.device, &region, rcfg.hugepages)?;
        Ok(Self::with_device(cfg, listen, region, dev, rcfg)?)
    }

    /// The counters (shared: they keep counting after this call).
    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    /// Moves this node's queue pairs to `peer` into ERR without telling the transport, as a
    /// failing NIC or link would: the peer's READs from us then fail at its end (and ours
    /// flush), which the fault tests use to drive the fall-back to TCP. Not for production.
    /// Returns the requests in flight on them at that moment.
    #[doc(hidden)]
    pub fn break_queue_pairs(&mut self, peer: PeerId) -> Result<usize, verbs::VerbsError> {
        match self.peers.get_mut(&peer).and_then(|p| p.ep.as_mut()) {
            Some(ep) => {
                ep.break_for_test()?;
                Ok(ep.in_flight() + ep.queued())
            }
            None => Ok(0),
        }
    }

    /// The TCP transport's counters.
    pub fn tcp_stats(&self) -> ferroplasma_transport_tcp::Stats {
        self.inner.stats()
    }

    fn send_private(&mut self, peer: PeerId, body: Body) {
        if let Err(e) = self.inner.send(peer, proto::encode(body)) {
            tracing::debug!(%peer, error = %e, "rdma control message not sent");
        }
    }

    /// Reports the peer to the cluster (Connected, then what was held).
    fn announce(&mut self, peer: PeerId) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if p.announced || p.refused {
            return;
        }
        if self.mode == Mode::Rdma && p.phase == Phase::Tcp {
            tracing::error!(
                %peer, node = p.identity.node_id, reason = %p.reason,
                "refusing a peer without RDMA (--transport rdma)"
            );
            p.refused = true;
            let outbound = !p.inbound;
            let addr = p.identity.addr.clone();
            let reason = format!("no RDMA to this peer ({}) and --transport rdma", p.reason);
            self.inner.disconnect(peer);
            if outbound {
                self.ready.push_back(Event::ConnectFailed {
                    peer,
                    error: ConnectError::Refused { addr, reason },
                });
            }
            return;
        }
        p.announced = true;
        tracing::info!(
            %peer,
            node = p.identity.node_id,
            transport = if p.phase == Phase::Rdma { "rdma" } else { "tcp" },
            reason = %p.reason,
            "peer transport chosen"
        );
        self.ready.push_back(Event::Connected {
            peer,
            identity: p.identity.clone(),
            inbound: p.inbound,
        });
        self.ready.extend(p.held.drain(..));
    }

    /// Leaves RDMA for TCP on this peer: queue pairs to ERR; reads already posted finish
    /// (flushed) and then go to TCP; grants stop waiting for acknowledgements (our queue
    /// pairs serve no READ in ERR).
    fn fall_back(&mut self, peer: PeerId, reason: String, tell_peer: bool) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let was_rdma = p.phase == Phase::Rdma;
        if p.phase != Phase::Tcp {
            tracing::warn!(%peer, node = p.identity.node_id, %reason, "RDMA to this peer stopped: tcp from now on");
            p.reason = reason.clone();
            p.phase = Phase::Tcp;
        }
        let dropped = match p.ep.as_mut() {
            Some(ep) => {
                if !ep.failed {
                    bump(&self.stats.endpoint_failures, u64::from(was_rdma));
                }
                ep.fail()
            }
            None => Vec::new(),
        };
        let round = p.round;
        p.grants.forget_all();
        if p.offers && !self.device_gone && p.retry_at.is_none() && p.closing.is_none() {
            let wait = RETRY_FIRST
                .saturating_mul(1 << p.retries.min(8))
                .min(RETRY_MAX);
            p.retry_at = Some(Instant::now() + wait);
            p.retries += 1;
        }
        for t in dropped {
            self.slice_done(t, false);
        }
        for g in self.granted.values_mut().filter(|g| g.peer == peer) {
            g.rdma = false;
            g.acked = true;
        }
        if tell_peer {
            self.send_private(peer, Body::Decline(Decline { reason, round }));
        }
        self.finish_revokes();
    }

    /// Whether new RDMA set-ups can start here.
    fn usable(&self) -> bool {
        !self.device_gone && self.port_up
    }

    /// Starts set-up round `round` with `peer`: fresh queue pairs (the old, idle ones are
    /// dropped) and our offer. On failure the peer stays on TCP (declined, with the reason).
    fn start_setup(&mut self, peer: PeerId, round: u32) {
        let cq_id = self.next_cq;
        self.next_cq += 1;
        let made = Endpoint::new(&self.dev, peer, self.qps, cq_id);
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if let Some(old) = p.ep.take() {
            self.cq_peer.remove(&old.cq_id);
        }
        p.round = round;
        match made {
            Ok(ep) => {
                let offer = ep.offer(&self.dev, round);
                self.cq_peer.insert(cq_id, peer);
                p.ep = Some(ep);
                p.phase = Phase::Setup {
                    since: Instant::now(),
                    sent_ready: false,
                    got_ready: false,
                };
                self.send_private(peer, Body::Offer(offer));
            }
            Err(e) => {
                let reason = format!("creating queue pairs failed: {e}");
                p.reason = reason.clone();
                p.phase = Phase::Tcp;
                self.send_private(peer, Body::Decline(Decline { reason, round }));
                self.announce(peer);
            }
        }
    }

    fn finish_revokes(&mut self) {
        let done: Vec<GrantId> = self
            .granted
            .iter()
            .filter(|(_, g)| g.revoking && g.tcp_revoked && (g.acked || !g.rdma))
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            self.granted.remove(&id);
            self.ready.push_back(Event::Revoked { grant: id });
        }
    }

    /// One slice of an RDMA read retired (or dropped unposted).
    fn slice_done(&mut self, token: u64, ok: bool) {
        let Some(ReadState::Rdma { left, failed, .. }) = self.reads.get_mut(&token) else {
            return;
        };
        *left = left.saturating_sub(1);
        *failed |= !ok;
        if *left == 0 {
            self.read_finished(token);
        }
    }

    /// Every slice of an RDMA read is done: report it, or hand it to TCP after a failure.
    fn read_finished(&mut self, token: u64) {
        let Some(ReadState::Rdma { op, failed, .. }) = self.reads.remove(&token) else {
            return;
        };
        let Some(p) = self.peers.get_mut(&op.peer) else {
            self.ready.push_back(Event::ReadDone {
                token,
                result: Err(ReadError::PeerGone {
                    peer: op.peer,
                    reason: "connection gone".into(),
                }),
            });
            return;
        };
        if p.grants.finished(op.grant.id.0) {
            self.send_private(op.peer, Body::RevokeAck(GrantRef { id: op.grant.id.0 }));
        }
        let p = &self.peers[&op.peer];
        if !failed && !p.ep.as_ref().is_some_and(|e| e.failed) {
            bump(&self.stats.rdma_reads, 1);
            bump(&self.stats.rdma_bytes, op.len);
            self.ready.push_back(Event::ReadDone {
                token,
                result: Ok(()),
            });
            return;
        }
        if let Some((_, by_us)) = p.closing {
            let result = Err(if by_us {
                ReadError::Aborted { peer: op.peer }
            } else {
                ReadError::PeerGone {
                    peer: op.peer,
                    reason: "the connection closed during an RDMA read".into(),
                }
            });
            self.ready.push_back(Event::ReadDone { token, result });
            return;
        }
        // Every request of the read is retired or flushed: no byte of it lands any more, so
        // the same destination can be written again over TCP.
        bump(&self.stats.failovers, 1);
        self.reads.insert(token, ReadState::Tcp);
        // SAFETY: the caller's `read` contract covers the destination until this read's
        // ReadDone, which the TCP transport reports now.
        if let Err(e) = unsafe { self.inner.read(op) } {
            self.reads.remove(&token);
            self.ready.push_back(Event::ReadDone {
                token,
                result: Err(ReadError::PeerGone {
                    peer: op.peer,
                    reason: format!("RDMA failed and tcp refused the read: {e}"),
                }),
            });
        }
    }

    /// Starts (or refuses) a read to a peer on RDMA whose grant is known.
    fn start_rdma(&mut self, op: ReadOp) {
        let Some(p) = self.peers.get_mut(&op.peer) else {
            return;
        };
        let check = p.grants.check(op);
        let offset = match check {
            Check::Go { offset } => offset,
            Check::Parked { ask } => {
                self.reads.insert(op.token, ReadState::Parked);
                if ask {
                    self.send_private(op.peer, Body::GrantQuery(GrantRef { id: op.grant.id.0 }));
                }
                return;
            }
            Check::Refuse(reason) => {
                self.reads.remove(&op.token);
                self.ready.push_back(Event::ReadDone {
                    token: op.token,
                    result: Err(ReadError::Refused {
                        peer: op.peer,
                        reason,
                    }),
                });
                return;
            }
        };
        let ep = p.ep.as_mut().filter(|e| e.up());
        let Some(ep) = ep else {
            // Fell back meanwhile.
            self.reads.insert(op.token, ReadState::Tcp);
            // SAFETY: the caller's `read` contract, passed on.
            if let Err(e) = unsafe { self.inner.read(op) } {
                self.reads.remove(&op.token);
                self.ready.push_back(Event::ReadDone {
                    token: op.token,
                    result: Err(ReadError::PeerGone {
                        peer: op.peer,
                        reason: e.to_string(),
                    }),
                });
            }
            return;
        };
        let remote = ep
            .remote
            .as_ref()
            .expect("an endpoint that is up has the peer's table");
        let Some(slices) = endpoint::slices(
            op.token,
            &self.dev.local,
            op.local_offset,
            remote,
            offset,
            op.len,
        ) else {
            self.reads.remove(&op.token);
            self.ready.push_back(Event::ReadDone {
                token: op.token,
                result: Err(ReadError::Refused {
                    peer: op.peer,
                    reason: format!(
                        "grant {} lies outside the peer's registered arena",
                        op.grant.id.0
                    ),
                }),
            });
            return;
        };
        if slices.is_empty() {
            self.reads.remove(&op.token);
            self.ready.push_back(Event::ReadDone {
                token: op.token,
                result: Ok(()),
            });
            return;
        }
        p.grants.started(op.grant.id.0);
        self.reads.insert(
            op.token,
            ReadState::Rdma {
                op,
                left: slices.len(),
                failed: false,
            },
        );
        ep.queue(slices);
    }

    fn on_connected(&mut self, peer: PeerId, identity: Identity, inbound: bool) {
        let offers = identity.features & FEATURE_RDMA != 0;
        let mut p = Peer {
            identity,
            inbound,
            phase: Phase::Tcp,
            reason: String::new(),
            ep: None,
            held: Vec::new(),
            announced: false,
            refused: false,
            grants: ReaderGrants::default(),
            closing: None,
            offers,
            round: 1,
            retry_at: None,
            retries: 0,
        };
        if !offers || !self.usable() {
            p.reason = if !offers {
                "the peer offers no RDMA (no usable device there, or --transport tcp)".into()
            } else if self.device_gone {
                "the RDMA device of this node is gone".into()
            } else {
                "the RDMA port of this node is down".into()
            };
            if offers {
                let reason = p.reason.clone();
                self.send_private(peer, Body::Decline(Decline { reason, round: 1 }));
            }
            self.peers.insert(peer, p);
            self.announce(peer);
            return;
        }
        self.peers.insert(peer, p);
        self.start_setup(peer, 1);
    }

    fn on_private(&mut self, peer: PeerId, body: &[u8]) {
        let msg = match proto::decode(body) {
            Ok(m) => m,
            Err(e) => {
                let reason = format!("bogus rdma message from the peer: {e}");
                tracing::warn!(%peer, %reason, "refusing RDMA with this peer");
                self.fall_back(peer, reason, true);
                self.announce(peer);
                return;
            }
        };
        let usable = self.usable();
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        match msg {
            Body::Offer(o) => {
                if o.round < p.round
                    || (o.round == p.round && !matches!(p.phase, Phase::Setup { .. }))
                {
                    // An older round, or this round already ended here.
                    return;
                }
                if o.round > p.round {
                    // The peer starts a round (a reconnection): join it, or decline it.
                    let busy = p.ep.as_ref().is_some_and(|e| e.in_flight() > 0);
                    if !p.offers || !usable || busy {
                        p.round = o.round;
                        let reason = if busy {
                            "reads of the last round are still being flushed".to_string()
                        } else {
                            "the RDMA port of this node is down".to_string()
                        };
                        let round = o.round;
                        self.send_private(peer, Body::Decline(Decline { reason, round }));
                        return;
                    }
                    self.start_setup(peer, o.round);
                }
                let Some(p) = self.peers.get_mut(&peer) else {
                    return;
                };
                let Phase::Setup {
                    since, got_ready, ..
                } = p.phase
                else {
                    return;
                };
                let Some(ep) = p.ep.as_mut() else {
                    return;
                };
                let round = p.round;
                match ep.connect(&self.dev, &o) {
                    Ok(()) => {
                        p.phase = Phase::Setup {
                            since,
                            sent_ready: true,
                            got_ready,
                        };
                        self.send_private(peer, Body::Ready(Ready { round }));
                        self.maybe_up(peer);
                    }
                    Err(reason) => {
                        tracing::warn!(%peer, %reason, "RDMA connection failed");
                        self.fall_back(peer, reason, true);
                        self.announce(peer);
                    }
                }
            }
            Body::Ready(r) => {
                if let (
                    Phase::Setup {
                        since, sent_ready, ..
                    },
                    true,
                ) = (p.phase, r.round == p.round)
                {
                    p.phase = Phase::Setup {
                        since,
                        sent_ready,
                        got_ready: true,
                    };
                    self.maybe_up(peer);
                }
            }
            Body::Decline(d) => {
                if d.round < p.round {
                    return;
                }
                p.round = d.round;
                let reason = format!("the peer declined RDMA: {}", d.reason);
                self.fall_back(peer, reason, false);
                self.announce(peer);
            }
            Body::GrantNotice(n) => {
                for op in p.grants.notice(n) {
                    self.start_rdma(op);
                }
            }
            Body::GrantGone(r) => {
                for op in p.grants.gone(r.id) {
                    self.reads.remove(&op.token);
                    self.ready.push_back(Event::ReadDone {
                        token: op.token,
                        result: Err(ReadError::Refused {
                            peer,
                            reason: format!("no live grant {} to this node", r.id),
                        }),
                    });
                }
            }
            Body::GrantQuery(r) => {
                let up = p.phase == Phase::Rdma && p.ep.as_ref().is_some_and(Endpoint::up);
                let reply = match self.granted.get_mut(&GrantId(r.id)) {
                    Some(g) if g.peer == peer && !g.revoking => {
                        // From now on a revoke waits for the peer's acknowledgement (it
                        // may read the grant over RDMA), unless our queue pairs are down.
                        g.rdma = up;
                        g.acked = !up;
                        Body::GrantNotice(g.notice)
                    }
                    _ => Body::GrantGone(r),
                };
                self.send_private(peer, reply);
            }
            Body::Revoke(r) => {
                if p.grants.revoke(r.id) {
                    self.send_private(peer, Body::RevokeAck(r));
                }
            }
            Body::RevokeAck(r) => {
                if let Some(g) = self.granted.get_mut(&GrantId(r.id)) {
                    if g.peer == peer {
                        g.acked = true;
                    }
                }
                self.finish_revokes();
            }
        }
    }

    fn maybe_up(&mut self, peer: PeerId) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if let Phase::Setup {
            sent_ready: true,
            got_ready: true,
            ..
        } = p.phase
        {
            p.phase = Phase::Rdma;
            p.retry_at = None;
            p.retries = 0;
            bump(&self.stats.rdma_peers, 1);
            let ep = p.ep.as_ref();
            p.reason = format!(
                "{} RC queue pairs on {} (GID index {}, MTU {})",
                ep.map_or(0, |e| e.connected()),
                self.dev.ctx.name(),
                self.dev.gid_index,
                device::mtu_bytes(self.dev.mtu.min(ep.map_or(self.dev.mtu, |e| e.peer_mtu())))
            );
            self.announce(peer);
        }
    }

    fn on_disconnected(&mut self, peer: PeerId, reason: String) {
        let ev = Event::Disconnected {
            peer,
            reason: reason.clone(),
        };
        let Some(p) = self.peers.get_mut(&peer) else {
            self.ready.push_back(ev);
            return;
        };
        let by_us = p.closing.as_ref().is_some_and(|(_, us)| *us);
        p.closing = Some((Some(ev), by_us));
        let parked = p.grants.drain_parked();
        for op in parked {
            self.reads.remove(&op.token);
            self.ready.push_back(Event::ReadDone {
                token: op.token,
                result: Err(if by_us {
                    ReadError::Aborted { peer }
                } else {
                    ReadError::PeerGone {
                        peer,
                        reason: reason.clone(),
                    }
                }),
            });
        }
        if let Some(p) = self.peers.get_mut(&peer) {
            if let Some(ep) = p.ep.as_mut() {
                for t in ep.fail() {
                    self.slice_done(t, false);
                }
            }
        }
        for g in self.granted.values_mut().filter(|g| g.peer == peer) {
            g.acked = true;
        }
        self.finish_revokes();
    }

    /// Peers whose connection ended and whose requests are all retired: report them gone.
    fn reap(&mut self) {
        let done: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                p.closing.as_ref().is_some_and(|(ev, _)| ev.is_some())
                    && p.ep.as_ref().is_none_or(|e| e.in_flight() == 0)
            })
            .map(|(id, _)| *id)
            .collect();
        for peer in done {
            let Some(mut p) = self.peers.remove(&peer) else {
                continue;
            };
            if let Some(ep) = p.ep.take() {
                self.cq_peer.retain(|_, v| *v != peer);
                drop(ep);
            }
            let Some((Some(ev), _)) = p.closing.take() else {
                continue;
            };
            if p.announced {
                self.ready.push_back(ev);
            } else if !p.inbound && !p.refused {
                self.ready.push_back(Event::ConnectFailed {
                    peer,
                    error: ConnectError::Unreachable {
                        addr: p.identity.addr.clone(),
                        reason: "the connection closed during RDMA set-up".into(),
                    },
                });
            }
        }
    }

    fn on_inner(&mut self, ev: Event) {
        match ev {
            Event::Connected {
                peer,
                identity,
                inbound,
            } => self.on_connected(peer, identity, inbound),
            Event::Message { peer, mut body }
                if is_transport_private(&body)
                    && self
                        .peers
                        .get(&peer)
                        .is_some_and(|p| p.identity.features & FEATURE_RDMA != 0) =>
            {
                if body.starts_with(&ESCAPE) {
                    body.drain(..ESCAPE.len());
                    self.deliver(peer, body);
                } else {
                    self.on_private(peer, &body);
                }
            }
            Event::Message { peer, body } => self.deliver(peer, body),
            Event::ReadDone { token, result } => {
                self.reads.remove(&token);
                self.ready.push_back(Event::ReadDone { token, result });
            }
            Event::Revoked { grant } => match self.granted.get_mut(&grant) {
                Some(g) => {
                    g.tcp_revoked = true;
                    g.revoking = true;
                    self.finish_revokes();
                }
                None => self.ready.push_back(Event::Revoked { grant }),
            },
            Event::Disconnected { peer, reason } => self.on_disconnected(peer, reason),
            other => self.ready.push_back(other),
        }
    }

    /// A control message for the cluster (held until the peer is announced).
    fn deliver(&mut self, peer: PeerId, body: Vec<u8>) {
        match self.peers.get_mut(&peer) {
            Some(p) if p.refused => {}
            Some(p) if !p.announced => p.held.push(Event::Message { peer, body }),
            _ => self.ready.push_back(Event::Message { peer, body }),
        }
    }

    /// Everything that can be done now without waiting.
    fn step(&mut self) -> Result<(), TransportError> {
        let mut evs = Vec::new();
        self.inner.poll(&mut evs, Some(Duration::ZERO))?;
        for ev in evs {
            self.on_inner(ev);
        }
        // Completion channel: which CQs fired (they are disarmed now).
        loop {
            match self.dev.channel.next_event() {
                Ok(Some(cq)) => {
                    if let Some(p) = self.cq_peer.get(&cq).and_then(|id| self.peers.get_mut(id)) {
                        if let Some(ep) = p.ep.as_mut() {
                            ep.armed = false;
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the completion channel failed");
                    break;
                }
            }
        }
        self.async_events();
        self.complete_all();
        // Post what is queued.
        let mut failed = Vec::new();
        for (id, p) in &mut self.peers {
            if let Some(ep) = p.ep.as_mut() {
                if let Err(e) = ep.post(&mut self.seq) {
                    failed.push((*id, format!("posting RDMA READs failed: {e}")));
                }
            }
        }
        for (peer, reason) in failed {
            self.fall_back(peer, reason, true);
        }
        let now = Instant::now();
        let stalled: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                p.ep.as_ref().is_some_and(|e| {
                    !e.failed && e.in_flight() > 0 && now.duration_since(e.last_progress) > STALL
                })
            })
            .map(|(id, _)| *id)
            .collect();
        for peer in stalled {
            let reason = format!("RDMA READs made no progress for {} s", STALL.as_secs());
            self.fall_back(peer, reason, true);
        }
        // Set-ups that took too long.
        let late: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                matches!(p.phase, Phase::Setup { since, .. } if since.elapsed() > self.setup_timeout)
            })
            .map(|(id, _)| *id)
            .collect();
        for peer in late {
            self.fall_back(peer, "RDMA set-up timed out".into(), true);
            self.announce(peer);
        }
        // RDMA again with peers that fell back, when their time comes.
        if self.usable() {
            let due: Vec<PeerId> = self
                .peers
                .iter()
                .filter(|(_, p)| {
                    p.phase == Phase::Tcp
                        && p.announced
                        && p.closing.is_none()
                        && p.retry_at.is_some_and(|t| t <= now)
                })
                .map(|(id, _)| *id)
                .collect();
            for peer in due {
                let Some(p) = self.peers.get_mut(&peer) else {
                    continue;
                };
                if p.ep.as_ref().is_some_and(|e| e.in_flight() > 0) {
                    // The last round's requests are still being flushed.
                    p.retry_at = Some(now + Duration::from_millis(100));
                    continue;
                }
                p.retry_at = None;
                let round = p.round + 1;
                tracing::info!(%peer, node = p.identity.node_id, round, "trying RDMA again");
                self.start_setup(peer, round);
            }
        }
        // Reads whose grant query went unanswered go over TCP (its server checks them).
        let mut expired = Vec::new();
        for p in self.peers.values_mut() {
            if p.grants.any_parked() {
                expired.extend(p.grants.expired(now, self.setup_timeout));
            }
        }
        let mut silent: Vec<PeerId> = expired.iter().map(|op| op.peer).collect();
        silent.dedup();
        for peer in silent {
            // An rdma transport answers every query at once: this peer is broken or lying.
            self.fall_back(peer, "the peer does not answer grant queries".into(), true);
        }
        for op in expired {
            tracing::debug!(peer = %op.peer, grant = op.grant.id.0, "grant query unanswered: reading over tcp");
            self.reads.insert(op.token, ReadState::Tcp);
            // SAFETY: the caller's `read` contract for this read, passed on.
            if let Err(e) = unsafe { self.inner.read(op) } {
                self.reads.remove(&op.token);
                self.ready.push_back(Event::ReadDone {
                    token: op.token,
                    result: Err(ReadError::PeerGone {
                        peer: op.peer,
                        reason: e.to_string(),
                    }),
                });
            }
        }
        self.reap();
        Ok(())
    }

    fn complete_all(&mut self) {
        let ids: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.ep.as_ref().is_some_and(|e| e.in_flight() > 0))
            .map(|(id, _)| *id)
            .collect();
        for peer in ids {
            while let Some(ep) = self.peers.get_mut(&peer).and_then(|p| p.ep.as_mut()) {
                let retired = match ep.complete(&mut self.wcs) {
                    Ok(r) => r,
                    Err(e) => {
                        let reason = format!("polling the completion queue failed: {e}");
                        self.fall_back(peer, reason, true);
                        break;
                    }
                };
                let got = !retired.wrs.is_empty();
                if let Some(err) = retired.error {
                    self.fall_back(peer, format!("RDMA READ failed: {err}"), true);
                }
                for (token, ok) in retired.wrs {
                    self.slice_done(token, ok);
                }
                if !got {
                    break;
                }
            }
        }
    }

    fn async_events(&mut self) {
        loop {
            let ev = match self.dev.ctx.next_async_event() {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "reading RDMA async events failed");
                    break;
                }
            };
            let name = events::name(ev.kind);
            tracing::warn!(event = name, qp = ?ev.qp_num, port = ?ev.port, "RDMA async event");
            let hit: Vec<PeerId> = match ev.qp_num {
                Some(qpn) if events::qp_fatal(ev.kind) => self
                    .peers
                    .iter()
                    .filter(|(_, p)| p.ep.as_ref().is_some_and(|e| e.owns_qp(qpn)))
                    .map(|(id, _)| *id)
                    .collect(),
                _ if events::device_fatal(ev.kind) => self.peers.keys().copied().collect(),
                _ => Vec::new(),
            };
            if ev.kind == events::PORT_ERR {
                self.port_up = false;
            }
            if ev.kind == events::PORT_ACTIVE {
                self.port_up = true;
                let now = Instant::now();
                for p in self.peers.values_mut() {
                    if p.phase == Phase::Tcp && p.offers {
                        p.retry_at = Some(now);
                    }
                }
            }
            let gone = ev.kind == events::DEVICE_FATAL;
            for peer in hit {
                self.fall_back(peer, format!("RDMA async event {name}"), true);
                if gone {
                    let tokens = self
                        .peers
                        .get_mut(&peer)
                        .and_then(|p| p.ep.as_mut())
                        .map(Endpoint::abandon)
                        .unwrap_or_default();
                    for t in tokens {
                        self.slice_done(t, false);
                    }
                }
            }
            if gone {
                self.device_gone = true;
            }
        }
    }

    fn any_in_flight(&self) -> bool {
        self.peers
            .values()
            .any(|p| p.ep.as_ref().is_some_and(|e| e.in_flight() > 0))
    }

    /// Arms every CQ with requests in flight; true when all are armed (sleeping is safe
    /// after one more pass over the CQs).
    fn arm(&mut self) -> Result<(), TransportError> {
        let mut failed = Vec::new();
        for (id, p) in &mut self.peers {
            if let Some(ep) = p.ep.as_mut().filter(|e| e.in_flight() > 0) {
                if let Err(e) = ep.arm() {
                    failed.push((*id, format!("arming the completion queue failed: {e}")));
                }
            }
        }
        for (peer, reason) in failed {
            self.fall_back(peer, reason, true);
        }
        Ok(())
    }
}

impl Transport for RdmaTransport {
    fn kind(&self) -> &'static str {
        "rdma"
    }

    fn local_addr(&self) -> String {
        self.inner.local_addr()
    }

    fn region(&self) -> RegionHandle {
        RegionHandle {
            len: self.region.len(),
        }
    }

    fn data_settings(&self) -> DataSettings {
        // What TCP applies: RDMA reads are not chunked by us and are covered by the link's
        // ICRC, reads that fall back to TCP get TCP's settings.
        self.inner.data_settings()
    }

    fn connect(&mut self, addr: &str) -> PeerId {
        self.inner.connect(addr)
    }

    fn max_control_msg(&self) -> usize {
        self.inner.max_control_msg() - ESCAPE.len()
    }

    fn send(&mut self, peer: PeerId, body: Vec<u8>) -> Result<(), TransportError> {
        if body.len() > self.max_control_msg() {
            return Err(TransportError::TooLarge(body.len()));
        }
        let ours = self
            .peers
            .get(&peer)
            .is_some_and(|p| p.identity.features & FEATURE_RDMA != 0);
        if ours && is_transport_private(&body) {
            // A message of the cluster that looks private travels escaped (see `ESCAPE`).
            let mut b = Vec::with_capacity(body.len() + ESCAPE.len());
            b.extend_from_slice(&ESCAPE);
            b.extend_from_slice(&body);
            return self.inner.send(peer, b);
        }
        self.inner.send(peer, body)
    }

    unsafe fn read(&mut self, op: ReadOp) -> Result<(), TransportError> {
        self.region().check(op.local_offset, op.len)?;
        if self.reads.contains_key(&op.token) {
            return Err(TransportError::DuplicateToken(op.token));
        }
        let Some(p) = self
            .peers
            .get(&op.peer)
            .filter(|p| p.announced && p.closing.is_none())
        else {
            return Err(TransportError::NoPeer(op.peer));
        };
        if p.phase == Phase::Rdma && p.ep.as_ref().is_some_and(Endpoint::up) {
            self.start_rdma(op);
            return Ok(());
        }
        self.reads.insert(op.token, ReadState::Tcp);
        // SAFETY: the caller's contract for this read, passed on unchanged.
        let r = unsafe { self.inner.read(op) };
        if r.is_err() {
            self.reads.remove(&op.token);
        }
        r
    }

    unsafe fn grant(
        &mut self,
        peer: PeerId,
        offset: u64,
        len: u64,
    ) -> Result<GrantDescriptor, TransportError> {
        // SAFETY: the caller's contract for this range, passed on unchanged: the TCP
        // transport serves reads of it until its Revoked, the NIC until the peer acknowledges
        // the revoke (or our queue pairs to it are in ERR), and `Revoked` is reported only
        // after both.
        let d = unsafe { self.inner.grant(peer, offset, len) }?;
        let rdma = self
            .peers
            .get(&peer)
            .is_some_and(|p| p.phase == Phase::Rdma && p.ep.as_ref().is_some_and(Endpoint::up));
        let notice = GrantNotice {
            id: d.id.0,
            offset,
            len,
            key: d.key,
        };
        self.granted.insert(
            d.id,
            Granted {
                peer,
                rdma,
                tcp_revoked: false,
                acked: false,
                revoking: false,
                notice,
            },
        );
        if rdma {
            // Sent before the message that carries the descriptor, so it arrives first.
            self.send_private(peer, Body::GrantNotice(notice));
        }
        Ok(d)
    }

    fn revoke(&mut self, grant: GrantId) {
        if let Some(g) = self.granted.get_mut(&grant) {
            if !g.revoking {
                g.revoking = true;
                if g.rdma && !g.acked {
                    let peer = g.peer;
                    self.send_private(peer, Body::Revoke(GrantRef { id: grant.0 }));
                }
            }
        }
        self.inner.revoke(grant);
    }

    fn disconnect(&mut self, peer: PeerId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            if p.closing.is_none() {
                p.closing = Some((None, true));
            }
            if let Some(ep) = p.ep.as_mut() {
                for t in ep.fail() {
                    self.slice_done(t, false);
                }
            }
        }
        self.inner.disconnect(peer);
    }

    fn poll(
        &mut self,
        events: &mut Vec<Event>,
        timeout: Option<Duration>,
    ) -> Result<(), TransportError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut spins = 0u32;
        loop {
            self.step()?;
            events.extend(self.ready.drain(..));
            if !events.is_empty() {
                return Ok(());
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left == Some(Duration::ZERO) {
                return Ok(());
            }
            // Busy-poll a little while reads are in flight: a completion is likely soon and
            // a wake-up through the channel costs more than a few polls.
            if self.any_in_flight() && spins < 64 {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            if self.inner.has_work() || self.has_posting_work() {
                continue;
            }
            self.arm()?;
            // Completions that raced the arming are caught by this pass.
            self.step()?;
            events.extend(self.ready.drain(..));
            if !events.is_empty() {
                return Ok(());
            }
            let setups = self.peers.values().any(|p| {
                matches!(p.phase, Phase::Setup { .. })
                    || p.grants.any_parked()
                    || p.retry_at.is_some()
                    || p.ep.as_ref().is_some_and(|e| e.in_flight() > 0)
            });
            let mut wait = left.unwrap_or(Duration::from_secs(1));
            if setups {
                wait = wait.min(Duration::from_millis(20));
            }
            let ts = rustix::event::Timespec {
                tv_sec: i64::try_from(wait.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: i64::from(wait.subsec_nanos()),
            };
            let mut buf: Vec<epoll::Event> = Vec::with_capacity(4);
            match epoll::wait(
                &self.epoll,
                rustix::buffer::spare_capacity(&mut buf),
                Some(&ts),
            ) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(TransportError::Io(e.into())),
            }
            spins = 0;
        }
    }

    fn waker(&self) -> Waker {
        self.inner.waker()
    }

    fn ready_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.epoll.as_fd())
    }

    fn has_work(&self) -> bool {
        !self.ready.is_empty()
            || self.inner.has_work()
            || self.has_posting_work()
            || self
                .peers
                .values()
                .any(|p| p.ep.as_ref().is_some_and(|e| e.in_flight() > 0 && !e.armed))
    }

    fn peer_path(&self, peer: PeerId) -> Option<PeerPath> {
        let p = self.peers.get(&peer)?;
        Some(PeerPath {
            kind: if p.phase == Phase::Rdma {
                "rdma"
            } else {
                "tcp"
            },
            reason: p.reason.clone(),
        })
    }

    fn status(&self) -> Vec<(&'static str, String)> {
        vec![
            ("rdma_device", self.dev.ctx.name().to_string()),
            ("rdma_port", self.dev.port.to_string()),
            (
                "rdma_gid",
                format!(
                    "{} (index {}, {})",
                    device::fmt_gid(&self.dev.gid),
                    self.dev.gid_index,
                    self.dev.gid_kind
                ),
            ),
            ("rdma_mtu", device::mtu_bytes(self.dev.mtu).to_string()),
            ("rdma_qps_per_peer", self.qps.to_string()),
            ("rdma_memory_regions", self.dev.mr_count().to_string()),
            (
                "rdma_registration_ms",
                format!("{:.1}", self.dev.registration.as_secs_f64() * 1e3),
            ),
            (
                "rdma_grant_enforcement",
                "by the reader's transport (grant notices); no memory windows: an \
                 authenticated peer could read any offset of the arena"
                    .to_string(),
            ),
            (
                "rdma_bytes_read",
                self.stats.rdma_bytes.load(Ordering::Relaxed).to_string(),
            ),
            (
                "rdma_failovers",
                self.stats.failovers.load(Ordering::Relaxed).to_string(),
            ),
        ]
    }
}

impl RdmaTransport {
    /// Slices queued on an endpoint that is up (posting them is work).
    fn has_posting_work(&self) -> bool {
        self.peers
            .values()
            .any(|p| p.ep.as_ref().is_some_and(|e| e.up() && e.queued() > 0))
    }
}
