//! Two engines for batches of positioned reads and writes: io_uring with up to `depth`
//! operations in flight, and plain `pread`/`pwrite` one at a time. Both complete short
//! transfers and report one result per operation.
//!
//! The batch API keeps io_uring safe to use: every buffer is borrowed for the whole call, and
//! the call returns only after every operation it submitted has completed, so the kernel
//! never touches memory that Rust has handed back.

use std::collections::VecDeque;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use io_uring::{opcode, types, IoUring};
use rustix::fs::{Mode, OFlags};

use crate::protocol::SpillEngineInUse;
use crate::shm::SharedMapping;

/// Memory a write takes its bytes from: a plain buffer, or a range of the shared arena
/// (which clients can write, so it is only ever reached through a raw pointer: no `&[u8]`
/// over it is made). Valid for reading for `'a`.
#[derive(Debug, Clone, Copy)]
pub struct Src<'a> {
    ptr: *const u8,
    len: usize,
    _life: PhantomData<&'a [u8]>,
}

impl<'a> From<&'a [u8]> for Src<'a> {
    fn from(b: &'a [u8]) -> Self {
        Self {
            ptr: b.as_ptr(),
            len: b.len(),
            _life: PhantomData,
        }
    }
}

impl<'a> Src<'a> {
    /// `len` bytes of `map` at `offset`, or `None` when out of bounds. What the write stores
    /// is whatever the range holds while the kernel copies it.
    pub fn shared(map: &'a SharedMapping, offset: u64, len: u64) -> Option<Self> {
        let (off, len) = map.check_range(offset, len)?;
        Some(Self {
            ptr: map.as_ptr().wrapping_add(off),
            len,
            _life: PhantomData,
        })
    }
}

/// Memory a read fills: a plain buffer, or a range of the shared arena. Valid for writing
/// for `'a`.
#[derive(Debug)]
pub struct Dst<'a> {
    ptr: *mut u8,
    len: usize,
    _life: PhantomData<&'a mut [u8]>,
}

impl<'a> From<&'a mut [u8]> for Dst<'a> {
    fn from(b: &'a mut [u8]) -> Self {
        Self {
            ptr: b.as_mut_ptr(),
            len: b.len(),
            _life: PhantomData,
        }
    }
}

impl<'a> Dst<'a> {
    /// `len` bytes of `map` at `offset`, or `None` when out of bounds.
    ///
    /// # Safety
    /// While the op lives, nothing in this process may hold a reference to the range or use
    /// it otherwise (the store gives a fresh allocation to one restore alone), and no other
    /// op of the same batch may name it.
    pub unsafe fn shared(map: &'a SharedMapping, offset: u64, len: u64) -> Option<Self> {
        let (off, len) = map.check_range(offset, len)?;
        Some(Self {
            ptr: map.as_ptr().wrapping_add(off),
            len,
            _life: PhantomData,
        })
    }
}

// SAFETY: a `Src`/`Dst` is a borrowed range of memory (a buffer or the process-wide arena
// mapping) like the `&[u8]`/`&mut [u8]` it stands for; moving it to another thread changes
// nothing about who may touch those bytes.
unsafe impl Send for Src<'_> {}
// SAFETY: as above.
unsafe impl Send for Dst<'_> {}

/// One positioned transfer of a whole buffer.
#[derive(Debug)]
pub enum Op<'a> {
    /// Write all of `buf` at `offset`.
    Write {
        /// Target file.
        file: BorrowedFd<'a>,
        /// Byte offset in the file.
        offset: u64,
        /// What to write.
        buf: Src<'a>,
    },
    /// Fill all of `buf` from `offset`.
    Read {
        /// Source file.
        file: BorrowedFd<'a>,
        /// Byte offset in the file.
        offset: u64,
        /// Where to read to.
        buf: Dst<'a>,
    },
}

impl Op<'_> {
    fn len(&self) -> usize {
        match self {
            Op::Write { buf, .. } => buf.len,
            Op::Read { buf, .. } => buf.len,
        }
    }

    /// The address `done` bytes into the op's buffer (`done <= len`).
    fn ptr_at(&self, done: usize) -> *mut u8 {
        match self {
            Op::Write { buf, .. } => buf.ptr.cast_mut().wrapping_add(done),
            Op::Read { buf, .. } => buf.ptr.wrapping_add(done),
        }
    }
}

/// Runs batches of [`Op`]s. The ops of one batch may run concurrently and in any order, so a
/// batch must not contain a write that overlaps another op's range.
pub trait SpillIo {
    /// Announces a file that many ops will name (io_uring registers it as a fixed file). A
    /// file must be forgotten before it is closed.
    fn register_file(&mut self, _fd: BorrowedFd<'_>) {}

    /// Forgets a file given to [`SpillIo::register_file`].
    fn forget_file(&mut self, _fd: BorrowedFd<'_>) {}

    /// Which engine this is (reported by `stat`).
    fn engine(&self) -> SpillEngineInUse;

    /// Runs every op and returns, per op and in order, the bytes transferred (always the
    /// whole buffer) or the error that stopped it. Reading past the end of a file is an
    /// `UnexpectedEof` error.
    fn run(&mut self, ops: &mut [Op<'_>]) -> Vec<io::Result<usize>>;
}

fn eof_error(op: &Op<'_>) -> io::Error {
    match op {
        Op::Write { .. } => io::Error::new(io::ErrorKind::WriteZero, "write returned 0"),
        Op::Read { .. } => io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "read past the end of the file",
        ),
    }
}

/// The reference engine: `pwrite`/`pread`, one call at a time.
#[derive(Debug, Default)]
pub struct PlainIo;

impl SpillIo for PlainIo {
    fn engine(&self) -> SpillEngineInUse {
        SpillEngineInUse::Pread
    }

    fn run(&mut self, ops: &mut [Op<'_>]) -> Vec<io::Result<usize>> {
        ops.iter_mut()
            .map(|op| {
                let total = op.len();
                let mut done = 0;
                while done < total {
                    let (file, offset) = match op {
                        Op::Write { file, offset, .. } | Op::Read { file, offset, .. } => {
                            (file.as_raw_fd(), *offset + done as u64)
                        }
                    };
                    let Ok(offset) = libc::off_t::try_from(offset) else {
                        return Err(io::Error::from_raw_os_error(libc::EINVAL));
                    };
                    let p = op.ptr_at(done).cast::<libc::c_void>();
                    let n = (total - done).min(MAX_CHUNK);
                    let r = match op {
                        // SAFETY: `p..p+n` lies inside the op's buffer, valid for reading for
                        // the op's lifetime (`Src`); the kernel copies from it, and no
                        // reference to it is made on our side.
                        Op::Write { .. } => unsafe { libc::pwrite(file, p, n, offset) },
                        // SAFETY: as above, valid for writing (`Dst`); the kernel copies into
                        // it.
                        Op::Read { .. } => unsafe { libc::pread(file, p, n, offset) },
                    };
                    match r {
                        0 => return Err(eof_error(op)),
                        n if n > 0 => done += n.unsigned_abs(),
                        _ => {
                            let e = io::Error::last_os_error();
                            if e.kind() != io::ErrorKind::Interrupted {
                                return Err(e);
                            }
                        }
                    }
                }
                Ok(total)
            })
            .collect()
    }
}

/// The io_uring engine.
pub struct UringIo {
    ring: IoUring,
    depth: usize,
    /// Memory registered as fixed buffers: `(start address, length)`, index = buffer index.
    fixed: Vec<(usize, usize)>,
    /// Files registered as fixed files: raw fd → slot in the ring's file table.
    files: std::collections::HashMap<std::os::fd::RawFd, u32>,
    free_slots: Vec<u32>,
}

/// Slots in the ring's fixed-file table.
const FILE_SLOTS: u32 = 1024;

impl std::fmt::Debug for UringIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringIo")
            .field("depth", &self.depth)
            .finish()
    }
}

/// Largest single transfer submitted to the kernel (its length field is 32 bits).
const MAX_CHUNK: usize = 1 << 30;

impl UringIo {
    /// A ring with room for `depth` operations in flight.
    pub fn new(depth: u32) -> io::Result<Self> {
        let depth = depth.clamp(1, 4096);
        Ok(Self {
            ring: IoUring::new(depth.next_power_of_two())?,
            depth: depth as usize,
            fixed: Vec::new(),
            files: std::collections::HashMap::new(),
            free_slots: Vec::new(),
        })
    }

    /// Registers `len` bytes at `ptr` as fixed buffers (in pieces of at most 1 GiB, the
    /// kernel's limit), so that transfers inside it skip pinning pages on every operation.
    ///
    /// # Safety
    /// The memory must stay mapped for as long as this `UringIo` lives (the registration ends
    /// when it is dropped).
    pub unsafe fn register_region(&mut self, ptr: *mut u8, len: usize) -> io::Result<()> {
        const PIECE: usize = 1 << 30;
        let base = ptr as usize;
        let pieces: Vec<(usize, usize)> = (0..len.div_ceil(PIECE))
            .map(|i| (base + i * PIECE, PIECE.min(len - i * PIECE)))
            .collect();
        let iovecs: Vec<libc::iovec> = pieces
            .iter()
            .map(|&(start, n)| libc::iovec {
                iov_base: start as *mut libc::c_void,
                iov_len: n,
            })
            .collect();
        if !self.fixed.is_empty() || iovecs.len() > usize::from(u16::MAX) {
            return Err(io::Error::other(
                "buffers are registered already, or too many",
            ));
        }
        // SAFETY: the caller keeps the memory mapped while we live; the kernel pins it now
        // and releases it when the ring is dropped.
        unsafe { self.ring.submitter().register_buffers(&iovecs)? };
        self.fixed = pieces;
        Ok(())
    }

    /// The fixed buffer that holds all of `ptr..ptr+len`, if any.
    fn fixed_index(&self, ptr: usize, len: usize) -> Option<u16> {
        self.fixed
            .iter()
            .position(|&(start, n)| ptr >= start && ptr + len <= start + n)
            .and_then(|i| u16::try_from(i).ok())
    }

    fn register_file_slot(&mut self, fd: BorrowedFd<'_>) -> io::Result<()> {
        if self.files.is_empty() && self.free_slots.is_empty() {
            self.ring.submitter().register_files_sparse(FILE_SLOTS)?;
            self.free_slots = (0..FILE_SLOTS).rev().collect();
        }
        let slot = self
            .free_slots
            .pop()
            .ok_or_else(|| io::Error::other("fixed file table full"))?;
        if let Err(e) = self
            .ring
            .submitter()
            .register_files_update(slot, &[fd.as_raw_fd()])
        {
            self.free_slots.push(slot);
            return Err(e);
        }
        self.files.insert(fd.as_raw_fd(), slot);
        Ok(())
    }

    /// Whether a region is registered.
    pub fn has_fixed_buffers(&self) -> bool {
        !self.fixed.is_empty()
    }

    /// Queue depth.
    pub fn depth(&self) -> usize {
        self.depth
    }
}

impl SpillIo for UringIo {
    fn engine(&self) -> SpillEngineInUse {
        SpillEngineInUse::IoUring
    }

    fn register_file(&mut self, fd: BorrowedFd<'_>) {
        if let Err(e) = self.register_file_slot(fd) {
            tracing::debug!(error = %e, "spill file not registered as a fixed file");
        }
    }

    fn forget_file(&mut self, fd: BorrowedFd<'_>) {
        if let Some(slot) = self.files.remove(&fd.as_raw_fd()) {
            // -1 empties the slot; the kernel drops its reference to the file.
            match self.ring.submitter().register_files_update(slot, &[-1]) {
                Ok(_) => self.free_slots.push(slot),
                // The slot keeps its reference until the ring goes; the fd number can no longer
                // resolve to it, so this costs a slot and the file's blocks, nothing else.
                Err(e) => tracing::warn!(error = %e, slot, "could not unregister a spill file"),
            }
        }
    }

    fn run(&mut self, ops: &mut [Op<'_>]) -> Vec<io::Result<usize>> {
        let n = ops.len();
        let mut done = vec![0usize; n];
        let mut results: Vec<Option<io::Result<usize>>> = (0..n).map(|_| None).collect();
        let mut queue: VecDeque<usize> = (0..n).collect();
        // Counts the ops the kernel may still be working on; if this function unwinds while
        // that is not zero, the guard aborts the process instead (see `InFlight`).
        let mut inflight = InFlight(0);
        let mut failing_since: Option<std::time::Instant> = None;
        loop {
            while inflight.0 < self.depth {
                let Some(i) = queue.pop_front() else { break };
                let total = ops[i].len();
                if done[i] == total {
                    results[i] = Some(Ok(total));
                    continue;
                }
                let len = u32::try_from((total - done[i]).min(MAX_CHUNK)).unwrap_or(u32::MAX);
                let buf_index = |p: usize| self.fixed_index(p, len as usize);
                let (raw_fd, at) = match &ops[i] {
                    Op::Write { file, offset, .. } | Op::Read { file, offset, .. } => {
                        (file.as_raw_fd(), *offset + done[i] as u64)
                    }
                };
                let slot = self.files.get(&raw_fd).copied();
                // One entry for each combination of fixed file and fixed buffer.
                macro_rules! entry {
                    ($plain:ident, $fixed:ident, $p:expr) => {{
                        let p = $p;
                        match (slot, buf_index(p as usize)) {
                            (Some(s), Some(b)) => opcode::$fixed::new(types::Fixed(s), p, len, b)
                                .offset(at)
                                .build(),
                            (Some(s), None) => opcode::$plain::new(types::Fixed(s), p, len)
                                .offset(at)
                                .build(),
                            (None, Some(b)) => opcode::$fixed::new(types::Fd(raw_fd), p, len, b)
                                .offset(at)
                                .build(),
                            (None, None) => opcode::$plain::new(types::Fd(raw_fd), p, len)
                                .offset(at)
                                .build(),
                        }
                    }};
                }
                let p = ops[i].ptr_at(done[i]);
                let entry = match &ops[i] {
                    Op::Write { .. } => entry!(Write, WriteFixed, p.cast_const()),
                    Op::Read { .. } => entry!(Read, ReadFixed, p),
                }
                .user_data(i as u64);
                // SAFETY: the entry points into a buffer (and names a file) borrowed by `ops`
                // for this whole call, `len` stays within the buffer, and this function does
                // not return until every submitted entry has completed (the loop below runs
                // while `inflight > 0`). The queue has room: `inflight < depth <= entries`.
                let pushed = unsafe { self.ring.submission().push(&entry) };
                if pushed.is_err() {
                    queue.push_front(i);
                    break;
                }
                inflight.0 += 1;
            }
            if inflight.0 == 0 {
                break;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => failing_since = None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) => {}
                Err(e) => {
                    // Entries already queued may not have reached the kernel and would then
                    // never complete. Fail what has not been queued, and keep trying to submit
                    // the rest: we may not return while the kernel could still touch buffers.
                    for i in queue.drain(..) {
                        results[i] = Some(Err(io::Error::new(e.kind(), e.to_string())));
                    }
                    let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() > std::time::Duration::from_secs(30) {
                        tracing::error!(error = %e, "io_uring submission keeps failing with I/O in flight; aborting");
                        std::process::abort();
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            for cqe in self.ring.completion() {
                let Ok(i) = usize::try_from(cqe.user_data()) else {
                    continue;
                };
                let Some(op) = ops.get(i) else { continue };
                inflight.0 -= 1;
                match cqe.result() {
                    r if r < 0 => results[i] = Some(Err(io::Error::from_raw_os_error(-r))),
                    0 => results[i] = Some(Err(eof_error(op))),
                    r => {
                        done[i] += usize::try_from(r).unwrap_or(0);
                        if done[i] >= op.len() {
                            results[i] = Some(Ok(op.len()));
                        } else {
                            queue.push_back(i);
                        }
                    }
                }
            }
            #[cfg(test)]
            if inflight.0 > 0 && tests::PANIC_WITH_OPS_IN_FLIGHT.get() {
                panic!("injected panic with {} operations in flight", inflight.0);
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(io::Error::other("operation was not run"))))
            .collect()
    }
}

/// Operations of one [`UringIo::run`] the kernel may still be working on. If it is dropped
/// with any left, the call is unwinding from a panic while the kernel can still read from or
/// write into the ops' buffers (staging maps, restore destinations in the arena), which the
/// unwinding is about to free or hand back to their owners: so the process aborts instead.
/// Waiting for the completions here was the alternative; it is not taken because the ring
/// (whose state a panic may have left inconsistent) is borrowed elsewhere, an op on a stuck
/// device might never complete, and a panic in this loop is a bug to surface loudly, not a
/// condition to recover from.
struct InFlight(usize);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0 > 0 {
            // Plain stderr: this must not depend on anything that could panic again.
            eprintln!(
                "ferroplasma: spill I/O unwinding with {} io_uring operations in flight; \
                 aborting rather than freeing memory the kernel still uses",
                self.0
            );
            std::process::abort();
        }
    }
}

/// Opens a spill file for direct I/O, never through a symlink; with `create`, makes a new
/// file (`O_CREAT | O_EXCL`: an existing file or symlink at `path` is an `AlreadyExists`
/// error, since spill file names are predictable and earlier ones are removed at start, so
/// one found there was planted). Returns the file and whether `O_DIRECT` is in effect: file
/// systems without it (tmpfs) get buffered I/O instead.
pub fn open_spill_file(path: &Path, create: bool) -> io::Result<(OwnedFd, bool)> {
    let mut flags = OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    if create {
        flags |= OFlags::CREATE | OFlags::EXCL;
    }
    let fd = rustix::fs::open(path, flags, Mode::from_raw_mode(0o600))?;
    // O_DIRECT is set afterwards rather than at open: a file system without it would fail
    // the open only after `O_EXCL` had made the file.
    let now = rustix::fs::fcntl_getfl(&fd)?;
    let direct = match rustix::fs::fcntl_setfl(&fd, now | OFlags::DIRECT) {
        Ok(()) => true,
        Err(rustix::io::Errno::INVAL) => false,
        Err(e) => return Err(e.into()),
    };
    Ok((fd, direct))
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    const ALIGN: usize = 4096;

    thread_local! {
        /// Makes [`UringIo::run`] panic once it has operations in flight (fault injection).
        pub(super) static PANIC_WITH_OPS_IN_FLIGHT: std::cell::Cell<bool> =
            const { std::cell::Cell::new(false) };
    }

    /// Set in the child process of [`a_panic_with_io_in_flight_aborts`].
    const PANIC_CHILD: &str = "FP_TEST_PANIC_WITH_IO_IN_FLIGHT";

    /// A panic inside a batch while the kernel still owns a buffer (a read from a socket
    /// nobody writes) must not unwind past it: the process aborts. Runs itself again as a
    /// child process that does the panicking.
    #[test]
    fn a_panic_with_io_in_flight_aborts() {
        use std::os::unix::process::ExitStatusExt;
        if std::env::var_os(PANIC_CHILD).is_some() {
            panic_with_io_in_flight();
            return;
        }
        if uring_or_skip(2).is_none() {
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "spill::io::tests::a_panic_with_io_in_flight_aborts",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(PANIC_CHILD, "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("injected panic with 1 operations in flight"),
            "the child did not get to the panic: {stderr}"
        );
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGABRT),
            "the child unwound past I/O in flight instead of aborting ({:?}):\n{stderr}",
            out.status
        );
    }

    fn panic_with_io_in_flight() {
        let mut uring = UringIo::new(2).expect("io_uring (the parent checked)");
        let file =
            rustix::fs::memfd_create("fp-panic-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let src = vec![7u8; ALIGN];
        let mut dst = vec![0u8; ALIGN];
        // The write completes; the read waits for bytes that never come.
        let mut ops = vec![
            Op::Write {
                file: file.as_fd(),
                offset: 0,
                buf: (&src[..]).into(),
            },
            Op::Read {
                file: sock.as_fd(),
                offset: 0,
                buf: (&mut dst[..]).into(),
            },
        ];
        PANIC_WITH_OPS_IN_FLIGHT.set(true);
        let _ = uring.run(&mut ops);
        unreachable!("run returned with a read that cannot complete");
    }

    /// io_uring, or `None` (with a note on stderr) where the kernel or sandbox forbids it.
    fn uring_or_skip(depth: u32) -> Option<UringIo> {
        use rustix::io::Errno;
        match UringIo::new(depth) {
            Ok(u) => Some(u),
            Err(e) => {
                let unavailable = [Errno::NOSYS, Errno::PERM].map(Errno::raw_os_error);
                assert!(
                    e.raw_os_error().is_some_and(|c| unavailable.contains(&c)),
                    "io_uring setup failed: {e}"
                );
                if std::env::var("FERROPLASMA_EXPECT_SPILL_ENGINE").as_deref() == Ok("io_uring") {
                    panic!(
                        "FERROPLASMA_EXPECT_SPILL_ENGINE=io_uring but io_uring is unavailable: {e}"
                    );
                }
                eprintln!("SKIPPED: io_uring is not available here ({e})");
                None
            }
        }
    }

    fn scratch_dir(tag: &str) -> std::path::PathBuf {
        // Falls back to buffered I/O where the file system has no O_DIRECT (tmpfs).
        let d = std::env::temp_dir().join(format!("fp-spill-io-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// The same random batches of aligned writes and reads through both engines: identical
    /// files, identical bytes read back, identical errors for reads past the end.
    #[test]
    fn uring_and_plain_engines_agree() {
        let dir = scratch_dir("diff");
        let (fa, direct) = open_spill_file(&dir.join("a"), true).unwrap();
        let (fb, _) = open_spill_file(&dir.join("b"), true).unwrap();
        println!("O_DIRECT in effect: {direct}");
        // Page-aligned memory, as O_DIRECT requires (the arena gives the same).
        let mut src = memmap2::MmapMut::map_anon(64 << 20).unwrap();
        let mut rng = fastrand::Rng::with_seed(17);
        rng.fill(&mut src[..]);
        let Some(mut uring) = uring_or_skip(8) else {
            return;
        };
        // Writes from `src` go through WriteFixed, reads into fresh buffers through Read.
        // SAFETY: `src` outlives `uring` (declared before it, dropped after it).
        unsafe { uring.register_region(src.as_mut_ptr(), src.len()) }.unwrap();
        assert!(uring.has_fixed_buffers());
        uring.register_file(fa.as_fd());
        assert_eq!(uring.files.len(), 1, "file a is a fixed file");
        let mut plain = PlainIo;
        let mut file_len = 0u64;
        for round in 0..20 {
            // A batch of writes: random aligned sizes and places, disjoint within the batch
            // (ops in one batch run concurrently), overwriting earlier batches' data.
            let mut plan = Vec::new();
            let mut cursor = rng.u64(0..2048) * ALIGN as u64;
            for _ in 0..rng.usize(1..24) {
                let blocks = rng.usize(1..256);
                let at = rng.usize(0..(src.len() / ALIGN - blocks)) * ALIGN;
                let off = cursor + rng.u64(0..16) * ALIGN as u64;
                cursor = off + (blocks * ALIGN) as u64;
                plan.push((at, blocks * ALIGN, off));
                file_len = file_len.max(cursor);
            }
            for (engine, file) in [
                (&mut uring as &mut dyn SpillIo, &fa),
                (&mut plain as &mut dyn SpillIo, &fb),
            ] {
                let mut ops: Vec<Op<'_>> = plan
                    .iter()
                    .map(|&(at, len, off)| Op::Write {
                        file: file.as_fd(),
                        offset: off,
                        buf: (&src[at..at + len]).into(),
                    })
                    .collect();
                for r in engine.run(&mut ops) {
                    r.unwrap();
                }
            }
            let a = std::fs::read(dir.join("a")).unwrap();
            let b = std::fs::read(dir.join("b")).unwrap();
            assert_eq!(a.len() as u64, file_len);
            assert!(a == b, "round {round}: files differ");
            // Read back random aligned ranges through both engines, some past the end.
            let mut ra = memmap2::MmapMut::map_anon(8 << 20).unwrap();
            let mut rb = memmap2::MmapMut::map_anon(8 << 20).unwrap();
            let reads: Vec<(usize, u64)> = (0..8)
                .map(|_| {
                    (
                        rng.usize(1..64) * ALIGN,
                        rng.u64(0..file_len / ALIGN as u64 + 8) * ALIGN as u64,
                    )
                })
                .collect();
            let run = |engine: &mut dyn SpillIo, file: &OwnedFd, mem: &mut [u8]| {
                let mut rest = mem;
                let mut ops = Vec::new();
                for &(len, off) in &reads {
                    let (buf, tail) = rest.split_at_mut(len);
                    rest = tail;
                    ops.push(Op::Read {
                        file: file.as_fd(),
                        offset: off,
                        buf: buf.into(),
                    });
                }
                engine
                    .run(&mut ops)
                    .into_iter()
                    .map(|r| r.map_err(|e| e.kind()))
                    .collect::<Vec<_>>()
            };
            let got_a = run(&mut uring, &fa, &mut ra[..]);
            let got_b = run(&mut plain, &fb, &mut rb[..]);
            assert_eq!(got_a, got_b, "round {round}: results differ");
            let mut at = 0;
            for (&(len, off), r) in reads.iter().zip(&got_a) {
                if r.is_ok() {
                    assert_eq!(&ra[at..at + len], &a[off as usize..off as usize + len]);
                    assert_eq!(&ra[at..at + len], &rb[at..at + len]);
                } else {
                    assert_eq!(*r, Err(io::ErrorKind::UnexpectedEof));
                    assert!(off + len as u64 > file_len);
                }
                at += len;
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A spill file is always new and never reached through a symlink; where the file
    /// system has no O_DIRECT (tmpfs) it is still made, buffered.
    #[test]
    fn spill_files_are_new_and_never_followed() {
        let dir = scratch_dir("excl");
        let victim = dir.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let link = dir.join("fp-1-0.spill");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let e = open_spill_file(&link, true).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        let e = open_spill_file(&link, false).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let (_f, _) = open_spill_file(&dir.join("fresh"), true).unwrap();
        assert!(open_spill_file(&dir.join("fresh"), true).is_err());
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            let p = shm.join(format!("fp-spill-io-{}", std::process::id()));
            let _ = std::fs::remove_file(&p);
            let (_f, direct) = open_spill_file(&p, true).unwrap();
            println!("O_DIRECT on /dev/shm: {direct}");
            std::fs::remove_file(&p).unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errors_are_per_operation() {
        let dir = scratch_dir("errors");
        let (f, _) = open_spill_file(&dir.join("f"), true).unwrap();
        let (ro, _) = (
            rustix::fs::open(
                dir.join("f"),
                OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .unwrap(),
            (),
        );
        let buf = memmap2::MmapMut::map_anon(ALIGN).unwrap();
        let Some(mut uring) = uring_or_skip(4) else {
            return;
        };
        let mut ops = vec![
            Op::Write {
                file: f.as_fd(),
                offset: 0,
                buf: (&buf[..]).into(),
            },
            Op::Write {
                file: ro.as_fd(),
                offset: 0,
                buf: (&buf[..]).into(),
            },
        ];
        let r = uring.run(&mut ops);
        assert_eq!(*r[0].as_ref().unwrap(), ALIGN);
        assert_eq!(
            r[1].as_ref().unwrap_err().raw_os_error(),
            Some(rustix::io::Errno::BADF.raw_os_error())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
