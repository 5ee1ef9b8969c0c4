//! The node daemon: an acceptor that does hand-shakes off the hot thread, and one event-loop
//! thread that polls every client's request ring, runs the [`Core`](crate::store::Core) and
//! writes replies. It spins for a bounded time after activity, then sleeps in `epoll` until a
//! client kicks its eventfd, a socket closes, or a parked request's deadline comes.

mod accept;
mod conn;
mod event_loop;
mod spill_thread;

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::event::{eventfd, EventfdFlags};

use crate::id::NodeId;
use crate::ring::SegmentLayout;
use crate::shm::{Arena, ArenaError, HugepageMode, MemoryFacts};
use crate::size::ByteSize;
use crate::spill::dir::{lock_dir, DirLock, LockError};
use crate::store::SpillPolicy;

/// Which I/O engine writes spill files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SpillEngine {
    /// io_uring, several operations in flight.
    #[default]
    Uring,
    /// pread/pwrite, one at a time (the reference).
    Plain,
}

/// How a node spills.
#[derive(Clone, Debug)]
pub struct SpillConfig {
    /// Directories to spill into (one file stream each, written in parallel). Each belongs
    /// to this node alone while it runs (a lock file in it says so; a node finding another
    /// live node's lock refuses to start), and spill files left in it are removed at start.
    pub dirs: Vec<PathBuf>,
    /// Watermarks.
    pub policy: SpillPolicy,
    /// I/O engine.
    pub engine: SpillEngine,
    /// io_uring operations in flight.
    pub queue_depth: u32,
    /// Size at which a spill file is closed and a new one started.
    pub file_size: u64,
}

impl SpillConfig {
    /// Defaults spilling into `dirs`.
    pub fn new(dirs: Vec<PathBuf>) -> Self {
        Self {
            dirs,
            policy: SpillPolicy::default(),
            engine: SpillEngine::Uring,
            queue_depth: 8,
            file_size: 64 << 20,
        }
    }
}

/// Default inline threshold for single-message puts.
pub const DEFAULT_INLINE_THRESHOLD: u64 = 64 << 10;
/// Default spin time after activity.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(100);

/// How to run a node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Where to listen for clients.
    pub socket: PathBuf,
    /// Arena size; `None` picks the default (30% of RAM, capped by what can back it).
    pub memory: Option<u64>,
    /// Hugepage policy.
    pub hugepages: HugepageMode,
    /// Largest object `put` sends inline.
    pub inline_threshold: u64,
    /// How long the event loop spins after activity before sleeping.
    pub spin: Duration,
    /// Permission bits of the socket file.
    pub socket_mode: u32,
    /// Ring sizes per client.
    pub segment: SegmentLayout,
    /// Most clients at once.
    pub max_clients: usize,
    /// Most parked (waiting) requests per client.
    pub max_pending_per_client: usize,
    /// Spill to disk under memory pressure; `None` evicts least recently used objects
    /// instead (the library default; the `ferroplasma node` command spills by default).
    pub spill: Option<SpillConfig>,
    /// Take part in a cluster; `None` runs a single node.
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

impl NodeConfig {
    /// Defaults with the given socket path.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            memory: None,
            hugepages: HugepageMode::Auto,
            inline_threshold: DEFAULT_INLINE_THRESHOLD,
            spin: DEFAULT_SPIN,
            socket_mode: 0o600,
            segment: SegmentLayout::default(),
            max_clients: 1024,
            max_pending_per_client: 256,
            spill: None,
            cluster: None,
        }
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The arena could not be created.
    #[error(transparent)]
    Arena(#[from] ArenaError),
    /// Another daemon answers on the socket.
    #[error("a node is already listening on {0}")]
    AlreadyRunning(PathBuf),
    /// Socket setup failed.
    #[error("cannot listen on {path}: {source}")]
    Socket {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Another running node holds a spill directory.
    #[error(
        "spill directory {} is in use by a running node ({holder}); give each node its own --spill-dir",
        dir.display()
    )]
    SpillDirLocked {
        /// The directory.
        dir: PathBuf,
        /// Who holds it: `pid N, socket PATH`.
        holder: String,
    },
    /// A spill directory is unusable.
    #[error("spill directory {dir}: {source}")]
    Spill {
        /// The directory.
        dir: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The cluster settings are refused (a short token, keyed checksums without one).
    #[error(transparent)]
    ClusterConfig(#[from] crate::cluster::ConfigError),
    /// Refusing to listen for peers beyond loopback without a token.
    #[error(
        "refusing to listen for peers on {addr} without a cluster token: give one with --token-file FILE or FERROPLASMA_TOKEN (or accept the risk with --insecure)"
    )]
    Insecure {
        /// The address.
        addr: String,
    },
    /// The cluster transport could not start.
    #[error("cannot listen for peers on {addr}: {source}")]
    Cluster {
        /// The address.
        addr: String,
        /// The error.
        source: std::io::Error,
    },
    /// Thread or eventfd creation failed.
    #[error("cannot start the event loop: {0}")]
    Runtime(std::io::Error),
    /// The reply ring cannot hold the largest reply twice over.
    #[error("reply ring of {capacity} is too small: at least {min}")]
    ReplyRingTooSmall {
        /// Configured.
        capacity: ByteSize,
        /// Needed.
        min: ByteSize,
    },
    /// The inline threshold does not fit a ring record.
    #[error("inline threshold {threshold} exceeds what a request ring record can carry ({max})")]
    InlineTooLarge {
        /// Asked for.
        threshold: ByteSize,
        /// Limit.
        max: ByteSize,
    },
}

/// What a started node reports.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    /// The socket path.
    pub socket: PathBuf,
    /// This node's id (the owner field of the ids it mints).
    pub node_id: NodeId,
    /// Arena size.
    pub arena_bytes: u64,
    /// Whether hugepages back the arena.
    pub hugepages: bool,
    /// Where peers reach this node, when it is in a cluster.
    pub peer_addr: Option<String>,
    /// The node-to-node transport, when in a cluster.
    pub transport: Option<&'static str>,
}

/// A running node daemon. Dropping it shuts it down.
#[derive(Debug)]
pub struct Node {
    info: NodeInfo,
    wake: Arc<OwnedFd>,
    shutdown: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Held while the node runs; dropped after the event loop (and the spill thread, which
    /// removes the node's spill files) has ended.
    _spill_locks: Vec<DirLock>,
}

fn random_node_id() -> NodeId {
    let mut b = [0u8; 8];
    if rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        b = (t.as_secs()
            ^ u64::from(t.subsec_nanos())
            ^ u64::from(std::process::id()).rotate_left(40))
        .to_le_bytes();
    }
    NodeId(u64::from_le_bytes(b).max(1))
}

fn bind(path: &Path, mode: u32) -> Result<UnixListener, StartError> {
    let err = |source| StartError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(err)?;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
    }
    if path.exists() {
        if alive(path) {
            return Err(StartError::AlreadyRunning(path.to_path_buf()));
        }
        // A stale socket from a node that died: nobody answers, so take it over.
        std::fs::remove_file(path).map_err(err)?;
    }
    let l = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    l.set_nonblocking(true).map_err(err)?;
    Ok(l)
}

/// Whether a node answers on `socket`.
fn alive(socket: &Path) -> bool {
    socket.exists() && UnixStream::connect(socket).is_ok()
}

/// Locks every spill directory (or fails naming the node that holds one), then removes the
/// spill files of an earlier run from them.
fn lock_spill_dirs(dirs: &[PathBuf], socket: &Path) -> Result<Vec<DirLock>, StartError> {
    if dirs.is_empty() {
        return Err(StartError::Spill {
            dir: PathBuf::new(),
            source: std::io::Error::other("spilling is on but no directory is given"),
        });
    }
    let mut locks = Vec::with_capacity(dirs.len());
    for dir in dirs {
        // The same directory named twice is one directory: its lock is ours already.
        if locks.iter().any(|l: &DirLock| same_dir(l.dir(), dir)) {
            continue;
        }
        locks.push(lock_dir(dir, socket).map_err(|e| match e {
            LockError::Held { dir, holder } => StartError::SpillDirLocked { dir, holder },
            LockError::Io { dir, source } => StartError::Spill { dir, source },
        })?);
    }
    for dir in dirs {
        let removed = crate::spill::worker::clean_dir(dir).map_err(|source| StartError::Spill {
            dir: dir.clone(),
            source,
        })?;
        if removed > 0 {
            tracing::info!(dir = %dir.display(), removed, "removed spill files of an earlier run");
        }
    }
    Ok(locks)
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

impl Node {
    /// Creates the arena, binds the socket and starts serving.
    pub fn start(cfg: NodeConfig) -> Result<Self, StartError> {
        let max_inline = cfg.segment.req_capacity / 2 - 8 - 64;
        if cfg.inline_threshold > max_inline {
            return Err(StartError::InlineTooLarge {
                threshold: ByteSize(cfg.inline_threshold),
                max: ByteSize(max_inline),
            });
        }
        let min_reply = conn::REPLY_RESERVE.next_power_of_two();
        if cfg.segment.rep_capacity < min_reply {
            return Err(StartError::ReplyRingTooSmall {
                capacity: ByteSize(cfg.segment.rep_capacity),
                min: ByteSize(min_reply),
            });
        }
        let facts = MemoryFacts::read();
        let size = cfg.memory.unwrap_or_else(|| facts.default_arena_size());
        if let Some(cc) = &cfg.cluster {
            cc.validate()?;
            if cc.token.is_empty() && !cc.insecure && !cc.listen_is_loopback() {
                return Err(StartError::Insecure {
                    addr: cc.listen.clone(),
                });
            }
        }
        // Nothing on disk is touched before we know we are the only node here: first a live
        // node on our socket, then a live node in any of our spill directories (their locks),
        // and only then are the spill files of an earlier run removed.
        if alive(&cfg.socket) {
            return Err(StartError::AlreadyRunning(cfg.socket.clone()));
        }
        let spill_locks = match &cfg.spill {
            None => Vec::new(),
            Some(sc) => lock_spill_dirs(&sc.dirs, &cfg.socket)?,
        };
        let arena = Arena::create_with(size, cfg.hugepages, &facts)?;
        let listener = bind(&cfg.socket, cfg.socket_mode)?;
        let node_id = random_node_id();
        let hugepages = arena.hugepages();
        let arena = Arc::new(arena.into_mapping());
        let wake = Arc::new(
            eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
                .map_err(|e| StartError::Runtime(e.into()))?,
        );
        let cluster = match &cfg.cluster {
            None => None,
            Some(cc) => {
                let h = crate::cluster::start(
                    cc,
                    node_id,
                    arena.clone(),
                    hugepages,
                    cfg.inline_threshold,
                )
                .map_err(|source| StartError::Cluster {
                    addr: cc.listen.clone(),
                    source,
                })?;
                Some(h)
            }
        };
        let info = NodeInfo {
            socket: cfg.socket.clone(),
            node_id,
            arena_bytes: arena.len() as u64,
            hugepages,
            peer_addr: cluster.as_ref().map(|c| c.addr.clone()),
            transport: cluster.as_ref().map(|c| c.transport),
        };
        let shutdown = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let el = event_loop::EventLoop::new(
            cfg,
            node_id,
            arena,
            hugepages,
            listener,
            wake.clone(),
            shutdown.clone(),
            cluster,
        )
        .map_err(StartError::Runtime)?;
        let thread = std::thread::Builder::new()
            .name("fp-event-loop".into())
            .spawn(move || el.run())
            .map_err(StartError::Runtime)?;
        Ok(Self {
            info,
            wake,
            shutdown,
            thread: Some(thread),
            _spill_locks: spill_locks,
        })
    }

    /// What the node reports about itself.
    pub fn info(&self) -> &NodeInfo {
        &self.info
    }

    /// Blocks until the node stops (it stops only on [`Node::shutdown`] from another handle
    /// or a fatal error).
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// A cheap handle that can stop the node from another thread (e.g. a signal handler
    /// thread).
    pub fn stopper(&self) -> Stopper {
        Stopper {
            wake: self.wake.clone(),
            shutdown: self.shutdown.clone(),
        }
    }

    /// Stops serving, disconnects clients and removes the socket file.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.stopper().stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stops a node from anywhere.
#[derive(Clone, Debug)]
pub struct Stopper {
    wake: Arc<OwnedFd>,
    shutdown: Arc<std::sync::atomic::AtomicBool>,
}

impl Stopper {
    /// Asks the node to stop; returns at once.
    pub fn stop(&self) {
        self.shutdown
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = rustix::io::write(self.wake.as_fd(), &1u64.to_ne_bytes());
    }
}
