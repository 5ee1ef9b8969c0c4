//! Nodes as separate processes, each in its own network namespace, joined by veth pairs to
//! a bridge in a fourth namespace (all created here, 10.232.X.0/24 inside them only). Needs
//! root and iproute2; without them every test prints SKIPPED and passes.
//!
//! - three nodes from the CLI and the client library;
//! - a lossy, slow link: `tc netem` delay and loss when the kernel has netem, else (this
//!   machine's kernel lacks CONFIG_NET_SCH_NETEM) a tbf rate limit with its queueing delay
//!   plus random drops by nftables, said so in the output;
//! - a holder killed with SIGKILL in the middle of a transfer (the reader switches to the
//!   owner), and an owner killed in the middle of a transfer (the get fails, naming it, and
//!   the reader's pins, objects and used bytes return to what they were). "In the middle"
//!   is observed, not timed: the kill comes once the victim's interface counter shows a
//!   quarter of the object sent while the get still runs, and the counters afterwards show
//!   the transfer was partial.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferroplasma::client::{Client, GetError};
use ferroplasma::ObjectId;

use common::{opts, pattern, wait_alive};

const BIN: &str = env!("CARGO_BIN_EXE_ferroplasma");

fn skip_reason() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("needs root to create network namespaces".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("needs iproute2 (`ip`)".into());
    }
    None
}

macro_rules! skip_unless_able {
    () => {
        if let Some(why) = skip_reason() {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must(args: &[&str]) {
    if let Err(e) = sh(args) {
        panic!("{e}");
    }
}

/// Namespaces, links and node processes; all removed on drop.
struct Lab {
    tag: String,
    subnet: String,
    dir: PathBuf,
    nodes: Vec<Option<Child>>,
    token: PathBuf,
}

impl Lab {
    /// `n` node namespaces on one bridge.
    fn new(name: &str, n: usize) -> Self {
        let id = std::process::id() % 10_000;
        let tag = format!("fp{id}{name}");
        let subnet = format!(
            "10.232.{}",
            20 + (id + u32::from(name.as_bytes()[0]) * 17) % 200
        );
        let dir = std::env::temp_dir().join(format!("{tag}-dir"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let token = dir.join("token");
        std::fs::write(&token, format!("netns-test-token-0123456789-{tag}\n")).expect("token");
        let lab = Self {
            tag: tag.clone(),
            subnet: subnet.clone(),
            dir,
            nodes: Vec::new(),
            token,
        };
        let br = lab.ns("br");
        must(&["ip", "netns", "add", &br]);
        must(&["ip", "-n", &br, "link", "add", "br0", "type", "bridge"]);
        must(&["ip", "-n", &br, "link", "set", "br0", "up"]);
        for i in 0..n {
            let ns = lab.ns(&i.to_string());
            let (inner, outer) = (format!("e{i}"), format!("p{i}"));
            must(&["ip", "netns", "add", &ns]);
            must(&[
                "ip", "link", "add", &inner, "netns", &ns, "type", "veth", "peer", "name", &outer,
                "netns", &br,
            ]);
            must(&["ip", "-n", &br, "link", "set", &outer, "master", "br0"]);
            must(&["ip", "-n", &br, "link", "set", &outer, "up"]);
            must(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{subnet}.{}/24", i + 1),
                "dev",
                &inner,
            ]);
            must(&["ip", "-n", &ns, "link", "set", &inner, "up"]);
            must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        }
        lab
    }

    fn ns(&self, what: &str) -> String {
        format!("{}{what}", self.tag)
    }

    fn addr(&self, i: usize) -> String {
        format!("{}.{}:7420", self.subnet, i + 1)
    }

    fn socket(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node{i}.sock"))
    }

    fn log(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node{i}.log"))
    }

    /// Starts node `i` in its namespace; node 0 is the head.
    fn start(&mut self, i: usize, memory: &str) {
        let log = std::fs::File::create(self.log(i)).expect("log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(&i.to_string()), BIN])
            .arg("--socket")
            .arg(self.socket(i))
            .args([
                "node",
                "--memory",
                memory,
                "--spill",
                "off",
                "--spin-us",
                "20",
            ])
            .args(["--listen", &self.addr(i)])
            .arg("--token-file")
            .arg(&self.token)
            .args(["--heartbeat-ms", "100", "--dead-after-ms", "1500"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        if i > 0 {
            cmd.args(["--join", &self.addr(0)]);
        }
        let child = cmd.spawn().expect("spawn a node");
        while self.nodes.len() <= i {
            self.nodes.push(None);
        }
        self.nodes[i] = Some(child);
    }

    fn client(&self, i: usize) -> Client {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            match Client::connect_with(self.socket(i), opts()) {
                Ok(c) => return c,
                Err(e) => {
                    assert!(Instant::now() < until, "node {i} never answered: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Bytes node `i`'s interface has received (`rx`) or sent (`tx`), from the kernel's
    /// counters in its namespace.
    fn link_bytes(&self, i: usize, dir: &str) -> u64 {
        let out = Command::new("ip")
            .args([
                "-n",
                &self.ns(&i.to_string()),
                "-s",
                "-j",
                "link",
                "show",
                "dev",
            ])
            .arg(format!("e{i}"))
            .output()
            .expect("ip link show");
        let json = String::from_utf8_lossy(&out.stdout);
        let key = format!("\"{dir}\":{{\"bytes\":");
        let at = json.find(&key).map(|k| k + key.len());
        let digits: String = at
            .map(|k| json[k..].chars().take_while(char::is_ascii_digit).collect())
            .unwrap_or_default();
        digits
            .parse()
            .unwrap_or_else(|_| panic!("no {dir} bytes for e{i} in {json:?}"))
    }

    fn log_text(&self, i: usize) -> String {
        std::fs::read_to_string(self.log(i)).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        for ns in std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = ns.file_name().to_string_lossy().into_owned();
            if name.starts_with(&self.tag) {
                let _ = sh(&["ip", "netns", "del", &name]);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn cli(lab: &Lab, i: usize, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("--socket")
        .arg(lab.socket(i))
        .args(args)
        .output()
        .expect("run the CLI")
}

fn three_nodes(lab: &mut Lab, memory: &str) -> Vec<Client> {
    for i in 0..3 {
        lab.start(i, memory);
    }
    let cs: Vec<Client> = (0..3).map(|i| lab.client(i)).collect();
    for c in &cs {
        wait_alive(c, 3);
    }
    cs
}

const T: Duration = Duration::from_secs(60);

#[test]
fn three_nodes_cli_and_library() {
    skip_unless_able!();
    let mut lab = Lab::new("c", 3);
    let cs = three_nodes(&mut lab, "256MiB");
    // CLI: put a file on node 0, get it on node 2, stat on node 1 lists all three.
    let file = lab.dir.join("in.bin");
    let data = pattern(1, 3 << 20);
    std::fs::write(&file, &data).expect("write");
    let out = cli(&lab, 0, &["put", file.to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let got = lab.dir.join("out.bin");
    let out = cli(&lab, 2, &["get", &id, "-o", got.to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read(&got).expect("read") == data,
        "CLI get returned other bytes"
    );
    let out = cli(&lab, 1, &["stat", "--json"]);
    let stat = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stat.matches("\"state\":\"alive\"").count(), 3, "{stat}");
    assert!(stat.contains("\"transport\":\"tcp\""), "{stat}");
    // Library: objects of several sizes from every node to every other node.
    let sizes = [10usize, 70_000, 1 << 20, 24 << 20];
    let mut objs: Vec<(usize, ObjectId, u64, usize)> = Vec::new();
    for (k, &size) in sizes.iter().enumerate() {
        for (i, c) in cs.iter().enumerate() {
            let seed = (k * 10 + i) as u64;
            let id = c.new_id();
            c.put_with(id, &pattern(seed, size), b"meta").expect("put");
            objs.push((i, id, seed, size));
        }
    }
    for &(owner, id, seed, size) in &objs {
        for (j, c) in cs.iter().enumerate() {
            if j == owner {
                continue;
            }
            let v = c.get(&[id], T).expect("remote get across namespaces");
            assert!(
                v[0].data() == pattern(seed, size).as_slice(),
                "{size} B from node {owner} to {j}"
            );
            assert_eq!(v[0].metadata(), b"meta");
        }
    }
}

/// Makes the link into namespace `ns` (device `dev` in the bridge namespace towards it)
/// slow and lossy. Returns what was applied.
fn degrade(lab: &Lab, node: usize) -> String {
    let br = lab.ns("br");
    let dev = format!("p{node}");
    let ns = lab.ns(&node.to_string());
    let netem = sh(&[
        "ip", "netns", "exec", &br, "tc", "qdisc", "add", "dev", &dev, "root", "netem", "delay",
        "5ms", "1ms", "loss", "1%", "rate", "1gbit",
    ]);
    if netem.is_ok() {
        return "tc netem delay 5ms±1ms loss 1% rate 1gbit".into();
    }
    must(&[
        "ip", "netns", "exec", &br, "tc", "qdisc", "add", "dev", &dev, "root", "tbf", "rate",
        "800mbit", "burst", "256kb", "latency", "20ms",
    ]);
    let mut what = format!(
        "netem is not available in this kernel ({}); tbf rate 800mbit latency 20ms",
        netem.err().unwrap_or_default()
    );
    let nft = sh(&[
        "ip", "netns", "exec", &ns, "nft", "add", "table", "inet", "fplab",
    ])
    .and_then(|()| {
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "nft",
            "add",
            "chain",
            "inet",
            "fplab",
            "input",
            "{ type filter hook input priority 0; }",
        ])
    })
    .and_then(|()| {
        sh(&[
            "ip", "netns", "exec", &ns, "nft", "add", "rule", "inet", "fplab", "input", "meta",
            "l4proto", "tcp", "numgen", "random", "mod", "100", "<", "1", "drop",
        ])
    });
    match nft {
        Ok(()) => what.push_str(" + nftables random drop of 1% of incoming TCP segments"),
        Err(e) => what.push_str(&format!(" (no loss: nft failed: {e})")),
    }
    what
}

#[test]
fn lossy_slow_link() {
    skip_unless_able!();
    let mut lab = Lab::new("l", 2);
    lab.start(0, "256MiB");
    lab.start(1, "256MiB");
    let (a, b) = (lab.client(0), lab.client(1));
    wait_alive(&b, 2);
    let what = degrade(&lab, 1);
    eprintln!("link into node 1: {what}");
    let small = a.new_id();
    a.put_with(small, &pattern(3, 1000), b"").expect("put");
    let big = a.new_id();
    a.put_with(big, &pattern(4, 48 << 20), b"").expect("put");
    let started = Instant::now();
    assert_eq!(
        b.get(&[small], T).expect("small get")[0].data(),
        pattern(3, 1000).as_slice()
    );
    let v = b.get(&[big], T).expect("big get over a lossy link");
    assert!(
        v[0].data() == pattern(4, 48 << 20).as_slice(),
        "bytes differ after a lossy link"
    );
    eprintln!("48 MiB over the degraded link in {:?}", started.elapsed());
}

#[test]
fn sigkill_mid_transfer() {
    skip_unless_able!();
    let mut lab = Lab::new("k", 3);
    let cs = three_nodes(&mut lab, "512MiB");
    let size = 160usize << 20;
    let x = cs[0].new_id();
    cs[0].put_with(x, &pattern(9, size), b"").expect("put");
    // Node 1 takes a copy and tells the owner. Its next lookup at the owner travels on the
    // same connection after that report, so once a second object has come over, the owner
    // knows of the copy.
    drop(cs[1].get(&[x], T).expect("copy to node 1"));
    let probe = cs[0].put(b"probe").expect("put");
    drop(cs[1].get(&[probe], T).expect("probe to node 1"));
    // Slow down node 2's link so that its transfer takes seconds, then kill the holder it
    // reads from (copies are preferred over the owner) once a quarter of the object has left
    // it, while the get still runs.
    degrade_rate(&lab, 2);
    let (reader, sent) = kill_mid_transfer(&mut lab, 1, size, || {
        cs[2]
            .get(&[x], T)
            .map(|v| v[0].data() == pattern(9, size).as_slice())
    });
    assert_eq!(
        reader,
        Ok(true),
        "the get completes from the owner with the right bytes"
    );
    assert!(
        sent < size as u64,
        "node 1 had sent all of the object ({sent} bytes) before it was killed"
    );
    let log = lab.log_text(2);
    assert!(
        log.contains("trying another"),
        "node 2 should have switched sources; its log:\n{log}"
    );
    // Now the owner dies in the middle of a transfer with no other copy: the get fails
    // naming the object or its owner, the room reserved for it returns, and node 2 keeps
    // serving.
    let y = cs[0].new_id();
    cs[0].put_with(y, &pattern(10, size), b"").expect("put");
    let owner = cs[0].node_id();
    let before = common::eventually_stats(&cs[2], "the first reader's pins to go", |s| s.pins == 0);
    assert_eq!(before.objects, 1, "node 2 holds the copy of x: {before:?}");
    let (r, sent) = kill_mid_transfer(&mut lab, 0, size, || cs[2].get(&[y], T).map(|_| ()));
    match r {
        Err(GetError::OwnerDied { id, node }) => assert_eq!((id, node), (y, owner)),
        Err(GetError::ObjectLost { id, .. }) => assert_eq!(id, y),
        other => panic!("expected OwnerDied or ObjectLost, got {other:?}"),
    }
    assert!(
        sent < size as u64,
        "the owner had sent all of y ({sent} bytes)"
    );
    common::eventually_stats(
        &cs[2],
        "no pin, partial object or reserved room left",
        |s| (s.pins, s.objects, s.used_bytes) == (0, before.objects, before.used_bytes),
    );
    let z = cs[2].put(b"still serving").expect("local put");
    assert_eq!(
        cs[2].get(&[z], T).expect("local get")[0].data(),
        b"still serving"
    );
    assert_eq!(
        cs[2].stats().expect("stats").objects,
        2,
        "no partial object left behind"
    );
}

/// Runs `get` (node 2's read of an object of `size` bytes) on a thread and SIGKILLs node
/// `victim` once the kernel's counters show it has sent a quarter of the object and node 2
/// has received part of it, while the get has not returned. Returns the get's result and
/// the bytes `victim` sent in all (its interface counter, read after its death).
fn kill_mid_transfer<R: Send>(
    lab: &mut Lab,
    victim: usize,
    size: usize,
    get: impl FnOnce() -> R + Send,
) -> (R, u64) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let size = size as u64;
    let (sent0, got0) = (lab.link_bytes(victim, "tx"), lab.link_bytes(2, "rx"));
    let done = AtomicBool::new(false);
    let r = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let r = get();
            done.store(true, Ordering::SeqCst);
            r
        });
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(
                !done.load(Ordering::SeqCst),
                "the get returned before node {victim} had sent a quarter of the object"
            );
            let sent = lab.link_bytes(victim, "tx") - sent0;
            if sent >= size / 4 {
                break;
            }
            assert!(
                Instant::now() < until,
                "node {victim} sent only {sent} of {size} bytes in 60 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let got = lab.link_bytes(2, "rx") - got0;
        let running = !done.load(Ordering::SeqCst);
        lab.kill(victim);
        assert!(running, "the get returned before the kill");
        assert!(
            got >= size / 8 && got < size,
            "node 2 had received {got} of {size} bytes at the kill"
        );
        eprintln!("killed node {victim} with node 2 at {got} of {size} bytes");
        h.join().expect("reader")
    });
    let sent = lab.link_bytes(victim, "tx") - sent0;
    eprintln!("node {victim} sent {sent} bytes in all");
    (r, sent)
}

/// Limits the link into `node` to 400 Mbit/s (about 50 MB/s).
fn degrade_rate(lab: &Lab, node: usize) {
    must(&[
        "ip",
        "netns",
        "exec",
        &lab.ns("br"),
        "tc",
        "qdisc",
        "add",
        "dev",
        &format!("p{node}"),
        "root",
        "tbf",
        "rate",
        "400mbit",
        "burst",
        "256kb",
        "latency",
        "50ms",
    ]);
}
