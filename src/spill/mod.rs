//! Spilling objects to disk: the spill file format, positioned reads and writes through
//! io_uring (and a plain `pread`/`pwrite` engine as the reference in a differential test),
//! the jobs the store hands over (`job`, plain data) and the spill thread (`worker`).

pub mod format;
pub mod io;
pub mod job;
pub mod worker;

pub use io::{open_spill_file, Op, PlainIo, SpillIo, UringIo};
