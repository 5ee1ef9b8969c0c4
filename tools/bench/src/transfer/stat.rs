//! What the nodes' `ferroplasma stat --json` says: the parsed answer, how many nodes are
//! alive, how B reaches A (transport, reason, address; waiting for RDMA to settle), and the
//! bytes a node has read over RDMA.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::args::TransportArg;

/// How B reaches A, from B's `stat --json`.
pub(super) struct PeerPath {
    /// `rdma` or `tcp`.
    pub(super) kind: String,
    /// Why, as B's stat says (empty when there is nothing to say).
    pub(super) reason: String,
    /// A's address as B's member list has it.
    pub(super) addr: Option<IpAddr>,
    /// B's last `stat --json`.
    pub(super) stat: Value,
}

/// The transport, reason and address B's `stat` lists for member `node`.
pub(super) fn member_path(stat: &Value, node: &str) -> Option<(String, String, Option<IpAddr>)> {
    let m = stat["nodes"]
        .as_array()?
        .iter()
        .find(|m| m["node_id"].as_str() == Some(node))?;
    Some((
        m["transport"].as_str().unwrap_or_default().to_string(),
        m["transport_reason"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        m["addr"]
            .as_str()
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .map(|a| a.ip()),
    ))
}

/// Finds how B (at `socket_b`) reaches A (`node_a`). RDMA may still be setting up after the
/// join: unless B has no RDMA at all or tcp was asked, waits up to 30 s for `rdma`. With
/// `want` = rdma, anything else is an error.
pub(super) fn resolve_path(
    fp: &Path,
    socket_b: &Path,
    node_a: &str,
    want: TransportArg,
) -> Result<PeerPath> {
    let limit = Duration::from_secs(30);
    let deadline = Instant::now() + limit;
    loop {
        let stat = node_stat(fp, socket_b).context("`ferroplasma stat` of node B")?;
        let (kind, reason, addr) = member_path(&stat, node_a).unwrap_or_default();
        let node_kind = stat["transport"].as_str().unwrap_or("tcp").to_string();
        let settled = kind == "rdma"
            || want == TransportArg::Tcp
            || node_kind == "tcp"
            || Instant::now() > deadline;
        if settled {
            let kind = if kind.is_empty() { node_kind } else { kind };
            if want == TransportArg::Rdma && kind != "rdma" {
                bail!(
                    "--transport rdma, but node B reaches node A over {kind}{}: the figures would \
                     not be RDMA's (B's stat after {limit:?}: transport {:?}, status {})",
                    if reason.is_empty() {
                        String::new()
                    } else {
                        format!(" ({reason})")
                    },
                    stat["transport"],
                    stat["transport_status"]
                );
            }
            return Ok(PeerPath {
                kind,
                reason,
                addr,
                stat,
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `rdma_bytes_read` from the `stat --json` of the node at `socket`: bytes it read by RDMA.
pub(super) fn rdma_bytes_read(fp: &Path, socket: &Path) -> Option<u64> {
    node_stat(fp, socket).ok()?["transport_status"]["rdma_bytes_read"]
        .as_str()?
        .parse()
        .ok()
}

/// `ferroplasma stat --json` of the node at `socket`, parsed.
pub(super) fn node_stat(fp: &Path, socket: &Path) -> Result<Value> {
    let o = Command::new(fp)
        .args(["stat", "--json", "--socket"])
        .arg(socket)
        .stdin(Stdio::null())
        .output()
        .context("running ferroplasma stat")?;
    if !o.status.success() {
        bail!(
            "ferroplasma stat failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&o.stdout)?)
}

/// Alive nodes in a `stat --json` answer; `None` without a `nodes` array.
pub(super) fn alive_nodes(stat: &Value) -> Option<usize> {
    let nodes = stat.get("nodes")?.as_array()?;
    Some(
        nodes
            .iter()
            .filter(|n| n["state"].as_str() == Some("alive"))
            .count(),
    )
}
