//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use ferroplasma::client::{Client, ClientOptions};
use ferroplasma::server::{Node, NodeConfig};
use ferroplasma::shm::HugepageMode;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A socket path unique to this process and call.
pub fn socket_path(tag: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("fp-test-{}-{tag}-{n}.sock", std::process::id()))
}

/// Test node settings: a small arena, 4 KiB pages, short spins (the test machine has two
/// cores and runs tests in parallel).
pub fn config(tag: &str, memory: u64) -> NodeConfig {
    let mut cfg = NodeConfig::new(socket_path(tag));
    cfg.memory = Some(memory);
    cfg.hugepages = HugepageMode::Off;
    cfg.spin = Duration::from_micros(20);
    cfg
}

/// Starts an in-process node.
pub fn start(tag: &str, memory: u64) -> Node {
    Node::start(config(tag, memory)).expect("node starts")
}

/// Client options for tests: short spins, short create waits.
pub fn opts() -> ClientOptions {
    ClientOptions {
        spin: Duration::from_micros(20),
        create_timeout: Duration::from_millis(200),
        ..ClientOptions::default()
    }
}

/// Connects a test client.
pub fn connect(node: &Node) -> Client {
    Client::connect_with(&node.info().socket, opts()).expect("client connects")
}

/// Deterministic bytes for `(seed, len)`, so any process can check any object.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    v
}

/// Waits (up to 30 s) until the client's node sees `n` live cluster members.
pub fn wait_alive(c: &Client, n: usize) {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let v = c.nodes().expect("nodes");
        if v.members.iter().filter(|m| m.alive).count() == n {
            return;
        }
        assert!(
            std::time::Instant::now() < until,
            "cluster did not form: {v:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (up to 30 s) until `c`'s node has exactly `n` gets and waits parked: the requests
/// have reached the node and wait there for their objects.
pub fn wait_for_parked_gets(c: &Client, n: u64, what: &str) {
    eventually_stats(c, &format!("{what} to be parked at the node ({n})"), |s| {
        s.gets_waiting == n
    });
}

/// Polls node stats until `ok` (30 s at most); returns the stats that satisfied it.
pub fn eventually_stats(
    c: &Client,
    what: &str,
    ok: impl Fn(&ferroplasma::protocol::Stats) -> bool,
) -> ferroplasma::protocol::Stats {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = c.stats().expect("stats");
        if ok(&s) {
            return s;
        }
        assert!(
            std::time::Instant::now() < until,
            "timed out waiting for {what}: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
