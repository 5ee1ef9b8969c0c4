//! ferroplasma's RDMA transport: one-sided RDMA READs between registered arenas over RC
//! queue pairs, with libibverbs loaded at run time (no build-time dependency on rdma-core),
//! and the TCP transport underneath for bootstrap, liveness and fall-back.

#[allow(unsafe_code)]
mod sys;
#[allow(unsafe_code)]
pub mod verbs;
