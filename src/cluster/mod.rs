//! Several nodes as one object store: membership, the owner-based directory, and pulls of
//! remote objects over a [`Transport`](ferroplasma_transport::Transport).
//!
//! - [`membership`]: the head's list, joins, heartbeats, dead nodes (pure).
//! - [`directory`]: the owner's record of copies elsewhere (pure).
//! - [`link`]: the messages between the event loop's core and the cluster thread.
//! - [`node`]: the cluster thread driving a transport.

mod config;
pub mod directory;
pub mod link;
pub mod membership;
pub mod node;
mod region;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_queue::SegQueue;
use ferroplasma_transport::{Identity, Transport, TransportConfig, Waker};

pub use config::{
    ClusterConfig, TransportChoice, DEFAULT_DEAD_AFTER, DEFAULT_HEARTBEAT, DEFAULT_PORT,
};

pub use ferroplasma_transport_mem::MemNetwork;

use crate::id::NodeId;
use crate::shm::SharedMapping;
use link::{ToCluster, ToCore};

/// The event loop's handle on the cluster thread.
pub struct ClusterHandle {
    /// Messages for the core.
    pub to_core: Arc<SegQueue<ToCore>>,
    /// Messages for the cluster thread.
    pub from_core: Arc<SegQueue<ToCluster>>,
    /// Interrupts the cluster thread's poll.
    pub waker: Waker,
    /// Where peers reach this node.
    pub addr: String,
    /// The transport's name.
    pub transport: &'static str,
    shutdown: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ClusterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterHandle")
            .field("addr", &self.addr)
            .finish()
    }
}

impl ClusterHandle {
    /// Hands messages to the cluster thread.
    pub fn send(&self, msgs: impl IntoIterator<Item = ToCluster>) {
        let mut any = false;
        for m in msgs {
            self.from_core.push(m);
            any = true;
        }
        if any {
            self.waker.wake();
        }
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        self.shutdown
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ClusterHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Builds the transport over the arena and starts the cluster thread.
pub fn start(
    cfg: &ClusterConfig,
    me: NodeId,
    arena: Arc<SharedMapping>,
    inline_threshold: u64,
    wake_core: Box<dyn Fn() + Send>,
) -> std::io::Result<ClusterHandle> {
    let mut tcfg = TransportConfig::new(
        Identity {
            node_id: me.0,
            addr: String::new(),
        },
        cfg.token.clone(),
    );
    tcfg.checksums = cfg.checksums;
    tcfg.chunk = cfg.chunk;
    let t: Box<dyn Transport> = match &cfg.transport {
        TransportChoice::Tcp => {
            let mut t = ferroplasma_transport_tcp::TcpTransport::new(
                tcfg,
                &cfg.listen,
                region::tcp(&arena),
            )?;
            t.set_zero_copy(cfg.zero_copy);
            Box::new(t)
        }
        TransportChoice::Mem(net) => Box::new(ferroplasma_transport_mem::MemTransport::new(
            net,
            Some(&cfg.listen),
            tcfg,
            region::mem(&arena),
        )),
    };
    let addr = t.local_addr();
    let transport = t.kind();
    let waker = t.waker();
    let to_core = Arc::new(SegQueue::new());
    let from_core = Arc::new(SegQueue::new());
    let shutdown = Arc::new(AtomicBool::new(false));
    let runner = node::Runner::new(
        t,
        arena,
        me,
        inline_threshold,
        cfg,
        to_core.clone(),
        from_core.clone(),
        wake_core,
        shutdown.clone(),
    );
    let thread = std::thread::Builder::new()
        .name("fp-cluster".into())
        .spawn(move || runner.run())?;
    Ok(ClusterHandle {
        to_core,
        from_core,
        waker,
        addr,
        transport,
        shutdown,
        thread: Some(thread),
    })
}
