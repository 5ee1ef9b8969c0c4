//! The libibverbs ABI, declared by hand and loaded at run time.
//!
//! Nothing here links to libibverbs: [`lib`] `dlopen`s `libibverbs.so.1` once and resolves
//! every function we call with `dlvsym` at the exact symbol version the rdma-core headers
//! bind to (`IBVERBS_1.1`, or `IBVERBS_1.0` for the comp-channel pair that never got a
//! second version). A machine without rdma-core builds and runs; [`lib`] then reports why.
//!
//! The `#[repr(C)]` declarations below follow `/usr/include/infiniband/verbs.h`
//! (rdma-core 44). The functions verbs.h defines `static inline` (`ibv_post_send`,
//! `ibv_post_recv`, `ibv_poll_cq`, `ibv_req_notify_cq`, `ibv_alloc_mw`, `ibv_dealloc_mw`)
//! jump through `context->ops`, so the prefixes of `ibv_context`, `ibv_context_ops`,
//! `ibv_qp`, `ibv_cq` and `ibv_mw` must match the C layout exactly. Every type is declared
//! through [`c_layout!`], which also records its size, alignment and field offsets in
//! [`LAYOUTS`]; `tests/layout.rs` compiles a C program against the real header and compares
//! each number.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::mem::{align_of, offset_of, size_of};
use std::sync::OnceLock;

/// Size, alignment and field offsets of one declared type, with the C type it mirrors.
#[derive(Debug, Clone, Copy)]
pub struct AbiLayout {
    /// A C type expression for `sizeof`/`offsetof` (a `__typeof__` for anonymous members).
    pub c_type: &'static str,
    pub size: usize,
    pub align: usize,
    /// Every field of the Rust declaration with its offset; the names are the C names.
    pub fields: &'static [(&'static str, usize)],
}

/// Declares a `#[repr(C)]` struct or union and its [`AbiLayout`] (`Self::LAYOUT`) from one
/// field list, so no declared field can be left out of the layout proof.
macro_rules! c_layout {
    ($(#[$m:meta])* struct $name:ident = $cty:literal { $($f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy)]
        pub(crate) struct $name { $(pub(crate) $f: $t),* }
        c_layout!(@layout $name $cty $($f)*);
    };
    ($(#[$m:meta])* union $name:ident = $cty:literal { $($f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy)]
        pub(crate) union $name { $(pub(crate) $f: $t),* }
        c_layout!(@layout $name $cty $($f)*);
    };
    (@layout $name:ident $cty:literal $($f:ident)*) => {
        impl $name {
            pub(crate) const LAYOUT: AbiLayout = AbiLayout {
                c_type: $cty,
                size: size_of::<$name>(),
                align: align_of::<$name>(),
                fields: &[$((stringify!($f), offset_of!($name, $f))),*],
            };
        }
    };
}

/// `struct ibv_device`: only ever behind a pointer.
#[repr(C)]
pub(crate) struct ibv_device {
    _opaque: [u8; 0],
}

/// `struct ibv_srq`, `struct ibv_wq`, `struct ibv_ah`: only ever behind a pointer.
#[repr(C)]
pub(crate) struct ibv_opaque {
    _opaque: [u8; 0],
}

type Fp = Option<unsafe extern "C" fn()>;

c_layout! {
    /// `struct ibv_context_ops`: the provider's entry points for the inline verbs. Slots we
    /// never call are typed as a generic function pointer (same size and alignment).
    struct ibv_context_ops = "struct ibv_context_ops" {
        _compat_query_device: Fp,
        _compat_query_port: Fp,
        _compat_alloc_pd: Fp,
        _compat_dealloc_pd: Fp,
        _compat_reg_mr: Fp,
        _compat_rereg_mr: Fp,
        _compat_dereg_mr: Fp,
        alloc_mw: Option<unsafe extern "C" fn(*mut ibv_pd, c_uint) -> *mut ibv_mw>,
        bind_mw: Fp,
        dealloc_mw: Option<unsafe extern "C" fn(*mut ibv_mw) -> c_int>,
        _compat_create_cq: Fp,
        poll_cq: Option<unsafe extern "C" fn(*mut ibv_cq, c_int, *mut ibv_wc) -> c_int>,
        req_notify_cq: Option<unsafe extern "C" fn(*mut ibv_cq, c_int) -> c_int>,
        _compat_cq_event: Fp,
        _compat_resize_cq: Fp,
        _compat_destroy_cq: Fp,
        _compat_create_srq: Fp,
        _compat_modify_srq: Fp,
        _compat_query_srq: Fp,
        _compat_destroy_srq: Fp,
        post_srq_recv: Fp,
        _compat_create_qp: Fp,
        _compat_query_qp: Fp,
        _compat_modify_qp: Fp,
        _compat_destroy_qp: Fp,
        post_send: Option<
            unsafe extern "C" fn(*mut ibv_qp, *mut ibv_send_wr, *mut *mut ibv_send_wr) -> c_int,
        >,
        post_recv: Option<
            unsafe extern "C" fn(*mut ibv_qp, *mut ibv_recv_wr, *mut *mut ibv_recv_wr) -> c_int,
        >,
        _compat_create_ah: Fp,
        _compat_destroy_ah: Fp,
        _compat_attach_mcast: Fp,
        _compat_detach_mcast: Fp,
        _compat_async_event: Fp,
    }
}

c_layout! {
    /// `struct ibv_context`.
    struct ibv_context = "struct ibv_context" {
        device: *mut ibv_device,
        ops: ibv_context_ops,
        cmd_fd: c_int,
        async_fd: c_int,
        num_comp_vectors: c_int,
        mutex: libc::pthread_mutex_t,
        abi_compat: *mut c_void,
    }
}

c_layout! {
    /// `struct ibv_device_attr` (the output of `ibv_query_device`).
    struct ibv_device_attr = "struct ibv_device_attr" {
        fw_ver: [c_char; 64],
        node_guid: u64,
        sys_image_guid: u64,
        max_mr_size: u64,
        page_size_cap: u64,
        vendor_id: u32,
        vendor_part_id: u32,
        hw_ver: u32,
        max_qp: c_int,
        max_qp_wr: c_int,
        device_cap_flags: c_uint,
        max_sge: c_int,
        max_sge_rd: c_int,
        max_cq: c_int,
        max_cqe: c_int,
        max_mr: c_int,
        max_pd: c_int,
        max_qp_rd_atom: c_int,
        max_ee_rd_atom: c_int,
        max_res_rd_atom: c_int,
        max_qp_init_rd_atom: c_int,
        max_ee_init_rd_atom: c_int,
        atomic_cap: c_uint,
        max_ee: c_int,
        max_rdd: c_int,
        max_mw: c_int,
        max_raw_ipv6_qp: c_int,
        max_raw_ethy_qp: c_int,
        max_mcast_grp: c_int,
        max_mcast_qp_attach: c_int,
        max_total_mcast_qp_attach: c_int,
        max_ah: c_int,
        max_fmr: c_int,
        max_map_per_fmr: c_int,
        max_srq: c_int,
        max_srq_wr: c_int,
        max_srq_sge: c_int,
        max_pkeys: u16,
        local_ca_ack_delay: u8,
        phys_port_cnt: u8,
    }
}

c_layout! {
    /// `struct ibv_port_attr`. The exported `ibv_query_port` takes the older
    /// `_compat_ibv_port_attr` (a prefix of this); we hand it a zeroed buffer of this size,
    /// as verbs.h's own inline fallback does.
    struct ibv_port_attr = "struct ibv_port_attr" {
        state: c_uint,
        max_mtu: c_uint,
        active_mtu: c_uint,
        gid_tbl_len: c_int,
        port_cap_flags: u32,
        max_msg_sz: u32,
        bad_pkey_cntr: u32,
        qkey_viol_cntr: u32,
        pkey_tbl_len: u16,
        lid: u16,
        sm_lid: u16,
        lmc: u8,
        max_vl_num: u8,
        sm_sl: u8,
        subnet_timeout: u8,
        init_type_reply: u8,
        active_width: u8,
        active_speed: u8,
        phys_state: u8,
        link_layer: u8,
        flags: u8,
        port_cap_flags2: u16,
    }
}

c_layout! {
    /// `union ibv_gid`: 16 raw bytes, 8-aligned because of its `__be64` view.
    union ibv_gid = "union ibv_gid" {
        raw: [u8; 16],
        global: [u64; 2],
    }
}

c_layout! {
    /// `struct ibv_pd`.
    struct ibv_pd = "struct ibv_pd" {
        context: *mut ibv_context,
        handle: u32,
    }
}

c_layout! {
    /// `struct ibv_mr`.
    struct ibv_mr = "struct ibv_mr" {
        context: *mut ibv_context,
        pd: *mut ibv_pd,
        addr: *mut c_void,
        length: usize,
        handle: u32,
        lkey: u32,
        rkey: u32,
    }
}

c_layout! {
    /// `struct ibv_mw`.
    struct ibv_mw = "struct ibv_mw" {
        context: *mut ibv_context,
        pd: *mut ibv_pd,
        rkey: u32,
        handle: u32,
        r#type: c_uint,
    }
}

c_layout! {
    /// `struct ibv_comp_channel`.
    struct ibv_comp_channel = "struct ibv_comp_channel" {
        context: *mut ibv_context,
        fd: c_int,
        refcnt: c_int,
    }
}

c_layout! {
    /// `struct ibv_cq`.
    struct ibv_cq = "struct ibv_cq" {
        context: *mut ibv_context,
        channel: *mut ibv_comp_channel,
        cq_context: *mut c_void,
        handle: u32,
        cqe: c_int,
        mutex: libc::pthread_mutex_t,
        cond: libc::pthread_cond_t,
        comp_events_completed: u32,
        async_events_completed: u32,
    }
}

c_layout! {
    /// `struct ibv_qp`.
    struct ibv_qp = "struct ibv_qp" {
        context: *mut ibv_context,
        qp_context: *mut c_void,
        pd: *mut ibv_pd,
        send_cq: *mut ibv_cq,
        recv_cq: *mut ibv_cq,
        srq: *mut ibv_opaque,
        handle: u32,
        qp_num: u32,
        state: c_uint,
        qp_type: c_uint,
        mutex: libc::pthread_mutex_t,
        cond: libc::pthread_cond_t,
        events_completed: u32,
    }
}

c_layout! {
    /// `struct ibv_qp_cap`.
    struct ibv_qp_cap = "struct ibv_qp_cap" {
        max_send_wr: u32,
        max_recv_wr: u32,
        max_send_sge: u32,
        max_recv_sge: u32,
        max_inline_data: u32,
    }
}

c_layout! {
    /// `struct ibv_qp_init_attr`.
    struct ibv_qp_init_attr = "struct ibv_qp_init_attr" {
        qp_context: *mut c_void,
        send_cq: *mut ibv_cq,
        recv_cq: *mut ibv_cq,
        srq: *mut ibv_opaque,
        cap: ibv_qp_cap,
        qp_type: c_uint,
        sq_sig_all: c_int,
    }
}

c_layout! {
    /// `struct ibv_global_route`.
    struct ibv_global_route = "struct ibv_global_route" {
        dgid: ibv_gid,
        flow_label: u32,
        sgid_index: u8,
        hop_limit: u8,
        traffic_class: u8,
    }
}

c_layout! {
    /// `struct ibv_ah_attr`.
    struct ibv_ah_attr = "struct ibv_ah_attr" {
        grh: ibv_global_route,
        dlid: u16,
        sl: u8,
        src_path_bits: u8,
        static_rate: u8,
        is_global: u8,
        port_num: u8,
    }
}

c_layout! {
    /// `struct ibv_qp_attr` (the input of `ibv_modify_qp`).
    struct ibv_qp_attr = "struct ibv_qp_attr" {
        qp_state: c_uint,
        cur_qp_state: c_uint,
        path_mtu: c_uint,
        path_mig_state: c_uint,
        qkey: u32,
        rq_psn: u32,
        sq_psn: u32,
        dest_qp_num: u32,
        qp_access_flags: c_uint,
        cap: ibv_qp_cap,
        ah_attr: ibv_ah_attr,
        alt_ah_attr: ibv_ah_attr,
        pkey_index: u16,
        alt_pkey_index: u16,
        en_sqd_async_notify: u8,
        sq_draining: u8,
        max_rd_atomic: u8,
        max_dest_rd_atomic: u8,
        min_rnr_timer: u8,
        port_num: u8,
        timeout: u8,
        retry_cnt: u8,
        rnr_retry: u8,
        alt_port_num: u8,
        alt_timeout: u8,
        rate_limit: u32,
    }
}

c_layout! {
    /// `struct ibv_sge`.
    struct ibv_sge = "struct ibv_sge" {
        addr: u64,
        length: u32,
        lkey: u32,
    }
}

c_layout! {
    /// `wr.rdma` of `struct ibv_send_wr`.
    struct ibv_send_wr_rdma = "__typeof__(((struct ibv_send_wr *)0)->wr.rdma)" {
        remote_addr: u64,
        rkey: u32,
    }
}

c_layout! {
    /// `wr.atomic` of `struct ibv_send_wr`.
    struct ibv_send_wr_atomic = "__typeof__(((struct ibv_send_wr *)0)->wr.atomic)" {
        remote_addr: u64,
        compare_add: u64,
        swap: u64,
        rkey: u32,
    }
}

c_layout! {
    /// `wr.ud` of `struct ibv_send_wr`.
    struct ibv_send_wr_ud = "__typeof__(((struct ibv_send_wr *)0)->wr.ud)" {
        ah: *mut ibv_opaque,
        remote_qpn: u32,
        remote_qkey: u32,
    }
}

c_layout! {
    /// The `wr` union of `struct ibv_send_wr`.
    union ibv_send_wr_wr = "__typeof__(((struct ibv_send_wr *)0)->wr)" {
        rdma: ibv_send_wr_rdma,
        atomic: ibv_send_wr_atomic,
        ud: ibv_send_wr_ud,
    }
}

c_layout! {
    /// `struct ibv_mw_bind_info`.
    struct ibv_mw_bind_info = "struct ibv_mw_bind_info" {
        mr: *mut ibv_mr,
        addr: u64,
        length: u64,
        mw_access_flags: c_uint,
    }
}

c_layout! {
    /// `bind_mw` of `struct ibv_send_wr`, the largest member of its last (anonymous) union,
    /// so declaring only it gives that union's size and alignment.
    struct ibv_send_wr_bind_mw = "__typeof__(((struct ibv_send_wr *)0)->bind_mw)" {
        mw: *mut ibv_mw,
        rkey: u32,
        bind_info: ibv_mw_bind_info,
    }
}

c_layout! {
    /// `struct ibv_send_wr`. `imm_data` stands for its anonymous `imm_data`/`invalidate_rkey`
    /// union, `qp_type` for the 4-byte `qp_type.xrc` union, `bind_mw` for the anonymous
    /// `bind_mw`/`tso` union.
    struct ibv_send_wr = "struct ibv_send_wr" {
        wr_id: u64,
        next: *mut ibv_send_wr,
        sg_list: *mut ibv_sge,
        num_sge: c_int,
        opcode: c_uint,
        send_flags: c_uint,
        imm_data: u32,
        wr: ibv_send_wr_wr,
        qp_type: u32,
        bind_mw: ibv_send_wr_bind_mw,
    }
}

c_layout! {
    /// `struct ibv_recv_wr`.
    struct ibv_recv_wr = "struct ibv_recv_wr" {
        wr_id: u64,
        next: *mut ibv_recv_wr,
        sg_list: *mut ibv_sge,
        num_sge: c_int,
    }
}

c_layout! {
    /// `struct ibv_wc`. `imm_data` stands for the `imm_data`/`invalidated_rkey` union.
    struct ibv_wc = "struct ibv_wc" {
        wr_id: u64,
        status: c_uint,
        opcode: c_uint,
        vendor_err: u32,
        byte_len: u32,
        imm_data: u32,
        qp_num: u32,
        src_qp: u32,
        wc_flags: c_uint,
        pkey_index: u16,
        slid: u16,
        sl: u8,
        dlid_path_bits: u8,
    }
}

c_layout! {
    /// The `element` union of `struct ibv_async_event`.
    union ibv_async_event_element = "__typeof__(((struct ibv_async_event *)0)->element)" {
        cq: *mut ibv_cq,
        qp: *mut ibv_qp,
        srq: *mut ibv_opaque,
        wq: *mut ibv_opaque,
        port_num: c_int,
    }
}

c_layout! {
    /// `struct ibv_async_event`.
    struct ibv_async_event = "struct ibv_async_event" {
        element: ibv_async_event_element,
        event_type: c_uint,
    }
}

/// Every declared type, for the layout proof.
pub const LAYOUTS: &[AbiLayout] = &[
    ibv_context_ops::LAYOUT,
    ibv_context::LAYOUT,
    ibv_device_attr::LAYOUT,
    ibv_port_attr::LAYOUT,
    ibv_gid::LAYOUT,
    ibv_pd::LAYOUT,
    ibv_mr::LAYOUT,
    ibv_mw::LAYOUT,
    ibv_comp_channel::LAYOUT,
    ibv_cq::LAYOUT,
    ibv_qp::LAYOUT,
    ibv_qp_cap::LAYOUT,
    ibv_qp_init_attr::LAYOUT,
    ibv_global_route::LAYOUT,
    ibv_ah_attr::LAYOUT,
    ibv_qp_attr::LAYOUT,
    ibv_sge::LAYOUT,
    ibv_send_wr_rdma::LAYOUT,
    ibv_send_wr_atomic::LAYOUT,
    ibv_send_wr_ud::LAYOUT,
    ibv_send_wr_wr::LAYOUT,
    ibv_mw_bind_info::LAYOUT,
    ibv_send_wr_bind_mw::LAYOUT,
    ibv_send_wr::LAYOUT,
    ibv_recv_wr::LAYOUT,
    ibv_wc::LAYOUT,
    ibv_async_event_element::LAYOUT,
    ibv_async_event::LAYOUT,
];

// Constants from verbs.h (the enum values we use).
pub(crate) const IBV_QPT_RC: c_uint = 2;
pub(crate) const IBV_QPS_INIT: c_uint = 1;
pub(crate) const IBV_QPS_RTR: c_uint = 2;
pub(crate) const IBV_QPS_RTS: c_uint = 3;
pub(crate) const IBV_QPS_ERR: c_uint = 6;

pub(crate) const IBV_QP_STATE: c_int = 1 << 0;
pub(crate) const IBV_QP_ACCESS_FLAGS: c_int = 1 << 3;
pub(crate) const IBV_QP_PKEY_INDEX: c_int = 1 << 4;
pub(crate) const IBV_QP_PORT: c_int = 1 << 5;
pub(crate) const IBV_QP_AV: c_int = 1 << 7;
pub(crate) const IBV_QP_PATH_MTU: c_int = 1 << 8;
pub(crate) const IBV_QP_TIMEOUT: c_int = 1 << 9;
pub(crate) const IBV_QP_RETRY_CNT: c_int = 1 << 10;
pub(crate) const IBV_QP_RNR_RETRY: c_int = 1 << 11;
pub(crate) const IBV_QP_RQ_PSN: c_int = 1 << 12;
pub(crate) const IBV_QP_MAX_QP_RD_ATOMIC: c_int = 1 << 13;
pub(crate) const IBV_QP_MIN_RNR_TIMER: c_int = 1 << 15;
pub(crate) const IBV_QP_SQ_PSN: c_int = 1 << 16;
pub(crate) const IBV_QP_MAX_DEST_RD_ATOMIC: c_int = 1 << 17;
pub(crate) const IBV_QP_DEST_QPN: c_int = 1 << 20;

pub(crate) const IBV_WR_SEND: c_uint = 2;
pub(crate) const IBV_WR_RDMA_READ: c_uint = 4;
pub(crate) const IBV_WR_LOCAL_INV: c_uint = 7;
pub(crate) const IBV_WR_BIND_MW: c_uint = 8;
pub(crate) const IBV_MW_TYPE_2: c_uint = 2;
pub(crate) const IBV_SEND_SIGNALED: c_uint = 1 << 1;

/// The library's entry points, resolved once.
#[derive(Debug)]
pub(crate) struct Lib {
    pub get_device_list: unsafe extern "C" fn(*mut c_int) -> *mut *mut ibv_device,
    pub free_device_list: unsafe extern "C" fn(*mut *mut ibv_device),
    pub get_device_name: unsafe extern "C" fn(*mut ibv_device) -> *const c_char,
    pub get_device_guid: unsafe extern "C" fn(*mut ibv_device) -> u64,
    pub open_device: unsafe extern "C" fn(*mut ibv_device) -> *mut ibv_context,
    pub close_device: unsafe extern "C" fn(*mut ibv_context) -> c_int,
    pub query_device: unsafe extern "C" fn(*mut ibv_context, *mut ibv_device_attr) -> c_int,
    pub query_port: unsafe extern "C" fn(*mut ibv_context, u8, *mut ibv_port_attr) -> c_int,
    pub query_gid: unsafe extern "C" fn(*mut ibv_context, u8, c_int, *mut ibv_gid) -> c_int,
    pub get_async_event: unsafe extern "C" fn(*mut ibv_context, *mut ibv_async_event) -> c_int,
    pub ack_async_event: unsafe extern "C" fn(*mut ibv_async_event),
    pub alloc_pd: unsafe extern "C" fn(*mut ibv_context) -> *mut ibv_pd,
    pub dealloc_pd: unsafe extern "C" fn(*mut ibv_pd) -> c_int,
    pub reg_mr: unsafe extern "C" fn(*mut ibv_pd, *mut c_void, usize, c_int) -> *mut ibv_mr,
    pub dereg_mr: unsafe extern "C" fn(*mut ibv_mr) -> c_int,
    pub create_comp_channel: unsafe extern "C" fn(*mut ibv_context) -> *mut ibv_comp_channel,
    pub destroy_comp_channel: unsafe extern "C" fn(*mut ibv_comp_channel) -> c_int,
    pub create_cq: unsafe extern "C" fn(
        *mut ibv_context,
        c_int,
        *mut c_void,
        *mut ibv_comp_channel,
        c_int,
    ) -> *mut ibv_cq,
    pub destroy_cq: unsafe extern "C" fn(*mut ibv_cq) -> c_int,
    pub get_cq_event:
        unsafe extern "C" fn(*mut ibv_comp_channel, *mut *mut ibv_cq, *mut *mut c_void) -> c_int,
    pub ack_cq_events: unsafe extern "C" fn(*mut ibv_cq, c_uint),
    pub create_qp: unsafe extern "C" fn(*mut ibv_pd, *mut ibv_qp_init_attr) -> *mut ibv_qp,
    pub modify_qp: unsafe extern "C" fn(*mut ibv_qp, *mut ibv_qp_attr, c_int) -> c_int,
    pub destroy_qp: unsafe extern "C" fn(*mut ibv_qp) -> c_int,
}

const LIB_NAME: &CStr = c"libibverbs.so.1";
const V1_0: &CStr = c"IBVERBS_1.0";
const V1_1: &CStr = c"IBVERBS_1.1";

/// The loaded library, or why it could not be loaded (the same answer every time).
pub(crate) fn lib() -> Result<&'static Lib, &'static str> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(|| load(LIB_NAME))
        .as_ref()
        .map_err(String::as_str)
}

fn dlerror_text() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string valid until the next dl*
    // call on this thread; we copy it out at once.
    let p = unsafe { libc::dlerror() };
    if p.is_null() {
        "unknown dl error".to_owned()
    } else {
        // SAFETY: p is non-null and NUL-terminated (see above).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

// The transmutes below take their target type from the `Lib` field they initialise, which
// spells the C prototype once.
#[allow(clippy::missing_transmute_annotations)]
fn load(lib_name: &CStr) -> Result<Lib, String> {
    let shown = lib_name.to_string_lossy();
    // SAFETY: a NUL-terminated name; loading libibverbs runs its constructors, which only
    // initialise the library's own state.
    let handle = unsafe { libc::dlopen(lib_name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        return Err(format!("cannot load {shown}: {}", dlerror_text()));
    }
    // The handle is never closed: the function pointers below live as long as the process.
    let sym = |name: &CStr, version: &CStr| -> Result<*mut c_void, String> {
        // SAFETY: handle is a live dlopen handle; name and version are NUL-terminated.
        let p = unsafe { libc::dlvsym(handle, name.as_ptr(), version.as_ptr()) };
        if p.is_null() {
            Err(format!(
                "{shown} lacks {}@{}: {}",
                name.to_string_lossy(),
                version.to_string_lossy(),
                dlerror_text()
            ))
        } else {
            Ok(p)
        }
    };
    macro_rules! f {
        ($name:literal, $ver:expr) => {{
            let p = sym($name, $ver)?;
            // SAFETY: p is the address of the named libibverbs function at the version
            // whose prototype verbs.h declares; the field type spells that prototype.
            unsafe { std::mem::transmute::<*mut c_void, _>(p) }
        }};
    }
    Ok(Lib {
        get_device_list: f!(c"ibv_get_device_list", V1_1),
        free_device_list: f!(c"ibv_free_device_list", V1_1),
        get_device_name: f!(c"ibv_get_device_name", V1_1),
        get_device_guid: f!(c"ibv_get_device_guid", V1_1),
        open_device: f!(c"ibv_open_device", V1_1),
        close_device: f!(c"ibv_close_device", V1_1),
        query_device: f!(c"ibv_query_device", V1_1),
        query_port: f!(c"ibv_query_port", V1_1),
        query_gid: f!(c"ibv_query_gid", V1_1),
        get_async_event: f!(c"ibv_get_async_event", V1_1),
        ack_async_event: f!(c"ibv_ack_async_event", V1_1),
        alloc_pd: f!(c"ibv_alloc_pd", V1_1),
        dealloc_pd: f!(c"ibv_dealloc_pd", V1_1),
        reg_mr: f!(c"ibv_reg_mr", V1_1),
        dereg_mr: f!(c"ibv_dereg_mr", V1_1),
        create_comp_channel: f!(c"ibv_create_comp_channel", V1_0),
        destroy_comp_channel: f!(c"ibv_destroy_comp_channel", V1_0),
        create_cq: f!(c"ibv_create_cq", V1_1),
        destroy_cq: f!(c"ibv_destroy_cq", V1_1),
        get_cq_event: f!(c"ibv_get_cq_event", V1_1),
        ack_cq_events: f!(c"ibv_ack_cq_events", V1_1),
        create_qp: f!(c"ibv_create_qp", V1_1),
        modify_qp: f!(c"ibv_modify_qp", V1_1),
        destroy_qp: f!(c"ibv_destroy_qp", V1_1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_an_error_naming_it() {
        let e = load(c"libibverbs-not-installed.so.1").unwrap_err();
        assert!(
            e.starts_with("cannot load libibverbs-not-installed.so.1: "),
            "{e}"
        );
    }

    #[test]
    fn a_library_without_the_verbs_is_an_error_naming_the_symbol() {
        // libc is loaded in every test process and exports none of the verbs.
        let e = load(c"libc.so.6").unwrap_err();
        assert!(
            e.starts_with("libc.so.6 lacks ibv_get_device_list@IBVERBS_1.1"),
            "{e}"
        );
    }
}
