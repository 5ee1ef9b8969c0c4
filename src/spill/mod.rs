//! Spilling objects to disk: the spill file format (pure), two I/O engines for batches of
//! positioned reads and writes (io_uring with several operations in flight, and plain
//! `pread`/`pwrite` as the reference in a differential test), the jobs the store hands over
//! (`job`, plain data), the spill worker thread that runs them, and the lock that gives each
//! spill directory to one node.

pub mod dir;
pub mod format;
pub mod io;
pub mod job;
pub mod worker;

pub use io::{open_spill_file, Dst, Op, PlainIo, SpillIo, Src, UringIo};
