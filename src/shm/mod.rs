//! Shared memory: the arena, its allocator, mappings, and passing their descriptors to
//! clients (`fdpass`).
//!
//! `mapping` is the only module here with `unsafe`; the allocator is plain bookkeeping.

pub mod alloc;
pub mod arena;
pub mod fdpass;
pub mod mapping;

pub use alloc::{AllocStats, Allocation, Allocator};
pub use arena::{Arena, ArenaError, HugepageMode, MemoryFacts};
pub use mapping::SharedMapping;
