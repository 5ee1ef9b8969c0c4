//! Tests of the transport flags, the peer path and ib_read_bw settings read from stat, the
//! ratio row and CPU per GiB.

use std::net::{IpAddr, Ipv4Addr};

use super::baseline::gid_index_of;
use super::nodes::{node_ip, use_netns};
use super::stat::{member_path, PeerPath};
use super::*;
use crate::cpu::Sample;
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: Args,
}

#[test]
fn transport_flags() {
    let c = Cli::try_parse_from(["t"]).unwrap().args;
    assert_eq!(c.transport, TransportArg::Tcp);
    assert_eq!(c.raw_rdma_message.0, MIB);
    assert!(c.raw_rdma_bytes.is_none() && c.rdma_device.is_none());
    assert!(c.dead_after_ms.is_none());
    let c = Cli::try_parse_from([
        "t",
        "--transport",
        "rdma",
        "--rdma-device",
        "mlx5_0",
        "--rdma-gid-index",
        "3",
        "--raw-rdma-bytes",
        "64MiB",
        "--dead-after-ms",
        "60000",
    ])
    .unwrap()
    .args;
    assert_eq!(c.transport.as_str(), "rdma");
    assert_eq!(c.rdma_device.as_deref(), Some("mlx5_0"));
    assert_eq!(c.rdma_gid_index, Some(3));
    assert_eq!(c.raw_rdma_bytes, Some(ByteSize(64 * MIB)));
    assert_eq!(c.dead_after_ms, Some(60_000));
    assert!(Cli::try_parse_from(["t", "--transport", "udp"]).is_err());
    // RDMA devices live in the initial namespace.
    assert!(use_netns(NetnsMode::On, TransportArg::Rdma).is_err());
    assert!(!use_netns(NetnsMode::Auto, TransportArg::Rdma).unwrap());
    assert!(!use_netns(NetnsMode::Auto, TransportArg::Auto).unwrap());
    assert_eq!(node_ip(TransportArg::Tcp).unwrap(), Ipv4Addr::LOCALHOST);
}

#[test]
fn reads_the_peer_path_and_gid_from_stat() {
    let stat: Value = serde_json::from_str(
        r#"{"transport":"rdma","transport_status":{"rdma_device":"rxe0",
                 "rdma_gid":"fe80::1 (index 1, RoCE v2)","rdma_bytes_read":"42"},
                "nodes":[{"node_id":"aa","addr":"169.254.77.1:4000","state":"alive","this":false,
                          "transport":"rdma","transport_reason":"2 RC queue pairs"},
                         {"node_id":"bb","addr":"169.254.77.1:4001","state":"alive","this":true,
                          "transport":"","transport_reason":""}]}"#,
    )
    .unwrap();
    let (kind, reason, addr) = member_path(&stat, "aa").unwrap();
    assert_eq!(
        (kind.as_str(), reason.as_str()),
        ("rdma", "2 RC queue pairs")
    );
    assert_eq!(addr, Some("169.254.77.1".parse().unwrap()));
    assert!(member_path(&stat, "cc").is_none());
    assert_eq!(
        gid_index_of(stat["transport_status"]["rdma_gid"].as_str().unwrap()),
        Some(1)
    );
    assert_eq!(gid_index_of("fe80::1 (index 12, RoCE v2)"), Some(12));
    assert_eq!(gid_index_of("fe80::1"), None);
    assert_eq!(gid_index_of("(index x)"), None);

    let c = Cli::try_parse_from(["t", "--transport", "rdma"])
        .unwrap()
        .args;
    let path = PeerPath {
        kind,
        reason,
        addr,
        stat,
    };
    let rb = read_bw_for(&c, &path, 5 * MIB / 2).unwrap();
    assert_eq!(rb.device, "rxe0");
    assert_eq!(rb.gid_index, 1);
    assert_eq!(rb.addr, "169.254.77.1".parse::<IpAddr>().unwrap());
    assert_eq!((rb.message, rb.iterations), (MIB, 8), "at least 8 messages");
    let rb = read_bw_for(&c, &path, 100 * MIB).unwrap();
    assert_eq!(rb.iterations, 100);
}

fn row(bytes: u64, runs: &[f64]) -> SizeResult {
    SizeResult {
        bytes,
        runs: runs.to_vec(),
        cpu: None,
        error: None,
    }
}

#[test]
fn ratio_at_1gib_else_the_largest_measured() {
    let rows = [
        row(MIB, &[1.0]),
        row(GIB, &[2.0, 3.0, 2.5]),
        row(4 * GIB, &[4.0]),
    ];
    assert_eq!(ratio_row(&rows), Some((GIB, 2.5)));
    let rows = [
        row(MIB, &[1.0]),
        row(256 * MIB, &[2.0]),
        row(512 * MIB, &[]),
    ];
    assert_eq!(ratio_row(&rows), Some((256 * MIB, 2.0)));
    let rows = [row(MIB, &[1.0]), row(GIB, &[])];
    assert_eq!(ratio_row(&rows), Some((MIB, 1.0)));
    assert_eq!(ratio_row(&[]), None);
}

#[test]
fn cpu_per_gib_of_a_row() {
    let mut r = row(GIB / 2, &[1.0, 1.0]);
    assert_eq!(r.cpu_per_gib(), None);
    r.cpu = Some(Sample {
        ticks: 150,
        run_ns: Some(1_500_000_000),
    });
    assert_eq!(r.cpu_per_gib(), Some(1.5));
}
