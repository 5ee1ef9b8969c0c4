//! The object store logic: the table of objects (states, pins, LRU, allocator) and the
//! request-handling state machine with parked requests. No I/O and no shared memory access
//! besides the `ArenaWrite` seam, so it is tested deterministically with a fake clock.

pub mod core;
pub mod link;
pub mod table;

pub use self::core::{ArenaWrite, Core, CoreConfig, Outgoing, MAX_PARKED_PER_PEER};
pub use table::{ClientId, Table};

#[cfg(test)]
mod tests;
