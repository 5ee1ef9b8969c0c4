//! Several nodes as one object store: membership, the owner-based directory, and pulls of
//! remote objects over a [`Transport`](ferroplasma_transport::Transport).
//!
//! - [`membership`]: the head's list, joins, heartbeats, dead nodes (pure).
//! - [`directory`]: the owner's record of copies elsewhere (pure).
//! - the messages between the core and this side are the store's: [`crate::store::link`].
//! - [`node`]: the cluster side of a node, driving a transport (stepped by the event loop).

mod config;
pub mod directory;
pub mod membership;
pub mod node;
mod region;

use std::sync::Arc;

use crossbeam_queue::SegQueue;
use ferroplasma_transport::{Identity, Transport, TransportConfig};

pub use config::{
    ChecksumMode, ClusterConfig, ConfigError, CustomTransport, TransportChoice, DEFAULT_DEAD_AFTER,
    DEFAULT_HEARTBEAT, DEFAULT_PORT, MIN_TOKEN_LEN,
};

use crate::id::NodeId;
use crate::shm::SharedMapping;
use crate::store::link::{ToCluster, ToCore};

/// The event loop's handle on its cluster side (stepped on the event loop's thread).
pub struct ClusterHandle {
    /// Messages for the core.
    pub to_core: Arc<SegQueue<ToCore>>,
    from_core: Arc<SegQueue<ToCluster>>,
    runner: node::Runner,
    /// Where peers reach this node.
    pub addr: String,
    /// The transport's name.
    pub transport: &'static str,
}

impl std::fmt::Debug for ClusterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterHandle")
            .field("addr", &self.addr)
            .finish()
    }
}

impl ClusterHandle {
    /// Hands messages to the cluster side; returns whether there were any.
    pub fn send(&self, msgs: impl IntoIterator<Item = ToCluster>) -> bool {
        let mut any = false;
        for m in msgs {
            self.from_core.push(m);
            any = true;
        }
        any
    }

    /// Whether the cluster side has work to do now: messages wait for it, or its transport
    /// holds work its readiness descriptor may not show ([`Transport::has_work`]: events or
    /// operations queued outside its `poll`, such as heartbeats sent after `step`'s last
    /// poll, or completions it took off its queue). The event loop checks this before it
    /// sleeps and steps instead while it is `true`.
    pub fn has_work(&self) -> bool {
        !self.from_core.is_empty() || self.runner.transport_has_work()
    }

    /// Does what can be done now; returns whether anything happened.
    pub fn step(&mut self) -> bool {
        self.runner.step()
    }

    /// Whether object bytes are moving (see [`node::Runner::transferring`]).
    pub fn transferring(&self) -> bool {
        self.runner.transferring()
    }

    /// When the cluster side wants to be stepped at the latest.
    pub fn next_deadline(&self) -> std::time::Instant {
        self.runner.next_beat()
    }

    /// Readable when the transport has work (see [`Transport::ready_fd`]).
    pub fn ready_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.runner.ready_fd()
    }

    /// Blocks in the transport (for transports without a readiness descriptor).
    pub fn wait(&mut self, timeout: std::time::Duration) {
        self.runner.wait(timeout);
    }
}

/// Builds the transport over the arena and the cluster side of a node.
pub fn start(
    cfg: &ClusterConfig,
    me: NodeId,
    arena: Arc<SharedMapping>,
    hugepages: bool,
    inline_threshold: u64,
) -> std::io::Result<ClusterHandle> {
    let mut tcfg = TransportConfig::new(Identity::new(me.0, String::new()), cfg.token.clone());
    tcfg.set_checksum_mode(cfg.checksums);
    tcfg.chunk = cfg.chunk;
    let rdma = |mode| ferroplasma_transport_rdma::RdmaConfig {
        mode,
        device: ferroplasma_transport_rdma::DeviceChoice {
            device: cfg.rdma_device.clone(),
            gid_index: cfg.rdma_gid_index,
            local_ip: cfg
                .listen
                .parse::<std::net::SocketAddr>()
                .ok()
                .map(|a| a.ip()),
            windows: cfg.rdma_windows,
        },
        qps: cfg.rdma_qps,
        hugepages,
        tcp_zero_copy: cfg.zero_copy,
    };
    let t: Box<dyn Transport> = match &cfg.transport {
        TransportChoice::Auto | TransportChoice::Rdma => {
            let mode = if matches!(cfg.transport, TransportChoice::Rdma) {
                ferroplasma_transport_rdma::Mode::Rdma
            } else {
                ferroplasma_transport_rdma::Mode::Auto
            };
            ferroplasma_transport_rdma::build(tcfg, &cfg.listen, region::arena(&arena), &rdma(mode))
                .map_err(|e| std::io::Error::other(e.to_string()))?
        }
        TransportChoice::Tcp => {
            let mut t = ferroplasma_transport_tcp::TcpTransport::new(
                tcfg,
                &cfg.listen,
                region::arena(&arena),
            )?;
            t.set_zero_copy(cfg.zero_copy);
            Box::new(t)
        }
        TransportChoice::Custom(build) => build.build(tcfg, &cfg.listen, region::arena(&arena))?,
    };
    let addr = t.local_addr();
    let transport = t.kind();
    let to_core = Arc::new(SegQueue::new());
    let from_core = Arc::new(SegQueue::new());
    let runner = node::Runner::new(
        t,
        arena,
        me,
        inline_threshold,
        cfg,
        to_core.clone(),
        from_core.clone(),
    );
    Ok(ClusterHandle {
        to_core,
        from_core,
        runner,
        addr,
        transport,
    })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::shm::arena::{Arena, HugepageMode};

    /// Work a step leaves in the transport after its last poll keeps the event loop awake:
    /// here the heartbeat round of a node that lost its head dials the head again, and the
    /// in-process transport queues the refusal without making its descriptor readable (as
    /// tcp queues a heartbeat send, or holds completions in its backlog). `has_work`, which
    /// the event loop checks before it sleeps, must report it.
    #[test]
    fn has_work_sees_what_a_step_left_in_the_transport() {
        let arena = Arena::create(2 << 20, HugepageMode::Off).expect("arena");
        let arena = Arc::new(arena.into_mapping());
        let mut cfg = ClusterConfig::new("mem:node-2");
        let net = ferroplasma_transport_mem::MemNetwork::new();
        cfg.transport = TransportChoice::Custom(CustomTransport::new(move |t, listen, r| {
            Ok(Box::new(ferroplasma_transport_mem::MemTransport::new(
                &net,
                Some(listen),
                t,
                r,
            )))
        }));
        cfg.join = Some("mem:nobody-listens".into());
        cfg.heartbeat = Duration::from_millis(50);
        let mut c = start(&cfg, NodeId(2), arena, false, 0).expect("cluster side");
        let limit = Instant::now() + Duration::from_secs(30);
        // The dial made at start, and the heartbeat round due at once, are handled.
        while {
            c.step();
            c.has_work()
        } {
            assert!(Instant::now() < limit, "the cluster side never settled");
        }
        // The next round is due: a step whose last poll finds nothing dials the head.
        while Instant::now() < c.next_deadline() {
            std::thread::yield_now();
        }
        c.step();
        assert!(
            c.has_work(),
            "a refused dial queued after the step's last poll is not reported"
        );
    }
}
