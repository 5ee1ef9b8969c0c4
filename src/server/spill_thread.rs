//! The spill thread as the event loop sees it: started with the node's disk engine, fed jobs
//! through a channel, answering through a lock-free queue plus the wake eventfd.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_queue::SegQueue;

use super::{SpillConfig, SpillEngine};
use crate::id::NodeId;
use crate::shm::SharedMapping;
use crate::spill::worker::{Done, Job, SpillWorker};
use crate::store::Core;

pub(super) struct SpillThread {
    pub(super) jobs: std::sync::mpsc::Sender<Job>,
    pub(super) done: Arc<SegQueue<Done>>,
    pub(super) thread: std::thread::JoinHandle<()>,
}

impl SpillThread {
    /// Opens the disk engine (io_uring with the arena registered, or pread/pwrite where
    /// io_uring is forbidden), tells the core which one runs, and starts the thread.
    pub(super) fn start(
        sc: &SpillConfig,
        arena: &Arc<SharedMapping>,
        node_id: NodeId,
        wake: &Arc<OwnedFd>,
        core: &mut Core<Arc<SharedMapping>>,
    ) -> io::Result<Self> {
        let io: Box<dyn crate::spill::SpillIo + Send> = match sc.engine {
            SpillEngine::Uring => match crate::spill::UringIo::new(sc.queue_depth) {
                Ok(mut u) => {
                    let started = Instant::now();
                    // SAFETY: the engine goes into the spill worker, which also holds
                    // an Arc of the arena mapping and drops the engine first (field
                    // order), so the arena stays mapped while it is registered.
                    match unsafe { u.register_region(arena.as_ptr(), arena.len()) } {
                        Ok(()) => tracing::info!(
                            ms = started.elapsed().as_millis(),
                            "arena registered as io_uring fixed buffers"
                        ),
                        Err(e) => tracing::warn!(
                            error = %e,
                            "cannot register the arena as io_uring fixed buffers; spilling without"
                        ),
                    }
                    Box::new(u)
                }
                // Containers and hardened kernels may forbid io_uring.
                Err(e) if io_uring_forbidden(&e) => {
                    tracing::warn!(error = %e, "io_uring is not available; spilling with pread/pwrite");
                    Box::new(crate::spill::PlainIo)
                }
                Err(e) => return Err(e),
            },
            SpillEngine::Plain => Box::new(crate::spill::PlainIo),
        };
        core.set_spill_engine(io.engine());
        let worker = SpillWorker::new(io, arena.clone(), node_id, sc.dirs.clone(), sc.file_size);
        let (tx, rx) = std::sync::mpsc::channel();
        let done = Arc::new(SegQueue::new());
        let (done2, wake2) = (done.clone(), wake.clone());
        let thread = std::thread::Builder::new()
            .name("fp-spill".into())
            .spawn(move || {
                worker.run(rx, done2, move || {
                    let _ = rustix::io::write(wake2.as_fd(), &1u64.to_ne_bytes());
                });
            })?;
        Ok(Self {
            jobs: tx,
            done,
            thread,
        })
    }
}

fn io_uring_forbidden(e: &io::Error) -> bool {
    use rustix::io::Errno;
    [Errno::NOSYS, Errno::PERM]
        .map(Errno::raw_os_error)
        .iter()
        .any(|&c| e.raw_os_error() == Some(c))
}
