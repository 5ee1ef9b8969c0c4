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
    DataSettings, Event, GrantDescriptor, GrantId, Identity, PeerId, PeerPath, ReadOp,
    RegionHandle, Transport, TransportConfig, TransportError, Waker,
};
use ferroplasma_transport_tcp::TcpTransport;
use rustix::event::epoll;

pub mod device;
pub mod endpoint;
mod events;
pub mod grants;
mod peers;
pub mod proto;
mod reads;
mod step;
mod windows;

use windows::Granted;
#[allow(unsafe_code)]
mod sys;
#[allow(unsafe_code)]
pub mod verbs;

pub use device::{DeviceChoice, DeviceError};

use device::Device;
use endpoint::Endpoint;
use grants::ReaderGrants;
use proto::{Body, GrantRef};

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
    /// When the current round started (a peer may not start rounds faster than
    /// [`ROUND_MIN`]).
    round_at: Instant,
}

/// Shortest time between two set-up rounds a peer may start.
const ROUND_MIN: Duration = Duration::from_secs(1);
/// Most grant notices a reader keeps per peer (a live grant per pinned object; the cluster
/// caps those at 4096 per peer).
const MAX_NOTICES: usize = 1 << 16;

/// Requests in flight with no completion for this long fail the endpoint (a NIC or peer that
/// neither answers nor reports an error must not hold reads forever; the reads then go over
/// TCP). The RC retry counters normally report a dead responder long before.
pub const STALL: Duration = Duration::from_secs(10);

/// How often the transport's timers are looked at.
const TIMERS: Duration = Duration::from_millis(20);

/// Empty passes over the completion queues, with requests in flight, before they are armed and
/// the event loop may sleep on the completion channel.
const SPIN: u32 = 64;

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

/// The RDMA transport (see the crate documentation).
pub struct RdmaTransport {
    // Field order is drop order: memory windows (grants, the pool), queue pairs and CQs,
    // then the device (its MRs), then the TCP transport and the region whose mapping the
    // MRs cover.
    granted: HashMap<GrantId, Granted>,
    mw_pool: Vec<verbs::Mw>,
    peers: HashMap<PeerId, Peer>,
    dev: Device,
    inner: TcpTransport,
    region: Region,
    mode: Mode,
    qps: usize,
    reads: HashMap<u64, ReadState>,
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
    /// Consecutive passes that found no completion with requests in flight.
    empty_polls: u32,
    /// When the timers are looked at next.
    next_timers: Instant,
    /// Nodes refused for want of RDMA (logged once each).
    refused_nodes: std::collections::HashSet<u64>,
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
    /// Peers refused because they cannot do RDMA (`--transport rdma`).
    pub refused_peers: AtomicU64,
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
        if !dev.registered(&region) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the region is not the one the RDMA device registered",
            ));
        }
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
            mw_pool: Vec::new(),
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
            empty_polls: 0,
            next_timers: Instant::now(),
            refused_nodes: std::collections::HashSet::new(),
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

    /// Posts one READ of `len` bytes at the peer's arena offset `remote_offset` under `rkey`
    /// on queue pair `qp`, into `local_offset`, bypassing every check of the grant notices:
    /// what a malicious peer could do with its own verbs. The fault tests use it to show that
    /// memory windows make the NIC refuse what no live grant covers. Reported like a read
    /// (under a grant number no grantor has, so its fall-back to TCP is refused). Not for
    /// production.
    ///
    /// # Safety
    /// As [`Transport::read`] for `[local_offset, local_offset + len)`.
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn read_raw(
        &mut self,
        token: u64,
        peer: PeerId,
        remote_offset: u64,
        rkey: u32,
        qp: u16,
        local_offset: u64,
        len: u64,
    ) -> Result<(), TransportError> {
        self.region().check(local_offset, len)?;
        if self.reads.contains_key(&token) {
            return Err(TransportError::DuplicateToken(token));
        }
        let ep = self
            .peers
            .get_mut(&peer)
            .and_then(|p| p.ep.as_mut())
            .filter(|e| e.up() && usize::from(qp) < e.connected())
            .ok_or(TransportError::NoPeer(peer))?;
        let remote = ep.remote.as_ref().ok_or(TransportError::NoPeer(peer))?;
        let mut slices = endpoint::slices(
            token,
            &self.dev.local,
            local_offset,
            remote,
            remote_offset,
            len,
        )
        .ok_or(TransportError::OutOfRegion {
            offset: remote_offset,
            len,
            region: remote.len(),
        })?;
        for s in &mut slices {
            s.rkey = rkey;
            s.qp = Some(qp);
        }
        let op = ReadOp {
            token,
            peer,
            grant: GrantDescriptor {
                id: GrantId(u64::MAX),
                addr: remote_offset,
                len,
                key: 0,
            },
            offset: 0,
            local_offset,
            len,
        };
        self.reads.insert(
            token,
            ReadState::Rdma {
                op,
                left: slices.len(),
                failed: false,
            },
        );
        ep.queue(slices);
        Ok(())
    }

    /// The rkeys of grant `grant` of `peer` as its notice gave them (for the fault tests).
    #[doc(hidden)]
    pub fn notice_keys(&self, peer: PeerId, grant: GrantId) -> Option<Vec<u32>> {
        self.peers.get(&peer)?.grants.keys_of(grant.0)
    }

    /// The rkey of the peer's first memory region, from its region table (for the fault
    /// tests: with memory windows it gives no remote access).
    #[doc(hidden)]
    pub fn region_rkey(&self, peer: PeerId) -> Option<u32> {
        self.peers
            .get(&peer)?
            .ep
            .as_ref()?
            .remote
            .as_ref()?
            .piece(0, 1)
            .map(|(_, k, _)| k)
    }

    /// Whether this node's grants are memory windows.
    pub fn windows(&self) -> bool {
        self.dev.windows
    }

    /// The TCP transport's counters.
    pub fn tcp_stats(&self) -> ferroplasma_transport_tcp::Stats {
        self.inner.stats()
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
        self.granted.insert(d.id, Granted::new(peer, offset, len));
        if rdma {
            // The notice goes before the message that carries the descriptor (at once, or
            // once the grant's windows are bound; a reader that is faster asks).
            self.offer_grant(d.id);
        }
        Ok(d)
    }

    fn revoke(&mut self, grant: GrantId) {
        if let Some(g) = self.granted.get_mut(&grant) {
            if !g.revoking {
                g.revoking = true;
                g.revoke_since = Some(Instant::now());
                // A reader that got a notice forgets it (and acknowledges; the revoke waits for
                // that only while it may read the grant over RDMA).
                if g.announced || (g.rdma && !g.acked) {
                    let peer = g.peer;
                    self.send_private(peer, Body::Revoke(GrantRef { id: grant.0 }));
                }
                self.invalidate_grant(grant);
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
                for t in ep.fail(&mut self.seq) {
                    self.slice_done(t, false);
                }
            }
            for g in self.granted.values_mut().filter(|g| g.peer == peer) {
                g.endpoint_gone();
            }
            self.finish_revokes();
        }
        self.inner.disconnect(peer);
    }

    fn poll(
        &mut self,
        events: &mut Vec<Event>,
        timeout: Option<Duration>,
    ) -> Result<(), TransportError> {
        let deadline = timeout.map(|t| Instant::now() + t);
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
            // Work the descriptor may not show, including completion queues not yet armed
            // (each pass busy-polls them; `complete_all` arms them after `SPIN` empty passes).
            if self.has_work() {
                std::hint::spin_loop();
                continue;
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
                if self.dev.windows {
                    let mut s = "by the NIC: type-2 memory windows per grant, memory region and \
                                 queue pair, invalidated on revoke (the arena's memory regions \
                                 have no remote access)"
                        .to_string();
                    if self.dev.ctx.name().starts_with("rxe") {
                        s.push_str(
                            "; soft-RoCE checks a window's READs against its memory region's \
                             bounds only",
                        );
                    }
                    s
                } else {
                    "by the reader's transport (grant notices); no memory windows: an \
                     authenticated peer could read any offset of the arena"
                        .to_string()
                },
            ),
            (
                "rdma_bytes_read",
                self.stats.rdma_bytes.load(Ordering::Relaxed).to_string(),
            ),
            (
                "rdma_failovers",
                self.stats.failovers.load(Ordering::Relaxed).to_string(),
            ),
            (
                "rdma_refused_peers",
                self.stats.refused_peers.load(Ordering::Relaxed).to_string(),
            ),
        ]
    }
}
