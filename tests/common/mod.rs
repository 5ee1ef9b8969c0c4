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

/// The calling thread's id, for [`wait_until_awaiting_reply`].
pub fn tid() -> i32 {
    rustix::thread::gettid().as_raw_nonzero().get()
}

/// Whether thread `tid` of this process sleeps in a shared (non-private) `FUTEX_WAIT`: a
/// client waiting for its reply sleeps so on its control segment's futex, and nothing else in
/// the test process does (std's locks use private futexes). Read from
/// `/proc/self/task/<tid>/syscall`: the syscall number, then its arguments (the op second).
pub fn awaiting_reply(tid: i32) -> bool {
    #[cfg(target_arch = "x86_64")]
    const SYS_FUTEX: &str = "202";
    #[cfg(target_arch = "aarch64")]
    const SYS_FUTEX: &str = "98";
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).unwrap_or_default();
    let f: Vec<&str> = s.split_whitespace().collect();
    f.len() > 2 && f[0] == SYS_FUTEX && f[2] == "0x0"
}

/// Waits (up to 30 s) until thread `tid` is blocked waiting for a reply from its node: its
/// request has been sent, and nothing has answered it yet.
pub fn wait_until_awaiting_reply(tid: i32, what: &str) {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while !awaiting_reply(tid) {
        assert!(
            std::time::Instant::now() < until,
            "{what} never blocked waiting for its reply"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
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
