//! Starting and stopping the two nodes: node A (head) and node B (joining A) as separate
//! `ferroplasma node` processes, in network namespaces or on a local address, with their
//! arenas sized, a token, their logs in a temporary directory, and readiness awaited through
//! `stat`; the namespaces choice, the listen address and free ports; the log tails shown after
//! a failure.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferroplasma::ByteSize;

use super::args::{Args, NetnsMode, TransportArg};
use super::baseline::raw_endpoints;
use super::stat::{alive_nodes, node_stat};
use super::{GIB, MIB};
use crate::cleanup::{ChildGuard, TempDir};
use crate::cpu::Processes;
use crate::netns::NetnsPair;
use crate::rawtcp::Endpoints;

/// Memory left to the bench process and the rest of the machine when sizing arenas.
const RESERVE: u64 = GIB;
/// Port the nodes listen on inside their namespaces.
const NETNS_PORT: u16 = 7420;

/// The nodes and what they need; dropped in field order: nodes, then namespaces, then files.
pub(super) struct Started {
    _b: ChildGuard,
    _a: ChildGuard,
    /// The two node processes, for their CPU time.
    pub(super) cpu: Processes,
    pub(super) netns: Option<NetnsPair>,
    log_a: PathBuf,
    log_b: PathBuf,
    _dir: TempDir,
}

/// Where the two nodes are and how to reach them.
pub(super) struct Setup {
    pub(super) socket_a: PathBuf,
    pub(super) socket_b: PathBuf,
    pub(super) addrs: Option<(SocketAddr, SocketAddr)>,
    pub(super) raw: Option<Endpoints>,
    pub(super) started: Option<Started>,
}

/// Whether to use namespaces for `mode`.
/// Namespaces only carry TCP: an RDMA device (rxe on soft-RoCE) sits in the initial namespace,
/// so `auto` leaves them out unless the transport is tcp.
pub(super) fn use_netns(mode: NetnsMode, transport: TransportArg) -> Result<bool> {
    Ok(match mode {
        NetnsMode::Off => false,
        NetnsMode::On => {
            if transport == TransportArg::Rdma {
                bail!("--netns on does not go with --transport rdma: the RDMA device is in the initial network namespace");
            }
            if !crate::netns::available() {
                bail!("--netns on needs root and iproute2's `ip`");
            }
            true
        }
        NetnsMode::Auto => transport == TransportArg::Tcp && crate::netns::available(),
    })
}

/// Where the nodes listen without namespaces: loopback for tcp; for rdma and auto the address
/// of the RDMA netdev, `$FERROPLASMA_RDMA_ADDR` (tools/softroce.sh sets it in its guest), else
/// loopback.
pub(super) fn node_ip(transport: TransportArg) -> Result<IpAddr> {
    const VAR: &str = "FERROPLASMA_RDMA_ADDR";
    if transport == TransportArg::Tcp {
        return Ok(Ipv4Addr::LOCALHOST.into());
    }
    match std::env::var(VAR) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .with_context(|| format!("${VAR} = {v:?} is not an IP address")),
        _ => Ok(Ipv4Addr::LOCALHOST.into()),
    }
}

/// After a failure: the end of the logs of the nodes started here, on stderr.
pub(super) fn dump_logs(setup: &Setup) {
    if let Some(st) = &setup.started {
        for (name, log) in [("A", &st.log_a), ("B", &st.log_b)] {
            eprintln!("--- node {name}'s log ends:\n{}", tail(log, 30));
        }
    }
}

/// MemAvailable from /proc/meminfo, in bytes.
fn mem_available() -> Result<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    s.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .context("no MemAvailable in /proc/meminfo")
}

/// Arena per node: the flag, or 2 x largest + 256MiB capped by half of what is available.
pub(super) fn arena_size(
    flag: Option<ByteSize>,
    largest: u64,
    notes: &mut Vec<String>,
) -> Result<u64> {
    let avail = mem_available()?;
    let cap = avail.saturating_sub(RESERVE) / 2;
    let want = match flag {
        Some(m) => {
            if m.0 > cap {
                notes.push(format!(
                    "--memory {m} per node exceeds half of MemAvailable ({}) less {}: the nodes may fail to start",
                    ByteSize(avail),
                    ByteSize(RESERVE)
                ));
            }
            return Ok(m.0);
        }
        None => largest.saturating_mul(2).saturating_add(256 * MIB),
    };
    if want > cap {
        notes.push(format!(
            "arena capped at {} per node (MemAvailable {}), wanted {}",
            ByteSize(cap),
            ByteSize(avail),
            ByteSize(want)
        ));
    }
    // Whole 2 MiB pages.
    Ok(want.min(cap) / (2 * MIB) * (2 * MIB))
}

/// A free TCP port on `ip` (free when asked; the node binds it right after).
pub(super) fn free_port(ip: IpAddr) -> Result<u16> {
    let l = TcpListener::bind((ip, 0)).with_context(|| format!("finding a free port on {ip}"))?;
    Ok(l.local_addr()?.port())
}

/// A fresh random token in `dir/token`, mode 0600.
fn write_token(dir: &Path) -> Result<PathBuf> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut raw = [0u8; 32];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .context("reading /dev/urandom")?;
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join("token");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{hex}")?;
    Ok(path)
}

/// Checks that `fp` exists and knows `node --listen`.
fn check_binary(fp: &Path) -> Result<()> {
    if !fp.exists() {
        bail!(
            "{} not found: build it next to this binary with `cargo build --release` \
             (the bench starts the nodes as separate processes)",
            fp.display()
        );
    }
    let o = Command::new(fp)
        .args(["node", "--help"])
        .output()
        .with_context(|| format!("running {}", fp.display()))?;
    if !String::from_utf8_lossy(&o.stdout).contains("--listen") {
        bail!(
            "{} has no cluster support (`node --listen`): rebuild it with `cargo build --release`",
            fp.display()
        );
    }
    Ok(())
}

/// The last `n` lines of a log file, for error messages.
fn tail(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Starts node A (head) and node B (joining A), in namespaces or on loopback.
pub(super) fn start_nodes(
    a: &Args,
    fp: &Path,
    largest: u64,
    notes: &mut Vec<String>,
) -> Result<Setup> {
    check_binary(fp)?;
    let use_netns = use_netns(a.netns, a.transport)?;
    let ip = node_ip(a.transport)?;
    let arena = arena_size(a.memory, largest, notes)?;
    let pid = std::process::id();
    let dir = TempDir::create(std::env::temp_dir().join(format!("fp-bench-{pid}-transfer")))?;
    let token = match &a.token_file {
        Some(t) => t.clone(),
        None => write_token(dir.path())?,
    };
    let netns = if use_netns {
        let pair = NetnsPair::create(&format!("fp-bench-{pid}-"), crate::netns::octet_for(pid))
            .context("creating network namespaces (as in tools/netns.sh up)")?;
        Some(pair)
    } else {
        None
    };
    let (addr_a, addr_b) = match &netns {
        Some(p) => (
            SocketAddr::V4(SocketAddrV4::new(p.addr_a, NETNS_PORT)),
            SocketAddr::V4(SocketAddrV4::new(p.addr_b, NETNS_PORT)),
        ),
        None => {
            let pa = free_port(ip)?;
            let mut pb = free_port(ip)?;
            while pb == pa {
                pb = free_port(ip)?;
            }
            (SocketAddr::new(ip, pa), SocketAddr::new(ip, pb))
        }
    };
    let socket_a = dir.path().join("a.sock");
    let socket_b = dir.path().join("b.sock");
    eprintln!(
        "starting two nodes with {} arenas{} (backing an arena takes ~1.5 s per GiB of 4 KiB pages)",
        ByteSize(arena),
        match &netns {
            Some(p) => format!(", in namespaces {} ({addr_a}) and {} ({addr_b})", p.a, p.b),
            None => format!(" on {addr_a} and {addr_b}"),
        },
    );
    let node_cmd = |ns: Option<&str>,
                    socket: &Path,
                    listen: SocketAddr,
                    join: Option<SocketAddr>,
                    log: &Path|
     -> Result<Command> {
        let mut c = match ns {
            Some(ns) => NetnsPair::command(ns, fp),
            None => Command::new(fp),
        };
        c.arg("node")
            .arg("--socket")
            .arg(socket)
            .args(["--listen", &listen.to_string()])
            .args(["--memory", &arena.to_string()])
            .args(["--spill", "off"])
            .args(["--checksums", a.checksums.as_str()])
            .args(["--zero-copy", a.zero_copy.as_str()])
            .args(["--transport", a.transport.as_str()])
            .arg("--token-file")
            .arg(&token);
        if let Some(d) = &a.rdma_device {
            c.args(["--rdma-device", d]);
        }
        if let Some(ms) = a.dead_after_ms {
            c.args(["--dead-after-ms", &ms.to_string()]);
        }
        if let Some(g) = a.rdma_gid_index {
            c.args(["--rdma-gid-index", &g.to_string()]);
        }
        if let Some(j) = join {
            c.args(["--join", &j.to_string()]);
        }
        let f = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        c.stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .env_remove("FERROPLASMA_SOCKET")
            .env_remove("FERROPLASMA_TOKEN")
            // An error's backtrace would push the error itself out of the log tail shown
            // when a node fails to start (panics keep theirs).
            .env("RUST_LIB_BACKTRACE", "0")
            .env("NO_COLOR", "1");
        Ok(c)
    };
    let ready_within = Duration::from_secs(60 + 3 * arena / GIB);
    let log_a = dir.path().join("a.log");
    let log_b = dir.path().join("b.log");
    let ns_a = netns.as_ref().map(|p| p.a.clone());
    let ns_b = netns.as_ref().map(|p| p.b.clone());
    let mut node_a = ChildGuard::spawn(
        node_cmd(ns_a.as_deref(), &socket_a, addr_a, None, &log_a)?,
        "node A",
    )?;
    wait_ready(fp, &mut node_a, &socket_a, &log_a, 1, ready_within)?;
    let mut node_b = ChildGuard::spawn(
        node_cmd(ns_b.as_deref(), &socket_b, addr_b, Some(addr_a), &log_b)?,
        "node B",
    )?;
    wait_ready(fp, &mut node_b, &socket_b, &log_b, 2, ready_within)?;
    wait_ready(
        fp,
        &mut node_a,
        &socket_a,
        &log_a,
        2,
        Duration::from_secs(30),
    )?;

    let raw = Some(raw_endpoints(netns.as_ref(), ip));
    let cpu = Processes::new(vec![node_a.child().id(), node_b.child().id()]);
    // Under `ip netns exec` the pid is the node's own (ip execs it); make sure.
    if let Ok(names) = cpu.names() {
        if names.iter().any(|n| n != "ferroplasma") {
            notes.push(format!(
                "the node pids {:?} run {names:?}, not ferroplasma: their CPU time may not be the nodes'",
                cpu.pids()
            ));
        }
    }
    Ok(Setup {
        socket_a,
        socket_b,
        addrs: Some((addr_a, addr_b)),
        raw,
        started: Some(Started {
            _b: node_b,
            _a: node_a,
            cpu,
            netns,
            log_a,
            log_b,
            _dir: dir,
        }),
    })
}

/// Waits until the node's socket accepts clients and its `stat` shows `alive` alive nodes.
fn wait_ready(
    fp: &Path,
    node: &mut ChildGuard,
    socket: &Path,
    log: &Path,
    alive: usize,
    within: Duration,
) -> Result<()> {
    let deadline = Instant::now() + within;
    let mut last = String::from("socket not there yet");
    loop {
        if let Some(st) = node.child().try_wait()? {
            bail!(
                "{} exited ({st}) before it was ready; its log ends:\n{}",
                node.name(),
                tail(log, 20)
            );
        }
        if socket.exists() {
            match node_stat(fp, socket) {
                Ok(stat) => match alive_nodes(&stat) {
                    Some(n) if n >= alive => return Ok(()),
                    Some(n) => last = format!("{n} of {alive} nodes alive"),
                    None => bail!(
                        "{}'s `stat --json` has no \"nodes\" array: is it a cluster build?",
                        node.name()
                    ),
                },
                Err(e) => last = format!("{e:#}"),
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{} not ready within {within:?} ({last}); its log ends:\n{}",
                node.name(),
                tail(log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
