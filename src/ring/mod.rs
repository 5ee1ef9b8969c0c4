//! Shared-memory rings between a client and its daemon, and the control segment that holds
//! them. The only `unsafe` here turns checked offsets of a mapping into atomics and copies.

pub mod segment;
pub mod spsc;

pub use segment::{Segment, SegmentError, SegmentLayout};
pub use spsc::{Consumer, Producer, RingError};
