//! Tests of the flags, the fill pattern and its check, and the stat and arena helpers.

use std::path::PathBuf;

use super::measure::{check, fill, PAGE};
use super::nodes::arena_size;
use super::stat::alive_nodes;
use super::*;
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: Args,
}

#[test]
fn parses_flags_and_defaults() {
    let c = Cli::try_parse_from(["t"]).unwrap().args;
    assert_eq!(
        c.sizes.iter().map(|s| s.0).collect::<Vec<_>>(),
        [MIB, 16 * MIB, 64 * MIB, 256 * MIB, GIB, 4 * GIB]
    );
    assert_eq!(c.runs, 3);
    assert_eq!(c.netns, NetnsMode::Auto);
    assert!(c.nodes.is_empty() && !c.json && c.plot.is_none());
    let c = Cli::try_parse_from([
        "t",
        "--json",
        "--sizes",
        "4KiB,2MiB,1.5GiB",
        "--runs",
        "5",
        "--nodes",
        "/tmp/a.sock,/tmp/b.sock",
        "--raw-addr",
        "127.0.0.1:9000",
        "--netns",
        "off",
        "--memory",
        "3GiB",
        "--plot",
        "x.svg",
    ])
    .unwrap()
    .args;
    assert!(c.json);
    assert_eq!(
        c.sizes.iter().map(|s| s.0).collect::<Vec<_>>(),
        [4096, 2 * MIB, 3 * GIB / 2]
    );
    assert_eq!(
        c.nodes,
        [PathBuf::from("/tmp/a.sock"), "/tmp/b.sock".into()]
    );
    assert_eq!(c.raw_addr, Some("127.0.0.1:9000".parse().unwrap()));
    assert_eq!(c.memory, Some(ByteSize(3 * GIB)));
    assert_eq!(c.netns, NetnsMode::Off);
    assert!(Cli::try_parse_from(["t", "--sizes", "1XB"]).is_err());
    assert!(Cli::try_parse_from(["t", "--netns", "maybe"]).is_err());
    assert_eq!(
        Cli::try_parse_from(["t"]).unwrap().args.checksums,
        ChecksumArg::On
    );
    let c = Cli::try_parse_from(["t", "--checksums", "keyed"]).unwrap();
    assert_eq!(c.args.checksums.as_str(), "keyed");
}

#[test]
fn fill_and_check_catch_misplaced_pages() {
    let mut v = vec![0u8; 3 * PAGE + 100];
    fill(&mut v, 9);
    check(&v, 9).unwrap();
    assert!(check(&v, 10).is_err());
    let mut swapped = v.clone();
    swapped.copy_within(0..PAGE, PAGE);
    assert!(check(&swapped, 9).is_err());
    let mut tiny = vec![0u8; 5];
    fill(&mut tiny, 3);
    check(&tiny, 3).unwrap();
}

#[test]
fn counts_alive_nodes() {
    let s: Value = serde_json::from_str(
        r#"{"nodes":[{"node_id":"01","addr":"10.0.0.1:1","state":"alive","head":true},
                         {"node_id":"02","addr":"10.0.0.2:1","state":"dead","head":false}]}"#,
    )
    .unwrap();
    assert_eq!(alive_nodes(&s), Some(1));
    assert_eq!(alive_nodes(&json!({"arena_bytes": 1})), None);
}

#[test]
fn arena_default_is_capped_and_page_aligned() {
    let mut notes = Vec::new();
    let m = arena_size(None, MIB, &mut notes).unwrap();
    assert_eq!(m, 258 * MIB);
    let m = arena_size(None, 1 << 50, &mut notes).unwrap();
    assert!(m < 1 << 50 && m % (2 * MIB) == 0);
    assert!(notes.iter().any(|n| n.contains("capped")));
    assert_eq!(
        arena_size(Some(ByteSize(GIB)), 4 * GIB, &mut notes).unwrap(),
        GIB
    );
}
