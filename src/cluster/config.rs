//! How a node takes part in a cluster.

use std::time::Duration;

use ferroplasma_transport_mem::MemNetwork;

pub use ferroplasma_transport::ChecksumMode;

/// Which transport carries node-to-node traffic.
#[derive(Clone, Debug, Default)]
pub enum TransportChoice {
    /// TCP with io_uring.
    #[default]
    Tcp,
    /// In-process, for tests: nodes in one process on one [`MemNetwork`].
    Mem(MemNetwork),
}

/// Cluster settings of a node.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// Where peers reach this node (`ip:port`; port 0 picks one).
    pub listen: String,
    /// The head to join; `None` makes this node the head.
    pub join: Option<String>,
    /// The shared cluster token (empty: none).
    pub token: Vec<u8>,
    /// Listening beyond loopback without a token was explicitly allowed.
    pub insecure: bool,
    /// The transport.
    pub transport: TransportChoice,
    /// How often nodes tell each other they are alive.
    pub heartbeat: Duration,
    /// Silence after which a node is declared dead.
    pub dead_after: Duration,
    /// What protects data chunks: nothing, xxh3 (accidents), or a keyed MAC (tampering).
    /// Control frames and chunk headers are authenticated in every mode.
    pub checksums: ChecksumMode,
    /// Data chunk size.
    pub chunk: u32,
    /// Zero-copy sends (`SEND_ZC`) for data chunks.
    pub zero_copy: bool,
}

/// Default heartbeat interval.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(500);
/// Default dead-after time.
pub const DEFAULT_DEAD_AFTER: Duration = Duration::from_secs(5);
/// Default peer port.
pub const DEFAULT_PORT: u16 = 7420;

impl ClusterConfig {
    /// Defaults listening on `listen`.
    pub fn new(listen: impl Into<String>) -> Self {
        Self {
            listen: listen.into(),
            join: None,
            token: Vec::new(),
            insecure: false,
            transport: TransportChoice::Tcp,
            heartbeat: DEFAULT_HEARTBEAT,
            dead_after: DEFAULT_DEAD_AFTER,
            checksums: ChecksumMode::On,
            chunk: 4 << 20,
            zero_copy: false,
        }
    }

    /// Whether the listen address is reachable only from this machine.
    pub fn listen_is_loopback(&self) -> bool {
        if matches!(self.transport, TransportChoice::Mem(_)) {
            return true;
        }
        self.listen
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback())
    }
}
