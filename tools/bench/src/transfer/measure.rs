//! The measurements between the two nodes: one large transfer from A to B (filled, timed,
//! checked, deleted) with the nodes' CPU time during it, a run of small remote gets, each
//! size's result and its CPU per GiB, and the in-process cost of the two chunk checks.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferroplasma::client::Client;
use ferroplasma::{ByteSize, ObjectId};

use super::MIB;
use crate::cpu::{self, Processes, Sample};
use crate::stats::{gbps, median};

/// Page granularity of the fill pattern and its check.
pub(super) const PAGE: usize = 4096;

/// One size's result.
pub(super) struct SizeResult {
    pub(super) bytes: u64,
    pub(super) runs: Vec<f64>,
    /// Both nodes' CPU time over the successful runs, when their pids are known.
    pub(super) cpu: Option<Sample>,
    pub(super) error: Option<String>,
}

impl SizeResult {
    /// CPU seconds of both nodes per GiB moved.
    pub(super) fn cpu_per_gib(&self) -> Option<f64> {
        let moved = self.bytes.saturating_mul(self.runs.len() as u64);
        self.cpu
            .and_then(|t| cpu::secs_per_gib(t.duration(), moved))
    }
}

/// Hash rates of the two chunk checks.
pub(super) struct SumCost {
    pub(super) bytes: u64,
    pub(super) keyed: f64,
    pub(super) xxh3: f64,
}

/// Measures the per-chunk checks as the transport computes them: a keyed MAC per 4MiB chunk
/// through the region's bounce buffer, and xxh3 per chunk. Medians of `runs` passes.
pub(super) fn checksum_cost(bytes: u64, runs: usize) -> SumCost {
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
pub(super) fn transfer_once(
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
pub(super) fn fill(data: &mut [u8], tag: u8) {
    data.fill(tag);
    for (i, page) in data.chunks_mut(PAGE).enumerate() {
        let mark = (i as u64 ^ u64::from(tag)).to_le_bytes();
        let n = page.len().min(8);
        page[..n].copy_from_slice(&mark[..n]);
    }
}

/// Checks what [`fill`] wrote: every page's mark and last byte.
pub(super) fn check(data: &[u8], tag: u8) -> Result<()> {
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
pub(super) fn small_gets(
    ca: &Client,
    cb: &Client,
    size: u64,
    count: usize,
    run: usize,
) -> Result<Vec<f64>> {
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
