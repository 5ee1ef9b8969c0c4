//! The object store logic: the table of objects (states, pins, LRU, allocator) and the
//! request-handling state machine with parked requests. No I/O and no shared memory access
//! besides the `ArenaWrite` seam, so it is tested deterministically with a fake clock.

mod admission;
pub mod core;
pub mod link;
mod parking;
mod spilling;
pub mod table;

pub use self::core::{ArenaWrite, Core, CoreConfig, Outgoing, RESTORE_GRACE};
pub use parking::{MAX_PARKED_BYTES, MAX_PARKED_PER_PEER};
pub use spilling::{SpillPolicy, SPILL_BACKOFF};
pub use table::{ClientId, Table};

#[cfg(test)]
mod tests;
