//! Spilling objects to disk (issue 4). This module holds the I/O layer so far: positioned
//! reads and writes of whole buffers through io_uring, and a plain `pread`/`pwrite` engine
//! that serves as the reference in a differential test. The store does not spill yet.

pub mod format;
pub mod io;
pub mod worker;

pub use io::{open_spill_file, Op, PlainIo, SpillIo, UringIo};
