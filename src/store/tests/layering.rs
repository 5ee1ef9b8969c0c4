//! Dependencies point one way (docs/ARCHITECTURE.md): `store` knows nothing of the cluster
//! side, the spill thread or the server; `client` only of `shm`, `ring` and `protocol` (and
//! ids). Checked on the sources, so a new import is caught at `cargo test`.

use std::path::Path;

fn sources(dir: &str) -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(dir);
    let mut files = Vec::new();
    let mut todo = vec![root];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                files.push((p.display().to_string(), text));
            }
        }
    }
    assert!(!files.is_empty(), "no sources under src/{dir}");
    files
}

/// Every `crate::…` path named in `text`, as the first two segments (`crate::spill::job`).
fn crate_paths(text: &str) -> Vec<String> {
    text.match_indices("crate::")
        .map(|(i, _)| {
            let rest = &text[i + "crate::".len()..];
            let end = rest
                .find(|ch: char| !(ch.is_alphanumeric() || ch == '_' || ch == ':'))
                .unwrap_or(rest.len());
            let segs: Vec<&str> = rest[..end].split("::").take(2).collect();
            segs.join("::")
        })
        .collect()
}

#[test]
fn store_depends_on_no_cluster_spill_worker_or_server() {
    for (file, text) in sources("store") {
        for p in crate_paths(&text) {
            let bad = p.starts_with("cluster")
                || p.starts_with("server")
                || p.starts_with("client")
                || p == "spill::worker"
                || p == "spill::io";
            assert!(!bad, "{file} uses crate::{p}");
        }
    }
}

#[test]
fn client_depends_only_on_shm_ring_protocol_and_ids() {
    for (file, text) in sources("client") {
        for p in crate_paths(&text) {
            let top = p.split("::").next().unwrap_or_default();
            let ok = ["shm", "ring", "protocol", "id", "client"].contains(&top);
            assert!(ok, "{file} uses crate::{p}");
        }
    }
}

#[test]
fn store_files_stay_small() {
    // A file past this is a sign to split (STYLE.md: one concept per file).
    const MAX_LINES: usize = 900;
    for (file, text) in sources("store") {
        let lines = text.lines().count();
        assert!(lines <= MAX_LINES, "{file} has {lines} lines");
    }
}
