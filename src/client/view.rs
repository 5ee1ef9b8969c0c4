//! Views of sealed objects and builders of new ones.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use super::{error::SealError, Inner, RequestError};
use crate::id::ObjectId;
use crate::protocol::{ObjectLoc, Reply, Request};

/// A pinned, zero-copy view of a sealed object's data. Dropping it releases the pin.
pub struct ObjectView {
    inner: Arc<Inner>,
    id: ObjectId,
    loc: ObjectLoc,
}

impl ObjectView {
    pub(super) fn new(inner: Arc<Inner>, id: ObjectId, loc: ObjectLoc) -> Self {
        Self { inner, id, loc }
    }

    pub(super) fn in_bounds(&self) -> bool {
        self.inner
            .arena
            .check_range(
                self.loc.offset,
                self.loc.data_size.saturating_add(self.loc.meta_size),
            )
            .is_some()
    }

    /// The object's id.
    pub fn id(&self) -> ObjectId {
        self.id
    }

    /// The data bytes (also what `Deref` gives).
    pub fn data(&self) -> &[u8] {
        // SAFETY: the range was bounds-checked against our mapping when the view was made and
        // the mapping lives as long as `self.inner`. The object is sealed and pinned by this
        // view, so the node neither frees nor reuses the range while `self` lives, and
        // cooperating clients never write sealed objects. A client that breaks that contract
        // (every client can write the arena, as in plasma) can change the bytes under us;
        // that is the documented trust model (docs/ARCHITECTURE.md, "Threat model").
        unsafe { self.inner.arena.slice(self.loc.offset, self.loc.data_size) }.unwrap_or(&[])
    }

    /// The metadata bytes.
    pub fn metadata(&self) -> &[u8] {
        // SAFETY: as in `data`.
        unsafe {
            self.inner
                .arena
                .slice(self.loc.offset + self.loc.data_size, self.loc.meta_size)
        }
        .unwrap_or(&[])
    }
}

impl Deref for ObjectView {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.data()
    }
}

impl AsRef<[u8]> for ObjectView {
    fn as_ref(&self) -> &[u8] {
        self.data()
    }
}

impl Drop for ObjectView {
    fn drop(&mut self) {
        self.inner.release(self.loc.handle);
    }
}

impl fmt::Debug for ObjectView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectView")
            .field("id", &self.id)
            .field("data_size", &self.loc.data_size)
            .field("meta_size", &self.loc.meta_size)
            .finish()
    }
}

/// An object being written. Fill [`ObjectBuilder::data_mut`] (and the metadata), then
/// [`ObjectBuilder::seal`]. Dropping an unsealed builder aborts the object.
pub struct ObjectBuilder {
    inner: Arc<Inner>,
    id: ObjectId,
    offset: u64,
    data_size: u64,
    meta_size: u64,
    finished: bool,
}

impl ObjectBuilder {
    pub(super) fn new(
        inner: Arc<Inner>,
        id: ObjectId,
        offset: u64,
        data_size: u64,
        meta_size: u64,
    ) -> Self {
        Self {
            inner,
            id,
            offset,
            data_size,
            meta_size,
            finished: false,
        }
    }

    /// The object's id.
    pub fn id(&self) -> ObjectId {
        self.id
    }

    /// The writable data section.
    pub fn data_mut(&mut self) -> &mut [u8] {
        // SAFETY: the range was bounds-checked against our mapping in `create_with`. The node
        // reserved it for this unsealed object, which only its creator (us) may write or read
        // until it is sealed, and `&mut self` makes this the only live slice in this process.
        // Other processes are bound by the same contract (see the trust model in
        // docs/ARCHITECTURE.md).
        unsafe { self.inner.arena.slice_mut(self.offset, self.data_size) }.unwrap_or(&mut [])
    }

    /// The writable metadata section.
    pub fn metadata_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `data_mut`.
        unsafe {
            self.inner
                .arena
                .slice_mut(self.offset + self.data_size, self.meta_size)
        }
        .unwrap_or(&mut [])
    }

    /// Makes the object immutable and visible to every client; returns its id.
    pub fn seal(mut self) -> Result<ObjectId, SealError> {
        self.finished = true;
        self.finish(Request::Seal { id: self.id })?;
        Ok(self.id)
    }

    /// Drops the object without making it visible.
    pub fn abort(mut self) -> Result<(), SealError> {
        self.finished = true;
        self.finish(Request::Abort { id: self.id })
    }

    fn finish(&self, req: Request<'_>) -> Result<(), SealError> {
        match self.inner.call(&req, &[])? {
            Ok(Reply::Done) => Ok(()),
            Ok(other) => {
                Err(RequestError::Protocol(format!("seal answered with {other:?}")).into())
            }
            Err(e) => Err(e.into()),
        }
    }
}

impl Drop for ObjectBuilder {
    fn drop(&mut self) {
        if !self.finished {
            if let Err(e) = self.finish(Request::Abort { id: self.id }) {
                tracing::debug!(id = %self.id, error = %e, "abort on drop failed");
            }
        }
    }
}

impl fmt::Debug for ObjectBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectBuilder")
            .field("id", &self.id)
            .field("data_size", &self.data_size)
            .field("meta_size", &self.meta_size)
            .finish()
    }
}
