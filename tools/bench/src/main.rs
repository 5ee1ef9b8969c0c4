//! `ferroplasma-bench`: end-to-end benchmarks that print figures next to a raw baseline
//! measured in the same run.
//!
//! `local`: small put/get rate and latency, 1 GiB put bandwidth against a plain memcpy into
//! the same kind of memory, and 1 GiB get latency.
//! `spill`: spill and restore bandwidth against raw io_uring O_DIRECT writes and reads.

mod local;
mod spill;
mod stats;

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
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Local(a) => local::run(a),
        Cmd::Spill(a) => spill::run(a),
    }
}
