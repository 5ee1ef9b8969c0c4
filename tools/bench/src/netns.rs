//! Two network namespaces joined by a veth pair, so that two nodes on one machine talk over a
//! real (virtual) link instead of loopback. The same commands as `tools/netns.sh up|down`:
//! namespaces `<prefix>a` and `<prefix>b`, veth ends `fpa` (in a, 10.231.X.1/24) and `fpb`
//! (in b, 10.231.X.2/24). The addresses exist only inside the two namespaces.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cleanup::{delete_netns, register_netns};

/// Whether namespaces can be made here: running as root with `ip` on the PATH.
pub fn available() -> bool {
    rustix::process::geteuid().is_root()
        && Command::new("ip")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
}

/// The two namespaces; deleted on drop.
#[derive(Debug)]
pub struct NetnsPair {
    /// Namespace of side a.
    pub a: String,
    /// Namespace of side b.
    pub b: String,
    /// Address of side a (on `fpa`).
    pub addr_a: Ipv4Addr,
    /// Address of side b (on `fpb`).
    pub addr_b: Ipv4Addr,
    created: Vec<String>,
}

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> Result<()> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !o.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

impl NetnsPair {
    /// Creates `<prefix>a` and `<prefix>b` with 10.231.`octet`.1 and .2; on error removes what
    /// it created.
    pub fn create(prefix: &str, octet: u8) -> Result<Self> {
        if !(1..=254).contains(&octet) {
            bail!("subnet octet {octet} is not in 1..=254");
        }
        let mut pair = Self {
            a: format!("{prefix}a"),
            b: format!("{prefix}b"),
            addr_a: Ipv4Addr::new(10, 231, octet, 1),
            addr_b: Ipv4Addr::new(10, 231, octet, 2),
            created: Vec::new(),
        };
        for ns in [pair.a.clone(), pair.b.clone()] {
            // Registered first: an interrupt between the two steps still removes it.
            register_netns(&ns);
            if let Err(e) = ip(&["netns", "add", &ns]) {
                crate::cleanup::forget_netns(&ns);
                return Err(e);
            }
            pair.created.push(ns);
        }
        // On error from here on, `pair`'s drop deletes both namespaces (and the veth with them).
        let a_cidr = format!("{}/24", pair.addr_a);
        let b_cidr = format!("{}/24", pair.addr_b);
        ip(&[
            "link", "add", "fpa", "netns", &pair.a, "type", "veth", "peer", "name", "fpb", "netns",
            &pair.b,
        ])?;
        ip(&["-n", &pair.a, "addr", "add", &a_cidr, "dev", "fpa"])?;
        ip(&["-n", &pair.b, "addr", "add", &b_cidr, "dev", "fpb"])?;
        for (ns, dev) in [(&pair.a, "fpa"), (&pair.b, "fpb")] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(pair)
    }

    /// A command that runs `program` inside namespace `ns` (`ip netns exec NS PROGRAM`).
    pub fn command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in self.created.drain(..) {
            delete_netns(&ns);
        }
    }
}

/// The third octet of the subnet for this process: distinct for concurrent runs.
pub fn octet_for(pid: u32) -> u8 {
    u8::try_from(pid % 254 + 1).unwrap_or(1)
}
