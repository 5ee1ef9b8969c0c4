//! The raw RDMA baseline of `transfer --transport rdma`: perftest's `ib_read_bw` between the
//! device(s) the nodes use, server and client both on this machine (on soft-RoCE there is one
//! device, so both ends sit on it), the client reading from the server's address.
//!
//! perftest exchanges its QP data over TCP first: the client starts once the server listens
//! on its port (read from `/proc/net/tcp{,6}`, not a guessed sleep; a probe connection would
//! be taken for the client). `-F` because emulated CPUs give perftest frequency readings it
//! would otherwise refuse. Under emulation perftest's cycle-counter calibration sometimes fails
//! ("Correlation coefficient r^2 ... < 0.9") and it then prints 0.00 MB/s although the
//! transfer ran: that is retried, up to [`ATTEMPTS`] times, on the next port.

use std::io::Read;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cleanup::ChildGuard;

/// Attempts per measurement when perftest's clock calibration fails.
pub const ATTEMPTS: usize = 3;
/// Fewest messages per run (perftest wants at least 5).
pub const MIN_ITERATIONS: u64 = 8;

/// What to run `ib_read_bw` with.
#[derive(Clone, Debug)]
pub struct ReadBw {
    /// Verbs device (`-d`).
    pub device: String,
    /// GID index (`-x`): the RoCE v2 GID of `addr` on soft-RoCE.
    pub gid_index: u32,
    /// Address the client reaches the server's TCP exchange on.
    pub addr: IpAddr,
    /// Message size (`-s`).
    pub message: u64,
    /// Messages per run (`-n`). Iterations, not a duration (`-D`): under emulation one
    /// message of a MiB can take longer than a short duration, and a duration run that
    /// completes no message reports 0.
    pub iterations: u64,
}

/// How one attempt ended.
enum Attempt {
    Bw(f64),
    /// perftest's clock calibration failed: it printed 0.00 although the reads ran.
    Calibration(String),
}

impl ReadBw {
    /// One measurement, in GB/s (10^9 bytes/s), retrying calibration failures.
    pub fn measure(&self, ports: &mut impl FnMut() -> Result<u16>) -> Result<f64> {
        let mut last = String::new();
        for _ in 0..ATTEMPTS {
            match self.attempt(ports()?)? {
                Attempt::Bw(mb) => return Ok(mb / 1e3),
                Attempt::Calibration(out) => {
                    eprintln!("ib_read_bw: perftest's clock calibration failed; trying again");
                    last = out;
                }
            }
        }
        bail!(
            "ib_read_bw: perftest's clock calibration failed {ATTEMPTS} times (host too busy?); \
             the client's last output:\n{last}"
        )
    }

    fn args(&self, port: u16) -> Vec<String> {
        vec![
            "-d".into(),
            self.device.clone(),
            "-x".into(),
            self.gid_index.to_string(),
            "-s".into(),
            self.message.to_string(),
            "-n".into(),
            self.iterations.max(MIN_ITERATIONS).to_string(),
            "-F".into(),
            "-p".into(),
            port.to_string(),
        ]
    }

    fn attempt(&self, port: u16) -> Result<Attempt> {
        let program = "ib_read_bw";
        let mut server = Command::new(program);
        server
            .args(self.args(port))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut server = ChildGuard::spawn(server, "ib_read_bw server").map_err(|e| {
            e.context("ib_read_bw (perftest) is needed for the raw RDMA baseline: install perftest")
        })?;
        let limit = Duration::from_secs(60);
        let deadline = Instant::now() + limit;
        while !listening(port)? {
            if let Some(st) = server.child().try_wait()? {
                bail!(
                    "the ib_read_bw server exited ({st}) before listening on port {port}: {}",
                    drain(&mut server)
                );
            }
            if Instant::now() > deadline {
                bail!("the ib_read_bw server did not listen on port {port} within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Generous: 120 s plus 1 MB/s.
        let bytes = self.message.saturating_mul(self.iterations);
        let client_limit = Duration::from_secs(120 + bytes / 1_000_000);
        let out = Command::new("timeout")
            .arg(client_limit.as_secs().to_string())
            .arg(program)
            .args(self.args(port))
            .arg(self.addr.to_string())
            .stdin(Stdio::null())
            .output()
            .context("running the ib_read_bw client (under `timeout`)")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let server_st = server.wait_for_exit(Duration::from_secs(30));
        if !out.status.success() {
            bail!("the ib_read_bw client failed ({}):\n{text}", out.status);
        }
        match server_st {
            Ok(st) if st.success() => {}
            Ok(st) => bail!("the ib_read_bw server failed ({st}); the client said:\n{text}"),
            Err(e) => return Err(e.context("the ib_read_bw server")),
        }
        let bw = average_bw(&text, self.message);
        match bw {
            Some(b) if b > 0.0 => Ok(Attempt::Bw(b)),
            _ if text.contains("Correlation coefficient") => Ok(Attempt::Calibration(text)),
            Some(_) => bail!("ib_read_bw reported 0 MB/s:\n{text}"),
            None => bail!("no bandwidth line in ib_read_bw's output:\n{text}"),
        }
    }
}

/// What is left in a finished child's pipes.
fn drain(c: &mut ChildGuard) -> String {
    let mut s = String::new();
    if let Some(mut o) = c.child().stdout.take() {
        let _ = o.read_to_string(&mut s);
    }
    if let Some(mut e) = c.child().stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

/// The "BW average[MB/sec]" of the result line for `message`-byte messages: the line after
/// the `#bytes #iterations BW peak[MB/sec] BW average[MB/sec] MsgRate[Mpps]` header whose
/// first column is the message size. MB = 10^6 bytes.
pub fn average_bw(out: &str, message: u64) -> Option<f64> {
    let mut header = false;
    for line in out.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.first() == Some(&"#bytes") {
            header = true;
            continue;
        }
        if header && cols.len() >= 4 && cols[0].parse::<u64>().ok() == Some(message) {
            return cols[3].parse::<f64>().ok();
        }
    }
    None
}

/// Whether a TCP socket listens on `port` (any address, IPv4 or IPv6).
fn listening(port: u16) -> Result<bool> {
    let mut any = false;
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(s) = std::fs::read_to_string(Path::new(f)) else {
            continue;
        };
        any = true;
        if listens_on(&s, port) {
            return Ok(true);
        }
    }
    if !any {
        bail!("cannot read /proc/net/tcp or /proc/net/tcp6");
    }
    Ok(false)
}

/// Whether the text of a `/proc/net/tcp{,6}` table has a LISTEN (state 0A) entry on `port`.
fn listens_on(table: &str, port: u16) -> bool {
    table.lines().skip(1).any(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        let local_port = cols
            .get(1)
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
        local_port == Some(port) && cols.get(3) == Some(&"0A")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "\
---------------------------------------------------------------------------------------
                    RDMA_Read BW Test
 Dual-port       : OFF\t\tDevice         : rxe0
---------------------------------------------------------------------------------------
 #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]
 1048576    160              0.00               33.52 \t\t   0.000032
---------------------------------------------------------------------------------------
";

    #[test]
    fn parses_the_average_column() {
        assert_eq!(average_bw(OUT, 1 << 20), Some(33.52));
        assert_eq!(average_bw(OUT, 65536), None);
        assert_eq!(average_bw(" 1048576 160 0.00 33.52 0.1", 1 << 20), None);
        let zero = OUT.replace("33.52", "0.00");
        assert_eq!(average_bw(&zero, 1 << 20), Some(0.0));
    }

    #[test]
    fn finds_listening_ports() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
                 0: 00000000:4853 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1\n   \
                 1: 0100007F:1F90 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2\n";
        assert!(listens_on(t, 0x4853));
        assert!(!listens_on(t, 0x1F90), "established, not listening");
        assert!(!listens_on(t, 1));
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(listening(l.local_addr().unwrap().port()).unwrap());
    }
}
