//! # ferroplasma
//!
//! The data plane of a distributed object store in the style of Ray's plasma store: a node
//! daemon owns a shared-memory arena, local clients create, seal and read immutable objects in
//! it with zero copies, and talk to the daemon over shared-memory rings.
//!
//! ```text
//!   client process                         daemon (one per node)
//!   ┌──────────────┐  Unix socket: hello, ┌────────────────────────────────────┐
//!   │ client::     │  fd passing, liveness│ server:: acceptor thread            │
//!   │  Client      │◄────────────────────►│          event loop (one thread)   │
//!   │  ObjectView  │  ring:: request ring │   protocol:: decode ─► store::Core │
//!   │  ObjectBuilder──────────────────────►│   (pure state machine: table,     │
//!   │              │◄──────────────────────   pins, LRU, waiters, allocator)   │
//!   │              │     reply ring       │                                    │
//!   └──────┬───────┘                      └─────────────┬──────────────────────┘
//!          │  mmap (read/write)   shm::Arena (memfd, hugepages)  │ mmap
//!          └───────────────────────────────────────────────────┘
//! ```
//!
//! Layers depend one way: `shm`, `ring` and `protocol` know nothing of each other's users;
//! `store` is plain logic with no I/O and imports nothing from `cluster`, `server` or the
//! spill worker (its interface to them, `store::link` and `spill::job`, is plain data);
//! `client` depends only on `shm`, `ring` and `protocol`; `server` and `client` are the I/O
//! edges.
//!
//! A node and a client in one process (normally the node is `ferroplasma node` and clients
//! connect to its default socket, [`config::default_socket_path`]):
//!
//! ```
//! use std::time::Duration;
//! use ferroplasma::client::Client;
//! use ferroplasma::server::{Node, NodeConfig};
//!
//! let socket = std::env::temp_dir().join(format!("fp-doc-{}.sock", std::process::id()));
//! let mut cfg = NodeConfig::new(&socket);
//! cfg.memory = Some(16 << 20);
//! let node = Node::start(cfg)?;
//!
//! let client = Client::connect(&socket)?;
//! // Small objects: one message.
//! let id = client.put(b"hello")?;
//! // Large objects: write in place, then seal.
//! let mut builder = client.create(1 << 20)?;
//! builder.data_mut().fill(42);
//! let big = builder.seal()?;
//!
//! let views = client.get(&[id, big], Duration::from_secs(1))?;
//! assert_eq!(&*views[0], b"hello");
//! assert!(views[1].iter().all(|&b| b == 42));
//! drop(views); // releases the pins
//! node.shutdown();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod client;
pub mod cluster;
pub mod config;
pub mod id;
pub mod protocol;
pub mod ring;
pub mod server;
pub mod shm;
pub mod size;
pub mod spill;
pub mod store;

pub use client::{Client, ObjectBuilder, ObjectView};
pub use id::{NodeId, ObjectId};
pub use size::ByteSize;
