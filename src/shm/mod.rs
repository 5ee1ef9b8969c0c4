//! Shared memory: the arena, its allocator, and mappings.
//!
//! `mapping` is the only module here with `unsafe`; the allocator is plain bookkeeping.

pub mod alloc;
pub mod arena;
pub mod mapping;

pub use alloc::{AllocStats, Allocation, Allocator};
pub use arena::{Arena, ArenaError, HugepageMode, MemoryFacts};
pub use mapping::SharedMapping;
