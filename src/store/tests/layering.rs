//! Dependencies point one way (docs/ARCHITECTURE.md): `store` knows nothing of the cluster
//! side, the spill thread or the server; `client` only of `shm`, `ring` and `protocol` (and
//! ids); neither uses the daemon's syscall or transport crates. Checked on the sources (use
//! trees parsed with their groups, `super`/`self` resolved, paths in code too), so a new
//! import is caught at `cargo test`.

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

/// Crates outside ours that `store` must not use: syscalls, io_uring, the transports.
const NOT_FOR_STORE: &[&str] = &[
    "rustix",
    "libc",
    "io_uring",
    "memmap2",
    "ferroplasma_transport",
    "ferroplasma_transport_mem",
    "ferroplasma_transport_tcp",
    "ferroplasma_region",
];

/// Crates outside ours that `client` must not use: the daemon's I/O and the transports.
const NOT_FOR_CLIENT: &[&str] = &[
    "io_uring",
    "ferroplasma_transport",
    "ferroplasma_transport_mem",
    "ferroplasma_transport_tcp",
    "ferroplasma_region",
];

/// The source without comments, string and character literals (so that prose naming a
/// module is not a use of it).
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i..].starts_with(b"/*") {
                        depth += 1;
                        i += 2;
                    } else if b[i..].starts_with(b"*/") {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                out.push(' ');
            }
            b'r' if matches!(b.get(i + 1), Some(b'"' | b'#'))
                && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) =>
            {
                let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
                let open = i + 1 + hashes;
                if b.get(open) != Some(&b'"') {
                    out.push('r');
                    i += 1;
                    continue;
                }
                let close: Vec<u8> = std::iter::once(b'"')
                    .chain(std::iter::repeat_n(b'#', hashes))
                    .collect();
                i = open + 1;
                while i < b.len() && !b[i..].starts_with(&close) {
                    i += 1;
                }
                i += close.len();
                out.push_str("\"\"");
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push_str("\"\"");
            }
            // A character literal ('x', '\n', '\u{..}'); a lifetime has no closing quote.
            b'\'' if b.get(i + 1) == Some(&b'\\') || b.get(i + 2) == Some(&b'\'') => {
                i += 2;
                while i < b.len() && b[i] != b'\'' {
                    i += 1;
                }
                i += 1;
                out.push_str("' '");
            }
            _ => {
                let ch = text[i..].chars().next().unwrap_or(' ');
                out.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    out
}

/// Identifiers, `::` and single punctuation characters.
fn tokens(code: &str) -> Vec<String> {
    let mut v = Vec::new();
    let mut it = code.char_indices().peekable();
    while let Some((i, ch)) = it.next() {
        if ch.is_alphanumeric() || ch == '_' {
            let mut end = i + ch.len_utf8();
            while let Some(&(j, c)) = it.peek() {
                if !(c.is_alphanumeric() || c == '_') {
                    break;
                }
                end = j + c.len_utf8();
                it.next();
            }
            v.push(code[i..end].to_string());
        } else if ch == ':' && it.peek().is_some_and(|&(_, c)| c == ':') {
            it.next();
            v.push("::".into());
        } else if !ch.is_whitespace() {
            v.push(ch.to_string());
        }
    }
    v
}

/// Parses the use-tree at `t[i..]` under `prefix`, adding every path it names to `out`;
/// returns the index after it.
fn use_tree(t: &[String], mut i: usize, prefix: &[String], out: &mut Vec<Vec<String>>) -> usize {
    let mut path = prefix.to_vec();
    if t.get(i).is_some_and(|x| x == "::") {
        i += 1;
    }
    loop {
        match t.get(i).map(String::as_str) {
            Some("{") => {
                i += 1;
                while t.get(i).is_some_and(|x| x != "}") {
                    i = use_tree(t, i, &path, out);
                    if t.get(i).is_some_and(|x| x == ",") {
                        i += 1;
                    }
                }
                return i + 1;
            }
            Some("*") => {
                out.push(path);
                return i + 1;
            }
            Some(seg) if seg.chars().all(|c| c.is_alphanumeric() || c == '_') => {
                path.push(seg.to_string());
                i += 1;
                if t.get(i).is_some_and(|x| x == "::") {
                    i += 1;
                    continue;
                }
                if t.get(i).is_some_and(|x| x == "as") {
                    i += 2;
                }
                out.push(path);
                return i;
            }
            // `,`, `}`, `;` or the end: a tree ended (or a malformed one: stop).
            _ => {
                out.push(path);
                return i;
            }
        }
    }
}

/// Every path `code` names: the paths of its `use` trees (groups expanded), and the paths in
/// expressions and types that start with `crate`, `super`, `self` or one of `externs`.
fn named_paths(code: &str, externs: &[&str]) -> Vec<Vec<String>> {
    let t = tokens(code);
    let mut out = Vec::new();
    let mut i = 0;
    while i < t.len() {
        let prev_is_colons = i > 0 && t[i - 1] == "::";
        if t[i] == "use" {
            i = use_tree(&t, i + 1, &[], &mut out);
            continue;
        }
        let starts =
            ["crate", "super", "self"].contains(&t[i].as_str()) || externs.contains(&t[i].as_str());
        if starts && !prev_is_colons && t.get(i + 1).is_some_and(|x| x == "::") {
            let mut path = vec![t[i].clone()];
            let mut j = i + 1;
            while t.get(j).is_some_and(|x| x == "::")
                && t.get(j + 1)
                    .is_some_and(|x| x.chars().all(|c| c.is_alphanumeric() || c == '_'))
            {
                path.push(t[j + 1].clone());
                j += 2;
            }
            out.push(path);
            i = j;
            continue;
        }
        i += 1;
    }
    out
}

/// Where a path points: `Ok` with the crate-relative segments for our own items (`super` and
/// `self` resolved against `module`, the file's module path), `Err` with the external
/// crate's name otherwise. A bare first segment that is not in `externs` is taken as
/// relative to the module (a child module or an item in scope).
fn resolve(path: &[String], module: &[String], externs: &[&str]) -> Result<Vec<String>, String> {
    let first = path.first().map_or("", String::as_str);
    if externs.contains(&first) {
        return Err(first.to_string());
    }
    let (mut base, rest) = match first {
        "crate" => (Vec::new(), &path[1..]),
        "self" => (module.to_vec(), &path[1..]),
        "super" => (module.to_vec(), path),
        _ => (module.to_vec(), path),
    };
    let mut rest = rest;
    while rest.first().is_some_and(|s| s == "super") {
        base.pop();
        rest = &rest[1..];
    }
    while rest.first().is_some_and(|s| s == "self") {
        rest = &rest[1..];
    }
    base.extend(rest.iter().cloned());
    Ok(base)
}

/// The module path of the file at `rel` (relative to `src/`, with `/`).
fn module_of(rel: &str) -> Vec<String> {
    let rel = rel.trim_end_matches(".rs");
    let mut segs: Vec<String> = rel.split('/').map(str::to_string).collect();
    if segs.last().is_some_and(|s| s == "mod" || s == "lib") {
        segs.pop();
    }
    segs
}

/// What the file `rel` with `text` uses that `bad` forbids (crate-relative or external).
fn violations(
    rel: &str,
    text: &str,
    externs: &[&str],
    bad: impl Fn(&Result<Vec<String>, String>) -> bool,
) -> Vec<String> {
    let module = module_of(rel);
    named_paths(&code_only(text), externs)
        .into_iter()
        .map(|p| resolve(&p, &module, externs))
        .filter(|r| bad(r))
        .map(|r| match r {
            Ok(p) => format!("crate::{}", p.join("::")),
            Err(e) => e,
        })
        .collect()
}

fn store_forbids(r: &Result<Vec<String>, String>) -> bool {
    match r {
        Err(ext) => NOT_FOR_STORE.contains(&ext.as_str()),
        Ok(p) => {
            let s: Vec<&str> = p.iter().map(String::as_str).collect();
            matches!(
                s.as_slice(),
                ["cluster" | "server" | "client" | "ring", ..] | ["spill", "worker" | "io", ..]
            )
        }
    }
}

fn client_forbids(r: &Result<Vec<String>, String>) -> bool {
    match r {
        Err(ext) => NOT_FOR_CLIENT.contains(&ext.as_str()),
        Ok(p) => !p
            .first()
            .is_some_and(|top| ["shm", "ring", "protocol", "id", "client"].contains(&top.as_str())),
    }
}

fn relative(file: &str) -> String {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    Path::new(file)
        .strip_prefix(&src)
        .map_or_else(|_| file.to_string(), |p| p.display().to_string())
}

#[test]
fn store_depends_on_no_cluster_spill_worker_server_ring_or_syscalls() {
    for (file, text) in sources("store") {
        let bad = violations(&relative(&file), &text, NOT_FOR_STORE, store_forbids);
        assert!(bad.is_empty(), "{file} uses {bad:?}");
    }
}

#[test]
fn client_depends_only_on_shm_ring_protocol_and_ids() {
    for (file, text) in sources("client") {
        let bad = violations(&relative(&file), &text, NOT_FOR_CLIENT, client_forbids);
        assert!(bad.is_empty(), "{file} uses {bad:?}");
    }
}

/// The checker itself: grouped, nested, relative and external imports, and paths in code, are
/// all seen; prose in comments and strings is not.
#[test]
fn the_checker_sees_grouped_relative_and_external_imports() {
    let store = |rel: &str, text: &str| violations(rel, text, NOT_FOR_STORE, store_forbids);
    let planted = [
        ("store/x.rs", "use crate::{cluster::node, id::ObjectId};"),
        (
            "store/x.rs",
            "use crate::{id::ObjectId, spill::{job::Job, worker}};",
        ),
        ("store/x.rs", "pub(crate) use crate::ring :: spsc;"),
        ("store/x.rs", "use super::super::cluster::node::Runner;"),
        (
            "store/tests/x.rs",
            "use super::super::super::cluster::Node;",
        ),
        ("store/x.rs", "use super::super::{cluster as c, id};"),
        ("store/x.rs", "use self::super::super::server;"),
        ("store/x.rs", "use rustix::fs;"),
        ("store/x.rs", "use ::io_uring::IoUring;"),
        ("store/x.rs", "use {ferroplasma_transport::msg};"),
        ("store/x.rs", "fn f() { let _ = crate::cluster::node::X; }"),
        (
            "store/x.rs",
            "fn f() { let _ = super::super::server::Node::start; }",
        ),
        ("store/x.rs", "fn f() { rustix::io::write(); }"),
    ];
    for (rel, text) in planted {
        assert!(!store(rel, text).is_empty(), "{rel}: `{text}` passed");
    }
    let fine = [
        (
            "store/x.rs",
            "use crate::{id::ObjectId, spill::job::Job, shm::Allocator};",
        ),
        ("store/x.rs", "use super::{core::Core, table::Table};"),
        ("store/tests/x.rs", "use super::super::link::ToCore;"),
        (
            "store/x.rs",
            "// crate::cluster is not used\nconst S: &str = \"crate::cluster\";",
        ),
        (
            "store/mod.rs",
            "pub use parking::{MAX_PARKED_BYTES};\nuse std::io::{self, Write};",
        ),
    ];
    for (rel, text) in fine {
        assert!(
            store(rel, text).is_empty(),
            "{rel}: `{text}`: {:?}",
            store(rel, text)
        );
    }
    let client = |text: &str| violations("client/x.rs", text, NOT_FOR_CLIENT, client_forbids);
    assert!(!client("use crate::{shm::Arena, server::Node};").is_empty());
    assert!(!client("use super::super::spill::job;").is_empty());
    assert!(!client("use ferroplasma_transport::Transport;").is_empty());
    assert!(client("use crate::{shm::Arena, ring::spsc, protocol::Reply};").is_empty());
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
