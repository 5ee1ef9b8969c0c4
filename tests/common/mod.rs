//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

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

/// Waits (up to 30 s, polling) until `f` holds; fails the test naming `what` otherwise.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
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

/// A node daemon in its own process (the `ferroplasma` binary), killed on drop.
pub struct Daemon {
    /// The daemon process.
    pub child: Child,
    /// Its socket.
    pub socket: PathBuf,
}

impl Daemon {
    /// `ferroplasma node` with `memory` of 4 KiB pages and spilling off.
    pub fn start(tag: &str, memory: &str) -> Self {
        Self::start_with(tag, memory, &["--spill", "off"])
    }

    /// `ferroplasma node` with `memory` of 4 KiB pages and the `extra` flags.
    pub fn start_with(tag: &str, memory: &str, extra: &[&str]) -> Self {
        Self::start_at(socket_path(tag), memory, extra)
    }

    /// As [`Daemon::start_with`] on `socket`; waits until the daemon serves. Spins for
    /// 20 µs unless `extra` says `--spin-us`.
    pub fn start_at(socket: PathBuf, memory: &str, extra: &[&str]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferroplasma"));
        cmd.args(["node", "--memory", memory, "--hugepages", "off"]);
        if !extra.contains(&"--spin-us") {
            cmd.args(["--spin-us", "20"]);
        }
        let child = cmd
            .args(extra)
            .arg("--socket")
            .arg(&socket)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("daemon starts");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Client::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "daemon did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, socket }
    }

    /// A test client of this daemon.
    pub fn client(&self) -> Client {
        Client::connect_with(&self.socket, opts()).expect("client connects")
    }

    /// User plus system CPU time of the whole daemon so far.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("the daemon's /proc stat");
        // Fields after the command name (which may hold spaces): state is field 3, utime 14,
        // stime 15, in clock ticks of 1/USER_HZ s.
        let hz = rustix::param::clock_ticks_per_second();
        assert!(hz > 0, "USER_HZ");
        let rest = &stat[stat.rfind(')').expect("command name") + 2..];
        let f: Vec<u64> = rest
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        Duration::from_micros((f[10] + f[11]) * 1_000_000 / hz)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}
