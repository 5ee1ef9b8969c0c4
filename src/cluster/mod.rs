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
    ChecksumMode, ClusterConfig, ConfigError, TransportChoice, DEFAULT_DEAD_AFTER,
    DEFAULT_HEARTBEAT, DEFAULT_PORT, MIN_TOKEN_LEN,
};

pub use ferroplasma_transport_mem::MemNetwork;

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

    /// Whether messages wait for the cluster side.
    pub fn has_work(&self) -> bool {
        !self.from_core.is_empty()
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
    inline_threshold: u64,
) -> std::io::Result<ClusterHandle> {
    let mut tcfg = TransportConfig::new(
        Identity {
            node_id: me.0,
            addr: String::new(),
        },
        cfg.token.clone(),
    );
    tcfg.set_checksum_mode(cfg.checksums);
    tcfg.chunk = cfg.chunk;
    let t: Box<dyn Transport> = match &cfg.transport {
        TransportChoice::Tcp => {
            let mut t = ferroplasma_transport_tcp::TcpTransport::new(
                tcfg,
                &cfg.listen,
                region::arena(&arena),
            )?;
            t.set_zero_copy(cfg.zero_copy);
            Box::new(t)
        }
        TransportChoice::Mem(net) => Box::new(ferroplasma_transport_mem::MemTransport::new(
            net,
            Some(&cfg.listen),
            tcfg,
            region::arena(&arena),
        )),
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
