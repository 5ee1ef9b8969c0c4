//! docs/ARCHITECTURE.md lists every file that holds `unsafe` code; this keeps the list and the
//! sources in step (a file gaining or losing `unsafe` must update the list).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const ROOTS: [&str; 5] = ["src", "transports", "tools", "benches", "tests"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Whether a line of code (not a comment) uses the `unsafe` keyword.
fn uses_unsafe(line: &str) -> bool {
    let code = line.trim_start();
    if code.starts_with("//") {
        return false;
    }
    let code = code.split("//").next().unwrap_or("");
    code.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .any(|w| w == "unsafe")
}

#[test]
fn the_unsafe_list_in_architecture_md_matches_the_sources() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for r in ROOTS {
        rust_files(&root.join(r), &mut files);
    }
    let me = root.join(file!());
    let actual: BTreeSet<String> = files
        .iter()
        .filter(|p| **p != me)
        .filter(|p| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .any(uses_unsafe)
        })
        .map(|p| {
            p.strip_prefix(root)
                .expect("under the root")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let doc = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let list = doc
        .split("<!-- unsafe-list -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- /unsafe-list -->").next())
        .expect("ARCHITECTURE.md has an unsafe-list section");
    let listed: BTreeSet<String> = list
        .lines()
        .filter_map(|l| l.strip_prefix("| "))
        .filter_map(|l| l.split(" | ").next())
        .flat_map(|cell| cell.split(", "))
        .filter_map(|f| f.trim().strip_prefix('`')?.strip_suffix('`'))
        .map(str::to_string)
        .collect();
    let missing: Vec<_> = actual.difference(&listed).collect();
    let stale: Vec<_> = listed.difference(&actual).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "docs/ARCHITECTURE.md's unsafe list is out of date: files with unsafe code not listed \
         {missing:?}; listed files without unsafe code {stale:?}"
    );
}

#[test]
fn comments_and_words_containing_unsafe_do_not_count() {
    assert!(uses_unsafe("    unsafe { f() }"));
    assert!(uses_unsafe("pub unsafe fn read(&mut self) {}"));
    assert!(uses_unsafe("let x = unsafe{y};"));
    assert!(!uses_unsafe("    // SAFETY: unsafe things"));
    assert!(!uses_unsafe("//! The only `unsafe` here"));
    assert!(!uses_unsafe("#![deny(unsafe_op_in_unsafe_fn)]"));
    assert!(!uses_unsafe("let a = 1; // unsafe later"));
}
