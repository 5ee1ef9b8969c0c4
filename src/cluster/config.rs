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
    /// RDMA to each peer where both ends can (a usable device here, RDMA offered there), TCP
    /// otherwise, decided per peer (`--transport auto`, the daemon's default).
    Auto,
    /// RDMA only: the node does not start without a usable device, and refuses peers that
    /// cannot do RDMA (`--transport rdma`).
    Rdma,
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
    /// Control frames and chunk headers are authenticated in every mode. A transport setting,
    /// passed through: a transport may ignore it (`mem`; see
    /// [`TransportConfig`](ferroplasma_transport::TransportConfig)).
    pub checksums: ChecksumMode,
    /// Data chunk size asked of the transport, which may clamp it (`tcp`: 1 B..64 MiB) or
    /// ignore it (`mem`); the cluster logic assumes nothing about it.
    pub chunk: u32,
    /// Zero-copy sends (`SEND_ZC`) for data chunks.
    pub zero_copy: bool,
    /// The RDMA device (`--rdma-device`); `None`: the first with an active port.
    pub rdma_device: Option<String>,
    /// The GID index (`--rdma-gid-index`); `None`: the RoCE v2 GID of the listen address.
    pub rdma_gid_index: Option<u32>,
    /// RC queue pairs per peer (`--rdma-qps`).
    pub rdma_qps: usize,
    /// Grants as memory windows where the device has them (`--rdma-windows`).
    pub rdma_windows: bool,
}

/// Default heartbeat interval.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(500);
/// Default dead-after time.
pub const DEFAULT_DEAD_AFTER: Duration = Duration::from_secs(5);
/// Default peer port.
pub const DEFAULT_PORT: u16 = 7420;
/// Shortest cluster token a node accepts. Each initiator sends an HMAC of the token over
/// bytes its receiver knows to whoever answers at the address it dials, so anyone there (or
/// on the path) can test guesses offline; only a token with enough entropy makes that
/// hopeless. `head -c 32 /dev/urandom | base64` makes a good one.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why a cluster configuration is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The token is too short to resist offline guessing.
    #[error(
        "the cluster token is {len} bytes; at least {MIN_TOKEN_LEN} are required (a captured hand-shake lets anyone guess a short token offline): make one with `head -c 32 /dev/urandom | base64 > token` and pass --token-file token"
    )]
    TokenTooShort {
        /// Its length.
        len: usize,
    },
    /// Keyed chunk MACs asked for without a token: their keys would be derivable by anyone.
    #[error(
        "--checksums keyed needs a cluster token (a MAC under keys anyone can derive protects nothing): make one with `head -c 32 /dev/urandom | base64 > token` and pass --token-file token"
    )]
    KeyedWithoutToken,
}

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
            rdma_device: None,
            rdma_gid_index: None,
            rdma_qps: ferroplasma_transport_rdma::DEFAULT_QPS,
            rdma_windows: true,
        }
    }

    /// Checks the settings that must hold before a node starts: a token, if any, of at least
    /// [`MIN_TOKEN_LEN`] bytes, and a token whenever chunks are keyed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.token.is_empty() && self.token.len() < MIN_TOKEN_LEN {
            return Err(ConfigError::TokenTooShort {
                len: self.token.len(),
            });
        }
        if self.token.is_empty() && self.checksums == ChecksumMode::Keyed {
            return Err(ConfigError::KeyedWithoutToken);
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_tokens_and_keyed_without_token_are_refused() {
        let mut cc = ClusterConfig::new("127.0.0.1:0");
        assert_eq!(cc.validate(), Ok(()), "no token on loopback");
        cc.token = b"x".to_vec();
        assert_eq!(cc.validate(), Err(ConfigError::TokenTooShort { len: 1 }));
        cc.token = vec![b'k'; MIN_TOKEN_LEN - 1];
        let e = cc.validate().expect_err("15 bytes");
        assert!(
            e.to_string().contains("head -c 32 /dev/urandom | base64"),
            "{e}"
        );
        cc.token = vec![b'k'; MIN_TOKEN_LEN];
        assert_eq!(cc.validate(), Ok(()));
        cc.checksums = ChecksumMode::Keyed;
        assert_eq!(cc.validate(), Ok(()));
        cc.token.clear();
        assert_eq!(cc.validate(), Err(ConfigError::KeyedWithoutToken));
    }
}
