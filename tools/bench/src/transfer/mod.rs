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
//!
//! The pieces: [`args`] (flags), [`nodes`] (starting and stopping the nodes), [`stat`] (what
//! their `stat` says), [`measure`] (transfers, small gets, CPU, checksum cost), [`baseline`]
//! (raw TCP and ib_read_bw) and [`report`] (human output); [`run`] ties them together and
//! assembles the JSON report.

mod args;
mod baseline;
mod measure;
mod nodes;
mod report;
mod stat;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod transport_tests;

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferroplasma::client::{Client, ClientOptions};
use ferroplasma::ByteSize;
use serde_json::{json, Value};

pub use args::Args;
use args::{ChecksumArg, NetnsMode, OnOff, TransportArg};
use baseline::{measure_raw, measure_rdma, raw_only, read_bw_for};
use measure::{checksum_cost, small_gets, transfer_once, SizeResult};
use nodes::{dump_logs, start_nodes, Setup};
use report::{finite, print_human, ratio_row, Human};
use stat::{rdma_bytes_read, resolve_path};

use crate::bar::Bar;
use crate::cpu;
use crate::rawtcp::Endpoints;
use crate::stats::{gbps, median, percentile};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Arena room kept free besides the object being moved.
const SLACK: u64 = 64 * MIB;

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
