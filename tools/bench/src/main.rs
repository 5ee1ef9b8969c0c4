//! `ferroplasma-bench`: end-to-end benchmarks that print figures next to a raw baseline
//! measured in the same run.
//!
//! `local`: small put/get rate and latency, 1 GiB put bandwidth against a plain memcpy into
//! the same kind of memory, and 1 GiB get latency.
//! `spill`: spill and restore bandwidth against raw io_uring O_DIRECT writes and reads.
//! `transfer`: node-to-node transfer bandwidth per object size, the nodes' CPU time per GiB
//! and small remote get latency between two node processes, against a raw TCP stream between
//! the same endpoints (and, over RDMA, perftest's `ib_read_bw` between the same devices).

mod bar;
mod cleanup;
mod cpu;
mod local;
mod netns;
mod perftest;
mod plot;
mod rawtcp;
mod spill;
mod stats;
mod transfer;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ferroplasma-bench",
    version,
    about = "ferroplasma benchmarks (JSON output)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Local put/get through one node.
    Local(local::Args),
    /// Spill and restore bandwidth against raw O_DIRECT I/O in the same directory.
    Spill(spill::Args),
    /// Transfer bandwidth, CPU per GiB and remote get latency between two nodes against raw
    /// TCP (or ib_read_bw over RDMA).
    Transfer(Box<transfer::Args>),
    /// Receiver of transfer's raw TCP baseline (run by `transfer`).
    #[command(hide = true)]
    RawTcpServe(rawtcp::ServeArgs),
    /// Sender of transfer's raw TCP baseline (run by `transfer`).
    #[command(hide = true)]
    RawTcpSend(rawtcp::SendArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Local(a) => local::run(a),
        Cmd::Spill(a) => spill::run(a),
        Cmd::Transfer(a) => transfer::run(*a),
        Cmd::RawTcpServe(a) => rawtcp::serve(&a),
        Cmd::RawTcpSend(a) => rawtcp::send(&a),
    }
}
