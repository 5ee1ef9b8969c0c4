//! The object store logic. No I/O and no shared memory access besides the `ArenaWrite` seam,
//! so it is tested deterministically with a fake clock.
//!
//! - [`table`]: the objects (states, pins, LRU, residence, allocator).
//! - [`core`]: [`Core`], the request-handling state machine (dispatch and stats), with
//!   `parking` (parked requests, their indexes and caps), `spilling` (spill policy, backoff,
//!   restores) and `admission` (pulls from other nodes and their admission into the arena).
//! - [`link`]: the messages between the core and the cluster side.

mod admission;
pub mod core;
pub mod link;
mod parking;
mod spilling;
pub mod table;

pub use self::core::{ArenaWrite, Core, CoreConfig, Outgoing, RESTORE_GRACE};
pub use parking::{MAX_PARKED_BYTES, MAX_PARKED_PER_PEER, PARKED_ID_COST};
pub use spilling::{SpillPolicy, SPILL_BACKOFF};
pub use table::{ClientId, Table};

#[cfg(test)]
mod tests;
