//! The human-readable report (the JSON one is assembled in [`super::run`]) and the row the
//! ratio to the raw baseline is taken at.

use ferroplasma::ByteSize;

use super::measure::SizeResult;
use super::GIB;
use crate::stats::median;

pub(super) fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// What the human-readable report shows.
pub(super) struct Human<'a> {
    pub(super) results: &'a [SizeResult],
    pub(super) raw: Option<f64>,
    pub(super) raw_bytes: u64,
    pub(super) raw_rdma: Option<f64>,
    pub(super) ratio: Option<f64>,
    pub(super) ratio_bytes: Option<u64>,
    pub(super) cpu: Option<f64>,
    pub(super) p50: Option<f64>,
    pub(super) p99: Option<f64>,
    pub(super) transport: &'a str,
    pub(super) notes: &'a [String],
}

pub(super) fn print_human(h: &Human<'_>) {
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
pub(super) fn ratio_row(results: &[SizeResult]) -> Option<(u64, f64)> {
    let measured = |r: &SizeResult| finite(median(&mut r.runs.clone())).map(|g| (r.bytes, g));
    results
        .iter()
        .find(|r| r.bytes == GIB)
        .and_then(measured)
        .or_else(|| results.iter().rev().find_map(measured))
}
