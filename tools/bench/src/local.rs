//! `ferroplasma-bench local`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferroplasma::client::{Client, ClientOptions};
use ferroplasma::server::{Node, NodeConfig};
use ferroplasma::shm::{Arena, HugepageMode};
use ferroplasma::ByteSize;
use serde_json::json;

use crate::stats::{gbps, median, percentile, progress};

#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object on stdout (progress goes to stderr)
    #[arg(long)]
    json: bool,
    /// Use a running node instead of starting one in this process
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Arena size of the node started here
    #[arg(long, default_value = "2560MiB")]
    memory: ByteSize,
    /// Hugepage policy of the node started here (and of the memcpy baseline)
    #[arg(long, value_enum, default_value_t = HugepageMode::Auto)]
    hugepages: HugepageMode,
    /// Repetitions of each measurement; medians are reported
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Small-object operations per repetition
    #[arg(long, default_value_t = 200_000)]
    small_ops: usize,
    /// Size of the large object
    #[arg(long, default_value = "1GiB")]
    large: ByteSize,
    /// Map the whole arena with MAP_POPULATE at connect
    #[arg(long)]
    populate: bool,
}

pub fn run(a: Args) -> Result<()> {
    let large = a.large.0;
    let runs = a.runs.max(1);
    let (node, socket) = match &a.socket {
        Some(s) => (None, s.clone()),
        None => {
            let socket = std::env::temp_dir().join(format!("fp-bench-{}.sock", std::process::id()));
            let mut cfg = NodeConfig::new(&socket);
            cfg.memory = Some(a.memory.0);
            cfg.hugepages = a.hugepages;
            progress(
                a.json,
                &format!("starting a node with a {} arena", a.memory),
            );
            let node = Node::start(cfg).context("starting the node")?;
            (Some(node), socket)
        }
    };
    let opts = ClientOptions {
        populate: a.populate,
        create_timeout: Duration::from_secs(30),
        ..ClientOptions::default()
    };
    let c = Client::connect_with(&socket, opts).context("connecting")?;
    if c.arena_len() < large + (16 << 20) {
        bail!(
            "the arena ({}) is too small for a {} object",
            ByteSize(c.arena_len()),
            a.large
        );
    }
    let hugepages = c.hugepages();

    // Small puts: 100-byte objects, one message each.
    let payload = [7u8; 100];
    let mut put_rates = Vec::new();
    let mut put_lat = Vec::with_capacity(a.small_ops);
    for r in 0..runs {
        let mut ids = Vec::with_capacity(a.small_ops);
        put_lat.clear();
        let t0 = Instant::now();
        for _ in 0..a.small_ops {
            let t = Instant::now();
            ids.push(c.put(&payload)?);
            put_lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let el = t0.elapsed();
        #[allow(clippy::cast_precision_loss)]
        put_rates.push(a.small_ops as f64 / el.as_secs_f64());
        for chunk in ids.chunks(4096) {
            c.delete(chunk)?;
        }
        progress(
            a.json,
            &format!("small put run {}: {:.0} ops/s", r + 1, put_rates[r]),
        );
    }
    put_lat.sort_by(f64::total_cmp);

    // Small gets of one existing object, view dropped each time.
    let id = c.put(&payload)?;
    let mut get_rates = Vec::new();
    let mut lat = Vec::with_capacity(a.small_ops);
    for r in 0..runs {
        lat.clear();
        let t0 = Instant::now();
        for _ in 0..a.small_ops {
            let t = Instant::now();
            let v = c.get(&[id], Duration::ZERO)?;
            std::hint::black_box(v[0][0]);
            drop(v);
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let el = t0.elapsed();
        #[allow(clippy::cast_precision_loss)]
        get_rates.push(a.small_ops as f64 / el.as_secs_f64());
        progress(
            a.json,
            &format!("small get run {}: {:.0} ops/s", r + 1, get_rates[r]),
        );
    }
    lat.sort_by(f64::total_cmp);

    // Large put against memcpy into the same kind of memory.
    let len = usize::try_from(large)?;
    let mut src = vec![0u8; len];
    for (i, chunk) in src.chunks_mut(4096).enumerate() {
        chunk.fill(u8::try_from(i % 251).unwrap_or(0));
    }
    let mode = if hugepages {
        HugepageMode::On
    } else {
        HugepageMode::Off
    };
    let baseline = Arena::create(large, mode).context("baseline memory")?;
    let mut memcpy = Vec::new();
    let mut puts = Vec::new();
    let mut gets = Vec::new();
    for r in 0..runs {
        // SAFETY: the baseline arena is private to this process and nothing else uses it.
        let dst = unsafe { baseline.mapping().slice_mut(0, large) }.context("baseline range")?;
        let t = Instant::now();
        dst.copy_from_slice(&src);
        memcpy.push(gbps(large, t.elapsed()));
        std::hint::black_box(&dst[len - 1]);

        let t = Instant::now();
        let mut b = c.create(large)?;
        b.data_mut().copy_from_slice(&src);
        let id = b.seal()?;
        puts.push(gbps(large, t.elapsed()));

        let t = Instant::now();
        let v = c.get(&[id], Duration::ZERO)?;
        gets.push(t.elapsed().as_secs_f64() * 1e6);

        if v[0].len() != len || v[0][len - 1] != src[len - 1] {
            bail!("large object read back wrong");
        }
        drop(v);
        c.delete(&[id])?;
        progress(
            a.json,
            &format!(
                "large run {}: put {:.2} GB/s, memcpy {:.2} GB/s, get {:.1} us",
                r + 1,
                puts[r],
                memcpy[r],
                gets[r]
            ),
        );
    }
    let first_put = puts[0];
    let put = median(&mut puts);
    let mc = median(&mut memcpy);
    let get = median(&mut gets);
    let out = json!({
        "small_put_ops_per_s": median(&mut put_rates).round(),
        "small_put_p50_us": percentile(&put_lat, 0.5),
        "small_put_p99_us": percentile(&put_lat, 0.99),
        "small_get_ops_per_s": median(&mut get_rates).round(),
        "small_get_p50_us": percentile(&lat, 0.5),
        "small_get_p99_us": percentile(&lat, 0.99),
        "put_1gib_gb_per_s": put,
        "put_1gib_first_run_gb_per_s": first_put,
        "memcpy_1gib_gb_per_s": mc,
        "put_1gib_ratio_to_memcpy": put / mc,
        "get_1gib_latency_us": get,
        "hugepages": hugepages,
        "large_object_bytes": large,
        "runs": runs,
        "small_ops_per_run": a.small_ops,
        "populate": a.populate,
        "arena_bytes": c.arena_len(),
    });
    if a.json {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    drop(c);
    drop(node);
    Ok(())
}
