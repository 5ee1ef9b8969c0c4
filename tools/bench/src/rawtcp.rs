//! The raw TCP baseline of `transfer`: one plain `std::net::TcpStream` moving N bytes in large
//! writes and reads between the same two endpoints as the nodes. Receiver and sender are this
//! binary's hidden subcommands `raw-tcp-serve` and `raw-tcp-send`, run as child processes so
//! that each can sit in its node's network namespace (`ip netns exec`). The receiver measures:
//! from accepting the connection to the last byte read.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferroplasma::ByteSize;
use serde_json::json;

use crate::cleanup::ChildGuard;
use crate::netns::NetnsPair;
use crate::stats::gbps;

/// `raw-tcp-serve`: accept one connection, read `--bytes`, print the bandwidth as JSON.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0: any); the first stdout line is `listening ADDR`
    #[arg(long)]
    listen: SocketAddr,
    /// Bytes to receive
    #[arg(long)]
    bytes: ByteSize,
    /// Read size
    #[arg(long, default_value = "4MiB")]
    chunk: ByteSize,
    /// Give up if nobody connects within this many seconds
    #[arg(long, default_value_t = 60)]
    accept_timeout_s: u64,
}

/// `raw-tcp-send`: connect and write `--bytes`.
#[derive(clap::Args)]
pub struct SendArgs {
    /// Receiver address
    #[arg(long)]
    connect: SocketAddr,
    /// Bytes to send
    #[arg(long)]
    bytes: ByteSize,
    /// Write size
    #[arg(long, default_value = "4MiB")]
    chunk: ByteSize,
}

/// Runs the receiver.
pub fn serve(a: &ServeArgs) -> Result<()> {
    let l = TcpListener::bind(a.listen).with_context(|| format!("binding {}", a.listen))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening {}", l.local_addr()?)?;
    out.flush()?;
    l.set_nonblocking(true)?;
    let deadline = Instant::now() + Duration::from_secs(a.accept_timeout_s);
    let mut s = loop {
        match l.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    bail!("nobody connected to {} in time", a.listen);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e).context("accept"),
        }
    };
    let t0 = Instant::now();
    s.set_nonblocking(false)?;
    let mut buf = vec![0u8; usize::try_from(a.chunk.0.max(4096))?];
    let mut got = 0u64;
    let mut first = None;
    while got < a.bytes.0 {
        let n = s.read(&mut buf).context("reading")?;
        if n == 0 {
            bail!("sender closed after {got} of {} bytes", a.bytes.0);
        }
        first.get_or_insert_with(Instant::now);
        got += n as u64;
    }
    let total = t0.elapsed();
    let from_first = first.map_or(total, |f| f.elapsed());
    drop(s);
    writeln!(
        out,
        "{}",
        json!({
            "bytes": got,
            "secs": total.as_secs_f64(),
            "secs_from_first_byte": from_first.as_secs_f64(),
            "gb_per_s": gbps(got, total),
        })
    )?;
    out.flush()?;
    Ok(())
}

/// Runs the sender.
pub fn send(a: &SendArgs) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        match TcpStream::connect(a.connect) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {}", a.connect)),
        }
    };
    let chunk = usize::try_from(a.chunk.0.max(4096))?;
    let buf: Vec<u8> = (0..chunk)
        .map(|i| u8::try_from(i % 251).unwrap_or(0))
        .collect();
    let mut left = a.bytes.0;
    while left > 0 {
        let n = usize::try_from(left.min(chunk as u64))?;
        s.write_all(&buf[..n]).context("writing")?;
        left -= n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    // Wait for the receiver to close: it has then read everything.
    let mut sink = [0u8; 64];
    while s.read(&mut sink).unwrap_or(0) > 0 {}
    Ok(())
}

/// Where the baseline runs: the receiver listens on `listen` inside `recv_ns` (if any), the
/// sender runs inside `send_ns` (if any).
#[derive(Clone, Debug)]
pub struct Endpoints {
    /// Namespace of the receiver (node B's side).
    pub recv_ns: Option<String>,
    /// Namespace of the sender (node A's side).
    pub send_ns: Option<String>,
    /// Receiver address; port 0 picks a free one.
    pub listen: SocketAddr,
}

fn command(exe: &Path, ns: Option<&str>) -> Command {
    match ns {
        Some(ns) => NetnsPair::command(ns, exe),
        None => Command::new(exe),
    }
}

/// One baseline run of `bytes`: the receiver's bandwidth in GB/s.
pub fn measure(exe: &Path, ep: &Endpoints, bytes: u64) -> Result<f64> {
    let mut serve = command(exe, ep.recv_ns.as_deref());
    serve
        .args(["raw-tcp-serve", "--listen", &ep.listen.to_string()])
        .args(["--bytes", &bytes.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut server = ChildGuard::spawn(serve, "raw TCP receiver")?;
    let stdout = server
        .child()
        .stdout
        .take()
        .context("receiver stdout missing")?;
    let mut lines = BufReader::new(stdout).lines();
    let first = lines
        .next()
        .context("the raw TCP receiver exited before listening")??;
    let addr = first
        .strip_prefix("listening ")
        .with_context(|| format!("unexpected receiver output {first:?}"))?
        .to_string();
    let mut send = command(exe, ep.send_ns.as_deref());
    send.args(["raw-tcp-send", "--connect", &addr])
        .args(["--bytes", &bytes.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let sender = ChildGuard::spawn(send, "raw TCP sender")?;
    let result = lines
        .next()
        .context("the raw TCP receiver exited without a result")??;
    let v: serde_json::Value =
        serde_json::from_str(&result).with_context(|| format!("receiver said {result:?}"))?;
    let st = sender.wait_for_exit(Duration::from_secs(30))?;
    if !st.success() {
        bail!("raw TCP sender failed: {st}");
    }
    let st = server.wait_for_exit(Duration::from_secs(30))?;
    if !st.success() {
        bail!("raw TCP receiver failed: {st}");
    }
    v["gb_per_s"]
        .as_f64()
        .with_context(|| format!("no gb_per_s in {result:?}"))
}
