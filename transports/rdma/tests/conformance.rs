//! The transport conformance suite over real RDMA (soft-RoCE in CI: `tools/softroce.sh`),
//! with a check that RDMA, not the TCP fall-back, carried the reads.
//!
//! Without an RDMA device these tests print `SKIPPED: no RDMA device` and pass.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use ferroplasma_region::Region;
use ferroplasma_transport::conformance::{self, Harness, RegionAccess};
use ferroplasma_transport::{Transport, TransportConfig};
use ferroplasma_transport_rdma::{verbs, RdmaConfig, RdmaTransport, Stats};

fn device_or_skip(test: &str) -> bool {
    // RUST_LOG=ferroplasma_transport_rdma=debug shows the transport's decisions.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    match verbs::no_device() {
        None => true,
        Some(why) => {
            println!("SKIPPED: no RDMA device ({test}: {why})");
            false
        }
    }
}

/// Makes rdma transports and keeps their counters.
#[derive(Default)]
struct H {
    stats: Vec<Arc<Stats>>,
}

impl Harness for H {
    fn make(
        &mut self,
        cfg: TransportConfig,
        region_len: u64,
    ) -> (Box<dyn Transport>, Box<dyn RegionAccess>) {
        let r = Region::owned(usize::try_from(region_len).expect("region"));
        let t = RdmaTransport::new(cfg, "127.0.0.1:0", r.clone(), &RdmaConfig::default())
            .expect("rdma transport over the device");
        self.stats.push(t.stats());
        (Box::new(t), Box::new(r))
    }
}

impl H {
    fn total(&self, f: impl Fn(&Stats) -> u64) -> u64 {
        self.stats.iter().map(|s| f(s)).sum()
    }
}

#[test]
fn conformance_over_rdma() {
    if !device_or_skip("conformance_over_rdma") {
        return;
    }
    let mut h = H::default();
    conformance::run_all(&mut h);
    let peers = h.total(|s| s.rdma_peers.load(Ordering::Relaxed));
    let reads = h.total(|s| s.rdma_reads.load(Ordering::Relaxed));
    let bytes = h.total(|s| s.rdma_bytes.load(Ordering::Relaxed));
    println!(
        "rdma: {} transports, {peers} peers connected over RDMA, {reads} reads / {bytes} bytes over RDMA, {} failovers",
        h.stats.len(),
        h.total(|s| s.failovers.load(Ordering::Relaxed))
    );
    assert!(peers > 0, "no connection used RDMA");
    // reads_land_exactly alone moves more than a MiB.
    assert!(
        reads > 10 && bytes > 1 << 20,
        "RDMA carried too little: {reads} reads, {bytes} bytes"
    );
}
