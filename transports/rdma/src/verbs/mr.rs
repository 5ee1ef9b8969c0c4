//! Protection domains, memory registrations and memory windows.

use super::*;

/// A protection domain (`ibv_alloc_pd`), deallocated on drop.
pub struct Pd {
    pub(super) ctx: Arc<Context>,
    pub(super) pd: *mut sys::ibv_pd,
}

// SAFETY: only passed to thread-safe verbs (see Context).
unsafe impl Send for Pd {}
// SAFETY: as above.
unsafe impl Sync for Pd {}

impl fmt::Debug for Pd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pd")
            .field("device", &self.ctx.name)
            .finish_non_exhaustive()
    }
}

impl Pd {
    /// `ibv_alloc_pd`.
    pub fn new(ctx: &Arc<Context>) -> Result<Arc<Pd>, VerbsError> {
        // SAFETY: live context.
        let pd = unsafe { (ctx.lib.alloc_pd)(ctx.ctx) };
        if pd.is_null() {
            return Err(errno_error("ibv_alloc_pd"));
        }
        Ok(Arc::new(Pd {
            ctx: Arc::clone(ctx),
            pd,
        }))
    }

    /// The context the PD belongs to.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }
}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: MRs and QPs hold an Arc<Pd>, so none is left; deallocated once.
        let rc = unsafe { (self.ctx.lib.dealloc_pd)(self.pd) };
        if rc != 0 {
            tracing::warn!(rc, "ibv_dealloc_pd failed");
        }
    }
}

/// A memory registration (`ibv_reg_mr`), deregistered on drop.
pub struct Mr {
    pub(super) pd: Arc<Pd>,
    pub(super) mr: *mut sys::ibv_mr,
    pub(super) addr: u64,
    pub(super) len: u64,
    pub(super) lkey: u32,
    pub(super) rkey: u32,
}

// SAFETY: only passed to thread-safe verbs; the key fields are copied out.
unsafe impl Send for Mr {}
// SAFETY: as above.
unsafe impl Sync for Mr {}

impl fmt::Debug for Mr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mr")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("lkey", &format_args!("{:#x}", self.lkey))
            .field("rkey", &format_args!("{:#x}", self.rkey))
            .finish()
    }
}

impl Mr {
    /// `ibv_reg_mr` of `[ptr, ptr + len)` with `ACCESS_*` flags.
    ///
    /// # Safety
    /// `[ptr, ptr + len)` stays mapped for the `Mr`'s life, and the caller accounts for the
    /// NIC reading (and, with write access, writing) it while registered.
    pub unsafe fn register(
        pd: &Arc<Pd>,
        ptr: *mut u8,
        len: usize,
        access: u32,
    ) -> Result<Mr, VerbsError> {
        let access_c = c_int::try_from(access).map_err(|_| VerbsError::InvalidArgument {
            call: "ibv_reg_mr",
            what: "access flags",
            value: u64::from(access),
        })?;
        // SAFETY: live PD; the caller guarantees the range stays mapped.
        let mr = unsafe { (pd.ctx.lib.reg_mr)(pd.pd, ptr.cast::<c_void>(), len, access_c) };
        if mr.is_null() {
            return Err(errno_error("ibv_reg_mr"));
        }
        // SAFETY: mr is a live ibv_mr returned above.
        let (lkey, rkey) = unsafe { ((*mr).lkey, (*mr).rkey) };
        Ok(Mr {
            pd: Arc::clone(pd),
            mr,
            addr: ptr as u64,
            len: len as u64,
            lkey,
            rkey,
        })
    }

    pub fn addr(&self) -> u64 {
        self.addr
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn lkey(&self) -> u32 {
        self.lkey
    }
    pub fn rkey(&self) -> u32 {
        self.rkey
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered above, deregistered once.
        let rc = unsafe { (self.pd.ctx.lib.dereg_mr)(self.mr) };
        if rc != 0 {
            tracing::warn!(rc, addr = self.addr, len = self.len, "ibv_dereg_mr failed");
        }
    }
}

/// A type-2 memory window (`ibv_alloc_mw` through `context->ops.alloc_mw`), deallocated
/// on drop. Bind it with [`Qp::post_bind_mw`], revoke it with [`Qp::post_local_inv`].
pub struct Mw {
    // Keeps the PD (and through it the context) alive while the window exists.
    pub(super) _pd: Arc<Pd>,
    pub(super) mw: *mut sys::ibv_mw,
}

// SAFETY: only passed to thread-safe verbs; its rkey is written only through `&mut Mw`.
unsafe impl Send for Mw {}
// SAFETY: as above.
unsafe impl Sync for Mw {}

impl fmt::Debug for Mw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mw")
            .field("rkey", &format_args!("{:#x}", self.rkey()))
            .finish_non_exhaustive()
    }
}

impl Mw {
    /// Allocates a type-2 window in `pd` (`Call { call: "ibv_alloc_mw", errno: EOPNOTSUPP }`
    /// when the provider has no memory windows).
    pub fn new(pd: &Arc<Pd>) -> Result<Mw, VerbsError> {
        const CALL: &str = "ibv_alloc_mw";
        // SAFETY: live PD; its context (and ops) outlive it.
        let alloc = unsafe { (*(*pd.pd).context).ops.alloc_mw }.ok_or(VerbsError::Call {
            call: CALL,
            errno: libc::EOPNOTSUPP,
        })?;
        // SAFETY: live PD; as verbs.h's inline ibv_alloc_mw.
        let mw = unsafe { alloc(pd.pd, sys::IBV_MW_TYPE_2) };
        if mw.is_null() {
            return Err(errno_error(CALL));
        }
        Ok(Mw {
            _pd: Arc::clone(pd),
            mw,
        })
    }

    /// The window's current rkey (the one of the last [`Qp::post_bind_mw`]).
    pub fn rkey(&self) -> u32 {
        // SAFETY: live MW; written only through &mut Mw.
        unsafe { (*self.mw).rkey }
    }
}

impl Drop for Mw {
    fn drop(&mut self) {
        // SAFETY: live MW; its context outlives it (held through the PD).
        let dealloc = unsafe { (*(*self.mw).context).ops.dealloc_mw };
        let Some(dealloc) = dealloc else {
            tracing::warn!("ibv_dealloc_mw: provider has no dealloc_mw");
            return;
        };
        // SAFETY: allocated in Mw::new, deallocated once; as verbs.h's inline ibv_dealloc_mw.
        let rc = unsafe { dealloc(self.mw) };
        if rc != 0 {
            tracing::warn!(rc, "ibv_dealloc_mw failed");
        }
    }
}
