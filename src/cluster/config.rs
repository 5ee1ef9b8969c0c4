//! How a node takes part in a cluster.

use std::time::Duration;

use std::sync::Arc;

use ferroplasma_region::Region;
use ferroplasma_transport::{Transport, TransportConfig};

pub use ferroplasma_transport::ChecksumMode;

/// Which transport carries node-to-node traffic.
#[derive(Clone, Debug, Default)]
pub enum TransportChoice {
    /// TCP with io_uring.
    #[default]
    Tcp,
    /// A transport the caller builds (tests: the in-process `mem` transport, which the
    /// library does not link).
    Custom(CustomTransport),
}

/// Builds a node's transport: given the transport settings, the listen address and the
/// node's arena as a registered region.
type BuildTransport =
    dyn Fn(TransportConfig, &str, Region) -> std::io::Result<Box<dyn Transport>> + Send + Sync;

/// A caller-supplied transport constructor (see [`TransportChoice::Custom`]).
#[derive(Clone)]
pub struct CustomTransport(Arc<BuildTransport>);

impl CustomTransport {
    /// Wraps a constructor. The listen address is the transport's own to interpret; the node
    /// treats it as local (no token is required for it).
    pub fn new(
        build: impl Fn(TransportConfig, &str, Region) -> std::io::Result<Box<dyn Transport>>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        Self(Arc::new(build))
    }

    /// Builds the transport.
    pub(super) fn build(
        &self,
        cfg: TransportConfig,
        listen: &str,
        region: Region,
    ) -> std::io::Result<Box<dyn Transport>> {
        (self.0)(cfg, listen, region)
    }
}

impl std::fmt::Debug for CustomTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CustomTransport")
    }
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
        if matches!(self.transport, TransportChoice::Custom(_)) {
            return true;
        }
        self.listen
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback())
    }
}
