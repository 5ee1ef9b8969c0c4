//! The work the store hands the spill thread and the answers it gets back: plain data, no
//! I/O, so the store can use them without depending on the worker.
//!
//! Contract with the store (which decides what to spill): an object handed over in a
//! `Spill` job is sealed and frozen (not freed, not written) until its `Spilled` answer; the
//! destination of a `Restore` job is a fresh allocation nobody else sees until `Restored`.

use std::path::PathBuf;

use crate::id::ObjectId;

/// Where a spilled object lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpillLoc {
    /// File number (index in the worker's file table).
    pub file: u32,
    /// Offset of the record in the file.
    pub offset: u64,
    /// Bytes the record takes.
    pub disk_len: u64,
}

/// One object to spill.
#[derive(Clone, Copy, Debug)]
pub struct SpillItem {
    /// Table handle.
    pub handle: u64,
    /// The object.
    pub id: ObjectId,
    /// Data offset in the arena.
    pub offset: u64,
    /// Data bytes.
    pub data_size: u64,
    /// Metadata bytes.
    pub meta_size: u64,
}

/// Work for the spill thread.
#[derive(Debug)]
pub enum Job {
    /// Write these objects out.
    Spill(Vec<SpillItem>),
    /// Read an object back into a fresh allocation.
    Restore(RestoreReq),
    /// The record is no longer needed: give its disk space back.
    Free(SpillLoc),
}

/// Why a spill failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpillFail {
    /// No space left on the spill device(s).
    DiskFull,
    /// Any other I/O error.
    Io(String),
}

/// Why a restore failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreFail {
    /// Checksum or header mismatch.
    Corrupted {
        /// The spill file.
        file: PathBuf,
        /// What did not match.
        reason: String,
    },
    /// I/O error.
    Io(String),
}

/// An answer from the spill thread.
#[derive(Debug)]
pub enum Done {
    /// A spill finished.
    Spilled {
        /// Table handle.
        handle: u64,
        /// Where it went, or why not.
        result: Result<SpillLoc, SpillFail>,
    },
    /// A restore finished.
    Restored {
        /// Table handle.
        handle: u64,
        /// Success or why not.
        result: Result<(), RestoreFail>,
    },
}

/// One object to read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreReq {
    /// Table handle.
    pub handle: u64,
    /// The object.
    pub id: ObjectId,
    /// Its record.
    pub loc: SpillLoc,
    /// Arena offset of the fresh allocation to read into.
    pub dest: u64,
    /// Data bytes.
    pub data_size: u64,
    /// Metadata bytes.
    pub meta_size: u64,
}
