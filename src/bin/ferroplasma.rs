//! `ferroplasma`: run a node daemon, or talk to one (put, get, ls, stat, delete).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use ferroplasma::client::{Client, ClientOptions};
use ferroplasma::cluster::{ChecksumMode, ClusterConfig, TransportChoice, DEFAULT_PORT};
use ferroplasma::protocol::ObjectState;
use ferroplasma::server::{Node, NodeConfig, SpillConfig, SpillEngine, DEFAULT_INLINE_THRESHOLD};
use ferroplasma::store::SpillPolicy;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

/// `--checksums`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ChecksumFlag {
    On,
    Off,
    Keyed,
}
/// `--transport`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum TransportFlag {
    /// RDMA to each peer where both ends can, TCP otherwise (decided per peer, logged)
    Auto,
    /// RDMA only: refuse to start without a usable device, refuse peers without RDMA
    Rdma,
    /// TCP only
    Tcp,
}
use ferroplasma::shm::HugepageMode;
use ferroplasma::{ByteSize, ObjectId};

#[derive(Parser)]
#[command(
    name = "ferroplasma",
    version,
    about = "Shared-memory object store node and admin CLI"
)]
struct Cli {
    /// Node socket [default: $FERROPLASMA_SOCKET, else <runtime dir>/node.sock]
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node daemon in the foreground.
    Node {
        /// Arena size, e.g. 2GiB [default: 30% of RAM, capped by what hugepages or /dev/shm can back]
        #[arg(long, value_name = "SIZE")]
        memory: Option<ByteSize>,
        /// Use 2 MiB hugepages: auto (if enough are free), on (or fail), off
        #[arg(long, value_enum, default_value_t = HugepageMode::Auto)]
        hugepages: HugepageMode,
        /// Largest object a client puts in one message
        #[arg(long, value_name = "SIZE", default_value_t = ByteSize(DEFAULT_INLINE_THRESHOLD))]
        inline_threshold: ByteSize,
        /// How long the event loop spins after activity before sleeping, in microseconds
        #[arg(long, value_name = "US", default_value_t = 100)]
        spin_us: u64,
        /// Permission bits of the socket file (octal)
        #[arg(long, value_name = "MODE", default_value = "600")]
        socket_mode: String,
        /// Most clients connected at once (further connections wait)
        #[arg(long, value_name = "N", default_value_t = 1024)]
        max_clients: usize,
        /// Spill objects to disk under memory pressure (off: evict least recently used)
        #[arg(long, value_enum, default_value_t = OnOff::On)]
        spill: OnOff,
        /// Spill directory; repeat for several drives, written in parallel [default:
        /// /var/tmp/ferroplasma-$UID/<socket name>.spill]. Spill files found there at start
        /// are removed; a directory a running node uses (its lock file) is refused.
        #[arg(long = "spill-dir", value_name = "DIR")]
        spill_dirs: Vec<PathBuf>,
        /// Spilling I/O engine
        #[arg(long, value_enum, default_value_t = SpillEngine::Uring)]
        spill_engine: SpillEngine,
        /// io_uring operations in flight while spilling
        #[arg(long, value_name = "N", default_value_t = 8)]
        spill_queue_depth: u32,
        /// Start spilling when arena use passes this fraction
        #[arg(long, value_name = "FRACTION", default_value_t = 0.8)]
        spill_high_watermark: f64,
        /// Spill down to this fraction
        #[arg(long, value_name = "FRACTION", default_value_t = 0.6)]
        spill_low_watermark: f64,
        #[command(flatten)]
        cluster: ClusterFlags,
    },
    /// Store a file (or stdin with `-`) as a sealed object and print its id.
    Put {
        /// The file
        file: PathBuf,
        /// Use this id (48 hex digits; its owner must be this node) instead of a fresh one
        #[arg(long)]
        id: Option<ObjectId>,
        /// Store this file as the object's metadata
        #[arg(long, value_name = "FILE")]
        metadata: Option<PathBuf>,
    },
    /// Write an object's data to a file or stdout.
    Get {
        /// The object id (48 hex digits)
        id: ObjectId,
        /// Output file [default: stdout]
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// How long to wait for the object to be sealed, in milliseconds
        #[arg(long, default_value_t = 0)]
        timeout_ms: u64,
        /// Write the metadata instead of the data
        #[arg(long)]
        metadata: bool,
    },
    /// List objects.
    Ls,
    /// Show node figures.
    Stat {
        /// Print one JSON object
        #[arg(long)]
        json: bool,
    },
    /// Delete objects.
    Delete {
        /// Object ids
        #[arg(required = true)]
        ids: Vec<ObjectId>,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let socket = cli
        .socket
        .unwrap_or_else(ferroplasma::config::default_socket_path);
    match cli.cmd {
        Cmd::Node {
            memory,
            hugepages,
            inline_threshold,
            spin_us,
            socket_mode,
            max_clients,
            spill,
            spill_dirs,
            spill_engine,
            spill_queue_depth,
            spill_high_watermark,
            spill_low_watermark,
            cluster,
        } => {
            let cluster = cluster.config()?;
            let spill = (spill == OnOff::On)
                .then(|| -> Result<SpillConfig> {
                    let dirs = if spill_dirs.is_empty() {
                        vec![ferroplasma::config::default_spill_dir(&socket)]
                    } else {
                        spill_dirs
                    };
                    if !(0.0..=1.0).contains(&spill_low_watermark)
                        || !(spill_low_watermark..=1.0).contains(&spill_high_watermark)
                    {
                        bail!("watermarks must satisfy 0 <= low <= high <= 1");
                    }
                    let mut sc = SpillConfig::new(dirs);
                    sc.engine = spill_engine;
                    sc.queue_depth = spill_queue_depth;
                    sc.policy = SpillPolicy {
                        high_watermark: spill_high_watermark,
                        low_watermark: spill_low_watermark,
                    };
                    Ok(sc)
                })
                .transpose()?;
            run_node(
                socket,
                NodeFlags {
                    memory,
                    hugepages,
                    inline_threshold,
                    spin_us,
                    max_clients,
                    spill,
                    cluster,
                },
                &socket_mode,
            )
        }
        Cmd::Put { file, id, metadata } => {
            let c = connect(&socket)?;
            let data = read_input(&file)?;
            let meta = match metadata {
                Some(m) => read_input(&m)?,
                None => Vec::new(),
            };
            let id = id.unwrap_or_else(|| c.new_id());
            c.put_with(id, &data, &meta)
                .with_context(|| format!("put {}", file.display()))?;
            println!("{id}");
            Ok(())
        }
        Cmd::Get {
            id,
            output,
            timeout_ms,
            metadata,
        } => {
            let c = connect(&socket)?;
            let views = c.get(&[id], Duration::from_millis(timeout_ms))?;
            let bytes = if metadata {
                views[0].metadata()
            } else {
                views[0].data()
            };
            match output {
                Some(p) => {
                    std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?
                }
                None => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(bytes)?;
                    out.flush()?;
                }
            }
            Ok(())
        }
        Cmd::Ls => {
            let c = connect(&socket)?;
            let entries = c.list()?;
            println!(
                "{:<48}  {:<7}  {:>14}  {:>10}  {:>4}",
                "ID", "STATE", "DATA", "META", "PINS"
            );
            for e in entries {
                let state = match e.state {
                    ObjectState::Created => "created",
                    ObjectState::Sealed => "sealed",
                    ObjectState::Spilled => "spilled",
                };
                println!(
                    "{:<48}  {:<7}  {:>14}  {:>10}  {:>4}",
                    e.id, state, e.data_size, e.meta_size, e.pins
                );
            }
            Ok(())
        }
        Cmd::Stat { json } => {
            let c = connect(&socket)?;
            let s = c.stats()?;
            let v = c.nodes()?;
            let nodes_json: Vec<String> = v
                .members
                .iter()
                .map(|m| {
                    format!(
                        "{{\"node_id\":\"{}\",\"addr\":{},\"state\":\"{}\",\"head\":{},\"this\":{},\"transport\":{},\"transport_reason\":{}}}",
                        m.node_id,
                        json_str(&m.addr),
                        if m.alive { "alive" } else { "dead" },
                        m.head,
                        m.this,
                        json_str(&m.transport),
                        json_str(&m.transport_reason)
                    )
                })
                .collect();
            if json {
                let status_json: Vec<String> = v
                    .status
                    .iter()
                    .map(|(k, val)| format!("{}:{}", json_str(k), json_str(val)))
                    .collect();
                print!(
                    "{{\"transport\":{},\"transport_status\":{{{}}},\"epoch\":{},\"nodes\":[{}],",
                    json_str(&v.transport),
                    status_json.join(","),
                    v.epoch,
                    nodes_json.join(",")
                );
                println!(
                    "\"node_id\":\"{}\",\"arena_bytes\":{},\"used_bytes\":{},\"largest_free_bytes\":{},\
                     \"objects\":{},\"sealed\":{},\"pinned_objects\":{},\"pins\":{},\"clients\":{},\
                     \"hugepages\":{},\"evictions\":{},\"creates_waiting\":{},\"gets_waiting\":{},\"deferred_frees\":{},\"spilled_objects\":{},\"spilled_bytes\":{},\"spills\":{},\"restores\":{},\"spill_disk_full\":{},\"spill_paused\":{},\"corrupted\":{},\"spill_engine\":\"{}\"}}",
                    s.node_id,
                    s.arena_bytes,
                    s.used_bytes,
                    s.largest_free,
                    s.objects,
                    s.sealed,
                    s.pinned_objects,
                    s.pins,
                    s.clients,
                    s.hugepages,
                    s.evictions,
                    s.creates_waiting,
                    s.gets_waiting,
                    s.deferred_frees,
                    s.spilled_objects,
                    s.spilled_bytes,
                    s.spills,
                    s.restores,
                    s.spill_disk_full,
                    s.spill_paused,
                    s.corrupted,
                    s.spill_engine
                );
            } else {
                println!("node:            {}", s.node_id);
                if !v.transport.is_empty() {
                    println!(
                        "cluster:         {} transport, epoch {}",
                        v.transport, v.epoch
                    );
                    for (k, val) in &v.status {
                        println!("  {k}: {val}");
                    }
                    for m in &v.members {
                        println!(
                            "  {} {:<22} {:<5}{}{}{}",
                            m.node_id,
                            m.addr,
                            if m.alive { "alive" } else { "dead" },
                            if m.head { " head" } else { "" },
                            if m.this { " (this node)" } else { "" },
                            if m.transport.is_empty() {
                                String::new()
                            } else {
                                format!(" via {}: {}", m.transport, m.transport_reason)
                            }
                        );
                    }
                }
                println!("socket:          {}", socket.display());
                println!(
                    "arena:           {} ({} bytes)",
                    ByteSize(s.arena_bytes),
                    s.arena_bytes
                );
                println!(
                    "used:            {} ({} bytes)",
                    ByteSize(s.used_bytes),
                    s.used_bytes
                );
                println!("largest free:    {}", ByteSize(s.largest_free));
                println!("objects:         {} ({} sealed)", s.objects, s.sealed);
                println!(
                    "pins:            {} on {} objects",
                    s.pins, s.pinned_objects
                );
                println!("clients:         {} (this one included)", s.clients);
                println!(
                    "hugepages:       {}",
                    if s.hugepages { "yes" } else { "no" }
                );
                println!("evictions:       {}", s.evictions);
                println!("creates waiting: {}", s.creates_waiting);
                println!("gets waiting:    {}", s.gets_waiting);
                println!("deferred frees:  {}", s.deferred_frees);
                println!("spill engine:    {}", s.spill_engine);
                println!(
                    "spilled:         {} objects, {} on disk ({} spills, {} restores)",
                    s.spilled_objects,
                    ByteSize(s.spilled_bytes),
                    s.spills,
                    s.restores
                );
                println!(
                    "spill problems:  {} disk-full, {} corrupted{}",
                    s.spill_disk_full,
                    s.corrupted,
                    if s.spill_paused {
                        ", spilling paused"
                    } else {
                        ""
                    }
                );
            }
            Ok(())
        }
        Cmd::Delete { ids } => {
            let c = connect(&socket)?;
            let st = c.delete(&ids)?;
            let mut missing = 0;
            for (id, s) in ids.iter().zip(st) {
                println!("{id} {s:?}");
                if s != ferroplasma::protocol::DeleteStatus::Deleted
                    && s != ferroplasma::protocol::DeleteStatus::Deferred
                {
                    missing += 1;
                }
            }
            if missing > 0 {
                bail!("{missing} object(s) not deleted");
            }
            Ok(())
        }
    }
}

fn connect(socket: &std::path::Path) -> Result<Client> {
    // Admin commands are short-lived: do not spin.
    let opts = ClientOptions {
        spin: Duration::from_micros(20),
        ..ClientOptions::default()
    };
    Ok(Client::connect_with(socket, opts)?)
}

fn read_input(p: &std::path::Path) -> Result<Vec<u8>> {
    if p.as_os_str() == "-" {
        let mut v = Vec::new();
        std::io::stdin().lock().read_to_end(&mut v)?;
        return Ok(v);
    }
    std::fs::read(p).with_context(|| format!("reading {}", p.display()))
}

struct NodeFlags {
    memory: Option<ByteSize>,
    hugepages: HugepageMode,
    inline_threshold: ByteSize,
    spin_us: u64,
    max_clients: usize,
    spill: Option<SpillConfig>,
    cluster: Option<ClusterConfig>,
}

/// Cluster flags of `ferroplasma node`.
#[derive(clap::Args)]
struct ClusterFlags {
    /// Listen for peer nodes on ADDR (ip[:port], port 7420 by default). A node started with
    /// --listen and without --join is the head of a new cluster.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Join the cluster whose head listens on ADDR (ip:port). Without --listen the node
    /// listens on 127.0.0.1 on a free port.
    #[arg(long, value_name = "ADDR")]
    join: Option<String>,
    /// File holding the cluster token [default: $FERROPLASMA_TOKEN], at least 16 bytes (make
    /// one with `head -c 32 /dev/urandom | base64`). Required to listen on a non-loopback
    /// address unless --insecure, and for --checksums keyed.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Allow listening beyond loopback without a token (anyone who can connect can read
    /// every object)
    #[arg(long)]
    insecure: bool,
    /// Heartbeat interval, in milliseconds
    #[arg(long, value_name = "MS", default_value_t = 500)]
    heartbeat_ms: u64,
    /// Silence after which a node is declared dead, in milliseconds
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    dead_after_ms: u64,
    /// Per-chunk checks on object data between nodes: on (xxh3: catches corruption), off, or
    /// keyed (a MAC under the connection's session key: catches tampering on the path too;
    /// needs a token)
    #[arg(long, value_enum, default_value_t = ChecksumFlag::On)]
    checksums: ChecksumFlag,
    /// Data chunk size between nodes
    #[arg(long, value_name = "SIZE", default_value_t = ByteSize(4 << 20))]
    chunk: ByteSize,
    /// Zero-copy sends (io_uring SEND_ZC) for object data
    #[arg(long, value_enum, default_value_t = OnOff::Off)]
    zero_copy: OnOff,
    /// How object bytes move between nodes (docs/rdma.md)
    #[arg(long, value_enum, default_value_t = TransportFlag::Auto)]
    transport: TransportFlag,
    /// RDMA device to use [default: the first with an active port]
    #[arg(long, value_name = "NAME")]
    rdma_device: Option<String>,
    /// GID index to use [default: the RoCE v2 GID whose address is the --listen address,
    /// else the first RoCE v2 GID]
    #[arg(long, value_name = "N")]
    rdma_gid_index: Option<u32>,
    /// RC queue pairs per RDMA peer
    #[arg(long, value_name = "N", default_value_t = ferroplasma_transport_rdma::DEFAULT_QPS)]
    rdma_qps: usize,
    /// Enforce grants in the NIC with memory windows where the device has them (off: the
    /// arena is readable by authenticated peers at any offset; see docs/rdma.md)
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    rdma_windows: OnOff,
}

impl ClusterFlags {
    fn config(self) -> Result<Option<ClusterConfig>> {
        if self.listen.is_none() && self.join.is_none() {
            return Ok(None);
        }
        let listen = match self.listen {
            Some(l) if l.contains(':') => l,
            Some(ip) => format!("{ip}:{DEFAULT_PORT}"),
            None => "127.0.0.1:0".to_string(),
        };
        let mut cc = ClusterConfig::new(listen);
        cc.join = self.join;
        cc.token = match self.token_file {
            Some(f) => {
                let t = std::fs::read(&f)
                    .with_context(|| format!("reading the token file {}", f.display()))?;
                let t = t.trim_ascii().to_vec();
                if t.is_empty() {
                    bail!("the token file {} is empty", f.display());
                }
                t
            }
            None => std::env::var("FERROPLASMA_TOKEN")
                .map(|t| t.trim().as_bytes().to_vec())
                .unwrap_or_default(),
        };
        cc.insecure = self.insecure;
        cc.heartbeat = Duration::from_millis(self.heartbeat_ms.max(10));
        cc.dead_after = Duration::from_millis(self.dead_after_ms.max(self.heartbeat_ms * 2));
        cc.checksums = match self.checksums {
            ChecksumFlag::On => ChecksumMode::On,
            ChecksumFlag::Off => ChecksumMode::Off,
            ChecksumFlag::Keyed => ChecksumMode::Keyed,
        };
        cc.chunk = u32::try_from(self.chunk.0.clamp(64 << 10, 64 << 20)).unwrap_or(4 << 20);
        cc.zero_copy = self.zero_copy == OnOff::On;
        cc.transport = match self.transport {
            TransportFlag::Auto => TransportChoice::Auto,
            TransportFlag::Rdma => TransportChoice::Rdma,
            TransportFlag::Tcp => TransportChoice::Tcp,
        };
        cc.rdma_device = self.rdma_device;
        cc.rdma_gid_index = self.rdma_gid_index;
        if !(1..=16).contains(&self.rdma_qps) {
            bail!("--rdma-qps must be 1 to 16, not {}", self.rdma_qps);
        }
        cc.rdma_qps = self.rdma_qps;
        cc.rdma_windows = self.rdma_windows == OnOff::On;
        Ok(Some(cc))
    }
}

fn run_node(socket: PathBuf, f: NodeFlags, socket_mode: &str) -> Result<()> {
    let mode = u32::from_str_radix(socket_mode, 8)
        .with_context(|| format!("socket mode {socket_mode:?} is not octal"))?;
    let mut cfg = NodeConfig::new(socket);
    cfg.memory = f.memory.map(|m| m.0);
    cfg.hugepages = f.hugepages;
    cfg.inline_threshold = f.inline_threshold.0;
    cfg.spin = Duration::from_micros(f.spin_us);
    cfg.socket_mode = mode;
    cfg.max_clients = f.max_clients.max(1);
    let spill_note = match &f.spill {
        Some(sc) => format!(
            "spilling to {}",
            sc.dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => "spilling off (least recently used objects are evicted)".to_string(),
    };
    cfg.spill = f.spill;
    cfg.cluster = f.cluster;
    let started = std::time::Instant::now();
    let node = Node::start(cfg)?;
    let info = node.info().clone();
    println!(
        "ferroplasma node {} listening on {}\narena {} ({} bytes), hugepages: {}, ready in {} ms",
        info.node_id,
        info.socket.display(),
        ByteSize(info.arena_bytes),
        info.arena_bytes,
        if info.hugepages {
            "yes (2 MiB)"
        } else {
            "no (4 KiB pages)"
        },
        started.elapsed().as_millis()
    );
    println!("{spill_note}");
    if let (Some(addr), Some(t)) = (&info.peer_addr, info.transport) {
        println!("peers: listening on {addr} ({t})");
    }
    std::io::stdout().flush()?;
    let stopper = node.stopper();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            tracing::info!(signal = sig, "stopping");
            stopper.stop();
        }
    });
    node.wait();
    Ok(())
}

/// A JSON string literal (quotes, backslashes and control characters escaped).
fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
