//! The flags of `ferroplasma-bench transfer` and the node switches they pass through to
//! `ferroplasma node` (`--netns`, `--transport`, `--checksums`, `--zero-copy`).

use std::net::SocketAddr;
use std::path::PathBuf;

use ferroplasma::ByteSize;

/// Whether the nodes run in network namespaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NetnsMode {
    /// On when running as root with `ip` available, else loopback.
    Auto,
    /// Two namespaces joined by a veth pair (root only).
    On,
    /// Both nodes on 127.0.0.1.
    Off,
}

/// A node switch passed through to `ferroplasma node`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

impl OnOff {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::On => "on",
            Self::Off => "off",
        }
    }
}

/// `--checksums` of the nodes started here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ChecksumArg {
    /// xxh3 per chunk.
    On,
    /// None.
    Off,
    /// A keyed MAC (BLAKE3 under the session key) per chunk.
    Keyed,
}

impl ChecksumArg {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::On => "on",
            Self::Off => "off",
            Self::Keyed => "keyed",
        }
    }
}

/// Flags of `ferroplasma-bench transfer`.
#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object on stdout (progress goes to stderr either way)
    #[arg(long)]
    pub(super) json: bool,
    /// Object sizes, comma-separated
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1MiB,16MiB,64MiB,256MiB,1GiB,4GiB"
    )]
    pub(super) sizes: Vec<ByteSize>,
    /// Transfers per size (and raw TCP runs); medians are reported
    #[arg(long, default_value_t = 3)]
    pub(super) runs: usize,
    /// Use two running nodes, given by their Unix sockets: A owns the objects, B reads them
    #[arg(long, value_delimiter = ',', value_name = "A,B")]
    pub(super) nodes: Vec<PathBuf>,
    /// With --nodes: address for the raw TCP baseline's receiver (sender and receiver run in
    /// this namespace); without it the baseline is skipped
    #[arg(long, value_name = "IP:PORT")]
    pub(super) raw_addr: Option<SocketAddr>,
    /// Bytes the raw TCP baseline moves per run [default: the largest size up to 1GiB]
    #[arg(long, value_name = "SIZE")]
    pub(super) raw_bytes: Option<ByteSize>,
    /// Write an SVG chart of bandwidth against object size
    #[arg(long, value_name = "FILE.svg")]
    pub(super) plot: Option<PathBuf>,
    /// Token file for the nodes started here [default: a fresh random token, mode 0600]
    #[arg(long, value_name = "FILE")]
    pub(super) token_file: Option<PathBuf>,
    /// Arena of each node started here [default: 2 x the largest size + 256MiB, capped by
    /// MemAvailable]; sizes that do not fit are skipped
    #[arg(long, value_name = "SIZE")]
    pub(super) memory: Option<ByteSize>,
    /// Run the nodes in two network namespaces joined by a veth pair
    #[arg(long, value_enum, default_value_t = NetnsMode::Auto)]
    pub(super) netns: NetnsMode,
    /// Objects per run for the small remote get latency
    #[arg(long, default_value_t = 200)]
    pub(super) small_objects: usize,
    /// Size of those objects
    #[arg(long, default_value = "64KiB")]
    pub(super) small_size: ByteSize,
    /// Per-chunk checksums between the nodes started here (their `--checksums`)
    #[arg(long, value_enum, default_value_t = ChecksumArg::On)]
    pub(super) checksums: ChecksumArg,
    /// Zero-copy sends between the nodes started here (their `--zero-copy`)
    #[arg(long, value_enum, default_value_t = OnOff::Off)]
    pub(super) zero_copy: OnOff,
    /// The `ferroplasma` binary that runs the nodes (and `stat`) [default: next to this binary]
    #[arg(long, value_name = "PATH")]
    pub(super) ferroplasma: Option<PathBuf>,
    /// Measure only the raw TCP baseline (namespaces or loopback as --netns says); no nodes
    #[arg(long, conflicts_with = "nodes")]
    pub(super) raw_only: bool,
    /// How the nodes started here move object bytes (their `--transport`). With rdma the
    /// bench fails unless B reaches A over RDMA, and the baseline is perftest's ib_read_bw;
    /// rdma and auto run the nodes without namespaces, on $FERROPLASMA_RDMA_ADDR (else
    /// 127.0.0.1)
    #[arg(long, value_enum, default_value_t = TransportArg::Tcp)]
    pub(super) transport: TransportArg,
    /// RDMA device of the nodes started here (their `--rdma-device`) [default: theirs]
    #[arg(long, value_name = "NAME")]
    pub(super) rdma_device: Option<String>,
    /// GID index of the nodes started here (their `--rdma-gid-index`) [default: theirs]
    #[arg(long, value_name = "N")]
    pub(super) rdma_gid_index: Option<u32>,
    /// Message size of the ib_read_bw baseline
    #[arg(long, value_name = "SIZE", default_value = "1MiB")]
    pub(super) raw_rdma_message: ByteSize,
    /// Silence after which the nodes started here declare each other dead (their
    /// `--dead-after-ms`) [default: theirs]
    #[arg(long, value_name = "MS")]
    pub(super) dead_after_ms: Option<u64>,
    /// Bytes per ib_read_bw baseline run, in messages of --raw-rdma-message (its `-n`)
    /// [default: as --raw-bytes]
    #[arg(long, value_name = "SIZE")]
    pub(super) raw_rdma_bytes: Option<ByteSize>,
}

/// `--transport` of the nodes started here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportArg {
    /// RDMA where both nodes can, TCP otherwise.
    Auto,
    /// RDMA only.
    Rdma,
    /// TCP only.
    Tcp,
}

impl TransportArg {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Rdma => "rdma",
            Self::Tcp => "tcp",
        }
    }
}
