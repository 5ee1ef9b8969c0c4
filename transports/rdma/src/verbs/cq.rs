//! Completion channels, completion queues and work completions.

use super::*;

/// A completion channel (`ibv_create_comp_channel`, fd non-blocking), destroyed on drop.
pub struct CompChannel {
    pub(super) ctx: Arc<Context>,
    pub(super) ch: *mut sys::ibv_comp_channel,
}

// SAFETY: only passed to thread-safe verbs.
unsafe impl Send for CompChannel {}
// SAFETY: as above.
unsafe impl Sync for CompChannel {}

impl fmt::Debug for CompChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompChannel")
            .field("fd", &self.raw_fd())
            .finish_non_exhaustive()
    }
}

impl CompChannel {
    /// `ibv_create_comp_channel`; its fd is set `O_NONBLOCK`.
    pub fn new(ctx: &Arc<Context>) -> Result<Arc<CompChannel>, VerbsError> {
        // SAFETY: live context.
        let ch = unsafe { (ctx.lib.create_comp_channel)(ctx.ctx) };
        if ch.is_null() {
            return Err(errno_error("ibv_create_comp_channel"));
        }
        let this = CompChannel {
            ctx: Arc::clone(ctx),
            ch,
        };
        set_nonblocking("fcntl(comp_channel fd, O_NONBLOCK)", this.raw_fd())?;
        Ok(Arc::new(this))
    }

    fn raw_fd(&self) -> RawFd {
        // SAFETY: live channel; fd never changes.
        unsafe { (*self.ch).fd }
    }

    /// The channel's fd: readable when [`CompChannel::next_event`] has an event.
    pub fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd lives until the channel is destroyed in Drop, not while borrowed.
        unsafe { BorrowedFd::borrow_raw(self.raw_fd()) }
    }

    /// The next completion event: the `id` of the CQ that has new completions (after
    /// [`Cq::req_notify`]); `None` when there is none (EAGAIN). Each event is acknowledged
    /// at once, so dropping a [`Cq`] never waits on unacknowledged events.
    pub fn next_event(&self) -> Result<Option<u64>, VerbsError> {
        let mut cq: *mut sys::ibv_cq = ptr::null_mut();
        let mut cq_ctx: *mut c_void = ptr::null_mut();
        // SAFETY: live channel; both out-pointers are valid. The fd is non-blocking.
        let rc = unsafe { (self.ctx.lib.get_cq_event)(self.ch, &mut cq, &mut cq_ctx) };
        if rc != 0 {
            let e = last_errno();
            if e == libc::EAGAIN || e == libc::EWOULDBLOCK {
                return Ok(None);
            }
            return Err(call_error("ibv_get_cq_event", e));
        }
        // SAFETY: cq is the CQ the event came from; ibv_destroy_cq waits for this ack, so
        // it is alive; one event, acknowledged once.
        unsafe { (self.ctx.lib.ack_cq_events)(cq, 1) };
        Ok(Some(cq_ctx as u64))
    }
}

impl Drop for CompChannel {
    fn drop(&mut self) {
        // SAFETY: CQs using the channel hold an Arc<CompChannel>, so none is left.
        let rc = unsafe { (self.ctx.lib.destroy_comp_channel)(self.ch) };
        if rc != 0 {
            tracing::warn!(rc, "ibv_destroy_comp_channel failed");
        }
    }
}

/// One work completion (the fields of `struct ibv_wc` we use).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wc {
    pub wr_id: u64,
    /// `enum ibv_wc_status`: [`WC_SUCCESS`] or an error, see [`wc_status_str`].
    pub status: u32,
    /// `enum ibv_wc_opcode` (only valid when `status` is success): [`WC_RDMA_READ`], ...
    pub opcode: u32,
    pub byte_len: u32,
    pub qp_num: u32,
    pub vendor_err: u32,
}

pub const WC_SUCCESS: u32 = 0;
pub const WC_WR_FLUSH_ERR: u32 = 5;
pub const WC_REM_ACCESS_ERR: u32 = 10;
/// `enum ibv_wc_opcode` values.
pub const WC_SEND: u32 = 0;
pub const WC_RDMA_WRITE: u32 = 1;
pub const WC_RDMA_READ: u32 = 2;
pub const WC_BIND_MW: u32 = 5;
pub const WC_LOCAL_INV: u32 = 6;
pub const WC_RECV: u32 = 1 << 7;

/// The name of an `enum ibv_wc_status` value (as in verbs.h).
pub fn wc_status_str(status: u32) -> &'static str {
    const NAMES: [&str; 24] = [
        "IBV_WC_SUCCESS",
        "IBV_WC_LOC_LEN_ERR",
        "IBV_WC_LOC_QP_OP_ERR",
        "IBV_WC_LOC_EEC_OP_ERR",
        "IBV_WC_LOC_PROT_ERR",
        "IBV_WC_WR_FLUSH_ERR",
        "IBV_WC_MW_BIND_ERR",
        "IBV_WC_BAD_RESP_ERR",
        "IBV_WC_LOC_ACCESS_ERR",
        "IBV_WC_REM_INV_REQ_ERR",
        "IBV_WC_REM_ACCESS_ERR",
        "IBV_WC_REM_OP_ERR",
        "IBV_WC_RETRY_EXC_ERR",
        "IBV_WC_RNR_RETRY_EXC_ERR",
        "IBV_WC_LOC_RDD_VIOL_ERR",
        "IBV_WC_REM_INV_RD_REQ_ERR",
        "IBV_WC_REM_ABORT_ERR",
        "IBV_WC_INV_EECN_ERR",
        "IBV_WC_INV_EEC_STATE_ERR",
        "IBV_WC_FATAL_ERR",
        "IBV_WC_RESP_TIMEOUT_ERR",
        "IBV_WC_GENERAL_ERR",
        "IBV_WC_TM_ERR",
        "IBV_WC_TM_RNDV_INCOMPLETE",
    ];
    usize::try_from(status)
        .ok()
        .and_then(|i| NAMES.get(i).copied())
        .unwrap_or("IBV_WC_UNKNOWN")
}

/// A completion queue (`ibv_create_cq`), destroyed on drop.
///
/// `Cq::new` returns an `Arc` because each [`Qp`] keeps its CQs alive (a CQ must outlive
/// the QPs that use it).
pub struct Cq {
    pub(super) ctx: Arc<Context>,
    // Keeps the channel alive while the CQ reports to it.
    pub(super) _channel: Option<Arc<CompChannel>>,
    pub(super) cq: *mut sys::ibv_cq,
    pub(super) id: u64,
}

// SAFETY: only passed to thread-safe verbs (providers lock the CQ in poll_cq).
unsafe impl Send for Cq {}
// SAFETY: as above.
unsafe impl Sync for Cq {}

impl fmt::Debug for Cq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cq")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Cq {
    /// `ibv_create_cq(ctx, cqe, id, channel, 0)`: `id` comes back from
    /// [`CompChannel::next_event`].
    pub fn new(
        ctx: &Arc<Context>,
        cqe: i32,
        channel: Option<&Arc<CompChannel>>,
        id: u64,
    ) -> Result<Arc<Cq>, VerbsError> {
        let ch = channel.map_or(ptr::null_mut(), |c| c.ch);
        // The user context is an opaque pointer-sized value; we store the id in it.
        let user = usize::try_from(id).map_err(|_| VerbsError::InvalidArgument {
            call: "ibv_create_cq",
            what: "cq id (wider than a pointer)",
            value: id,
        })? as *mut c_void;
        // SAFETY: live context; ch is NULL or a live channel of the same context (kept
        // alive by the Arc stored below).
        let cq = unsafe { (ctx.lib.create_cq)(ctx.ctx, cqe, user, ch, 0) };
        if cq.is_null() {
            return Err(errno_error("ibv_create_cq"));
        }
        Ok(Arc::new(Cq {
            ctx: Arc::clone(ctx),
            _channel: channel.cloned(),
            cq,
            id,
        }))
    }

    /// The `id` given to [`Cq::new`].
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Polls up to `max` completions, appended to `out`; returns how many.
    pub fn poll(&self, out: &mut Vec<Wc>, max: usize) -> Result<usize, VerbsError> {
        const BATCH: usize = 16;
        // SAFETY: plain data; zero is valid.
        let mut wc: [sys::ibv_wc; BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: live CQ; context and ops are set by the library at open.
        let poll_cq = unsafe { (*(*self.cq).context).ops.poll_cq }.ok_or(VerbsError::Call {
            call: "ibv_poll_cq",
            errno: libc::EOPNOTSUPP,
        })?;
        let mut total = 0;
        while total < max {
            let want = (max - total).min(BATCH);
            // want <= 16.
            let want_c = c_int::try_from(want).unwrap_or(16);
            // SAFETY: live CQ; wc has room for `want` entries. This is what verbs.h's
            // inline ibv_poll_cq does.
            let n = unsafe { poll_cq(self.cq, want_c, wc.as_mut_ptr()) };
            if n < 0 {
                return Err(call_error("ibv_poll_cq", n.saturating_abs()));
            }
            let n = usize::try_from(n).unwrap_or(0).min(want);
            out.extend(wc[..n].iter().map(|w| Wc {
                wr_id: w.wr_id,
                status: w.status,
                opcode: w.opcode,
                byte_len: w.byte_len,
                qp_num: w.qp_num,
                vendor_err: w.vendor_err,
            }));
            total += n;
            if n < want {
                break;
            }
        }
        Ok(total)
    }

    /// Arms the CQ: the next completion produces one event on its channel.
    pub fn req_notify(&self) -> Result<(), VerbsError> {
        // SAFETY: live CQ; ops set at open.
        let req = unsafe { (*(*self.cq).context).ops.req_notify_cq }.ok_or(VerbsError::Call {
            call: "ibv_req_notify_cq",
            errno: libc::EOPNOTSUPP,
        })?;
        // SAFETY: live CQ; as verbs.h's inline ibv_req_notify_cq (solicited_only = 0).
        check_rc("ibv_req_notify_cq", unsafe { req(self.cq, 0) })
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: QPs using the CQ hold an Arc<Cq>, so none is left; events are acked as
        // they are read (CompChannel::next_event), so this does not block. Destroyed once.
        let rc = unsafe { (self.ctx.lib.destroy_cq)(self.cq) };
        if rc != 0 {
            tracing::warn!(rc, id = self.id, "ibv_destroy_cq failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names() {
        assert_eq!(wc_status_str(WC_SUCCESS), "IBV_WC_SUCCESS");
        assert_eq!(wc_status_str(WC_WR_FLUSH_ERR), "IBV_WC_WR_FLUSH_ERR");
        assert_eq!(wc_status_str(WC_REM_ACCESS_ERR), "IBV_WC_REM_ACCESS_ERR");
        assert_eq!(wc_status_str(23), "IBV_WC_TM_RNDV_INCOMPLETE");
        assert_eq!(wc_status_str(24), "IBV_WC_UNKNOWN");
    }
}
