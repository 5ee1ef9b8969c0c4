//! Devices and the device context: listing, opening, queries, async events.

use super::*;

/// One RDMA device as `ibv_get_device_list` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: String,
    /// The node GUID in host order (libibverbs returns it big-endian).
    pub guid: u64,
}

/// The device list, closed again before returning.
struct DeviceList {
    pub(super) lib: &'static sys::Lib,
    pub(super) list: *mut *mut sys::ibv_device,
    pub(super) len: usize,
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

/// Why this host has no RDMA device to use (no libibverbs, a kernel without RDMA, no
/// device); `None` when it has one. For tests that need a device and skip, saying why.
pub fn no_device() -> Option<String> {
    match devices() {
        Ok(d) if !d.is_empty() => None,
        Ok(_) => Some("no RDMA devices".into()),
        Err(e) => Some(e.to_string()),
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

/// An open device (`ibv_open_device`), closed on drop.
///
/// `Send + Sync`: libibverbs serialises its use of a context internally (the context's own
/// mutex, the provider's locks), and we only pass the pointer to verbs.
pub struct Context {
    pub(super) lib: &'static sys::Lib,
    pub(super) ctx: *mut sys::ibv_context,
    pub(super) name: String,
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
