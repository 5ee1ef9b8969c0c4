//! `ferroplasma-bench spill`: spill and restore bandwidth of a node, next to raw io_uring
//! O_DIRECT sequential writes and reads of the same volume in the same directory.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferroplasma::client::{Client, ClientOptions};
use ferroplasma::protocol::ObjectState;
use ferroplasma::server::{Node, NodeConfig, SpillConfig, SpillEngine};
use ferroplasma::shm::HugepageMode;
use ferroplasma::spill::{open_spill_file, Op, PlainIo, SpillIo, UringIo};
use ferroplasma::ByteSize;
use serde_json::json;

use crate::stats::{gbps, median, progress};

#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object on stdout (progress goes to stderr)
    #[arg(long)]
    json: bool,
    /// Directory on the device to measure [default: a new directory under /var/tmp]
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Arena size of the node started here
    #[arg(long, default_value = "1GiB")]
    memory: ByteSize,
    /// Bytes pushed through the node (and written raw) per run
    #[arg(long, default_value = "2GiB")]
    volume: ByteSize,
    /// Object size
    #[arg(long, default_value = "16MiB")]
    object_size: ByteSize,
    /// Repetitions; medians are reported
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// io_uring operations in flight (node and raw baseline)
    #[arg(long, default_value_t = 8)]
    queue_depth: u32,
    /// Spill engine of the node
    #[arg(long, value_enum, default_value_t = SpillEngine::Uring)]
    engine: SpillEngine,
    /// Hugepage policy of the node
    #[arg(long, value_enum, default_value_t = HugepageMode::Auto)]
    hugepages: HugepageMode,
    /// I/O size of the raw baseline (fio's usual 1 MiB)
    #[arg(long, default_value = "1MiB")]
    raw_block: ByteSize,
}

const BATCH: usize = 256;

/// Sequential writes then reads, `block` bytes each, of `volume` bytes with `depth` in flight, O_DIRECT.
fn raw(
    dir: &Path,
    volume: u64,
    depth: u32,
    engine: SpillEngine,
    block: u64,
) -> Result<(f64, f64, bool)> {
    let chunk = usize::try_from(block.max(4096).next_multiple_of(4096))?;
    let path = dir.join("fp-bench-raw.spill");
    let _ = std::fs::remove_file(&path);
    let (fd, direct) = open_spill_file(&path, true).context("opening the raw file")?;
    let mut io: Box<dyn SpillIo> = match engine {
        SpillEngine::Uring => Box::new(UringIo::new(depth)?),
        SpillEngine::Plain => Box::new(PlainIo),
    };
    let mut buf = memmap2::MmapMut::map_anon(chunk * BATCH)?;
    for (i, b) in buf.iter_mut().enumerate() {
        *b = u8::try_from(i % 251).unwrap_or(0);
    }
    let chunks = usize::try_from(volume)? / chunk;
    let t = Instant::now();
    for start in (0..chunks).step_by(BATCH) {
        let n = BATCH.min(chunks - start);
        let mut ops: Vec<Op<'_>> = buf
            .chunks(chunk)
            .take(n)
            .enumerate()
            .map(|(k, b)| Op::Write {
                file: fd.as_fd(),
                offset: ((start + k) * chunk) as u64,
                buf: b.into(),
            })
            .collect();
        for r in io.run(&mut ops) {
            r.context("raw write")?;
        }
    }
    let write = gbps(volume, t.elapsed());
    let t = Instant::now();
    for start in (0..chunks).step_by(BATCH) {
        let n = BATCH.min(chunks - start);
        let mut ops: Vec<Op<'_>> = buf
            .chunks_mut(chunk)
            .take(n)
            .enumerate()
            .map(|(k, b)| Op::Read {
                file: fd.as_fd(),
                offset: ((start + k) * chunk) as u64,
                buf: b.into(),
            })
            .collect();
        for r in io.run(&mut ops) {
            r.context("raw read")?;
        }
    }
    let read = gbps(volume, t.elapsed());
    drop(fd);
    std::fs::remove_file(&path)?;
    Ok((write, read, direct))
}

/// Waits until the node's spilled bytes stop changing; returns them and when they last moved.
fn settle(c: &Client) -> Result<(u64, Instant)> {
    let mut last = c.stats()?.spilled_bytes;
    let mut moved = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(5));
        let now = c.stats()?.spilled_bytes;
        if now != last {
            last = now;
            moved = Instant::now();
        } else if moved.elapsed() > Duration::from_millis(300) {
            return Ok((last, moved));
        }
    }
}

/// Spill and restore bandwidth through a node.
fn through_node(a: &Args, dir: &Path, run: usize) -> Result<(f64, f64)> {
    let socket =
        std::env::temp_dir().join(format!("fp-bench-spill-{}-{run}.sock", std::process::id()));
    let mut cfg = NodeConfig::new(&socket);
    cfg.memory = Some(a.memory.0);
    cfg.hugepages = a.hugepages;
    let mut sc = SpillConfig::new(vec![dir.join("node")]);
    sc.engine = a.engine;
    sc.queue_depth = a.queue_depth;
    cfg.spill = Some(sc);
    let node = Node::start(cfg).context("starting the node")?;
    let c = Client::connect_with(
        &socket,
        ClientOptions {
            create_timeout: Duration::from_secs(60),
            ..ClientOptions::default()
        },
    )?;
    let obj = a.object_size.0;
    let src = vec![7u8; usize::try_from(obj)?];
    let put = |c: &Client| -> Result<()> {
        let mut b = c.create(obj)?;
        b.data_mut().copy_from_slice(&src);
        b.seal()?;
        Ok(())
    };
    // Fill to just under the high watermark: nothing spills yet.
    for _ in 0..(c.arena_len() * 7 / 10) / obj {
        put(&c)?;
    }
    let (before, _) = settle(&c)?;
    let t = Instant::now();
    for _ in 0..a.volume.0 / obj {
        put(&c)?;
    }
    let (after, last_move) = settle(&c)?;
    if after <= before {
        bail!("nothing was spilled: is the volume larger than the arena?");
    }
    let spill = gbps(after - before, last_move.duration_since(t));
    // Free memory, then restore up to half the arena in one get.
    let list = c.list()?;
    let resident: Vec<_> = list
        .iter()
        .filter(|e| e.state == ObjectState::Sealed)
        .map(|e| e.id)
        .collect();
    c.delete(&resident)?;
    let budget = c.arena_len() / 2 / obj;
    let spilled: Vec<_> = list
        .iter()
        .filter(|e| e.state == ObjectState::Spilled)
        .map(|e| e.id)
        .take(usize::try_from(budget)?)
        .collect();
    let t = Instant::now();
    let views = c.get(&spilled, Duration::from_secs(120))?;
    let restore = gbps(spilled.len() as u64 * obj, t.elapsed());
    if views
        .iter()
        .any(|v| v.len() as u64 != obj || v[0] != 7 || v[v.len() - 1] != 7)
    {
        bail!("restored bytes are wrong");
    }
    drop(views);
    drop(c);
    node.shutdown();
    Ok((spill, restore))
}

pub fn run(a: Args) -> Result<()> {
    let dir = match &a.dir {
        Some(d) => d.join(format!("fp-bench-{}", std::process::id())),
        None => PathBuf::from(format!("/var/tmp/fp-bench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let runs = a.runs.max(1);
    let (mut w, mut r, mut s, mut rs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut direct = false;
    for i in 0..runs {
        let (rw, rr, d) = raw(&dir, a.volume.0, a.queue_depth, a.engine, a.raw_block.0)?;
        direct = d;
        let (sp, re) = through_node(&a, &dir, i)?;
        progress(
            a.json,
            &format!(
                "run {}: raw write {rw:.2} GB/s, spill {sp:.2} GB/s, raw read {rr:.2} GB/s, restore {re:.2} GB/s",
                i + 1
            ),
        );
        w.push(rw);
        r.push(rr);
        s.push(sp);
        rs.push(re);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (raw_w, raw_r, spill, restore) = (
        median(&mut w),
        median(&mut r),
        median(&mut s),
        median(&mut rs),
    );
    let out = json!({
        "spill_gb_per_s": spill,
        "restore_gb_per_s": restore,
        "raw_write_gb_per_s": raw_w,
        "raw_read_gb_per_s": raw_r,
        "spill_ratio": spill / raw_w,
        "restore_ratio": restore / raw_r,
        "volume_bytes": a.volume.0,
        "object_bytes": a.object_size.0,
        "arena_bytes": a.memory.0,
        "queue_depth": a.queue_depth,
        "raw_block_bytes": a.raw_block.0,
        "engine": format!("{:?}", a.engine).to_lowercase(),
        "o_direct": direct,
        "runs": runs,
    });
    if a.json {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}
