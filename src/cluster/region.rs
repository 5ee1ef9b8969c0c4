//! The arena as a transport region: the only unsafe code of the cluster module.
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
    // (sealed, pinned) object. Clients that write the arena anyway only corrupt bytes: the
    // region copies and hashes through raw pointers, never through references.
    unsafe { ferroplasma_region::Region::from_raw(arena.as_ptr(), arena.len(), arena.clone()) }
}
