//! Safe handles over the libibverbs calls the RDMA transport needs.
//!
//! libibverbs is loaded at run time ([`load`]); without it, or without an RDMA device, every
//! entry point returns [`VerbsError::Unavailable`] instead of failing to link or panicking.
//!
//! Ownership mirrors the verbs object graph, so `Drop` order is always legal:
//! [`Context`] ← [`Pd`] ← [`Mr`], [`Mw`]; [`Context`] ← [`CompChannel`] ← [`Cq`];
//! [`Qp`] holds its [`Pd`] and both [`Cq`]s (as `Arc`s), so a CQ cannot be destroyed while
//! a QP still uses it. Every handle is `Send + Sync`: libibverbs documents all verbs as
//! thread-safe (providers lock their queues internally), and our handles only ever hand
//! the pointers to verbs.
//!
//! Every error names the failing call (`ibv_modify_qp(RTR)`, `ibv_reg_mr`, ...) and its
//! errno.
//!
//! Layout: this file holds errors, `load` and constants; `device` ([`Context`], queries,
//! async events), `mr` ([`Pd`], [`Mr`], [`Mw`]), `cq` ([`CompChannel`], [`Cq`], [`Wc`]),
//! `qp` ([`Qp`]) and `gid` ([`gid_table`]) hold one concept each; all are re-exported
//! here. The raw ABI lives in `crate::sys`.

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

mod cq;
mod device;
mod gid;
mod mr;
mod qp;

pub use cq::*;
pub use device::*;
pub use gid::*;
pub use mr::*;
pub use qp::*;

#[cfg(test)]
mod tests {
    use super::*;

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
