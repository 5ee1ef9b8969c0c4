//! The raw baselines next to the nodes' figures: the raw TCP stream between the endpoints the
//! nodes use (see [`crate::rawtcp`]), perftest's `ib_read_bw` between the RDMA device(s) B's
//! stat names (see [`crate::perftest`]), and `--raw-only`, the TCP baseline without nodes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;

use anyhow::{bail, Context, Result};
use ferroplasma::ByteSize;
use serde_json::json;

use super::args::Args;
use super::nodes::{free_port, node_ip, use_netns};
use super::stat::PeerPath;
use super::GIB;
use crate::bar::Bar;
use crate::netns::NetnsPair;
use crate::perftest::ReadBw;
use crate::rawtcp::{self, Endpoints};
use crate::stats::median;

/// `runs` raw TCP baseline runs of `bytes`, in GB/s.
pub(super) fn measure_raw(
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
pub(super) fn measure_rdma(bar: &mut Bar, rb: &ReadBw, runs: usize) -> Result<Vec<f64>> {
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

/// The ib_read_bw baseline between the device(s) B's stat names (or the flags), the client
/// reading from A's address.
pub(super) fn read_bw_for(a: &Args, path: &PeerPath, raw_bytes: u64) -> Result<ReadBw> {
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
pub(super) fn gid_index_of(s: &str) -> Option<u32> {
    let rest = &s[s.find("(index ")? + "(index ".len()..];
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..end].parse().ok()
}

/// `--raw-only`: the baseline between the two endpoints the nodes would use, without nodes.
pub(super) fn raw_only(a: &Args, exe: &Path, runs: usize, largest: u64) -> Result<()> {
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

/// The baseline's endpoints: receiver on B's side, sender on A's; without namespaces the
/// receiver listens on `ip`.
pub(super) fn raw_endpoints(netns: Option<&NetnsPair>, ip: IpAddr) -> Endpoints {
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
