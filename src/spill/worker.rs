//! The spill worker: a thread that writes objects from the arena into spill files and reads
//! them back, so that the event loop never waits for a disk. It takes [`Job`]s from the
//! event loop and answers with [`Done`]s through a queue plus the loop's wake eventfd.
//!
//! Contract with the store (which decides what to spill): an object handed over in a
//! `Spill` job is sealed and frozen (not freed, not written) until its `Spilled` answer; the
//! destination of a `Restore` job is a fresh allocation nobody else sees until `Restored`.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use crossbeam_queue::SegQueue;
use memmap2::MmapMut;
use rustix::fs::FallocateFlags;

use super::format::{self, Kind, RecordHeader, BLOCK, BLOCK_USIZE, RECORD_HEADER};
use super::io::{open_spill_file, Dst, Op, SpillIo, Src};
pub use super::job::{Done, Job, RestoreFail, RestoreReq, SpillFail, SpillItem, SpillLoc};
use crate::id::NodeId;
use crate::shm::SharedMapping;

struct FileState {
    path: PathBuf,
    fd: OwnedFd,
    tail: u64,
    live: u64,
    dir: usize,
}

/// Spill thread state.
pub struct SpillWorker {
    /// Declared (so dropped) before `arena`: the engine may have the arena registered.
    io: Box<dyn SpillIo + Send>,
    arena: Arc<SharedMapping>,
    node: NodeId,
    dirs: Vec<PathBuf>,
    current: Vec<Option<u32>>,
    files: Vec<Option<FileState>>,
    next_dir: usize,
    file_size: u64,
}

impl std::fmt::Debug for SpillWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpillWorker")
            .field("dirs", &self.dirs)
            .finish()
    }
}

/// Spill files start with this and end with `.spill`.
pub const FILE_PREFIX: &str = "fp-";

/// Removes spill files left in `dir` by an earlier run; returns how many.
pub fn clean_dir(dir: &Path) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    let mut n = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(FILE_PREFIX) && name.ends_with(".spill") {
            std::fs::remove_file(e.path())?;
            n += 1;
        }
    }
    Ok(n)
}

impl SpillWorker {
    /// A worker writing into `dirs` (already cleaned), files of about `file_size` bytes.
    pub fn new(
        io: Box<dyn SpillIo + Send>,
        arena: Arc<SharedMapping>,
        node: NodeId,
        dirs: Vec<PathBuf>,
        file_size: u64,
    ) -> Self {
        let n = dirs.len();
        Self {
            io,
            arena,
            node,
            dirs,
            current: vec![None; n],
            files: Vec::new(),
            next_dir: 0,
            file_size: file_size.max(BLOCK * 16),
        }
    }

    /// Serves jobs until the sender hangs up, then removes its files. Jobs waiting in the
    /// channel are taken together, so that restores (and spills) run as one batch with
    /// several operations in flight.
    pub fn run(mut self, jobs: Receiver<Job>, done: Arc<SegQueue<Done>>, wake: impl Fn()) {
        while let Ok(first) = jobs.recv() {
            let mut batch = vec![first];
            while batch.len() < 256 {
                match jobs.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            self.handle_batch(batch, &done);
            wake();
        }
        for f in self.files.drain(..).flatten() {
            let _ = std::fs::remove_file(&f.path);
        }
    }

    /// Runs jobs in order, merging neighbouring spills and neighbouring restores.
    pub fn handle_batch(&mut self, jobs: Vec<Job>, done: &SegQueue<Done>) {
        let mut spills: Vec<SpillItem> = Vec::new();
        let mut restores: Vec<RestoreReq> = Vec::new();
        for job in jobs {
            match job {
                Job::Spill(items) => {
                    self.flush_restores(&mut restores, done);
                    spills.extend(items);
                }
                Job::Restore(r) => {
                    self.flush_spills(&mut spills, done);
                    restores.push(r);
                }
                Job::Free(loc) => {
                    self.flush_spills(&mut spills, done);
                    self.flush_restores(&mut restores, done);
                    self.free(loc);
                }
            }
        }
        self.flush_spills(&mut spills, done);
        self.flush_restores(&mut restores, done);
    }

    fn flush_spills(&mut self, items: &mut Vec<SpillItem>, done: &SegQueue<Done>) {
        if items.is_empty() {
            return;
        }
        for (handle, result) in self.spill(items) {
            done.push(Done::Spilled { handle, result });
        }
        items.clear();
    }

    fn flush_restores(&mut self, reqs: &mut Vec<RestoreReq>, done: &SegQueue<Done>) {
        if reqs.is_empty() {
            return;
        }
        for (r, result) in reqs.iter().zip(self.restore_batch(reqs)) {
            done.push(Done::Restored {
                handle: r.handle,
                result,
            });
        }
        reqs.clear();
    }

    fn new_file(&mut self, dir: usize) -> std::io::Result<u32> {
        // Spill files of an earlier run were removed at start, under the directory's lock,
        // and nobody else may write the directory: a file (or symlink) already at one of
        // our names was put there behind our back. It is left alone (never followed or
        // written) and its number skipped.
        let mut skipped = 0;
        let (seq, path, fd, direct) = loop {
            let seq = self.files.len() as u64;
            let path = self.dirs[dir].join(format!("{FILE_PREFIX}{}-{seq}.spill", self.node));
            match open_spill_file(&path, true) {
                Ok((fd, direct)) => break (seq, path, fd, direct),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && skipped < 8 => {
                    tracing::error!(path = %path.display(), "a file we did not make is in the way of a new spill file; leaving it alone and skipping its name");
                    self.files.push(None);
                    skipped += 1;
                }
                Err(e) => {
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("cannot make spill file {}: {e}", path.display()),
                    ))
                }
            }
        };
        if !direct {
            tracing::info!(path = %path.display(), "spill directory has no O_DIRECT; using buffered I/O");
        }
        let mut hdr = MmapMut::map_anon(BLOCK_USIZE)?;
        format::encode_file_header(self.node, seq, &mut hdr);
        let r = self.io.run(&mut [Op::Write {
            file: fd.as_fd(),
            offset: 0,
            buf: (&hdr[..]).into(),
        }]);
        if let Some(Err(e)) = r.into_iter().next() {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let n = u32::try_from(self.files.len())
            .map_err(|_| std::io::Error::other("too many spill files"))?;
        self.io.register_file(fd.as_fd());
        self.files.push(Some(FileState {
            path,
            fd,
            tail: BLOCK,
            live: 0,
            dir,
        }));
        Ok(n)
    }

    /// Reserves `len` bytes at the end of a file in the next directory.
    fn place(&mut self, len: u64) -> std::io::Result<(u32, u64)> {
        let dir = self.next_dir % self.dirs.len();
        self.next_dir = self.next_dir.wrapping_add(1);
        let reuse = self.current[dir].filter(|&f| {
            self.files[f as usize]
                .as_ref()
                .is_some_and(|s| s.tail == BLOCK || s.tail + len <= self.file_size)
        });
        let f = match reuse {
            Some(f) => f,
            None => {
                let f = self.new_file(dir)?;
                if let Some(old) = self.current[dir].replace(f) {
                    self.maybe_remove(old);
                }
                f
            }
        };
        let state = self.files[f as usize]
            .as_mut()
            .ok_or_else(|| std::io::Error::other("spill file gone"))?;
        let at = state.tail;
        state.tail += len;
        // Counted as live from the moment it is placed, so that the file is not removed
        // while the batch that fills it is still being prepared; a failed write frees it.
        state.live += len;
        Ok((f, at))
    }

    fn spill(&mut self, items: &[SpillItem]) -> Vec<(u64, Result<SpillLoc, SpillFail>)> {
        let mut staging = match MmapMut::map_anon(BLOCK_USIZE * items.len().max(1)) {
            Ok(m) => m,
            Err(e) => {
                return items
                    .iter()
                    .map(|i| (i.handle, Err(SpillFail::Io(e.to_string()))))
                    .collect()
            }
        };
        let mut plan: Vec<Result<(SpillLoc, RecordHeader), SpillFail>> =
            Vec::with_capacity(items.len());
        let mut placed: Vec<Option<SpillLoc>> = Vec::with_capacity(items.len());
        let outside = |it: &SpillItem| SpillFail::Io(format!("object {} outside the arena", it.id));
        for (i, it) in items.iter().enumerate() {
            let len = it.data_size + it.meta_size;
            let kind = RecordHeader::kind_for(len);
            let block = &mut staging[i * BLOCK_USIZE..(i + 1) * BLOCK_USIZE];
            block.fill(0);
            // The arena is memory every client can write: it is only copied out (inline
            // payloads, into the staging block that is then hashed and written) or hashed
            // through a bounce buffer (extents, written by the kernel straight from the arena),
            // never borrowed. A client writing a frozen object meanwhile spoils only its own
            // record, which then fails its checksum on restore.
            let payload_checksum = match kind {
                Kind::Inline => {
                    // Inline payloads are at most INLINE_MAX bytes (kind_for): they fit.
                    let end = RECORD_HEADER + usize::try_from(len).unwrap_or(usize::MAX);
                    block.get_mut(RECORD_HEADER..end).and_then(|payload| {
                        self.arena
                            .copy_out(it.offset, payload)
                            .then(|| format::checksum(payload))
                    })
                }
                // Hashed while the payload is being written (below); the header block
                // follows once both are done.
                Kind::Extent => self
                    .arena
                    .check_range(it.offset, len.next_multiple_of(BLOCK))
                    .map(|_| 0),
            };
            let Some(payload_checksum) = payload_checksum else {
                placed.push(None);
                plan.push(Err(outside(it)));
                continue;
            };
            let header = RecordHeader {
                kind,
                id: it.id,
                data_size: it.data_size,
                meta_size: it.meta_size,
                payload_checksum,
            };
            header.encode(block);
            match self.place(header.disk_len()) {
                Ok((file, offset)) => {
                    let loc = SpillLoc {
                        file,
                        offset,
                        disk_len: header.disk_len(),
                    };
                    placed.push(Some(loc));
                    plan.push(Ok((loc, header)));
                }
                Err(e) => {
                    placed.push(None);
                    plan.push(Err(classify(&e)));
                }
            }
        }
        // Extents are hashed here, before the writes, when they are small together: then
        // every record goes in one batch, header block and payload side by side. From
        // HASH_OFFLOAD_MIN on, a helper thread hashes them while their payloads are written
        // (hashing would otherwise delay the disk), and their header blocks follow in a
        // second batch.
        let extent_bytes: u64 = plan
            .iter()
            .filter_map(|p| p.as_ref().ok())
            .filter(|(_, h)| h.kind == Kind::Extent)
            .map(|(_, h)| h.payload_len())
            .sum();
        let hash_now = extent_bytes < HASH_OFFLOAD_MIN;
        if hash_now {
            for (i, it) in items.iter().enumerate() {
                let Ok((_, header)) = &mut plan[i] else {
                    continue;
                };
                if header.kind != Kind::Extent {
                    continue;
                }
                match self.arena.checksum(it.offset, header.payload_len()) {
                    Some(sum) => {
                        header.payload_checksum = sum;
                        header.encode(&mut staging[i * BLOCK_USIZE..(i + 1) * BLOCK_USIZE]);
                    }
                    None => plan[i] = Err(outside(it)),
                }
            }
        }
        // First batch: inline records whole, every extent's payload straight from the arena,
        // and (hashed already) its header block.
        let mut ops = Vec::new();
        let mut owner = Vec::new();
        let mut extents = Vec::new();
        let mut unwritten = Vec::new();
        for (i, (it, p)) in items.iter().zip(&plan).enumerate() {
            let Ok((loc, header)) = p else { continue };
            let Some(f) = self.files[loc.file as usize].as_ref() else {
                continue;
            };
            let block = &staging[i * BLOCK_USIZE..(i + 1) * BLOCK_USIZE];
            if header.kind == Kind::Inline {
                ops.push(Op::Write {
                    file: f.fd.as_fd(),
                    offset: loc.offset,
                    buf: block.into(),
                });
                owner.push(i);
                continue;
            }
            // Extents are page-tier allocations, rounded up to BLOCK, so the padded range is
            // still this object's allocation (frozen by the store until we answer); checked
            // against the mapping above.
            let padded = header.payload_len().next_multiple_of(BLOCK);
            let Some(src) = Src::shared(&self.arena, it.offset, padded) else {
                unwritten.push(i);
                continue;
            };
            ops.push(Op::Write {
                file: f.fd.as_fd(),
                offset: loc.offset + BLOCK,
                buf: src,
            });
            owner.push(i);
            if hash_now {
                ops.push(Op::Write {
                    file: f.fd.as_fd(),
                    offset: loc.offset,
                    buf: block.into(),
                });
                owner.push(i);
            } else {
                extents.push((i, it.offset, header.payload_len()));
            }
        }
        let ranges: Vec<(u64, u64)> = extents.iter().map(|&(_, o, l)| (o, l)).collect();
        let (results, sums) = run_while_hashing(&mut *self.io, &mut ops, &self.arena, &ranges);
        drop(ops);
        for i in unwritten {
            plan[i] = Err(outside(&items[i]));
        }
        for (i, r) in owner.into_iter().zip(results) {
            if let Err(e) = r {
                if plan[i].is_ok() {
                    plan[i] = Err(classify(&e));
                }
            }
        }
        // Second batch (hashed by the helper only): the header blocks of the extents whose
        // payload is on disk.
        for (n, &(i, _, _)) in extents.iter().enumerate() {
            let Ok((_, header)) = &mut plan[i] else {
                continue;
            };
            let sum = match &sums {
                Ok(sums) => sums.get(n).copied().flatten(),
                Err(why) => {
                    plan[i] = Err(SpillFail::Io(format!("object {}: {why}", items[i].id)));
                    continue;
                }
            };
            let Some(sum) = sum else {
                plan[i] = Err(outside(&items[i]));
                continue;
            };
            header.payload_checksum = sum;
            header.encode(&mut staging[i * BLOCK_USIZE..(i + 1) * BLOCK_USIZE]);
        }
        let mut ops = Vec::new();
        let mut owner = Vec::new();
        for &(i, _, _) in &extents {
            let Ok((loc, _)) = &plan[i] else {
                continue;
            };
            let Some(f) = self.files[loc.file as usize].as_ref() else {
                continue;
            };
            ops.push(Op::Write {
                file: f.fd.as_fd(),
                offset: loc.offset,
                buf: (&staging[i * BLOCK_USIZE..(i + 1) * BLOCK_USIZE]).into(),
            });
            owner.push(i);
        }
        if !ops.is_empty() {
            let results = self.io.run(&mut ops);
            drop(ops);
            for (i, r) in owner.into_iter().zip(results) {
                if let Err(e) = r {
                    if plan[i].is_ok() {
                        plan[i] = Err(classify(&e));
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(items.len());
        for (it, (placed, p)) in items.iter().zip(placed.into_iter().zip(plan)) {
            match p {
                Ok((loc, _)) => out.push((it.handle, Ok(loc))),
                Err(e) => {
                    if let Some(loc) = placed {
                        self.free(loc);
                    }
                    out.push((it.handle, Err(e)));
                }
            }
        }
        out
    }

    fn restore_batch(&mut self, reqs: &[RestoreReq]) -> Vec<Result<(), RestoreFail>> {
        let mut staging = match MmapMut::map_anon(BLOCK_USIZE * reqs.len().max(1)) {
            Ok(m) => m,
            Err(e) => {
                return reqs
                    .iter()
                    .map(|_| Err(RestoreFail::Io(e.to_string())))
                    .collect()
            }
        };
        let mut results: Vec<Option<Result<(), RestoreFail>>> = reqs.iter().map(|_| None).collect();
        let mut owner = Vec::new();
        let io_results = {
            let mut ops = Vec::new();
            for ((i, r), block) in reqs.iter().enumerate().zip(staging.chunks_mut(BLOCK_USIZE)) {
                let Some(f) = self.files.get(r.loc.file as usize).and_then(Option::as_ref) else {
                    results[i] = Some(Err(RestoreFail::Io(format!(
                        "spill file {} is gone",
                        r.loc.file
                    ))));
                    continue;
                };
                let len = r.data_size + r.meta_size;
                if RecordHeader::kind_for(len) == Kind::Extent {
                    let padded = len.next_multiple_of(BLOCK);
                    // SAFETY: `dest` is a fresh page-tier allocation of at least `padded` bytes
                    // that the store shows to nobody until we answer, distinct from every other
                    // restore's (so from every other op of this batch); this process holds no
                    // reference into the arena. The range is bounds-checked by `shared`.
                    let Some(dst) = (unsafe { Dst::shared(&self.arena, r.dest, padded) }) else {
                        results[i] = Some(Err(RestoreFail::Io(format!(
                            "restore destination of {} outside the arena",
                            r.id
                        ))));
                        continue;
                    };
                    ops.push(Op::Read {
                        file: f.fd.as_fd(),
                        offset: r.loc.offset + BLOCK,
                        buf: dst,
                    });
                    owner.push(i);
                }
                ops.push(Op::Read {
                    file: f.fd.as_fd(),
                    offset: r.loc.offset,
                    buf: block.into(),
                });
                owner.push(i);
            }
            self.io.run(&mut ops)
        };
        for (i, r) in owner.into_iter().zip(io_results) {
            if let Err(e) = r {
                if results[i].is_none() {
                    let file = self.path_of(reqs[i].loc.file);
                    results[i] = Some(Err(match e.kind() {
                        std::io::ErrorKind::UnexpectedEof => RestoreFail::Corrupted {
                            file,
                            reason: "file is shorter than its record".into(),
                        },
                        _ => RestoreFail::Io(e.to_string()),
                    }));
                }
            }
        }
        reqs.iter()
            .enumerate()
            .map(|(i, r)| match results[i].take() {
                Some(res) => res,
                None => self.verify_restored(r, &staging[i * BLOCK_USIZE..(i + 1) * BLOCK_USIZE]),
            })
            .collect()
    }

    fn path_of(&self, file: u32) -> PathBuf {
        self.files
            .get(file as usize)
            .and_then(Option::as_ref)
            .map_or_else(
                || PathBuf::from(format!("spill file {file}")),
                |f| f.path.clone(),
            )
    }

    /// Checks a restored record (header block in `block`, extent already in the arena) and
    /// copies an inline payload into place.
    fn verify_restored(&self, r: &RestoreReq, block: &[u8]) -> Result<(), RestoreFail> {
        let corrupted = |reason: String| RestoreFail::Corrupted {
            file: self.path_of(r.loc.file),
            reason,
        };
        let len = r.data_size + r.meta_size;
        let header = RecordHeader::decode(block).map_err(|e| corrupted(e.to_string()))?;
        let outside =
            || RestoreFail::Io(format!("restore destination of {} outside the arena", r.id));
        if header.kind == Kind::Inline {
            // Inline payloads are at most INLINE_MAX bytes (kind_for), so this fits the block.
            let end = RECORD_HEADER
                + usize::try_from(len)
                    .unwrap_or(usize::MAX)
                    .min(BLOCK_USIZE - RECORD_HEADER);
            let payload = &block[RECORD_HEADER..end];
            header
                .verify(&r.id, r.data_size, r.meta_size, payload)
                .map_err(|e| corrupted(e.to_string()))?;
            if !self.arena.write_at(r.dest, payload) {
                return Err(outside());
            }
        } else {
            // Hashed through a bounce buffer: the allocation is not visible to clients yet,
            // but it is still memory they map.
            let sum = self.arena.checksum(r.dest, len).ok_or_else(outside)?;
            header
                .verify_checksum(&r.id, r.data_size, r.meta_size, sum)
                .map_err(|e| corrupted(e.to_string()))?;
        }
        Ok(())
    }

    fn free(&mut self, loc: SpillLoc) {
        let Some(f) = self
            .files
            .get_mut(loc.file as usize)
            .and_then(Option::as_mut)
        else {
            return;
        };
        f.live = f.live.saturating_sub(loc.disk_len);
        let _ = rustix::fs::fallocate(
            &f.fd,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            loc.offset,
            loc.disk_len,
        );
        self.maybe_remove(loc.file);
    }

    /// Removes a file that holds nothing live and is not being appended to.
    fn maybe_remove(&mut self, file: u32) {
        let idx = file as usize;
        let Some(f) = self.files.get(idx).and_then(Option::as_ref) else {
            return;
        };
        if f.live == 0 && self.current[f.dir] != Some(file) {
            let _ = std::fs::remove_file(&f.path);
            self.io.forget_file(f.fd.as_fd());
            self.files[idx] = None;
        }
    }
}

/// Extent bytes in one spill batch from which a helper thread hashes them while the payloads
/// are written; below, they are hashed before the batch (cheaper than starting a thread, and
/// then each record is written in one batch).
const HASH_OFFLOAD_MIN: u64 = 1 << 20;

/// Per hashed range its checksum (`None` if out of bounds), or why there are none.
type Sums = Result<Vec<Option<u64>>, String>;

/// Runs `ops` on `io` while a helper thread (`fp-spill-sum`) computes the xxh3-64 of each
/// `(offset, len)` range of the arena, so that hashing overlaps the disk writes instead of
/// preceding them. Returns the ops' results and, per range, its checksum (`None` if out of
/// bounds), or why there are none (the helper panicked).
fn run_while_hashing(
    io: &mut (dyn SpillIo + Send),
    ops: &mut [Op<'_>],
    arena: &SharedMapping,
    ranges: &[(u64, u64)],
) -> (Vec<std::io::Result<usize>>, Sums) {
    let hash_all = || -> Vec<Option<u64>> {
        #[cfg(test)]
        if HASHER_PANICS.load(std::sync::atomic::Ordering::Relaxed) {
            panic!("injected hasher panic");
        }
        ranges
            .iter()
            .map(|&(offset, len)| arena.checksum(offset, len))
            .collect()
    };
    if ranges.is_empty() {
        return (io.run(ops), Ok(Vec::new()));
    }
    std::thread::scope(|s| {
        let hasher = std::thread::Builder::new()
            .name("fp-spill-sum".into())
            .spawn_scoped(s, hash_all);
        let results = io.run(ops);
        let sums = match hasher {
            Ok(h) => h.join().map_err(|p| {
                let what = p
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(panic = %what, "the spill hasher thread panicked");
                format!("the spill hasher thread (fp-spill-sum) panicked: {what}")
            }),
            // No thread to be had: hash here, after the writes.
            Err(_) => Ok(hash_all()),
        };
        (results, sums)
    })
}

/// Makes the hashing helper panic (fault injection).
#[cfg(test)]
static HASHER_PANICS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn classify(e: &std::io::Error) -> SpillFail {
    if e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error())
        || e.raw_os_error() == Some(rustix::io::Errno::DQUOT.raw_os_error())
    {
        SpillFail::DiskFull
    } else {
        SpillFail::Io(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::ObjectId;
    use crate::spill::io::PlainIo;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// pread/pwrite, counting the batches it is given.
    struct Counting(Arc<AtomicUsize>);

    impl SpillIo for Counting {
        fn engine(&self) -> crate::protocol::SpillEngineInUse {
            PlainIo.engine()
        }
        fn run(&mut self, ops: &mut [Op<'_>]) -> Vec<std::io::Result<usize>> {
            self.0.fetch_add(1, Ordering::Relaxed);
            PlainIo.run(ops)
        }
    }

    fn arena(len: usize) -> Arc<SharedMapping> {
        let fd =
            rustix::fs::memfd_create("fp-worker-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, len as u64).unwrap();
        Arc::new(SharedMapping::new(std::fs::File::from(fd), len, false).unwrap())
    }

    fn worker(tag: &str, len: usize) -> (SpillWorker, Arc<AtomicUsize>, PathBuf) {
        let dir = std::env::temp_dir().join(format!("fp-worker-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let batches = Arc::new(AtomicUsize::new(0));
        let w = SpillWorker::new(
            Box::new(Counting(batches.clone())),
            arena(len),
            NodeId(7),
            vec![dir.clone()],
            64 << 20,
        );
        (w, batches, dir)
    }

    fn item(handle: u64, offset: u64, size: u64) -> SpillItem {
        SpillItem {
            handle,
            id: ObjectId::from_bytes([u8::try_from(handle).unwrap(); ObjectId::LEN]),
            offset,
            data_size: size,
            meta_size: 0,
        }
    }

    /// A spill of small extents writes each record (header block and payload) in one batch,
    /// and the record restores.
    #[test]
    fn small_extents_are_written_in_one_batch() {
        let (mut w, batches, dir) = worker("onebatch", 1 << 20);
        let bytes: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        assert!(w.arena.write_at(8192, &bytes));
        let done = SegQueue::new();
        // The file (and its header) first, so that the count below is the records' alone.
        w.handle_batch(vec![Job::Spill(vec![item(1, 0, 100)])], &done);
        let before = batches.load(Ordering::Relaxed);
        w.handle_batch(
            vec![Job::Spill(vec![item(2, 8192, bytes.len() as u64)])],
            &done,
        );
        assert_eq!(batches.load(Ordering::Relaxed) - before, 1);
        let loc = match done.pop() {
            Some(Done::Spilled { result, .. }) => result.unwrap(),
            other => panic!("{other:?}"),
        };
        let loc = match done.pop() {
            Some(Done::Spilled { result, handle: 2 }) => result.unwrap(),
            other => panic!("{other:?} after {loc:?}"),
        };
        w.handle_batch(
            vec![Job::Restore(RestoreReq {
                handle: 3,
                id: item(2, 0, 0).id,
                loc,
                dest: 512 << 10,
                data_size: bytes.len() as u64,
                meta_size: 0,
            })],
            &done,
        );
        assert!(matches!(
            done.pop(),
            Some(Done::Restored { result: Ok(()), .. })
        ));
        assert_eq!(
            w.arena.read_at(512 << 10, bytes.len() as u64).unwrap(),
            bytes
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A panic of the hashing helper fails the batch's extents with an error that names it.
    #[test]
    fn a_hasher_panic_names_the_hasher() {
        let (mut w, _, dir) = worker("hashpanic", 8 << 20);
        let done = SegQueue::new();
        HASHER_PANICS.store(true, Ordering::Relaxed);
        w.handle_batch(vec![Job::Spill(vec![item(1, 0, 4 << 20)])], &done);
        HASHER_PANICS.store(false, Ordering::Relaxed);
        match done.pop() {
            Some(Done::Spilled {
                result: Err(SpillFail::Io(msg)),
                ..
            }) => assert!(
                msg.contains("fp-spill-sum") && msg.contains("panicked"),
                "{msg}"
            ),
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
