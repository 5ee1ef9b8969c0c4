//! `ferroplasma-bench transfer`: node-to-node transfer bandwidth per object size and small
//! remote get latency between two `ferroplasma node` processes, next to a raw baseline between
//! the same two endpoints measured in the same run: a plain TCP stream, and with
//! `--transport rdma` perftest's `ib_read_bw` between the same device(s) (see
//! [`crate::perftest`]). Both nodes' CPU time during the transfers (see [`crate::cpu`]) is
//! reported per GiB moved.
//!
//! Node A owns the objects (a client of A creates and seals them); a client of B reads each
//! fresh id once, so B's first `get` is the transfer. As root, with `--transport tcp`, the
//! nodes sit in two network namespaces joined by a veth pair (`--netns`, see
//! [`crate::netns`]); otherwise both listen on 127.0.0.1, or for rdma and auto on
//! `$FERROPLASMA_RDMA_ADDR` when set (an RDMA device lives in the initial namespace). With
//! `--transport rdma` the bench fails unless B's `stat` shows A reached over RDMA before the
//! measurements, and unless every byte of the timed transfers was an RDMA READ.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferroplasma::client::{Client, ClientOptions};
use ferroplasma::{ByteSize, ObjectId};
use serde_json::{json, Value};

use crate::bar::Bar;
use crate::cleanup::{ChildGuard, TempDir};
use crate::cpu::{self, Processes, Sample};
use crate::netns::NetnsPair;
use crate::perftest::ReadBw;
use crate::rawtcp::{self, Endpoints};
use crate::stats::{gbps, median, percentile};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Arena room kept free besides the object being moved.
const SLACK: u64 = 64 * MIB;
/// Memory left to the bench process and the rest of the machine when sizing arenas.
const RESERVE: u64 = GIB;
/// Port the nodes listen on inside their namespaces.
const NETNS_PORT: u16 = 7420;
/// Page granularity of the fill pattern and its check.
const PAGE: usize = 4096;

/// Whether the nodes run in network namespaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NetnsMode {
    /// On when running as root with `ip` available, else loopback.
    Auto,
    /// Two namespaces joined by a veth pair (root only).
    On,
    /// Both nodes on 127.0.0.1.
    Off,
}

/// A node switch passed through to `ferroplasma node`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

impl OnOff {
    fn as_str(self) -> &'static str {
        match self {
            Self::On => "on",
            Self::Off => "off",
        }
    }
}

/// `--checksums` of the nodes started here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ChecksumArg {
    /// xxh3 per chunk.
    On,
    /// None.
    Off,
    /// A keyed MAC (BLAKE3 under the session key) per chunk.
    Keyed,
}

impl ChecksumArg {
    fn as_str(self) -> &'static str {
        match self {
            Self::On => "on",
            Self::Off => "off",
            Self::Keyed => "keyed",
        }
    }
}

/// Flags of `ferroplasma-bench transfer`.
#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object on stdout (progress goes to stderr either way)
    #[arg(long)]
    json: bool,
    /// Object sizes, comma-separated
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1MiB,16MiB,64MiB,256MiB,1GiB,4GiB"
    )]
    sizes: Vec<ByteSize>,
    /// Transfers per size (and raw TCP runs); medians are reported
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Use two running nodes, given by their Unix sockets: A owns the objects, B reads them
    #[arg(long, value_delimiter = ',', value_name = "A,B")]
    nodes: Vec<PathBuf>,
    /// With --nodes: address for the raw TCP baseline's receiver (sender and receiver run in
    /// this namespace); without it the baseline is skipped
    #[arg(long, value_name = "IP:PORT")]
    raw_addr: Option<SocketAddr>,
    /// Bytes the raw TCP baseline moves per run [default: the largest size up to 1GiB]
    #[arg(long, value_name = "SIZE")]
    raw_bytes: Option<ByteSize>,
    /// Write an SVG chart of bandwidth against object size
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Token file for the nodes started here [default: a fresh random token, mode 0600]
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Arena of each node started here [default: 2 x the largest size + 256MiB, capped by
    /// MemAvailable]; sizes that do not fit are skipped
    #[arg(long, value_name = "SIZE")]
    memory: Option<ByteSize>,
    /// Run the nodes in two network namespaces joined by a veth pair
    #[arg(long, value_enum, default_value_t = NetnsMode::Auto)]
    netns: NetnsMode,
    /// Objects per run for the small remote get latency
    #[arg(long, default_value_t = 200)]
    small_objects: usize,
    /// Size of those objects
    #[arg(long, default_value = "64KiB")]
    small_size: ByteSize,
    /// Per-chunk checksums between the nodes started here (their `--checksums`)
    #[arg(long, value_enum, default_value_t = ChecksumArg::On)]
    checksums: ChecksumArg,
    /// Zero-copy sends between the nodes started here (their `--zero-copy`)
    #[arg(long, value_enum, default_value_t = OnOff::Off)]
    zero_copy: OnOff,
    /// The `ferroplasma` binary that runs the nodes (and `stat`) [default: next to this binary]
    #[arg(long, value_name = "PATH")]
    ferroplasma: Option<PathBuf>,
    /// Measure only the raw TCP baseline (namespaces or loopback as --netns says); no nodes
    #[arg(long, conflicts_with = "nodes")]
    raw_only: bool,
    /// How the nodes started here move object bytes (their `--transport`). With rdma the
    /// bench fails unless B reaches A over RDMA, and the baseline is perftest's ib_read_bw;
    /// rdma and auto run the nodes without namespaces, on $FERROPLASMA_RDMA_ADDR (else
    /// 127.0.0.1)
    #[arg(long, value_enum, default_value_t = TransportArg::Tcp)]
    transport: TransportArg,
    /// RDMA device of the nodes started here (their `--rdma-device`) [default: theirs]
    #[arg(long, value_name = "NAME")]
    rdma_device: Option<String>,
    /// GID index of the nodes started here (their `--rdma-gid-index`) [default: theirs]
    #[arg(long, value_name = "N")]
    rdma_gid_index: Option<u32>,
    /// Message size of the ib_read_bw baseline
    #[arg(long, value_name = "SIZE", default_value = "1MiB")]
    raw_rdma_message: ByteSize,
    /// Silence after which the nodes started here declare each other dead (their
    /// `--dead-after-ms`) [default: theirs]
    #[arg(long, value_name = "MS")]
    dead_after_ms: Option<u64>,
    /// Bytes per ib_read_bw baseline run, in messages of --raw-rdma-message (its `-n`)
    /// [default: as --raw-bytes]
    #[arg(long, value_name = "SIZE")]
    raw_rdma_bytes: Option<ByteSize>,
}

/// `--transport` of the nodes started here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportArg {
    /// RDMA where both nodes can, TCP otherwise.
    Auto,
    /// RDMA only.
    Rdma,
    /// TCP only.
    Tcp,
}

impl TransportArg {
    fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Rdma => "rdma",
            Self::Tcp => "tcp",
        }
    }
}

/// The nodes and what they need; dropped in field order: nodes, then namespaces, then files.
struct Started {
    _b: ChildGuard,
    _a: ChildGuard,
    /// The two node processes, for their CPU time.
    cpu: Processes,
    netns: Option<NetnsPair>,
    log_a: PathBuf,
    log_b: PathBuf,
    _dir: TempDir,
}

/// Where the two nodes are and how to reach them.
struct Setup {
    socket_a: PathBuf,
    socket_b: PathBuf,
    addrs: Option<(SocketAddr, SocketAddr)>,
    raw: Option<Endpoints>,
    started: Option<Started>,
}

/// One size's result.
struct SizeResult {
    bytes: u64,
    runs: Vec<f64>,
    /// Both nodes' CPU time over the successful runs, when their pids are known.
    cpu: Option<Sample>,
    error: Option<String>,
}

impl SizeResult {
    /// CPU seconds of both nodes per GiB moved.
    fn cpu_per_gib(&self) -> Option<f64> {
        let moved = self.bytes.saturating_mul(self.runs.len() as u64);
        self.cpu
            .and_then(|t| cpu::secs_per_gib(t.duration(), moved))
    }
}

/// Runs the benchmark and prints the report (JSON with `--json`).
pub fn run(a: Args) -> Result<()> {
    let runs = a.runs.max(1);
    let mut sizes: Vec<u64> = a.sizes.iter().map(|s| s.0).filter(|&s| s > 0).collect();
    sizes.sort_unstable();
    sizes.dedup();
    if sizes.is_empty() {
        bail!("--sizes lists no non-zero size");
    }
    let largest = *sizes.last().unwrap_or(&GIB);
    let exe = std::env::current_exe().context("locating this binary")?;
    let fp = a
        .ferroplasma
        .clone()
        .unwrap_or_else(|| exe.with_file_name("ferroplasma"));
    let mut notes: Vec<String> = Vec::new();
    crate::cleanup::on_signal_clean_up()?;
    if a.raw_only {
        return raw_only(&a, &exe, runs, largest);
    }

    let setup = match a.nodes.len() {
        0 => start_nodes(&a, &fp, largest, &mut notes)?,
        2 => {
            if a.netns == NetnsMode::On {
                bail!("--netns on starts its own nodes; it does not go with --nodes");
            }
            if a.raw_addr.is_none() {
                notes.push("raw TCP baseline skipped: --nodes without --raw-addr".into());
            }
            Setup {
                socket_a: a.nodes[0].clone(),
                socket_b: a.nodes[1].clone(),
                addrs: None,
                raw: a.raw_addr.map(|listen| Endpoints {
                    recv_ns: None,
                    send_ns: None,
                    listen,
                }),
                started: None,
            }
        }
        n => bail!("--nodes takes two socket paths (A,B), got {n}"),
    };
    let netns = setup.started.as_ref().map(|s| s.netns.is_some());

    let opts = ClientOptions {
        create_timeout: Duration::from_secs(60),
        ..ClientOptions::default()
    };
    let ca = Client::connect_with(&setup.socket_a, opts.clone())
        .with_context(|| format!("connecting to node A at {}", setup.socket_a.display()))?;
    let cb = Client::connect_with(&setup.socket_b, opts)
        .with_context(|| format!("connecting to node B at {}", setup.socket_b.display()))?;
    if ca.node_id() == cb.node_id() {
        bail!("A and B are the same node ({})", ca.node_id());
    }
    let cpu = setup.started.as_ref().map(|st| st.cpu.clone());
    if cpu.is_none() {
        notes.push("cpu_seconds_per_gib not measured: the nodes were not started here".into());
    }

    // Which sizes fit in both arenas.
    let arena = ca.arena_len().min(cb.arena_len());
    let (fit, skipped): (Vec<u64>, Vec<u64>) = sizes
        .iter()
        .partition(|&&s| s.saturating_add(SLACK) <= arena);
    for &s in &skipped {
        notes.push(format!(
            "{} skipped: does not fit an arena of {} with {} to spare",
            ByteSize(s),
            ByteSize(arena),
            ByteSize(SLACK)
        ));
    }
    let raw_bytes = a
        .raw_bytes
        .map(|b| b.0)
        .unwrap_or_else(|| fit.last().copied().unwrap_or(GIB).min(GIB));

    let raw_runs = if setup.raw.is_some() { runs } else { 0 };
    // The RDMA baseline's runs are counted once the path is known.
    let rdma_runs = if a.transport == TransportArg::Tcp {
        0
    } else {
        runs
    };
    let mut bar = Bar::new(1 + 1 + raw_runs + rdma_runs + fit.len() * runs + runs + 1);
    for n in &notes {
        bar.note(n);
    }

    // Warm-up: the first transfer between two nodes may set up connections.
    bar.show("warm-up transfer");
    let warm = match transfer_once(&ca, &cb, MIB.min(arena / 4), 0xA5, None) {
        Ok((w, _)) => w,
        Err(e) => {
            bar.finish();
            dump_logs(&setup);
            return Err(e.context("warm-up transfer of 1MiB from A to B"));
        }
    };
    bar.step(&format!("warm-up: {:.1} ms", warm.as_secs_f64() * 1e3));

    // How B reaches A: with --transport rdma, RDMA or the bench fails here.
    bar.show("transport between the nodes");
    let path = match resolve_path(&fp, &setup.socket_b, &ca.node_id().to_string(), a.transport) {
        Ok(p) => p,
        Err(e) => {
            bar.finish();
            dump_logs(&setup);
            return Err(e);
        }
    };
    let transport = path.kind.clone();
    bar.step(&format!("B reaches A over {transport}"));
    if transport != "rdma" {
        bar.skip(rdma_runs);
    }

    // Raw TCP baseline.
    let raw_results = match &setup.raw {
        Some(ep) => measure_raw(&mut bar, &exe, ep, raw_bytes, runs)?,
        None => Vec::new(),
    };
    let raw = (!raw_results.is_empty()).then(|| median(&mut raw_results.clone()));

    // Raw RDMA baseline: ib_read_bw between the device(s) the nodes use.
    let read_bw = if transport == "rdma" {
        Some(read_bw_for(&a, &path, raw_bytes)?)
    } else {
        None
    };
    let rdma_results = match &read_bw {
        Some(rb) => measure_rdma(&mut bar, rb, runs)?,
        None => Vec::new(),
    };
    let raw_rdma = (!rdma_results.is_empty()).then(|| median(&mut rdma_results.clone()));

    // Bandwidth per size; failures are reported with the figures, then fail the command.
    let mut errors: Vec<String> = Vec::new();
    let rdma_bytes_before = rdma_bytes_read(&fp, &setup.socket_b);
    let mut results = Vec::new();
    for &size in &fit {
        let mut res = SizeResult {
            bytes: size,
            runs: Vec::new(),
            cpu: None,
            error: None,
        };
        for r in 0..runs {
            let what = format!("{} run {}/{runs}", ByteSize(size), r + 1);
            bar.show(&what);
            let tag = u8::try_from(r % 200 + 1).unwrap_or(1);
            match transfer_once(&ca, &cb, size, tag, cpu.as_ref()) {
                Ok((d, t)) => {
                    let g = gbps(size, d);
                    res.runs.push(g);
                    if let Some(t) = t {
                        res.cpu = Some(res.cpu.map_or(t, |sum| sum.plus(t)));
                    }
                    bar.step(&format!("{what}: {g:.2} GB/s"));
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    bar.note(&format!("{what} failed: {msg}"));
                    errors.push(format!("{}: {msg}", ByteSize(size)));
                    res.error = Some(msg);
                    bar.skip(runs - r);
                    break;
                }
            }
        }
        results.push(res);
    }
    // Over RDMA every byte of these transfers is an RDMA READ on B; fewer means some moved
    // over TCP (a fail-over), and the figures are not RDMA's. B's stat refreshes its transport
    // figures with each heartbeat (500 ms by default), so the last transfer may take a beat
    // or two to show. (The count before may be as stale: it then still lacks the warm-up's
    // 1 MiB, which only makes the check that much more lenient.)
    let moved: u64 = results
        .iter()
        .map(|r| r.bytes.saturating_mul(r.runs.len() as u64))
        .sum();
    let rdma_bytes = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = rdma_bytes_read(&fp, &setup.socket_b)
                .zip(rdma_bytes_before)
                .map(|(after, before)| after.saturating_sub(before));
            if transport != "rdma" || n.is_none_or(|n| n >= moved) || Instant::now() > deadline {
                break n;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    if transport == "rdma" {
        match rdma_bytes {
            Some(n) if n >= moved => {}
            Some(n) => errors.push(format!(
                "B read {n} bytes over RDMA during transfers of {moved} bytes: the rest moved over \
                 TCP (see rdma_failovers in `ferroplasma stat`)"
            )),
            None => notes.push("B's stat shows no rdma_bytes_read: not cross-checked".into()),
        }
    }

    // Small remote gets.
    let mut lat = Vec::new();
    for r in 0..runs {
        let what = format!(
            "{} x {} remote gets run {}/{runs}",
            a.small_objects,
            ByteSize(a.small_size.0),
            r + 1
        );
        bar.show(&what);
        match small_gets(&ca, &cb, a.small_size.0, a.small_objects, r) {
            Ok(l) => {
                lat.extend(l);
                bar.step(&what);
            }
            Err(e) => {
                let msg = format!("small remote gets: {e:#}");
                bar.note(&msg);
                errors.push(msg);
                lat.clear();
                bar.skip(runs - r);
                break;
            }
        }
    }
    bar.finish();
    lat.sort_by(f64::total_cmp);
    let (p50, p99) = if lat.is_empty() {
        (None, None)
    } else {
        (Some(percentile(&lat, 0.5)), Some(percentile(&lat, 0.99)))
    };

    // What a chunk check costs, on this core, over the largest size measured (at most
    // 256MiB), in chunks as the nodes cut them.
    bar.show("checksum cost");
    let sums = checksum_cost(fit.last().copied().unwrap_or(64 * MIB).min(256 * MIB), runs);
    bar.step(&format!(
        "checksum cost: keyed {:.2} GB/s, xxh3 {:.2} GB/s",
        sums.keyed, sums.xxh3
    ));

    // The ratio's size: 1 GiB, or the largest size measured when 1 GiB was not.
    let at = ratio_row(&results);
    let (baseline, baseline_name) = if transport == "rdma" {
        (raw_rdma, "raw_rdma_gb_per_s")
    } else {
        (raw, "raw_tcp_gb_per_s")
    };
    let ratio = at.map(|(_, g)| g).zip(baseline).map(|(g, r)| g / r);
    if let Some((bytes, _)) = at.filter(|&(b, _)| b != GIB) {
        notes.push(format!(
            "ratio_to_raw_at_1gib is taken at {} (1GiB not measured)",
            ByteSize(bytes)
        ));
    }
    // CPU per GiB at the largest size measured.
    let cpu_top = results
        .iter()
        .rev()
        .find(|r| !r.runs.is_empty())
        .and_then(SizeResult::cpu_per_gib);
    let size_json: Vec<Value> = results
        .iter()
        .map(|r| {
            json!({
                "bytes": r.bytes,
                "gb_per_s": finite(median(&mut r.runs.clone())),
                "runs_gb_per_s": r.runs,
                "cpu_seconds_per_gib": r.cpu_per_gib(),
                "cpu_seconds": r.cpu.map(|t| t.duration().as_secs_f64()),
                "cpu_ticks": r.cpu.map(|t| t.ticks),
                "error": r.error,
            })
        })
        .collect();
    let out = json!({
        "transport": transport,
        "transport_requested": a.transport.as_str(),
        "transport_reason": path.reason,
        "netns": netns,
        "node_addrs": setup.addrs.map(|(x, y)| vec![x.to_string(), y.to_string()]),
        "nodes_started_here": setup.started.is_some(),
        "sizes": size_json,
        "skipped_sizes": skipped,
        "raw_tcp_gb_per_s": raw,
        "raw_tcp_runs_gb_per_s": raw_results,
        "raw_tcp_bytes": setup.raw.as_ref().map(|_| raw_bytes),
        "raw_rdma_gb_per_s": raw_rdma,
        "raw_rdma_runs_gb_per_s": read_bw.as_ref().map(|_| &rdma_results),
        "raw_rdma_message_bytes": read_bw.as_ref().map(|r| r.message),
        "raw_rdma_bytes": read_bw.as_ref().map(|r| r.message * r.iterations),
        "raw_rdma_device": read_bw.as_ref().map(|r| r.device.clone()),
        "raw_rdma_gid_index": read_bw.as_ref().map(|r| r.gid_index),
        "rdma_bytes_read": rdma_bytes,
        "ratio_to_raw_at_1gib": ratio,
        "ratio_size_bytes": at.map(|(b, _)| b),
        "ratio_baseline": baseline.map(|_| baseline_name),
        "cpu_seconds_per_gib": cpu_top,
        "cpu_ticks_per_second": cpu.as_ref().map(|_| cpu::ticks_per_second()),
        "cpu_source": results
            .iter()
            .find_map(|r| r.cpu)
            .map(|c| if c.run_ns.is_some() { "schedstat" } else { "stat_ticks" }),
        "small_remote_get_p50_us": p50,
        "small_remote_get_p99_us": p99,
        "small_object_bytes": a.small_size.0,
        "small_objects_per_run": a.small_objects,
        // Known when the nodes were started here; else whatever their stat says, if anything.
        // Kept for older readers: true for both `on` and `keyed`; `checksum_mode` (on, off or
        // keyed) is authoritative.
        "checksums": match (&setup.started, path.stat.get("checksums")) {
            (Some(_), _) => Value::Bool(a.checksums != ChecksumArg::Off),
            (None, Some(v)) => v.clone(),
            (None, None) => Value::Null,
        },
        "checksum_mode": setup.started.as_ref().map(|_| a.checksums.as_str()),
        // In-process, one core: what each kind of chunk check costs to compute per byte.
        "keyed_checksum_gb_per_s": sums.keyed,
        "xxh3_checksum_gb_per_s": sums.xxh3,
        "checksum_cost_bytes": sums.bytes,
        "zero_copy": setup.started.as_ref().map(|_| a.zero_copy == OnOff::On),
        "verified": errors.is_empty(),
        "hugepages": ca.hugepages() && cb.hugepages(),
        "arena_bytes": arena,
        "runs": runs,
        "notes": notes,
        "errors": errors,
    });

    if let Some(p) = &a.plot {
        let raw_label = if transport == "rdma" {
            "ib_read_bw, same device"
        } else {
            "raw TCP, same endpoints"
        };
        let pts: Vec<(u64, f64)> = results
            .iter()
            .map(|r| (r.bytes, median(&mut r.runs.clone())))
            .collect();
        let title = format!(
            "ferroplasma transfer ({transport}, {})",
            match netns {
                Some(true) => "veth between network namespaces",
                Some(false) => "loopback",
                None => "given nodes",
            }
        );
        std::fs::write(
            p,
            crate::plot::transfer_svg(&title, &pts, baseline, raw_label),
        )
        .with_context(|| format!("writing {}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    if a.json {
        println!("{out}");
    } else {
        print_human(&Human {
            results: &results,
            raw,
            raw_bytes,
            raw_rdma,
            ratio,
            ratio_bytes: at.map(|(b, _)| b),
            cpu: cpu_top,
            p50,
            p99,
            transport: &transport,
            notes: &notes,
        });
        println!(
            "chunk checks over {} in-process: keyed (BLAKE3) {:.2} GB/s, xxh3 {:.2} GB/s",
            ByteSize(sums.bytes),
            sums.keyed,
            sums.xxh3
        );
    }
    drop((ca, cb));
    if !errors.is_empty() {
        dump_logs(&setup);
        drop(setup);
        bail!(
            "{} measurement(s) failed: {}",
            errors.len(),
            errors.join("; ")
        );
    }
    Ok(())
}

/// `runs` raw TCP baseline runs of `bytes`, in GB/s.
fn measure_raw(
    bar: &mut Bar,
    exe: &Path,
    ep: &Endpoints,
    bytes: u64,
    runs: usize,
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(runs);
    for r in 0..runs {
        let what = format!("raw TCP {} run {}/{runs}", ByteSize(bytes), r + 1);
        bar.show(&what);
        let g = rawtcp::measure(exe, ep, bytes).context("raw TCP baseline")?;
        out.push(g);
        bar.step(&format!("{what}: {g:.2} GB/s"));
    }
    Ok(out)
}

/// `runs` raw RDMA baseline runs (ib_read_bw), in GB/s.
fn measure_rdma(bar: &mut Bar, rb: &ReadBw, runs: usize) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(runs);
    let mut ports = || free_port(Ipv4Addr::LOCALHOST.into());
    for r in 0..runs {
        let what = format!(
            "ib_read_bw {} x {} on {} run {}/{runs}",
            rb.iterations,
            ByteSize(rb.message),
            rb.device,
            r + 1
        );
        bar.show(&what);
        let g = rb
            .measure(&mut ports)
            .context("raw RDMA baseline (ib_read_bw)")?;
        out.push(g);
        bar.step(&format!("{what}: {g:.3} GB/s"));
    }
    Ok(out)
}

/// How B reaches A, from B's `stat --json`.
struct PeerPath {
    /// `rdma` or `tcp`.
    kind: String,
    /// Why, as B's stat says (empty when there is nothing to say).
    reason: String,
    /// A's address as B's member list has it.
    addr: Option<IpAddr>,
    /// B's last `stat --json`.
    stat: Value,
}

/// The transport, reason and address B's `stat` lists for member `node`.
fn member_path(stat: &Value, node: &str) -> Option<(String, String, Option<IpAddr>)> {
    let m = stat["nodes"]
        .as_array()?
        .iter()
        .find(|m| m["node_id"].as_str() == Some(node))?;
    Some((
        m["transport"].as_str().unwrap_or_default().to_string(),
        m["transport_reason"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        m["addr"]
            .as_str()
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .map(|a| a.ip()),
    ))
}

/// Finds how B (at `socket_b`) reaches A (`node_a`). RDMA may still be setting up after the
/// join: unless B has no RDMA at all or tcp was asked, waits up to 30 s for `rdma`. With
/// `want` = rdma, anything else is an error.
fn resolve_path(fp: &Path, socket_b: &Path, node_a: &str, want: TransportArg) -> Result<PeerPath> {
    let limit = Duration::from_secs(30);
    let deadline = Instant::now() + limit;
    loop {
        let stat = node_stat(fp, socket_b).context("`ferroplasma stat` of node B")?;
        let (kind, reason, addr) = member_path(&stat, node_a).unwrap_or_default();
        let node_kind = stat["transport"].as_str().unwrap_or("tcp").to_string();
        let settled = kind == "rdma"
            || want == TransportArg::Tcp
            || node_kind == "tcp"
            || Instant::now() > deadline;
        if settled {
            let kind = if kind.is_empty() { node_kind } else { kind };
            if want == TransportArg::Rdma && kind != "rdma" {
                bail!(
                    "--transport rdma, but node B reaches node A over {kind}{}: the figures would \
                     not be RDMA's (B's stat after {limit:?}: transport {:?}, status {})",
                    if reason.is_empty() {
                        String::new()
                    } else {
                        format!(" ({reason})")
                    },
                    stat["transport"],
                    stat["transport_status"]
                );
            }
            return Ok(PeerPath {
                kind,
                reason,
                addr,
                stat,
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The ib_read_bw baseline between the device(s) B's stat names (or the flags), the client
/// reading from A's address.
fn read_bw_for(a: &Args, path: &PeerPath, raw_bytes: u64) -> Result<ReadBw> {
    let status = &path.stat["transport_status"];
    let device = match (&a.rdma_device, status["rdma_device"].as_str()) {
        (Some(d), _) => d.clone(),
        (None, Some(d)) => d.to_string(),
        (None, None) => bail!("node B's stat names no rdma_device: pass --rdma-device"),
    };
    let gid_index = match a.rdma_gid_index {
        Some(g) => g,
        None => status["rdma_gid"]
            .as_str()
            .and_then(gid_index_of)
            .context("node B's stat names no rdma_gid index: pass --rdma-gid-index")?,
    };
    // The address B reaches A on (A's listen address), as in B's member list.
    let addr = path
        .addr
        .context("node B's stat lists no address for node A")?;
    let message = a.raw_rdma_message.0.max(1);
    let bytes = a.raw_rdma_bytes.map_or(raw_bytes, |b| b.0);
    Ok(ReadBw {
        device,
        gid_index,
        addr,
        message,
        iterations: bytes.div_ceil(message).max(crate::perftest::MIN_ITERATIONS),
    })
}

/// N from the `rdma_gid` status text `<gid> (index N, <kind>)`.
fn gid_index_of(s: &str) -> Option<u32> {
    let rest = &s[s.find("(index ")? + "(index ".len()..];
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..end].parse().ok()
}

/// `rdma_bytes_read` from the `stat --json` of the node at `socket`: bytes it read by RDMA.
fn rdma_bytes_read(fp: &Path, socket: &Path) -> Option<u64> {
    node_stat(fp, socket).ok()?["transport_status"]["rdma_bytes_read"]
        .as_str()?
        .parse()
        .ok()
}

/// `--raw-only`: the baseline between the two endpoints the nodes would use, without nodes.
fn raw_only(a: &Args, exe: &Path, runs: usize, largest: u64) -> Result<()> {
    let netns = if use_netns(a.netns, a.transport)? {
        let pid = std::process::id();
        Some(
            NetnsPair::create(&format!("fp-bench-{pid}-"), crate::netns::octet_for(pid))
                .context("creating network namespaces (as in tools/netns.sh up)")?,
        )
    } else {
        None
    };
    let ep = raw_endpoints(netns.as_ref(), node_ip(a.transport)?);
    let bytes = a.raw_bytes.map_or(largest.min(GIB), |b| b.0);
    let mut bar = Bar::new(runs);
    let results = measure_raw(&mut bar, exe, &ep, bytes, runs)?;
    bar.finish();
    let raw = median(&mut results.clone());
    let out = json!({
        "netns": netns.is_some(),
        "raw_tcp_gb_per_s": raw,
        "raw_tcp_runs_gb_per_s": results,
        "raw_tcp_bytes": bytes,
        "raw_tcp_receiver": ep.listen.ip().to_string(),
        "runs": runs,
    });
    drop(netns);
    if a.json {
        println!("{out}");
    } else {
        println!(
            "raw TCP ({}, {}): {raw:.2} GB/s",
            ByteSize(bytes),
            if out["netns"] == true {
                "veth between network namespaces"
            } else {
                "loopback"
            }
        );
    }
    Ok(())
}

/// Whether to use namespaces for `mode`.
/// Namespaces only carry TCP: an RDMA device (rxe on soft-RoCE) sits in the initial namespace,
/// so `auto` leaves them out unless the transport is tcp.
fn use_netns(mode: NetnsMode, transport: TransportArg) -> Result<bool> {
    Ok(match mode {
        NetnsMode::Off => false,
        NetnsMode::On => {
            if transport == TransportArg::Rdma {
                bail!("--netns on does not go with --transport rdma: the RDMA device is in the initial network namespace");
            }
            if !crate::netns::available() {
                bail!("--netns on needs root and iproute2's `ip`");
            }
            true
        }
        NetnsMode::Auto => transport == TransportArg::Tcp && crate::netns::available(),
    })
}

/// Where the nodes listen without namespaces: loopback for tcp; for rdma and auto the address
/// of the RDMA netdev, `$FERROPLASMA_RDMA_ADDR` (tools/softroce.sh sets it in its guest), else
/// loopback.
fn node_ip(transport: TransportArg) -> Result<IpAddr> {
    const VAR: &str = "FERROPLASMA_RDMA_ADDR";
    if transport == TransportArg::Tcp {
        return Ok(Ipv4Addr::LOCALHOST.into());
    }
    match std::env::var(VAR) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .with_context(|| format!("${VAR} = {v:?} is not an IP address")),
        _ => Ok(Ipv4Addr::LOCALHOST.into()),
    }
}

/// The baseline's endpoints: receiver on B's side, sender on A's; without namespaces the
/// receiver listens on `ip`.
fn raw_endpoints(netns: Option<&NetnsPair>, ip: IpAddr) -> Endpoints {
    match netns {
        Some(p) => Endpoints {
            recv_ns: Some(p.b.clone()),
            send_ns: Some(p.a.clone()),
            listen: SocketAddr::V4(SocketAddrV4::new(p.addr_b, 0)),
        },
        None => Endpoints {
            recv_ns: None,
            send_ns: None,
            listen: SocketAddr::new(ip, 0),
        },
    }
}

/// After a failure: the end of the logs of the nodes started here, on stderr.
fn dump_logs(setup: &Setup) {
    if let Some(st) = &setup.started {
        for (name, log) in [("A", &st.log_a), ("B", &st.log_b)] {
            eprintln!("--- node {name}'s log ends:\n{}", tail(log, 30));
        }
    }
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// What the human-readable report shows.
struct Human<'a> {
    results: &'a [SizeResult],
    raw: Option<f64>,
    raw_bytes: u64,
    raw_rdma: Option<f64>,
    ratio: Option<f64>,
    ratio_bytes: Option<u64>,
    cpu: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
    transport: &'a str,
    notes: &'a [String],
}

fn print_human(h: &Human<'_>) {
    let (base, base_name) = match h.raw_rdma {
        Some(r) => (Some(r), "ib_read_bw"),
        None => (h.raw, "raw TCP"),
    };
    println!("transport: {}", h.transport);
    println!(
        "{:>10}  {:>10}  {:>12}  {:>14}",
        "size",
        "GB/s",
        format!("x {base_name}"),
        "CPU s per GiB"
    );
    for r in h.results {
        let g = median(&mut r.runs.clone());
        let vs = base.map_or_else(|| "-".to_string(), |b| format!("{:.2}", g / b));
        let cpu = r
            .cpu_per_gib()
            .map_or_else(|| "-".to_string(), |c| format!("{c:.2}"));
        match &r.error {
            Some(e) => println!("{:>10}  failed: {e}", ByteSize(r.bytes).to_string()),
            None => println!(
                "{:>10}  {g:>10.2}  {vs:>12}  {cpu:>14}",
                ByteSize(r.bytes).to_string()
            ),
        }
    }
    match h.raw {
        Some(r) => println!("raw TCP ({}): {r:.2} GB/s", ByteSize(h.raw_bytes)),
        None => println!("raw TCP: not measured"),
    }
    if let Some(r) = h.raw_rdma {
        println!("ib_read_bw: {r:.3} GB/s");
    }
    if let (Some(x), Some(b)) = (h.ratio, h.ratio_bytes) {
        println!("{} transfer / {base_name}: {x:.2}", ByteSize(b));
    }
    if let Some(c) = h.cpu {
        println!("both nodes' CPU at the largest size: {c:.2} s per GiB");
    }
    if let (Some(a), Some(b)) = (h.p50, h.p99) {
        println!("small remote get: p50 {a:.1} us, p99 {b:.1} us");
    }
    for n in h.notes {
        println!("note: {n}");
    }
}

/// The row the ratio is taken at, with its median GB/s: 1 GiB, or else the largest size
/// measured.
fn ratio_row(results: &[SizeResult]) -> Option<(u64, f64)> {
    let measured = |r: &SizeResult| finite(median(&mut r.runs.clone())).map(|g| (r.bytes, g));
    results
        .iter()
        .find(|r| r.bytes == GIB)
        .and_then(measured)
        .or_else(|| results.iter().rev().find_map(measured))
}

/// Hash rates of the two chunk checks.
struct SumCost {
    bytes: u64,
    keyed: f64,
    xxh3: f64,
}

/// Measures the per-chunk checks as the transport computes them: a keyed MAC per 4MiB chunk
/// through the region's bounce buffer, and xxh3 per chunk. Medians of `runs` passes.
fn checksum_cost(bytes: u64, runs: usize) -> SumCost {
    use ferroplasma_region::Region;
    use ferroplasma_transport::hello::{Hello, Role};
    use ferroplasma_transport::session::Session;

    const CHUNK: u64 = 4 * MIB;
    let region = Region::owned(usize::try_from(bytes).unwrap_or(0));
    let pattern: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    // SAFETY: the region was just made here; nothing else can reach it yet.
    let filled = unsafe { region.write_from(0, &pattern) };
    assert!(filled, "region of {bytes} bytes takes the pattern");
    let h = Hello {
        token: true,
        nonce: [1; 32],
    }
    .encode();
    let session = Session::derive(b"bench", Role::Acceptor, &h, &h, b"i", b"a");
    let chunks = || (0..bytes).step_by(usize::try_from(CHUNK).unwrap_or(1));
    let (mut keyed, mut xxh3) = (Vec::new(), Vec::new());
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let mut acc = 0u8;
        for off in chunks() {
            let n = CHUNK.min(bytes - off);
            let mut mac = session
                .sealer
                .chunk_mac(1, off, u32::try_from(n).unwrap_or(u32::MAX));
            region.read_through(off, n, |b| mac.update(b));
            acc ^= mac.finish()[0];
        }
        keyed.push(gbps(bytes, t.elapsed()));
        let t = Instant::now();
        let mut x = 0u64;
        for off in chunks() {
            x ^= region.checksum(off, CHUNK.min(bytes - off)).unwrap_or(0);
        }
        xxh3.push(gbps(bytes, t.elapsed()));
        std::hint::black_box((acc, x));
    }
    SumCost {
        bytes,
        keyed: median(&mut keyed),
        xxh3: median(&mut xxh3),
    }
}

/// Creates an object of `size` on A, reads it once on B (timed), checks it, deletes it on
/// both. Returns the duration of B's get and the CPU time the `cpu` processes (the nodes)
/// spent during it.
fn transfer_once(
    ca: &Client,
    cb: &Client,
    size: u64,
    tag: u8,
    cpu: Option<&Processes>,
) -> Result<(Duration, Option<Sample>)> {
    let mut builder = ca
        .create(size)
        .with_context(|| format!("creating {} on A", ByteSize(size)))?;
    fill(builder.data_mut(), tag);
    let id = builder.seal().context("sealing on A")?;
    // Generous: 60 s plus 100 MB/s.
    let timeout = Duration::from_secs(60 + size / 100_000_000);
    let cpu_before = cpu.map(Processes::sample).transpose()?;
    let t = Instant::now();
    let views = cb.get(&[id], timeout);
    let took = t.elapsed();
    let cpu_after = cpu.map(Processes::sample).transpose()?;
    let checked = views
        .with_context(|| format!("get of {} ({id}) on B", ByteSize(size)))
        .and_then(|v| {
            let ok = check(&v[0], tag);
            drop(v);
            ok
        });
    delete(cb, id, "B");
    delete(ca, id, "A");
    checked?;
    let spent = cpu_after.zip(cpu_before).map(|(b, a)| b.since(a));
    Ok((took, spent))
}

fn delete(c: &Client, id: ObjectId, node: &str) {
    if let Err(e) = c.delete(&[id]) {
        eprintln!("delete of {id} on {node} failed: {e}");
    }
}

/// Fills `data` with `tag`, each page starting with its index (xor tag) so that misplaced
/// pages are caught.
fn fill(data: &mut [u8], tag: u8) {
    data.fill(tag);
    for (i, page) in data.chunks_mut(PAGE).enumerate() {
        let mark = (i as u64 ^ u64::from(tag)).to_le_bytes();
        let n = page.len().min(8);
        page[..n].copy_from_slice(&mark[..n]);
    }
}

/// Checks what [`fill`] wrote: every page's mark and last byte.
fn check(data: &[u8], tag: u8) -> Result<()> {
    for (i, page) in data.chunks(PAGE).enumerate() {
        let mark = (i as u64 ^ u64::from(tag)).to_le_bytes();
        let n = page.len().min(8);
        if page[..n] != mark[..n] || (page.len() > 8 && page[page.len() - 1] != tag) {
            bail!("transferred bytes differ in page {i}");
        }
    }
    Ok(())
}

/// Puts `count` objects of `size` on A, then reads each once on B; returns the latencies in
/// microseconds.
fn small_gets(ca: &Client, cb: &Client, size: u64, count: usize, run: usize) -> Result<Vec<f64>> {
    let mut data = vec![0u8; usize::try_from(size)?];
    let mut ids = Vec::with_capacity(count);
    for i in 0..count {
        let mark = ((run * count + i) as u64).to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&mark[..n]);
        ids.push(ca.put(&data).context("small put on A")?);
    }
    let mut lat = Vec::with_capacity(count);
    let mut result = Ok(());
    for (i, &id) in ids.iter().enumerate() {
        let t = Instant::now();
        match cb.get(&[id], Duration::from_secs(10)) {
            Ok(v) => {
                lat.push(t.elapsed().as_secs_f64() * 1e6);
                let mark = ((run * count + i) as u64).to_le_bytes();
                let n = v[0].len().min(8);
                if v[0].len() as u64 != size || v[0][..n] != mark[..n] {
                    result = Err(anyhow::anyhow!("small object {id} arrived wrong on B"));
                    break;
                }
            }
            Err(e) => {
                result = Err(e).with_context(|| format!("small get of {id} on B"));
                break;
            }
        }
    }
    for chunk in ids.chunks(1024) {
        let _ = cb.delete(chunk);
        let _ = ca.delete(chunk);
    }
    result.map(|()| lat)
}

/// `ferroplasma stat --json` of the node at `socket`, parsed.
fn node_stat(fp: &Path, socket: &Path) -> Result<Value> {
    let o = Command::new(fp)
        .args(["stat", "--json", "--socket"])
        .arg(socket)
        .stdin(Stdio::null())
        .output()
        .context("running ferroplasma stat")?;
    if !o.status.success() {
        bail!(
            "ferroplasma stat failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&o.stdout)?)
}

/// Alive nodes in a `stat --json` answer; `None` without a `nodes` array.
fn alive_nodes(stat: &Value) -> Option<usize> {
    let nodes = stat.get("nodes")?.as_array()?;
    Some(
        nodes
            .iter()
            .filter(|n| n["state"].as_str() == Some("alive"))
            .count(),
    )
}

/// MemAvailable from /proc/meminfo, in bytes.
fn mem_available() -> Result<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    s.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .context("no MemAvailable in /proc/meminfo")
}

/// Arena per node: the flag, or 2 x largest + 256MiB capped by half of what is available.
fn arena_size(flag: Option<ByteSize>, largest: u64, notes: &mut Vec<String>) -> Result<u64> {
    let avail = mem_available()?;
    let cap = avail.saturating_sub(RESERVE) / 2;
    let want = match flag {
        Some(m) => {
            if m.0 > cap {
                notes.push(format!(
                    "--memory {m} per node exceeds half of MemAvailable ({}) less {}: the nodes may fail to start",
                    ByteSize(avail),
                    ByteSize(RESERVE)
                ));
            }
            return Ok(m.0);
        }
        None => largest.saturating_mul(2).saturating_add(256 * MIB),
    };
    if want > cap {
        notes.push(format!(
            "arena capped at {} per node (MemAvailable {}), wanted {}",
            ByteSize(cap),
            ByteSize(avail),
            ByteSize(want)
        ));
    }
    // Whole 2 MiB pages.
    Ok(want.min(cap) / (2 * MIB) * (2 * MIB))
}

/// A free TCP port on `ip` (free when asked; the node binds it right after).
fn free_port(ip: IpAddr) -> Result<u16> {
    let l = TcpListener::bind((ip, 0)).with_context(|| format!("finding a free port on {ip}"))?;
    Ok(l.local_addr()?.port())
}

/// A fresh random token in `dir/token`, mode 0600.
fn write_token(dir: &Path) -> Result<PathBuf> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut raw = [0u8; 32];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .context("reading /dev/urandom")?;
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join("token");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{hex}")?;
    Ok(path)
}

/// Checks that `fp` exists and knows `node --listen`.
fn check_binary(fp: &Path) -> Result<()> {
    if !fp.exists() {
        bail!(
            "{} not found: build it next to this binary with `cargo build --release` \
             (the bench starts the nodes as separate processes)",
            fp.display()
        );
    }
    let o = Command::new(fp)
        .args(["node", "--help"])
        .output()
        .with_context(|| format!("running {}", fp.display()))?;
    if !String::from_utf8_lossy(&o.stdout).contains("--listen") {
        bail!(
            "{} has no cluster support (`node --listen`): rebuild it with `cargo build --release`",
            fp.display()
        );
    }
    Ok(())
}

/// The last `n` lines of a log file, for error messages.
fn tail(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Starts node A (head) and node B (joining A), in namespaces or on loopback.
fn start_nodes(a: &Args, fp: &Path, largest: u64, notes: &mut Vec<String>) -> Result<Setup> {
    check_binary(fp)?;
    let use_netns = use_netns(a.netns, a.transport)?;
    let ip = node_ip(a.transport)?;
    let arena = arena_size(a.memory, largest, notes)?;
    let pid = std::process::id();
    let dir = TempDir::create(std::env::temp_dir().join(format!("fp-bench-{pid}-transfer")))?;
    let token = match &a.token_file {
        Some(t) => t.clone(),
        None => write_token(dir.path())?,
    };
    let netns = if use_netns {
        let pair = NetnsPair::create(&format!("fp-bench-{pid}-"), crate::netns::octet_for(pid))
            .context("creating network namespaces (as in tools/netns.sh up)")?;
        Some(pair)
    } else {
        None
    };
    let (addr_a, addr_b) = match &netns {
        Some(p) => (
            SocketAddr::V4(SocketAddrV4::new(p.addr_a, NETNS_PORT)),
            SocketAddr::V4(SocketAddrV4::new(p.addr_b, NETNS_PORT)),
        ),
        None => {
            let pa = free_port(ip)?;
            let mut pb = free_port(ip)?;
            while pb == pa {
                pb = free_port(ip)?;
            }
            (SocketAddr::new(ip, pa), SocketAddr::new(ip, pb))
        }
    };
    let socket_a = dir.path().join("a.sock");
    let socket_b = dir.path().join("b.sock");
    eprintln!(
        "starting two nodes with {} arenas{} (backing an arena takes ~1.5 s per GiB of 4 KiB pages)",
        ByteSize(arena),
        match &netns {
            Some(p) => format!(", in namespaces {} ({addr_a}) and {} ({addr_b})", p.a, p.b),
            None => format!(" on {addr_a} and {addr_b}"),
        },
    );
    let node_cmd = |ns: Option<&str>,
                    socket: &Path,
                    listen: SocketAddr,
                    join: Option<SocketAddr>,
                    log: &Path|
     -> Result<Command> {
        let mut c = match ns {
            Some(ns) => NetnsPair::command(ns, fp),
            None => Command::new(fp),
        };
        c.arg("node")
            .arg("--socket")
            .arg(socket)
            .args(["--listen", &listen.to_string()])
            .args(["--memory", &arena.to_string()])
            .args(["--spill", "off"])
            .args(["--checksums", a.checksums.as_str()])
            .args(["--zero-copy", a.zero_copy.as_str()])
            .args(["--transport", a.transport.as_str()])
            .arg("--token-file")
            .arg(&token);
        if let Some(d) = &a.rdma_device {
            c.args(["--rdma-device", d]);
        }
        if let Some(ms) = a.dead_after_ms {
            c.args(["--dead-after-ms", &ms.to_string()]);
        }
        if let Some(g) = a.rdma_gid_index {
            c.args(["--rdma-gid-index", &g.to_string()]);
        }
        if let Some(j) = join {
            c.args(["--join", &j.to_string()]);
        }
        let f = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        c.stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .env_remove("FERROPLASMA_SOCKET")
            .env_remove("FERROPLASMA_TOKEN")
            // An error's backtrace would push the error itself out of the log tail shown
            // when a node fails to start (panics keep theirs).
            .env("RUST_LIB_BACKTRACE", "0")
            .env("NO_COLOR", "1");
        Ok(c)
    };
    let ready_within = Duration::from_secs(60 + 3 * arena / GIB);
    let log_a = dir.path().join("a.log");
    let log_b = dir.path().join("b.log");
    let ns_a = netns.as_ref().map(|p| p.a.clone());
    let ns_b = netns.as_ref().map(|p| p.b.clone());
    let mut node_a = ChildGuard::spawn(
        node_cmd(ns_a.as_deref(), &socket_a, addr_a, None, &log_a)?,
        "node A",
    )?;
    wait_ready(fp, &mut node_a, &socket_a, &log_a, 1, ready_within)?;
    let mut node_b = ChildGuard::spawn(
        node_cmd(ns_b.as_deref(), &socket_b, addr_b, Some(addr_a), &log_b)?,
        "node B",
    )?;
    wait_ready(fp, &mut node_b, &socket_b, &log_b, 2, ready_within)?;
    wait_ready(
        fp,
        &mut node_a,
        &socket_a,
        &log_a,
        2,
        Duration::from_secs(30),
    )?;

    let raw = Some(raw_endpoints(netns.as_ref(), ip));
    let cpu = Processes::new(vec![node_a.child().id(), node_b.child().id()]);
    // Under `ip netns exec` the pid is the node's own (ip execs it); make sure.
    if let Ok(names) = cpu.names() {
        if names.iter().any(|n| n != "ferroplasma") {
            notes.push(format!(
                "the node pids {:?} run {names:?}, not ferroplasma: their CPU time may not be the nodes'",
                cpu.pids()
            ));
        }
    }
    Ok(Setup {
        socket_a,
        socket_b,
        addrs: Some((addr_a, addr_b)),
        raw,
        started: Some(Started {
            _b: node_b,
            _a: node_a,
            cpu,
            netns,
            log_a,
            log_b,
            _dir: dir,
        }),
    })
}

/// Waits until the node's socket accepts clients and its `stat` shows `alive` alive nodes.
fn wait_ready(
    fp: &Path,
    node: &mut ChildGuard,
    socket: &Path,
    log: &Path,
    alive: usize,
    within: Duration,
) -> Result<()> {
    let deadline = Instant::now() + within;
    let mut last = String::from("socket not there yet");
    loop {
        if let Some(st) = node.child().try_wait()? {
            bail!(
                "{} exited ({st}) before it was ready; its log ends:\n{}",
                node.name(),
                tail(log, 20)
            );
        }
        if socket.exists() {
            match node_stat(fp, socket) {
                Ok(stat) => match alive_nodes(&stat) {
                    Some(n) if n >= alive => return Ok(()),
                    Some(n) => last = format!("{n} of {alive} nodes alive"),
                    None => bail!(
                        "{}'s `stat --json` has no \"nodes\" array: is it a cluster build?",
                        node.name()
                    ),
                },
                Err(e) => last = format!("{e:#}"),
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{} not ready within {within:?} ({last}); its log ends:\n{}",
                node.name(),
                tail(log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn parses_flags_and_defaults() {
        let c = Cli::try_parse_from(["t"]).unwrap().args;
        assert_eq!(
            c.sizes.iter().map(|s| s.0).collect::<Vec<_>>(),
            [MIB, 16 * MIB, 64 * MIB, 256 * MIB, GIB, 4 * GIB]
        );
        assert_eq!(c.runs, 3);
        assert_eq!(c.netns, NetnsMode::Auto);
        assert!(c.nodes.is_empty() && !c.json && c.plot.is_none());
        let c = Cli::try_parse_from([
            "t",
            "--json",
            "--sizes",
            "4KiB,2MiB,1.5GiB",
            "--runs",
            "5",
            "--nodes",
            "/tmp/a.sock,/tmp/b.sock",
            "--raw-addr",
            "127.0.0.1:9000",
            "--netns",
            "off",
            "--memory",
            "3GiB",
            "--plot",
            "x.svg",
        ])
        .unwrap()
        .args;
        assert!(c.json);
        assert_eq!(
            c.sizes.iter().map(|s| s.0).collect::<Vec<_>>(),
            [4096, 2 * MIB, 3 * GIB / 2]
        );
        assert_eq!(
            c.nodes,
            [PathBuf::from("/tmp/a.sock"), "/tmp/b.sock".into()]
        );
        assert_eq!(c.raw_addr, Some("127.0.0.1:9000".parse().unwrap()));
        assert_eq!(c.memory, Some(ByteSize(3 * GIB)));
        assert_eq!(c.netns, NetnsMode::Off);
        assert!(Cli::try_parse_from(["t", "--sizes", "1XB"]).is_err());
        assert!(Cli::try_parse_from(["t", "--netns", "maybe"]).is_err());
        assert_eq!(
            Cli::try_parse_from(["t"]).unwrap().args.checksums,
            ChecksumArg::On
        );
        let c = Cli::try_parse_from(["t", "--checksums", "keyed"]).unwrap();
        assert_eq!(c.args.checksums.as_str(), "keyed");
    }

    #[test]
    fn fill_and_check_catch_misplaced_pages() {
        let mut v = vec![0u8; 3 * PAGE + 100];
        fill(&mut v, 9);
        check(&v, 9).unwrap();
        assert!(check(&v, 10).is_err());
        let mut swapped = v.clone();
        swapped.copy_within(0..PAGE, PAGE);
        assert!(check(&swapped, 9).is_err());
        let mut tiny = vec![0u8; 5];
        fill(&mut tiny, 3);
        check(&tiny, 3).unwrap();
    }

    #[test]
    fn counts_alive_nodes() {
        let s: Value = serde_json::from_str(
            r#"{"nodes":[{"node_id":"01","addr":"10.0.0.1:1","state":"alive","head":true},
                         {"node_id":"02","addr":"10.0.0.2:1","state":"dead","head":false}]}"#,
        )
        .unwrap();
        assert_eq!(alive_nodes(&s), Some(1));
        assert_eq!(alive_nodes(&json!({"arena_bytes": 1})), None);
    }

    #[test]
    fn arena_default_is_capped_and_page_aligned() {
        let mut notes = Vec::new();
        let m = arena_size(None, MIB, &mut notes).unwrap();
        assert_eq!(m, 258 * MIB);
        let m = arena_size(None, 1 << 50, &mut notes).unwrap();
        assert!(m < 1 << 50 && m % (2 * MIB) == 0);
        assert!(notes.iter().any(|n| n.contains("capped")));
        assert_eq!(
            arena_size(Some(ByteSize(GIB)), 4 * GIB, &mut notes).unwrap(),
            GIB
        );
    }
}

#[cfg(test)]
mod transport_tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn transport_flags() {
        let c = Cli::try_parse_from(["t"]).unwrap().args;
        assert_eq!(c.transport, TransportArg::Tcp);
        assert_eq!(c.raw_rdma_message.0, MIB);
        assert!(c.raw_rdma_bytes.is_none() && c.rdma_device.is_none());
        assert!(c.dead_after_ms.is_none());
        let c = Cli::try_parse_from([
            "t",
            "--transport",
            "rdma",
            "--rdma-device",
            "mlx5_0",
            "--rdma-gid-index",
            "3",
            "--raw-rdma-bytes",
            "64MiB",
            "--dead-after-ms",
            "60000",
        ])
        .unwrap()
        .args;
        assert_eq!(c.transport.as_str(), "rdma");
        assert_eq!(c.rdma_device.as_deref(), Some("mlx5_0"));
        assert_eq!(c.rdma_gid_index, Some(3));
        assert_eq!(c.raw_rdma_bytes, Some(ByteSize(64 * MIB)));
        assert_eq!(c.dead_after_ms, Some(60_000));
        assert!(Cli::try_parse_from(["t", "--transport", "udp"]).is_err());
        // RDMA devices live in the initial namespace.
        assert!(use_netns(NetnsMode::On, TransportArg::Rdma).is_err());
        assert!(!use_netns(NetnsMode::Auto, TransportArg::Rdma).unwrap());
        assert!(!use_netns(NetnsMode::Auto, TransportArg::Auto).unwrap());
        assert_eq!(node_ip(TransportArg::Tcp).unwrap(), Ipv4Addr::LOCALHOST);
    }

    #[test]
    fn reads_the_peer_path_and_gid_from_stat() {
        let stat: Value = serde_json::from_str(
            r#"{"transport":"rdma","transport_status":{"rdma_device":"rxe0",
                 "rdma_gid":"fe80::1 (index 1, RoCE v2)","rdma_bytes_read":"42"},
                "nodes":[{"node_id":"aa","addr":"169.254.77.1:4000","state":"alive","this":false,
                          "transport":"rdma","transport_reason":"2 RC queue pairs"},
                         {"node_id":"bb","addr":"169.254.77.1:4001","state":"alive","this":true,
                          "transport":"","transport_reason":""}]}"#,
        )
        .unwrap();
        let (kind, reason, addr) = member_path(&stat, "aa").unwrap();
        assert_eq!(
            (kind.as_str(), reason.as_str()),
            ("rdma", "2 RC queue pairs")
        );
        assert_eq!(addr, Some("169.254.77.1".parse().unwrap()));
        assert!(member_path(&stat, "cc").is_none());
        assert_eq!(
            gid_index_of(stat["transport_status"]["rdma_gid"].as_str().unwrap()),
            Some(1)
        );
        assert_eq!(gid_index_of("fe80::1 (index 12, RoCE v2)"), Some(12));
        assert_eq!(gid_index_of("fe80::1"), None);
        assert_eq!(gid_index_of("(index x)"), None);

        let c = Cli::try_parse_from(["t", "--transport", "rdma"])
            .unwrap()
            .args;
        let path = PeerPath {
            kind,
            reason,
            addr,
            stat,
        };
        let rb = read_bw_for(&c, &path, 5 * MIB / 2).unwrap();
        assert_eq!(rb.device, "rxe0");
        assert_eq!(rb.gid_index, 1);
        assert_eq!(rb.addr, "169.254.77.1".parse::<IpAddr>().unwrap());
        assert_eq!((rb.message, rb.iterations), (MIB, 8), "at least 8 messages");
        let rb = read_bw_for(&c, &path, 100 * MIB).unwrap();
        assert_eq!(rb.iterations, 100);
    }

    fn row(bytes: u64, runs: &[f64]) -> SizeResult {
        SizeResult {
            bytes,
            runs: runs.to_vec(),
            cpu: None,
            error: None,
        }
    }

    #[test]
    fn ratio_at_1gib_else_the_largest_measured() {
        let rows = [
            row(MIB, &[1.0]),
            row(GIB, &[2.0, 3.0, 2.5]),
            row(4 * GIB, &[4.0]),
        ];
        assert_eq!(ratio_row(&rows), Some((GIB, 2.5)));
        let rows = [
            row(MIB, &[1.0]),
            row(256 * MIB, &[2.0]),
            row(512 * MIB, &[]),
        ];
        assert_eq!(ratio_row(&rows), Some((256 * MIB, 2.0)));
        let rows = [row(MIB, &[1.0]), row(GIB, &[])];
        assert_eq!(ratio_row(&rows), Some((MIB, 1.0)));
        assert_eq!(ratio_row(&[]), None);
    }

    #[test]
    fn cpu_per_gib_of_a_row() {
        let mut r = row(GIB / 2, &[1.0, 1.0]);
        assert_eq!(r.cpu_per_gib(), None);
        r.cpu = Some(Sample {
            ticks: 150,
            run_ns: Some(1_500_000_000),
        });
        assert_eq!(r.cpu_per_gib(), Some(1.5));
    }
}

#[cfg(test)]
mod checksum_cost_tests {
    #[test]
    fn measures_both_checks() {
        let c = super::checksum_cost(8 << 20, 1);
        assert_eq!(c.bytes, 8 << 20);
        assert!(c.keyed.is_finite() && c.keyed > 0.0);
        assert!(c.xxh3.is_finite() && c.xxh3 > 0.0);
    }
}
