//! Safe handles over the libibverbs calls the RDMA transport needs.
//!
//! libibverbs is loaded at run time ([`load`]); without it, or without an RDMA device, every
//! entry point returns [`VerbsError::Unavailable`] instead of failing to link or panicking.
//!
//! Ownership mirrors the verbs object graph, so `Drop` order is always legal:
//! [`Context`] ← [`Pd`] ← [`Mr`]; [`Context`] ← [`CompChannel`] ← [`Cq`];
//! [`Qp`] holds its [`Pd`] and both [`Cq`]s (as `Arc`s), so a CQ cannot be destroyed while
//! a QP still uses it. Every handle is `Send + Sync`: libibverbs documents all verbs as
//! thread-safe (providers lock their queues internally), and our handles only ever hand
//! the pointers to verbs.
//!
//! Every error names the failing call (`ibv_modify_qp(RTR)`, `ibv_reg_mr`, ...) and its
//! errno.

use std::ffi::{c_int, c_void, CStr};
use std::fmt;
use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::path::Path;
use std::ptr;
use std::sync::Arc;

use crate::sys;

pub use crate::sys::AbiLayout;

/// Errors of the verbs layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerbsError {
    /// RDMA cannot be used here: no libibverbs, no device, or a kernel without RDMA.
    #[error("RDMA unavailable: {reason}")]
    Unavailable { reason: String },
    /// A verbs call failed.
    #[error("{call} failed: {}", io::Error::from_raw_os_error(*errno))]
    Call { call: &'static str, errno: i32 },
    /// `Context::open` was asked for a device that is not present.
    #[error("no RDMA device named {name:?} (present: {present:?})")]
    NoSuchDevice { name: String, present: Vec<String> },
    /// An argument does not fit the verbs ABI (e.g. a length over `u32` or an unknown MTU).
    #[error("{call}: invalid {what}: {value}")]
    InvalidArgument {
        call: &'static str,
        what: &'static str,
        value: u64,
    },
}

impl VerbsError {
    /// The errno of a failed call, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Call { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// `errno` of the calling thread right now.
fn last_errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Error of a call that failed with a NULL/-1 return and `errno` set; ENOSYS (a kernel
/// without RDMA) maps to `Unavailable`.
fn errno_error(call: &'static str) -> VerbsError {
    call_error(call, last_errno())
}

fn call_error(call: &'static str, errno: i32) -> VerbsError {
    if errno == libc::ENOSYS {
        VerbsError::Unavailable {
            reason: format!("{call}: {}", io::Error::from_raw_os_error(errno)),
        }
    } else {
        VerbsError::Call { call, errno }
    }
}

/// Checks an `int` return: 0 is success; verbs return a positive errno, some providers a
/// negative one, and a few `-1` with `errno` set.
fn check_rc(call: &'static str, rc: c_int) -> Result<(), VerbsError> {
    match rc {
        0 => Ok(()),
        -1 => Err(errno_error(call)),
        rc => Err(call_error(call, rc.saturating_abs())),
    }
}

fn lib() -> Result<&'static sys::Lib, VerbsError> {
    sys::lib().map_err(|reason| VerbsError::Unavailable {
        reason: reason.to_owned(),
    })
}

/// Loads libibverbs (once; later calls are a lookup).
pub fn load() -> Result<(), VerbsError> {
    lib().map(|_| ())
}

/// Layouts of the declared verbs types, for `tests/layout.rs`.
#[doc(hidden)]
pub fn abi_layouts() -> &'static [AbiLayout] {
    sys::LAYOUTS
}

/// Access flags of memory registrations and QPs (`enum ibv_access_flags`).
pub const ACCESS_LOCAL_WRITE: u32 = 1;
pub const ACCESS_REMOTE_WRITE: u32 = 1 << 1;
pub const ACCESS_REMOTE_READ: u32 = 1 << 2;
pub const ACCESS_REMOTE_ATOMIC: u32 = 1 << 3;
pub const ACCESS_MW_BIND: u32 = 1 << 4;

/// `IBV_PORT_ACTIVE`.
pub const PORT_ACTIVE: u32 = 4;
/// `IBV_LINK_LAYER_INFINIBAND` / `IBV_LINK_LAYER_ETHERNET`.
pub const LINK_LAYER_INFINIBAND: u8 = 1;
pub const LINK_LAYER_ETHERNET: u8 = 2;

/// Bytes of an `enum ibv_mtu` value (1..=5), or `None`.
pub fn mtu_bytes(mtu: u32) -> Option<u32> {
    (1..=5).contains(&mtu).then(|| 128 << mtu)
}

/// One RDMA device as `ibv_get_device_list` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: String,
    /// The node GUID in host order (libibverbs returns it big-endian).
    pub guid: u64,
}

/// The device list, closed again before returning.
struct DeviceList {
    lib: &'static sys::Lib,
    list: *mut *mut sys::ibv_device,
    len: usize,
}

impl DeviceList {
    fn get() -> Result<Self, VerbsError> {
        let lib = lib()?;
        let mut n: c_int = 0;
        // SAFETY: n is a valid out-pointer; the call returns NULL or an array of n device
        // pointers that stays valid until ibv_free_device_list.
        let list = unsafe { (lib.get_device_list)(&mut n) };
        if list.is_null() {
            let e = last_errno();
            return Err(VerbsError::Unavailable {
                reason: format!("ibv_get_device_list: {}", io::Error::from_raw_os_error(e)),
            });
        }
        let len = usize::try_from(n).unwrap_or(0);
        let this = Self { lib, list, len };
        if len == 0 {
            return Err(VerbsError::Unavailable {
                reason: "no RDMA device".to_owned(),
            });
        }
        Ok(this)
    }

    fn device(&self, i: usize) -> *mut sys::ibv_device {
        assert!(i < self.len);
        // SAFETY: i < len, the array holds len valid entries until freed in Drop.
        unsafe { *self.list.add(i) }
    }

    fn name(&self, i: usize) -> String {
        // SAFETY: device(i) is a live device; ibv_get_device_name returns its NUL-terminated
        // name (valid as long as the device), which we copy.
        unsafe {
            let p = (self.lib.get_device_name)(self.device(i));
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        }
    }

    fn guid(&self, i: usize) -> u64 {
        // SAFETY: device(i) is a live device.
        u64::from_be(unsafe { (self.lib.get_device_guid)(self.device(i)) })
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: list came from ibv_get_device_list and is freed once; opened contexts
        // stay valid after the list is freed (libibverbs keeps the devices referenced).
        unsafe { (self.lib.free_device_list)(self.list) }
    }
}

/// The RDMA devices of this host; `Unavailable` when there is none (or no RDMA at all).
pub fn devices() -> Result<Vec<DeviceInfo>, VerbsError> {
    let list = DeviceList::get()?;
    Ok((0..list.len)
        .map(|i| DeviceInfo {
            name: list.name(i),
            guid: list.guid(i),
        })
        .collect())
}

/// Sets `O_NONBLOCK` on a file descriptor owned by libibverbs.
fn set_nonblocking(call: &'static str, fd: RawFd) -> Result<(), VerbsError> {
    // SAFETY: F_GETFL/F_SETFL on an fd we hold open; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(errno_error(call));
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(errno_error(call));
    }
    Ok(())
}

/// An open device (`ibv_open_device`), closed on drop.
///
/// `Send + Sync`: libibverbs serialises its use of a context internally (the context's own
/// mutex, the provider's locks), and we only pass the pointer to verbs.
pub struct Context {
    lib: &'static sys::Lib,
    ctx: *mut sys::ibv_context,
    name: String,
}

// SAFETY: see the type's documentation: every use is a thread-safe verb.
unsafe impl Send for Context {}
// SAFETY: as above.
unsafe impl Sync for Context {}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The attributes of `ibv_query_device` we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceAttr {
    pub max_mr_size: u64,
    pub max_qp_wr: i32,
    pub max_sge: i32,
    pub max_cqe: i32,
    pub max_mr: i32,
    pub max_qp_rd_atom: i32,
    pub max_qp_init_rd_atom: i32,
    pub device_cap_flags: u32,
    pub max_mw: i32,
    pub phys_port_cnt: u8,
}

/// The attributes of `ibv_query_port` we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortAttr {
    /// `enum ibv_port_state`; [`PORT_ACTIVE`] is 4.
    pub state: u32,
    /// `enum ibv_mtu` (1..=5 for 256..=4096 bytes, see [`mtu_bytes`]).
    pub max_mtu: u32,
    pub active_mtu: u32,
    pub gid_tbl_len: i32,
    pub lid: u16,
    /// [`LINK_LAYER_INFINIBAND`] or [`LINK_LAYER_ETHERNET`] (0: unspecified, i.e. IB).
    pub link_layer: u8,
}

/// One asynchronous event of a context (`ibv_get_async_event`, already acknowledged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncEvent {
    /// `enum ibv_event_type`.
    pub kind: u32,
    /// The QP number, for QP events.
    pub qp_num: Option<u32>,
    /// The port, for port events.
    pub port: Option<u8>,
}

// enum ibv_event_type values that name a QP or a port.
const QP_EVENTS: [u32; 8] = [1, 2, 3, 4, 5, 6, 7, 16];
const PORT_EVENTS: [u32; 7] = [9, 10, 11, 12, 13, 17, 18];

impl Context {
    /// Opens the named device, or the first one.
    pub fn open(name: Option<&str>) -> Result<Arc<Context>, VerbsError> {
        let list = DeviceList::get()?;
        let index = match name {
            None => 0,
            Some(want) => (0..list.len)
                .find(|&i| list.name(i) == want)
                .ok_or_else(|| VerbsError::NoSuchDevice {
                    name: want.to_owned(),
                    present: (0..list.len).map(|i| list.name(i)).collect(),
                })?,
        };
        let dev_name = list.name(index);
        // SAFETY: the device pointer is live while `list` is.
        let ctx = unsafe { (list.lib.open_device)(list.device(index)) };
        if ctx.is_null() {
            return Err(errno_error("ibv_open_device"));
        }
        let this = Context {
            lib: list.lib,
            ctx,
            name: dev_name,
        };
        set_nonblocking("fcntl(async_fd, O_NONBLOCK)", this.raw_async_fd())?;
        Ok(Arc::new(this))
    }

    /// The device name (e.g. `rxe0`, `mlx5_0`).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn raw_async_fd(&self) -> RawFd {
        // SAFETY: ctx is a live context; async_fd is set at open and never changes.
        unsafe { (*self.ctx).async_fd }
    }

    /// `ibv_query_device`.
    pub fn query_device(&self) -> Result<DeviceAttr, VerbsError> {
        // SAFETY: ibv_device_attr is plain data; all-zero is a valid value.
        let mut a: sys::ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: live context, out-pointer to a full ibv_device_attr.
        check_rc("ibv_query_device", unsafe {
            (self.lib.query_device)(self.ctx, &mut a)
        })?;
        Ok(DeviceAttr {
            max_mr_size: a.max_mr_size,
            max_qp_wr: a.max_qp_wr,
            max_sge: a.max_sge,
            max_cqe: a.max_cqe,
            max_mr: a.max_mr,
            max_qp_rd_atom: a.max_qp_rd_atom,
            max_qp_init_rd_atom: a.max_qp_init_rd_atom,
            device_cap_flags: a.device_cap_flags,
            max_mw: a.max_mw,
            phys_port_cnt: a.phys_port_cnt,
        })
    }

    /// `ibv_query_port` (the exported compat entry, with a zeroed full-size buffer).
    pub fn query_port(&self, port: u8) -> Result<PortAttr, VerbsError> {
        // SAFETY: plain data; zeroed as verbs.h's inline fallback does.
        let mut a: sys::ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: live context; the buffer is a full ibv_port_attr, which is at least as
        // large as the _compat_ibv_port_attr the exported symbol writes.
        check_rc("ibv_query_port", unsafe {
            (self.lib.query_port)(self.ctx, port, &mut a)
        })?;
        Ok(PortAttr {
            state: a.state,
            max_mtu: a.max_mtu,
            active_mtu: a.active_mtu,
            gid_tbl_len: a.gid_tbl_len,
            lid: a.lid,
            link_layer: a.link_layer,
        })
    }

    /// `ibv_query_gid`.
    pub fn query_gid(&self, port: u8, index: u32) -> Result<[u8; 16], VerbsError> {
        let idx = c_int::try_from(index).map_err(|_| VerbsError::InvalidArgument {
            call: "ibv_query_gid",
            what: "gid index",
            value: u64::from(index),
        })?;
        let mut gid = sys::ibv_gid { raw: [0; 16] };
        // SAFETY: live context; gid is a valid out-pointer to a union ibv_gid.
        check_rc("ibv_query_gid", unsafe {
            (self.lib.query_gid)(self.ctx, port, idx, &mut gid)
        })?;
        // SAFETY: every bit pattern is a valid [u8; 16].
        Ok(unsafe { gid.raw })
    }

    /// The context's async event fd (non-blocking); readable when
    /// [`Context::next_async_event`] has something.
    pub fn async_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd is owned by the context and stays open until it is closed in Drop,
        // which cannot happen while `self` is borrowed.
        unsafe { BorrowedFd::borrow_raw(self.raw_async_fd()) }
    }

    /// The next async event, acknowledged at once; `None` when there is none (EAGAIN).
    pub fn next_async_event(&self) -> Result<Option<AsyncEvent>, VerbsError> {
        // SAFETY: plain data (a union of pointers/int and an enum); zero is valid.
        let mut ev: sys::ibv_async_event = unsafe { std::mem::zeroed() };
        // SAFETY: live context; ev is a valid out-pointer. The fd is non-blocking.
        let rc = unsafe { (self.lib.get_async_event)(self.ctx, &mut ev) };
        if rc != 0 {
            let e = last_errno();
            if e == libc::EAGAIN || e == libc::EWOULDBLOCK {
                return Ok(None);
            }
            return Err(call_error("ibv_get_async_event", e));
        }
        let kind = ev.event_type;
        let qp_num = if QP_EVENTS.contains(&kind) {
            // SAFETY: for QP events element.qp is the affected QP, which libibverbs keeps
            // alive (ibv_destroy_qp waits) until the event is acknowledged below.
            let qp = unsafe { ev.element.qp };
            // SAFETY: as above; qp is a live ibv_qp.
            (!qp.is_null()).then(|| unsafe { (*qp).qp_num })
        } else {
            None
        };
        let port = if PORT_EVENTS.contains(&kind) {
            // SAFETY: for port events the union holds port_num.
            u8::try_from(unsafe { ev.element.port_num }).ok()
        } else {
            None
        };
        // SAFETY: ev came from ibv_get_async_event and is acknowledged exactly once.
        unsafe { (self.lib.ack_async_event)(&mut ev) };
        Ok(Some(AsyncEvent { kind, qp_num, port }))
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: every child object holds an Arc<Context>, so none is left; closed once.
        let rc = unsafe { (self.lib.close_device)(self.ctx) };
        if rc != 0 {
            tracing::warn!(device = %self.name, rc, "ibv_close_device failed");
        }
    }
}

/// A protection domain (`ibv_alloc_pd`), deallocated on drop.
pub struct Pd {
    ctx: Arc<Context>,
    pd: *mut sys::ibv_pd,
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
    pd: Arc<Pd>,
    mr: *mut sys::ibv_mr,
    addr: u64,
    len: u64,
    lkey: u32,
    rkey: u32,
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

/// A completion channel (`ibv_create_comp_channel`, fd non-blocking), destroyed on drop.
pub struct CompChannel {
    ctx: Arc<Context>,
    ch: *mut sys::ibv_comp_channel,
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
    ctx: Arc<Context>,
    // Keeps the channel alive while the CQ reports to it.
    _channel: Option<Arc<CompChannel>>,
    cq: *mut sys::ibv_cq,
    id: u64,
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
    pd: Arc<Pd>,
    _send_cq: Arc<Cq>,
    _recv_cq: Arc<Cq>,
    qp: *mut sys::ibv_qp,
    qp_num: u32,
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

    /// RTR → RTS: timeout 14 (~67 ms), retry_cnt 7, rnr_retry 7 (infinite).
    pub fn to_rts(&self, sq_psn: u32, max_rd_atomic: u8) -> Result<(), VerbsError> {
        let mut a = Self::zero_attr();
        a.qp_state = sys::IBV_QPS_RTS;
        a.timeout = 14;
        a.retry_cnt = 7;
        a.rnr_retry = 7;
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

/// A type-2 memory window (`ibv_alloc_mw` through `context->ops.alloc_mw`), deallocated
/// on drop. Bind it with [`Qp::post_bind_mw`], revoke it with [`Qp::post_local_inv`].
pub struct Mw {
    // Keeps the PD (and through it the context) alive while the window exists.
    _pd: Arc<Pd>,
    mw: *mut sys::ibv_mw,
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

/// One GID table entry as the kernel lists it in sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GidEntry {
    pub index: u32,
    pub gid: [u8; 16],
    /// The kernel's type text: `"RoCE v2"`, `"IB/RoCE v1"`, ...
    pub kind: String,
    /// The net device of a RoCE GID.
    pub netdev: Option<String>,
}

impl GidEntry {
    pub fn is_roce_v2(&self) -> bool {
        self.kind == "RoCE v2"
    }

    /// An IPv4-mapped GID (`::ffff:a.b.c.d`), i.e. the GID of an IPv4 address.
    pub fn is_ipv4_mapped(&self) -> bool {
        self.gid[..10] == [0; 10] && self.gid[10..12] == [0xff, 0xff]
    }
}

/// The GID to use for RoCE v2 connections from a [`gid_table`]: an IPv4-mapped RoCE v2
/// entry if there is one (routable; the IPv6 link-local one is not on every netdev), else
/// the first RoCE v2 entry. `None`: no RoCE v2 entry (e.g. InfiniBand; use index 0).
pub fn preferred_roce_v2_gid(table: &[GidEntry]) -> Option<&GidEntry> {
    table
        .iter()
        .find(|g| g.is_roce_v2() && g.is_ipv4_mapped())
        .or_else(|| table.iter().find(|g| g.is_roce_v2()))
}

/// Parses a sysfs GID (`fe80:0000:0000:0000:0000:0000:0000:0001`, eight 16-bit hex groups).
pub fn parse_gid(text: &str) -> Option<[u8; 16]> {
    let mut out = [0u8; 16];
    let mut groups = text.trim().split(':');
    for pair in out.chunks_exact_mut(2) {
        let g = groups.next()?;
        if g.is_empty() || g.len() > 4 {
            return None;
        }
        let v = u16::from_str_radix(g, 16).ok()?;
        pair.copy_from_slice(&v.to_be_bytes());
    }
    groups.next().is_none().then_some(out)
}

/// The GIDs of `dev`'s `port`, from `/sys/class/infiniband/<dev>/ports/<port>/`: entries
/// whose gid or type cannot be read, or whose gid is all zero, are skipped. Sorted by index.
pub fn gid_table(dev: &str, port: u8) -> Vec<GidEntry> {
    gid_table_at(
        &Path::new("/sys/class/infiniband")
            .join(dev)
            .join("ports")
            .join(port.to_string()),
    )
}

fn gid_table_at(port_dir: &Path) -> Vec<GidEntry> {
    let Ok(dir) = std::fs::read_dir(port_dir.join("gids")) else {
        return Vec::new();
    };
    let mut out: Vec<GidEntry> = dir
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            let index: u32 = name.to_str()?.parse().ok()?;
            let gid = parse_gid(&std::fs::read_to_string(e_path(port_dir, "gids", &name)).ok()?)?;
            if gid == [0; 16] {
                return None;
            }
            let kind = std::fs::read_to_string(e_path(port_dir, "gid_attrs/types", &name)).ok()?;
            let netdev = std::fs::read_to_string(e_path(port_dir, "gid_attrs/ndevs", &name))
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty());
            Some(GidEntry {
                index,
                gid,
                kind: kind.trim().to_owned(),
                netdev,
            })
        })
        .collect();
    out.sort_by_key(|g| g.index);
    out
}

fn e_path(port_dir: &Path, sub: &str, name: &std::ffi::OsStr) -> std::path::PathBuf {
    port_dir.join(sub).join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gid_text_parses() {
        let g = parse_gid("fe80:0000:0000:0000:0000:5efe:a9fe:4d01\n").unwrap();
        assert_eq!(g[..2], [0xfe, 0x80]);
        assert_eq!(g[12..], [0xa9, 0xfe, 0x4d, 0x01]);
        assert_eq!(
            parse_gid("0000:0000:0000:0000:0000:ffff:a9fe:4d01").unwrap()[10..12],
            [0xff; 2]
        );
        assert!(parse_gid("fe80::1").is_none());
        assert!(parse_gid("fe80:0:0:0:0:0:0:1:2").is_none());
        assert!(parse_gid("fe80:0:0:0:0:0:0:xyz").is_none());
        assert!(parse_gid("fe80:0:0:0:0:0:0:12345").is_none());
    }

    #[test]
    fn gid_table_reads_a_sysfs_like_tree() {
        let root = std::env::temp_dir().join(format!("fp-rdma-gids-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for d in ["gids", "gid_attrs/types", "gid_attrs/ndevs"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let w = |p: &str, s: &str| std::fs::write(root.join(p), s).unwrap();
        w("gids/0", "fe80:0000:0000:0000:0000:0000:0000:0001\n");
        w("gid_attrs/types/0", "IB/RoCE v1\n");
        w("gid_attrs/ndevs/0", "rdmanet0\n");
        w("gids/1", "0000:0000:0000:0000:0000:ffff:a9fe:4d01\n");
        w("gid_attrs/types/1", "RoCE v2\n");
        w("gid_attrs/ndevs/1", "rdmanet0\n");
        w("gids/2", "0000:0000:0000:0000:0000:0000:0000:0000\n");
        w("gid_attrs/types/2", "RoCE v2\n");
        // Index 10 has a gid but no readable type: skipped.
        w("gids/10", "fe80:0000:0000:0000:0000:0000:0000:0002\n");
        let t = gid_table_at(&root);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(t.len(), 2, "{t:?}");
        assert_eq!(t[0].index, 0);
        assert_eq!(t[0].kind, "IB/RoCE v1");
        assert_eq!(t[1].index, 1);
        assert!(t[1].is_roce_v2());
        assert_eq!(t[1].netdev.as_deref(), Some("rdmanet0"));
        assert_eq!(t[1].gid[12..], [169, 254, 77, 1]);
        assert!(t[1].is_ipv4_mapped() && !t[0].is_ipv4_mapped());
        assert_eq!(preferred_roce_v2_gid(&t).map(|g| g.index), Some(1));
        assert_eq!(preferred_roce_v2_gid(&t[..1]), None);
    }

    #[test]
    fn status_names() {
        assert_eq!(wc_status_str(WC_SUCCESS), "IBV_WC_SUCCESS");
        assert_eq!(wc_status_str(WC_WR_FLUSH_ERR), "IBV_WC_WR_FLUSH_ERR");
        assert_eq!(wc_status_str(WC_REM_ACCESS_ERR), "IBV_WC_REM_ACCESS_ERR");
        assert_eq!(wc_status_str(23), "IBV_WC_TM_RNDV_INCOMPLETE");
        assert_eq!(wc_status_str(24), "IBV_WC_UNKNOWN");
    }

    #[test]
    fn errors_name_the_call_and_errno() {
        let e = VerbsError::Call {
            call: "ibv_modify_qp(RTR)",
            errno: libc::EINVAL,
        };
        let s = e.to_string();
        assert!(s.starts_with("ibv_modify_qp(RTR) failed: "), "{s}");
        assert!(s.contains("Invalid argument"), "{s}");
        assert!(matches!(
            call_error("ibv_open_device", libc::ENOSYS),
            VerbsError::Unavailable { .. }
        ));
        assert!(
            matches!(check_rc("x", -libc::ENOMEM), Err(VerbsError::Call { errno, .. }) if errno == libc::ENOMEM)
        );
        assert!(
            matches!(check_rc("x", libc::EINVAL), Err(VerbsError::Call { errno, .. }) if errno == libc::EINVAL)
        );
        assert!(check_rc("x", 0).is_ok());
    }

    #[test]
    fn mtu_values() {
        assert_eq!(mtu_bytes(1), Some(256));
        assert_eq!(mtu_bytes(3), Some(1024));
        assert_eq!(mtu_bytes(5), Some(4096));
        assert_eq!(mtu_bytes(0), None);
        assert_eq!(mtu_bytes(6), None);
    }
}
