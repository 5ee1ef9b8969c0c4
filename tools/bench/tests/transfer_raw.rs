//! `ferroplasma-bench transfer --raw-only`: the raw TCP baseline over loopback, and across two
//! network namespaces when running as root with iproute2 (skipped otherwise, saying so).

use std::process::Command;

fn run(netns: &str) -> serde_json::Value {
    let o = Command::new(env!("CARGO_BIN_EXE_ferroplasma-bench"))
        .args(["transfer", "--raw-only", "--json", "--runs", "2"])
        .args(["--raw-bytes", "64MiB", "--netns", netns])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["raw_tcp_bytes"], 64 << 20);
    assert_eq!(v["raw_tcp_runs_gb_per_s"].as_array().unwrap().len(), 2);
    assert!(v["raw_tcp_gb_per_s"].as_f64().unwrap() > 0.0);
    v
}

#[test]
fn raw_tcp_over_loopback() {
    let v = run("off");
    assert_eq!(v["netns"], false);
    assert_eq!(v["raw_tcp_receiver"], "127.0.0.1");
}

#[test]
fn raw_tcp_between_namespaces() {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    let ip = Command::new("ip").arg("-V").output().is_ok();
    if !(root && ip) {
        eprintln!("skipped: needs root and iproute2 (`ip`) for network namespaces");
        return;
    }
    let pid = std::process::id();
    let v = run("on");
    assert_eq!(v["netns"], true);
    assert!(v["raw_tcp_receiver"]
        .as_str()
        .unwrap()
        .starts_with("10.231."));
    // The namespaces are gone afterwards.
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        !list.lines().any(|l| l.starts_with("fp-bench-")),
        "namespaces left behind: {list} (test pid {pid})"
    );
}

/// The whole benchmark on loopback with tiny sizes, when a cluster-capable `ferroplasma`
/// binary sits next to the bench (`cargo build` builds it; skipped otherwise, saying so).
#[test]
fn small_transfer_between_two_loopback_nodes() {
    let bench = std::path::Path::new(env!("CARGO_BIN_EXE_ferroplasma-bench"));
    let fp = bench.with_file_name("ferroplasma");
    let cluster = Command::new(&fp)
        .args(["node", "--help"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--listen"));
    if !cluster {
        eprintln!(
            "skipped: no cluster-capable {} (cargo build it first)",
            fp.display()
        );
        return;
    }
    let svg = std::env::temp_dir().join(format!("fp-bench-test-{}.svg", std::process::id()));
    let o = Command::new(bench)
        .args(["transfer", "--json", "--netns", "off", "--runs", "2"])
        .args(["--sizes", "1MiB,4MiB,1GiB", "--memory", "128MiB"])
        .args(["--small-objects", "10"])
        .arg("--plot")
        .arg(&svg)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["transport"], "tcp");
    assert_eq!(v["netns"], false);
    let sizes = v["sizes"].as_array().unwrap();
    assert_eq!(sizes.len(), 2, "1GiB does not fit 128MiB: {v}");
    assert_eq!(sizes[0]["bytes"], 1 << 20);
    assert!(sizes.iter().all(|s| s["gb_per_s"].as_f64().unwrap() > 0.0));
    assert_eq!(v["skipped_sizes"][0], 1u64 << 30);
    // 1 GiB did not fit: the ratio is taken at the largest size measured, and says which.
    assert_eq!(v["ratio_size_bytes"], 4 << 20, "{v}");
    assert!(v["ratio_to_raw_at_1gib"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["cpu_seconds_per_gib"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(v["raw_tcp_bytes"], 4 << 20);
    assert!(v["raw_tcp_gb_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["small_remote_get_p50_us"].as_f64().unwrap() > 0.0);
    assert!(v["small_remote_get_p99_us"].as_f64().unwrap() > 0.0);
    assert_eq!(v["verified"], true);
    let chart = std::fs::read_to_string(&svg).unwrap();
    let _ = std::fs::remove_file(&svg);
    assert!(chart.contains("<polyline") && chart.contains("raw TCP"));
}
