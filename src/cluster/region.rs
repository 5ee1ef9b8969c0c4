//! The arena as a transport region. With the two calls in `node.rs` that start a read and
//! grant a range (`Transport::read`/`grant`, `unsafe fn`s), the only unsafe code of the
//! cluster module.
//!
//! Transports write into the arena only at a read's destination, which the core reserved for
//! that pull (created by the cluster client, invisible to clients until sealed), and send
//! only from ranges granted to a peer, which are sealed objects pinned until the grant is
//! revoked and released.

use std::sync::Arc;

use crate::shm::SharedMapping;

/// The arena as a region for any transport.
pub fn arena(arena: &Arc<SharedMapping>) -> ferroplasma_region::Region {
    // SAFETY: the region holds an Arc of the mapping, so the memory stays mapped while the
    // transport lives; which ranges it touches, and when, follows the module rule above: the
    // node touches a read's destination only after its ReadDone and writes no granted
    // (sealed, pinned) object (the SAFETY comments at `Transport::read`/`grant` in node.rs).
    // Clients are other processes, outside Rust's model: writing the arena anyway they can
    // only change the bytes the region copies and hashes (through raw pointers, never
    // through references), never where it copies them.
    unsafe { ferroplasma_region::Region::from_raw(arena.as_ptr(), arena.len(), arena.clone()) }
}
