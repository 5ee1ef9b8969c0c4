//! Reliable-connected queue pairs: state transitions and work requests.

use super::*;

/// Queue sizes of a QP (`struct ibv_qp_cap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpCaps {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline_data: u32,
}

/// What the RTR transition needs to know about the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtrParams {
    pub port: u8,
    /// `enum ibv_mtu` (1..=5).
    pub mtu: u32,
    pub dest_qpn: u32,
    pub rq_psn: u32,
    pub dgid: [u8; 16],
    pub sgid_index: u8,
    pub max_dest_rd_atomic: u8,
    pub dlid: u16,
}

/// A reliable-connected queue pair (`ibv_create_qp`, `sq_sig_all = 0`), destroyed on drop.
pub struct Qp {
    pub(super) pd: Arc<Pd>,
    pub(super) _send_cq: Arc<Cq>,
    pub(super) _recv_cq: Arc<Cq>,
    pub(super) qp: *mut sys::ibv_qp,
    pub(super) qp_num: u32,
}

// SAFETY: only passed to thread-safe verbs (providers lock their queues in post_*).
unsafe impl Send for Qp {}
// SAFETY: as above.
unsafe impl Sync for Qp {}

impl fmt::Debug for Qp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qp")
            .field("qp_num", &self.qp_num)
            .finish_non_exhaustive()
    }
}

/// The largest PSN (24 bits).
const PSN_MASK: u32 = 0x00ff_ffff;

impl Qp {
    /// Creates an RC QP in RESET. The QP keeps `pd` and both CQs alive.
    pub fn new_rc(
        pd: &Arc<Pd>,
        send_cq: &Arc<Cq>,
        recv_cq: &Arc<Cq>,
        caps: QpCaps,
    ) -> Result<Qp, VerbsError> {
        let mut init = sys::ibv_qp_init_attr {
            qp_context: ptr::null_mut(),
            send_cq: send_cq.cq,
            recv_cq: recv_cq.cq,
            srq: ptr::null_mut(),
            cap: sys::ibv_qp_cap {
                max_send_wr: caps.max_send_wr,
                max_recv_wr: caps.max_recv_wr,
                max_send_sge: caps.max_send_sge,
                max_recv_sge: caps.max_recv_sge,
                max_inline_data: caps.max_inline_data,
            },
            qp_type: sys::IBV_QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: live PD and CQs (of the same context); init is a valid attr struct.
        let qp = unsafe { (pd.ctx.lib.create_qp)(pd.pd, &mut init) };
        if qp.is_null() {
            return Err(errno_error("ibv_create_qp"));
        }
        // SAFETY: qp is live.
        let qp_num = unsafe { (*qp).qp_num };
        Ok(Qp {
            pd: Arc::clone(pd),
            _send_cq: Arc::clone(send_cq),
            _recv_cq: Arc::clone(recv_cq),
            qp,
            qp_num,
        })
    }

    pub fn qp_num(&self) -> u32 {
        self.qp_num
    }

    fn modify(
        &self,
        call: &'static str,
        attr: &mut sys::ibv_qp_attr,
        mask: c_int,
    ) -> Result<(), VerbsError> {
        // SAFETY: live QP; attr is a full ibv_qp_attr with the fields named by mask set.
        check_rc(call, unsafe {
            (self.pd.ctx.lib.modify_qp)(self.qp, attr, mask)
        })
    }

    fn zero_attr() -> sys::ibv_qp_attr {
        // SAFETY: plain data; zero is valid (and is what unset fields should be).
        unsafe { std::mem::zeroed() }
    }

    /// RESET → INIT: pkey index 0, `port`, `access` (`ACCESS_*`) for remote operations.
    pub fn to_init(&self, port: u8, access: u32) -> Result<(), VerbsError> {
        let mut a = Self::zero_attr();
        a.qp_state = sys::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = port;
        a.qp_access_flags = access;
        self.modify(
            "ibv_modify_qp(INIT)",
            &mut a,
            sys::IBV_QP_STATE
                | sys::IBV_QP_PKEY_INDEX
                | sys::IBV_QP_PORT
                | sys::IBV_QP_ACCESS_FLAGS,
        )
    }

    /// INIT → RTR towards the peer in `p` (GRH always set: RoCE needs it, IB accepts it).
    pub fn to_rtr(&self, p: &RtrParams) -> Result<(), VerbsError> {
        if mtu_bytes(p.mtu).is_none() {
            return Err(VerbsError::InvalidArgument {
                call: "ibv_modify_qp(RTR)",
                what: "path MTU (enum ibv_mtu)",
                value: u64::from(p.mtu),
            });
        }
        let mut a = Self::zero_attr();
        a.qp_state = sys::IBV_QPS_RTR;
        a.path_mtu = p.mtu;
        a.dest_qp_num = p.dest_qpn;
        a.rq_psn = p.rq_psn & PSN_MASK;
        a.max_dest_rd_atomic = p.max_dest_rd_atomic;
        a.min_rnr_timer = 12;
        a.ah_attr.is_global = 1;
        a.ah_attr.grh.dgid = sys::ibv_gid { raw: p.dgid };
        a.ah_attr.grh.sgid_index = p.sgid_index;
        a.ah_attr.grh.hop_limit = 64;
        a.ah_attr.dlid = p.dlid;
        a.ah_attr.sl = 0;
        a.ah_attr.src_path_bits = 0;
        a.ah_attr.port_num = p.port;
        self.modify(
            "ibv_modify_qp(RTR)",
            &mut a,
            sys::IBV_QP_STATE
                | sys::IBV_QP_AV
                | sys::IBV_QP_PATH_MTU
                | sys::IBV_QP_DEST_QPN
                | sys::IBV_QP_RQ_PSN
                | sys::IBV_QP_MAX_DEST_RD_ATOMIC
                | sys::IBV_QP_MIN_RNR_TIMER,
        )
    }

    /// RTR → RTS: timeout 14 (~67 ms), retry_cnt 7, rnr_retry 6 (finite: the transport posts
    /// no receives a peer could be "not ready" for, and a dead peer must end in an error).
    pub fn to_rts(&self, sq_psn: u32, max_rd_atomic: u8) -> Result<(), VerbsError> {
        let mut a = Self::zero_attr();
        a.qp_state = sys::IBV_QPS_RTS;
        a.timeout = 14;
        a.retry_cnt = 7;
        a.rnr_retry = 6;
        a.sq_psn = sq_psn & PSN_MASK;
        a.max_rd_atomic = max_rd_atomic;
        self.modify(
            "ibv_modify_qp(RTS)",
            &mut a,
            sys::IBV_QP_STATE
                | sys::IBV_QP_TIMEOUT
                | sys::IBV_QP_RETRY_CNT
                | sys::IBV_QP_RNR_RETRY
                | sys::IBV_QP_SQ_PSN
                | sys::IBV_QP_MAX_QP_RD_ATOMIC,
        )
    }

    /// Any state → ERR: outstanding WRs complete with `WC_WR_FLUSH_ERR`.
    pub fn to_err(&self) -> Result<(), VerbsError> {
        let mut a = Self::zero_attr();
        a.qp_state = sys::IBV_QPS_ERR;
        self.modify("ibv_modify_qp(ERR)", &mut a, sys::IBV_QP_STATE)
    }

    fn ops(&self) -> &sys::ibv_context_ops {
        // SAFETY: live QP; its context (and the ops table in it) outlives the QP.
        unsafe { &(*(*self.qp).context).ops }
    }

    /// A zeroed send WR (unused unions stay zero, as a zero-initialised C WR would).
    fn send_wr(wr_id: u64, opcode: u32, signaled: bool) -> sys::ibv_send_wr {
        // SAFETY: plain data (integers, raw pointers, unions of those); zero is valid.
        let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.opcode = opcode;
        wr.send_flags = if signaled { sys::IBV_SEND_SIGNALED } else { 0 };
        wr
    }

    /// Posts one send-queue WR through `context->ops.post_send` (what verbs.h's inline
    /// `ibv_post_send` does).
    ///
    /// # Safety
    /// Every buffer, key and object `wr` names is valid for the WR's life: SGEs lie in
    /// registered MRs with their lkeys and belong to the NIC until the WR completes.
    unsafe fn post_wr(
        &self,
        call: &'static str,
        wr: &mut sys::ibv_send_wr,
    ) -> Result<(), VerbsError> {
        let post = self.ops().post_send.ok_or(VerbsError::Call {
            call,
            errno: libc::EOPNOTSUPP,
        })?;
        let mut bad: *mut sys::ibv_send_wr = ptr::null_mut();
        // SAFETY: live QP; wr (and what it points to) lives across the call, and the
        // provider copies it into the send queue; the caller vouches for the rest.
        check_rc(call, unsafe { post(self.qp, wr, &mut bad) })
    }

    /// Posts one send-queue WR with one SGE.
    ///
    /// # Safety
    /// As [`Qp::post_wr`].
    unsafe fn post_one(
        &self,
        call: &'static str,
        wr_id: u64,
        opcode: u32,
        sge: sys::ibv_sge,
        rdma: sys::ibv_send_wr_rdma,
        signaled: bool,
    ) -> Result<(), VerbsError> {
        let mut sge = sge;
        let mut wr = Self::send_wr(wr_id, opcode, signaled);
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.wr = sys::ibv_send_wr_wr { rdma };
        // SAFETY: sge outlives the call; the caller's contract covers the buffers.
        unsafe { self.post_wr(call, &mut wr) }
    }

    /// Binds the type-2 memory window `mw` to `[addr, addr + len)` of `mr` with `access`
    /// (`ACCESS_REMOTE_READ`, ...), under a fresh rkey (the 8-bit key of the old one
    /// incremented), which is returned and is `mw.rkey()` from now on. Remote access
    /// through that rkey is valid once this WR completes (`WC_BIND_MW`), and only through
    /// this QP (type 2B). `mr` must be registered with [`ACCESS_MW_BIND`]; `mw`, `mr` and
    /// this QP must share one PD. `mr` must stay registered while the window is bound
    /// (invalidate it first: [`Qp::post_local_inv`]).
    ///
    /// Safe: the window can only expose memory `mr` already registered, whose
    /// [`Mr::register`] contract covers NIC access.
    #[allow(clippy::too_many_arguments)]
    pub fn post_bind_mw(
        &self,
        wr_id: u64,
        mw: &mut Mw,
        mr: &Mr,
        addr: u64,
        len: u64,
        access: u32,
        signaled: bool,
    ) -> Result<u32, VerbsError> {
        const CALL: &str = "ibv_post_send(BIND_MW)";
        let old = mw.rkey();
        let new = (old & 0xffff_ff00) | (old.wrapping_add(1) & 0xff);
        let mut wr = Self::send_wr(wr_id, sys::IBV_WR_BIND_MW, signaled);
        wr.bind_mw = sys::ibv_send_wr_bind_mw {
            mw: mw.mw,
            rkey: new,
            bind_info: sys::ibv_mw_bind_info {
                mr: mr.mr,
                addr,
                length: len,
                mw_access_flags: access,
            },
        };
        // SAFETY: mw and mr are live objects (borrowed for the call; the provider copies
        // their handles and keys into the WQE); no local buffer is named.
        unsafe { self.post_wr(CALL, &mut wr) }?;
        // Providers take the current rkey from ibv_mw at post time; keep it in step, as
        // rdma-core's own bind_mw helpers do (`&mut Mw`: no concurrent bind can race).
        // SAFETY: mw.mw is live and exclusively borrowed.
        unsafe { (*mw.mw).rkey = new };
        Ok(new)
    }

    /// Invalidates `rkey` (a memory window bound through this QP): once this WR completes
    /// (`WC_LOCAL_INV`), remote access with that rkey fails and the window can be bound
    /// again.
    pub fn post_local_inv(&self, wr_id: u64, rkey: u32, signaled: bool) -> Result<(), VerbsError> {
        let mut wr = Self::send_wr(wr_id, sys::IBV_WR_LOCAL_INV, signaled);
        // The `imm_data`/`invalidate_rkey` union.
        wr.imm_data = rkey;
        // SAFETY: the WR names no buffer and no object pointer.
        unsafe { self.post_wr("ibv_post_send(LOCAL_INV)", &mut wr) }
    }

    /// RDMA READ of `len` bytes at remote `(raddr, rkey)` into local `(laddr, lkey)`.
    ///
    /// # Safety
    /// `[laddr, laddr + len)` lies in a registered MR with `lkey` (with local write access)
    /// and belongs to the NIC until the WR completes (or is flushed): nothing else may
    /// read or write it meanwhile, and it must stay mapped.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn post_read(
        &self,
        wr_id: u64,
        laddr: u64,
        len: u32,
        lkey: u32,
        raddr: u64,
        rkey: u32,
        signaled: bool,
    ) -> Result<(), VerbsError> {
        // SAFETY: the caller's contract is post_one's.
        unsafe {
            self.post_one(
                "ibv_post_send(RDMA_READ)",
                wr_id,
                sys::IBV_WR_RDMA_READ,
                sys::ibv_sge {
                    addr: laddr,
                    length: len,
                    lkey,
                },
                sys::ibv_send_wr_rdma {
                    remote_addr: raddr,
                    rkey,
                },
                signaled,
            )
        }
    }

    /// SEND of `len` bytes from `(laddr, lkey)`.
    ///
    /// # Safety
    /// `[laddr, laddr + len)` lies in a registered MR with `lkey`, stays mapped and is not
    /// written until the WR completes (or is flushed).
    pub unsafe fn post_send(
        &self,
        wr_id: u64,
        laddr: u64,
        len: u32,
        lkey: u32,
        signaled: bool,
    ) -> Result<(), VerbsError> {
        // SAFETY: the caller's contract is post_one's.
        unsafe {
            self.post_one(
                "ibv_post_send(SEND)",
                wr_id,
                sys::IBV_WR_SEND,
                sys::ibv_sge {
                    addr: laddr,
                    length: len,
                    lkey,
                },
                sys::ibv_send_wr_rdma {
                    remote_addr: 0,
                    rkey: 0,
                },
                signaled,
            )
        }
    }

    /// Posts a receive buffer `(laddr, len, lkey)`.
    ///
    /// # Safety
    /// The buffer lies in a registered MR with `lkey` (local write access), stays mapped
    /// and belongs to the NIC until its completion: nothing else reads or writes it.
    pub unsafe fn post_recv(
        &self,
        wr_id: u64,
        laddr: u64,
        len: u32,
        lkey: u32,
    ) -> Result<(), VerbsError> {
        const CALL: &str = "ibv_post_recv";
        let post = self.ops().post_recv.ok_or(VerbsError::Call {
            call: CALL,
            errno: libc::EOPNOTSUPP,
        })?;
        let mut sge = sys::ibv_sge {
            addr: laddr,
            length: len,
            lkey,
        };
        let mut wr = sys::ibv_recv_wr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad: *mut sys::ibv_recv_wr = ptr::null_mut();
        // SAFETY: live QP; wr and sge live across the call; the caller vouches for the
        // buffer. As verbs.h's inline ibv_post_recv.
        check_rc(CALL, unsafe { post(self.qp, &mut wr, &mut bad) })
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: created above, destroyed once; its CQs and PD are still alive (held).
        let rc = unsafe { (self.pd.ctx.lib.destroy_qp)(self.qp) };
        if rc != 0 {
            tracing::warn!(rc, qp_num = self.qp_num, "ibv_destroy_qp failed");
        }
    }
}
