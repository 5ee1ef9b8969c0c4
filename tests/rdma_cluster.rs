//! Clusters of `ferroplasma node` processes over a real RDMA device (soft-RoCE in CI:
//! `tools/softroce.sh`): every size from 0 B to 64 MiB pulled over RDMA READ with every byte
//! checked and `stat` naming `rdma` per peer; a mixed cluster with a `--transport tcp` node;
//! a holder SIGKILLed in the middle of a transfer; the RDMA link failing in the middle of a
//! transfer (the transfer completes over TCP).
//!
//! Without an RDMA device every test prints `SKIPPED: no RDMA device` and passes.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{pattern, Daemon};
use ferroplasma::client::Client;
use ferroplasma::protocol::ClusterView;
use ferroplasma::ObjectId;

const T: Duration = Duration::from_secs(120);

fn device_or_skip(test: &str) -> bool {
    match ferroplasma_transport_rdma::verbs::no_device() {
        None => true,
        Some(why) => {
            println!("SKIPPED: no RDMA device ({test}: {why})");
            false
        }
    }
}

/// The address nodes listen on: the RDMA netdev's (set by tools/softroce.sh), else loopback.
fn ip() -> String {
    std::env::var("FERROPLASMA_RDMA_ADDR").unwrap_or_else(|_| "127.0.0.1".into())
}

/// The RDMA device's name.
fn device() -> String {
    std::env::var("FERROPLASMA_RDMA_DEVICE").unwrap_or_else(|_| "rxe0".into())
}

fn this_addr(c: &Client) -> String {
    let v = c.nodes().expect("nodes");
    v.members
        .iter()
        .find(|m| m.this)
        .map(|m| m.addr.clone())
        .expect("this node in its view")
}

/// Starts node `tag` in the cluster of `head` (a new cluster without one) with `extra` flags.
fn node(tag: &str, memory: &str, head: Option<&str>, extra: &[&str]) -> Daemon {
    node_on(&ip(), tag, memory, head, extra)
}

/// The cluster token's file (a non-loopback listen address needs one).
fn token_file() -> String {
    let path = std::env::temp_dir().join(format!("fp-rdma-token-{}", std::process::id()));
    std::fs::write(&path, "rdma cluster tests: a token of 32+ bytes").expect("token file");
    path.to_string_lossy().into_owned()
}

/// As [`node`], listening (TCP) on `ip`.
fn node_on(ip: &str, tag: &str, memory: &str, head: Option<&str>, extra: &[&str]) -> Daemon {
    let listen = format!("{ip}:0");
    let token = token_file();
    let mut args = vec![
        "--spill",
        "off",
        "--listen",
        listen.as_str(),
        "--token-file",
        token.as_str(),
    ];
    if let Some(h) = head {
        args.extend(["--join", h]);
    }
    args.extend_from_slice(extra);
    Daemon::start_with(tag, memory, &args)
}

/// Waits until `c`'s node reaches `other` over `transport`; returns the reason it gives.
fn wait_transport(c: &Client, other: ferroplasma::NodeId, transport: &str) -> String {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let v = c.nodes().expect("nodes");
        if let Some(m) = v.members.iter().find(|m| m.node_id == other) {
            if m.transport == transport {
                return m.transport_reason.clone();
            }
        }
        assert!(
            Instant::now() < until,
            "node {} does not reach {other} over {transport}: {v:?}",
            c.node_id(),
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Two nodes `{tag}-a` (the head) and `{tag}-b`, listening on `ip`, once `b` reaches `a` over
/// RDMA: (a, its client, b, its client, b's reason for RDMA).
fn rdma_pair(ip: &str, tag: &str, memory: &str) -> (Daemon, Client, Daemon, Client, String) {
    let a = node_on(ip, &format!("{tag}-a"), memory, None, &[]);
    let ca = a.client();
    let head = this_addr(&ca);
    let b = node_on(ip, &format!("{tag}-b"), memory, Some(&head), &[]);
    let cb = b.client();
    common::wait_alive(&ca, 2);
    let reason = wait_transport(&cb, ca.node_id(), "rdma");
    (a, ca, b, cb, reason)
}

fn status(v: &ClusterView, key: &str) -> Option<String> {
    v.status
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
}

fn rdma_bytes_read(c: &Client) -> u64 {
    status_u64(c, "rdma_bytes_read")
}

fn status_u64(c: &Client, key: &str) -> u64 {
    let v = c.nodes().expect("nodes");
    status(&v, key).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Every object of `ids` at least 1 MiB (the ones pulled as reads, not inlined).
fn large_bytes(ids: &[(ObjectId, u64, usize)]) -> u64 {
    ids.iter()
        .filter(|(_, _, s)| *s >= 1 << 20)
        .map(|(_, _, s)| *s as u64)
        .sum()
}

/// `ferroplasma stat --json` of a node, as text.
fn stat_json(d: &Daemon) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ferroplasma"))
        .args(["stat", "--json", "--socket"])
        .arg(&d.socket)
        .output()
        .expect("ferroplasma stat");
    assert!(out.status.success(), "stat: {out:?}");
    String::from_utf8(out.stdout).expect("utf-8")
}

fn put(c: &Client, seed: u64, size: usize) -> ObjectId {
    let id = c.new_id();
    c.put_with(id, &pattern(seed, size), b"").expect("put");
    id
}

fn check(c: &Client, id: ObjectId, seed: u64, size: usize, what: &str) {
    let v = c
        .get(&[id], T)
        .unwrap_or_else(|e| panic!("{what}: get failed: {e}"));
    assert_eq!(v[0].data().len(), size, "{what}: size");
    assert!(
        v[0].data() == pattern(seed, size).as_slice(),
        "{what}: bytes differ"
    );
}

const SIZES: [usize; 9] = [
    0,
    1,
    4095,
    4096,
    (64 << 10) + 7,
    1 << 20,
    (4 << 20) + 3,
    16 << 20,
    64 << 20,
];

#[test]
fn two_and_three_nodes_pull_every_size_over_rdma() {
    if !device_or_skip("three nodes") {
        return;
    }
    let (_a, ca, b, cb, reason) = rdma_pair(&ip(), "rdma", "256MiB");
    let head = this_addr(&ca);
    println!("b reaches a over rdma: {reason}");
    // Two nodes: every size from a to b.
    let ids: Vec<_> = SIZES
        .iter()
        .enumerate()
        .map(|(i, &s)| (put(&ca, i as u64, s), i as u64, s))
        .collect();
    let t0 = Instant::now();
    for &(id, seed, size) in &ids {
        check(&cb, id, seed, size, &format!("b gets {size} B from a"));
    }
    println!("b pulled {} objects in {:?}", ids.len(), t0.elapsed());
    // Every object pulled as a read came over RDMA READ. (The node's view of its transport
    // refreshes with each heartbeat.)
    let want = large_bytes(&ids);
    common::eventually("b's large objects to have come over RDMA READ", || {
        rdma_bytes_read(&cb) >= want
    });
    // A third node joins; it pulls from a and from b, and b pulls what c owns.
    let c = node("rdma-c", "256MiB", Some(&head), &[]);
    let cc = c.client();
    common::wait_alive(&ca, 3);
    wait_transport(&cc, ca.node_id(), "rdma");
    for &(id, seed, size) in &ids {
        check(&cc, id, seed, size, &format!("c gets {size} B"));
    }
    let own: Vec<_> = SIZES
        .iter()
        .enumerate()
        .map(|(i, &s)| (put(&cc, 100 + i as u64, s), 100 + i as u64, s))
        .collect();
    for &(id, seed, size) in &own {
        check(&cb, id, seed, size, &format!("b gets {size} B from c"));
        check(&ca, id, seed, size, &format!("a gets {size} B from c"));
    }
    wait_transport(&cb, cc.node_id(), "rdma");
    wait_transport(&ca, cc.node_id(), "rdma");
    let own_large = large_bytes(&own);
    common::eventually("c's large objects to have come over RDMA READ", || {
        rdma_bytes_read(&cc) >= want
    });
    common::eventually(
        "b's and a's reads from c to have come over RDMA READ",
        || rdma_bytes_read(&cb) >= want + own_large && rdma_bytes_read(&ca) >= own_large,
    );
    for (who, cl) in [("a", &ca), ("b", &cb), ("c", &cc)] {
        assert_eq!(
            status_u64(cl, "rdma_failovers"),
            0,
            "{who}: no read fell back to TCP"
        );
    }
    // `stat` names the transport of each peer, in text and JSON.
    let json = stat_json(&b);
    assert!(
        json.contains("\"transport\":\"rdma\"") && json.contains("\"rdma_device\""),
        "stat --json of b: {json}"
    );
    let text = Command::new(env!("CARGO_BIN_EXE_ferroplasma"))
        .args(["stat", "--socket"])
        .arg(&b.socket)
        .output()
        .expect("stat");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("via rdma"), "stat of b: {text}");
    println!("{text}");
}

#[test]
fn a_tcp_only_node_joins_rdma_nodes_and_every_get_succeeds() {
    if !device_or_skip("mixed cluster") {
        return;
    }
    let a = node("mix-a", "128MiB", None, &[]);
    let ca = a.client();
    let head = this_addr(&ca);
    let b = node("mix-b", "128MiB", Some(&head), &["--transport", "tcp"]);
    let c = node("mix-c", "128MiB", Some(&head), &[]);
    let (cb, cc) = (b.client(), c.client());
    common::wait_alive(&ca, 3);
    let why = wait_transport(&ca, cb.node_id(), "tcp");
    assert!(
        why.contains("offers no RDMA"),
        "a's reason for tcp to b: {why}"
    );
    wait_transport(&ca, cc.node_id(), "rdma");
    let size = 8 << 20;
    let xs = [put(&ca, 1, size), put(&cb, 2, size), put(&cc, 3, size)];
    for (who, cl) in [("a", &ca), ("b", &cb), ("c", &cc)] {
        for (i, &x) in xs.iter().enumerate() {
            check(cl, x, i as u64 + 1, size, &format!("{who} gets object {i}"));
        }
    }
    wait_transport(&cc, ca.node_id(), "rdma");
    wait_transport(&cc, cb.node_id(), "tcp");
    let json = stat_json(&b);
    assert!(
        !json.contains("\"transport\":\"rdma\""),
        "the tcp node uses no RDMA: {json}"
    );
}

/// rxe's packet counter (every RDMA packet of the device, all nodes on it).
fn sent_pkts() -> u64 {
    let path = format!(
        "/sys/class/infiniband/{}/ports/1/hw_counters/sent_pkts",
        device()
    );
    std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Runs `get` on a thread and runs `fault` once the device has sent a quarter of `size`
/// (in packets of `mtu` bytes) while the get still runs. Returns the get's result.
fn fault_mid_transfer<R: Send>(
    size: usize,
    get: impl FnOnce() -> R + Send,
    fault: impl FnOnce(),
) -> R {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mtu = 1024u64;
    let pkts0 = sent_pkts();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            let r = get();
            done.store(true, Ordering::SeqCst);
            r
        });
        let until = Instant::now() + Duration::from_secs(120);
        loop {
            assert!(
                !done.load(Ordering::SeqCst),
                "the get returned before a quarter of the object had moved"
            );
            let sent = (sent_pkts() - pkts0) * mtu;
            if sent >= size as u64 / 4 {
                println!("fault at ~{sent} of {size} bytes sent");
                break;
            }
            assert!(Instant::now() < until, "only {sent} bytes moved in 120 s");
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(
            !done.load(Ordering::SeqCst),
            "the get returned before the fault"
        );
        fault();
        h.join().expect("reader")
    })
}

#[test]
fn a_holder_killed_mid_transfer_makes_the_reader_switch() {
    if !device_or_skip("holder killed") {
        return;
    }
    let size = 96usize << 20;
    let a = node("kill-a", "256MiB", None, &[]);
    let ca = a.client();
    let head = this_addr(&ca);
    let mut b = node("kill-b", "256MiB", Some(&head), &[]);
    let c = node("kill-c", "256MiB", Some(&head), &[]);
    let (cb, cc) = (b.client(), c.client());
    common::wait_alive(&ca, 3);
    wait_transport(&cb, ca.node_id(), "rdma");
    wait_transport(&cc, ca.node_id(), "rdma");
    let x = put(&ca, 9, size);
    // b takes a copy and tells the owner (a probe after it on the same connection makes
    // sure the owner knows before c asks).
    check(&cb, x, 9, size, "b's copy");
    let probe = put(&ca, 10, 5);
    check(&cb, probe, 10, 5, "probe");
    let r = fault_mid_transfer(
        size,
        || {
            cc.get(&[x], T)
                .map(|v| v[0].data() == pattern(9, size).as_slice())
        },
        || {
            let _ = b.child.kill();
            let _ = b.child.wait();
            println!("b killed");
        },
    );
    assert_eq!(
        r.map_err(|e| e.to_string()),
        Ok(true),
        "c's get completes from the owner with the right bytes"
    );
    // The cluster goes on without b.
    let z = put(&cc, 11, 3 << 20);
    check(&ca, z, 11, 3 << 20, "a gets from c after b's death");
}

/// Brings the RDMA netdev back up when dropped (whatever the test did).
struct LinkUp(String);

impl Drop for LinkUp {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "set", &self.0, "up"])
            .status();
    }
}

/// The link under the RDMA device fails in the middle of a transfer (its netdev goes down:
/// the port reports PORT_ERR). The nodes' TCP connections run over loopback, so only RDMA
/// fails: the transfer completes over TCP with every byte correct, and `stat` says why.
/// (`rdma link delete` cannot stand in for this on rxe: it has no "disassociate", so the
/// kernel waits for every process to close the device before deleting it; docs/rdma.md.)
#[test]
fn the_rdma_link_failing_mid_transfer_completes_over_tcp() {
    if !device_or_skip("link down") {
        return;
    }
    let netdev = std::env::var("FERROPLASMA_RDMA_NETDEV").unwrap_or_else(|_| "rdmanet0".into());
    let size = 96usize << 20;
    let (_a, ca, _b, cb, _) = rdma_pair("127.0.0.1", "link", "256MiB");
    let x = put(&ca, 21, size);
    let up = LinkUp(netdev.clone());
    let r = fault_mid_transfer(
        size,
        || {
            cb.get(&[x], T)
                .map(|v| v[0].data() == pattern(21, size).as_slice())
        },
        || {
            let st = Command::new("ip")
                .args(["link", "set", &netdev, "down"])
                .status()
                .expect("ip link");
            assert!(st.success(), "ip link set {netdev} down");
            println!("{netdev} down");
        },
    );
    assert_eq!(
        r.map_err(|e| e.to_string()),
        Ok(true),
        "the get completes over TCP with the right bytes"
    );
    let why = wait_transport(&cb, ca.node_id(), "tcp");
    println!("b reaches a over tcp: {why}");
    // The port's PORT_ERR event, or a READ that met the dead link first.
    assert!(why.contains("PORT_ERR") || why.contains("IBV_WC_"), "{why}");
    // Later gets work (over TCP while the link is down).
    let y = put(&ca, 22, 5 << 20);
    check(&cb, y, 22, 5 << 20, "a get after the link failed");
    // The link comes back: the port reports PORT_ACTIVE and the nodes connect their queue
    // pairs again; gets go over RDMA again.
    drop(up);
    let why = wait_transport(&cb, ca.node_id(), "rdma");
    println!("b reaches a over rdma again: {why}");
    let before = rdma_bytes_read(&cb);
    let z = put(&ca, 23, 16 << 20);
    check(&cb, z, 23, 16 << 20, "a get after the link came back");
    // The node's view of its transport refreshes with each heartbeat.
    common::eventually("the get after the link came back to count as RDMA", || {
        rdma_bytes_read(&cb) >= before + (16 << 20)
    });
}

/// `--transport rdma` on a machine without a usable device refuses to start, saying why
/// (runs where there is no device: the host in CI).
#[test]
fn transport_rdma_without_a_device_refuses_to_start() {
    if ferroplasma_transport_rdma::verbs::no_device().is_none() {
        println!("not run here: an RDMA device is present (this test is for machines without one)");
        return;
    }
    let sock = common::socket_path("rdma-none");
    let out = Command::new(env!("CARGO_BIN_EXE_ferroplasma"))
        .args([
            "node",
            "--memory",
            "16MiB",
            "--hugepages",
            "off",
            "--spill",
            "off",
        ])
        .args(["--listen", "127.0.0.1:0", "--transport", "rdma", "--socket"])
        .arg(&sock)
        .output()
        .expect("ferroplasma node");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without a device: {err}");
    assert!(err.contains("no usable RDMA device"), "{err}");
    // `auto` starts and uses TCP.
    let d = Daemon::start_with(
        "rdma-auto",
        "16MiB",
        &["--spill", "off", "--listen", "127.0.0.1:0"],
    );
    let v = d.client().nodes().expect("nodes");
    assert_eq!(v.transport, "tcp", "{v:?}");
}

/// A memlock limit below the arena, without CAP_IPC_LOCK, stops an RDMA node at start with
/// advice on raising it.
#[test]
fn a_small_memlock_limit_is_refused_with_advice() {
    if !device_or_skip("memlock") {
        return;
    }
    let sock = common::socket_path("rdma-memlock");
    // Drop CAP_IPC_LOCK (bounding and inheritable sets) and cap memlock at 64 KiB.
    let out = Command::new("setpriv")
        .args(["--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock", "--"])
        .args(["prlimit", "--memlock=65536", "--"])
        .arg(env!("CARGO_BIN_EXE_ferroplasma"))
        .args([
            "node",
            "--memory",
            "32MiB",
            "--hugepages",
            "off",
            "--spill",
            "off",
        ])
        .args(["--listen", "127.0.0.1:0", "--transport", "rdma", "--socket"])
        .arg(&sock)
        .output()
        .expect("setpriv prlimit ferroplasma node");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started with a 64 KiB memlock limit: {err}"
    );
    assert!(
        err.contains("RLIMIT_MEMLOCK") && err.contains("ulimit -l"),
        "the error says how to raise the limit: {err}"
    );
}

/// `--transport rdma` refuses a peer that cannot do RDMA (a `--transport tcp` node trying to
/// join), says so in `stat`, and keeps serving its RDMA peers.
#[test]
fn transport_rdma_refuses_a_tcp_only_peer() {
    if !device_or_skip("rdma refuses tcp") {
        return;
    }
    let a = node("only-a", "64MiB", None, &["--transport", "rdma"]);
    let ca = a.client();
    let head = this_addr(&ca);
    let b = node("only-b", "64MiB", Some(&head), &["--transport", "tcp"]);
    let cb = b.client();
    common::eventually("a to refuse the tcp-only node", || {
        status_u64(&ca, "rdma_refused_peers") >= 1
    });
    let v = ca.nodes().expect("nodes");
    assert!(
        !v.members.iter().any(|m| m.node_id == cb.node_id()),
        "the refused node is no member: {v:?}"
    );
    // An RDMA node joins and is served.
    let c = node("only-c", "64MiB", Some(&head), &[]);
    let cc = c.client();
    common::wait_alive(&ca, 2);
    let x = put(&ca, 31, 2 << 20);
    check(&cc, x, 31, 2 << 20, "c gets from the rdma-only node");
    wait_transport(&cc, ca.node_id(), "rdma");
}

/// Arenas of 1 GiB and more are registered as several memory regions (one per core, in
/// parallel); with memory windows a grant gets one window per region it touches and per queue
/// pair. An object that straddles two regions comes over RDMA READ whole, every byte checked.
#[test]
fn an_object_across_two_memory_regions_comes_over_rdma() {
    if !device_or_skip("two memory regions") {
        return;
    }
    let (_a, ca, _b, cb, _) = rdma_pair(&ip(), "mrs", "1GiB");
    let v = ca.nodes().expect("nodes");
    let regions: u64 = status(&v, "rdma_memory_regions")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if regions < 2 {
        // One core: one region (nothing to straddle).
        println!("one memory region on this machine: the straddling case needs two cores");
        return;
    }
    // A small object first, so that the large one cannot start at a region boundary.
    let _small = put(&ca, 40, 1 << 20);
    let size = 512usize << 20;
    let x = put(&ca, 41, size);
    let before = rdma_bytes_read(&cb);
    check(
        &cb,
        x,
        41,
        size,
        "b gets an object across two memory regions",
    );
    common::eventually("the object to have come over RDMA READ", || {
        rdma_bytes_read(&cb) >= before + size as u64
    });
    assert_eq!(status_u64(&cb, "rdma_failovers"), 0, "no fall-back to TCP");
}

/// Removes an address from the RDMA netdev when dropped.
struct ExtraAddr(String, String);

impl Drop for ExtraAddr {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["addr", "del", &self.0, "dev", &self.1])
            .status();
    }
}

/// Whether the RDMA device's port lists a GID for IPv4 address `ip`.
fn has_gid_for(ip: &str) -> bool {
    let want: std::net::Ipv4Addr = ip.parse().expect("ipv4");
    let want = want.to_ipv6_mapped().to_string();
    let dir = format!("/sys/class/infiniband/{}/ports/1/gids", device());
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            std::fs::read_to_string(e.path())
                .ok()
                .and_then(|g| g.trim().parse::<std::net::Ipv6Addr>().ok())
                .is_some_and(|g| g.to_string() == want)
        })
}

/// By default a node uses, on each connection, the RoCE v2 GID whose address is the local
/// address of that connection: a node listening on every address, reached through two
/// addresses of the RDMA netdev, uses a different GID on each connection.
#[test]
fn each_connection_uses_the_gid_of_its_local_address() {
    if !device_or_skip("GID per connection") {
        return;
    }
    let netdev = std::env::var("FERROPLASMA_RDMA_NETDEV").unwrap_or_else(|_| "rdmanet0".into());
    let second = "169.254.77.2";
    let st = Command::new("ip")
        .args(["addr", "add", &format!("{second}/16"), "dev", &netdev])
        .status()
        .expect("ip addr add");
    assert!(st.success(), "adding {second} to {netdev}");
    let _addr = ExtraAddr(format!("{second}/16"), netdev.clone());
    common::eventually("the port to list a GID for the second address", || {
        has_gid_for(second)
    });
    let a = node_on("0.0.0.0", "gid-a", "64MiB", None, &[]);
    let ca = a.client();
    let port = this_addr(&ca).rsplit(':').next().expect("port").to_string();
    let b = node("gid-b", "64MiB", Some(&format!("{second}:{port}")), &[]);
    let c = node("gid-c", "64MiB", Some(&format!("{}:{port}", ip())), &[]);
    let (cb, cc) = (b.client(), c.client());
    common::wait_alive(&ca, 3);
    let via_b = wait_transport(&ca, cb.node_id(), "rdma");
    let via_c = wait_transport(&ca, cc.node_id(), "rdma");
    println!("a to b: {via_b}; a to c: {via_c}");
    assert_ne!(via_b, via_c, "a uses another GID on each connection");
    let x = put(&ca, 51, 4 << 20);
    check(&cb, x, 51, 4 << 20, "b reads from a");
    check(&cc, x, 51, 4 << 20, "c reads from a");
}
